package fleet

import (
	"errors"
	"math"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Stats are the fleet's counters.
type Stats struct {
	boots, reboots, crashes, bricked, offers atomic.Int64
	misbehaving, offline, drops, stalls      atomic.Int64
	resumes, received                        atomic.Int64
	checkIns, checkInErrors                  atomic.Int64
	resumed, fullHandshakes                  atomic.Int64

	mu       sync.Mutex
	errKinds map[string]int
	cuts     map[string]int
	outcomes map[string]int
	latency  [latencyBuckets]int64
}

func (s *Stats) init() {
	s.cuts = map[string]int{}
	s.errKinds = map[string]int{}
	s.outcomes = map[string]int{}
}

func (s *Stats) cut(area string) {
	s.mu.Lock()
	s.cuts[area]++
	s.mu.Unlock()
}

func (s *Stats) outcome(status string) {
	s.mu.Lock()
	s.outcomes[status]++
	s.mu.Unlock()
}

// Check-in latencies go into buckets 5% apart from 100 µs up.
const (
	latencyBuckets = 300
	latencyBase    = 100 * time.Microsecond
	latencyStep    = 1.05
)

func (s *Stats) checkIn(d time.Duration, err error) {
	s.checkIns.Add(1)
	if err != nil {
		s.checkInErrors.Add(1)
		s.mu.Lock()
		s.errKinds[errorKind(err)]++
		s.mu.Unlock()
		return
	}
	i := 0
	if d > latencyBase {
		i = min(int(math.Log(float64(d)/float64(latencyBase))/math.Log(latencyStep))+1, latencyBuckets-1)
	}
	s.mu.Lock()
	s.latency[i]++
	s.mu.Unlock()
}

// ResetLatency forgets the check-in latencies and errors measured so far
// (to measure one stretch of a run).
func (f *Fleet) ResetLatency() {
	s := &f.stats
	s.mu.Lock()
	s.latency = [latencyBuckets]int64{}
	clear(s.errKinds)
	s.mu.Unlock()
	s.checkIns.Store(0)
	s.checkInErrors.Store(0)
}

// quantile of the check-in latencies (the upper edge of its bucket).
func (s *Stats) quantile(q float64) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var total int64
	for _, n := range s.latency {
		total += n
	}
	if total == 0 {
		return 0
	}
	want := int64(math.Ceil(q * float64(total)))
	var seen int64
	for i, n := range s.latency {
		seen += n
		if seen >= want {
			return time.Duration(float64(latencyBase) * math.Pow(latencyStep, float64(i)))
		}
	}
	return 0
}

// Faults counted: what was injected and took effect.
type FaultCounts struct {
	PowerCuts       int            `json:"power_cuts"`
	CutsInSlotOrEnv int            `json:"power_cuts_in_slot_or_env_writes"`
	CutsByArea      map[string]int `json:"power_cuts_by_area"`
	Drops           int64          `json:"links_dropped"`
	Stalls          int64          `json:"links_stalled"`
	Offline         int64          `json:"devices_offline"`
	Slow            int64          `json:"devices_on_slow_links"`
	Misbehaving     int64          `json:"devices_misbehaving"`
}

// Snapshot is the fleet at one moment.
type Snapshot struct {
	Elapsed       time.Duration    `json:"elapsed_ns"`
	Devices       int              `json:"devices"`
	Versions      map[string]int   `json:"versions"`
	Updating      int              `json:"updating"` // devices with an update in progress
	Phases        map[string]int   `json:"phases"`
	Bricked       int              `json:"bricked"`
	Boots         int64            `json:"boots"`
	Reboots       int64            `json:"reboots"`
	Crashes       int64            `json:"crashes"`
	Offers        int64            `json:"offers"`
	Outcomes      map[string]int   `json:"outcomes"`
	Faults        FaultCounts      `json:"faults"`
	CheckIns      int64            `json:"check_ins"`
	CheckInErrors int64            `json:"check_in_errors"`
	P50, P99      time.Duration    `json:"-"`
	Received      int64            `json:"bytes_received"`
	Resumes       int64            `json:"downloads_resumed"`
	Latency       map[string]int64 `json:"check_in_latency_us"`
	Errors        map[string]int   `json:"check_in_errors_by_kind"`
	// TLS connections that resumed a session, and those that could not.
	Resumed        int64 `json:"tls_resumed"`
	FullHandshakes int64 `json:"tls_full_handshakes"`
}

// Snapshot reads the fleet's state and counters now.
func (f *Fleet) Snapshot() Snapshot {
	s := &f.stats
	sn := Snapshot{Elapsed: time.Since(f.start), Devices: len(f.devs), Versions: map[string]int{}, Phases: map[string]int{},
		Boots: s.boots.Load(), Reboots: s.reboots.Load(), Crashes: s.crashes.Load(), Offers: s.offers.Load(),
		CheckIns: s.checkIns.Load(), CheckInErrors: s.checkInErrors.Load(), Received: s.received.Load(), Resumes: s.resumes.Load(),
		Bricked: int(s.bricked.Load()), Resumed: s.resumed.Load(), FullHandshakes: s.fullHandshakes.Load()}
	var slow int64
	for _, d := range f.devs {
		sn.Versions[d.Version()]++
		if p := d.phase.Load(); p != nil && *p != "" && *p != "idle" {
			sn.Updating++
			sn.Phases[*p]++
		}
		if d.slow.Load() {
			slow++
		}
	}
	sn.Faults = FaultCounts{Drops: s.drops.Load(), Stalls: s.stalls.Load(), Offline: s.offline.Load(), Slow: slow,
		Misbehaving: s.misbehaving.Load(), CutsByArea: map[string]int{}}
	s.mu.Lock()
	for a, n := range s.cuts {
		sn.Faults.CutsByArea[a] = n
		sn.Faults.PowerCuts += n
		if strings.HasPrefix(a, "slot-") || a == "env" {
			sn.Faults.CutsInSlotOrEnv += n
		}
	}
	sn.Errors = map[string]int{}
	for k, v := range s.errKinds {
		sn.Errors[k] = v
	}
	sn.Outcomes = map[string]int{}
	for k, v := range s.outcomes {
		sn.Outcomes[k] = v
	}
	s.mu.Unlock()
	sn.P50, sn.P99 = s.quantile(0.5), s.quantile(0.99)
	sn.Latency = map[string]int64{"p50": sn.P50.Microseconds(), "p99": sn.P99.Microseconds()}
	return sn
}

// Share is the fraction of the fleet running version.
func (s Snapshot) Share(version string) float64 {
	if s.Devices == 0 {
		return 0
	}
	return float64(s.Versions[version]) / float64(s.Devices)
}

// VersionList is the versions seen, most devices first.
func (s Snapshot) VersionList() []string {
	var vs []string
	for v := range s.Versions {
		vs = append(vs, v)
	}
	sort.Slice(vs, func(i, j int) bool {
		if s.Versions[vs[i]] != s.Versions[vs[j]] {
			return s.Versions[vs[i]] > s.Versions[vs[j]]
		}
		return vs[i] < vs[j]
	})
	return vs
}

// Committed is how many updates were reported committed.
func (s Snapshot) Committed() int { return s.Outcomes[proto.StatusCommitted] }

// RolledBack is how many updates were reported rolled back.
func (s Snapshot) RolledBack() int { return s.Outcomes[proto.StatusRolledBack] }

// BusyKind is the error kind of a 503 answer (the server pacing its load;
// the device comes back after its Retry-After).
const BusyKind = "busy (503)"

// errorKind names a failed check-in's cause for the counters.
func errorKind(err error) string {
	var busy interface{ Retry() time.Duration }
	var ne net.Error
	msg := err.Error()
	switch {
	case errors.As(err, &busy):
		return BusyKind
	case errors.Is(err, errLinkDown):
		return "offline (simulated)"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case strings.Contains(msg, "connection refused"):
		return "connection refused"
	case strings.Contains(msg, "connection reset"):
		return "connection reset"
	case strings.Contains(msg, "broken pipe"):
		return "broken pipe"
	case strings.Contains(msg, "EOF"):
		return "EOF"
	}
	if len(msg) > 80 {
		msg = msg[:80]
	}
	return msg
}
