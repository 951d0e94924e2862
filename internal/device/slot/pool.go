package slot

import (
	"hash/maphash"
	"sync"
)

// BlockSize is the unit in which shared flash models (NewSharedFlash)
// share their contents.
const BlockSize = 16 << 10

type block [BlockSize]byte

// BlockPool interns flash blocks by content, so that thousands of device
// models holding the same firmware keep one copy of each distinct block.
// Blocks are immutable once interned; a model that writes one gets a new
// block. The pool only grows: it holds every distinct block ever written
// (the firmware images, erased flash, and what torn writes left), which
// for a fleet simulation is a few megabytes.
type BlockPool struct {
	mu    sync.Mutex
	seed  maphash.Seed
	m     map[uint64][]*block
	n     int
	clean *block
}

// NewBlockPool makes an empty pool.
func NewBlockPool() *BlockPool {
	return &BlockPool{seed: maphash.MakeSeed(), m: map[uint64][]*block{}}
}

// erased is the block of an erased flash (all 0xff).
func (p *BlockPool) erased() *block {
	p.mu.Lock()
	c := p.clean
	p.mu.Unlock()
	if c != nil {
		return c
	}
	b := new(block)
	for i := range b {
		b[i] = 0xff
	}
	c = p.intern(b)
	p.mu.Lock()
	p.clean = c
	p.mu.Unlock()
	return c
}

// intern returns the pool's block equal to b, adding b if there is none.
func (p *BlockPool) intern(b *block) *block {
	h := maphash.Bytes(p.seed, b[:])
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, have := range p.m[h] {
		if *have == *b {
			return have
		}
	}
	p.m[h] = append(p.m[h], b)
	p.n++
	return b
}

// Blocks is the number of distinct blocks held (each BlockSize bytes).
func (p *BlockPool) Blocks() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}
