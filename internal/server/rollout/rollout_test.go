package rollout

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"
)

func spec(t *testing.T, js string) Spec {
	t.Helper()
	var s Spec
	if err := json.Unmarshal([]byte(js), &s); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestNormalizeFillsDefaultsAndRefuses(t *testing.T) {
	s := spec(t, `{"id": "r1", "release": "v2", "target": {"groups": ["lab"]}, "phases": [{"percent": 1, "soak": "1h"}, {"percent": 100}]}`)
	if err := s.Normalize(); err != nil {
		t.Fatal(err)
	}
	g := s.Phases[0].Gates
	if s.OnTrip != TripPause || *g.MaxFailureRate != DefaultMaxRate || *g.MinSample != DefaultMinSample || g.Silence.D() != DefaultSilence || s.Phases[0].Soak.D() != time.Hour {
		t.Fatalf("defaults: %+v %+v", s, g)
	}
	// What is stored reads back the same.
	b, _ := json.Marshal(s)
	again := spec(t, string(b))
	if err := again.Normalize(); err != nil {
		t.Fatal(err)
	}
	if b2, _ := json.Marshal(again); string(b2) != string(b) {
		t.Fatalf("not stable:\n%s\n%s", b, b2)
	}

	bad := map[string]string{
		"empty target":      `{"id": "r", "release": "v", "target": {}}`,
		"all and devices":   `{"id": "r", "release": "v", "target": {"all": true, "devices": ["d"]}}`,
		"bad id":            `{"id": "r/1", "release": "v", "target": {"all": true}}`,
		"bad group":         `{"id": "r", "release": "v", "target": {"groups": ["a b"]}}`,
		"zero percent":      `{"id": "r", "release": "v", "target": {"all": true}, "phases": [{"percent": 0}]}`,
		"over 100":          `{"id": "r", "release": "v", "target": {"all": true}, "phases": [{"percent": 101}]}`,
		"shrinking phase":   `{"id": "r", "release": "v", "target": {"all": true}, "phases": [{"percent": 10}, {"percent": 5}]}`,
		"rate above 1":      `{"id": "r", "release": "v", "target": {"all": true}, "phases": [{"percent": 10, "gates": {"max_failure_rate": 1.5}}]}`,
		"min sample 0":      `{"id": "r", "release": "v", "target": {"all": true}, "phases": [{"percent": 10, "gates": {"min_sample": 0}}]}`,
		"bad on_trip":       `{"id": "r", "release": "v", "target": {"all": true}, "on_trip": "explode"}`,
		"bad window":        `{"id": "r", "release": "v", "target": {"all": true}, "schedule": {"windows": [{"start": "25:00", "end": "01:00"}]}}`,
		"bad day":           `{"id": "r", "release": "v", "target": {"all": true}, "schedule": {"windows": [{"days": ["monday"], "start": "01:00", "end": "02:00"}]}}`,
		"bad zone":          `{"id": "r", "release": "v", "target": {"all": true}, "schedule": {"default_zone": "Mars/Olympus"}}`,
		"negative limit":    `{"id": "r", "release": "v", "target": {"all": true}, "limits": {"starts_per_minute": -1}}`,
		"negative soak":     `{"id": "r", "release": "v", "target": {"all": true}, "phases": [{"percent": 10, "soak": "-1h"}]}`,
		"empty window":      `{"id": "r", "release": "v", "target": {"all": true}, "schedule": {"windows": [{"start": "01:00", "end": "01:00"}]}}`,
		"too short silence": `{"id": "r", "release": "v", "target": {"all": true}, "phases": [{"percent": 10, "gates": {"silence": "1ms"}}]}`,
	}
	for name, js := range bad {
		s := spec(t, js)
		if err := s.Normalize(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestTargetMatches(t *testing.T) {
	d := &Device{ID: "lock-1", HWClass: "lock", Version: "1.0.0", Groups: []string{"eu"}, Tags: []string{"beta", "indoor"}, Attributes: map[string]string{"site": "berlin"}}
	cases := []struct {
		t    Target
		want bool
	}{
		{Target{All: true}, true},
		{Target{Devices: []string{"lock-1"}}, true},
		{Target{Devices: []string{"lock-2"}}, false},
		{Target{Groups: []string{"us", "eu"}}, true},
		{Target{Devices: []string{"lock-2"}, Groups: []string{"eu"}}, true}, // a union
		{Target{Groups: []string{"eu"}, Tags: []string{"beta"}}, true},
		{Target{Groups: []string{"eu"}, Tags: []string{"beta", "outdoor"}}, false}, // every tag
		{Target{HWClass: "gate"}, false},
		{Target{Versions: []string{"0.9.0", "1.0.0"}}, true},
		{Target{Versions: []string{"0.9.0"}}, false},
		{Target{Attributes: map[string]string{"site": "berlin"}}, true},
		{Target{Attributes: map[string]string{"site": "paris"}}, false},
		{Target{Attributes: map[string]string{"floor": ""}}, false}, // absent is not empty
	}
	for i, c := range cases {
		if got := c.t.Matches(d); got != c.want {
			t.Errorf("case %d %+v: %v, want %v", i, c.t, got, c.want)
		}
	}
}

// Cohorts are stable, spread evenly, differ between rollouts, and a phase
// only grows: a device in phase k is in every later phase.
func TestCohortsGrowAndSpread(t *testing.T) {
	s := Spec{ID: "r1", Phases: []Phase{{Percent: 1}, {Percent: 10}, {Percent: 50}, {Percent: 100}}}
	const n = 20000
	counts := make([]int, len(s.Phases))
	differ := 0
	for i := range n {
		id := fmt.Sprintf("dev-%d", i)
		if Cohort("r1", id) != Cohort("r1", id) {
			t.Fatal("cohort not stable")
		}
		if math.Abs(Cohort("r1", id)-Cohort("r2", id)) > 0.01 {
			differ++
		}
		in := false
		for k := range s.Phases {
			now := s.InPhase(k, id)
			if in && !now {
				t.Fatalf("%s left the rollout in phase %d", id, k+1)
			}
			in = now
			if now {
				counts[k]++
			}
		}
		if !in {
			t.Fatalf("%s not in the 100%% phase", id)
		}
	}
	for k, p := range s.Phases {
		want := p.Percent / 100 * n
		if d := math.Abs(float64(counts[k]) - want); d > 4*math.Sqrt(want)+1 {
			t.Errorf("phase %d: %d devices, want about %.0f", k+1, counts[k], want)
		}
	}
	if differ < n*9/10 {
		t.Errorf("cohorts of two rollouts nearly equal for %d of %d devices", n-differ, n)
	}
}

func TestWindowsInDeviceLocalTime(t *testing.T) {
	s := Schedule{Windows: []Window{{Start: "22:00", End: "05:00", Days: []string{"mon"}}, {Start: "12:00", End: "13:00"}}, DefaultZone: "Europe/Berlin"}
	if err := s.validate(); err != nil {
		t.Fatal(err)
	}
	var z Zones
	// Monday 2026-11-30 21:30 UTC is 22:30 in Berlin (open: Monday night)
	// and 13:30 in Los Angeles (closed: past the noon window).
	at := time.Date(2026, 11, 30, 21, 30, 0, 0, time.UTC)
	cases := []struct {
		tz   string
		at   time.Time
		want bool
	}{
		{"Europe/Berlin", at, true},
		{"America/Los_Angeles", at, false},
		{"", at, true},                                           // default zone: Berlin
		{"Not/AZone", at, true},                                  // unknown: default zone
		{"Asia/Tokyo", at, false},                                // Tuesday 06:30: after Monday night's window
		{"America/Los_Angeles", at.Add(-90 * time.Minute), true}, // 12:00 sharp: the noon window
		{"Europe/Berlin", at.Add(6 * time.Hour), true},           // Tuesday 04:30: still Monday night's window
		{"Europe/Berlin", at.Add(7 * time.Hour), false},          // Tuesday 05:30
		{"Europe/Berlin", at.Add(24 * time.Hour), false},         // Tuesday 22:30: the night window is Monday's only
	}
	for i, c := range cases {
		if got := s.WindowOpen(c.tz, c.at, z.Get); got != c.want {
			t.Errorf("case %d (%s at %v): %v, want %v", i, c.tz, c.at, got, c.want)
		}
	}
	if !(&Schedule{}).WindowOpen("Europe/Berlin", at, z.Get) {
		t.Error("no windows means always open")
	}
}

func gates(t *testing.T, js string) Gates {
	t.Helper()
	var g Gates
	if err := json.Unmarshal([]byte(js), &g); err != nil {
		t.Fatal(err)
	}
	if err := g.normalize(); err != nil {
		t.Fatal(err)
	}
	return g
}

func TestJudge(t *testing.T) {
	g := gates(t, `{"max_failure_rate": 0.1, "max_rollback_rate": 0.2, "max_unhealthy_rate": 0.1, "min_sample": 5}`)
	cases := []struct {
		st   Stats
		h    Health
		trip string // a word the reason must hold, or ""
	}{
		{Stats{Committed: 3, RolledBack: 1}, Health{}, ""},                                // below the sample: no judgement
		{Stats{Committed: 9, Failed: 1}, Health{}, ""},                                    // 10%: at the gate
		{Stats{Committed: 8, Failed: 2}, Health{}, "failure rate"},                        // 20%
		{Stats{Committed: 4, RolledBack: 2}, Health{}, "rollback rate"},                   // 33%
		{Stats{Committed: 40, InProgress: 100}, Health{Committed: 40, Silent: 5}, "soak"}, // 12.5% unhealthy
		{Stats{Committed: 40}, Health{Committed: 40, Silent: 2, Misbehaving: 2}, ""},      // 10%
		{Stats{Committed: 40}, Health{Committed: 40, Silent: 2, Misbehaving: 3}, "soak"},  // 12.5%
		{Stats{Committed: 4}, Health{Committed: 4, Silent: 4}, ""},                        // below the sample
	}
	for i, c := range cases {
		got := Judge(g, c.st, c.h)
		if (c.trip == "") != (got == "") || !strings.Contains(got, c.trip) {
			t.Errorf("case %d: %q, want %q", i, got, c.trip)
		}
	}
}

func TestReady(t *testing.T) {
	p := Phase{Percent: 10, Soak: Duration(time.Hour), Gates: gates(t, `{"min_sample": 3}`)}
	t0 := time.Unix(1_800_000_000, 0)
	none := func() (int, error) { return 0, nil }
	two := func() (int, error) { return 2, nil }
	cases := []struct {
		now     time.Time
		st      Stats
		pending func() (int, error)
		ready   bool
	}{
		{t0.Add(59 * time.Minute), Stats{Committed: 10}, none, false}, // soaking
		{t0.Add(time.Hour), Stats{Committed: 3}, two, true},           // enough outcomes
		{t0.Add(time.Hour), Stats{Committed: 2, InProgress: 1}, none, false},
		{t0.Add(time.Hour), Stats{Committed: 2}, two, false}, // cohort devices left
		{t0.Add(time.Hour), Stats{Committed: 2}, none, true}, // a cohort smaller than the sample, all done
	}
	for i, c := range cases {
		why, err := Ready(p, t0, c.now, c.st, c.pending)
		if err != nil || (why == "") != c.ready {
			t.Errorf("case %d: %q %v, want ready=%v", i, why, err, c.ready)
		}
	}
}
