package proto

import (
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	good := CheckIn{Version: "1.4.2", Slot: "a", HWClass: "smartlock-v2", TimeZone: "Europe/Berlin", Attributes: map[string]string{"site": "lab-3"}}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	bad := []CheckIn{
		{Version: "", Slot: "a", HWClass: "x"},
		{Version: "1.0.0", Slot: "c", HWClass: "x"},
		{Version: "1.0.0", Slot: "a", HWClass: "Smart Lock"},
		{Version: "1.0.0", Slot: "a", HWClass: "x", TimeZone: "../../etc/passwd"},
		{Version: "1.0.0", Slot: "a", HWClass: "x", Attributes: map[string]string{"Bad Key": "v"}},
		{Version: "1.0.0", Slot: "a", HWClass: "x", UpdateID: "../x"},
	}
	for i, c := range bad {
		if err := c.Validate(); err == nil {
			t.Errorf("bad check-in %d accepted: %+v", i, c)
		}
	}
	r := Report{ReportID: "r1", UpdateID: "u1", Status: StatusCommitted}
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Report{
		{ReportID: "", UpdateID: "u1", Status: StatusCommitted},
		{ReportID: "r1", UpdateID: "u/1", Status: StatusCommitted},
		{ReportID: "r1", UpdateID: "u1", Status: "exploded"},
		{ReportID: "r1", UpdateID: "u1", Status: StatusDownloading, Progress: 2},
		{ReportID: "r1", UpdateID: "u1", Status: StatusFailed, LogTail: strings.Repeat("x", MaxLogTailBytes+1)},
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("bad report accepted: %+v", bad)
		}
	}
	for _, s := range []string{"..", ".hidden", "a/b", strings.Repeat("a", 129), ""} {
		if ValidID("id", s) == nil {
			t.Errorf("ValidID(%q) accepted", s)
		}
	}
	if ValidSHA256(strings.Repeat("ab", 32)) != nil || ValidSHA256(strings.Repeat("AB", 32)) == nil || ValidSHA256("zz") == nil {
		t.Error("ValidSHA256")
	}
}
