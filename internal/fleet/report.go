package fleet

import (
	"fmt"
	"html"
	"strings"
	"time"
)

// Point is the share of the fleet patched at a moment of a run.
type Point struct {
	T     time.Duration `json:"t_ns"`
	Share float64       `json:"share"`
}

// Mark is an event on a chart's time axis.
type Mark struct {
	T     time.Duration
	Label string
}

// Bar is a progress bar of width cells for a fraction.
func Bar(frac float64, width int) string {
	frac = max(0, min(frac, 1))
	n := int(frac*float64(width) + 0.5)
	return "[" + strings.Repeat("#", n) + strings.Repeat("-", width-n) + "]"
}

// TimeTo is when the share first reached target (false: never).
func TimeTo(pts []Point, target float64) (time.Duration, bool) {
	for _, p := range pts {
		if p.Share >= target {
			return p.T, true
		}
	}
	return 0, false
}

// ASCIIChart draws the share over time, width by height cells, with a
// y axis in percent and an x axis in seconds.
func ASCIIChart(pts []Point, width, height int) string {
	if len(pts) == 0 {
		return "(no data)\n"
	}
	end := pts[len(pts)-1].T
	if end <= 0 {
		end = time.Second
	}
	// highest share seen in each column
	col := make([]float64, width)
	for i := range col {
		col[i] = -1
	}
	for _, p := range pts {
		c := min(int(float64(p.T)/float64(end)*float64(width-1)), width-1)
		col[c] = max(col[c], p.Share)
	}
	last := 0.0
	for i := range col { // carry the last value over empty columns
		if col[i] < 0 {
			col[i] = last
		}
		last = col[i]
	}
	var b strings.Builder
	for row := height - 1; row >= 0; row-- {
		lo := float64(row) / float64(height)
		label := "    "
		if row == height-1 || row == 0 || row == height/2 {
			label = fmt.Sprintf("%3.0f%%", float64(row+1)/float64(height)*100)
		}
		b.WriteString(label + " |")
		for _, v := range col {
			switch {
			case v > lo+0.5/float64(height):
				b.WriteByte('#')
			case v > lo:
				b.WriteByte('.')
			default:
				b.WriteByte(' ')
			}
		}
		b.WriteByte('\n')
	}
	b.WriteString("     +" + strings.Repeat("-", width) + "\n")
	axis := fmt.Sprintf("0s%*s", width-2, fmt.Sprintf("%.0fs", end.Seconds()))
	b.WriteString("      " + axis + "\n")
	return b.String()
}

// SVGChart draws the share over time as an SVG document.
func SVGChart(title string, pts []Point, marks []Mark) []byte {
	const w, h, left, right, top, bottom = 720.0, 360.0, 60.0, 20.0, 40.0, 50.0
	pw, ph := w-left-right, h-top-bottom
	end := time.Second
	if len(pts) > 0 && pts[len(pts)-1].T > end {
		end = pts[len(pts)-1].T
	}
	x := func(t time.Duration) float64 { return left + float64(t)/float64(end)*pw }
	y := func(s float64) float64 { return top + (1-s)*ph }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", w, h, w, h)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="24" font-size="15" font-weight="bold">%s</text>`+"\n", left, html.EscapeString(title))
	for _, s := range []float64{0, 0.25, 0.5, 0.75, 1} {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", left, y(s), left+pw, y(s))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%.0f%%</text>`+"\n", left-6, y(s)+4, s*100)
	}
	steps := 6
	for i := 0; i <= steps; i++ {
		t := end * time.Duration(i) / time.Duration(steps)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%.0fs</text>`+"\n", x(t), top+ph+18, t.Seconds())
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">time since the first rollout started (real seconds)</text>`+"\n", left+pw/2, h-10)
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", left, top+ph, left+pw, top+ph)
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", left, top, left, top+ph)
	for i, m := range marks {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#c33" stroke-dasharray="4 3"/>`+"\n", x(m.T), top, x(m.T), top+ph)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" fill="#c33">%s</text>`+"\n", x(m.T)+4, top+14+float64(i%3)*14, html.EscapeString(m.Label))
	}
	if len(pts) > 0 {
		var poly strings.Builder
		for _, p := range pts {
			fmt.Fprintf(&poly, "%.1f,%.1f ", x(p.T), y(p.Share))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="#1565c0" stroke-width="2" points="%s"/>`+"\n", strings.TrimSpace(poly.String()))
	}
	b.WriteString("</svg>\n")
	return []byte(b.String())
}
