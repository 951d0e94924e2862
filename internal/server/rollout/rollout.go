// Package rollout is the logic of staged rollouts, with no I/O and no
// clock of its own: what a rollout is (Spec), which devices it aims at
// (Target), which of them each phase reaches (Cohort), when a device may
// start (maintenance windows), and what the gates decide from counts of
// devices (Judge, Ready). The store keeps rollouts and counts devices; the
// Engine (engine.go) applies the decisions on a clock it is given.
//
// A rollout is a release, a target, phases, a schedule and limits:
//
//	target     devices, groups, tags, hardware class, current versions,
//	           reported attributes (all given criteria must hold)
//	phases     cumulative percentages of the target (1, 10, 50, 100), each
//	           with a soak time and gates
//	schedule   a start time; maintenance windows in each device's local time
//	limits     devices started per minute, concurrent downloads
//
// A device belongs to phase k's cohort when its cohort fraction, a hash of
// the rollout ID and the device ID, is below phase k's percentage. The hash
// never changes and percentages never decrease, so a phase only grows and a
// device's membership never flips.
package rollout

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	_ "time/tzdata" // zones for maintenance windows, also on hosts without zoneinfo

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// States of a rollout.
const (
	StateCreated = "created" // defined, not started: offers nothing
	StateActive  = "active"  // offering, phases advancing (after the schedule's start)
	StatePaused  = "paused"  // by an operator or a gate: devices not yet started wait
	StateAborted = "aborted" // for good: devices not yet started are never offered it
)

// Trip actions.
const (
	TripPause = "pause"
	TripAbort = "abort"
)

// Spec is a rollout as an operator defines it. Fields left out get the
// defaults that Normalize fills in, so a stored spec always says exactly
// what it does.
type Spec struct {
	ID      string `json:"id"`
	Release string `json:"release"`
	Target  Target `json:"target"`
	// Phases, in order; percentages are cumulative and never decrease, and
	// the last is usually 100. Default: one phase at 100%.
	Phases []Phase `json:"phases,omitempty"`
	// OnTrip is what a tripped gate does: "pause" (default) or "abort".
	OnTrip   string   `json:"on_trip,omitempty"`
	Schedule Schedule `json:"schedule,omitzero"`
	Limits   Limits   `json:"limits,omitzero"`
	// Downgrade marks a deliberate move to an older version.
	Downgrade bool `json:"downgrade,omitempty"`
}

// Target says which devices a rollout is for. Every criterion given must
// hold; devices and groups together are a union (a listed device or a
// member of a listed group). A device that comes to match later (it joins
// a group, reports an attribute) is picked up at its next check-in.
type Target struct {
	All        bool              `json:"all,omitempty"` // the whole fleet; required when nothing else is given
	Devices    []string          `json:"devices,omitempty"`
	Groups     []string          `json:"groups,omitempty"`
	Tags       []string          `json:"tags,omitempty"`     // the device has every one
	HWClass    string            `json:"hw_class,omitempty"` // as well as the release's, which always applies
	Versions   []string          `json:"versions,omitempty"` // runs one of these now
	Attributes map[string]string `json:"attributes,omitempty"`
}

// Phase is one wave of a rollout.
type Phase struct {
	Percent float64  `json:"percent"` // of the target, cumulative: 0 < percent <= 100
	Soak    Duration `json:"soak"`    // least time in this phase before the next starts
	Gates   Gates    `json:"gates"`
}

// Gates stop a rollout that goes wrong. They count devices, not attempts
// (a device retried counts by its latest attempt), and judge only once
// MinSample devices have an outcome (for the failure and rollback rates)
// or have committed (for health). A rate of 1 never trips.
type Gates struct {
	MaxFailureRate  *float64 `json:"max_failure_rate,omitempty"`  // failed / devices with an outcome; default 0.05
	MaxRollbackRate *float64 `json:"max_rollback_rate,omitempty"` // rolled back / devices with an outcome; default 0.05
	MinSample       *int     `json:"min_sample,omitempty"`        // default 10
	// MaxUnhealthyRate is the soak gate: unhealthy / committed devices
	// still on the release; default 0.05. A committed device is unhealthy
	// when it has not checked in for Silence, or when its watchdog resets
	// or crashes since it started the new version exceed what its rate on
	// the old version gives for the same time by more than HealthSlack.
	MaxUnhealthyRate *float64  `json:"max_unhealthy_rate,omitempty"`
	Silence          *Duration `json:"silence,omitempty"`      // default 1h
	HealthSlack      *int      `json:"health_slack,omitempty"` // default 1
}

// Schedule says when devices may start.
type Schedule struct {
	// Start: no device starts before it (RFC 3339); default: when started.
	Start time.Time `json:"start,omitzero"`
	// Windows: devices start only inside one of them, in their own local
	// time (the IANA zone they report; DefaultZone for those that report
	// none). No windows: any time. A device that has started finishes
	// whatever the time.
	Windows     []Window `json:"windows,omitempty"`
	DefaultZone string   `json:"default_zone,omitempty"` // default UTC
}

// Window is a daily maintenance window in device-local time. An End before
// Start runs past midnight (22:00 to 05:00); Days names the days it opens
// on (mon..sun), every day if empty.
type Window struct {
	Days  []string `json:"days,omitempty"`
	Start string   `json:"start"` // HH:MM
	End   string   `json:"end"`   // HH:MM
}

// Limits pace a rollout. Zero means no limit.
type Limits struct {
	StartsPerMinute int `json:"starts_per_minute,omitempty"` // devices offered the release for the first time, per minute
	MaxDownloads    int `json:"max_downloads,omitempty"`     // devices offered or downloading at once
}

// Duration is a time.Duration written as "90s", "1h30m" in JSON.
type Duration time.Duration

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads "1h30m"; a bare number is refused (seconds or
// nanoseconds? the string says).
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("a duration is a string such as \"1h30m\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: %v", s, err)
	}
	*d = Duration(v)
	return nil
}

// D is the duration as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Defaults of the gates.
const (
	DefaultMaxRate     = 0.05
	DefaultMinSample   = 10
	DefaultSilence     = time.Hour
	DefaultHealthSlack = 1
)

// Limits on a spec's size.
const (
	MaxPhases  = 20
	MaxListLen = 1000
	MaxWindows = 20
)

var days = []string{"sun", "mon", "tue", "wed", "thu", "fri", "sat"}

// Normalize checks a spec and fills in every default, so that what is
// stored says everything. It returns the first problem found.
func (s *Spec) Normalize() error {
	if err := proto.ValidID("rollout id", s.ID); err != nil {
		return err
	}
	if err := proto.ValidID("release", s.Release); err != nil {
		return err
	}
	if err := s.Target.validate(); err != nil {
		return fmt.Errorf("target: %w", err)
	}
	if len(s.Phases) == 0 {
		s.Phases = []Phase{{Percent: 100}}
	}
	if len(s.Phases) > MaxPhases {
		return fmt.Errorf("phases: at most %d", MaxPhases)
	}
	prev := 0.0
	for i := range s.Phases {
		p := &s.Phases[i]
		if math.IsNaN(p.Percent) || p.Percent <= 0 || p.Percent > 100 {
			return fmt.Errorf("phase %d: percent %v: want more than 0 and at most 100", i+1, p.Percent)
		}
		if p.Percent < prev {
			return fmt.Errorf("phase %d: percent %v is below phase %d's %v: a phase never shrinks", i+1, p.Percent, i, prev)
		}
		prev = p.Percent
		if p.Soak < 0 {
			return fmt.Errorf("phase %d: negative soak", i+1)
		}
		if err := p.Gates.normalize(); err != nil {
			return fmt.Errorf("phase %d: %w", i+1, err)
		}
	}
	switch s.OnTrip {
	case "":
		s.OnTrip = TripPause
	case TripPause, TripAbort:
	default:
		return fmt.Errorf("on_trip %q: want pause or abort", s.OnTrip)
	}
	if err := s.Schedule.validate(); err != nil {
		return fmt.Errorf("schedule: %w", err)
	}
	if s.Limits.StartsPerMinute < 0 || s.Limits.MaxDownloads < 0 {
		return errors.New("limits: negative")
	}
	return nil
}

func (t *Target) validate() error {
	if !t.All && len(t.Devices) == 0 && len(t.Groups) == 0 && len(t.Tags) == 0 && t.HWClass == "" && len(t.Versions) == 0 && len(t.Attributes) == 0 {
		return errors.New(`empty: name devices, groups, tags, a hardware class, versions or attributes, or say "all": true`)
	}
	if t.All && (len(t.Devices) > 0 || len(t.Groups) > 0) {
		return errors.New(`"all" with devices or groups: give one or the other`)
	}
	for _, l := range []struct {
		what string
		ids  []string
	}{{"device", t.Devices}, {"group", t.Groups}, {"tag", t.Tags}} {
		if len(l.ids) > MaxListLen {
			return fmt.Errorf("more than %d %ss", MaxListLen, l.what)
		}
		for _, id := range l.ids {
			if err := proto.ValidID(l.what, id); err != nil {
				return err
			}
		}
	}
	if len(t.Versions) > MaxListLen || len(t.Attributes) > proto.MaxAttributes {
		return errors.New("too many versions or attributes")
	}
	for _, v := range append([]string{t.HWClass}, t.Versions...) {
		if len(v) > proto.MaxAttrLen {
			return fmt.Errorf("%q: too long", v)
		}
	}
	for k, v := range t.Attributes {
		if k == "" || len(k) > proto.MaxAttrLen || len(v) > proto.MaxAttrLen {
			return fmt.Errorf("attribute %q: empty or too long", k)
		}
	}
	return nil
}

func (g *Gates) normalize() error {
	for _, r := range []struct {
		name string
		p    **float64
	}{{"max_failure_rate", &g.MaxFailureRate}, {"max_rollback_rate", &g.MaxRollbackRate}, {"max_unhealthy_rate", &g.MaxUnhealthyRate}} {
		if *r.p == nil {
			v := DefaultMaxRate
			*r.p = &v
		}
		if v := **r.p; math.IsNaN(v) || v < 0 || v > 1 {
			return fmt.Errorf("%s %v: want 0 to 1", r.name, v)
		}
	}
	if g.MinSample == nil {
		v := DefaultMinSample
		g.MinSample = &v
	}
	if *g.MinSample < 1 {
		return fmt.Errorf("min_sample %d: want at least 1", *g.MinSample)
	}
	if g.Silence == nil {
		v := Duration(DefaultSilence)
		g.Silence = &v
	}
	if *g.Silence < Duration(time.Second) {
		return fmt.Errorf("silence %v: want at least 1s", g.Silence.D())
	}
	if g.HealthSlack == nil {
		v := DefaultHealthSlack
		g.HealthSlack = &v
	}
	if *g.HealthSlack < 0 {
		return errors.New("health_slack: negative")
	}
	return nil
}

func (s *Schedule) validate() error {
	if s.DefaultZone != "" {
		if _, err := time.LoadLocation(s.DefaultZone); err != nil {
			return fmt.Errorf("default_zone %q: %v", s.DefaultZone, err)
		}
	}
	if len(s.Windows) > MaxWindows {
		return fmt.Errorf("more than %d windows", MaxWindows)
	}
	for i, w := range s.Windows {
		if _, err := clock(w.Start); err != nil {
			return fmt.Errorf("window %d: start: %w", i+1, err)
		}
		if _, err := clock(w.End); err != nil {
			return fmt.Errorf("window %d: end: %w", i+1, err)
		}
		if w.Start == w.End {
			return fmt.Errorf("window %d: starts and ends at %s", i+1, w.Start)
		}
		for _, d := range w.Days {
			if !slices.Contains(days, d) {
				return fmt.Errorf("window %d: day %q: want one of %s", i+1, d, strings.Join(days, ", "))
			}
		}
	}
	return nil
}

// clock parses "HH:MM" into minutes after midnight.
func clock(s string) (int, error) {
	h, m, ok := strings.Cut(s, ":")
	hh, err1 := strconv.Atoi(h)
	mm, err2 := strconv.Atoi(m)
	if !ok || len(h) != 2 || len(m) != 2 || err1 != nil || err2 != nil || hh > 23 || mm > 59 || hh < 0 || mm < 0 {
		return 0, fmt.Errorf("%q: want HH:MM", s)
	}
	return hh*60 + mm, nil
}

// Device is what a target and a window look at.
type Device struct {
	ID         string
	HWClass    string
	Version    string
	Groups     []string
	Tags       []string
	Attributes map[string]string
	TimeZone   string
}

// Matches says whether the target includes the device.
func (t *Target) Matches(d *Device) bool {
	if len(t.Devices) > 0 || len(t.Groups) > 0 {
		in := slices.Contains(t.Devices, d.ID)
		for _, g := range t.Groups {
			in = in || slices.Contains(d.Groups, g)
		}
		if !in {
			return false
		}
	}
	for _, tag := range t.Tags {
		if !slices.Contains(d.Tags, tag) {
			return false
		}
	}
	if t.HWClass != "" && t.HWClass != d.HWClass {
		return false
	}
	if len(t.Versions) > 0 && !slices.Contains(t.Versions, d.Version) {
		return false
	}
	for k, v := range t.Attributes {
		if got, ok := d.Attributes[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Cohort is a device's place in a rollout: a number in [0, 1) from a hash
// of the rollout ID and the device ID. Phase k reaches the device when
// Cohort < percent_k / 100.
func Cohort(rolloutID, deviceID string) float64 {
	h := sha256.Sum256([]byte(rolloutID + "\x00" + deviceID))
	return float64(binary.BigEndian.Uint64(h[:8])>>11) / (1 << 53)
}

// InPhase says whether phase (0-based) of the spec reaches the device.
func (s *Spec) InPhase(phase int, deviceID string) bool {
	if phase < 0 || phase >= len(s.Phases) {
		return false
	}
	return Cohort(s.ID, deviceID) < s.Phases[phase].Percent/100
}

// WindowOpen says whether a device whose zone is tz may start at now.
// Unknown zones fall back to the schedule's default zone.
func (s *Schedule) WindowOpen(tz string, now time.Time, zones func(string) *time.Location) bool {
	if len(s.Windows) == 0 {
		return true
	}
	loc := zones(tz)
	if loc == nil {
		loc = zones(s.DefaultZone)
	}
	if loc == nil {
		loc = time.UTC
	}
	local := now.In(loc)
	mins := local.Hour()*60 + local.Minute()
	today := days[local.Weekday()]
	yesterday := days[(local.Weekday()+6)%7]
	for _, w := range s.Windows {
		start, _ := clock(w.Start)
		end, _ := clock(w.End)
		on := func(day string) bool { return len(w.Days) == 0 || slices.Contains(w.Days, day) }
		if start < end {
			if on(today) && mins >= start && mins < end {
				return true
			}
			continue
		}
		// Past midnight: the evening part opens on its day, the morning part
		// belongs to the day before.
		if (on(today) && mins >= start) || (on(yesterday) && mins < end) {
			return true
		}
	}
	return false
}

// Zones resolves IANA zone names once each (unknown ones too, up to a
// bound, so devices sending nonsense cost nothing); "" and unknown names
// give nil. The zero value is ready to use.
type Zones struct {
	mu sync.Mutex
	m  map[string]*time.Location
}

// Get resolves a zone name.
func (z *Zones) Get(name string) *time.Location {
	if name == "" {
		return nil
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	if loc, ok := z.m[name]; ok {
		return loc
	}
	loc, err := time.LoadLocation(name)
	if err != nil || name == "Local" {
		loc = nil
	}
	if z.m == nil || len(z.m) >= 10000 {
		z.m = map[string]*time.Location{}
	}
	z.m[name] = loc
	return loc
}

// Stats are counts of devices (each by its latest attempt) in a rollout.
type Stats struct {
	Started    int `json:"started"`     // offered at least once
	InProgress int `json:"in_progress"` // offered, downloading, installing, rebooting
	Committed  int `json:"committed"`
	Failed     int `json:"failed"`
	RolledBack int `json:"rolled_back"`
}

// Outcomes is the devices with a final outcome.
func (s Stats) Outcomes() int { return s.Committed + s.Failed + s.RolledBack }

// Health counts committed devices still on the release, and those of them
// that are unhealthy.
type Health struct {
	Committed   int `json:"committed"`
	Silent      int `json:"silent"`      // not seen for the gate's silence
	Misbehaving int `json:"misbehaving"` // watchdog resets or crashes above their old rate
}

// Unhealthy is silent plus misbehaving devices.
func (h Health) Unhealthy() int { return h.Silent + h.Misbehaving }

// Judge applies a phase's gates to the rollout's counts so far; it returns
// why a gate trips, or "".
func Judge(g Gates, st Stats, h Health) string {
	min := *g.MinSample
	if n := st.Outcomes(); n >= min && n > 0 {
		if r := float64(st.Failed) / float64(n); r > *g.MaxFailureRate {
			return fmt.Sprintf("failure rate %.1f%% (%d of %d devices) above the gate's %.1f%%", 100*r, st.Failed, n, 100**g.MaxFailureRate)
		}
		if r := float64(st.RolledBack) / float64(n); r > *g.MaxRollbackRate {
			return fmt.Sprintf("rollback rate %.1f%% (%d of %d devices) above the gate's %.1f%%", 100*r, st.RolledBack, n, 100**g.MaxRollbackRate)
		}
	}
	if h.Committed >= min && h.Committed > 0 {
		if r := float64(h.Unhealthy()) / float64(h.Committed); r > *g.MaxUnhealthyRate {
			return fmt.Sprintf("soak: %.1f%% of committed devices unhealthy (%d silent, %d with more resets or crashes, of %d) above the gate's %.1f%%",
				100*r, h.Silent, h.Misbehaving, h.Committed, 100**g.MaxUnhealthyRate)
		}
	}
	return ""
}

// Ready says whether a phase that has soaked long enough may hand over to
// the next: its own devices gave at least MinSample outcomes, or none of
// them is still in progress and every device of its cohort is done
// (cohortPending counts those not yet up to date and without an outcome;
// it is asked for only when needed). It returns why not, or "".
func Ready(p Phase, since, now time.Time, phase Stats, cohortPending func() (int, error)) (string, error) {
	if left := since.Add(p.Soak.D()).Sub(now); left > 0 {
		return fmt.Sprintf("soaking, %v left", left.Round(time.Second)), nil
	}
	if phase.Outcomes() >= *p.Gates.MinSample {
		return "", nil
	}
	if phase.InProgress > 0 {
		return fmt.Sprintf("%d of the phase's devices in progress, %d outcomes of the %d the gates need", phase.InProgress, phase.Outcomes(), *p.Gates.MinSample), nil
	}
	n, err := cohortPending()
	if err != nil {
		return "", err
	}
	if n > 0 {
		return fmt.Sprintf("%d outcomes of the %d the gates need; %d devices of the phase not updated yet (offline, or outside their window)", phase.Outcomes(), *p.Gates.MinSample, n), nil
	}
	return "", nil
}
