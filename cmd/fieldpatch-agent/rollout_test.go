package main

import (
	"context"
	"crypto"
	"crypto/sha256"
	be "encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// inCohort is the cohort rule docs/OPERATIONS.md gives: the first 53 bits
// of SHA-256(rollout ID, 0x00, device ID) as a fraction, below the phase's
// percentage. Written out here (device-side tests import no server code),
// it also checks that the server follows its documentation.
func inCohort(rolloutID, deviceID string, percent float64) bool {
	h := sha256.Sum256([]byte(rolloutID + "\x00" + deviceID))
	return float64(be.BigEndian.Uint64(h[:8])>>11)/(1<<53) < percent/100
}

// pickRollout finds a rollout ID whose first phase reaches between lo and
// hi of the devices, so a test knows its canaries.
func pickRollout(t *testing.T, prefix string, ids []string, percent float64, lo, hi int) (string, map[string]bool) {
	t.Helper()
	for i := range 1000 {
		id := fmt.Sprintf("%s-%d", prefix, i)
		in := map[string]bool{}
		for _, d := range ids {
			if inCohort(id, d, percent) {
				in[d] = true
			}
		}
		if len(in) >= lo && len(in) <= hi {
			return id, in
		}
	}
	t.Fatal("no rollout ID gives a cohort of that size")
	return "", nil
}

// lives runs devices as they live in the field: the agent daemon runs; when
// it exits asking for a reboot, the boot selector runs and the daemon
// starts again. stop(id) ends one device's life (it stops checking in),
// wait() ends them all.
type lives struct {
	t      *testing.T
	bin    string
	mu     sync.Mutex
	cancel map[string]context.CancelFunc
	wg     sync.WaitGroup
}

func startLives(t *testing.T, bin string, devs map[string]*fileDevice) *lives {
	l := &lives{t: t, bin: bin, cancel: map[string]context.CancelFunc{}}
	for id, d := range devs {
		ctx, cancel := context.WithCancel(context.Background())
		l.cancel[id] = cancel
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.live(ctx, id, d)
		}()
	}
	t.Cleanup(l.wait)
	return l
}

func (l *lives) live(ctx context.Context, id string, d *fileDevice) {
	for ctx.Err() == nil {
		cmd := exec.CommandContext(ctx, l.bin, "run", "--config", d.cfg)
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = 10 * time.Second
		out, err := cmd.CombinedOutput()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			l.t.Errorf("%s: agent daemon: %v\n%s", id, err, out)
			return
		}
		// It asked for a reboot: the boot selector picks the slot.
		if out, err := exec.CommandContext(ctx, l.bin, "boot", "--config", d.cfg).CombinedOutput(); err != nil && ctx.Err() == nil {
			l.t.Errorf("%s: boot: %v\n%s", id, err, out)
			return
		}
	}
}

func (l *lives) stop(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cancel[id]()
}

func (l *lives) wait() {
	l.mu.Lock()
	for _, c := range l.cancel {
		c()
	}
	l.mu.Unlock()
	l.wg.Wait()
}

// rolloutView is what `fieldpatch rollout show --json` prints, decoded here.
type rolloutView struct {
	State  string `json:"state"`
	Phase  int    `json:"phase"`
	Reason string `json:"reason"`
	Totals struct {
		Started    int `json:"started"`
		Committed  int `json:"committed"`
		RolledBack int `json:"rolled_back"`
		InProgress int `json:"in_progress"`
	} `json:"totals"`
	Phases []struct {
		Cohort   int            `json:"cohort"`
		ByStatus map[string]int `json:"by_status"`
	} `json:"phases"`
	Events []struct{ Kind string } `json:"events"`
}

func (s *liveServer) rollout(id string) rolloutView {
	s.t.Helper()
	var v rolloutView
	if err := json.Unmarshal([]byte(s.run("rollout", "show", id, "--json")), &v); err != nil {
		s.t.Fatal(err)
	}
	return v
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// fleetOf provisions n file-backed devices in group "fleet"; bad ones get
// a second-slot firmware that fails its health check.
func fleetOf(t *testing.T, srv *liveServer, n int, bad bool) (map[string]*fileDevice, []string) {
	devs := map[string]*fileDevice{}
	var ids []string
	for i := range n {
		id := fmt.Sprintf("lock-%d", i)
		d := linkedDevice(t, srv, id, "fleet")
		if bad {
			os.WriteFile(filepath.Join(d.dir, "hooks/b/health-check"), []byte("#!/bin/sh\necho 'lock service does not answer' >&2\nexit 1\n"), 0o755)
		}
		devs[id], ids = d, append(ids, id)
	}
	return devs, ids
}

// linkedDevice is a file-backed device provisioned in a group, in Berlin.
func linkedDevice(t *testing.T, srv *liveServer, id, group string) *fileDevice {
	t.Helper()
	d := newFileDevice(t)
	srv.run("device", "provision", id, "--group", group, "--out", filepath.Join(d.dir, "bundle"))
	var cfg map[string]any
	b, _ := os.ReadFile(d.cfg)
	json.Unmarshal(b, &cfg)
	cfg["link"] = map[string]string{"bundle": "bundle"}
	cfg["time_zone"] = "Europe/Berlin"
	b, _ = json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(d.cfg, b, 0o644)
	return d
}

// End to end with real agents and a real server: a release that fails its
// health check is rolled back by the canaries on their own; the rollback
// gate trips and pauses the rollout on its own; no device outside the
// canary phase is ever offered it.
func TestOnlineRolloutCanaryTrips(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	devs, ids := fleetOf(t, srv, 8, true)
	srv.run("release", "upload", "--id", "lock-2.0.0", devs[ids[0]].v2)
	id, canaries := pickRollout(t, "canary", ids, 25, 1, 3)
	srv.run("rollout", "create", "lock-2.0.0", "--id", id, "--group", "fleet", "--phases", "25,100", "--soak", "1s",
		"--min-sample", "1", "--max-rollback-rate", "0.1")
	startLives(t, agentBin, devs)
	// Started once every device has checked in: a phase whose cohort holds
	// no device the server knows yet counts as done once it has soaked, so
	// a loaded machine could otherwise skip the canary phase.
	waitFor(t, "every device's first check-in", 60*time.Second, func() bool {
		for _, d := range ids {
			if srv.device(d).LastSeen.IsZero() {
				return false
			}
		}
		return true
	})
	srv.run("rollout", "start", id)

	waitFor(t, "the gate to pause the rollout", 90*time.Second, func() bool { return srv.rollout(id).State == "paused" })
	v := srv.rollout(id)
	if v.Phase != 0 || !strings.Contains(v.Reason, "gate: rollback rate") {
		t.Fatalf("paused in phase %d: %q", v.Phase+1, v.Reason)
	}
	// Every canary finishes by its own rules (rolled back, back on 1.0.0);
	// meanwhile the others keep checking in and are offered nothing.
	waitFor(t, "the canaries to roll back", 90*time.Second, func() bool {
		for c := range canaries {
			if lastUpdate(srv.device(c)) != "rolled_back" {
				return false
			}
		}
		return true
	})
	time.Sleep(2 * time.Second) // two more poll intervals for everyone
	for _, d := range ids {
		dv := srv.device(d)
		switch {
		case canaries[d] && (dv.Version != "1.0.0" || len(dv.Updates) != 1):
			t.Errorf("canary %s: version %s, updates %+v", d, dv.Version, dv.Updates)
		case !canaries[d] && len(dv.Updates) != 0:
			t.Errorf("%s, outside the canary, was offered the release: %+v", d, dv.Updates)
		case dv.LastSeen.Before(time.Now().Add(-5 * time.Second)):
			t.Errorf("%s stopped checking in (last seen %v)", d, dv.LastSeen)
		}
	}
	if v := srv.rollout(id); v.State != "paused" || v.Phase != 0 || v.Totals.RolledBack != len(canaries) {
		t.Fatalf("after the canaries: %+v", v)
	}
}

// The leak: a release that commits cleanly, after which some devices stop
// checking in. The soak gate trips before the next phase starts.
func TestOnlineRolloutSoakGate(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	devs, ids := fleetOf(t, srv, 8, false)
	srv.run("release", "upload", "--id", "lock-2.0.0", devs[ids[0]].v2)
	id, canaries := pickRollout(t, "leak", ids, 25, 1, 3)
	srv.run("rollout", "create", "lock-2.0.0", "--id", id, "--group", "fleet", "--phases", "25,100", "--soak", "60s",
		"--min-sample", "1", "--silence", "3s", "--max-unhealthy-rate", "0.4", "--start")
	l := startLives(t, agentBin, devs)
	for c := range canaries {
		waitFor(t, c+" to commit", 90*time.Second, func() bool { return lastUpdate(srv.device(c)) == "committed" })
		l.stop(c) // the leak: it never checks in again
	}
	waitFor(t, "the soak gate", 30*time.Second, func() bool { return srv.rollout(id).State == "paused" })
	v := srv.rollout(id)
	if v.Phase != 0 || !strings.Contains(v.Reason, "gate: soak") || !strings.Contains(v.Reason, " silent,") {
		t.Fatalf("paused in phase %d: %q", v.Phase+1, v.Reason)
	}
	for _, d := range ids {
		if !canaries[d] && len(srv.device(d).Updates) != 0 {
			t.Errorf("%s, outside the canary, was offered the release", d)
		}
	}
}

// The server is killed (SIGKILL) mid-phase and started again on the same
// data: the rollout goes on, no device is started twice, none is lost.
func TestOnlineRolloutSurvivesServerKill(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	addr := strings.TrimPrefix(srv.url, "https://")
	devs, ids := fleetOf(t, srv, 6, false)
	srv.run("release", "upload", "--id", "lock-2.0.0", devs[ids[0]].v2)
	id, canaries := pickRollout(t, "restart", ids, 50, 2, 4)
	srv.run("rollout", "create", "lock-2.0.0", "--id", id, "--group", "fleet", "--phases", "50,100", "--soak", "2s", "--min-sample", "2", "--start")
	startLives(t, agentBin, devs)
	waitFor(t, "the canaries to start", 60*time.Second, func() bool { return srv.rollout(id).Totals.Started >= 1 })
	srv.cmd.Process.Signal(syscall.SIGKILL)
	srv.cmd.Wait()
	srv2 := startServer(t, srv.dataDir, addr, "--rollout-tick=200ms")
	waitFor(t, "every device to commit", 120*time.Second, func() bool {
		for _, d := range ids {
			if lastUpdate(srv2.device(d)) != "committed" {
				return false
			}
		}
		return true
	})
	for _, d := range ids {
		if dv := srv2.device(d); len(dv.Updates) != 1 || dv.Version != "2.0.0" {
			t.Errorf("%s: version %s, %d updates (want one)", d, dv.Version, len(dv.Updates))
		}
	}
	// `rollout watch` ends by itself once every targeted device is done.
	if out := srv2.run("rollout", "watch", id, "--interval", "200ms"); !strings.Contains(out, fmt.Sprintf("rollout %s settled: %d committed, 0 failed, 0 rolled back", id, len(ids))) {
		t.Errorf("watch said:\n%s", out)
	}
	v := srv2.rollout(id)
	if v.Phase != 1 || v.Totals.Committed != len(ids) || v.Phases[0].Cohort != len(canaries) {
		t.Fatalf("after the restart: %+v", v)
	}
}

// Operator control with real agents: a download limit of one is never
// seen exceeded while devices update; a pause stops new starts and a resume lets them go on;
// an abort stops new starts for good while the device mid-update finishes;
// a newer rollout of the same release picks up the rest, and a device that
// joins the target group meanwhile.
func TestOnlineRolloutControl(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	devs, ids := fleetOf(t, srv, 6, false)
	devs["late"] = linkedDevice(t, srv, "late", "other")
	srv.run("release", "upload", "--id", "lock-2.0.0", devs[ids[0]].v2)
	srv.run("rollout", "create", "lock-2.0.0", "--id", "one-by-one", "--group", "fleet", "--max-downloads", "1", "--min-sample", "1", "--start")
	startLives(t, agentBin, devs)

	peak := 0
	sample := func() rolloutView {
		v := srv.rollout("one-by-one")
		n := v.Phases[0].ByStatus["offered"] + v.Phases[0].ByStatus["downloading"]
		peak = max(peak, n)
		if n > 1 {
			t.Fatalf("%d devices offered or downloading at once (limit 1): %v", n, v.Phases[0].ByStatus)
		}
		return v
	}
	waitFor(t, "a first start", 60*time.Second, func() bool { return sample().Totals.Started >= 1 })
	srv.run("rollout", "pause", "one-by-one", "--reason", "checking")
	started := sample().Totals.Started
	time.Sleep(3 * time.Second) // three poll intervals
	if v := sample(); v.Totals.Started != started {
		t.Fatalf("paused, yet %d devices started (was %d)", v.Totals.Started, started)
	}
	srv.run("rollout", "resume", "one-by-one")
	waitFor(t, "two commits", 90*time.Second, func() bool { return sample().Totals.Committed >= 2 })
	srv.run("rollout", "abort", "one-by-one", "--reason", "enough")
	started = sample().Totals.Started
	if started >= len(ids) {
		t.Skipf("all %d devices started before the abort; nothing left to check", started)
	}
	waitFor(t, "the device mid-update to finish", 60*time.Second, func() bool { return sample().Totals.InProgress == 0 })
	time.Sleep(2 * time.Second)
	if v := sample(); v.Totals.Started != started || v.Totals.Committed != started {
		t.Fatalf("after the abort: %d started (was %d), %d committed", v.Totals.Started, started, v.Totals.Committed)
	}
	// Downloads of this small image are brief, so sampling rarely sees one;
	// TestRateLimits (store) measures the limits exactly on a clock.
	t.Logf("most devices seen offered or downloading at once: %d (limit 1)", peak)

	// A newer rollout of the same release takes the rest; "late" joins the
	// target group meanwhile and is picked up.
	srv.run("rollout", "create", "lock-2.0.0", "--id", "the-rest", "--group", "fleet", "--min-sample", "1", "--start")
	srv.run("device", "edit", "late", "--add-group", "fleet")
	all := append([]string{"late"}, ids...)
	waitFor(t, "every device on 2.0.0", 90*time.Second, func() bool {
		for _, d := range all {
			if lastUpdate(srv.device(d)) != "committed" {
				return false
			}
		}
		return true
	})
	if v := srv.rollout("the-rest"); v.Totals.Committed != len(all)-started {
		t.Fatalf("the newer rollout committed %d devices, want %d", v.Totals.Committed, len(all)-started)
	}
	for _, d := range all {
		if n := len(srv.device(d).Updates); n != 1 {
			t.Errorf("%s has %d update attempts, want 1", d, n)
		}
	}
}

// Maintenance windows with real agents, in each device's own time zone: a
// window around the current time in Berlin is six hours away in New York,
// so the Berlin device updates and the New York one is not offered it.
func TestOnlineRolloutWindows(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	berlin := linkedDevice(t, srv, "lock-berlin", "fleet")
	ny := linkedDevice(t, srv, "lock-ny", "fleet")
	var cfg map[string]any
	b, _ := os.ReadFile(ny.cfg)
	json.Unmarshal(b, &cfg)
	cfg["time_zone"] = "America/New_York"
	b, _ = json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(ny.cfg, b, 0o644)
	srv.run("release", "upload", "--id", "lock-2.0.0", berlin.v2)
	loc, _ := time.LoadLocation("Europe/Berlin")
	now := time.Now().In(loc)
	window := now.Add(-time.Hour).Format("15:04") + "-" + now.Add(time.Hour).Format("15:04")
	srv.run("rollout", "create", "lock-2.0.0", "--id", "night", "--group", "fleet", "--window", window, "--min-sample", "1", "--start")
	startLives(t, agentBin, map[string]*fileDevice{"lock-berlin": berlin, "lock-ny": ny})
	waitFor(t, "the Berlin device to update inside its window", 60*time.Second, func() bool { return lastUpdate(srv.device("lock-berlin")) == "committed" })
	time.Sleep(2 * time.Second) // two more check-ins from New York
	if dv := srv.device("lock-ny"); len(dv.Updates) != 0 || dv.LastSeen.Before(time.Now().Add(-5*time.Second)) {
		t.Fatalf("New York (window %s Berlin time is six hours away there): updates %+v, last seen %v", window, dv.Updates, dv.LastSeen)
	}
}

// TUF end to end: the operator sets up the repository with offline keys;
// a device provisioned afterwards carries the root; a release that is not
// in the signed targets is not offered; once published it is, and the
// agent installs exactly what the targets describe. The targets key is
// then rotated: the device walks to the new root and still updates.
func TestOnlineTUF(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	keys := filepath.Join(t.TempDir(), "keys")
	out := srv.run("trust", "init", "--keys", keys, "--root-keys", "3", "--root-threshold", "2")
	if !strings.Contains(out, "root v1 (2 of 3 root keys)") {
		t.Fatalf("trust init: %s", out)
	}
	d := linkedDevice(t, srv, "lock-tuf", "fleet")
	if _, err := os.Stat(filepath.Join(d.dir, "bundle", "root.json")); err != nil {
		t.Fatalf("the bundle has no TUF root: %v", err)
	}
	srv.run("release", "upload", "--id", "lock-2.0.0", d.v2)
	srv.run("rollout", "create", "lock-2.0.0", "--id", "r1", "--group", "fleet", "--min-sample", "1", "--start")
	l := startLives(t, agentBin, map[string]*fileDevice{"lock-tuf": d})
	time.Sleep(3 * time.Second) // three check-ins
	if dv := srv.device("lock-tuf"); len(dv.Updates) != 0 || dv.Version != "1.0.0" {
		t.Fatalf("offered before it was published: %+v", dv)
	}
	if out := srv.run("trust", "publish", "lock-2.0.0", "--keys", keys); !strings.Contains(out, "as lock/2.0.0.img in targets v2") {
		t.Fatalf("publish: %s", out)
	}
	waitFor(t, "the device to update", 60*time.Second, func() bool { return lastUpdate(srv.device("lock-tuf")) == "committed" })
	l.wait()
	var cached struct {
		Signed struct{ Version int } `json:"signed"`
	}
	b, _ := os.ReadFile(filepath.Join(d.dir, "state", "tuf", "root.json"))
	if json.Unmarshal(b, &cached); cached.Signed.Version != 1 {
		t.Fatalf("cached root version %d", cached.Signed.Version)
	}
	if out := srv.run("trust", "rotate-targets", "--keys", keys); !strings.Contains(out, "published root v2") || !strings.Contains(out, "re-signed targets v3") {
		t.Fatalf("rotate-targets: %s", out)
	}
	if out := srv.run("trust", "rotate-root", "--keys", keys); !strings.Contains(out, "published root v3 with 3 new root keys (2 of 3)") || !strings.Contains(out, "retired key files: root-1, root-2, root-3") {
		t.Fatalf("rotate-root: %s", out)
	}
	if out := srv.run("trust", "rotate-online", "--keys", keys); !strings.Contains(out, "published root v4") {
		t.Fatalf("rotate-online: %s", out)
	}
	var st struct {
		Roles map[string]struct {
			Version   int
			Threshold int
			KeyIDs    []string `json:"key_ids"`
		}
		Targets []string
	}
	json.Unmarshal([]byte(srv.run("trust", "status", "--json")), &st)
	if st.Roles["root"].Version != 4 || st.Roles["root"].Threshold != 2 || len(st.Roles["root"].KeyIDs) != 3 || st.Roles["targets"].Version != 3 ||
		len(st.Targets) != 1 || st.Targets[0] != "lock/2.0.0.img" {
		t.Fatalf("status after the rotations: %+v", st)
	}
	// A broken-into server slips targets of its own (signed with a key of
	// its own) under the operator's next signature: the CLI checks what it
	// is given against the pinned root and refuses to sign on it.
	forgeTargets(t, srv.dataDir, mustKey(t), d.v2)
	srv.cmd.Process.Signal(syscall.SIGTERM)
	srv.cmd.Wait()
	srv = startServer(t, srv.dataDir, strings.TrimPrefix(srv.url, "https://"), "--rollout-tick=200ms")
	cmd := exec.Command(srv.bin, "trust", "publish", "lock-2.0.0", "--keys", keys, "--server", srv.url, "--data-dir", srv.dataDir)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "not signed by the targets keys") {
		t.Fatalf("publish on forged targets: %v\n%s", err, out)
	}
	// One root key lost: revoked, two of three remain (threshold 2).
	lost := st.Roles["root"].KeyIDs[0]
	if out := srv.run("trust", "revoke", lost[:10], "--keys", keys); !strings.Contains(out, "published root v5 without key "+lost[:12]+" (root)") {
		t.Fatalf("revoke: %s", out)
	}
	json.Unmarshal([]byte(srv.run("trust", "status", "--json")), &st)
	if st.Roles["root"].Version != 5 || len(st.Roles["root"].KeyIDs) != 2 || slices.Contains(st.Roles["root"].KeyIDs, lost) {
		t.Fatalf("after the revocation: %+v", st.Roles["root"])
	}
	// The whole chain is served for devices still on root v1.
	for _, f := range []string{"1.root.json", "2.root.json", "3.root.json", "4.root.json", "5.root.json", "timestamp.json"} {
		if _, err := os.Stat(filepath.Join(srv.dataDir, "tuf", "metadata", f)); err != nil {
			t.Errorf("%s not published: %v", f, err)
		}
	}
}

func mustKey(t *testing.T) crypto.Signer {
	t.Helper()
	k, err := trust.GenerateKey(trust.KeyEd25519)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// With its poll interval at an hour, an agent that listens on the server's
// MQTT broker updates within seconds of a rollout starting: the server
// notifies it, it checks in at once. Without the notification it would
// not check in again for an hour.
func TestOnlineMQTTWakesAgent(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms", "--poll-interval=1h")
	if !strings.HasPrefix(srv.mqtt, "mqtts://127.0.0.1:") {
		t.Fatalf("the server's MQTT broker: %q", srv.mqtt)
	}
	d := linkedDevice(t, srv, "lock-mqtt", "fleet")
	var cfg map[string]any
	b, _ := os.ReadFile(d.cfg)
	json.Unmarshal(b, &cfg)
	cfg["link"] = map[string]string{"bundle": "bundle", "mqtt": srv.mqtt}
	b, _ = json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(d.cfg, b, 0o644)
	srv.run("release", "upload", "--id", "lock-2.0.0", d.v2)
	startLives(t, agentBin, map[string]*fileDevice{"lock-mqtt": d})
	waitFor(t, "the first check-in", 30*time.Second, func() bool { return !srv.device("lock-mqtt").LastSeen.IsZero() })
	time.Sleep(3 * time.Second) // connected and subscribed by now
	start := time.Now()
	srv.run("rollout", "create", "lock-2.0.0", "--id", "now", "--device", "lock-mqtt", "--start")
	waitFor(t, "the device to commit 2.0.0", 60*time.Second, func() bool { return lastUpdate(srv.device("lock-mqtt")) == "committed" })
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("committed %v after the rollout started", took)
	}
	// The check-in the notification prompted went over MQTT, answered by
	// the device API in process.
	if n := srv.metric(`fieldpatch_http_requests_total{api="mqtt",code="200"}`); n < 1 {
		t.Errorf("%v check-ins answered over MQTT, want at least 1", n)
	}
}

// Two agents that speak CoAP over DTLS instead of HTTPS, one with its
// pre-shared key and one with its certificate, complete a full update from
// a TUF-signed release: check-ins, metadata and the image block-wise,
// progress and outcome reports, all over CoAP.
func TestOnlineCoAPUpdate(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms", "--coap-listen=127.0.0.1:0")
	if !strings.HasPrefix(srv.coap, "coaps://127.0.0.1:") {
		t.Fatalf("the server's CoAP address: %q", srv.coap)
	}
	keys := filepath.Join(t.TempDir(), "keys")
	srv.run("trust", "init", "--keys", keys)
	devs := map[string]*fileDevice{}
	for id, auth := range map[string]string{"lock-psk": "psk", "lock-cert": "cert"} {
		d := linkedDevice(t, srv, id, "fleet")
		var cfg map[string]any
		b, _ := os.ReadFile(d.cfg)
		json.Unmarshal(b, &cfg)
		cfg["link"] = map[string]string{"bundle": "bundle", "coap": srv.coap, "coap_auth": auth}
		b, _ = json.MarshalIndent(cfg, "", "  ")
		os.WriteFile(d.cfg, b, 0o644)
		devs[id] = d
	}
	d := devs["lock-psk"]
	srv.run("release", "upload", "--id", "lock-2.0.0", d.v2)
	srv.run("trust", "publish", "lock-2.0.0", "--keys", keys)
	srv.run("rollout", "create", "lock-2.0.0", "--id", "r1", "--group", "fleet", "--min-sample", "1", "--start")
	l := startLives(t, agentBin, devs)
	waitFor(t, "both devices to commit 2.0.0 over CoAP", 90*time.Second, func() bool {
		return lastUpdate(srv.device("lock-psk")) == "committed" && lastUpdate(srv.device("lock-cert")) == "committed"
	})
	l.wait()
	for id, d := range devs {
		if _, f := d.status(); f.RunningVersion != "2.0.0" {
			t.Errorf("%s runs %s", id, f.RunningVersion)
		}
	}
	// It all went over CoAP: the server counted no HTTPS request from a
	// device (provisioning and the CLI use the management API).
	m := srv.metrics()
	t.Logf("requests:\n%s", grepLines(m, "fieldpatch_http_requests_total"))
	if !strings.Contains(m, `fieldpatch_http_requests_total{api="coap",code="200"}`) {
		t.Errorf("no CoAP requests counted:\n%s", grepLines(m, "fieldpatch_http_requests_total"))
	}
	if strings.Contains(m, `fieldpatch_http_requests_total{api="device"`) {
		t.Errorf("devices used HTTPS:\n%s", grepLines(m, "fieldpatch_http_requests_total"))
	}
	if !strings.Contains(m, "fieldpatch_downloads_total 2\n") {
		t.Errorf("want 2 downloads (one per device, not one per block):\n%s", grepLines(m, "fieldpatch_download"))
	}
}
