package coapapi

import (
	"slices"
	"sync"
)

// Session bounds. A DTLS session costs the server its keys, buffers and
// goroutines until it ends or goes quiet (Config.Idle), so the sessions
// held at once are bounded (Config.MaxSessions), and so are one device's:
// a device behind a NAT that rebinds its port, or one that restarted,
// opens a new session while its old one lingers, and a device with
// credentials must not be able to hold the server's every slot.
const (
	// DefaultMaxSessions is Config.MaxSessions's default, the HTTPS
	// listener's connection bound's.
	DefaultMaxSessions = 10000
	// SessionsPerDevice is how many sessions one device may hold; its
	// next one closes its oldest.
	SessionsPerDevice = 4
)

// Reasons a session is closed by its bounds (Config.Closed).
const (
	ClosedFull     = "full"     // a new session, with every slot held by other devices
	ClosedReplaced = "replaced" // a device's oldest session, for its new one
)

// sessions tracks the sessions held, by device, oldest first.
type sessions[C comparable] struct {
	max, perDevice int

	mu    sync.Mutex
	n     int
	byDev map[string][]C
}

func newSessions[C comparable](max, perDevice int) *sessions[C] {
	return &sessions[C]{max: max, perDevice: perDevice, byDev: map[string][]C{}}
}

// admit takes a new session of device id. When the device holds as many
// sessions as it may, or every slot is held, its oldest session makes
// room (evict, to be closed by the caller; ok is true). When every slot
// is held and the device holds none, the new session is refused (ok is
// false).
func (ss *sessions[C]) admit(id string, c C) (ok bool, evict C, evicted bool) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	held := ss.byDev[id]
	if len(held) >= ss.perDevice || ss.n >= ss.max && len(held) > 0 {
		evict, evicted = held[0], true
		held = held[1:]
		ss.n--
	}
	if ss.n >= ss.max {
		return false, evict, evicted
	}
	ss.byDev[id] = append(held, c)
	ss.n++
	return true, evict, evicted
}

// drop forgets a session that ended (once; a session admit already evicted
// or refused is not counted again).
func (ss *sessions[C]) drop(id string, c C) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	held := ss.byDev[id]
	i := slices.Index(held, c)
	if i < 0 {
		return
	}
	held = slices.Delete(held, i, i+1)
	ss.n--
	if len(held) == 0 {
		delete(ss.byDev, id)
	} else {
		ss.byDev[id] = held
	}
}

// held is how many sessions are held.
func (ss *sessions[C]) held() int {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.n
}
