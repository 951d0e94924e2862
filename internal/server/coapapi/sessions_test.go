package coapapi

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
)

// The bounds' bookkeeping: a device's next session past its share closes
// its oldest; with every slot held, a device holding one gets its oldest
// closed for its new one and a device holding none is refused; an ended
// session frees its slot once.
func TestSessionBounds(t *testing.T) {
	ss := newSessions[int](5, SessionsPerDevice)
	admit := func(id string, c int, wantOK bool, wantEvict int) {
		t.Helper()
		ok, ev, evicted := ss.admit(id, c)
		if !evicted {
			ev = 0
		}
		if ok != wantOK || ev != wantEvict {
			t.Fatalf("admit(%s, %d) = %v, evicting %d; want %v, evicting %d", id, c, ok, ev, wantOK, wantEvict)
		}
	}
	for c := 1; c <= 4; c++ {
		admit("lock-1", c, true, 0)
	}
	admit("lock-1", 5, true, 1) // past its share: its oldest goes
	admit("lock-2", 6, true, 0) // the fifth slot
	admit("lock-3", 7, false, 0)
	admit("lock-2", 8, true, 6) // full, but lock-2 holds one
	if n := ss.held(); n != 5 {
		t.Fatalf("held %d, want 5", n)
	}
	ss.drop("lock-1", 1) // evicted already: not counted again
	ss.drop("lock-3", 7) // refused: never counted
	if n := ss.held(); n != 5 {
		t.Fatalf("held %d after dropping sessions not held, want 5", n)
	}
	ss.drop("lock-2", 8)
	ss.drop("lock-2", 8)
	admit("lock-3", 9, true, 0)
	if got := ss.byDev["lock-1"]; !slices.Equal(got, []int{2, 3, 4, 5}) {
		t.Errorf("lock-1 holds %v, want [2 3 4 5]", got)
	}
	if _, ok := ss.byDev["lock-2"]; ok {
		t.Error("lock-2 still listed with no session")
	}
}

// testServer is a CoAP server over DTLS on loopback whose device API
// answers every request 200 "ok", taking the PSK "key-ID" for each device.
func testServer(t *testing.T, maxSessions int) (*Server, *closedLog) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "coap test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	log := &closedLog{}
	s, err := Listen("127.0.0.1:0", Config{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			w.Write([]byte("ok"))
		}),
		Certificate: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		ClientCAs:   pool,
		PSK:         func(id string) ([]byte, error) { return []byte("key-" + id), nil },
		MaxSessions: maxSessions,
		Closed:      log.add,
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Serve()
	t.Cleanup(func() { s.Close() })
	return s, log
}

type closedLog struct {
	mu      sync.Mutex
	reasons []string
}

func (l *closedLog) add(reason string) {
	l.mu.Lock()
	l.reasons = append(l.reasons, reason)
	l.mu.Unlock()
}

func (l *closedLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.reasons)
}

// session opens a DTLS session of device id with its pre-shared key.
func session(t *testing.T, s *Server, id string) *udpclient.Conn {
	t.Helper()
	cc, err := coapdtls.Dial(s.Addr().String(), coapdtls.NewDTLSClientOptions(
		piondtls.WithPSK(func([]byte) ([]byte, error) { return []byte("key-" + id), nil }),
		piondtls.WithPSKIdentityHint([]byte(id)),
		piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256)))
	if err != nil {
		t.Fatalf("session of %s: %v", id, err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// answered says whether a GET on the session is answered 2.05 within 2 s.
func answered(cc *udpclient.Conn) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := cc.Get(ctx, "/api/v1/anything")
	if err != nil {
		return false
	}
	defer cc.ReleaseMessage(resp)
	return resp.Code() == codes.Content
}

// closedByServer says whether the server closed the session (its
// close_notify ends the client's connection) within 2 s.
func closedByServer(cc *udpclient.Conn) bool {
	select {
	case <-cc.Done():
		return true
	case <-time.After(2 * time.Second):
		return false
	}
}

// waitHeld waits until the server holds n sessions.
func waitHeld(t *testing.T, s *Server, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); s.Sessions() != n; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the server holds %d sessions, want %d", s.Sessions(), n)
		}
	}
}

// Real DTLS sessions against the bounds (at most 5, 4 per device): a
// device's fifth session closes its first, a device holding none is
// refused while every slot is held and served once one ends, a device
// holding one gets its oldest replaced; the closes are reported.
func TestDTLSSessionsAreBounded(t *testing.T) {
	s, log := testServer(t, 5)
	var mine []*udpclient.Conn
	for range SessionsPerDevice + 1 {
		cc := session(t, s, "lock-1")
		if !answered(cc) {
			t.Fatal("a session of lock-1 within its share was not answered")
		}
		mine = append(mine, cc)
	}
	if !closedByServer(mine[0]) || answered(mine[0]) {
		t.Error("lock-1's oldest session was not closed after its fifth")
	}
	for _, cc := range mine[1:] {
		if !answered(cc) {
			t.Error("one of lock-1's four newest sessions was not answered")
		}
	}
	other := session(t, s, "lock-2")
	if !answered(other) {
		t.Fatal("lock-2's session (the fifth slot) was not answered")
	}
	waitHeld(t, s, 5)

	refused := session(t, s, "lock-3")
	if !closedByServer(refused) || answered(refused) {
		t.Error("lock-3's session was not closed with every slot held by others")
	}
	waitHeld(t, s, 5)

	again := session(t, s, "lock-2")
	if !answered(again) || !closedByServer(other) {
		t.Error("lock-2's new session with every slot held did not replace its old one")
	}

	again.Close() // its slot frees: lock-3 gets in
	waitHeld(t, s, 4)
	if cc := session(t, s, "lock-3"); !answered(cc) {
		t.Error("lock-3 was not served once a slot was free")
	}
	want := []string{ClosedReplaced, ClosedFull, ClosedReplaced}
	if got := log.get(); !slices.Equal(got, want) {
		t.Errorf("closes reported: %v, want %v", got, want)
	}
}
