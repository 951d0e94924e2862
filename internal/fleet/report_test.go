package fleet

import (
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/link"
)

func TestCharts(t *testing.T) {
	var pts []Point
	for i := 0; i <= 100; i++ { // 0% for 50 s, then up to 100% at 100 s
		share := max(0, float64(i-50)/50)
		pts = append(pts, Point{T: time.Duration(i) * time.Second, Share: share})
	}
	if d, ok := TimeTo(pts, 0.94); !ok || d != 97*time.Second {
		t.Fatalf("time to 94%%: %v %v", d, ok)
	}
	if _, ok := TimeTo(pts[:60], 0.94); ok {
		t.Fatal("94% reached in a series that stops at 20%")
	}
	chart := ASCIIChart(pts, 40, 10)
	rows := strings.Split(chart, "\n")
	top, bottom := rows[0], rows[9]
	if !strings.HasPrefix(top, "100% |") || !strings.HasSuffix(top, "#") || strings.Contains(top[:26], "#") {
		t.Fatalf("top row %q", top)
	}
	if !strings.Contains(bottom, "#") || strings.Contains(bottom[6:20], "#") {
		t.Fatalf("bottom row %q: the first half of the run is 0%%", bottom)
	}
	if !strings.Contains(chart, "100s") {
		t.Fatalf("no time axis:\n%s", chart)
	}
	svg := string(SVGChart("a <b> & c", pts, []Mark{{T: 50 * time.Second, Label: "phase 2"}}))
	if !strings.Contains(svg, "a &lt;b&gt; &amp; c") || strings.Count(svg, ",") < 101 || !strings.Contains(svg, "phase 2") || !strings.HasSuffix(svg, "</svg>\n") {
		t.Fatalf("svg:\n%s", svg)
	}
	if b := Bar(0.5, 10); b != "[#####-----]" {
		t.Fatalf("bar %q", b)
	}
	if b := Bar(2, 4); b != "[####]" {
		t.Fatalf("bar past 100%%: %q", b)
	}
}

func TestErrorKinds(t *testing.T) {
	for err, want := range map[error]string{
		&link.BusyError{RetryAfter: time.Second}:   BusyKind,
		&busyError{err: errors.New("x"), retry: 1}: BusyKind,
		errLinkDown: "offline (simulated)",
		errors.New("dial tcp: connection refused"): "connection refused",
		errors.New(`Post "https://127.0.0.1:46227/api/v1/checkin": write tcp 127.1.0.109:36637->127.0.0.1:46227: write: broken pipe`): "broken pipe",
		errors.New(strings.Repeat("very long ", 20)): strings.Repeat("very long ", 20)[:80],
	} {
		if got := errorKind(err); got != want {
			t.Errorf("%v: kind %q, want %q", err, got, want)
		}
	}
}

// Device-level faults mark an exact share of the fleet, so a small fleet
// cannot draw none of a rare fault.
func TestShareIsExact(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		n    int
		p    float64
		want []int // acceptable counts
	}{{200, 1, []int{2}}, {200, 5, []int{10}}, {2000, 25, []int{500}}, {50, 1, []int{0, 1}}, {10, 0, []int{0}}, {10, 150, []int{10}}} {
		for range 20 {
			got := 0
			for _, m := range share(rng, c.n, c.p) {
				if m {
					got++
				}
			}
			if !slices.Contains(c.want, got) {
				t.Fatalf("share(%d, %.0f%%) marked %d, want one of %v", c.n, c.p, got, c.want)
			}
		}
	}
}
