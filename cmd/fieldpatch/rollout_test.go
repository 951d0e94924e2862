package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/server/rollout"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

// The rollout commands against a running server: create from flags and
// from a spec file, list, show, the operator actions and their refusals,
// watch ending on a stopped rollout, and mistakes caught before anything
// is sent.
func TestRolloutCLI(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "release")
	mustFP(t, "key", "gen", "--out", key)
	url, data := serveInProcess(t, "--image-key", key+".pub.pem")
	srv := []string{"--server", url, "--data-dir", data}
	payload := filepath.Join(dir, "payload.bin")
	os.WriteFile(payload, bytes.Repeat([]byte("lock firmware "), 500), 0o644)
	img := filepath.Join(dir, "v2.img")
	mustFP(t, "image", "build", "--payload", payload, "--version", "2.0.0", "--security-counter", "2", "--hw-class", "lock", "--key", key+".pem", "-o", img)
	mustFP(t, append([]string{"release", "upload", "--id", "lock-2.0.0", img}, srv...)...)
	// Devices count as targeted once they have checked in (and so told
	// their hardware class); these two never do.
	for _, id := range []string{"lock-a", "lock-b"} {
		mustFP(t, append([]string{"device", "provision", id, "--group", "eu", "--out", filepath.Join(dir, id)}, srv...)...)
	}

	out := mustFP(t, append([]string{"rollout", "create", "lock-2.0.0", "--id", "fix", "--group", "eu", "--phases", "1,10,50,100",
		"--soak", "2h", "--max-rollback-rate", "0.02", "--window", "mon,tue 22:00-05:00", "--default-zone", "Europe/Berlin",
		"--starts-per-minute", "200"}, srv...)...)
	if !strings.Contains(out, "rollout fix of lock-2.0.0: created, 4 phases (1% → 10% → 50% → 100%)") || !strings.Contains(out, "fieldpatch rollout start fix") {
		t.Fatalf("create said %q", out)
	}
	var list []rollout.Rollout
	if err := json.Unmarshal([]byte(mustFP(t, append([]string{"rollout", "list", "--json"}, srv...)...)), &list); err != nil || len(list) != 1 {
		t.Fatalf("list: %v %+v", err, list)
	}
	r := list[0]
	if r.State != rollout.StateCreated || len(r.Spec.Phases) != 4 || r.Spec.Phases[0].Soak.D() != 2*time.Hour || r.Spec.Phases[3].Soak.D() != 2*time.Hour ||
		*r.Spec.Phases[2].Gates.MaxRollbackRate != 0.02 || r.Spec.Schedule.Windows[0].Start != "22:00" || r.Spec.Schedule.Windows[0].Days[1] != "tue" ||
		r.Spec.Limits.StartsPerMinute != 200 {
		t.Fatalf("stored spec: %+v", r)
	}

	action := func(a string, want int) string {
		t.Helper()
		code, out, errs := fp(t, append([]string{"rollout", a, "fix", "--reason", "test " + a}, srv...)...)
		if code != want {
			t.Fatalf("rollout %s: exit %d, want %d\n%s%s", a, code, want, out, errs)
		}
		return out + errs
	}
	action("pause", cli.ExitRefused) // not started yet
	action("start", 0)
	action("pause", 0)
	if msg := action("pause", cli.ExitRefused); !strings.Contains(msg, "409") {
		t.Fatalf("pausing twice: %s", msg)
	}
	action("resume", 0)
	if msg := action("promote", 0); !strings.Contains(msg, "phase 2/4 (10%)") {
		t.Fatalf("promote said %q", msg)
	}
	show := mustFP(t, append([]string{"rollout", "show", "fix"}, srv...)...)
	for _, want := range []string{"rollout fix: lock-2.0.0 2.0.0 → active, 0 devices targeted", "▶ phase 2", "history:", "promoted         phase 2", "test pause"} {
		if !strings.Contains(show, want) {
			t.Errorf("show lacks %q:\n%s", want, show)
		}
	}
	var st store.RolloutStatus
	if err := json.Unmarshal([]byte(mustFP(t, append([]string{"rollout", "show", "fix", "--json"}, srv...)...)), &st); err != nil || st.Targeted != 0 || st.Phase != 1 || len(st.Events) != 5 {
		t.Fatalf("show --json: %v %+v", err, st)
	}
	var aborted rollout.Rollout
	if err := json.Unmarshal([]byte(mustFP(t, append([]string{"rollout", "abort", "fix", "--reason", "test abort", "--json"}, srv...)...)), &aborted); err != nil ||
		aborted.State != rollout.StateAborted || aborted.Reason != "aborted by an operator: test abort" {
		t.Fatalf("abort --json: %v %+v", err, aborted)
	}
	action("resume", cli.ExitRefused)
	// watch stops by itself on a stopped rollout, with the reason.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wout, werr bytes.Buffer
	if code := run(ctx, append([]string{"rollout", "watch", "fix", "--interval", "100ms"}, srv...), &wout, &werr); code != cli.ExitRefused ||
		!strings.Contains(werr.String(), "aborted by an operator: test abort") || !strings.Contains(wout.String(), "phase 1") {
		t.Fatalf("watch: exit %d\n%s%s", code, wout.String(), werr.String())
	}

	// A spec file, with gates per phase.
	spec := filepath.Join(dir, "spec.json")
	os.WriteFile(spec, []byte(`{"id": "fix2", "release": "lock-2.0.0", "target": {"tags": ["beta"]},
		"phases": [{"percent": 5, "soak": "30m", "gates": {"min_sample": 3, "max_failure_rate": 0}}, {"percent": 100}], "on_trip": "abort"}`), 0o644)
	mustFP(t, append([]string{"rollout", "create", "--spec", spec, "--start"}, srv...)...)
	var got rollout.Rollout
	if err := json.Unmarshal([]byte(mustFP(t, append([]string{"rollout", "list", "--json", "--state", "active"}, srv...)...)), &list); err != nil || len(list) != 1 {
		t.Fatalf("list --state active: %v %+v", err, list)
	}
	got = list[0]
	if got.Spec.ID != "fix2" || got.Spec.OnTrip != "abort" || *got.Spec.Phases[0].Gates.MaxFailureRate != 0 || *got.Spec.Phases[1].Gates.MaxFailureRate != rollout.DefaultMaxRate {
		t.Fatalf("spec file: %+v", got)
	}

	// Mistakes are usage errors, caught before anything is sent.
	for name, args := range map[string][]string{
		"shrinking phases": {"rollout", "create", "lock-2.0.0", "--id", "x", "--all", "--phases", "10,5"},
		"bad window":       {"rollout", "create", "lock-2.0.0", "--id", "x", "--all", "--window", "25:00-01:00"},
		"no target":        {"rollout", "create", "lock-2.0.0", "--id", "x"},
		"spec and flags":   {"rollout", "create", "--spec", spec, "--group", "eu"},
		"bad attr":         {"rollout", "create", "lock-2.0.0", "--id", "x", "--attr", "site"},
		"bad phases":       {"rollout", "create", "lock-2.0.0", "--id", "x", "--all", "--phases", "ten"},
	} {
		if code, out, errs := fp(t, append(args, srv...)...); code != cli.ExitUsage {
			t.Errorf("%s: exit %d\n%s%s", name, code, out, errs)
		}
	}
	if code, _, errs := fp(t, append([]string{"rollout", "create", "no-such-release", "--id", "y", "--all"}, srv...)...); code != cli.ExitRefused || !strings.Contains(errs, "404") {
		t.Errorf("unknown release: exit %d %s", code, errs)
	}
	if code, _, errs := fp(t, append([]string{"rollout", "create", "lock-2.0.0", "--id", "fix", "--all"}, srv...)...); code != cli.ExitRefused || !strings.Contains(errs, "409") {
		t.Errorf("an existing ID: exit %d %s", code, errs)
	}
}
