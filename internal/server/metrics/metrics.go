// Package metrics keeps the server's counters and latency histograms and
// writes them in the Prometheus text exposition format (version 0.0.4),
// with no dependency beyond the standard library.
package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Registry holds named metrics.
type Registry struct {
	mu       sync.Mutex
	counters map[string]*counterVec
	hists    map[string]*histVec
}

// New makes an empty registry.
func New() *Registry {
	return &Registry{counters: map[string]*counterVec{}, hists: map[string]*histVec{}}
}

type counterVec struct {
	help   string
	labels []string
	values map[string]float64 // by joined label values
}

type histVec struct {
	help    string
	labels  []string
	buckets []float64
	series  map[string]*hist
}

type hist struct {
	counts []uint64 // per bucket, cumulative at write time
	sum    float64
	n      uint64
}

// Counter declares a counter with label names.
func (r *Registry) Counter(name, help string, labels ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counters[name] = &counterVec{help: help, labels: labels, values: map[string]float64{}}
}

// Histogram declares a histogram with upper bucket bounds (seconds).
func (r *Registry) Histogram(name, help string, buckets []float64, labels ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hists[name] = &histVec{help: help, labels: labels, buckets: buckets, series: map[string]*hist{}}
}

// Add adds v to a counter's series.
func (r *Registry) Add(name string, v float64, labelValues ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.counters[name]
	if !ok {
		return
	}
	c.values[strings.Join(labelValues, "\x00")] += v
}

// Observe records a value in a histogram's series.
func (r *Registry) Observe(name string, v float64, labelValues ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	h, ok := r.hists[name]
	if !ok {
		return
	}
	key := strings.Join(labelValues, "\x00")
	s := h.series[key]
	if s == nil {
		s = &hist{counts: make([]uint64, len(h.buckets))}
		h.series[key] = s
	}
	for i, b := range h.buckets {
		if v <= b {
			s.counts[i]++
		}
	}
	s.sum += v
	s.n++
}

// Value reads a counter's series (for tests and status output).
func (r *Registry) Value(name string, labelValues ...string) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.counters[name]; ok {
		return c.values[strings.Join(labelValues, "\x00")]
	}
	return 0
}

func labelPairs(names []string, key string, extra ...string) string {
	var vals []string
	if key != "" || len(names) > 0 {
		vals = strings.Split(key, "\x00")
	}
	var parts []string
	for i, n := range names {
		v := ""
		if i < len(vals) {
			v = vals[i]
		}
		parts = append(parts, n+"="+strconv.Quote(v))
	}
	for i := 0; i+1 < len(extra); i += 2 {
		parts = append(parts, extra[i]+"="+strconv.Quote(extra[i+1]))
	}
	if len(parts) == 0 {
		return ""
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func formatFloat(v float64) string {
	if math.IsInf(v, 1) {
		return "+Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// WriteTo writes every metric in the text format.
func (r *Registry) WriteTo(w io.Writer) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for _, name := range sortedKeys(r.counters) {
		c := r.counters[name]
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s counter\n", name, c.help, name)
		if len(c.labels) == 0 && len(c.values) == 0 {
			fmt.Fprintf(&b, "%s 0\n", name)
		}
		for _, k := range sortedKeys(c.values) {
			fmt.Fprintf(&b, "%s%s %s\n", name, labelPairs(c.labels, k), formatFloat(c.values[k]))
		}
	}
	for _, name := range sortedKeys(r.hists) {
		h := r.hists[name]
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s histogram\n", name, h.help, name)
		for _, k := range sortedKeys(h.series) {
			s := h.series[k]
			for i, ub := range h.buckets {
				fmt.Fprintf(&b, "%s_bucket%s %d\n", name, labelPairs(h.labels, k, "le", formatFloat(ub)), s.counts[i])
			}
			fmt.Fprintf(&b, "%s_bucket%s %d\n", name, labelPairs(h.labels, k, "le", "+Inf"), s.n)
			fmt.Fprintf(&b, "%s_sum%s %s\n%s_count%s %d\n", name, labelPairs(h.labels, k), formatFloat(s.sum), name, labelPairs(h.labels, k), s.n)
		}
	}
	n, err := io.WriteString(w, b.String())
	return int64(n), err
}

// Handler serves the registry at /metrics.
func (r *Registry) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		r.WriteTo(w)
	})
}

// LatencyBuckets are request-latency bounds in seconds.
var LatencyBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// Since is the seconds elapsed since t, for Observe.
func Since(t time.Time) float64 { return time.Since(t).Seconds() }
