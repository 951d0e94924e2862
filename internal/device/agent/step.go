package agent

import (
	"fmt"
	"strings"

	"github.com/fieldpatch/fieldpatch/internal/image"
)

// Step is the state machine: given the state and an event, the next state
// and the effects the runner must carry out, in order. It does no I/O and
// reads no clock; the runner persists the new state before any effect runs.
// An event that means nothing in the current phase changes nothing.
func Step(s State, e Event) (State, []Effect) {
	s = s.clone()
	s.Format = JournalFormat
	if s.Phase == "" {
		s.Phase = PhaseIdle
	}
	switch e.Kind {
	case EvStart:
		return onStart(s, e)
	case EvCommitRequested:
		if s.Phase == PhaseTrialRunning {
			return to(s, PhaseCommitting, Effect{Kind: FxCommit})
		}
		return s, nil
	case EvRollbackRequest:
		return onRollbackRequest(s)
	}
	u := s.Update
	switch s.Phase {
	case PhaseIdle:
		switch e.Kind {
		case EvCheck:
			return to(s, PhaseChecking, Effect{Kind: FxCheckServer})
		case EvOffer:
			return begin(s, e)
		}
	case PhaseChecking:
		switch e.Kind {
		case EvNoUpdate, EvFailed:
			s.Phase = PhaseIdle
			return s, nil
		case EvOffer:
			s.Phase = PhaseIdle
			return begin(s, e)
		}
	case PhaseDownloading:
		switch e.Kind {
		case EvDownloaded:
			u.Staged = e.Staged
			return to(s, PhaseVerifying, Effect{Kind: FxVerify})
		case EvFailed:
			return retryOr(s, e, Effect{Kind: FxDownload}, fail)
		}
	case PhaseVerifying:
		switch e.Kind {
		case EvVerified:
			u.Image = e.Image
			if why := judge(u.Device, e.Image.Version, e.Image.SecurityCounter, true, e.Image.HWClass, u.Offer != nil && u.Offer.Downgrade); why != "" {
				return fail(s, "refused: "+why)
			}
			if u.Offer != nil && u.Offer.Version != "" && u.Offer.Version != e.Image.Version {
				return fail(s, fmt.Sprintf("refused: the image is version %s, the offer said %s", e.Image.Version, u.Offer.Version))
			}
			return to(s, PhaseInstalling, Effect{Kind: FxInstall})
		case EvFailed:
			if e.Security {
				return fail(s, "refused: "+e.Err) // never retried
			}
			return retryOr(s, e, Effect{Kind: FxVerify}, fail)
		}
	case PhaseInstalling:
		switch e.Kind {
		case EvInstalled:
			return to(s, PhaseArmed, Effect{Kind: FxArm})
		case EvFailed:
			return retryOr(s, e, Effect{Kind: FxInstall}, fail)
		}
	case PhaseArmed:
		switch e.Kind {
		case EvArmed:
			return to(s, PhaseRebooting, Effect{Kind: FxReboot})
		case EvFailed:
			if e.Security {
				return fail(s, "refused before arming: "+e.Err)
			}
			return retryOr(s, e, Effect{Kind: FxArm}, fail)
		}
	case PhaseTrialRunning:
		switch e.Kind {
		case EvRevertPrepared:
			u.TrialStep = TrialRevertPrepared
			u.Retries = 0
			return s, []Effect{{Kind: FxRunHook, Hook: HookMigrateData}}
		case EvHookDone:
			switch e.Hook {
			case HookMigrateData:
				u.TrialStep = TrialMigrated
				u.Retries = 0
				return s, []Effect{{Kind: FxRunHook, Hook: HookHealthCheck}}
			case HookHealthCheck:
				return to(s, PhaseCommitting, Effect{Kind: FxCommit})
			}
		case EvFailed:
			return retryOr(s, e, trialEffect(u), rollBackOnNewSlot)
		}
	case PhaseCommitting:
		switch e.Kind {
		case EvCommitted:
			u.Outcome = Outcome{Result: ResultCommitted, From: u.FromVersion, To: u.toVersion()}
			return to(s, PhaseCommitted, Effect{Kind: FxCleanup})
		case EvFailed:
			return retryOr(s, e, Effect{Kind: FxCommit}, rollBackOnNewSlot)
		}
	case PhaseRollingBack:
		switch e.Kind {
		case EvRolledBack:
			u.DataRestored = true
			if s.onNewSlot() {
				return s, []Effect{{Kind: FxReboot}}
			}
			return to(s, PhaseRolledBack, Effect{Kind: FxCleanup})
		case EvFailed:
			return retryOr(s, e, Effect{Kind: FxRollback, OnNewSlot: s.onNewSlot()}, func(s State, why string) (State, []Effect) {
				// Rolling back must not stop: keep trying at the longest delay.
				s.Update.Retries = MaxRetries
				return s, []Effect{{Kind: FxSleep, Delay: RetryDelay(MaxRetries)}, {Kind: FxRollback, OnNewSlot: s.onNewSlot()}}
			})
		}
	case PhaseCommitted, PhaseRolledBack, PhaseFailed:
		if e.Kind == EvCleaned || e.Kind == EvFailed {
			return to(s, PhaseReporting, Effect{Kind: FxReport})
		}
	case PhaseReporting:
		switch e.Kind {
		case EvReported:
			return finish(s, true)
		case EvFailed:
			return retryOr(s, e, Effect{Kind: FxReport}, func(s State, _ string) (State, []Effect) { return finish(s, false) })
		}
	}
	return s, nil
}

// onNewSlot says whether the agent runs on the update's slot: Device is
// refreshed from each start's facts.
func (s State) onNewSlot() bool {
	return s.Update != nil && s.Update.Device.Booted == s.Update.ToSlot
}

func (u *Update) toVersion() string {
	if u.Image != nil {
		return u.Image.Version
	}
	if u.Offer != nil {
		return u.Offer.Version
	}
	return ""
}

// to enters a phase: per-phase counters start again.
func to(s State, p Phase, fx ...Effect) (State, []Effect) {
	if s.Phase != p && s.Update != nil {
		s.Update.Restarts, s.Update.Retries = 0, 0
	}
	s.Phase = p
	return s, fx
}

func fail(s State, why string) (State, []Effect) {
	u := s.Update
	u.Outcome = Outcome{Result: ResultFailed, Reason: why, From: u.FromVersion, To: u.toVersion()}
	return to(s, PhaseFailed, Effect{Kind: FxCleanup})
}

func rollBackOnNewSlot(s State, why string) (State, []Effect) {
	u := s.Update
	u.Outcome = Outcome{Result: ResultRolledBack, Reason: why, From: u.FromVersion, To: u.toVersion()}
	return to(s, PhaseRollingBack, Effect{Kind: FxRollback, OnNewSlot: true})
}

func finish(s State, reported bool) (State, []Effect) {
	o := s.Update.Outcome
	o.UpdateID = s.Update.ID
	o.Reported = reported
	s.Last = &o
	s.Update = nil
	s.Phase = PhaseIdle
	return s, nil
}

// retryOr retries a retryable failure after a delay, up to MaxRetries, and
// otherwise gives up with giveUp.
func retryOr(s State, e Event, again Effect, giveUp func(State, string) (State, []Effect)) (State, []Effect) {
	u := s.Update
	why := e.Err
	if e.Hook != "" && !strings.Contains(why, e.Hook) {
		why = e.Hook + " hook: " + why
	}
	if e.Retryable && u.Retries < MaxRetries {
		u.Retries++
		return s, []Effect{{Kind: FxSleep, Delay: RetryDelay(u.Retries)}, again}
	}
	return giveUp(s, why)
}

// trialEffect is the next thing to do on a trial, from how far it came.
func trialEffect(u *Update) Effect {
	switch u.TrialStep {
	case TrialRevertPrepared:
		return Effect{Kind: FxRunHook, Hook: HookMigrateData}
	case TrialMigrated:
		return Effect{Kind: FxRunHook, Hook: HookHealthCheck}
	}
	return Effect{Kind: FxPrepareRevert}
}

// begin starts an update from an offer or a local request.
func begin(s State, e Event) (State, []Effect) {
	f := Facts{}
	if e.Facts != nil {
		f = *e.Facts
	}
	target := "b"
	if f.Booted == "b" {
		target = "a"
	}
	s.Update = &Update{ID: e.ID, Source: e.Source, Offer: e.Offer, FromVersion: f.RunningVersion, FromSlot: f.Booted, ToSlot: target, Device: f}
	if o := e.Offer; o != nil && (o.Version != "" || o.HasCounter || o.HWClass != "") {
		if why := judge(f, o.Version, o.SecurityCounter, o.HasCounter, o.HWClass, o.Downgrade); why != "" {
			return fail(s, "refused from the offer: "+why)
		}
	}
	if IsURL(e.Source) {
		return to(s, PhaseDownloading, Effect{Kind: FxDownload})
	}
	s.Update.Staged = e.Source
	return to(s, PhaseVerifying, Effect{Kind: FxVerify})
}

// IsURL says whether an install source is downloaded (http, https) rather
// than a local file.
func IsURL(s string) bool { return strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://") }

// RefusedError is an offer the device refuses before anything is
// downloaded: for another hardware class, below its security counter, or
// older than what it runs without the downgrade mark.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "refused from the offer: " + e.Reason }

// Security says it is refused for good (see Runner.CheckOffer).
func (e *RefusedError) Security() bool { return true }

// Judge checks an offer against the device, as the state machine does when
// it takes the offer; it returns a *RefusedError, or nil.
func Judge(f Facts, o *Offer) error {
	if why := judge(f, o.Version, o.SecurityCounter, o.HasCounter, o.HWClass, o.Downgrade); why != "" {
		return &RefusedError{Reason: why}
	}
	return nil
}

// judge says why an image (or offer) must not be installed on a device, or "".
func judge(f Facts, version string, counter uint32, hasCounter bool, hw string, downgrade bool) string {
	if f.HWClass != "" && hw != f.HWClass {
		if hw == "" {
			return fmt.Sprintf("the image names no hardware class; this device is %q", f.HWClass)
		}
		return fmt.Sprintf("the image is for hardware class %q; this device is %q", hw, f.HWClass)
	}
	if hasCounter && counter < f.NVCounter {
		return fmt.Sprintf("security counter %d is below the device's %d", counter, f.NVCounter)
	}
	if version == "" || f.RunningVersion == "" {
		return ""
	}
	v, err := image.ParseSemVer(version)
	if err != nil {
		return fmt.Sprintf("version %q: %v", version, err)
	}
	cur, err := image.ParseSemVer(f.RunningVersion)
	if err != nil {
		return ""
	}
	switch c := v.Compare(cur); {
	case c == 0:
		return fmt.Sprintf("version %s is already running", version)
	case c < 0 && !downgrade:
		return fmt.Sprintf("version %s is older than the running %s and the offer is not marked as a deliberate downgrade", version, f.RunningVersion)
	}
	return ""
}

// onStart resumes after the agent starts: from the journal's phase and what
// booted. The loop breaker counts starts within one phase.
func onStart(s State, e Event) (State, []Effect) {
	if s.Phase == PhaseIdle || s.Update == nil {
		s.Phase, s.Update = PhaseIdle, nil
		return s, nil
	}
	u := s.Update
	if e.Facts != nil {
		keep := u.Device
		u.Device = *e.Facts
		// What the device was when the update began still judges the image.
		u.Device.NVCounter, u.Device.KeyEpoch, u.Device.RunningVersion = keep.NVCounter, keep.KeyEpoch, keep.RunningVersion
	}
	booted := u.Device.Booted
	onNew := booted == u.ToSlot
	prev := s.Phase

	next, fx := resume(s, onNew)
	if next.Phase == prev && next.Update != nil {
		next.Update.Restarts++
		if next.Update.Restarts > MaxRestarts {
			return breakLoop(next, onNew)
		}
	}
	return next, fx
}

func resume(s State, onNew bool) (State, []Effect) {
	u := s.Update
	switch s.Phase {
	case PhaseChecking:
		return s, []Effect{{Kind: FxCheckServer}}
	case PhaseDownloading:
		return s, []Effect{{Kind: FxDownload}}
	case PhaseVerifying:
		return s, []Effect{{Kind: FxVerify}}
	case PhaseInstalling:
		return s, []Effect{{Kind: FxInstall}}
	case PhaseArmed:
		if onNew {
			return to(s, PhaseTrialRunning, trialEffect(u))
		}
		return s, []Effect{{Kind: FxArm}}
	case PhaseRebooting, PhaseTrialRunning:
		if onNew {
			if s.Phase == PhaseRebooting {
				return to(s, PhaseTrialRunning, trialEffect(u))
			}
			return s, []Effect{trialEffect(u)}
		}
		if s.Phase == PhaseRebooting && u.Device.Trial == u.ToSlot {
			// The trial is still armed: the device has not rebooted yet
			// (the agent was restarted, or the reboot command failed).
			return s, []Effect{{Kind: FxReboot}}
		}
		// Back on the old slot: the bootloader gave up on the trial (it
		// crashed until its attempts ran out) or it never booted.
		u.Outcome = Outcome{Result: ResultRolledBack, Reason: "the trial did not come up: the bootloader rolled back", From: u.FromVersion, To: u.toVersion()}
		if u.TrialStep == TrialStarted {
			// No data was touched: nothing to restore.
			return to(s, PhaseRolledBack, Effect{Kind: FxCleanup})
		}
		return to(s, PhaseRollingBack, Effect{Kind: FxRollback})
	case PhaseCommitting:
		return s, []Effect{{Kind: FxCommit}}
	case PhaseRollingBack:
		if onNew {
			return s, []Effect{{Kind: FxRollback, OnNewSlot: true}}
		}
		if u.DataRestored || u.TrialStep == TrialStarted {
			return to(s, PhaseRolledBack, Effect{Kind: FxCleanup})
		}
		return s, []Effect{{Kind: FxRollback}}
	case PhaseCommitted, PhaseRolledBack, PhaseFailed:
		return s, []Effect{{Kind: FxCleanup}}
	case PhaseReporting:
		return s, []Effect{{Kind: FxReport}}
	}
	return s, nil
}

// breakLoop ends a phase the agent keeps dying in.
func breakLoop(s State, onNew bool) (State, []Effect) {
	why := fmt.Sprintf("the agent restarted %d times in phase %s", s.Update.Restarts, s.Phase)
	switch s.Phase {
	case PhaseTrialRunning, PhaseCommitting:
		if onNew {
			return rollBackOnNewSlot(s, why)
		}
	case PhaseRollingBack:
		// Never abandon a rollback; keep going at the slowest pace.
		s.Update.Restarts = MaxRestarts
		return s, []Effect{{Kind: FxSleep, Delay: RetryDelay(MaxRetries)}, {Kind: FxRollback, OnNewSlot: onNew}}
	case PhaseReporting:
		return finish(s, false)
	case PhaseCommitted, PhaseRolledBack, PhaseFailed:
		return to(s, PhaseReporting, Effect{Kind: FxReport})
	}
	return fail(s, why)
}

func onRollbackRequest(s State) (State, []Effect) {
	switch s.Phase {
	case PhaseTrialRunning, PhaseCommitting:
		if s.onNewSlot() {
			return rollBackOnNewSlot(s, "rolled back by request")
		}
	case PhaseChecking, PhaseDownloading, PhaseVerifying, PhaseInstalling, PhaseArmed, PhaseRebooting:
		if !s.onNewSlot() {
			return fail(s, "cancelled by request")
		}
	}
	return s, nil
}

func (s State) clone() State {
	if s.Update != nil {
		u := *s.Update
		if u.Offer != nil {
			o := *u.Offer
			u.Offer = &o
		}
		if u.Image != nil {
			i := *u.Image
			u.Image = &i
		}
		s.Update = &u
	}
	if s.Last != nil {
		l := *s.Last
		s.Last = &l
	}
	return s
}
