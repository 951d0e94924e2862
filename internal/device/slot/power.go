package slot

import (
	"sync"
)

// Power is one power supply shared by several storage models (slots, the
// boot environment, the data partition), so that a power cut scheduled at
// the N-th write operation of the whole device stops them all at once.
// It counts the operations per area, for campaigns that must show every
// area got its cuts.
type Power struct {
	mu      sync.Mutex
	ops     int
	perArea map[string]int
	cutAt   int     // cut at this operation (1-based); 0: never
	frac    float64 // for a Flash write: how much of it lands before the cut
	tear    bool
	cutArea string
	off     bool
	cuts    int // power cuts so far

	areaPrefix string // with areaLeft: cut at the areaLeft-th operation in an area with this prefix
	areaLeft   int
	onCut      func(area string)
}

// NewPower makes a supply with no cut scheduled.
func NewPower() *Power { return &Power{perArea: map[string]int{}} }

// CutAt schedules a cut at the n-th operation from the start of the count
// (1-based). A Flash write cut there lands frac of its bytes (0 to 1),
// tearing the rest of the page if tear is set.
func (p *Power) CutAt(n int, frac float64, tear bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cutAt, p.frac, p.tear = n, frac, tear
	p.areaLeft = 0 // in place of a cut scheduled with CutInArea
}

// CutInArea schedules a cut at the n-th operation from now (1-based) in
// an area whose name starts with prefix ("slot-", "env", "journal"...), in
// place of any cut scheduled with CutAt.
func (p *Power) CutInArea(prefix string, n int, frac float64, tear bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cutAt, p.areaPrefix, p.areaLeft, p.frac, p.tear = 0, prefix, n, frac, tear
}

// OnCut sets a function called when a cut strikes, with the area it hit.
// It runs while the storage model that was cut holds its lock: it must not
// touch the models (cancelling a context is what it is for).
func (p *Power) OnCut(f func(area string)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.onCut = f
}

// Cuts is how many cuts have struck so far.
func (p *Power) Cuts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cuts
}

// Ops returns the operations counted so far, in total and per area.
func (p *Power) Ops() (int, map[string]int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[string]int, len(p.perArea))
	for k, v := range p.perArea {
		m[k] = v
	}
	return p.ops, m
}

// CutArea is the area whose operation the cut hit ("" if none yet).
func (p *Power) CutArea() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cutArea
}

// Off reports whether power is cut.
func (p *Power) Off() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.off
}

// On restores power after a cut; that cut is spent, counting goes on. A
// cut scheduled but not yet struck stays scheduled.
func (p *Power) On() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.off {
		p.off = false
		p.cutAt = 0
		p.areaLeft = 0
	}
}

// state returns how many cuts happened and whether power is off now.
func (p *Power) state() (int, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cuts, p.off
}

// op counts one operation in area and says how it goes: ok means it
// happens whole; otherwise power is off, and if this very operation was cut,
// now is true and frac of a write lands.
func (p *Power) op(area string) (ok, now bool, frac float64, tear bool) {
	p.mu.Lock()
	if p.off {
		p.mu.Unlock()
		return false, false, 0, false
	}
	p.ops++
	p.perArea[area]++
	strike := p.cutAt != 0 && p.ops >= p.cutAt
	if p.areaLeft > 0 && len(area) >= len(p.areaPrefix) && area[:len(p.areaPrefix)] == p.areaPrefix {
		p.areaLeft--
		strike = strike || p.areaLeft == 0
	}
	if !strike {
		p.mu.Unlock()
		return true, false, 0, false
	}
	p.off = true
	p.cuts++
	p.cutArea = area
	frac, tear, notify := p.frac, p.tear, p.onCut
	p.mu.Unlock()
	if notify != nil {
		notify(area)
	}
	return false, true, frac, tear
}
