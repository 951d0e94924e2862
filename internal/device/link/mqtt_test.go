package link

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// testCA issues the certificates of a small world: the server's (for
// 127.0.0.1), the device's (CN lock-1) and the server's broker identity.
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
	dir  string
}

func newTestCA(t *testing.T) *testCA {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	ca := &testCA{cert: c, key: k, dir: t.TempDir()}
	ca.write("ca.pem", "CERTIFICATE", der)
	return ca
}

func (ca *testCA) write(name, typ string, der []byte) string {
	p := filepath.Join(ca.dir, name)
	os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
	return p
}

// issue writes NAME.pem and NAME.key.pem and returns the pair.
func (ca *testCA) issue(t *testing.T, name, cn string, usage x509.ExtKeyUsage, ip net.IP) tls.Certificate {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}}
	if ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, k.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalPKCS8PrivateKey(k)
	ca.write(name+".pem", "CERTIFICATE", der)
	ca.write(name+".key.pem", "PRIVATE KEY", kd)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

// reportSink is the HTTPS side: the reports POSTed, acknowledged, and the
// check-ins, answered without an offer.
type reportSink struct {
	mu       sync.Mutex
	reports  []proto.Report
	checkIns atomic.Int64
}

func (s *reportSink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == proto.PathCheckIn {
		s.checkIns.Add(1)
		json.NewEncoder(w).Encode(proto.CheckInResponse{NextPollSeconds: 3600})
		return
	}
	var rep proto.Report
	if r.URL.Path != proto.PathReports || json.NewDecoder(r.Body).Decode(&rep) != nil {
		http.Error(w, `{"error":"bad"}`, http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	s.reports = append(s.reports, rep)
	s.mu.Unlock()
	json.NewEncoder(w).Encode(proto.ReportAck{ReportID: rep.ReportID, Stored: true})
}

func (s *reportSink) ids() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for _, r := range s.reports {
		ids = append(ids, r.ReportID)
	}
	return ids
}

// mqttWorld: Mosquitto (configured as the docs say), the HTTPS report
// sink, the device's link, and a stand-in for the server on the broker
// that answers status reports as told.
type mqttWorld struct {
	t      *testing.T
	mosq   *testenv.Mosquitto
	https  *reportSink
	link   *Link
	server paho.Client
	answer atomic.Value // "ack", "refuse" or "silent"
	heard  chan proto.Report
	// check-ins over MQTT: answered "offer", "busy" or "silent"
	checkInAnswer atomic.Value
	checkInsHeard atomic.Int64
	wakes         atomic.Int64
}

func newMQTTWorld(t *testing.T) *mqttWorld {
	ca := newTestCA(t)
	serverCert := ca.issue(t, "server", "fieldpatch server", x509.ExtKeyUsageServerAuth, net.IPv4(127, 0, 0, 1))
	ca.issue(t, "device", "lock-1", x509.ExtKeyUsageClientAuth, nil)
	identity := ca.issue(t, "identity", "fieldpatch:server", x509.ExtKeyUsageClientAuth, nil)
	w := &mqttWorld{t: t, https: &reportSink{}, heard: make(chan proto.Report, 16)}
	w.answer.Store("ack")
	w.checkInAnswer.Store("offer")
	w.mosq = testenv.StartMosquitto(t, filepath.Join(ca.dir, "ca.pem"), filepath.Join(ca.dir, "server.pem"), filepath.Join(ca.dir, "server.key.pem"))

	hs := httptest.NewUnstartedServer(w.https)
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{serverCert}}
	hs.StartTLS()
	t.Cleanup(hs.Close)
	bundle := t.TempDir()
	for _, f := range []string{"ca.pem", "device.pem", "device.key.pem"} {
		b, _ := os.ReadFile(filepath.Join(ca.dir, f))
		os.WriteFile(filepath.Join(bundle, f), b, 0o600)
	}
	b, _ := json.Marshal(Bundle{Server: hs.URL, DeviceID: "lock-1"})
	os.WriteFile(filepath.Join(bundle, "bundle.json"), b, 0o644)
	l, err := Open(bundle)
	if err != nil {
		t.Fatal(err)
	}
	l.Logf = t.Logf
	w.link = l

	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	opts := paho.NewClientOptions().AddBroker("tls://127.0.0.1:" + strconv.Itoa(w.mosq.Port)).SetClientID("fieldpatch:server-test").
		SetTLSConfig(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{identity}}).
		SetAutoReconnect(true).SetConnectRetry(true).SetConnectRetryInterval(200 * time.Millisecond).SetMaxReconnectInterval(time.Second).
		SetOnConnectHandler(func(c paho.Client) {
			c.Subscribe("fp/dev/+/checkin", 1, func(c paho.Client, m paho.Message) {
				var ci proto.MQTTCheckIn
				if json.Unmarshal(m.Payload(), &ci) != nil || ci.Version != "1.0.0" {
					return
				}
				w.checkInsHeard.Add(1)
				a := proto.MQTTAnswer{RequestID: ci.RequestID}
				switch w.checkInAnswer.Load() {
				case "offer":
					a.Status = http.StatusOK
					a.Body, _ = json.Marshal(proto.CheckInResponse{NextPollSeconds: 3600, Offer: &proto.Offer{UpdateID: "u-7"}})
				case "busy":
					a.Status, a.RetryAfter = http.StatusServiceUnavailable, 7
				default:
					return
				}
				b, _ := json.Marshal(a)
				c.Publish("fp/dev/lock-1/answer", 0, false, b)
			}).Wait()
			c.Subscribe("fp/dev/+/status", 1, func(c paho.Client, m paho.Message) {
				var r proto.Report
				json.Unmarshal(m.Payload(), &r)
				w.heard <- r
				switch w.answer.Load() {
				case "ack":
					a, _ := json.Marshal(proto.ReportAck{ReportID: r.ReportID, Stored: true})
					c.Publish("fp/dev/lock-1/ack", 1, false, a)
				case "refuse":
					a, _ := json.Marshal(proto.ReportAck{ReportID: r.ReportID, Stored: false})
					c.Publish("fp/dev/lock-1/ack", 1, false, a)
				}
			}).Wait()
		})
	w.server = paho.NewClient(opts)
	if tok := w.server.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("the stand-in server could not connect: %v\n%s", tok.Error(), w.mosq.Log())
	}
	t.Cleanup(func() { w.server.Disconnect(100) })
	waitUntil(t, "the stand-in server to subscribe", func() bool { return w.mosq.Subscribed("fieldpatch:server-test", "fp/dev/+/status") })
	return w
}

// session dials the device's MQTT session (counting its wake-ups) and
// waits until it is up; it ends with the test.
func (w *mqttWorld) session() *MQTT {
	w.t.Helper()
	m, err := w.link.DialMQTT(w.mosq.URL, func() { w.wakes.Add(1) })
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(m.Close)
	waitUntil(w.t, "the session", m.Connected)
	return m
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The device's MQTT session: progress reports go over MQTT when the
// server acknowledges them there, and over HTTPS in every other case (the
// server refuses, stays silent, or the broker is down); outcomes always go
// over HTTPS. Notifications wake the agent, and so does every connection
// made, the first and each after the broker restarted. No report is lost.
func TestMQTTReportsFallBackToHTTPS(t *testing.T) {
	w := newMQTTWorld(t)
	m := w.session()
	waitUntil(t, "the wake-up on connecting", func() bool { return w.wakes.Load() >= 1 })
	srv := WithMQTT{Server: w.link, MQTT: m}
	ctx := context.Background()
	send := func(id, status string) {
		t.Helper()
		if err := srv.Report(ctx, proto.Report{ReportID: id, UpdateID: "u1", Status: status}); err != nil {
			t.Fatalf("report %s: %v", id, err)
		}
	}
	overHTTPS := func(id string) bool {
		for _, got := range w.https.ids() {
			if got == id {
				return true
			}
		}
		return false
	}
	heard := func(id string) {
		t.Helper()
		select {
		case r := <-w.heard:
			if r.ReportID != id {
				t.Fatalf("the server heard %s over MQTT, want %s", r.ReportID, id)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s did not arrive over MQTT", id)
		}
	}

	send("dl-25", proto.StatusDownloading) // acknowledged over MQTT
	heard("dl-25")
	if overHTTPS("dl-25") {
		t.Fatal("an acknowledged progress report went over HTTPS too")
	}
	send("final", proto.StatusCommitted) // outcomes: HTTPS only
	if !overHTTPS("final") {
		t.Fatal("the outcome did not go over HTTPS")
	}
	select {
	case r := <-w.heard:
		t.Fatalf("the outcome went over MQTT: %+v", r)
	default:
	}
	w.answer.Store("refuse")
	send("dl-50", proto.StatusDownloading)
	heard("dl-50")
	if !overHTTPS("dl-50") {
		t.Fatal("a refused progress report was not sent over HTTPS")
	}
	w.answer.Store("silent")
	start := time.Now()
	send("dl-75", proto.StatusDownloading)
	heard("dl-75")
	if !overHTTPS("dl-75") || time.Since(start) < mqttAckTimeout {
		t.Fatalf("an unacknowledged progress report: over HTTPS %v after %v", overHTTPS("dl-75"), time.Since(start))
	}
	// A server that does not answer (one without MQTT reports) costs the
	// wait once: until the next connection reports go straight to HTTPS.
	start = time.Now()
	send("dl-100", proto.StatusDownloading)
	if !overHTTPS("dl-100") || time.Since(start) > time.Second {
		t.Fatalf("after an unacknowledged report: over HTTPS %v after %v", overHTTPS("dl-100"), time.Since(start))
	}
	select {
	case r := <-w.heard:
		t.Fatalf("%s went over MQTT after the server stayed silent", r.ReportID)
	default:
	}

	// A notification wakes the agent.
	before := w.wakes.Load()
	w.server.Publish("fp/dev/lock-1/notify", 1, false, `{"kind":"update"}`).Wait()
	waitUntil(t, "the notification's wake-up", func() bool { return w.wakes.Load() > before })

	// The broker dies: reports go over HTTPS at once.
	w.mosq.Kill()
	waitUntil(t, "the session to see the broker gone", func() bool { return !m.Connected() })
	w.answer.Store("ack")
	start = time.Now()
	send("inst", proto.StatusInstalling)
	if !overHTTPS("inst") || time.Since(start) > time.Second {
		t.Fatalf("with the broker down: over HTTPS %v after %v", overHTTPS("inst"), time.Since(start))
	}
	if err := m.Report(ctx, proto.Report{ReportID: "x", UpdateID: "u1", Status: proto.StatusInstalling}); !errors.Is(err, ErrMQTTDown) {
		t.Fatalf("MQTT.Report with the broker down: %v", err)
	}
	// It comes back: the session reconnects (a wake-up: a notification may
	// have been missed) and reports go over MQTT again.
	before = w.wakes.Load()
	w.mosq.Start()
	waitUntil(t, "the session to reconnect", m.Connected)
	waitUntil(t, "the wake-up after reconnecting", func() bool { return w.wakes.Load() > before })
	waitUntil(t, "the stand-in server to be back", func() bool { return w.server.IsConnectionOpen() })
	waitUntil(t, "the stand-in server to subscribe again", func() bool {
		return strings.Count(w.mosq.Log(), " fieldpatch:server-test 1 fp/dev/+/status\n") >= 2
	})
	send("reboot", proto.StatusRebooting)
	heard("reboot")
	if overHTTPS("reboot") {
		t.Fatal("after the reconnection an acknowledged report went over HTTPS")
	}
	if got := w.https.ids(); len(got) != 5 { // final, dl-50, dl-75, dl-100, inst
		t.Fatalf("over HTTPS: %v", got)
	}
}

// The check-in a notification prompts goes over MQTT and gets the
// server's answer there; any other check-in goes over HTTPS. A 503 over
// MQTT is the caller's to wait out; an unanswered check-in goes over HTTPS
// after the timeout, and so does every check-in until the next connection.
func TestMQTTCheckIns(t *testing.T) {
	defer func(d time.Duration) { mqttAnswerTimeout = d }(mqttAnswerTimeout)
	mqttAnswerTimeout = time.Second
	w := newMQTTWorld(t)
	m := w.session()
	waitUntil(t, "the device to subscribe to its answers", func() bool { return w.mosq.Subscribed("lock-1", "fp/dev/lock-1/answer") })
	srv := WithMQTT{Server: w.link, MQTT: m}
	ctx := context.Background()
	c := proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}
	notify := func() {
		t.Helper()
		n := w.wakes.Load()
		w.server.Publish("fp/dev/lock-1/notify", 1, false, `{"kind":"update"}`).Wait()
		waitUntil(t, "the notification", func() bool { return w.wakes.Load() > n })
	}
	check := func(what string, wantHTTPS, wantMQTT int64, wantOffer bool, wantBusy time.Duration) {
		t.Helper()
		https, mqtt := w.https.checkIns.Load(), w.checkInsHeard.Load()
		resp, err := srv.CheckIn(ctx, c)
		var busy *BusyError
		switch {
		case wantBusy > 0:
			if !errors.As(err, &busy) || busy.RetryAfter != wantBusy {
				t.Fatalf("%s: %v, want busy for %v", what, err, wantBusy)
			}
		case err != nil:
			t.Fatalf("%s: %v", what, err)
		case (resp.Offer != nil) != wantOffer || wantOffer && resp.Offer.UpdateID != "u-7":
			t.Fatalf("%s: answered %+v", what, resp)
		}
		if d := w.https.checkIns.Load() - https; d != wantHTTPS {
			t.Errorf("%s: %d check-ins over HTTPS, want %d", what, d, wantHTTPS)
		}
		if d := w.checkInsHeard.Load() - mqtt; d != wantMQTT {
			t.Errorf("%s: %d check-ins over MQTT, want %d", what, d, wantMQTT)
		}
	}
	check("a timed poll", 1, 0, false, 0)
	notify()
	check("after a notification", 0, 1, true, 0)
	check("the next timed poll", 1, 0, false, 0)
	w.checkInAnswer.Store("busy")
	notify()
	check("after a notification, the server busy", 0, 1, false, 7*time.Second)
	w.checkInAnswer.Store("silent")
	notify()
	start := time.Now()
	check("after a notification, no answer", 1, 1, false, 0)
	if took := time.Since(start); took < mqttAnswerTimeout {
		t.Errorf("went over HTTPS after %v, before the timeout", took)
	}
	w.checkInAnswer.Store("offer")
	notify()
	check("after an unanswered check-in, until the next connection", 1, 0, false, 0)
}
