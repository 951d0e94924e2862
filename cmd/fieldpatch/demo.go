package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/simdev"
	"github.com/fieldpatch/fieldpatch/internal/fleet"
	"github.com/fieldpatch/fieldpatch/internal/server"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

const demoHW = "smartlock-v2"

// runCommand is run, for the demo to type commands (set in init: the
// command table refers to the demo).
var runCommand func(ctx context.Context, args []string, stdout, stderr io.Writer) int

func init() { runCommand = run }

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "demo", "[--devices N] [--speed X] [--svg FILE]",
		`Tells the whole story on this machine, end to end, non-interactive: a server
on embedded defaults with fresh keys (image key, offline TUF root and targets
keys); a fleet of virtual devices on 1.0.0 (the real agent and boot selector
on simulated flash, over HTTPS with mutual TLS); a bad 1.0.1, whose health
check fails after boot, caught by the canary phase (the gate trips, the
rollout pauses on its own, the canaries roll back by themselves); a good
1.0.2 rolled out in phases 1% -> 10% -> 50% -> 100% while power cuts, link
drops and stalls, offline devices, slow links and misbehaving devices are
injected. At the end every device is powered on through the boot selector
and counted, and a report is printed (faults by kind, the patched share
over time as a chart, bricked devices, rollbacks, bytes sent, time to 94%),
with the chart also written as SVG.

Time on the devices and the server's rollout clock runs --speed times faster
than real time (poll intervals of 10 simulated minutes are 10 s at 60x);
certificate and TUF expiry stay on real time.

Exit 0 only when the story held: no device bricked, the bad release stopped
at the canary, the good one reached the fleet, and every kind of fault was
injected at least its minimum number of times (scaled to the fleet: 200
power cuts, 50 of them in slot or boot-environment writes, for 2,000
devices).`)
	devices := fs.Int("devices", 2000, "virtual devices in the fleet")
	speed := fs.Float64("speed", 60, "simulated seconds per real second")
	imageKiB := fs.Int("image-kib", 1024, "size of the firmware images in KiB")
	svg := fs.String("svg", "fieldpatch-demo.svg", "where to write the chart of the patched share (empty: nowhere)")
	jsonOut := fs.String("json", "", "also write the report as JSON to this file")
	work := fs.String("work", "", "working directory, kept afterwards (default: a fresh one under /dev/shm, removed at the end)")
	quiet := fs.Bool("quiet", false, "no live progress lines")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up after this long (real time)")
	seed := fs.Uint64("seed", uint64(time.Now().UnixNano()), "random seed of the faults")
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	if *devices < 100 || *devices > 99999 {
		return cli.Usagef("--devices must be between 100 and 99999")
	}
	if *speed <= 0 || *imageKiB < 16 || *imageKiB > 1536 {
		return cli.Usagef("--speed must be positive and --image-kib between 16 and 1536")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	d := &demo{ctx: ctx, out: stdout, n: *devices, speed: *speed, imageSize: *imageKiB << 10, quiet: *quiet, seed: *seed,
		tty: isTerminal(stdout)}
	if *work == "" {
		base := "/dev/shm"
		if fi, err := os.Stat(base); err != nil || !fi.IsDir() {
			base = os.TempDir()
		}
		dir, err := os.MkdirTemp(base, "fieldpatch-demo-")
		if err != nil {
			return cli.Failed(err)
		}
		defer os.RemoveAll(dir)
		d.dir = dir
	} else {
		if err := os.MkdirAll(*work, 0o700); err != nil {
			return cli.Failed(err)
		}
		d.dir = *work
	}
	rep, err := d.run()
	if rep != nil {
		d.printReport(rep)
		if *svg != "" {
			title := fmt.Sprintf("fieldpatch demo: %d devices, share on %s", d.n, rep.Good)
			if werr := os.WriteFile(*svg, fleet.SVGChart(title, rep.Timeline, rep.Marks), 0o644); werr != nil {
				fmt.Fprintf(stderr, "demo: writing %s: %v\n", *svg, werr)
			} else {
				fmt.Fprintf(stdout, "chart written to %s\n", *svg)
			}
		}
		if *jsonOut != "" {
			b, _ := json.MarshalIndent(rep, "", "  ")
			os.WriteFile(*jsonOut, b, 0o644)
		}
	}
	if err != nil {
		return cli.Failed(err)
	}
	if len(rep.Failures) > 0 {
		return cli.Failed(fmt.Errorf("the story did not hold: %s", strings.Join(rep.Failures, "; ")))
	}
	fmt.Fprintln(stdout, "\nThe story held: exit 0.")
	return nil
}

type demo struct {
	ctx       context.Context
	out       io.Writer
	dir       string
	n         int
	speed     float64
	imageSize int
	quiet     bool
	tty       bool
	seed      uint64

	srv    *server.Server
	url    string
	remote []string // the server flags of CLI commands
	fl     *fleet.Fleet
	t0     time.Time // the first rollout's start
}

// demoReport is what the demo found.
type demoReport struct {
	Devices int     `json:"devices"`
	Speed   float64 `json:"speed"`
	Bad     string  `json:"bad_release"`
	Good    string  `json:"good_release"`

	BadTripped    bool    `json:"bad_tripped"`
	BadReason     string  `json:"bad_reason"`
	BadTripAfter  float64 `json:"bad_trip_after_s"`
	BadCanary     int     `json:"bad_canary_cohort"`
	BadStarted    int     `json:"bad_started"`
	BadOutside    int     `json:"bad_started_outside_canary"`
	BadRolledBack int     `json:"bad_rolled_back"`

	GoodState  string         `json:"good_state"`
	Census     map[string]int `json:"census"`
	Bricked    []string       `json:"bricked"`
	Patched    float64        `json:"patched_share"`
	TimeTo94   float64        `json:"time_to_94_s"` // real seconds from the good rollout's start; -1 never
	Faults     fleet.FaultCounts
	MinFaults  map[string]int `json:"min_faults"`
	Outcomes   map[string]int `json:"outcomes"`
	BytesSent  int64          `json:"bytes_sent"`
	BytesNeed  int64          `json:"bytes_needed"`
	CheckIns   int64          `json:"check_ins"`
	CheckInErr int64          `json:"check_in_errors"`
	P50, P99   time.Duration  `json:"-"`
	Errors     map[string]int `json:"check_in_errors_by_kind"`
	Resumed    int64          `json:"tls_resumed"`
	FullTLS    int64          `json:"tls_full_handshakes"`
	Boots      int64          `json:"boots"`
	Elapsed    float64        `json:"elapsed_s"`
	Timeline   []fleet.Point  `json:"timeline"`
	Marks      []fleet.Mark   `json:"-"`
	Failures   []string       `json:"failures"`
}

func (d *demo) step(format string, args ...any) {
	fmt.Fprintf(d.out, "\n\033[1m== "+format+"\033[0m\n", args...)
}

func (d *demo) say(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

// cli runs a fieldpatch command in this process, as an operator would
// type it; its output is returned.
func (d *demo) cli(args ...string) (string, error) {
	var out, errb bytes.Buffer
	if code := runCommand(d.ctx, args, &out, &errb); code != 0 {
		return "", fmt.Errorf("fieldpatch %s: exit %d: %s%s", strings.Join(args, " "), code, errb.String(), out.String())
	}
	return out.String(), nil
}

func (d *demo) remoteCLI(args ...string) (string, error) { return d.cli(append(args, d.remote...)...) }

func (d *demo) run() (*demoReport, error) {
	start := time.Now()
	keys := filepath.Join(d.dir, "keys")
	if err := os.MkdirAll(keys, 0o700); err != nil {
		return nil, err
	}
	d.step("1. A server on embedded defaults, with fresh keys")
	if _, err := d.cli("key", "gen", "--out", filepath.Join(keys, "release")); err != nil {
		return nil, err
	}
	d.say("image-signing key: %s", filepath.Join(keys, "release.pem"))
	scale := d.speed
	t0 := time.Now()
	clock := func() time.Time { return t0.Add(time.Duration(float64(time.Since(t0)) * scale)) }
	srv, err := server.New(d.ctx, server.Config{Listen: "127.0.0.1:0", DataDir: filepath.Join(d.dir, "server"),
		ImageKeys: []string{filepath.Join(keys, "release.pub.pem")}, PollInterval: 10 * time.Minute,
		RolloutTick: time.Second, Clock: clock}, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	d.srv = srv
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	sctx, stopServer := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { srv.Serve(sctx, ln); close(served) }()
	defer func() { stopServer(); <-served }()
	d.url = "https://" + ln.Addr().String()
	d.remote = []string{"--server", d.url, "--data-dir", filepath.Join(d.dir, "server")}
	d.say("server: %s (TLS 1.3, SQLite, its own CA; rollout clock at %gx)", d.url, d.speed)
	if _, err := d.remoteCLI("trust", "init", "--keys", filepath.Join(keys, "tuf")); err != nil {
		return nil, err
	}
	d.say("TUF repository: offline root keys (2 of 3) and targets key in %s; online snapshot and timestamp keys on the server", filepath.Join(keys, "tuf"))

	d.step("2. Three signed releases: 1.0.0 (factory), 1.0.1 (bad: fails its health check after boot), 1.0.2 (good)")
	imgs := map[string][]byte{}
	for _, r := range []struct {
		version string
		health  string
		counter int
	}{{"1.0.0", "ok", 1}, {"1.0.1", "fail", 2}, {"1.0.2", "ok", 2}} {
		payload := filepath.Join(d.dir, "payload-"+r.version)
		size := d.imageSize - 4096 // room for the header and the signature
		if err := os.WriteFile(payload, simdev.Payload(simdev.Behavior{Version: r.version, DataFormat: 1, Boot: "ok", Health: r.health, Migration: "none"}, size), 0o644); err != nil {
			return nil, err
		}
		img := filepath.Join(d.dir, "smartlock-"+r.version+".img")
		if _, err := d.cli("image", "build", "--payload", payload, "--version", r.version, "--security-counter", fmt.Sprint(r.counter),
			"--hw-class", demoHW, "--key", filepath.Join(keys, "release.pem"), "-o", img); err != nil {
			return nil, err
		}
		b, err := os.ReadFile(img)
		if err != nil {
			return nil, err
		}
		imgs[r.version] = b
		if r.version == "1.0.0" {
			d.say("%s: %d bytes, the firmware the fleet leaves the factory with", r.version, len(b))
			continue
		}
		id := "smartlock-" + r.version
		if _, err := d.remoteCLI("release", "upload", "--id", id, img); err != nil {
			return nil, err
		}
		if _, err := d.remoteCLI("trust", "publish", id, "--keys", filepath.Join(keys, "tuf")); err != nil {
			return nil, err
		}
		d.say("%s: %d bytes, uploaded as %s and signed into the TUF targets", r.version, len(b), id)
	}

	d.step("3. A fleet of %d devices on 1.0.0 enrolls (mutual TLS, one certificate each)", d.n)
	tokOut, err := d.remoteCLI("enroll-token", "create", "--uses", fmt.Sprint(d.n), "--ttl", "2h")
	if err != nil {
		return nil, err
	}
	token := strings.TrimSpace(strings.SplitN(tokOut, "\n", 2)[0])
	caPEM, err := os.ReadFile(filepath.Join(d.dir, "server", "pki", "ca.pem"))
	if err != nil {
		return nil, err
	}
	pub, err := trust.LoadPublicKey(filepath.Join(keys, "release.pub.pem"))
	if err != nil {
		return nil, err
	}
	defer fleet.TuneGC()()
	fl, err := fleet.New(fleet.Config{Devices: d.n, IDPrefix: "lock-", Server: d.url, CAPEM: caPEM, Token: token,
		Dir: filepath.Join(d.dir, "fleet"), Factory: imgs["1.0.0"], Keys: []boot.TrustedKey{{Key: pub, Name: "release"}},
		HWClass: demoHW, Speed: d.speed, Seed: d.seed, TimeZones: []string{"Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC"}})
	if err != nil {
		return nil, err
	}
	d.fl = fl
	enrollStart := time.Now()
	if err := fl.Enroll(d.ctx, 8, func(n int) {
		if !d.quiet && d.tty && (n%50 == 0 || n == d.n) {
			fmt.Fprintf(d.out, "\renrolled %s %d/%d", fleet.Bar(float64(n)/float64(d.n), 30), n, d.n)
		}
	}); err != nil {
		return nil, err
	}
	if d.tty && !d.quiet {
		fmt.Fprintln(d.out)
	}
	d.say("%d devices enrolled in %.1fs; each powers on through the boot selector and starts checking in", d.n, time.Since(enrollStart).Seconds())
	fl.Start(d.ctx)
	defer fl.Stop()
	if err := d.until("every device checked in", 2*time.Minute, func() (bool, string) {
		st := fl.Snapshot()
		return st.CheckIns-st.CheckInErrors >= int64(d.n), fmt.Sprintf("%d check-ins", st.CheckIns)
	}); err != nil {
		return nil, err
	}

	rep := &demoReport{Devices: d.n, Speed: d.speed, Bad: "1.0.1", Good: "1.0.2", MinFaults: minFaults(d.n)}
	var timeline []fleet.Point
	d.t0 = time.Now()
	sample := func() fleet.Snapshot {
		st := fl.Snapshot()
		timeline = append(timeline, fleet.Point{T: time.Since(d.t0), Share: st.Share("1.0.2")})
		return st
	}
	canary := d.n / 100
	// The gates judge once minSample devices have an outcome: for the bad
	// release, within its canary, so that the canary stops it; for the
	// good one, at least 10, so that the 1% misbehaving on first boot
	// (2 devices in 200) cannot reach the 20% rollback gate by landing
	// among the first few outcomes.
	minSample := max(2, canary/2)
	rolloutArgs := func(id, release string, minSample int) []string {
		return []string{"rollout", "create", "--id", id, "--all", "--phases", "1,10,50,100",
			"--soak", "15m", "--max-failure-rate", "0.2", "--max-rollback-rate", "0.2", "--min-sample", fmt.Sprint(minSample), "--start", release}
	}

	d.step("4. The bad 1.0.1 goes out in phases 1%% -> 10%% -> 50%% -> 100%%")
	if _, err := d.remoteCLI(rolloutArgs("bad-1.0.1", "smartlock-1.0.1", minSample)...); err != nil {
		return rep, err
	}
	badStart := time.Now()
	var bad *store.RolloutStatus
	err = d.until("the canary gate trips", 3*time.Minute, func() (bool, string) {
		st := sample()
		var err error
		if bad, err = d.status("bad-1.0.1"); err != nil {
			return false, err.Error()
		}
		return bad.State != "active", d.progress("1.0.1", st, bad)
	})
	if err != nil {
		return rep, err
	}
	rep.BadTripAfter = time.Since(badStart).Seconds()
	rep.BadTripped = bad.State == "paused"
	rep.BadReason = bad.Reason
	rep.Marks = append(rep.Marks, fleet.Mark{T: time.Since(d.t0), Label: "1.0.1 paused by its gate"})
	d.say("rollout bad-1.0.1 %s after %.1fs: %s", bad.State, rep.BadTripAfter, bad.Reason)
	// The canaries that were mid-update finish rolling back.
	err = d.until("the canaries roll back", 2*time.Minute, func() (bool, string) {
		st := sample()
		b, err := d.status("bad-1.0.1")
		if err != nil {
			return false, err.Error()
		}
		bad = b
		return bad.Totals.InProgress == 0 && st.Versions["1.0.1"] == 0, d.progress("1.0.1", st, bad)
	})
	if err != nil {
		// The verdict says what is wrong (a canary still on 1.0.1 is
		// counted in the census); the story goes on.
		rep.Failures = append(rep.Failures, err.Error())
	}
	if len(bad.Phases) > 0 {
		rep.BadCanary = bad.Phases[0].Cohort
	}
	for i, p := range bad.Phases {
		rep.BadStarted += p.Stats.Started
		if i > 0 {
			rep.BadOutside += p.Stats.Started
		}
	}
	rep.BadRolledBack = bad.Totals.RolledBack
	d.say("canary cohort %d devices: %d offered 1.0.1, %d rolled back by themselves, %d failed; devices outside the canary offered it: %d",
		rep.BadCanary, rep.BadStarted, bad.Totals.RolledBack, bad.Totals.Failed, rep.BadOutside)
	if _, err := d.remoteCLI("rollout", "abort", "bad-1.0.1", "--reason", "1.0.1 fails its health check: fixed in 1.0.2"); err != nil {
		return rep, err
	}
	d.say("operator: rollout bad-1.0.1 aborted for good")

	d.step("5. The good 1.0.2 goes out, with faults injected")
	faults := fleet.Faults{PowerCut: 25, Drop: 10, Stall: 5, Offline: 5, Slow: 5, Misbehave: 1}
	fl.SetFaults(faults)
	d.say("faults: power cuts on %.0f%% of updates, links dropped on %.0f%% and stalled on %.0f%% of downloads,", faults.PowerCut, faults.Drop, faults.Stall)
	d.say("        %.0f%% of devices offline for a while, %.0f%% on slow links (64 KiB/s), %.0f%% misbehaving on first boot", faults.Offline, faults.Slow, faults.Misbehave)
	if _, err := d.remoteCLI(rolloutArgs("good-1.0.2", "smartlock-1.0.2", max(minSample, 10))...); err != nil {
		return rep, err
	}
	goodStart := time.Since(d.t0)
	rep.Marks = append(rep.Marks, fleet.Mark{T: goodStart, Label: "1.0.2 rollout starts"})
	var good *store.RolloutStatus
	lastPhase := -1
	err = d.until("the good release reaches the fleet", 8*time.Minute, func() (bool, string) {
		st := sample()
		var err error
		if good, err = d.status("good-1.0.2"); err != nil {
			return false, err.Error()
		}
		if good.Phase != lastPhase {
			lastPhase = good.Phase
			rep.Marks = append(rep.Marks, fleet.Mark{T: time.Since(d.t0), Label: fmt.Sprintf("phase %d: %.0f%%", good.Phase+1, good.Spec.Phases[good.Phase].Percent)})
		}
		if good.State != "active" {
			return true, ""
		}
		done := good.Phase == len(good.Spec.Phases)-1 && good.Pending == 0 && good.Totals.InProgress == 0
		return done, d.progress("1.0.2", st, good)
	})
	if err != nil {
		return rep, err
	}
	rep.GoodState = good.State
	if good.State != "active" {
		rep.Failures = append(rep.Failures, fmt.Sprintf("rollout good-1.0.2 %s: %s", good.State, good.Reason))
	}
	final := sample()
	fl.Stop()

	d.step("6. Every device powered on through the boot selector, and counted")
	census := fl.PowerOnAll(context.Background())
	rep.Census, rep.Bricked = census.Versions, census.Bricked
	rep.Patched = float64(census.Versions["1.0.2"]) / float64(d.n)
	d.say("booted: %s; bricked: %d", versionsLine(census.Versions), len(census.Bricked))

	rep.Timeline = timeline
	rep.TimeTo94 = -1
	if t, ok := fleet.TimeTo(timeline, 0.94); ok {
		rep.TimeTo94 = (t - goodStart).Seconds()
	}
	rep.Faults = final.Faults
	rep.Outcomes = final.Outcomes
	rep.BytesSent = int64(srv.Metrics.Value("fieldpatch_download_bytes_total"))
	rep.BytesNeed = int64(census.Versions["1.0.2"]) * int64(len(imgs["1.0.2"]))
	rep.CheckIns, rep.CheckInErr, rep.P50, rep.P99, rep.Boots = final.CheckIns, final.CheckInErrors, final.P50, final.P99, final.Boots
	rep.Resumed, rep.FullTLS, rep.Errors = final.Resumed, final.FullHandshakes, final.Errors
	rep.Elapsed = time.Since(start).Seconds()
	rep.Failures = append(rep.Failures, judgeDemo(rep)...)
	return rep, nil
}

// minFaults are the least injections of each kind for the story to count,
// scaled to the fleet (for 2,000 devices: 200 power cuts, 50 of them in
// slot or boot-environment writes).
func minFaults(n int) map[string]int {
	s := float64(n) / 2000
	at := func(v float64) int { return max(1, int(v*s)) }
	return map[string]int{"power_cuts": at(200), "power_cuts_in_slot_or_env_writes": at(50), "links_dropped": at(50),
		"links_stalled": at(20), "devices_offline": at(20), "devices_on_slow_links": at(20), "devices_misbehaving": at(5)}
}

func judgeDemo(r *demoReport) []string {
	var f []string
	if len(r.Bricked) > 0 {
		f = append(f, fmt.Sprintf("%d devices bricked (%s)", len(r.Bricked), strings.Join(r.Bricked[:min(5, len(r.Bricked))], ", ")))
	}
	if !r.BadTripped {
		f = append(f, "the bad release's gate did not pause it")
	}
	if r.BadOutside > 0 {
		f = append(f, fmt.Sprintf("the bad release reached %d devices outside the canary", r.BadOutside))
	}
	if r.BadRolledBack == 0 {
		f = append(f, "no canary rolled back the bad release")
	}
	if n := r.Census["1.0.1"]; n > 0 {
		f = append(f, fmt.Sprintf("%d devices still run the bad release", n))
	}
	if r.Patched < 0.9 {
		f = append(f, fmt.Sprintf("the good release reached only %.1f%% of the fleet", r.Patched*100))
	}
	if r.BytesSent < r.BytesNeed {
		f = append(f, fmt.Sprintf("the server sent %d bytes, fewer than the %d the updated devices needed", r.BytesSent, r.BytesNeed))
	}
	got := map[string]int{"power_cuts": r.Faults.PowerCuts, "power_cuts_in_slot_or_env_writes": r.Faults.CutsInSlotOrEnv,
		"links_dropped": int(r.Faults.Drops), "links_stalled": int(r.Faults.Stalls), "devices_offline": int(r.Faults.Offline),
		"devices_on_slow_links": int(r.Faults.Slow), "devices_misbehaving": int(r.Faults.Misbehaving)}
	var kinds []string
	for k := range r.MinFaults {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		if got[k] < r.MinFaults[k] {
			f = append(f, fmt.Sprintf("%s injected %d times, fewer than %d", strings.ReplaceAll(k, "_", " "), got[k], r.MinFaults[k]))
		}
	}
	return f
}

// status reads a rollout as `rollout show --json` prints it.
func (d *demo) status(id string) (*store.RolloutStatus, error) {
	out, err := d.remoteCLI("rollout", "show", id, "--json")
	if err != nil {
		return nil, err
	}
	var st store.RolloutStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("rollout show %s: %w", id, err)
	}
	return &st, nil
}

// progress is one live line about a rollout.
func (d *demo) progress(version string, st fleet.Snapshot, r *store.RolloutStatus) string {
	ph := ""
	if r != nil && r.Phase < len(r.Spec.Phases) {
		ph = fmt.Sprintf("phase %d/%d (%3.0f%%) %-7s", r.Phase+1, len(r.Spec.Phases), r.Spec.Phases[r.Phase].Percent, r.State)
	}
	share := st.Share(version)
	fc := st.Faults
	return fmt.Sprintf("%s %s %5.1f%% %s  updating %4d  rolled back %3d  cuts %3d drops %3d stalls %3d offline %3d",
		version, fleet.Bar(share, 24), share*100, ph, st.Updating, st.RolledBack(), fc.PowerCuts, fc.Drops, fc.Stalls, fc.Offline)
}

// until waits for cond, printing its progress line (in place on a
// terminal, every 5 seconds otherwise).
func (d *demo) until(what string, limit time.Duration, cond func() (bool, string)) error {
	deadline := time.Now().Add(limit)
	var lastPrint time.Time
	line := ""
	defer func() {
		if d.tty && !d.quiet && line != "" {
			fmt.Fprintln(d.out)
		}
	}()
	for {
		ok, l := cond()
		if l != "" {
			line = l
		}
		if !d.quiet && line != "" {
			switch {
			case d.tty:
				fmt.Fprintf(d.out, "\r\033[K%s", line)
			case time.Since(lastPrint) >= 5*time.Second || ok:
				fmt.Fprintln(d.out, line)
				lastPrint = time.Now()
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gave up waiting for %s after %v (%s)", what, limit, line)
		}
		select {
		case <-d.ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, d.ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// countsLine lists a map's counts in key order, each with format (key,
// count).
func countsLine(m map[string]int, format string) string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	var parts []string
	for _, k := range ks {
		parts = append(parts, fmt.Sprintf(format, k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func versionsLine(v map[string]int) string { return countsLine(v, "%s on %d") }

func kindsLine(m map[string]int) string {
	if len(m) == 0 {
		return ""
	}
	return "(" + countsLine(m, "%s %d") + ")"
}

func (d *demo) printReport(r *demoReport) {
	d.step("Report")
	w := d.out
	fmt.Fprintf(w, "fleet            %d devices, time at %gx (10 simulated minutes between check-ins = %.0fs real)\n", r.Devices, r.Speed, 600/r.Speed)
	if r.BadCanary > 0 || r.BadTripped {
		fmt.Fprintf(w, "bad 1.0.1        %s after %.1fs: %s\n", map[bool]string{true: "paused by its gate", false: "NOT paused"}[r.BadTripped], r.BadTripAfter, r.BadReason)
		fmt.Fprintf(w, "                 canary cohort %d: %d offered, %d rolled back by themselves; outside the canary: %d offered\n", r.BadCanary, r.BadStarted, r.BadRolledBack, r.BadOutside)
	}
	if r.Census != nil {
		fmt.Fprintf(w, "good 1.0.2       %d of %d devices run it (%.1f%%)", r.Census["1.0.2"], r.Devices, r.Patched*100)
		if r.TimeTo94 >= 0 {
			fmt.Fprintf(w, "; 94%% reached %.0fs after its rollout started (%.0f simulated minutes)\n", r.TimeTo94, r.TimeTo94*r.Speed/60)
		} else {
			fmt.Fprintf(w, "; 94%% never reached\n")
		}
		fmt.Fprintf(w, "booted at the end %s\n", versionsLine(r.Census))
		fmt.Fprintf(w, "bricked          %d (every device powered on through the boot selector)\n", len(r.Bricked))
	}
	fc := r.Faults
	fmt.Fprintf(w, "faults injected  power cuts %d (in slot or environment writes %d; by area: %s)\n", fc.PowerCuts, fc.CutsInSlotOrEnv, countsLine(fc.CutsByArea, "%s %d"))
	fmt.Fprintf(w, "                 links dropped %d, stalled %d mid-download; %d devices offline for a while, %d on slow links, %d misbehaving\n",
		fc.Drops, fc.Stalls, fc.Offline, fc.Slow, fc.Misbehaving)
	fmt.Fprintf(w, "outcomes         committed %d, rolled back %d, failed %d (all releases)\n", r.Outcomes["committed"], r.Outcomes["rolled_back"], r.Outcomes["failed"])
	fmt.Fprintf(w, "bytes sent       %.1f MiB by the server (the updated devices needed at least %.1f MiB)\n", float64(r.BytesSent)/(1<<20), float64(r.BytesNeed)/(1<<20))
	fmt.Fprintf(w, "check-ins        %d, latency p50 %v, p99 %v; %d failed %s; %d power-ons\n", r.CheckIns, r.P50.Round(100*time.Microsecond),
		r.P99.Round(100*time.Microsecond), r.CheckInErr, kindsLine(r.Errors), r.Boots)
	fmt.Fprintf(w, "connections      one per request: %d resumed a TLS session, %d full handshakes\n", r.Resumed, r.FullTLS)
	fmt.Fprintf(w, "elapsed          %.0fs\n", r.Elapsed)
	if len(r.Timeline) > 0 {
		fmt.Fprintf(w, "\nshare of the fleet on 1.0.2, from the first rollout's start (real seconds):\n")
		fmt.Fprint(w, fleet.ASCIIChart(r.Timeline, 60, 10))
	}
	for _, f := range r.Failures {
		fmt.Fprintf(w, "FAILED: %s\n", f)
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
