package coapapi

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
)

// DefaultMaxHandshakes is Config.MaxHandshakes's default. A DTLS handshake
// holds a goroutine and its state until it completes or times out
// (Config.HandshakeTimeout), and a ClientHello from a spoofed address
// starts one too (the cookie exchange happens inside it), so the
// handshakes under way are bounded: past the bound the listener accepts
// nothing until one ends, further ClientHellos wait in the DTLS library's
// backlog of 128 and past that are dropped, and devices retransmit theirs.
const DefaultMaxHandshakes = 256

// listener is the part of go-coap's DTLS listener the server uses.
type listener interface {
	Close() error
	AcceptWithContext(ctx context.Context) (net.Conn, error)
}

// boundedListener hands out at most cap(slots) connections whose
// handshake is not done.
type boundedListener struct {
	listener
	slots chan struct{}
	// handshaking counts the connections handed out whose handshake is
	// not done (a slot is also taken while waiting for a connection).
	handshaking atomic.Int32
}

func newBoundedListener(l listener, handshakes int) *boundedListener {
	return &boundedListener{listener: l, slots: make(chan struct{}, handshakes)}
}

// AcceptWithContext waits for a free handshake slot, then for a
// connection; the slot is held until the connection's handshake ends (or
// it is closed first).
func (l *boundedListener) AcceptWithContext(ctx context.Context) (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c, err := l.listener.AcceptWithContext(ctx)
	if err != nil {
		<-l.slots
		return nil, err
	}
	h, ok := c.(handshaker)
	if !ok { // no handshake to wait for
		<-l.slots
		return c, nil
	}
	hc := &handshakingConn{Conn: c, h: h}
	l.handshaking.Add(1)
	hc.release = sync.OnceFunc(func() {
		l.handshaking.Add(-1)
		<-l.slots
	})
	return hc, nil
}

type handshaker interface {
	HandshakeContext(ctx context.Context) error
}

// handshakingConn is a DTLS connection holding a handshake slot until its
// handshake ends.
type handshakingConn struct {
	net.Conn
	h       handshaker
	release func()
}

func (c *handshakingConn) HandshakeContext(ctx context.Context) error {
	defer c.release()
	return c.h.HandshakeContext(ctx)
}

func (c *handshakingConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// Unwrap is the DTLS connection.
func (c *handshakingConn) Unwrap() net.Conn { return c.Conn }
