package fleet

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// errLinkDown is a device's network being down (an offline period).
var errLinkDown = errors.New("network is unreachable (simulated: the device is offline)")

// dial connects from the device's own loopback source address (so that a
// large fleet does not exhaust the source ports of one address pair),
// through the device's modelled link.
func (d *Device) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if d.offline(time.Now()) {
		return nil, errLinkDown
	}
	dl := net.Dialer{Timeout: 15 * time.Second, LocalAddr: &net.TCPAddr{IP: d.src}}
	c, err := dl.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &linkConn{Conn: c, d: d}, nil
}

// offline says whether the device's link is down at t (and notes that the
// fault took effect).
func (d *Device) offline(t time.Time) bool {
	n := t.UnixNano()
	if n >= d.offlineFrom.Load() && n < d.offlineUntil.Load() {
		if !d.wasOffline.Swap(true) {
			d.f.stats.offline.Add(1)
		}
		return true
	}
	return false
}

// linkConn is a connection over the device's link: it fails once the
// link goes down, and is capped in bandwidth on a slow link. (Drops and
// stalls mid-download are the fetcher's: it knows where a download is.)
type linkConn struct {
	net.Conn
	d     *Device
	read  int64
	start time.Time
}

func (c *linkConn) Read(p []byte) (int, error) {
	if c.d.offline(time.Now()) {
		c.Conn.Close()
		return 0, errLinkDown
	}
	fl := c.d.f.faults.Load()
	if c.d.slow.Load() && len(p) > 4096 {
		p = p[:4096]
	}
	n, err := c.Conn.Read(p)
	if n > 0 && c.d.slow.Load() {
		if c.start.IsZero() {
			c.start = time.Now()
		}
		// Sleep until the bytes so far fit the cap.
		due := c.start.Add(time.Duration(float64(c.read+int64(n)) / float64(fl.SlowRate) * float64(time.Second)))
		if w := time.Until(due); w > 0 {
			time.Sleep(w)
		}
	}
	c.read += int64(n)
	return n, err
}

// sessionCache keeps one device's TLS session (one server) and counts how
// often a connection could resume one.
type sessionCache struct {
	d  *Device
	mu sync.Mutex
	cs *tls.ClientSessionState
}

func (c *sessionCache) Get(string) (*tls.ClientSessionState, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cs == nil {
		c.d.f.stats.fullHandshakes.Add(1)
		return nil, false
	}
	c.d.f.stats.resumed.Add(1)
	return c.cs, true
}

func (c *sessionCache) Put(_ string, cs *tls.ClientSessionState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cs = cs
}

// boundedTransport holds one of the simulator's request slots
// (Config.MaxRequests) from the start of a request until its answer's body
// is read to the end or closed.
type boundedTransport struct {
	rt  http.RoundTripper
	sem chan struct{}
}

func (b *boundedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	select {
	case b.sem <- struct{}{}:
	case <-req.Context().Done():
		return nil, req.Context().Err()
	}
	resp, err := b.rt.RoundTrip(req)
	if err != nil {
		<-b.sem
		return nil, err
	}
	resp.Body = &slotBody{ReadCloser: resp.Body, release: func() { <-b.sem }}
	return resp, nil
}

// CloseIdleConnections reaches the real transport (http.Client calls it).
func (b *boundedTransport) CloseIdleConnections() {
	if c, ok := b.rt.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// slotBody gives its request slot back once, at the end of the body or
// when it is closed.
type slotBody struct {
	io.ReadCloser
	once    sync.Once
	release func()
}

func (s *slotBody) Read(p []byte) (int, error) {
	n, err := s.ReadCloser.Read(p)
	if err != nil {
		s.once.Do(s.release)
	}
	return n, err
}

func (s *slotBody) Close() error {
	err := s.ReadCloser.Close()
	s.once.Do(s.release)
	return err
}
