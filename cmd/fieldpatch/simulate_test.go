package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/fleet"
)

// "fieldpatch simulate" against a server started like any other: its
// virtual devices enroll with a fleet token, take a rollout through power
// cuts and link drops, and the census through the boot selector finds
// them on the new release and none bricked.
func TestSimulateCLI(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "release")
	mustFP(t, "key", "gen", "--out", key)
	url, data := serveInProcess(t, "--image-key", key+".pub.pem", "--time-scale", "30", "--poll-interval", "1m", "--rollout-tick", "1s")
	remote := []string{"--server", url, "--data-dir", data}
	for _, v := range []string{"1.0.0", "1.0.1"} {
		p := filepath.Join(dir, "payload-"+v)
		if out := mustFP(t, "simulate", "payload", "--version", v, "--size", "65536", "-o", p); !strings.Contains(out, "simulated firmware "+v) {
			t.Fatalf("simulate payload: %s", out)
		}
		mustFP(t, "image", "build", "--payload", p, "--version", v, "--security-counter", "1", "--hw-class", "sim-lock",
			"--key", key+".pem", "-o", filepath.Join(dir, v+".img"))
	}
	mustFP(t, append([]string{"release", "upload", "--id", "lock-1.0.1", filepath.Join(dir, "1.0.1.img")}, remote...)...)
	tok := strings.Fields(mustFP(t, append([]string{"enroll-token", "create", "--uses", "20"}, remote...)...))[0]
	mustFP(t, append([]string{"rollout", "create", "--id", "sim", "--all", "--phases", "100", "--start", "lock-1.0.1"}, remote...)...)

	base := []string{"simulate", "--server", url, "--ca", filepath.Join(data, "pki", "ca.pem"), "--enroll-token", tok,
		"--factory", filepath.Join(dir, "1.0.0.img"), "--image-key", key + ".pub.pem"}
	if code, _, _ := fp(t, "simulate", "--devices", "5"); code != 2 {
		t.Fatalf("simulate without its required flags: exit %d, want 2", code)
	}
	report := filepath.Join(dir, "sim.json")
	out := mustFP(t, append(base, "--devices", "20", "--speed", "30", "--duration", "3m", "--until-version", "1.0.1", "--until-share", "0.8",
		"--fault-power-cut", "50", "--fault-drop", "30", "--work", filepath.Join(dir, "work"), "--json", report)...)
	if !strings.Contains(out, "bricked 0") {
		t.Fatalf("simulate output:\n%s", out)
	}
	var got struct {
		Snapshot fleet.Snapshot
		Census   fleet.Census
	}
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got.Census.Devices != 20 || len(got.Census.Bricked) != 0 || got.Census.Versions["1.0.1"] < 16 {
		t.Fatalf("census: %+v\n%s", got.Census, out)
	}
	if got.Snapshot.Faults.PowerCuts == 0 || got.Snapshot.Received < 16*65536 || got.Snapshot.Resumed == 0 {
		t.Fatalf("snapshot: %+v", got.Snapshot)
	}
}
