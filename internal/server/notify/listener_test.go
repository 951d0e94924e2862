package notify

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/server/pki"
)

// listenerWorld is a tlsListener on loopback with a CA, a server
// certificate and an establish func that records what it is given.
type listenerWorld struct {
	t       *testing.T
	ca      *pki.CA
	server  tls.Certificate
	ln      *tlsListener
	conns   chan net.Conn // what establish was given
	served  chan struct{} // closed when Serve returns
	closed  chan string   // the listener IDs closeClients was called with
	release chan struct{} // closed at the end: establish returns
}

func newListenerWorld(t *testing.T, timeout time.Duration, handshakes int) *listenerWorld {
	t.Helper()
	dir := t.TempDir()
	ca, _, err := pki.LoadOrCreateCA(filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	cert, _, err := ca.LoadOrCreateServerCert(filepath.Join(dir, "pki"), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: ca.Pool(), MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert}
	w := &listenerWorld{t: t, ca: ca, server: cert, ln: newTLSListener("test", raw, tc, timeout, handshakes),
		conns: make(chan net.Conn, 16), served: make(chan struct{}), closed: make(chan string, 4), release: make(chan struct{})}
	if err := w.ln.Init(nil); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(w.served)
		w.ln.Serve(func(id string, c net.Conn) error {
			if id != "test" {
				t.Errorf("establish: listener %q", id)
			}
			w.conns <- c
			// Like the broker: hold the connection until told to stop
			// or the client goes away.
			go func() { <-w.release; c.Close() }()
			io.Copy(io.Discard, c)
			return nil
		})
	}()
	t.Cleanup(func() {
		w.ln.Close(func(id string) { w.closed <- id })
		close(w.release)
	})
	return w
}

// clientConfig is a device's TLS configuration, with a certificate the
// CA issued for id (none if id is "").
func (w *listenerWorld) clientConfig(id string) *tls.Config {
	w.t.Helper()
	c := &tls.Config{RootCAs: w.ca.Pool(), ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}
	if id == "" {
		return c
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		w.t.Fatal(err)
	}
	certPEM, err := w.ca.IssueDevice(id, k.Public())
	if err != nil {
		w.t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, listenerKeyPEM(w.t, k))
	if err != nil {
		w.t.Fatal(err)
	}
	c.Certificates = []tls.Certificate{cert}
	return c
}

func (w *listenerWorld) addr() string { return w.ln.Address() }

// connect dials with a certificate for id and completes the handshake.
func (w *listenerWorld) connect(id string) *tls.Conn {
	w.t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", w.addr(), w.clientConfig(id))
	if err != nil {
		w.t.Fatalf("dial with a valid certificate: %v", err)
	}
	w.t.Cleanup(func() { c.Close() })
	return c
}

// established waits for establish to be given a connection and checks it
// is a *tls.Conn whose handshake is done with a verified certificate for
// id.
func (w *listenerWorld) established(id string) *tls.Conn {
	w.t.Helper()
	select {
	case c := <-w.conns:
		tc, ok := c.(*tls.Conn)
		if !ok {
			w.t.Fatalf("establish was given a %T, not a *tls.Conn", c)
		}
		st := tc.ConnectionState()
		if !st.HandshakeComplete {
			w.t.Fatal("establish was given a connection before its handshake")
		}
		if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
			w.t.Fatal("no verified client certificate")
		}
		if got, err := pki.DeviceID(st.VerifiedChains[0][0]); err != nil || got != id {
			w.t.Fatalf("device %q (%v), want %q", got, err, id)
		}
		return tc
	case <-time.After(5 * time.Second):
		w.t.Fatal("establish was not called")
		return nil
	}
}

func (w *listenerWorld) noneEstablished() {
	w.t.Helper()
	select {
	case c := <-w.conns:
		w.t.Fatalf("establish was given a connection from %v", c.RemoteAddr())
	default:
	}
}

// closedWithin reads from c until it fails and says how long that took;
// it fails the test if c is still open after limit.
func closedWithin(t *testing.T, c net.Conn, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	c.SetReadDeadline(start.Add(limit))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the server had not closed the connection after %v", limit)
	}
	return time.Since(start)
}

func TestListenerHandsOverHandshakenConnection(t *testing.T) {
	w := newListenerWorld(t, 5*time.Second, 4)
	c := w.connect("lock-1")
	w.established("lock-1")
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	w.noneEstablished()
}

func TestListenerClosesConnectionsThatNeverShakeHands(t *testing.T) {
	const timeout = 300 * time.Millisecond
	w := newListenerWorld(t, timeout, 4)
	raw, err := net.Dial("tcp", w.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	took := closedWithin(t, raw, 5*time.Second)
	if took < timeout/2 {
		t.Errorf("closed after %v, before the %v timeout", took, timeout)
	}
	w.noneEstablished()
	// The listener keeps serving.
	w.connect("lock-2")
	w.established("lock-2")
}

func TestListenerRefusesClientWithoutCertificate(t *testing.T) {
	w := newListenerWorld(t, 5*time.Second, 4)
	c, err := tls.Dial("tcp", w.addr(), w.clientConfig(""))
	if err == nil {
		// TLS 1.3: the client learns of the refusal at its first read.
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = bufio.NewReader(c).ReadByte()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("a client without a certificate is still connected")
		}
	}
	if err == nil {
		t.Fatal("a client without a certificate was not refused")
	}
	time.Sleep(50 * time.Millisecond)
	w.noneEstablished()
	// Nor with a certificate from another CA.
	other := newListenerWorld(t, time.Second, 1)
	if c, err := tls.Dial("tcp", w.addr(), other.clientConfig("lock-3")); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := bufio.NewReader(c).ReadByte(); err == nil {
			t.Fatal("a certificate from another CA was taken")
		}
		c.Close()
	}
	w.noneEstablished()
	// The listener keeps serving.
	w.connect("lock-4")
	w.established("lock-4")
}

// With room for one handshake at a time, a connection stalled before its
// handshake holds the next one back until its timeout closes it.
func TestListenerBoundsHandshakes(t *testing.T) {
	const timeout = 500 * time.Millisecond
	w := newListenerWorld(t, timeout, 1)
	raw, err := net.Dial("tcp", w.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	time.Sleep(50 * time.Millisecond) // accepted, its handshake under way
	start := time.Now()
	w.connect("lock-5")
	w.established("lock-5")
	if took := time.Since(start); took < timeout/2 {
		t.Errorf("a second handshake went through after %v, beside the stalled one (the bound is 1)", took)
	}
	// Handshakes done leave their room: established connections do not
	// count.
	start = time.Now()
	w.connect("lock-6")
	w.established("lock-6")
	if took := time.Since(start); took > timeout/2 {
		t.Errorf("a handshake waited %v with none under way", took)
	}
}

func TestListenerCloseStopsAccepting(t *testing.T) {
	w := newListenerWorld(t, 5*time.Second, 4)
	c := w.connect("lock-7")
	w.established("lock-7")
	raw, err := net.Dial("tcp", w.addr()) // in its handshake at Close
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	time.Sleep(50 * time.Millisecond)

	done := make(chan struct{})
	go func() {
		w.ln.Close(func(id string) { w.closed <- id })
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	select {
	case <-w.served:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Close")
	}
	select {
	case id := <-w.closed:
		if id != "test" {
			t.Errorf("closeClients(%q)", id)
		}
	default:
		t.Error("Close did not have the broker close its clients")
	}
	// The connection handed over and not taken by the broker is closed,
	// and so is the one in its handshake.
	closedWithin(t, c, 5*time.Second)
	closedWithin(t, raw, 5*time.Second)
	if c, err := net.DialTimeout("tcp", w.addr(), time.Second); err == nil {
		c.Close()
		t.Fatal("the listener still accepts after Close")
	}
	w.ln.Close(func(string) { t.Error("a second Close closed the clients again") })
}

// Through the broker: a device completing its handshake connects (the
// authentication hook gets its *tls.Conn), one without a certificate does
// not, and the broker keeps taking devices afterwards.
func TestBrokerListenerConnectsDevices(t *testing.T) {
	w := newWorld(t)
	mqttConnect := func(id string, cfg *tls.Config) (byte, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", "127.0.0.1:"+w.port, cfg)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		body := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, byte(len(id))}
		body = append(body, id...)
		if _, err := c.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
			return 0, err
		}
		ack := make([]byte, 4)
		if _, err := io.ReadFull(c, ack); err != nil {
			return 0, err
		}
		if ack[0] != 0x20 {
			return 0, errors.New("not a CONNACK")
		}
		return ack[3], nil
	}
	lw := &listenerWorld{t: t, ca: w.ca}
	if code, err := mqttConnect("lock-8", lw.clientConfig("lock-8")); err != nil || code != 0 {
		t.Fatalf("a device with its certificate: CONNACK %d, %v", code, err)
	}
	if code, err := mqttConnect("lock-9", lw.clientConfig("")); err == nil {
		t.Fatalf("a device without a certificate: CONNACK %d", code)
	}
	if code, err := mqttConnect("lock-10", lw.clientConfig("lock-11")); err != nil || code == 0 {
		t.Fatalf("a device naming another device: CONNACK %d, %v", code, err)
	}
	if code, err := mqttConnect("lock-12", lw.clientConfig("lock-12")); err != nil || code != 0 {
		t.Fatalf("afterwards, a device with its certificate: CONNACK %d, %v", code, err)
	}
}

func listenerKeyPEM(t *testing.T, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// A device that completes its handshake but never sends CONNECT is
// closed after ConnectTimeout.
func TestBrokerClosesDevicesThatNeverConnect(t *testing.T) {
	const timeout = 400 * time.Millisecond
	lw := newListenerWorld(t, time.Second, 1) // for its CA and server certificate
	b, err := Listen("127.0.0.1:0", Config{TLS: &tls.Config{Certificates: []tls.Certificate{lw.server}, ClientCAs: lw.ca.Pool()},
		Allowed: func(string) bool { return true }, ConnectTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Serve(); err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	c, err := tls.Dial("tcp", b.Addr().String(), lw.clientConfig("lock-13"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if took := closedWithin(t, c, 5*time.Second); took < timeout/2 {
		t.Errorf("closed after %v, before the %v timeout", took, timeout)
	}
}

// One address cannot take every handshake slot: with 4 slots and at most
// 2 per address, two connections from 127.0.0.1 that never shake hands
// hold their 2, a third from there is closed at once, and a device from
// 127.0.0.2 still connects without waiting.
func TestListenerBoundsHandshakesPerSource(t *testing.T) {
	const timeout = 2 * time.Second
	w := newListenerWorld(t, timeout, 4)
	w.ln.mu.Lock() // Serve reads it under the lock
	w.ln.perSrc = 2
	w.ln.mu.Unlock()
	for range 2 {
		raw, err := net.Dial("tcp", w.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
	}
	time.Sleep(50 * time.Millisecond) // accepted, their handshakes under way
	third, err := net.Dial("tcp", w.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	if took := closedWithin(t, third, timeout); took > timeout/2 {
		t.Errorf("the third stalled connection from one address was closed after %v, want at once", took)
	}
	start := time.Now()
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	c, err := tls.DialWithDialer(d, "tcp", w.addr(), w.clientConfig("lock-7"))
	if err != nil {
		t.Fatalf("a device from another address: %v", err)
	}
	defer c.Close()
	w.established("lock-7")
	if took := time.Since(start); took > timeout/2 {
		t.Errorf("a device from another address waited %v", took)
	}
}
