package metrics

import (
	"bytes"
	"strings"
	"testing"
)

func TestExposition(t *testing.T) {
	r := New()
	r.Counter("fp_checkins_total", "Check-ins.")
	r.Counter("fp_reports_total", "Reports by status.", "status")
	r.Histogram("fp_latency_seconds", "Latency.", []float64{0.1, 1}, "api")
	r.Add("fp_checkins_total", 1)
	r.Add("fp_checkins_total", 2)
	r.Add("fp_reports_total", 1, "committed")
	r.Add("fp_reports_total", 1, `we"ird`)
	r.Observe("fp_latency_seconds", 0.05, "device")
	r.Observe("fp_latency_seconds", 0.5, "device")
	r.Observe("fp_latency_seconds", 3, "device")
	var b bytes.Buffer
	r.WriteTo(&b)
	out := b.String()
	for _, want := range []string{
		"# TYPE fp_checkins_total counter\nfp_checkins_total 3\n",
		`fp_reports_total{status="committed"} 1`,
		`fp_reports_total{status="we\"ird"} 1`,
		`fp_latency_seconds_bucket{api="device",le="0.1"} 1`,
		`fp_latency_seconds_bucket{api="device",le="1"} 2`,
		`fp_latency_seconds_bucket{api="device",le="+Inf"} 3`,
		`fp_latency_seconds_sum{api="device"} 3.55`,
		`fp_latency_seconds_count{api="device"} 3`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("exposition lacks %q:\n%s", want, out)
		}
	}
	if r.Value("fp_reports_total", "committed") != 1 {
		t.Error("Value")
	}
}
