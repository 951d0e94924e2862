package slot

import (
	"fmt"
	"math/rand/v2"
	"sync"
)

// Flash is an in-memory Device that can lose power. Writes land byte by byte
// in order; a power cut set with CutAtWrite or CutAtByte stops the write in
// progress at that point, and everything after it is lost. With tearing on,
// the rest of the page being programmed holds garbage instead of its old
// bytes, as a page whose programming was interrupted may. After a cut every
// call fails with ErrPowerCut until PowerOn.
//
// Writes are durable as soon as they land (raw flash or eMMC without a
// write cache); Sync only reports the power state.
type Flash struct {
	mu       sync.Mutex
	data     []byte // the contents, unless pool is set
	size     int64
	pageSize int

	pool   *BlockPool // blocks shared with other models, if set
	blocks []*block   // the contents when pool is set

	calls   int   // WriteAt calls so far, including cut ones
	written int64 // bytes landed so far

	cutCall int   // cut at the start of this WriteAt call (1-based); 0: never
	cutByte int64 // cut once this many bytes have landed in total; -1: never
	tear    bool
	off     bool
	rng     *rand.Rand

	power *Power // shared supply, if attached
	area  string
}

// Attach connects the model to a shared power supply; its writes count as
// operations of area.
func (f *Flash) Attach(p *Power, area string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.power, f.area = p, area
}

// isOff reports power state, own or shared (lock held).
func (f *Flash) isOff() bool {
	if f.power != nil {
		if _, off := f.power.state(); off {
			return true
		}
	}
	return f.off
}

// NewFlash makes a model of size bytes, erased to 0xff, with the given
// program page size (for tearing; 0 means 256).
func NewFlash(size int64, pageSize int) *Flash {
	if pageSize <= 0 {
		pageSize = 256
	}
	d := make([]byte, size)
	for i := range d {
		d[i] = 0xff
	}
	return &Flash{data: d, size: size, pageSize: pageSize, cutByte: -1, rng: rand.New(rand.NewPCG(1, 2))}
}

// NewSharedFlash makes a model like NewFlash whose contents are kept as
// blocks interned in pool: models holding the same bytes (a fleet of
// devices running the same firmware) share their memory. Every byte is
// still written, read and cut by power as in any other model.
func NewSharedFlash(size int64, pageSize int, pool *BlockPool) *Flash {
	if pageSize <= 0 {
		pageSize = 256
	}
	n := (size + BlockSize - 1) / BlockSize
	f := &Flash{size: size, pageSize: pageSize, cutByte: -1, rng: rand.New(rand.NewPCG(1, 2)), pool: pool, blocks: make([]*block, n)}
	erased := pool.erased()
	for i := range f.blocks {
		f.blocks[i] = erased
	}
	return f
}

// NewFlashFrom makes a model holding a copy of b.
func NewFlashFrom(b []byte, pageSize int) *Flash {
	f := NewFlash(int64(len(b)), pageSize)
	copy(f.data, b)
	return f
}

// CutAtWrite cuts power at the start of the n-th WriteAt call from now
// (1-based): none of its bytes land.
func (f *Flash) CutAtWrite(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cutCall = f.calls + n
}

// CutAtByte cuts power once n more bytes have landed; tear says whether the
// rest of the interrupted page is garbage.
func (f *Flash) CutAtByte(n int64, tear bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cutByte = f.written + n
	f.tear = tear
}

// PowerOn restores power and clears any pending cut.
func (f *Flash) PowerOn() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.off = false
	f.cutCall = 0
	f.cutByte = -1
}

// Off reports whether power has been cut.
func (f *Flash) Off() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.off
}

// Counters returns the WriteAt calls made and the bytes landed so far: run
// an operation once to learn how many cut points it has.
func (f *Flash) Counters() (calls int, bytes int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls, f.written
}

// Bytes returns a copy of the contents.
func (f *Flash) Bytes() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]byte, f.size)
	f.read(out, 0)
	return out
}

func (f *Flash) Size() int64 { return f.size }

func (f *Flash) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.isOff() {
		return 0, ErrPowerCut
	}
	if off < 0 || off > f.size {
		return 0, fmt.Errorf("read at %d outside a %d-byte device", off, f.size)
	}
	n := f.read(p, off)
	if n < len(p) {
		return n, fmt.Errorf("read of %d bytes at %d past the end of a %d-byte device", len(p), off, f.size)
	}
	return n, nil
}

func (f *Flash) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.isOff() {
		return 0, ErrPowerCut
	}
	if off < 0 || off+int64(len(p)) > f.size {
		return 0, fmt.Errorf("write of %d bytes at %d past the end of a %d-byte device", len(p), off, f.size)
	}
	if f.power != nil {
		ok, now, frac, tear := f.power.op(f.area)
		if !ok {
			if !now {
				return 0, ErrPowerCut
			}
			// This write is the one cut: part of it lands.
			n := int(frac * float64(len(p)))
			f.write(p[:n], off)
			if tear {
				f.tearFrom(off+int64(n), off+int64(len(p)))
			}
			return n, ErrPowerCut
		}
	}
	f.calls++
	if f.cutCall != 0 && f.calls >= f.cutCall {
		f.off = true
		return 0, ErrPowerCut
	}
	n := len(p)
	if f.cutByte >= 0 && f.written+int64(n) > f.cutByte {
		n = int(f.cutByte - f.written)
	}
	f.write(p[:n], off)
	f.written += int64(n)
	if n == len(p) {
		return n, nil
	}
	// Power fails at off+n.
	f.off = true
	if f.tear {
		f.tearFrom(off+int64(n), off+int64(len(p)))
	}
	return n, ErrPowerCut
}

// tearFrom fills the rest of the page holding at (up to limit) with garbage.
func (f *Flash) tearFrom(at, limit int64) {
	end := min((at/int64(f.pageSize)+1)*int64(f.pageSize), limit)
	if end <= at {
		return
	}
	garbage := make([]byte, end-at)
	for i := range garbage {
		garbage[i] = byte(f.rng.UintN(256))
	}
	f.write(garbage, at)
}

// read copies the contents at off into p (lock held; off within the
// device); it returns how many bytes there were.
func (f *Flash) read(p []byte, off int64) int {
	if f.pool == nil {
		return copy(p, f.data[off:])
	}
	n := min(int64(len(p)), f.size-off)
	for done := int64(0); done < n; {
		at := off + done
		b, in := at/BlockSize, at%BlockSize
		done += int64(copy(p[done:n], f.blocks[b][in:]))
	}
	return int(n)
}

// write lands p at off (lock held; in bounds). Shared blocks are copied
// before they change and interned again after.
func (f *Flash) write(p []byte, off int64) {
	if f.pool == nil {
		copy(f.data[off:], p)
		return
	}
	for done := 0; done < len(p); {
		at := off + int64(done)
		b, in := at/BlockSize, int(at%BlockSize)
		nb := new(block)
		if in != 0 || len(p)-done < BlockSize {
			*nb = *f.blocks[b] // a partial write keeps the rest of the block
		}
		done += copy(nb[in:], p[done:])
		f.blocks[b] = f.pool.intern(nb)
	}
}

func (f *Flash) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.isOff() {
		return ErrPowerCut
	}
	return nil
}
