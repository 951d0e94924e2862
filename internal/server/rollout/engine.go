package rollout

import (
	"context"
	"log/slog"
	"time"
)

// Rollout is a rollout as stored: its spec and where it stands.
type Rollout struct {
	Spec           Spec      `json:"spec"`
	State          string    `json:"state"`
	Phase          int       `json:"phase"` // the current phase, from 0
	PhaseStartedAt time.Time `json:"phase_started_at,omitzero"`
	Reason         string    `json:"reason,omitempty"` // why it is paused or aborted
	CreatedAt      time.Time `json:"created_at"`
	StartedAt      time.Time `json:"started_at,omitzero"`
	// Baseline is what an operator acknowledged by resuming after a gate
	// tripped: from then on the gates judge only what came after.
	Baseline Baseline `json:"baseline,omitzero"`
}

// Baseline is what a resume acknowledged: the outcomes reported before At
// and the devices then unhealthy are not judged again (devices, not
// counts: a retried device that fails again after At counts again).
type Baseline struct {
	At        time.Time `json:"at,omitzero"`
	Unhealthy []string  `json:"unhealthy,omitempty"`
}

// Live says whether the rollout starts devices at now: active, and past
// its schedule's start.
func (r *Rollout) Live(now time.Time) bool {
	return r.State == StateActive && !now.Before(r.Spec.Schedule.Start)
}

// Final says whether the current phase is the last.
func (r *Rollout) Final() bool { return r.Phase >= len(r.Spec.Phases)-1 }

// Backend is what the engine needs from the store. Advance and Trip are
// compare-and-set on the rollout's state and phase, so two engines, or an
// engine and an operator, never apply a decision twice.
type Backend interface {
	// Rollouts lists rollouts in the given states.
	Rollouts(ctx context.Context, states ...string) ([]Rollout, error)
	// Stats counts the rollout's devices; phase < 0 counts every phase.
	Stats(ctx context.Context, id string, phase int) (Stats, error)
	// GateCounts counts what the gates judge at now: outcomes since the
	// baseline, and the health of committed devices still on the release
	// (by the gates' rules) but those the baseline acknowledged.
	GateCounts(ctx context.Context, r *Rollout, now time.Time, g Gates) (Stats, Health, error)
	// CohortPending counts the devices of the phase's cohort that are
	// neither up to date nor have an outcome.
	CohortPending(ctx context.Context, r *Rollout, phase int) (int, error)
	// Advance moves an active rollout from phase `from` to the next.
	Advance(ctx context.Context, id string, from int, now time.Time) (bool, error)
	// Trip pauses or aborts an active rollout in phase `phase`, saying why.
	Trip(ctx context.Context, id string, phase int, action, reason string, now time.Time) (bool, error)
}

// Event is a decision the engine applied.
type Event struct {
	Rollout string `json:"rollout"`
	Kind    string `json:"kind"` // "advanced", "paused", "aborted"
	Phase   int    `json:"phase"`
	Reason  string `json:"reason,omitempty"`
}

// Engine advances phases and trips gates. Tick is one round of decisions
// at the clock's time; Run ticks until its context ends. All state is in
// the store, so an engine that restarts (a server killed mid-phase) picks
// up where it was.
type Engine struct {
	Backend Backend
	Now     func() time.Time
	Log     *slog.Logger
	// Decided, if set, is told of every decision applied (for metrics).
	Decided func(Event)
}

// Tick judges every active rollout once: a tripped gate pauses or aborts
// it; otherwise a phase that has soaked and is ready hands over to the next.
func (e *Engine) Tick(ctx context.Context) ([]Event, error) {
	now := e.Now()
	rs, err := e.Backend.Rollouts(ctx, StateActive)
	if err != nil {
		return nil, err
	}
	var events []Event
	for i := range rs {
		r := &rs[i]
		if !r.Live(now) {
			continue
		}
		ev, err := e.judge(ctx, r, now)
		if err != nil {
			return events, err
		}
		if ev != nil {
			events = append(events, *ev)
			if e.Decided != nil {
				e.Decided(*ev)
			}
			if e.Log != nil {
				e.Log.Info("rollout "+ev.Kind, "rollout", ev.Rollout, "phase", ev.Phase+1, "reason", ev.Reason)
			}
		}
	}
	return events, nil
}

func (e *Engine) judge(ctx context.Context, r *Rollout, now time.Time) (*Event, error) {
	p := r.Spec.Phases[r.Phase]
	all, h, err := e.Backend.GateCounts(ctx, r, now, p.Gates)
	if err != nil {
		return nil, err
	}
	// The soak gate watches until the last phase has soaked: after that
	// the fleet's ordinary churn (devices retired, offline) is no reason
	// to stop a finished rollout.
	if r.Final() && !now.Before(r.PhaseStartedAt.Add(p.Soak.D())) {
		h = Health{}
	}
	if why := Judge(p.Gates, all, h); why != "" {
		ok, err := e.Backend.Trip(ctx, r.Spec.ID, r.Phase, r.Spec.OnTrip, why, now)
		if err != nil || !ok {
			return nil, err
		}
		kind := "paused"
		if r.Spec.OnTrip == TripAbort {
			kind = "aborted"
		}
		return &Event{Rollout: r.Spec.ID, Kind: kind, Phase: r.Phase, Reason: why}, nil
	}
	if r.Final() {
		return nil, nil
	}
	mine, err := e.Backend.Stats(ctx, r.Spec.ID, r.Phase)
	if err != nil {
		return nil, err
	}
	why, err := Ready(p, r.PhaseStartedAt, now, mine, func() (int, error) { return e.Backend.CohortPending(ctx, r, r.Phase) })
	if err != nil || why != "" {
		return nil, err
	}
	ok, err := e.Backend.Advance(ctx, r.Spec.ID, r.Phase, now)
	if err != nil || !ok {
		return nil, err
	}
	return &Event{Rollout: r.Spec.ID, Kind: "advanced", Phase: r.Phase + 1}, nil
}

// Run ticks every interval until ctx ends; a failed tick is logged and the
// next one tries again.
func (e *Engine) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if _, err := e.Tick(ctx); err != nil && ctx.Err() == nil && e.Log != nil {
			e.Log.Error("rollout engine", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
