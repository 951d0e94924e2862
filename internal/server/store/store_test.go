package store

import (
	"context"
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

func open(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func ids() func() string {
	n := 0
	return func() string { n++; return fmt.Sprintf("u%d", n) }
}

func setup(t *testing.T) (*Store, context.Context, string) {
	t.Helper()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fieldpatch.db")
	s := open(t, path)
	for _, d := range []struct {
		id     string
		groups []string
	}{{"lock-1", []string{"lab"}}, {"lock-2", []string{"lab"}}, {"lock-3", nil}, {"thermo-1", []string{"lab"}}} {
		if err := s.AddDevice(ctx, d.id, d.groups); err != nil {
			t.Fatal(err)
		}
		hw := "smartlock-v2"
		if strings.HasPrefix(d.id, "thermo") {
			hw = "thermostat"
		}
		if err := s.CheckIn(ctx, d.id, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: hw}); err != nil {
			t.Fatal(err)
		}
	}
	sum := strings.Repeat("ab", 32)
	if err := s.AddRelease(ctx, Release{ID: "lock-2.0.0", Version: "2.0.0", HWClass: "smartlock-v2", SecurityCounter: 2, SHA256: sum, Length: 1000}); err != nil {
		t.Fatal(err)
	}
	return s, ctx, path
}

func TestOfferLifecycle(t *testing.T) {
	s, ctx, _ := setup(t)
	next := ids()
	if u, _, _, err := s.Offer(ctx, "lock-1", next); err != nil || u != nil {
		t.Fatalf("offer before any assignment: %+v %v", u, err)
	}
	if err := s.Assign(ctx, "r1", "lock-2.0.0", "group", "lab", false); err != nil {
		t.Fatal(err)
	}
	u, rel, _, err := s.Offer(ctx, "lock-1", next)
	if err != nil || u == nil || rel.Version != "2.0.0" || u.Status != StatusOffered {
		t.Fatalf("offer: %+v %+v %v", u, rel, err)
	}
	// Offered again while in progress: the same update.
	if u2, _, _, _ := s.Offer(ctx, "lock-1", next); u2 == nil || u2.ID != u.ID {
		t.Fatalf("second offer %+v, want update %s", u2, u.ID)
	}
	// Not for other hardware in the group, nor for devices outside it.
	if u3, _, _, _ := s.Offer(ctx, "thermo-1", next); u3 != nil {
		t.Errorf("a thermostat was offered a lock release")
	}
	if u3, _, _, _ := s.Offer(ctx, "lock-3", next); u3 != nil {
		t.Errorf("a device outside the group was offered it")
	}
	// Reports: idempotent, applied to the update.
	rep := proto.Report{ReportID: "rep-1", UpdateID: u.ID, Status: proto.StatusDownloading, Progress: 0.5}
	if stored, err := s.RecordReport(ctx, "lock-1", rep); err != nil || !stored {
		t.Fatalf("report: %v %v", stored, err)
	}
	if stored, err := s.RecordReport(ctx, "lock-1", rep); err != nil || stored {
		t.Fatalf("the same report again: stored %v %v", stored, err)
	}
	// A device cannot report on another's update.
	if _, err := s.RecordReport(ctx, "lock-2", proto.Report{ReportID: "x", UpdateID: u.ID, Status: proto.StatusCommitted}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lock-2 reporting on lock-1's update: %v", err)
	}
	if _, err := s.RecordReport(ctx, "lock-1", proto.Report{ReportID: "rep-2", UpdateID: u.ID, Status: proto.StatusRolledBack, Reason: "health-check failed"}); err != nil {
		t.Fatal(err)
	}
	// Rolled back: not offered again...
	if u4, _, _, _ := s.Offer(ctx, "lock-1", next); u4 != nil {
		t.Fatalf("a rolled-back release was offered again: %+v", u4)
	}
	ups, _ := s.Updates(ctx, "lock-1")
	if len(ups) != 1 || ups[0].Status != proto.StatusRolledBack || ups[0].Reason != "health-check failed" {
		t.Fatalf("updates %+v", ups)
	}
	// ... until an operator retries it.
	if err := s.Retry(ctx, "lock-1", "lock-2.0.0"); err != nil {
		t.Fatal(err)
	}
	if u5, _, _, _ := s.Offer(ctx, "lock-1", next); u5 == nil || u5.ID == u.ID {
		t.Fatalf("after retry: %+v", u5)
	}
	// A final status is never overwritten by a late progress report.
	u6, _, _, _ := s.Offer(ctx, "lock-2", next)
	s.RecordReport(ctx, "lock-2", proto.Report{ReportID: "a", UpdateID: u6.ID, Status: proto.StatusCommitted})
	s.RecordReport(ctx, "lock-2", proto.Report{ReportID: "b", UpdateID: u6.ID, Status: proto.StatusDownloading})
	if ups, _ := s.Updates(ctx, "lock-2"); ups[0].Status != proto.StatusCommitted {
		t.Fatalf("status %s after a late report", ups[0].Status)
	}
}

// A commit failure: nothing is stored, the caller gets the error (and so
// does not acknowledge), and the same report stores on retry.
func TestReportCommitFailure(t *testing.T) {
	s, ctx, _ := setup(t)
	s.Assign(ctx, "r1", "lock-2.0.0", "device", "lock-1", false)
	u, _, _, _ := s.Offer(ctx, "lock-1", ids())
	s.BeforeCommit = func() error { return errors.New("disk full") }
	rep := proto.Report{ReportID: "rep-1", UpdateID: u.ID, Status: proto.StatusCommitted}
	if _, err := s.RecordReport(ctx, "lock-1", rep); err == nil {
		t.Fatal("no error from a failed commit")
	}
	s.BeforeCommit = nil
	if ups, _ := s.Updates(ctx, "lock-1"); ups[0].Status != StatusOffered {
		t.Fatalf("a failed commit changed the update: %s", ups[0].Status)
	}
	if stored, err := s.RecordReport(ctx, "lock-1", rep); err != nil || !stored {
		t.Fatalf("retry after the failure: %v %v", stored, err)
	}
}

// What a transaction stored survives closing and reopening; migrations run
// once; a database from a newer server is refused.
func TestDurabilityAndMigrations(t *testing.T) {
	s, ctx, path := setup(t)
	s.Assign(ctx, "r1", "lock-2.0.0", "device", "lock-1", false)
	u, _, _, _ := s.Offer(ctx, "lock-1", ids())
	s.Close()
	s2 := open(t, path)
	if v, err := s2.SchemaVersion(ctx); err != nil || v != len(migrations) {
		t.Fatalf("schema version %d %v", v, err)
	}
	ups, err := s2.Updates(ctx, "lock-1")
	if err != nil || len(ups) != 1 || ups[0].ID != u.ID {
		t.Fatalf("after reopening: %+v %v", ups, err)
	}
	d, err := s2.GetDevice(ctx, "lock-1")
	if err != nil || d.Version != "1.0.0" || len(d.Groups) != 1 || d.Groups[0] != "lab" {
		t.Fatalf("device %+v %v", d, err)
	}
	s2.db.ExecContext(ctx, `UPDATE schema_version SET version = 99`)
	s2.Close()
	if _, err := Open(ctx, path); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("opening a newer schema: %v", err)
	}
}

func TestBadInputChangesNothing(t *testing.T) {
	s, ctx, _ := setup(t)
	if err := s.AddDevice(ctx, "../evil", nil); err == nil {
		t.Error("a path-like device id was accepted")
	}
	if err := s.CheckIn(ctx, "ghost", proto.CheckIn{Version: "1", Slot: "a", HWClass: "x"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("check-in of an unknown device: %v", err)
	}
	if err := s.Assign(ctx, "r9", "no-such-release", "device", "lock-1", false); !errors.Is(err, ErrNotFound) {
		t.Errorf("assigning an unknown release: %v", err)
	}
	if err := s.AddRelease(ctx, Release{ID: "x", SHA256: "not-a-hash"}); err == nil {
		t.Error("a bad SHA-256 was accepted")
	}
	devs, _ := s.ListDevices(ctx, DeviceFilter{})
	if len(devs) != 4 {
		t.Errorf("%d devices after bad input, want 4", len(devs))
	}
}

// Check-ins are committed in groups; each caller still gets its own answer
// (an unknown device its ErrNotFound, without failing the others in its
// group), and every known device's check-in is stored.
func TestConcurrentCheckInsGrouped(t *testing.T) {
	ctx := context.Background()
	s := open(t, filepath.Join(t.TempDir(), "db"))
	for i := range 40 {
		if err := s.AddDevice(ctx, fmt.Sprintf("d%02d", i), nil); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 400)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("d%02d", i%50) // d40..d49 do not exist
			errs[i] = s.CheckIn(ctx, id, proto.CheckIn{Version: fmt.Sprintf("1.0.%d", i%50), Slot: "a", HWClass: "lock"})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		known := i%50 < 40
		if known && err != nil || !known && !errors.Is(err, ErrNotFound) {
			t.Errorf("check-in %d (device d%02d): %v", i, i%50, err)
		}
	}
	for i := range 40 {
		d, err := s.GetDevice(ctx, fmt.Sprintf("d%02d", i))
		if err != nil || d.Version != fmt.Sprintf("1.0.%d", i) || d.LastSeen.IsZero() {
			t.Errorf("d%02d: %+v %v", i, d, err)
		}
	}
	s.Close()
	if err := s.CheckIn(ctx, "d00", proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err == nil {
		t.Error("a check-in on a closed store succeeded")
	}
}

// The device-state cache never hides a change: a device seen with nothing
// to install is offered a release at its next check-in once a rollout
// reaches it (directly, or by joining a group later), and is refused once
// revoked.
func TestDeviceStateCacheFollowsChanges(t *testing.T) {
	ctx := context.Background()
	s := open(t, filepath.Join(t.TempDir(), "db"))
	for _, id := range []string{"a", "b"} {
		if err := s.AddDevice(ctx, id, nil); err != nil {
			t.Fatal(err)
		}
		if err := s.CheckIn(ctx, id, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err != nil {
			t.Fatal(err)
		}
	}
	sum := strings.Repeat("ab", 32)
	if err := s.AddRelease(ctx, Release{ID: "r2", Version: "2.0.0", HWClass: "lock", SecurityCounter: 1, SHA256: sum, Length: 10}); err != nil {
		t.Fatal(err)
	}
	next := ids()
	offer := func(id string) bool {
		t.Helper()
		if err := s.Active(ctx, id); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		up, _, _, err := s.Offer(ctx, id, next)
		if err != nil {
			t.Fatal(err)
		}
		return up != nil
	}
	if offer("a") || offer("b") {
		t.Fatal("offered before any rollout")
	}
	if err := s.Assign(ctx, "to-a", "r2", "device", "a", false); err != nil {
		t.Fatal(err)
	}
	if !offer("a") || offer("b") {
		t.Fatal("after assigning to a")
	}
	// The device path (offers, reports) keeps every device's cached state:
	// a device inside a rollout must not send the rest to the database.
	gen := s.gen.Load()
	up, _, _, err := s.Offer(ctx, "a", next)
	if err != nil || up == nil {
		t.Fatalf("second offer to a: %v, %v", up, err)
	}
	if _, err := s.RecordReport(ctx, "a", proto.Report{ReportID: "rep-1", UpdateID: up.ID, Status: proto.StatusDownloading}); err != nil {
		t.Fatal(err)
	}
	if g := s.gen.Load(); g != gen {
		t.Fatalf("an offer and a report invalidated the device-state cache (generation %d -> %d)", gen, g)
	}
	if err := s.Assign(ctx, "to-lab", "r2", "group", "lab", false); err != nil {
		t.Fatal(err)
	}
	if offer("b") {
		t.Fatal("b is not in lab yet")
	}
	if err := s.EditDevice(ctx, "b", DeviceEdit{AddGroups: []string{"lab"}}); err != nil {
		t.Fatal(err)
	}
	if !offer("b") {
		t.Fatal("b joined lab and was not offered the release")
	}
	if err := s.Revoke(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Active(ctx, "b"); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked b: %v", err)
	}
	if err := s.Active(ctx, "nobody"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
}

// With a last-seen resolution, a check-in that repeats the last one within
// it is not written; a changed one is written at once, and a repeat after
// the resolution refreshes last_seen.
func TestLastSeenResolution(t *testing.T) {
	ctx := context.Background()
	s := open(t, filepath.Join(t.TempDir(), "db"))
	clock := time.Unix(1_800_000_000, 0)
	s.now = func() time.Time { return clock }
	s.LastSeenResolution = time.Minute
	if err := s.AddDevice(ctx, "d", nil); err != nil {
		t.Fatal(err)
	}
	c := proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}
	seen := func() (time.Time, string) {
		d, err := s.GetDevice(ctx, "d")
		if err != nil {
			t.Fatal(err)
		}
		return d.LastSeen, d.Version
	}
	step := func(d time.Duration, c proto.CheckIn, wantSeen time.Time, wantVersion string) {
		t.Helper()
		clock = clock.Add(d)
		if err := s.CheckIn(ctx, "d", c); err != nil {
			t.Fatal(err)
		}
		if got, v := seen(); !got.Equal(wantSeen) || v != wantVersion {
			t.Fatalf("at %v: last seen %v version %s, want %v %s", clock, got, v, wantSeen, wantVersion)
		}
	}
	t0 := clock
	step(0, c, t0, "1.0.0")
	step(30*time.Second, c, t0, "1.0.0") // a repeat within the resolution: not written
	c2 := c
	c2.Version = "2.0.0"
	step(time.Second, c2, t0.Add(31*time.Second), "2.0.0")    // changed: written at once
	step(61*time.Second, c2, t0.Add(92*time.Second), "2.0.0") // a repeat after it: written
	if err := s.CheckIn(ctx, "nobody", c); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
}

// The device-state cache never keeps a copy older than a change made while
// it was read: a check-in, or an update started (forget), that commits
// between a load and its caching leaves that load uncached, and the next
// request sees the change. A rollout's creation and start do not
// invalidate the devices' cached state, yet the new rollout is offered at
// once.
func TestDeviceCacheKeepsNoOlderCopy(t *testing.T) {
	s, ctx, _ := setup(t)
	version := func() string {
		st, err := s.deviceState(ctx, "lock-1")
		if err != nil {
			t.Fatal(err)
		}
		return st.version
	}
	s.forget("lock-1")
	var once sync.Once
	s.afterLoad = func(id string) { // a check-in commits while lock-1's state loads
		once.Do(func() {
			if err := s.CheckIn(ctx, "lock-1", proto.CheckIn{Version: "1.0.1", Slot: "b", HWClass: "smartlock-v2"}); err != nil {
				t.Error(err)
			}
		})
	}
	if v := version(); v != "1.0.0" {
		t.Fatalf("the load that began first read %s", v)
	}
	if v := version(); v != "1.0.1" {
		t.Fatalf("after a check-in during a load, the cache answers %s, want 1.0.1", v)
	}
	s.afterLoad = nil

	// A rollout created and started: no device goes back to the database,
	// and its release is offered at once.
	version() // cached
	gen := s.gen.Load()
	if _, err := s.CreateRollout(ctx, rollout.Spec{ID: "ro", Release: "lock-2.0.0", Target: rollout.Target{Devices: []string{"lock-1"}}}, true); err != nil {
		t.Fatal(err)
	}
	if g := s.gen.Load(); g != gen {
		t.Fatalf("creating a rollout invalidated every device's cached state (generation %d -> %d)", gen, g)
	}
	loads := 0
	s.afterLoad = func(string) { loads++ }
	var n atomic.Int64
	next := func() string { return fmt.Sprintf("u-%d", n.Add(1)) }
	up, _, _, err := s.Offer(ctx, "lock-1", next)
	if err != nil || up == nil {
		t.Fatalf("offer after the rollout's start: %v %v", up, err)
	}
	if loads != 0 {
		t.Errorf("the offer loaded lock-1's state %d times, want it from the cache", loads)
	}
	// The start changed lock-1's updates: the next request reads them.
	again, _, _, err := s.Offer(ctx, "lock-1", next)
	if err != nil || again == nil || again.ID != up.ID || loads != 1 {
		t.Fatalf("offer again: %+v %v after %d loads, want the same update after one load", again, err, loads)
	}

	// A release, an audit entry, a device enrolled: no other device's
	// cached state goes. A revocation takes effect at the device's next
	// request, and only its own entry is dropped.
	if err := s.Active(ctx, "lock-2"); err != nil {
		t.Fatal(err)
	}
	if err := s.AddRelease(ctx, Release{ID: "lock-3.0.0", Version: "3.0.0", HWClass: "smartlock-v2", SecurityCounter: 3, SHA256: strings.Repeat("cd", 32), Length: 1000}); err != nil {
		t.Fatal(err)
	}
	if err := s.Audit(ctx, AuditEntry{Actor: "admin", Role: "admin", Action: "release.upload", Target: "lock-3.0.0", Status: 201}); err != nil {
		t.Fatal(err)
	}
	if err := s.Active(ctx, "lock-9"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lock-9 before it exists: %v", err)
	}
	if err := s.AddDevice(ctx, "lock-9", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Revoke(ctx, "lock-2"); err != nil {
		t.Fatal(err)
	}
	if g := s.gen.Load(); g != gen {
		t.Errorf("a release, an audit entry, an enrollment or a revocation invalidated every device (generation %d -> %d)", gen, g)
	}
	loads = 0
	if err := s.Active(ctx, "lock-2"); !errors.Is(err, ErrRevoked) {
		t.Fatalf("lock-2 after its revocation: %v", err)
	}
	if err := s.Active(ctx, "lock-9"); err != nil {
		t.Fatalf("lock-9, added after it was looked up as unknown: %v", err)
	}
	if _, _, _, err := s.Offer(ctx, "lock-1", next); err != nil || loads != 2 {
		t.Fatalf("after the revocation: %v, %d loads (want lock-2 and lock-9 only)", err, loads)
	}
}
