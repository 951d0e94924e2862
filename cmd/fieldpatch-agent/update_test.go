package main

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// fileDevice is a device in a directory: image files as slots, the
// two-copy boot environment in env.img, the non-volatile store, the state
// and data directories, and each slot's hooks (the worked example of
// docs/HOOKS.md: v1's in hooks/a, v2's in hooks/b).
type fileDevice struct {
	t   *testing.T
	dir string
	cfg string
	v2  string // path of the v2 image
}

func buildImage(t *testing.T, version string, counter uint32, size int) []byte {
	t.Helper()
	signer, err := trust.LoadPrivateKey(filepath.Join(vectors, "mcuboot", "ed25519.pem"))
	if err != nil {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte("firmware "+version+" "), size/16)
	var b bytes.Buffer
	if _, err := image.Build(context.Background(), &b, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
		Version: version, SecurityCounter: &counter, HWClass: "lock", Signers: []crypto.Signer{signer},
	}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func copyHooks(t *testing.T, from, to string) {
	t.Helper()
	os.MkdirAll(to, 0o755)
	entries, _ := os.ReadDir(from)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(to, e.Name()), b, 0o755)
	}
}

func newFileDevice(t *testing.T) *fileDevice {
	t.Helper()
	d := &fileDevice{t: t, dir: t.TempDir()}
	p := func(s string) string { return filepath.Join(d.dir, s) }
	v1 := buildImage(t, "1.0.0", 1, 64<<10)
	os.WriteFile(p("slot-a.img"), append(v1, make([]byte, 512<<10-len(v1))...), 0o644)
	os.WriteFile(p("slot-b.img"), make([]byte, 512<<10), 0o644)
	os.WriteFile(p("env.img"), make([]byte, 0x8000), 0o644)
	d.v2 = p("v2.img")
	os.WriteFile(d.v2, buildImage(t, "2.0.0", 2, 64<<10), 0o644)
	os.MkdirAll(p("data"), 0o755)
	os.WriteFile(p("data/format"), []byte("1\n"), 0o644)
	os.WriteFile(p("data/users.txt"), []byte("alice\nbob\ncarol\n"), 0o644)
	copyHooks(t, "../../docs/examples/hooks/v1", p("hooks/a"))
	copyHooks(t, "../../docs/examples/hooks/v2", p("hooks/b"))
	pub, _ := filepath.Abs(filepath.Join(vectors, "mcuboot", "ed25519.pub.pem"))
	cfg := map[string]any{
		"slots":     map[string]string{"a": "slot-a.img", "b": "slot-b.img"},
		"env":       map[string]any{"type": "uboot-pair", "device": "env.img", "offsets": []int{0, 0x4000}, "size": 0x4000},
		"keys":      []map[string]string{{"path": pub}},
		"nv":        "nv",
		"hw_class":  "lock",
		"state_dir": "state",
		"data_dir":  "data",
		"hooks_dir": "hooks/{slot}",
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	d.cfg = p("device.json")
	os.WriteFile(d.cfg, b, 0o644)
	d.must("nv", "--config", d.cfg, "--init")
	d.must("env", "--config", d.cfg, "fp_active=a")
	d.must("boot", "--config", d.cfg)
	return d
}

func (d *fileDevice) must(args ...string) string {
	d.t.Helper()
	code, out, errs := runAgent(args...)
	if code != 0 {
		d.t.Fatalf("fieldpatch-agent %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

func (d *fileDevice) status() (agent.State, agent.Facts) {
	d.t.Helper()
	var st struct {
		Device  agent.Facts `json:"device"`
		Journal agent.State `json:"journal"`
	}
	out := d.must("status", "--config", d.cfg, "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		d.t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st.Journal, st.Device
}

func (d *fileDevice) data() string {
	f, _ := os.ReadFile(filepath.Join(d.dir, "data", "format"))
	return strings.TrimSpace(string(f))
}

// reboot is the device powering up again: the boot selector, then the
// agent carrying on from its journal.
func (d *fileDevice) reboot() {
	d.t.Helper()
	d.must("boot", "--config", d.cfg)
	d.must("resume", "--config", d.cfg)
}

func TestWorkedMigrationUpgrade(t *testing.T) {
	d := newFileDevice(t)
	out := d.must("install", "--config", d.cfg, d.v2)
	if !strings.Contains(out, "reboot the device") {
		t.Fatalf("install said %q", out)
	}
	d.reboot()
	st, f := d.status()
	if st.Phase != agent.PhaseIdle || st.Last == nil || st.Last.Result != agent.ResultCommitted || f.RunningVersion != "2.0.0" || f.Active != "b" || f.NVCounter != 2 {
		t.Fatalf("after the update: %+v %+v", st, f)
	}
	if d.data() != "2" {
		t.Fatalf("data format %q after the upgrade", d.data())
	}
	csv, _ := os.ReadFile(filepath.Join(d.dir, "data", "users.csv"))
	if string(csv) != "name,role\nalice,user\nbob,user\ncarol,user\n" {
		t.Fatalf("users.csv = %q", csv)
	}
	if _, err := os.Stat(filepath.Join(d.dir, "state", "revert")); err == nil {
		if entries, _ := os.ReadDir(filepath.Join(d.dir, "state", "revert")); len(entries) > 0 {
			t.Errorf("revert material left after the commit: %v", entries)
		}
	}
	log, _ := os.ReadFile(filepath.Join(d.dir, "state", "update.log"))
	if !strings.Contains(string(log), "migrated 3 users to format 2") {
		t.Errorf("the hook's output is not in the update log:\n%s", log)
	}
}

// The easy case: v2 migrates, its health check fails, it reverts the data
// and goes back to v1 itself.
func TestWorkedMigrationHealthFailRollsBack(t *testing.T) {
	d := newFileDevice(t)
	os.WriteFile(filepath.Join(d.dir, "hooks/b/health-check"), []byte("#!/bin/sh\necho 'service does not answer' >&2\nexit 1\n"), 0o755)
	d.must("install", "--config", d.cfg, d.v2)
	d.must("boot", "--config", d.cfg)
	out := d.must("resume", "--config", d.cfg) // rolls back, asks for a reboot
	if !strings.Contains(out, "reboot") {
		t.Fatalf("resume after a failed health check said %q", out)
	}
	d.reboot()
	st, f := d.status()
	if st.Last == nil || st.Last.Result != agent.ResultRolledBack || !strings.Contains(st.Last.Reason, "health-check") || f.RunningVersion != "1.0.0" || f.NVCounter != 0 {
		t.Fatalf("after the failed trial: %+v %+v", st.Last, f)
	}
	if d.data() != "1" {
		t.Fatalf("data format %q after the rollback", d.data())
	}
	users, _ := os.ReadFile(filepath.Join(d.dir, "data", "users.txt"))
	if string(users) != "alice\nbob\ncarol\n" {
		t.Fatalf("users.txt after the rollback = %q", users)
	}
}

// The hard case: v2 migrates, then crashes (here its agent is killed in the
// health check) on every boot until the bootloader's attempts run out. The
// old firmware's agent, which cannot know format 2, runs the revert-data
// hook v2 left on the data partition.
func TestWorkedMigrationHardCase(t *testing.T) {
	bin := agentBinary(t)
	d := newFileDevice(t)
	os.WriteFile(filepath.Join(d.dir, "hooks/b/health-check"), []byte("#!/bin/sh\nkill -9 $PPID\nsleep 5\n"), 0o755)
	d.must("install", "--config", d.cfg, d.v2)
	for i := 0; i < 3; i++ {
		if got := d.must("boot", "--config", d.cfg); !strings.Contains(got, "reason=trial") {
			t.Fatalf("boot %d: %s", i+1, got)
		}
		cmd := exec.Command(bin, "resume", "--config", d.cfg)
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("trial %d: the agent was not killed: %v\n%s", i+1, err, out)
		}
		if d.data() != "2" {
			t.Fatalf("trial %d: data format %q: the migration did not run", i+1, d.data())
		}
	}
	if got := d.must("boot", "--config", d.cfg); !strings.Contains(got, "booted=a reason=rollback") {
		t.Fatalf("after the attempts ran out: %s", got)
	}
	d.must("resume", "--config", d.cfg)
	st, f := d.status()
	if st.Last == nil || st.Last.Result != agent.ResultRolledBack || f.RunningVersion != "1.0.0" {
		t.Fatalf("after the bootloader's rollback: %+v %+v", st.Last, f)
	}
	users, _ := os.ReadFile(filepath.Join(d.dir, "data", "users.txt"))
	if d.data() != "1" || string(users) != "alice\nbob\ncarol\n" {
		t.Fatalf("data after the old firmware restored it: format %q, users %q", d.data(), users)
	}
}

var (
	buildMu    sync.Mutex
	builtBins  = map[string]string{}
	buildTmpOk sync.Once
	buildDir   string
)

// binary builds a program of this module once per test run (the real
// agent, for tests that kill it; the real server, for end-to-end tests).
func binary(t *testing.T, pkg, name string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := builtBins[name]; ok {
		return p
	}
	buildTmpOk.Do(func() { buildDir, _ = os.MkdirTemp("", "fieldpatch-bins") })
	p := filepath.Join(buildDir, name)
	if out, err := exec.Command("go", "build", "-o", p, pkg).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	builtBins[name] = p
	return p
}

func agentBinary(t *testing.T) string { return binary(t, ".", "fieldpatch-agent") }

// The kill test: the real agent process is stopped with SIGKILL in every
// phase (the test-only pause point makes the moment exact, and the test
// checks each phase was reached), then the device goes on as it would in the
// field: whatever runs at the next boot. It must end where an unkilled run
// ends.
func TestKillInEveryPhase(t *testing.T) {
	bin := agentBinary(t)
	type scenario struct {
		name    string
		phases  []agent.Phase
		prepare func(d *fileDevice) string // returns the install source
		result  string
		version string
	}
	fromFile := func(d *fileDevice) string { return d.v2 }
	scenarios := []scenario{
		{"upgrade", []agent.Phase{agent.PhaseVerifying, agent.PhaseInstalling, agent.PhaseArmed, agent.PhaseRebooting,
			agent.PhaseTrialRunning, agent.PhaseCommitting, agent.PhaseCommitted, agent.PhaseReporting}, fromFile, agent.ResultCommitted, "2.0.0"},
		{"download", []agent.Phase{agent.PhaseDownloading}, func(d *fileDevice) string {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, d.v2) }))
			d.t.Cleanup(srv.Close)
			return srv.URL + "/v2.img"
		}, agent.ResultCommitted, "2.0.0"},
		{"failed health check", []agent.Phase{agent.PhaseRollingBack, agent.PhaseRolledBack}, func(d *fileDevice) string {
			os.WriteFile(filepath.Join(d.dir, "hooks/b/health-check"), []byte("#!/bin/sh\nexit 1\n"), 0o755)
			return d.v2
		}, agent.ResultRolledBack, "1.0.0"},
		{"refused", []agent.Phase{agent.PhaseFailed}, func(d *fileDevice) string {
			old := filepath.Join(d.dir, "old.img")
			os.WriteFile(old, buildImage(d.t, "0.9.0", 1, 4096), 0o644)
			return old
		}, agent.ResultFailed, "1.0.0"},
	}
	for _, sc := range scenarios {
		for _, phase := range sc.phases {
			t.Run(sc.name+"/"+string(phase), func(t *testing.T) {
				d := newFileDevice(t)
				src := sc.prepare(d)
				pauseFile := filepath.Join(d.dir, "paused")
				hit := false
				run := func(args ...string) {
					cmd := exec.Command(bin, args...)
					var out bytes.Buffer
					cmd.Stdout, cmd.Stderr = &out, &out
					if !hit {
						cmd.Env = append(os.Environ(), "FIELDPATCH_TEST_PAUSE_AT="+string(phase), "FIELDPATCH_TEST_PAUSE_FILE="+pauseFile)
					}
					if err := cmd.Start(); err != nil {
						t.Fatal(err)
					}
					done := make(chan error, 1)
					go func() { done <- cmd.Wait() }()
					deadline := time.After(30 * time.Second)
					for {
						select {
						case <-done:
							return
						case <-deadline:
							cmd.Process.Kill()
							t.Fatalf("%v did not finish:\n%s", args, out.String())
						case <-time.After(5 * time.Millisecond):
						}
						if !hit {
							if _, err := os.Stat(pauseFile); err == nil {
								hit = true
								cmd.Process.Signal(syscall.SIGKILL)
								<-done
								return
							}
						}
					}
				}
				run("install", "--config", d.cfg, src)
				for i := 0; i < 12; i++ {
					st, f := d.status()
					if st.Phase == agent.PhaseIdle && st.Last != nil {
						if st.Last.Result != sc.result || f.RunningVersion != sc.version {
							t.Fatalf("ended %s on %s, want %s on %s (%s)", st.Last.Result, f.RunningVersion, sc.result, sc.version, st.Last.Reason)
						}
						if !hit {
							t.Fatalf("phase %s was never reached", phase)
						}
						want := "1"
						if sc.version == "2.0.0" {
							want = "2"
						}
						if d.data() != want {
							t.Fatalf("data format %s on %s", d.data(), sc.version)
						}
						return
					}
					if st.Phase == agent.PhaseRebooting || st.Phase == agent.PhaseRollingBack && st.Update.DataRestored || f.Trial != "" {
						run("boot", "--config", d.cfg)
					}
					run("resume", "--config", d.cfg)
				}
				st, _ := d.status()
				t.Fatalf("no outcome after 12 boots; phase %s", st.Phase)
			})
		}
	}
}

// A cut in the middle of the migration: the first run writes half of the
// new data and the agent dies; at the next boot the trial goes on, the
// migration runs again from the start (it is idempotent) and the update
// commits with the data intact.
func TestWorkedMigrationKilledMidway(t *testing.T) {
	bin := agentBinary(t)
	d := newFileDevice(t)
	marker := filepath.Join(d.dir, "cut-once")
	os.WriteFile(filepath.Join(d.dir, "hooks/b/migrate-data.00-cut"), []byte(fmt.Sprintf(`#!/bin/sh
[ -e %[1]s ] && exit 0
touch %[1]s
printf 'name,role\nali' > "$FIELDPATCH_DATA_DIR/users.csv.tmp"
kill -9 $PPID
sleep 5
`, marker)), 0o755)
	// The real migration must run after the cut one: rename it to sort later.
	os.Rename(filepath.Join(d.dir, "hooks/b/migrate-data"), filepath.Join(d.dir, "hooks/b/migrate-data.50-users"))
	d.must("install", "--config", d.cfg, d.v2)
	d.must("boot", "--config", d.cfg)
	out, err := exec.Command(bin, "resume", "--config", d.cfg).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the agent was not killed mid-migration: %v\n%s", err, out)
	}
	d.reboot()
	st, f := d.status()
	if st.Last == nil || st.Last.Result != agent.ResultCommitted || f.RunningVersion != "2.0.0" || d.data() != "2" {
		t.Fatalf("after the interrupted migration: %+v %+v format %s", st.Last, f, d.data())
	}
	csv, _ := os.ReadFile(filepath.Join(d.dir, "data", "users.csv"))
	if string(csv) != "name,role\nalice,user\nbob,user\ncarol,user\n" {
		t.Fatalf("users.csv = %q", csv)
	}
}
