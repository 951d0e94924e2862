package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/rollout"
)

// fleet is a store with n devices in group "fleet" on 1.0.0, a release
// 2.0.0 for them, a clock the test moves, and an engine on that clock.
type fleet struct {
	t      *testing.T
	s      *Store
	ctx    context.Context
	clock  time.Time
	engine *rollout.Engine
	ids    []string
	next   func() string
	health map[string]*proto.Health
}

func newFleet(t *testing.T, n int) *fleet {
	t.Helper()
	f := &fleet{t: t, ctx: context.Background(), clock: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC), next: ids(), health: map[string]*proto.Health{}}
	f.s = open(t, filepath.Join(t.TempDir(), "db"))
	f.s.now = func() time.Time { return f.clock }
	f.engine = &rollout.Engine{Backend: f.s, Now: func() time.Time { return f.clock }}
	for i := range n {
		id := fmt.Sprintf("lock-%03d", i)
		f.ids = append(f.ids, id)
		if err := f.s.AddDevice(f.ctx, id, []string{"fleet"}); err != nil {
			t.Fatal(err)
		}
		f.health[id] = &proto.Health{}
		f.checkIn(id, "1.0.0")
	}
	if err := f.s.AddRelease(f.ctx, Release{ID: "r2", Version: "2.0.0", HWClass: "lock", SecurityCounter: 2, SHA256: strings.Repeat("cd", 32), Length: 100}); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fleet) checkIn(id, version string) {
	f.t.Helper()
	h := *f.health[id]
	if err := f.s.CheckIn(f.ctx, id, proto.CheckIn{Version: version, Slot: "a", HWClass: "lock", Health: &h}); err != nil {
		f.t.Fatal(err)
	}
}

// poll is one check-in and the offer it gets, if any.
func (f *fleet) poll(id string) *Update {
	f.t.Helper()
	d, err := f.s.GetDevice(f.ctx, id)
	if err != nil {
		f.t.Fatal(err)
	}
	f.checkIn(id, d.Version)
	u, _, _, err := f.s.Offer(f.ctx, id, f.next)
	if err != nil {
		f.t.Fatal(err)
	}
	return u
}

func (f *fleet) report(id string, u *Update, status string) {
	f.t.Helper()
	if _, err := f.s.RecordReport(f.ctx, id, proto.Report{ReportID: u.ID + "-" + status, UpdateID: u.ID, Status: status, Reason: "health check failed: service down"}); err != nil {
		f.t.Fatal(err)
	}
	if status == proto.StatusCommitted {
		f.checkIn(id, "2.0.0")
	}
}

// pollAll checks every device in once; devices offered the release do what
// outcome says (committed unless it says otherwise). It returns who was
// offered.
func (f *fleet) pollAll(outcome func(id string) string) map[string]bool {
	f.t.Helper()
	offered := map[string]bool{}
	for _, id := range f.ids {
		if u := f.poll(id); u != nil {
			offered[id] = true
			if outcome != nil {
				if st := outcome(id); st != "" {
					f.report(id, u, st)
				}
			}
		}
	}
	return offered
}

func (f *fleet) tick() []rollout.Event {
	f.t.Helper()
	ev, err := f.engine.Tick(f.ctx)
	if err != nil {
		f.t.Fatal(err)
	}
	return ev
}

func (f *fleet) get(id string) *rollout.Rollout {
	f.t.Helper()
	r, err := f.s.GetRollout(f.ctx, id)
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

func (f *fleet) create(js string) *rollout.Rollout {
	f.t.Helper()
	var spec rollout.Spec
	if err := json.Unmarshal([]byte(js), &spec); err != nil {
		f.t.Fatal(err)
	}
	r, err := f.s.CreateRollout(f.ctx, spec, true)
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

func committed(string) string { return proto.StatusCommitted }

const staged = `{"id": "ro", "release": "r2", "target": {"groups": ["fleet"]}, "phases": [
	{"percent": 10, "soak": "1h", "gates": {"min_sample": 5, "max_rollback_rate": 0.2, "max_failure_rate": 0.2, "max_unhealthy_rate": 0.2, "silence": "30m"}},
	{"percent": 50, "soak": "2h", "gates": {"min_sample": 20}},
	{"percent": 100}]}`

// Phases advance only after their soak and only when the gates pass; the
// devices reached never shrink; every device ends up updated.
func TestPhasesAdvanceAfterSoakAndGates(t *testing.T) {
	f := newFleet(t, 200)
	r := f.create(staged)
	reached := map[string]bool{}
	check := func(phase int) {
		t.Helper()
		for id := range f.pollAll(committed) {
			reached[id] = true
		}
		for _, id := range f.ids {
			if r.Spec.InPhase(phase, id) != reached[id] && !reached[id] {
				t.Fatalf("phase %d: %s in the cohort and not offered", phase+1, id)
			}
			if reached[id] && !r.Spec.InPhase(phase, id) {
				t.Fatalf("phase %d: %s offered outside the cohort", phase+1, id)
			}
		}
	}
	check(0)
	canaries := len(reached)
	if canaries < 10 || canaries > 35 {
		t.Fatalf("10%% of 200 reached %d devices", canaries)
	}
	f.clock = f.clock.Add(59 * time.Minute)
	f.pollAll(nil) // healthy devices keep checking in
	if ev := f.tick(); len(ev) != 0 || f.get("ro").Phase != 0 {
		t.Fatalf("advanced before the soak ended: %+v", ev)
	}
	f.clock = f.clock.Add(time.Minute)
	f.pollAll(nil) // the canaries keep checking in: healthy
	if ev := f.tick(); len(ev) != 1 || ev[0].Kind != "advanced" || f.get("ro").Phase != 1 {
		t.Fatalf("after the soak: %+v", ev)
	}
	check(1)
	if len(reached) <= canaries {
		t.Fatal("phase 2 reached nobody new")
	}
	// Phase 2 needs 20 outcomes of its own and 2 h.
	f.clock = f.clock.Add(2 * time.Hour)
	f.pollAll(nil)
	if ev := f.tick(); len(ev) != 1 || f.get("ro").Phase != 2 {
		t.Fatalf("phase 2 -> 3: %+v", ev)
	}
	check(2)
	if len(reached) != 200 {
		t.Fatalf("the last phase reached %d of 200", len(reached))
	}
	st, err := f.s.RolloutStatus(f.ctx, "ro")
	if err != nil {
		t.Fatal(err)
	}
	if st.Totals.Committed != 200 || st.Targeted != 200 || st.Phases[0].Stats.Committed != canaries || st.Phases[2].Cohort != 200 {
		t.Fatalf("status: %+v", st)
	}
	if last := st.Series[len(st.Series)-1]; last.Committed != 200 {
		t.Fatalf("series ends at %d", last.Committed)
	}
	if kinds := fmt.Sprint(eventKinds(st.Events)); kinds != "[created started advanced advanced]" {
		t.Fatalf("events %s", kinds)
	}
}

func eventKinds(ev []RolloutEvent) []string {
	var out []string
	for _, e := range ev {
		out = append(out, e.Kind)
	}
	return out
}

// A firmware that fails its health check on some devices: the canary phase
// trips its gate, the rollout pauses on its own, and no device outside the
// canary cohort is ever offered the release, whatever the clock does.
func TestCanaryTripsGateAndPauses(t *testing.T) {
	f := newFleet(t, 200)
	r := f.create(staged)
	n := 0
	offered := f.pollAll(func(id string) string {
		n++
		if n%3 == 0 {
			return proto.StatusRolledBack
		}
		return proto.StatusCommitted
	})
	ev := f.tick()
	if len(ev) != 1 || ev[0].Kind != "paused" || !strings.Contains(ev[0].Reason, "rollback rate") {
		t.Fatalf("the canary did not trip: %+v", ev)
	}
	got := f.get("ro")
	if got.State != rollout.StatePaused || !strings.HasPrefix(got.Reason, "gate: rollback rate") {
		t.Fatalf("after the trip: %+v", got)
	}
	for range 5 {
		f.clock = f.clock.Add(3 * time.Hour)
		f.tick()
		for id := range f.pollAll(committed) {
			offered[id] = true
		}
	}
	for id := range offered {
		if !r.Spec.InPhase(0, id) {
			t.Fatalf("%s, outside the canary, was offered the release", id)
		}
	}
	if f.get("ro").Phase != 0 {
		t.Fatal("a paused rollout advanced")
	}
	st, _ := f.s.RolloutStatus(f.ctx, "ro")
	if len(st.Failures) != 1 || !strings.Contains(st.Failures[0].Reason, "rolled_back: health check failed") || st.Failures[0].Devices != st.Totals.RolledBack {
		t.Fatalf("failure reasons: %+v", st.Failures)
	}

	// Resuming acknowledges what tripped the gate: it judges only what
	// happens next, and the rollout goes on.
	if _, err := f.s.Control(f.ctx, "ro", ActionResume, ""); err != nil {
		t.Fatal(err)
	}
	if ev := f.tick(); len(ev) != 1 || ev[0].Kind != "advanced" {
		t.Fatalf("after resume: %+v", ev)
	}
	// The operator retries the devices that rolled back; they roll back
	// again: that is new, and trips the gate again (what the resume
	// acknowledged were those outcomes, not a count that hides new ones).
	var retried []string
	for id := range offered {
		if ups, _ := f.s.Updates(f.ctx, id); len(ups) > 0 && ups[0].Status == proto.StatusRolledBack {
			if err := f.s.Retry(f.ctx, id, "r2"); err != nil {
				t.Fatal(err)
			}
			retried = append(retried, id)
		}
	}
	f.clock = f.clock.Add(2 * time.Second)
	for _, id := range retried {
		u := f.poll(id)
		if u == nil {
			t.Fatalf("%s was not offered the release again after a retry", id)
		}
		f.report(id, u, proto.StatusRolledBack)
	}
	// Phase 2's new devices: two of about eighty roll back, below the
	// gate's 5% alone; with the retried devices' new rollbacks, above it.
	bad := 0
	f.pollAll(func(string) string {
		if bad < 2 {
			bad++
			return proto.StatusRolledBack
		}
		return proto.StatusCommitted
	})
	if ev := f.tick(); len(ev) != 1 || ev[0].Kind != "paused" || !strings.Contains(ev[0].Reason, "rollback rate") {
		t.Fatalf("the same devices rolling back again after the resume: %+v", ev)
	}
}

// A firmware that commits cleanly and then stops checking in on some
// devices (the leak): the soak gate trips before the next phase starts.
func TestSoakGateCatchesSilentDevices(t *testing.T) {
	f := newFleet(t, 200)
	f.create(staged)
	offered := f.pollAll(committed)
	var silent []string
	for id := range offered {
		if len(silent) < (len(offered)*3+9)/10 { // 30%, above the gate's 20%
			silent = append(silent, id)
		}
	}
	quiet := map[string]bool{}
	for _, id := range silent {
		quiet[id] = true
	}
	// 45 minutes in, the leaky devices have been silent for 45 minutes
	// (silence: 30m); the others still check in.
	f.clock = f.clock.Add(45 * time.Minute)
	for _, id := range f.ids {
		if !quiet[id] {
			f.poll(id)
		}
	}
	ev := f.tick()
	if len(ev) != 1 || ev[0].Kind != "paused" || !strings.Contains(ev[0].Reason, "soak") || !strings.Contains(ev[0].Reason, fmt.Sprintf("%d silent", len(silent))) {
		t.Fatalf("the soak gate did not trip: %+v", ev)
	}
	if f.get("ro").Phase != 0 {
		t.Fatal("the next phase started")
	}
}

// Watchdog resets above a device's old rate make it unhealthy; at its old
// rate it is fine.
func TestSoakGateCatchesMoreResets(t *testing.T) {
	f := newFleet(t, 100)
	// On 1.0.0 every device has reset once in 10 hours.
	f.clock = f.clock.Add(10 * time.Hour)
	for _, id := range f.ids {
		f.health[id].WatchdogResets = 1
		f.checkIn(id, "1.0.0")
	}
	f.create(staged)
	offered := f.pollAll(committed)
	// Ten hours on 2.0.0: one more reset is the old rate; three is not.
	f.clock = f.clock.Add(50 * time.Minute)
	bad := 0
	for id := range offered {
		f.health[id].WatchdogResets += 1
		if bad < len(offered)/2 {
			f.health[id].WatchdogResets += 3
			bad++
		}
	}
	for _, id := range f.ids {
		f.poll(id)
	}
	ev := f.tick()
	if len(ev) != 1 || !strings.Contains(ev[0].Reason, fmt.Sprintf("%d with more resets", bad)) {
		t.Fatalf("resets: %+v", ev)
	}
}

// Rate limits hold: starts per minute and concurrent downloads, measured
// on the clock.
func TestRateLimits(t *testing.T) {
	f := newFleet(t, 60)
	f.create(`{"id": "ro", "release": "r2", "target": {"all": true}, "limits": {"starts_per_minute": 7}}`)
	perMinute := []int{}
	for len(perMinute) < 20 {
		n := len(f.pollAll(committed))
		perMinute = append(perMinute, n)
		if n == 0 {
			break
		}
		f.clock = f.clock.Add(time.Minute)
	}
	total := 0
	for _, n := range perMinute {
		if n > 7 {
			t.Fatalf("%d devices started in one minute (limit 7): %v", n, perMinute)
		}
		total += n
	}
	if total != 60 || perMinute[0] != 7 {
		t.Fatalf("starts per minute %v: total %d", perMinute, total)
	}
	t.Logf("starts per minute, limit 7: %v", perMinute)

	g := newFleet(t, 30)
	g.create(`{"id": "ro", "release": "r2", "target": {"all": true}, "limits": {"max_downloads": 4}}`)
	inFlight := map[string]*Update{}
	peak, done := 0, 0
	for round := 0; round < 50 && done < 30; round++ {
		for _, id := range g.ids {
			if u := g.poll(id); u != nil && inFlight[id] == nil {
				inFlight[id] = u
			}
		}
		peak = max(peak, len(inFlight))
		if len(inFlight) > 4 {
			t.Fatalf("%d downloads at once (limit 4)", len(inFlight))
		}
		for id, u := range inFlight { // each round, the downloads in flight finish
			g.report(id, u, proto.StatusCommitted)
			delete(inFlight, id)
			done++
		}
	}
	if done != 30 || peak != 4 {
		t.Fatalf("downloads: %d done, peak %d", done, peak)
	}
}

// Maintenance windows are honoured in each device's own time zone.
func TestMaintenanceWindowsPerDeviceZone(t *testing.T) {
	f := newFleet(t, 4)
	zones := map[string]string{"lock-000": "Europe/Berlin", "lock-001": "America/New_York", "lock-002": "Asia/Tokyo", "lock-003": ""}
	for id, z := range zones {
		if err := f.s.CheckIn(f.ctx, id, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock", TimeZone: z}); err != nil {
			t.Fatal(err)
		}
	}
	f.create(`{"id": "ro", "release": "r2", "target": {"all": true}, "schedule": {"windows": [{"start": "02:00", "end": "04:00"}], "default_zone": "UTC"}}`)
	started := map[string]time.Time{}
	start := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	for m := 0; m < 24*60; m += 15 {
		f.clock = start.Add(time.Duration(m) * time.Minute)
		for id, z := range zones {
			if _, ok := started[id]; ok {
				continue
			}
			if err := f.s.CheckIn(f.ctx, id, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock", TimeZone: z}); err != nil {
				t.Fatal(err)
			}
			if u, _, _, err := f.s.Offer(f.ctx, id, f.next); err != nil {
				t.Fatal(err)
			} else if u != nil {
				started[id] = f.clock
			}
		}
	}
	for id, z := range zones {
		at, ok := started[id]
		if !ok {
			t.Fatalf("%s (%q) never started", id, z)
		}
		loc := time.UTC
		if z != "" {
			loc, _ = time.LoadLocation(z)
		}
		if h := at.In(loc).Hour(); h < 2 || h >= 4 {
			t.Errorf("%s started at %v local (%s): outside 02:00-04:00", id, at.In(loc), z)
		}
	}
}

// Abort mid-phase: nobody new starts; a device mid-update is not offered
// it again and its outcome is still stored. Pause and resume; a device
// joining the target mid-rollout is picked up; the newer of two rollouts
// wins.
func TestAbortPauseJoinAndNewerWins(t *testing.T) {
	f := newFleet(t, 40)
	f.create(`{"id": "ro", "release": "r2", "target": {"groups": ["fleet"]}, "phases": [{"percent": 50}, {"percent": 100}]}`)
	var mid string
	var midU *Update
	for _, id := range f.ids {
		if u := f.poll(id); u != nil && mid == "" {
			mid, midU = id, u
		}
	}
	if mid == "" {
		t.Fatal("nobody started")
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionPause, "investigating"); err != nil {
		t.Fatal(err)
	}
	if u := f.poll(mid); u == nil || u.ID != midU.ID {
		t.Fatal("a device mid-update is not offered its update again while paused")
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionPause, ""); !errors.Is(err, ErrState) {
		t.Fatalf("pausing twice: %v", err)
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionResume, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionPromote, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionPromote, ""); !errors.Is(err, ErrState) {
		t.Fatalf("promoting past the last phase: %v", err)
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionAbort, "bad build"); err != nil {
		t.Fatal(err)
	}
	if got := f.pollAll(nil); len(got) != 0 {
		t.Fatalf("offered after the abort: %v", got)
	}
	// A new rollout of the same release: the device mid-update under the
	// aborted one is not offered anything (its attempt is that rollout's).
	f.clock = f.clock.Add(time.Second)
	f.create(`{"id": "again", "release": "r2", "target": {"groups": ["fleet"]}}`)
	if u := f.poll(mid); u != nil {
		t.Fatalf("mid-update under the aborted rollout, offered %+v", u)
	}
	f.report(mid, midU, proto.StatusCommitted) // it finished by its own rules
	if ups, _ := f.s.Updates(f.ctx, mid); ups[0].Status != proto.StatusCommitted {
		t.Fatalf("the outcome after the abort: %+v", ups)
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionResume, ""); !errors.Is(err, ErrState) {
		t.Fatalf("resuming an aborted rollout: %v", err)
	}

	// A device that joins the target mid-rollout is picked up.
	if err := f.s.AddRelease(f.ctx, Release{ID: "r3", Version: "3.0.0", HWClass: "lock", SecurityCounter: 3, SHA256: strings.Repeat("ef", 32), Length: 100}); err != nil {
		t.Fatal(err)
	}
	f.create(`{"id": "beta", "release": "r3", "target": {"tags": ["beta"]}}`)
	if u := f.poll("lock-039"); u != nil {
		t.Fatal("offered before joining the target")
	}
	if err := f.s.EditDevice(f.ctx, "lock-039", DeviceEdit{AddTags: []string{"beta"}}); err != nil {
		t.Fatal(err)
	}
	if u := f.poll("lock-039"); u == nil || u.ReleaseID != "r3" {
		t.Fatalf("a device joining the target: %+v", u)
	}
	// Two rollouts aim at lock-038: the newer wins, the older does not
	// apply to it while the newer lasts.
	// In the same second, by name the older would sort last: creation
	// order decides.
	f.create(`{"id": "zz-old", "release": "r2", "target": {"devices": ["lock-038"]}}`)
	f.create(`{"id": "aa-new", "release": "r3", "target": {"devices": ["lock-038"]}, "phases": [{"percent": 100}]}`)
	if u := f.poll("lock-038"); u == nil || u.RolloutID != "aa-new" {
		t.Fatalf("the newer rollout did not win: %+v", u)
	}
}

// The engine's state is the database: a server that dies mid-phase (the
// store dropped without closing) and starts again neither starts a device
// twice nor loses one, and goes on judging.
func TestEngineSurvivesRestart(t *testing.T) {
	f := newFleet(t, 100)
	path := filepath.Join(t.TempDir(), "restart.db")
	s1 := open(t, path)
	s1.now = f.s.now
	for _, id := range f.ids {
		s1.AddDevice(f.ctx, id, []string{"fleet"})
		s1.CheckIn(f.ctx, id, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"})
	}
	s1.AddRelease(f.ctx, Release{ID: "r2", Version: "2.0.0", HWClass: "lock", SecurityCounter: 2, SHA256: strings.Repeat("cd", 32), Length: 100})
	f.s = s1
	f.engine.Backend = s1
	f.create(staged)
	first := map[string]string{}
	for _, id := range f.ids {
		if u := f.poll(id); u != nil {
			first[id] = u.ID
		}
	}
	// The server dies: a second store on the same file takes over (what was
	// committed is all there is).
	s2 := open(t, path)
	s2.now = f.s.now
	f.s, f.engine.Backend = s2, s2
	for _, id := range f.ids {
		u := f.poll(id)
		switch {
		case first[id] != "" && (u == nil || u.ID != first[id]):
			t.Fatalf("%s: update %s became %+v after the restart", id, first[id], u)
		case first[id] == "" && u != nil:
			t.Fatalf("%s started after the restart, outside the cohort", id)
		case u != nil:
			f.report(id, u, proto.StatusCommitted)
		}
	}
	f.clock = f.clock.Add(time.Hour)
	f.pollAll(nil)
	if ev := f.tick(); len(ev) != 1 || ev[0].Kind != "advanced" {
		t.Fatalf("after the restart the engine did not go on: %+v", ev)
	}
	var n int
	s2.db.QueryRow(`SELECT count(*) FROM updates`).Scan(&n)
	if n != len(first) {
		t.Fatalf("%d update rows for %d devices started", n, len(first))
	}
}

// An assignment stored before rollouts had phases becomes a one-phase
// rollout, with its updates.
func TestMigrationKeepsAssignments(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "old.db")
	s0 := openAt(t, p, 4) // before the migration that made rollouts phased
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := s0.db.Exec(q, args...); err != nil {
			t.Fatal(err)
		}
	}
	exec(`INSERT INTO devices (id, created_at, hw_class, version) VALUES ('lock-1', 1, 'lock', '1.0.0')`)
	exec(`INSERT INTO releases (id, version, hw_class, security_counter, sha256, length, created_at) VALUES ('r2', '2.0.0', 'lock', 2, ?, 10, 1)`, strings.Repeat("ab", 32))
	exec(`INSERT INTO rollouts (id, release_id, target_kind, target, downgrade, created_at) VALUES ('a1', 'r2', 'device', 'lock-1', 1, 5)`)
	exec(`INSERT INTO rollout_phases (rollout_id, idx, percent) VALUES ('a1', 0, 100)`)
	exec(`INSERT INTO updates (id, device_id, rollout_id, release_id, status, created_at, updated_at) VALUES ('u1', 'lock-1', 'a1', 'r2', 'downloading', 6, 6)`)
	s0.Close()
	s2 := open(t, p)
	r, err := s2.GetRollout(ctx, "a1")
	if err != nil {
		t.Fatal(err)
	}
	if r.State != rollout.StateActive || len(r.Spec.Target.Devices) != 1 || r.Spec.Target.Devices[0] != "lock-1" || !r.Spec.Downgrade ||
		len(r.Spec.Phases) != 1 || *r.Spec.Phases[0].Gates.MaxRollbackRate != 1 {
		t.Fatalf("migrated rollout: %+v", r)
	}
	u, _, down, err := s2.Offer(ctx, "lock-1", ids())
	if err != nil || u == nil || u.ID != "u1" || !down {
		t.Fatalf("the migrated update is not offered again: %+v %v", u, err)
	}
}

// openAt opens a database migrated only up to schema version n.
func openAt(t *testing.T, path string, n int) *Store {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=foreign_keys(1)")
	if err != nil {
		t.Fatal(err)
	}
	s := &Store{db: db}
	if err := s.migrateTo(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	return s
}

// With on_trip abort, a tripped gate aborts: nobody new starts, ever, and
// an operator cannot resume it.
func TestTripAborts(t *testing.T) {
	f := newFleet(t, 100)
	f.create(`{"id": "ro", "release": "r2", "target": {"all": true}, "on_trip": "abort",
		"phases": [{"percent": 20, "gates": {"min_sample": 1, "max_failure_rate": 0}}, {"percent": 100}]}`)
	first := true
	offered := f.pollAll(func(string) string {
		if first {
			first = false
			return proto.StatusFailed
		}
		return proto.StatusCommitted
	})
	if ev := f.tick(); len(ev) != 1 || ev[0].Kind != "aborted" || !strings.Contains(ev[0].Reason, "failure rate") {
		t.Fatalf("trip: %+v", ev)
	}
	if r := f.get("ro"); r.State != rollout.StateAborted {
		t.Fatalf("state %s", r.State)
	}
	f.clock = f.clock.Add(24 * time.Hour)
	f.tick()
	if again := f.pollAll(committed); len(again) != 0 {
		t.Fatalf("offered after the abort: %d devices (first wave %d)", len(again), len(offered))
	}
	if _, err := f.s.Control(f.ctx, "ro", ActionResume, ""); !errors.Is(err, ErrState) {
		t.Fatalf("resuming an aborted rollout: %v", err)
	}
}

// A device never falls back to an older rollout's older release after it
// updated past it; an attempt in progress is offered again even when a
// newer rollout that offers nothing yet aims at the device; the hardware
// class a device first reported stays.
func TestOfferNeverGoesBackAndResumesAttempts(t *testing.T) {
	f := newFleet(t, 2)
	if err := f.s.AddRelease(f.ctx, Release{ID: "r3", Version: "3.0.0", HWClass: "lock", SecurityCounter: 2, SHA256: strings.Repeat("ef", 32), Length: 100}); err != nil {
		t.Fatal(err)
	}
	if err := f.s.AddRelease(f.ctx, Release{ID: "r4", Version: "4.0.0", HWClass: "lock", SecurityCounter: 4, SHA256: strings.Repeat("12", 32), Length: 100}); err != nil {
		t.Fatal(err)
	}
	f.create(`{"id": "to-2", "release": "r2", "target": {"all": true}}`)
	f.clock = f.clock.Add(time.Second)
	f.create(`{"id": "from-1-to-3", "release": "r3", "target": {"versions": ["1.0.0"]}}`)
	u := f.poll("lock-000")
	if u == nil || u.ReleaseID != "r3" {
		t.Fatalf("first offer: %+v", u)
	}
	f.report("lock-000", u, proto.StatusCommitted)
	f.checkIn("lock-000", "3.0.0")
	if u := f.poll("lock-000"); u != nil {
		t.Fatalf("on 3.0.0, offered %s from an older rollout", u.ReleaseID)
	}

	// lock-001 starts 3.0.0; then a newer rollout that starts later aims
	// at it: its attempt in progress is still offered.
	u1 := f.poll("lock-001")
	if u1 == nil || u1.ReleaseID != "r3" {
		t.Fatalf("lock-001: %+v", u1)
	}
	f.clock = f.clock.Add(time.Second)
	f.create(fmt.Sprintf(`{"id": "later", "release": "r4", "target": {"devices": ["lock-001"]}, "schedule": {"start": %q}}`, f.clock.Add(24*time.Hour).Format(time.RFC3339)))
	if again := f.poll("lock-001"); again == nil || again.ID != u1.ID {
		t.Fatalf("the attempt in progress was not offered again: %+v", again)
	}

	if err := f.s.CheckIn(f.ctx, "lock-000", proto.CheckIn{Version: "3.0.0", Slot: "a", HWClass: "gate"}); err != nil {
		t.Fatal(err)
	}
	if d, _ := f.s.GetDevice(f.ctx, "lock-000"); d.HWClass != "lock" {
		t.Fatalf("hardware class changed to %s", d.HWClass)
	}
}

// Health baselines: resets counted on the new version stay counted when
// the device's counter store is wiped; a version that starts without
// counters takes its baseline from the first check-in that has them (the
// update's own reboots are not charged to it).
func TestHealthBaselines(t *testing.T) {
	f := newFleet(t, 2)
	f.create(`{"id": "ro", "release": "r2", "target": {"all": true}, "phases": [{"percent": 100, "gates": {"min_sample": 1}}]}`)
	gates := f.get("ro").Spec.Phases[0].Gates
	health := func() rollout.Health {
		t.Helper()
		h, err := f.s.Health(f.ctx, "ro", f.clock, gates)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	a, b := f.ids[0], f.ids[1]
	ua := f.poll(a)
	f.report(a, ua, proto.StatusCommitted) // on 2.0.0, counters 0
	f.clock = f.clock.Add(time.Minute)
	f.health[a].WatchdogResets = 3
	f.checkIn(a, "2.0.0")
	if h := health(); h.Misbehaving != 1 {
		t.Fatalf("three resets on the new version: %+v", h)
	}
	f.health[a].WatchdogResets = 0 // its counter store was wiped
	f.checkIn(a, "2.0.0")
	if h := health(); h.Misbehaving != 1 {
		t.Fatalf("the resets were forgotten when the counters went down: %+v", h)
	}

	// b: the update's reboots happen before it reports counters again.
	ub := f.poll(b)
	if _, err := f.s.RecordReport(f.ctx, b, proto.Report{ReportID: "b-done", UpdateID: ub.ID, Status: proto.StatusCommitted}); err != nil {
		t.Fatal(err)
	}
	if err := f.s.CheckIn(f.ctx, b, proto.CheckIn{Version: "2.0.0", Slot: "b", HWClass: "lock"}); err != nil { // no counters
		t.Fatal(err)
	}
	f.health[b].WatchdogResets = 4 // the update's reboots, counted by the device
	f.checkIn(b, "2.0.0")
	if h := health(); h.Misbehaving != 1 || h.Committed != 2 {
		t.Fatalf("the update's own reboots were charged to the new version: %+v", h)
	}
}

// A version that ran only briefly (a trial that rolled back after resets)
// does not become the device's "old rate": a retry of it is judged against
// the rate of the version the device really ran.
func TestBriefVersionKeepsTheOldRate(t *testing.T) {
	f := newFleet(t, 1)
	id := f.ids[0]
	f.clock = f.clock.Add(10 * time.Hour)
	f.health[id].WatchdogResets = 1 // one reset in 10 hours on 1.0.0
	f.checkIn(id, "1.0.0")
	f.create(`{"id": "ro", "release": "r2", "target": {"all": true}, "phases": [{"percent": 100, "gates": {"min_sample": 1}}]}`)
	gates := f.get("ro").Spec.Phases[0].Gates
	// 2.0.0 on trial: five resets in ten minutes, then back to 1.0.0.
	u := f.poll(id)
	f.checkIn(id, "2.0.0")
	f.clock = f.clock.Add(10 * time.Minute)
	f.health[id].WatchdogResets = 6
	f.checkIn(id, "2.0.0")
	f.report(id, u, proto.StatusRolledBack)
	f.checkIn(id, "1.0.0")
	f.clock = f.clock.Add(time.Minute)
	f.health[id].WatchdogResets = 7 // the reboot back, a minute on 1.0.0
	f.checkIn(id, "1.0.0")
	// Retried: committed; two resets in the next hour.
	if err := f.s.Retry(f.ctx, id, "r2"); err != nil {
		t.Fatal(err)
	}
	f.clock = f.clock.Add(time.Minute)
	u2 := f.poll(id)
	if u2 == nil {
		t.Fatal("not offered again after the retry")
	}
	f.report(id, u2, proto.StatusCommitted)
	f.clock = f.clock.Add(time.Hour)
	f.health[id].WatchdogResets = 9
	f.checkIn(id, "2.0.0")
	h, err := f.s.Health(f.ctx, "ro", f.clock, gates)
	if err != nil {
		t.Fatal(err)
	}
	if h.Misbehaving != 1 {
		t.Fatalf("two resets in an hour, against one in ten hours before: %+v", h)
	}
}

// Starts that arrive together are committed together, and the rollout's
// limits still hold across the group: 300 devices ask at once under a
// limit of 40 downloads, with a slow disk (each commit waits 20 ms).
// Exactly 40 start, each once, in far fewer transactions than starts; a
// device asking twice at once starts once.
func TestConcurrentStartsAreGroupCommitted(t *testing.T) {
	f := newFleet(t, 300)
	f.create(`{"id": "ro", "release": "r2", "target": {"all": true}, "limits": {"max_downloads": 40}}`)
	var commits atomic.Int64
	f.s.BeforeCommit = func() error {
		commits.Add(1)
		time.Sleep(20 * time.Millisecond)
		return nil
	}
	var n atomic.Int64
	next := func() string { return fmt.Sprintf("c%d", n.Add(1)) }
	var mu sync.Mutex
	started := map[string]map[string]bool{} // device -> the update IDs it was offered
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(f.ids))
	for _, id := range f.ids {
		asks := 1
		if id == "lock-007" {
			asks = 2 // one device asks twice at once
		}
		for range asks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				u, _, _, err := f.s.Offer(f.ctx, id, next)
				if err != nil {
					errs <- err
					return
				}
				if u != nil {
					mu.Lock()
					if started[id] == nil {
						started[id] = map[string]bool{}
					}
					started[id][u.ID] = true
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for id, us := range started {
		if len(us) != 1 {
			t.Errorf("%s started %d times: %v", id, len(us), us)
		}
	}
	var rows int
	if err := f.s.db.QueryRow(`SELECT count(*) FROM updates WHERE rollout_id = 'ro'`).Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if len(started) != 40 || rows != 40 {
		t.Fatalf("%d devices started, %d updates stored; the limit is 40", len(started), rows)
	}
	if c := commits.Load(); c > 30 {
		t.Fatalf("%d transactions for %d offers asked at once: starts are not grouped", c, len(f.ids)+1)
	}
	t.Logf("301 asks, 40 starts, %d transactions", commits.Load())
}
