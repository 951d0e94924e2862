package notify

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
)

// maxHandshakes bounds the TLS handshakes under way at once; further
// connections wait in the kernel's accept queue until one finishes.
// maxHandshakesPerSource bounds those from one address, so that one host
// holding connections open without shaking hands cannot take every slot
// (a connection past it is closed at once; a device behind a busy NAT
// tries again).
const (
	maxHandshakes          = 256
	maxHandshakesPerSource = 32
)

// tlsListener is the broker's listener (a mochi listeners.Listener). It
// accepts TCP connections, gives each ConnectTimeout to complete its TLS
// handshake and send CONNECT (the broker sets its keep-alive deadline
// after that), and keeps accepting after a temporary error (out of file
// descriptors, say), where mochi's own accept loop would stop.
//
// The handshake runs before the connection reaches the broker, at most
// maxHandshakes at once: a handshake (certificate verification, ECDSA)
// takes a goroutine's stack to 16 or 32 KiB and allocates tens of KiB,
// and with one goroutine per connection and no bound, thousands of
// devices reconnecting at once (after a restart) all shake hands at once
// and the heap grows to match (bench/README.md, mqtt). The broker then
// reads the client on the same goroutine: a fresh one would not keep a
// smaller stack, since reading CONNECT alone takes mochi's read goroutine
// past 8 KiB (about 10 KiB of frames), and parked in its read loop it
// uses about 6 KiB, more than the quarter of 16 KiB under which the
// runtime halves a stack.
type tlsListener struct {
	id      string
	raw     net.Listener
	tls     *tls.Config
	timeout time.Duration
	slots   chan struct{} // one per handshake under way
	perSrc  int           // handshakes under way from one address, at most
	log     *slog.Logger

	ctx    context.Context // canceled by Close: handshakes under way stop
	cancel context.CancelFunc
	mu     sync.Mutex
	closed bool
	conns  map[*tls.Conn]struct{} // handed to the broker, until it is done with them
	srcs   map[string]int         // handshakes under way by source address
	wg     sync.WaitGroup         // handshakes under way
}

func newTLSListener(id string, raw net.Listener, tc *tls.Config, timeout time.Duration, handshakes int) *tlsListener {
	ctx, cancel := context.WithCancel(context.Background())
	return &tlsListener{id: id, raw: raw, tls: tc, timeout: timeout, slots: make(chan struct{}, handshakes),
		perSrc: min(maxHandshakesPerSource, handshakes), log: slog.New(slog.DiscardHandler), ctx: ctx, cancel: cancel,
		conns: map[*tls.Conn]struct{}{}, srcs: map[string]int{}}
}

func (l *tlsListener) ID() string       { return l.id }
func (l *tlsListener) Address() string  { return l.raw.Addr().String() }
func (l *tlsListener) Protocol() string { return "tcp" }

func (l *tlsListener) Init(log *slog.Logger) error {
	if log != nil {
		l.log = log
	}
	return nil
}

// Serve accepts connections until Close; it keeps accepting after a
// temporary error (out of file descriptors, say), where a plain accept
// loop would stop.
func (l *tlsListener) Serve(establish listeners.EstablishFn) {
	for {
		select {
		case l.slots <- struct{}{}:
		case <-l.ctx.Done():
			return
		}
		c, err := l.raw.Accept()
		if err != nil {
			<-l.slots
			if l.ctx.Err() != nil {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
				errors.Is(err, syscall.ECONNABORTED) {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			l.log.Error("mqtt: listener stopped", "error", err)
			return
		}
		ok, full := l.track(source(c))
		if !ok {
			<-l.slots
			c.Close()
			if full {
				continue
			}
			return
		}
		go l.handshake(c, establish)
	}
}

// track counts a handshake under way from src, unless the listener is
// closed or src has as many as it may (full).
func (l *tlsListener) track(src string) (ok, full bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false, false
	}
	if l.srcs[src] >= l.perSrc {
		return false, true
	}
	l.srcs[src]++
	l.wg.Add(1)
	return true, false
}

// source is a connection's remote address without its port.
func source(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return c.RemoteAddr().String()
}

func (l *tlsListener) handshake(c net.Conn, establish listeners.EstablishFn) {
	tc, ok := l.secure(c)
	if !ok {
		return
	}
	l.establish(tc, establish)
}

// secure runs the TLS handshake and, unless the listener was closed in
// the meantime, registers the connection as handed to the broker.
func (l *tlsListener) secure(c net.Conn) (*tls.Conn, bool) {
	defer l.wg.Done()
	deadline := time.Now().Add(l.timeout)
	c.SetDeadline(deadline)
	tc := tls.Server(c, l.tls)
	ctx, cancel := context.WithDeadline(l.ctx, deadline)
	err := tc.HandshakeContext(ctx)
	cancel()
	l.mu.Lock()
	if src := source(c); l.srcs[src] <= 1 {
		delete(l.srcs, src)
	} else {
		l.srcs[src]--
	}
	l.mu.Unlock()
	<-l.slots
	if err != nil {
		tc.Close()
		l.log.Debug("mqtt: TLS handshake failed", "remote", c.RemoteAddr().String(), "error", err)
		return nil, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		tc.Close()
		return nil, false
	}
	l.conns[tc] = struct{}{}
	return tc, true
}

func (l *tlsListener) establish(tc *tls.Conn, establish listeners.EstablishFn) {
	if err := establish(l.id, tc); err != nil {
		l.log.Warn("mqtt: connection ended", "remote", tc.RemoteAddr().String(), "error", err)
	}
	l.mu.Lock()
	delete(l.conns, tc)
	l.mu.Unlock()
}

// Close stops accepting, stops the handshakes under way, has the broker
// drop this listener's clients and closes the connections it had not yet
// taken as clients (still before CONNECT).
func (l *tlsListener) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	first := !l.closed
	l.closed = true
	l.mu.Unlock()
	if !first {
		return
	}
	l.cancel()
	l.raw.Close()
	l.wg.Wait()
	closeClients(l.id)
	l.mu.Lock()
	for tc := range l.conns {
		tc.Close()
	}
	l.mu.Unlock()
}
