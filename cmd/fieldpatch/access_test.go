package main

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/server/store"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// mqttAddrs and coapAddrs hold each in-process server's MQTT and CoAP
// addresses, by data directory.
var mqttAddrs, coapAddrs sync.Map

// serveInProcess runs "fieldpatch serve" on a free loopback port until the
// test ends and returns its URL and data directory.
func serveInProcess(t *testing.T, flags ...string) (string, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	var out, errs testenv.Buffer
	done := make(chan int)
	go func() {
		done <- run(ctx, append([]string{"serve", "--listen", addr, "--data-dir", dir, "--mqtt-listen", "127.0.0.1:0"}, flags...), &out, &errs)
	}()
	t.Cleanup(func() { cancel(); <-done })
	for i := 0; i < 200 && !strings.Contains(out.String(), "serving on"); i++ {
		time.Sleep(25 * time.Millisecond)
	}
	if !strings.Contains(out.String(), "serving on") {
		t.Fatalf("the server did not start: %s", errs.String())
	}
	m := regexp.MustCompile(`MQTT broker     mqtts://(127\.0\.0\.1:\d+)`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("the server did not start its MQTT broker: %s", out.String())
	}
	mqttAddrs.Store(dir, m[1])
	if m := regexp.MustCompile(`CoAP over DTLS  coaps://(127\.0\.0\.1:\d+)`).FindStringSubmatch(out.String()); m != nil {
		coapAddrs.Store(dir, m[1])
	}
	return "https://" + addr, dir
}

// Roles, device groups and tags, filters and the audit log through the CLI:
// a viewer token reads but cannot change, an operator edits, only an admin
// reads the audit log, a revoked token stops working, and every listing
// has --json.
func TestRolesTagsAuditCLI(t *testing.T) {
	url, dir := serveInProcess(t)
	admin := []string{"--server", url, "--data-dir", dir}
	tokenFile := func(role string) []string {
		out := mustFP(t, append([]string{"api-token", "create", "--name", "cli-" + role, "--role", role, "--json"}, admin...)...)
		var resp struct{ Token, Role string }
		if err := json.Unmarshal([]byte(out), &resp); err != nil || resp.Role != role || !strings.HasPrefix(resp.Token, "fpa_") {
			t.Fatalf("api-token create: %v %s", err, out)
		}
		f := filepath.Join(t.TempDir(), role+".token")
		os.WriteFile(f, []byte(resp.Token+"\n"), 0o600)
		return []string{"--server", url, "--ca", filepath.Join(dir, "pki", "ca.pem"), "--token-file", f}
	}
	viewer, operator := tokenFile("viewer"), tokenFile("operator")
	for _, id := range []string{"lock-a", "lock-b", "lock-c"} {
		mustFP(t, append([]string{"device", "provision", id, "--out", filepath.Join(t.TempDir(), id), "--group", "berlin"}, operator...)...)
	}
	mustFP(t, append([]string{"device", "edit", "lock-b", "--add-tag", "canary", "--add-group", "canaries", "--remove-group", "berlin"}, operator...)...)
	if code, _, errs := fp(t, append([]string{"device", "edit", "lock-c", "--add-tag", "canary"}, viewer...)...); code != 1 || !strings.Contains(errs, "403") {
		t.Errorf("viewer edit: exit %d %s", code, errs)
	}
	if code, _, errs := fp(t, append([]string{"device", "edit", "lock-c", "--add-tag", "../x", "--add-group", "fine"}, operator...)...); code != 1 || !strings.Contains(errs, "400") {
		t.Errorf("bad tag: exit %d %s", code, errs)
	}
	list := func(args ...string) []string {
		var devs []store.Device
		out := mustFP(t, append(append([]string{"device", "list", "--json"}, args...), viewer...)...)
		if err := json.Unmarshal([]byte(out), &devs); err != nil {
			t.Fatalf("device list --json: %v %s", err, out)
		}
		var ids []string
		for _, d := range devs {
			ids = append(ids, d.ID)
		}
		return ids
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "lock-a lock-b lock-c"},
		{[]string{"--group", "berlin"}, "lock-a lock-c"},
		{[]string{"--tag", "canary"}, "lock-b"},
		{[]string{"--group", "canaries", "--tag", "canary"}, "lock-b"},
		{[]string{"--group", "berlin", "--tag", "canary"}, ""},
	} {
		if got := strings.Join(list(c.args...), " "); got != c.want {
			t.Errorf("device list %v: %q, want %q", c.args, got, c.want)
		}
	}
	if code, _, _ := fp(t, append([]string{"audit"}, operator...)...); code != 1 {
		t.Errorf("operator read the audit log: exit %d", code)
	}
	var log []store.AuditEntry
	if err := json.Unmarshal([]byte(mustFP(t, append([]string{"audit", "--json"}, admin...)...)), &log); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, e := range log {
		lines = append(lines, e.Actor+" "+e.Action+" "+e.Target+" "+strconv.Itoa(e.Status))
	}
	all := strings.Join(lines, "\n")
	for _, want := range []string{
		"admin POST /api/mgmt/v1/api-tokens cli-viewer 201",
		"cli-operator POST /api/mgmt/v1/devices lock-a 201",
		"cli-operator PATCH /api/mgmt/v1/devices/{id} lock-b 200",
		"cli-viewer PATCH /api/mgmt/v1/devices/{id} lock-c 403",
		"cli-operator PATCH /api/mgmt/v1/devices/{id} lock-c 400",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("audit log lacks %q:\n%s", want, all)
		}
	}
	if strings.Contains(mustFP(t, append([]string{"audit", "--json"}, admin...)...), "fpa_") {
		t.Error("a token secret reached the audit log")
	}
	// Listings all take --json.
	for _, args := range [][]string{{"api-token", "list", "--json"}, {"device", "pending", "--json"}, {"release", "list", "--json"}} {
		var v any
		if err := json.Unmarshal([]byte(mustFP(t, append(args, admin...)...)), &v); err != nil {
			t.Errorf("%v: %v", args, err)
		}
	}
	mustFP(t, append([]string{"api-token", "revoke", "cli-viewer"}, admin...)...)
	if code, _, errs := fp(t, append([]string{"device", "list"}, viewer...)...); code != 1 || !strings.Contains(errs, "401") {
		t.Errorf("revoked token: exit %d %s", code, errs)
	}
	out := mustFP(t, append([]string{"api-token", "list"}, admin...)...)
	if !strings.Contains(out, "cli-viewer") || !strings.Contains(out, "cli-operator") {
		t.Errorf("api-token list:\n%s", out)
	}
}
