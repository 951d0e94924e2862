package link

import (
	"encoding/json"
	"os"
	"sync"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/atomicfile"
)

// Clock is the device's trusted time (docs/SECURITY.md, "Time"). Many
// devices boot believing it is 1970, or drift far ahead. The trusted time
// is the device clock, corrected by the server's time when the two differ
// by more than MaxSkew (the server's Date header, over the authenticated
// TLS link), and never earlier than the floor: the newest time this device
// knows has passed (the last server time it saw, kept in the bundle, or
// its certificate's issue time). Certificates, TLS and TUF expiry are
// judged on it.
type Clock struct {
	// Device is the raw clock (default time.Now).
	Device func() time.Time

	path  string
	mu    sync.Mutex
	floor time.Time
	saved time.Time     // the floor as last written
	skew  time.Duration // server time minus device time, when they disagree
}

// MaxSkew is how far the device clock may be from the server's before
// the server's is believed.
const MaxSkew = 5 * time.Minute

// timeFile keeps the floor in the bundle directory.
const timeFile = "trusted-time.json"

func newClock(dir string, issued time.Time) *Clock {
	c := &Clock{Device: time.Now, path: dir + "/" + timeFile, floor: issued}
	if b, err := os.ReadFile(c.path); err == nil {
		var saved struct{ Floor time.Time }
		if json.Unmarshal(b, &saved) == nil && saved.Floor.After(c.floor) {
			c.floor, c.saved = saved.Floor, saved.Floor
		}
	}
	return c
}

// Now is the trusted time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.Device().Add(c.skew)
	if now.Before(c.floor) {
		return c.floor
	}
	return now
}

// Floor is the newest time this device knows has passed.
func (c *Clock) Floor() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.floor
}

// Observe takes the server's time from an authenticated answer: it raises
// the floor (kept on disk, at most once a minute) and corrects a device
// clock that is off by more than MaxSkew.
func (c *Clock) Observe(server time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if server.IsZero() {
		return
	}
	dev := c.Device()
	if d := server.Sub(dev); d > MaxSkew || d < -MaxSkew {
		c.skew = d
	} else {
		c.skew = 0
	}
	if server.After(c.floor) {
		c.floor = server
	}
	if c.floor.Sub(c.saved) > time.Minute {
		b, _ := json.Marshal(struct{ Floor time.Time }{c.floor})
		if atomicfile.Write(c.path, b, 0o644) == nil {
			c.saved = c.floor
		}
	}
}
