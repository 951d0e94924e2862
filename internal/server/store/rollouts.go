package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/rollout"
)

// Update is one device's attempt at one release.
type Update struct {
	ID        string    `json:"id"`
	DeviceID  string    `json:"device_id"`
	RolloutID string    `json:"rollout_id"`
	ReleaseID string    `json:"release_id"`
	Status    string    `json:"status"` // offered, then the device's report statuses
	Progress  float64   `json:"progress"`
	Reason    string    `json:"reason,omitempty"`
	LogTail   string    `json:"log_tail,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
}

// StatusOffered is an update offered and not yet reported on.
const StatusOffered = "offered"

// staleDownload: an offered or downloading update not heard of for this
// long no longer counts against a rollout's concurrent downloads.
const staleDownload = time.Hour

// ErrState is returned for an operator action the rollout's state does not
// allow (resuming an active rollout, promoting past the last phase).
var ErrState = errors.New("not allowed in this state")

// liveCache holds the active and paused rollouts for the offer path; any
// rollout change bumps the store's generation, which reloads it.
type liveCache struct {
	mu   sync.Mutex
	gen  uint64
	ok   bool
	list []*liveRollout
}

type liveRollout struct {
	r   rollout.Rollout
	rel Release
}

const rolloutCols = `r.spec, r.state, r.phase, r.phase_started_at, r.reason, r.baseline, r.created_at, r.started_at`

func scanRollout(sc interface{ Scan(...any) error }, extra ...any) (rollout.Rollout, error) {
	var r rollout.Rollout
	var spec, baseline string
	var phaseAt, created, started int64
	if err := sc.Scan(append([]any{&spec, &r.State, &r.Phase, &phaseAt, &r.Reason, &baseline, &created, &started}, extra...)...); err != nil {
		return r, err
	}
	if err := json.Unmarshal([]byte(spec), &r.Spec); err != nil {
		return r, fmt.Errorf("stored rollout spec: %w", err)
	}
	if err := r.Spec.Normalize(); err != nil { // fills what older specs left out
		return r, fmt.Errorf("stored rollout %s: %w", r.Spec.ID, err)
	}
	json.Unmarshal([]byte(baseline), &r.Baseline)
	r.PhaseStartedAt, r.CreatedAt = unix(phaseAt), unix(created)
	r.StartedAt = unix(started)
	return r, nil
}

func unix(t int64) time.Time {
	if t == 0 {
		return time.Time{}
	}
	return time.Unix(t, 0)
}

// liveRollouts lists the active and paused rollouts, newest first.
func (s *Store) liveRollouts(ctx context.Context) ([]*liveRollout, error) {
	gen := s.gen.Load() + s.rollGen.Load() // both only grow: the sum moves when either does
	c := &s.live
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ok && c.gen == gen {
		return c.list, nil
	}
	var list []*liveRollout
	err := s.queryRows(ctx, `SELECT `+rolloutCols+`, rel.id, rel.version, rel.hw_class, rel.security_counter, rel.key_epoch, rel.sha256, rel.length
		FROM rollouts r JOIN releases rel ON rel.id = r.release_id
		WHERE r.state IN ('active', 'paused') ORDER BY r.created_at DESC, r.rowid DESC`, nil, func(rows *sql.Rows) error {
		var lr liveRollout
		var err error
		lr.r, err = scanRollout(rows, &lr.rel.ID, &lr.rel.Version, &lr.rel.HWClass, &lr.rel.SecurityCounter, &lr.rel.KeyEpoch, &lr.rel.SHA256, &lr.rel.Length)
		if err != nil {
			// One rollout that cannot be read must not stop every offer.
			if s.Log != nil {
				s.Log.Error("rollout skipped", "err", err)
			}
			return nil
		}
		list = append(list, &lr)
		return nil
	})
	if err != nil {
		return nil, err
	}
	c.list, c.gen, c.ok = list, gen, true
	return list, nil
}

// CreateRollout stores a rollout (its spec normalized: every default
// filled in), in state created, or active when start is set.
func (s *Store) CreateRollout(ctx context.Context, spec rollout.Spec, start bool) (*rollout.Rollout, error) {
	if err := spec.Normalize(); err != nil {
		return nil, err
	}
	body, _ := json.Marshal(spec)
	now := s.now()
	err := s.writeRollouts(ctx, func(tx *sql.Tx) error {
		var hw string
		if err := tx.QueryRowContext(ctx, `SELECT hw_class FROM releases WHERE id = ?`, spec.Release).Scan(&hw); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("release %s: %w", spec.Release, ErrNotFound)
			}
			return err
		}
		if spec.Target.HWClass != "" && spec.Target.HWClass != hw {
			return fmt.Errorf("target hw_class %s: the release is for %s", spec.Target.HWClass, hw)
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO rollouts (id, release_id, spec, state, created_at, updated_at) VALUES (?, ?, ?, 'created', ?, ?)`,
			spec.ID, spec.Release, string(body), now.Unix(), now.Unix())
		if err != nil && strings.Contains(err.Error(), "UNIQUE") {
			return fmt.Errorf("rollout %s exists already: %w", spec.ID, ErrConflict)
		}
		if err != nil {
			return err
		}
		if err := event(ctx, tx, spec.ID, now, "created", 0, ""); err != nil {
			return err
		}
		if start {
			return startTx(ctx, tx, spec.ID, now)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s.GetRollout(ctx, spec.ID)
}

// Assign offers a release to a device or to a group at once: a rollout with
// one phase at 100 percent whose gates never trip.
func (s *Store) Assign(ctx context.Context, rolloutID, releaseID, targetKind, target string, downgrade bool) error {
	spec := rollout.Spec{ID: rolloutID, Release: releaseID, Downgrade: downgrade}
	switch targetKind {
	case "device":
		spec.Target.Devices = []string{target}
	case "group":
		spec.Target.Groups = []string{target}
	default:
		return fmt.Errorf("target kind %q: want device or group", targetKind)
	}
	never := 1.0
	spec.Phases = []rollout.Phase{{Percent: 100, Gates: rollout.Gates{MaxFailureRate: &never, MaxRollbackRate: &never, MaxUnhealthyRate: &never}}}
	_, err := s.CreateRollout(ctx, spec, true)
	return err
}

func event(ctx context.Context, tx *sql.Tx, id string, at time.Time, kind string, phase int, detail string) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO rollout_events (rollout_id, at, kind, phase, detail) VALUES (?, ?, ?, ?, ?)`, id, at.Unix(), kind, phase, detail)
	return err
}

func startTx(ctx context.Context, tx *sql.Tx, id string, now time.Time) error {
	var spec string
	if err := tx.QueryRowContext(ctx, `SELECT spec FROM rollouts WHERE id = ? AND state = 'created'`, id).Scan(&spec); err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("rollout %s: unknown or already started: %w", id, ErrState)
		}
		return err
	}
	var sp rollout.Spec
	json.Unmarshal([]byte(spec), &sp)
	begin := now
	if sp.Schedule.Start.After(now) {
		begin = sp.Schedule.Start
	}
	if _, err := tx.ExecContext(ctx, `UPDATE rollouts SET state = 'active', started_at = ?, phase_started_at = ?, updated_at = ? WHERE id = ?`,
		now.Unix(), begin.Unix(), now.Unix(), id); err != nil {
		return err
	}
	return event(ctx, tx, id, now, "started", 0, "")
}

// Control actions on a rollout.
const (
	ActionStart   = "start"
	ActionPause   = "pause"
	ActionResume  = "resume"
	ActionAbort   = "abort"
	ActionPromote = "promote"
)

// Control applies an operator's action to a rollout:
//
//	start    created -> active (devices start once the schedule allows)
//	pause    active -> paused: devices not yet started wait; started ones finish
//	resume   paused -> active; after a tripped gate this acknowledges what
//	         tripped it: the gates then judge only what happens next
//	abort    created, active or paused -> aborted, for good: devices not yet
//	         started are never offered it; started ones finish or roll back
//	         by their own rules
//	promote  active or paused: the next phase now, without waiting for soak
//	         and gates
func (s *Store) Control(ctx context.Context, id, action, reason string) (*rollout.Rollout, error) {
	now := s.now()
	cur, err := s.GetRollout(ctx, id)
	if err != nil {
		return nil, err
	}
	var baseline []byte
	if action == ActionResume && strings.HasPrefix(cur.Reason, gatePrefix) {
		b, err := s.snapshot(ctx, cur, now)
		if err != nil {
			return nil, err
		}
		baseline, _ = json.Marshal(b)
	}
	err = s.writeRollouts(ctx, func(tx *sql.Tx) error {
		cas := func(q string, args ...any) error {
			res, err := tx.ExecContext(ctx, q, args...)
			if err != nil {
				return err
			}
			if n, _ := res.RowsAffected(); n == 0 {
				return fmt.Errorf("rollout %s is %s: cannot %s it: %w", id, cur.State, action, ErrState)
			}
			phase := cur.Phase
			if action == ActionPromote {
				phase++
			}
			return event(ctx, tx, id, now, action+"d", phase, reason)
		}
		switch action {
		case ActionStart:
			return startTx(ctx, tx, id, now)
		case ActionPause:
			return cas(`UPDATE rollouts SET state = 'paused', reason = ?, updated_at = ? WHERE id = ? AND state = 'active'`,
				"paused by an operator"+suffix(reason), now.Unix(), id)
		case ActionResume:
			if baseline == nil {
				baseline = []byte(`{}`)
				if !cur.Baseline.At.IsZero() {
					baseline, _ = json.Marshal(cur.Baseline)
				}
			}
			return cas(`UPDATE rollouts SET state = 'active', reason = '', baseline = ?, updated_at = ? WHERE id = ? AND state = 'paused' AND phase = ?`,
				string(baseline), now.Unix(), id, cur.Phase)
		case ActionAbort:
			return cas(`UPDATE rollouts SET state = 'aborted', reason = ?, updated_at = ? WHERE id = ? AND state IN ('created', 'active', 'paused')`,
				"aborted by an operator"+suffix(reason), now.Unix(), id)
		case ActionPromote:
			if cur.Final() {
				return fmt.Errorf("rollout %s is in its last phase: %w", id, ErrState)
			}
			return cas(`UPDATE rollouts SET phase = phase + 1, phase_started_at = ?, updated_at = ? WHERE id = ? AND state IN ('active', 'paused') AND phase = ?`,
				now.Unix(), now.Unix(), id, cur.Phase)
		}
		return fmt.Errorf("action %q: want start, pause, resume, abort or promote", action)
	})
	if err != nil {
		return nil, err
	}
	return s.GetRollout(ctx, id)
}

func suffix(reason string) string {
	if reason == "" {
		return ""
	}
	return ": " + reason
}

// gatePrefix starts the reason of a rollout a gate stopped.
const gatePrefix = "gate: "

// snapshot is what an operator acknowledges by resuming after a trip: the
// outcomes so far, and the devices unhealthy now.
func (s *Store) snapshot(ctx context.Context, r *rollout.Rollout, now time.Time) (rollout.Baseline, error) {
	_, sick, err := s.health(ctx, r.Spec.ID, now, r.Spec.Phases[r.Phase].Gates, nil)
	return rollout.Baseline{At: now.Add(time.Second), Unhealthy: sick}, err
}

// GetRollout reads one rollout.
func (s *Store) GetRollout(ctx context.Context, id string) (*rollout.Rollout, error) {
	r, err := scanRollout(s.db.QueryRowContext(ctx, `SELECT `+rolloutCols+` FROM rollouts r WHERE r.id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("rollout %s: %w", id, ErrNotFound)
	}
	return &r, err
}

// Rollouts lists the rollouts in the given states (all if none), newest
// first.
func (s *Store) Rollouts(ctx context.Context, states ...string) ([]rollout.Rollout, error) {
	q := `SELECT ` + rolloutCols + ` FROM rollouts r`
	var args []any
	if len(states) > 0 {
		q += ` WHERE r.state IN (?` + strings.Repeat(", ?", len(states)-1) + `)`
		for _, st := range states {
			args = append(args, st)
		}
	}
	rows, err := s.db.QueryContext(ctx, q+` ORDER BY r.created_at DESC, r.rowid DESC`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []rollout.Rollout
	for rows.Next() {
		r, err := scanRollout(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// Advance moves an active rollout from phase `from` to the next (the
// engine's decision; a no-op if anything changed meanwhile).
func (s *Store) Advance(ctx context.Context, id string, from int, now time.Time) (bool, error) {
	var done bool
	err := s.writeRollouts(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE rollouts SET phase = phase + 1, phase_started_at = ?, updated_at = ? WHERE id = ? AND state = 'active' AND phase = ?`,
			now.Unix(), now.Unix(), id, from)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil
		}
		done = true
		return event(ctx, tx, id, now, "advanced", from+1, "soaked, gates passed")
	})
	return done && err == nil, err
}

// Trip stops an active rollout in phase `phase` because a gate tripped.
func (s *Store) Trip(ctx context.Context, id string, phase int, action, reason string, now time.Time) (bool, error) {
	state := map[string]string{rollout.TripPause: rollout.StatePaused, rollout.TripAbort: rollout.StateAborted}[action]
	if state == "" {
		return false, fmt.Errorf("trip action %q", action)
	}
	var done bool
	err := s.writeRollouts(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE rollouts SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state = 'active' AND phase = ?`,
			state, gatePrefix+reason, now.Unix(), id, phase)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil
		}
		done = true
		return event(ctx, tx, id, now, state+" by gate", phase, reason)
	})
	return done && err == nil, err
}

// Stats counts a rollout's devices by their latest attempt; phase < 0
// counts every phase.
func (s *Store) Stats(ctx context.Context, id string, phase int) (rollout.Stats, error) {
	q, args := `SELECT status, count(*) FROM updates WHERE rollout_id = ? AND retired = 0`, []any{id}
	if phase >= 0 {
		q, args = q+` AND phase = ?`, append(args, phase)
	}
	var st rollout.Stats
	err := s.queryRows(ctx, q+` GROUP BY status`, args, func(rows *sql.Rows) error {
		var status string
		var n int
		if err := rows.Scan(&status, &n); err != nil {
			return err
		}
		addStatus(&st, status, n)
		return nil
	})
	return st, err
}

// Health counts the rollout's committed devices still running its release
// and not revoked, and those the gates call unhealthy at now.
func (s *Store) Health(ctx context.Context, id string, now time.Time, g rollout.Gates) (rollout.Health, error) {
	h, _, err := s.health(ctx, id, now, g, nil)
	return h, err
}

// health counts as Health does, leaving out the devices in skip, and says
// which devices it found unhealthy.
func (s *Store) health(ctx context.Context, id string, now time.Time, g rollout.Gates, skip map[string]bool) (rollout.Health, []string, error) {
	var h rollout.Health
	var sick []string
	silentBefore := now.Add(-g.Silence.D()).Unix()
	slack := float64(*g.HealthSlack)
	err := s.queryRows(ctx, `SELECT d.id, d.last_seen, d.health_resets, d.base_resets, d.health_crashes, d.base_crashes, d.prev_reset_rate, d.prev_crash_rate, d.base_at
		FROM updates u JOIN devices d ON d.id = u.device_id JOIN releases rel ON rel.id = u.release_id
		WHERE u.rollout_id = ? AND u.status = 'committed' AND u.retired = 0 AND d.version = rel.version AND d.revoked_at = 0`, []any{id},
		func(rows *sql.Rows) error {
			var dev string
			var seen, resets, baseResets, crashes, baseCrashes, baseAt int64
			var resetRate, crashRate float64
			if err := rows.Scan(&dev, &seen, &resets, &baseResets, &crashes, &baseCrashes, &resetRate, &crashRate, &baseAt); err != nil {
				return err
			}
			// What the device did on this version; nothing while its
			// baseline is unknown (no counters since the version began).
			resets, crashes = resets-baseResets, crashes-baseCrashes
			if baseResets == unknownBase {
				resets = 0
			}
			if baseCrashes == unknownBase {
				crashes = 0
			}
			if skip[dev] {
				return nil
			}
			h.Committed++
			hours := float64(max(now.Unix()-baseAt, 0)) / 3600
			switch {
			case seen < silentBefore:
				h.Silent++
				sick = append(sick, dev)
			case float64(resets) > resetRate*hours+slack || float64(crashes) > crashRate*hours+slack:
				h.Misbehaving++
				sick = append(sick, dev)
			}
			return nil
		})
	return h, sick, err
}

// GateCounts are the counts a rollout's gates judge: outcomes reported
// since the operator's last acknowledgement (a resume after a trip), and
// the health of committed devices but those that were unhealthy then.
func (s *Store) GateCounts(ctx context.Context, r *rollout.Rollout, now time.Time, g rollout.Gates) (rollout.Stats, rollout.Health, error) {
	var st rollout.Stats
	err := s.queryRows(ctx, `SELECT status, count(*) FROM updates WHERE rollout_id = ? AND retired = 0 AND updated_at >= ? GROUP BY status`,
		[]any{r.Spec.ID, r.Baseline.At.Unix()}, func(rows *sql.Rows) error {
			var status string
			var n int
			if err := rows.Scan(&status, &n); err != nil {
				return err
			}
			addStatus(&st, status, n)
			return nil
		})
	if err != nil {
		return st, rollout.Health{}, err
	}
	skip := map[string]bool{}
	for _, d := range r.Baseline.Unhealthy {
		skip[d] = true
	}
	h, _, err := s.health(ctx, r.Spec.ID, now, g, skip)
	return st, h, err
}

// targetDevices lists the devices a rollout aims at (not revoked, on the
// release's hardware class, matching its target), with their versions.
func (s *Store) targetDevices(ctx context.Context, r *rollout.Rollout) ([]rollout.Device, string, error) {
	var hw, version string
	if err := s.db.QueryRowContext(ctx, `SELECT hw_class, version FROM releases WHERE id = ?`, r.Spec.Release).Scan(&hw, &version); err != nil {
		return nil, "", err
	}
	member := map[string]*rollout.Device{}
	var out []*rollout.Device
	err := s.queryRows(ctx, `SELECT id, version, attributes FROM devices WHERE revoked_at = 0 AND hw_class = ? ORDER BY id`, []any{hw}, func(rows *sql.Rows) error {
		d := &rollout.Device{HWClass: hw}
		var attrs string
		if err := rows.Scan(&d.ID, &d.Version, &attrs); err != nil {
			return err
		}
		json.Unmarshal([]byte(attrs), &d.Attributes)
		member[d.ID] = d
		out = append(out, d)
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	for _, l := range []struct {
		q   string
		tag bool
	}{{`SELECT device_id, grp FROM device_groups`, false}, {`SELECT device_id, tag FROM device_tags`, true}} {
		err := s.queryRows(ctx, l.q, nil, func(rows *sql.Rows) error {
			var id, v string
			if err := rows.Scan(&id, &v); err != nil {
				return err
			}
			if d := member[id]; d != nil && l.tag {
				d.Tags = append(d.Tags, v)
			} else if d != nil {
				d.Groups = append(d.Groups, v)
			}
			return nil
		})
		if err != nil {
			return nil, "", err
		}
	}
	var match []rollout.Device
	for _, d := range out {
		if r.Spec.Target.Matches(d) {
			match = append(match, *d)
		}
	}
	return match, version, nil
}

// CohortPending counts the devices of a phase's cohort that neither run
// the release nor have an outcome for it.
func (s *Store) CohortPending(ctx context.Context, r *rollout.Rollout, phase int) (int, error) {
	devs, version, err := s.targetDevices(ctx, r)
	if err != nil {
		return 0, err
	}
	return s.pendingIn(ctx, r, devs, version, phase)
}

// addStatus counts n attempts in status into st.
func addStatus(st *rollout.Stats, status string, n int) {
	st.Started += n
	switch status {
	case proto.StatusCommitted:
		st.Committed += n
	case proto.StatusFailed:
		st.Failed += n
	case proto.StatusRolledBack:
		st.RolledBack += n
	default:
		st.InProgress += n
	}
}

// CohortWaiting lists the devices of a phase's cohort that neither run
// the release nor have an outcome for it: those a notification should
// bring to check in.
func (s *Store) CohortWaiting(ctx context.Context, r *rollout.Rollout, phase int) ([]string, error) {
	devs, version, err := s.targetDevices(ctx, r)
	if err != nil {
		return nil, err
	}
	return s.waitingIn(ctx, r, devs, version, phase)
}

// waitingIn lists the devices of devs in a phase's cohort that neither run
// the release's version nor have an outcome for it.
func (s *Store) waitingIn(ctx context.Context, r *rollout.Rollout, devs []rollout.Device, version string, phase int) ([]string, error) {
	done := map[string]bool{}
	err := s.queryRows(ctx, `SELECT device_id FROM updates WHERE release_id = ? AND retired = 0 AND status IN ('committed', 'failed', 'rolled_back')`,
		[]any{r.Spec.Release}, func(rows *sql.Rows) error {
			var id string
			err := rows.Scan(&id)
			done[id] = true
			return err
		})
	var ids []string
	for _, d := range devs {
		if r.Spec.InPhase(phase, d.ID) && d.Version != version && !done[d.ID] {
			ids = append(ids, d.ID)
		}
	}
	return ids, err
}

func (s *Store) pendingIn(ctx context.Context, r *rollout.Rollout, devs []rollout.Device, version string, phase int) (int, error) {
	ids, err := s.waitingIn(ctx, r, devs, version, phase)
	return len(ids), err
}

// Offer finds what to offer a device. The newest active or paused rollout
// whose target includes the device, with a release for its hardware class,
// decides (older ones do not apply to it while that one lasts):
//
//   - an attempt in progress is offered again with the same ID, even when
//     the rollout is paused, so a device that restarted can finish;
//   - a finished attempt (committed, failed, rolled back) is not offered
//     again unless an operator retries it;
//   - otherwise the device starts if it does not run the release yet, the
//     rollout is active and past its start, the current phase's cohort
//     holds the device, its maintenance window is open in its local time,
//     and the rollout's limits allow one more start.
//
// Most check-ins are answered from memory; only a start writes.
func (s *Store) Offer(ctx context.Context, deviceID string, newID func() string) (*Update, *Release, bool, error) {
	st, err := s.deviceState(ctx, deviceID)
	switch {
	case err != nil:
		return nil, nil, false, err
	case !st.exists:
		return nil, nil, false, fmt.Errorf("device %s: %w", deviceID, ErrNotFound)
	}
	live, err := s.liveRollouts(ctx)
	if err != nil {
		return nil, nil, false, err
	}
	now := s.now()
	dev := rollout.Device{ID: deviceID, HWClass: st.hwClass, Version: st.version, Groups: st.groups, Tags: st.tags, Attributes: st.attributes, TimeZone: st.timeZone}
	// An attempt in progress, under any active or paused rollout, is
	// offered again first: the device may have restarted mid-update.
	for _, u := range st.updates {
		if proto.Final(u.status) {
			continue
		}
		for _, lr := range live {
			if lr.r.Spec.ID == u.rollout && lr.rel.ID == u.release {
				rel := lr.rel
				return &Update{ID: u.id, DeviceID: deviceID, RolloutID: u.rollout, ReleaseID: u.release, Status: u.status}, &rel, lr.r.Spec.Downgrade, nil
			}
		}
	}
	for _, lr := range live {
		r := &lr.r
		if lr.rel.HWClass != st.hwClass || !r.Spec.Target.Matches(&dev) {
			continue
		}
		if !r.Spec.Downgrade && olderThan(lr.rel, st) {
			continue // older than what it runs: this rollout is behind it
		}
		for _, u := range st.updates {
			if u.release != lr.rel.ID {
				continue
			}
			// Finished, or in progress under an aborted rollout (the device
			// goes on by its own rules, and that outcome is the aborted
			// rollout's): nothing new to offer.
			return nil, nil, false, nil
		}
		if st.version == lr.rel.Version || !r.Live(now) || !r.Spec.InPhase(r.Phase, deviceID) ||
			!r.Spec.Schedule.WindowOpen(st.timeZone, now, s.zones.Get) || s.Offerable != nil && !s.Offerable(&lr.rel) {
			return nil, nil, false, nil
		}
		return s.start(ctx, lr, deviceID, newID, now)
	}
	return nil, nil, false, nil
}

// olderThan says whether a release is older than what the device runs (a
// lower security counter, or a lower version): without the downgrade mark
// the device would refuse it.
func olderThan(rel Release, st devState) bool {
	if rel.SecurityCounter < st.securityCounter {
		return true
	}
	rv, err1 := image.ParseSemVer(rel.Version)
	dv, err2 := image.ParseSemVer(st.version)
	return err1 == nil && err2 == nil && rv.Compare(dv) < 0
}

// start offers a rollout's release to a device for the first time, within
// the rollout's limits. Starts are committed in groups (batch.go), one
// transaction after another, so the limits hold across them.
func (s *Store) start(ctx context.Context, lr *liveRollout, deviceID string, newID func() string, now time.Time) (*Update, *Release, bool, error) {
	req := &startReq{lr: lr, deviceID: deviceID, id: newID(), now: now, done: make(chan startResult, 1)}
	res, err := submit(ctx, s.quit, s.starts, req, req.done)
	if err == nil {
		err = res.err
	}
	if err != nil || res.up == nil {
		return nil, nil, false, err
	}
	rel := lr.rel
	return res.up, &rel, lr.r.Spec.Downgrade, nil
}

// startReq is one start waiting for the batch loop.
type startReq struct {
	lr       *liveRollout
	deviceID string
	id       string // the new update's
	now      time.Time
	done     chan startResult
}

// startResult is a start's outcome: up is nil when the rollout may not
// start the device now (paused meanwhile, a limit reached, or the device
// started by another request at the same time).
type startResult struct {
	up  *Update
	err error
}

// commitStarts writes a group of starts in one transaction. Each
// rollout's state and limits are read once, and each start counts
// against them.
func (s *Store) commitStarts(batch []*startReq) {
	ctx := context.Background()
	ups := make([]*Update, len(batch))
	type quota struct {
		active            bool
		phase             int
		starts, downloads int // started in the last minute; downloads in flight
	}
	err := s.writeTx(ctx, func(tx *sql.Tx) error { // new updates only: other devices' cached state stands
		quotas := map[string]*quota{}
		for i, req := range batch {
			r, now := &req.lr.r, req.now
			q := quotas[r.Spec.ID]
			if q == nil {
				q = &quota{}
				quotas[r.Spec.ID] = q
				var state string
				if err := tx.QueryRowContext(ctx, `SELECT state, phase FROM rollouts WHERE id = ?`, r.Spec.ID).Scan(&state, &q.phase); err != nil {
					return err
				}
				q.active = state == rollout.StateActive
				if r.Spec.Limits.StartsPerMinute > 0 {
					if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM updates WHERE rollout_id = ? AND created_at > ?`,
						r.Spec.ID, now.Unix()-60).Scan(&q.starts); err != nil {
						return err
					}
				}
				if r.Spec.Limits.MaxDownloads > 0 {
					if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM updates WHERE rollout_id = ? AND retired = 0 AND status IN ('offered', 'downloading') AND updated_at > ?`,
						r.Spec.ID, now.Add(-staleDownload).Unix()).Scan(&q.downloads); err != nil {
						return err
					}
				}
			}
			if !q.active || q.phase < r.Phase {
				continue // paused or aborted meanwhile
			}
			if lim := r.Spec.Limits.StartsPerMinute; lim > 0 && q.starts >= lim {
				continue
			}
			if lim := r.Spec.Limits.MaxDownloads; lim > 0 && q.downloads >= lim {
				continue
			}
			u := Update{ID: req.id, DeviceID: req.deviceID, RolloutID: r.Spec.ID, ReleaseID: req.lr.rel.ID, Status: StatusOffered, UpdatedAt: now}
			// A live attempt at the release exists already when the same
			// device started meanwhile (two requests at once): its next
			// check-in gets it.
			res, err := tx.ExecContext(ctx, `INSERT INTO updates (id, device_id, rollout_id, release_id, status, phase, created_at, updated_at)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`, u.ID, u.DeviceID, u.RolloutID, u.ReleaseID, u.Status, q.phase, now.Unix(), now.Unix())
			if err != nil {
				return err
			}
			if n, _ := res.RowsAffected(); n == 0 {
				continue
			}
			q.starts++
			q.downloads++
			ups[i] = &u
		}
		return nil
	})
	for i, req := range batch {
		s.forget(req.deviceID)
		if err != nil {
			req.done <- startResult{err: err}
		} else {
			req.done <- startResult{up: ups[i]}
		}
	}
}

// RolloutStatus is a rollout and how far it got.
type RolloutStatus struct {
	rollout.Rollout
	Release  Release         `json:"release"`
	Targeted int             `json:"targeted"` // devices the target includes now
	Pending  int             `json:"pending"`  // of those, neither on the release nor with an outcome
	Phases   []PhaseStatus   `json:"phases"`
	Totals   rollout.Stats   `json:"totals"`
	Health   rollout.Health  `json:"health"`
	Waiting  string          `json:"waiting,omitempty"` // why the current phase has not handed over yet
	Series   []SeriesPoint   `json:"series"`            // devices committed so far, over time
	Failures []FailureReason `json:"failures"`          // why devices failed or rolled back, grouped
	Events   []RolloutEvent  `json:"events"`
}

// PhaseStatus counts one phase's devices.
type PhaseStatus struct {
	Phase    int            `json:"phase"` // from 1
	Percent  float64        `json:"percent"`
	Cohort   int            `json:"cohort"` // devices of the target the phase reaches
	Stats    rollout.Stats  `json:"stats"`  // devices that started in this phase
	ByStatus map[string]int `json:"by_status"`
}

// SeriesPoint is the number of devices committed by a time.
type SeriesPoint struct {
	At        time.Time `json:"at"`
	Committed int       `json:"committed"`
}

// FailureReason is one reason and how many devices gave it.
type FailureReason struct {
	Reason  string `json:"reason"`
	Devices int    `json:"devices"`
}

// RolloutEvent is one step in a rollout's history.
type RolloutEvent struct {
	At     time.Time `json:"at"`
	Kind   string    `json:"kind"`
	Phase  int       `json:"phase"` // from 1
	Detail string    `json:"detail,omitempty"`
}

// RolloutStatus reports a rollout: counts per phase and state, health,
// devices committed over time, failure reasons and its history.
func (s *Store) RolloutStatus(ctx context.Context, id string) (*RolloutStatus, error) {
	r, err := s.GetRollout(ctx, id)
	if err != nil {
		return nil, err
	}
	now := s.now()
	out := &RolloutStatus{Rollout: *r, Series: []SeriesPoint{}, Failures: []FailureReason{}, Events: []RolloutEvent{}}
	var created int64
	if err := s.db.QueryRowContext(ctx, `SELECT id, version, hw_class, security_counter, key_epoch, sha256, length, created_at FROM releases WHERE id = ?`, r.Spec.Release).
		Scan(&out.Release.ID, &out.Release.Version, &out.Release.HWClass, &out.Release.SecurityCounter, &out.Release.KeyEpoch, &out.Release.SHA256, &out.Release.Length, &created); err != nil {
		return nil, err
	}
	out.Release.CreatedAt = time.Unix(created, 0)
	devs, _, err := s.targetDevices(ctx, r)
	if err != nil {
		return nil, err
	}
	out.Targeted = len(devs)
	last := len(r.Spec.Phases) - 1
	if out.Pending, err = s.pendingIn(ctx, r, devs, out.Release.Version, last); err != nil {
		return nil, err
	}
	byPhase := map[int]map[string]int{}
	err = s.queryRows(ctx, `SELECT phase, status, count(*) FROM updates WHERE rollout_id = ? AND retired = 0 GROUP BY phase, status`, []any{id}, func(rows *sql.Rows) error {
		var p, n int
		var status string
		if err := rows.Scan(&p, &status, &n); err != nil {
			return err
		}
		if byPhase[p] == nil {
			byPhase[p] = map[string]int{}
		}
		byPhase[p][status] = n
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i, p := range r.Spec.Phases {
		ps := PhaseStatus{Phase: i + 1, Percent: p.Percent, ByStatus: byPhase[i]}
		if ps.ByStatus == nil {
			ps.ByStatus = map[string]int{}
		}
		for _, d := range devs {
			if r.Spec.InPhase(i, d.ID) {
				ps.Cohort++
			}
		}
		if ps.Stats, err = s.Stats(ctx, id, i); err != nil {
			return nil, err
		}
		out.Phases = append(out.Phases, ps)
	}
	if out.Totals, err = s.Stats(ctx, id, -1); err != nil {
		return nil, err
	}
	if out.Health, err = s.Health(ctx, id, now, r.Spec.Phases[r.Phase].Gates); err != nil {
		return nil, err
	}
	if r.State == rollout.StateActive && !r.Final() {
		if !r.Live(now) {
			out.Waiting = "scheduled to start at " + r.Spec.Schedule.Start.UTC().Format(time.RFC3339)
		} else {
			mine := out.Phases[r.Phase].Stats
			out.Waiting, err = rollout.Ready(r.Spec.Phases[r.Phase], r.PhaseStartedAt, now, mine, func() (int, error) { return s.CohortPending(ctx, r, r.Phase) })
			if err != nil {
				return nil, err
			}
		}
	}
	var commits []int64
	reasons := map[string]int{}
	err = s.queryRows(ctx, `SELECT status, reason, updated_at FROM updates WHERE rollout_id = ? AND retired = 0 AND status IN ('committed', 'failed', 'rolled_back') ORDER BY updated_at`,
		[]any{id}, func(rows *sql.Rows) error {
			var status, reason string
			var at int64
			if err := rows.Scan(&status, &reason, &at); err != nil {
				return err
			}
			if status == proto.StatusCommitted {
				commits = append(commits, at)
				return nil
			}
			reason, _, _ = strings.Cut(reason, "\n")
			if len(reason) > 160 {
				reason = reason[:160]
			}
			if reason == "" {
				reason = "(no reason given)"
			}
			reasons[status+": "+reason]++
			return nil
		})
	if err != nil {
		return nil, err
	}
	out.Series = series(commits, r.StartedAt, now, 20)
	for k, n := range reasons {
		out.Failures = append(out.Failures, FailureReason{Reason: k, Devices: n})
	}
	sort.Slice(out.Failures, func(i, j int) bool {
		a, b := out.Failures[i], out.Failures[j]
		return a.Devices > b.Devices || a.Devices == b.Devices && a.Reason < b.Reason
	})
	err = s.queryRows(ctx, `SELECT at, kind, phase, detail FROM rollout_events WHERE rollout_id = ? ORDER BY seq`, []any{id}, func(rows *sql.Rows) error {
		var e RolloutEvent
		var at int64
		err := rows.Scan(&at, &e.Kind, &e.Phase, &e.Detail)
		e.At, e.Phase = time.Unix(at, 0), e.Phase+1
		out.Events = append(out.Events, e)
		return err
	})
	return out, err
}

// series buckets sorted commit times into at most n cumulative points
// from start to now.
func series(commits []int64, start, now time.Time, n int) []SeriesPoint {
	out := []SeriesPoint{}
	if start.IsZero() || !now.After(start) {
		return out
	}
	step := now.Sub(start) / time.Duration(n)
	if step < time.Second {
		step = time.Second
	}
	i := 0
	for t := start.Add(step); ; t = t.Add(step) {
		if t.After(now) {
			t = now
		}
		for i < len(commits) && commits[i] <= t.Unix() {
			i++
		}
		out = append(out, SeriesPoint{At: t, Committed: i})
		if !t.Before(now) {
			return out
		}
	}
}
