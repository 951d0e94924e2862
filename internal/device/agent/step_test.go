package agent

import (
	"fmt"
	"strings"
	"testing"
)

var v1 = Facts{Booted: "a", BootReason: "active", Active: "a", RunningVersion: "1.0.0", NVCounter: 1, HWClass: "lock"}

func onB(reason string) *Facts {
	f := v1
	f.Booted, f.BootReason = "b", reason
	return &f
}

func onA(reason string, trial string) *Facts {
	f := v1
	f.BootReason, f.Trial = reason, trial
	return &f
}

var img2 = &ImageInfo{Version: "2.0.0", SecurityCounter: 2, HWClass: "lock", Len: 1000}

// walk applies events in order and returns "phase:effects" after each.
func walk(t *testing.T, s State, evs ...Event) (State, []string) {
	t.Helper()
	var trace []string
	for _, e := range evs {
		var fx []Effect
		s, fx = Step(s, e)
		var names []string
		for _, f := range fx {
			names = append(names, f.String())
		}
		trace = append(trace, fmt.Sprintf("%s:%s", s.Phase, strings.Join(names, "+")))
	}
	return s, trace
}

func offer(src string) Event {
	f := v1
	return Event{Kind: EvOffer, Source: src, Facts: &f, ID: "u1"}
}

func check(t *testing.T, got []string, want string) {
	t.Helper()
	if g := strings.Join(got, " "); g != want {
		t.Fatalf("trace\n got: %s\nwant: %s", g, want)
	}
}

func TestHappyPath(t *testing.T) {
	s, tr := walk(t, State{},
		offer("https://example.invalid/fw.img"),
		Event{Kind: EvDownloaded, Staged: "/data/staging"},
		Event{Kind: EvVerified, Image: img2},
		Event{Kind: EvInstalled},
		Event{Kind: EvArmed},
		Event{Kind: EvStart, Facts: onB("trial")},
		Event{Kind: EvRevertPrepared},
		Event{Kind: EvHookDone, Hook: HookMigrateData},
		Event{Kind: EvHookDone, Hook: HookHealthCheck},
		Event{Kind: EvCommitted},
		Event{Kind: EvCleaned},
		Event{Kind: EvReported},
	)
	check(t, tr, "downloading:download verifying:verify installing:install armed:arm rebooting:reboot "+
		"trial_running:prepare_revert trial_running:run_hook(migrate-data) trial_running:run_hook(health-check) "+
		"committing:commit committed:cleanup reporting:report idle:")
	if s.Last == nil || s.Last.Result != ResultCommitted || s.Last.From != "1.0.0" || s.Last.To != "2.0.0" || !s.Last.Reported {
		t.Errorf("last outcome %+v", s.Last)
	}
	// A local file skips the download.
	_, tr = walk(t, State{}, offer("/tmp/fw.img"))
	check(t, tr, "verifying:verify")
}

func TestRefusals(t *testing.T) {
	cases := []struct {
		name string
		img  ImageInfo
		down bool
		want string
	}{
		{"other hardware", ImageInfo{Version: "2.0.0", SecurityCounter: 2, HWClass: "thermostat"}, false, "hardware class"},
		{"no hardware class", ImageInfo{Version: "2.0.0", SecurityCounter: 2}, false, "names no hardware class"},
		{"below the counter", ImageInfo{Version: "2.0.0", SecurityCounter: 0, HWClass: "lock"}, false, "below the device's 1"},
		{"below the counter, even as a downgrade", ImageInfo{Version: "0.9.0", SecurityCounter: 0, HWClass: "lock"}, true, "below the device's 1"},
		{"older version", ImageInfo{Version: "0.9.0", SecurityCounter: 1, HWClass: "lock"}, false, "not marked as a deliberate downgrade"},
		{"same version", ImageInfo{Version: "1.0.0", SecurityCounter: 1, HWClass: "lock"}, false, "already running"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ev := offer("/tmp/fw.img")
			ev.Offer = &Offer{Downgrade: c.down}
			img := c.img
			s, tr := walk(t, State{}, ev, Event{Kind: EvVerified, Image: &img}, Event{Kind: EvCleaned}, Event{Kind: EvReported})
			check(t, tr, "verifying:verify failed:cleanup reporting:report idle:")
			if s.Last.Result != ResultFailed || !strings.Contains(s.Last.Reason, c.want) {
				t.Errorf("outcome %+v, want reason with %q", s.Last, c.want)
			}
		})
	}
	// A deliberate downgrade with an equal counter is allowed.
	ev := offer("/tmp/fw.img")
	ev.Offer = &Offer{Downgrade: true}
	_, tr := walk(t, State{}, ev, Event{Kind: EvVerified, Image: &ImageInfo{Version: "0.9.0", SecurityCounter: 1, HWClass: "lock"}})
	check(t, tr, "verifying:verify installing:install")
	// The offer is judged before anything is downloaded.
	ev = offer("https://example.invalid/fw.img")
	ev.Offer = &Offer{Version: "2.0.0", SecurityCounter: 0, HasCounter: true, HWClass: "lock"}
	s, tr := walk(t, State{}, ev)
	check(t, tr, "failed:cleanup")
	if !strings.Contains(s.Update.Outcome.Reason, "refused from the offer") {
		t.Errorf("reason %q", s.Update.Outcome.Reason)
	}
	// A security failure is never retried.
	_, tr = walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvFailed, Err: "bad signature", Security: true, Retryable: true})
	check(t, tr, "verifying:verify failed:cleanup")
}

func TestRetriesThenGiveUp(t *testing.T) {
	evs := []Event{offer("https://example.invalid/fw.img")}
	for i := 0; i < MaxRetries+1; i++ {
		evs = append(evs, Event{Kind: EvFailed, Err: "connection reset", Retryable: true})
	}
	_, tr := walk(t, State{}, evs...)
	want := "downloading:download"
	for i := 0; i < MaxRetries; i++ {
		want += " downloading:sleep+download"
	}
	check(t, tr, want+" failed:cleanup")
}

// The hard case: the new firmware migrates data, then crashes until the
// bootloader's attempts run out; the old firmware's agent restores the data.
func TestBootloaderRollbackRestoresData(t *testing.T) {
	s, tr := walk(t, State{},
		offer("/tmp/fw.img"),
		Event{Kind: EvVerified, Image: img2},
		Event{Kind: EvInstalled},
		Event{Kind: EvArmed},
		Event{Kind: EvStart, Facts: onB("trial")},
		Event{Kind: EvRevertPrepared},
		Event{Kind: EvHookDone, Hook: HookMigrateData},
		// crash, crash, crash: the bootloader rolls back to a
		Event{Kind: EvStart, Facts: onA("rollback", "")},
		Event{Kind: EvRolledBack},
		Event{Kind: EvCleaned},
		Event{Kind: EvReported},
	)
	check(t, tr, "verifying:verify installing:install armed:arm rebooting:reboot trial_running:prepare_revert "+
		"trial_running:run_hook(migrate-data) trial_running:run_hook(health-check) rolling_back:rollback "+
		"rolled_back:cleanup reporting:report idle:")
	if s.Last.Result != ResultRolledBack || !strings.Contains(s.Last.Reason, "bootloader rolled back") {
		t.Errorf("outcome %+v", s.Last)
	}
	// If the trial never came up at all, there is nothing to restore.
	_, tr = walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2}, Event{Kind: EvInstalled},
		Event{Kind: EvArmed}, Event{Kind: EvStart, Facts: onA("rollback", "")})
	check(t, tr, "verifying:verify installing:install armed:arm rebooting:reboot rolled_back:cleanup")
}

func TestHealthCheckFailsRollsBack(t *testing.T) {
	_, tr := walk(t, State{},
		offer("/tmp/fw.img"),
		Event{Kind: EvVerified, Image: img2},
		Event{Kind: EvInstalled},
		Event{Kind: EvArmed},
		Event{Kind: EvStart, Facts: onB("trial")},
		Event{Kind: EvRevertPrepared},
		Event{Kind: EvHookDone, Hook: HookMigrateData},
		Event{Kind: EvFailed, Hook: HookHealthCheck, Err: "exit status 1"},
		Event{Kind: EvRolledBack},
		Event{Kind: EvStart, Facts: onA("active", "")},
		Event{Kind: EvCleaned},
	)
	check(t, tr, "verifying:verify installing:install armed:arm rebooting:reboot trial_running:prepare_revert "+
		"trial_running:run_hook(migrate-data) trial_running:run_hook(health-check) rolling_back:rollback "+
		"rolling_back:reboot rolled_back:cleanup reporting:report")
}

// Restarts resume the phase's effect; the loop breaker ends a phase the
// agent keeps dying in.
func TestResumeAndLoopBreaker(t *testing.T) {
	s, _ := walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2})
	evs := []Event{}
	for i := 0; i <= MaxRestarts; i++ {
		evs = append(evs, Event{Kind: EvStart, Facts: onA("active", "")})
	}
	_, tr := walk(t, s, evs...)
	want := strings.Repeat("installing:install ", MaxRestarts) + "failed:cleanup"
	check(t, tr, want)

	// On trial, the loop breaker rolls back.
	s, _ = walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2}, Event{Kind: EvInstalled},
		Event{Kind: EvArmed}, Event{Kind: EvStart, Facts: onB("trial")}, Event{Kind: EvRevertPrepared})
	evs = nil
	for i := 0; i <= MaxRestarts; i++ {
		evs = append(evs, Event{Kind: EvStart, Facts: onB("trial")})
	}
	_, tr = walk(t, s, evs...)
	check(t, tr, strings.Repeat("trial_running:run_hook(migrate-data) ", MaxRestarts)+"rolling_back:rollback")

	// Rebooting with the trial still armed: reboot again, not a rollback.
	s, _ = walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2}, Event{Kind: EvInstalled}, Event{Kind: EvArmed})
	_, tr = walk(t, s, Event{Kind: EvStart, Facts: onA("active", "b")})
	check(t, tr, "rebooting:reboot")
	// Armed, power cut before the reboot: arm again.
	s, _ = walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2}, Event{Kind: EvInstalled})
	_, tr = walk(t, s, Event{Kind: EvStart, Facts: onA("active", "b")})
	check(t, tr, "armed:arm")
	// Idle stays idle.
	_, tr = walk(t, State{}, Event{Kind: EvStart, Facts: onA("active", "")})
	check(t, tr, "idle:")
}

func TestRequests(t *testing.T) {
	s, _ := walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2}, Event{Kind: EvInstalled},
		Event{Kind: EvArmed}, Event{Kind: EvStart, Facts: onB("trial")})
	_, tr := walk(t, s, Event{Kind: EvCommitRequested})
	check(t, tr, "committing:commit")
	_, tr = walk(t, s, Event{Kind: EvRollbackRequest})
	check(t, tr, "rolling_back:rollback")
	// Before the trial boots, a rollback request cancels the update.
	s, _ = walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2})
	_, tr = walk(t, s, Event{Kind: EvRollbackRequest})
	check(t, tr, "failed:cleanup")
	// Nothing to do when idle; unexpected events change nothing.
	_, tr = walk(t, State{}, Event{Kind: EvCommitRequested}, Event{Kind: EvRollbackRequest}, Event{Kind: EvArmed})
	check(t, tr, "idle: idle: idle:")
}

// Step never mutates its input (the runner relies on comparing states).
func TestStepDoesNotMutate(t *testing.T) {
	s, _ := walk(t, State{}, offer("/tmp/fw.img"), Event{Kind: EvVerified, Image: img2})
	before := fmt.Sprintf("%+v %+v", s, *s.Update)
	Step(s, Event{Kind: EvFailed, Err: "x", Retryable: true})
	Step(s, Event{Kind: EvStart, Facts: onB("trial")})
	if after := fmt.Sprintf("%+v %+v", s, *s.Update); after != before {
		t.Fatalf("Step mutated its input:\n%s\n%s", before, after)
	}
}
