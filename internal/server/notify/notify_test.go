package notify

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

type world struct {
	t      *testing.T
	dir    string
	ca     *pki.CA
	broker *Broker
	port   string
}

func newWorld(t *testing.T) *world {
	dir := t.TempDir()
	ca, _, err := pki.LoadOrCreateCA(filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	cert, _, err := ca.LoadOrCreateServerCert(filepath.Join(dir, "pki"), []string{"127.0.0.1", "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Listen("127.0.0.1:0", Config{TLS: &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: ca.Pool()},
		Allowed: func(id string) bool { return id != "lock-revoked" }})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	_, port, _ := strings.Cut(b.Addr().String(), ":")
	return &world{t: t, dir: dir, ca: ca, broker: b, port: port}
}

// device writes a device's key and certificate for the mosquitto tools.
func (w *world) device(id string) []string { return deviceArgs(w.t, w.ca, w.dir, w.port, id) }

// deviceArgs issues a device certificate from ca, writes it and its key
// into dir, and returns the mosquitto tools' arguments to connect to port
// with them (the CA in dir/pki).
func deviceArgs(t *testing.T, ca *pki.CA, dir, port, id string) []string {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.IssueDevice(id, k.Public())
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	certFile, keyFile := filepath.Join(dir, id+".pem"), filepath.Join(dir, id+".key")
	os.WriteFile(certFile, certPEM, 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	return []string{"-h", "127.0.0.1", "-p", port, "--cafile", filepath.Join(dir, "pki", "ca.pem"), "--cert", certFile, "--key", keyFile}
}

// A device subscribed with mosquitto_sub and its own certificate receives
// the server's notification.
func TestMosquittoSubReceivesNotification(t *testing.T) {
	sub := testenv.Command(t, "mosquitto_sub")
	w := newWorld(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, sub, append(w.device("lock-1"), "-i", "lock-1", "-t", NotifyTopic("lock-1"), "-q", "1", "-C", "1", "-W", "15")...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// Notify until the subscriber has it (it may not have subscribed yet).
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("mosquitto_sub: %v: %s", err, errb.String())
			}
			var n Notice
			if err := json.Unmarshal(bytes.TrimSpace(out.Bytes()), &n); err != nil || n.Kind != "update" || n.At.IsZero() {
				t.Fatalf("notification %q: %v", out.String(), err)
			}
			return
		case <-tick.C:
			if err := w.broker.Notify("update", "lock-1"); err != nil {
				t.Fatal(err)
			}
		case <-ctx.Done():
			t.Fatalf("no notification received: %s", errb.String())
		}
	}
}

// A device cannot read or write another device's topics, nor use
// wildcards above its own; a client ID that is not the certificate's, a
// revoked device, and a connection without a certificate are refused.
func TestBrokerRefusesOtherTopicsAndIdentities(t *testing.T) {
	sub := testenv.Command(t, "mosquitto_sub")
	pub := testenv.Command(t, "mosquitto_pub")
	w := newWorld(t)
	run := func(bin string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		return string(out), err
	}
	lock1 := w.device("lock-1")
	w.device("lock-2")
	for _, topic := range []string{NotifyTopic("lock-2"), "fp/dev/#", "#", "$share/g/fp/dev/lock-2/notify", "fp/dev/+/notify"} {
		out, _ := run(sub, append(lock1, "-i", "lock-1", "-t", topic, "-C", "1", "-W", "3")...)
		if !strings.Contains(out, "denied") {
			t.Errorf("lock-1 subscribing %s: %q, want the subscription denied", topic, out)
		}
	}
	if out, err := run(pub, append(lock1, "-i", "lock-1", "-t", "fp/dev/lock-1/status", "-q", "1", "-m", `{"ok":true}`)...); err != nil {
		t.Errorf("publishing on its own topic: %v %s", err, out)
	}
	if out, err := run(pub, append(lock1, "-i", "lock-1", "-t", "fp/dev/lock-2/status", "-q", "1", "-m", "forged")...); err == nil {
		t.Errorf("lock-1 published on lock-2's topic at QoS 1: %s", out)
	}
	if out, err := run(sub, append(lock1, "-i", "lock-2", "-t", NotifyTopic("lock-2"), "-C", "1", "-W", "3")...); err == nil || !strings.Contains(strings.ToLower(out), "not authori") {
		t.Errorf("lock-1's certificate with client id lock-2: %v %q, want refused", err, out)
	}
	revoked := w.device("lock-revoked")
	if out, err := run(sub, append(revoked, "-i", "lock-revoked", "-t", NotifyTopic("lock-revoked"), "-C", "1", "-W", "3")...); err == nil || !strings.Contains(strings.ToLower(out), "not authori") {
		t.Errorf("a revoked device: %v %q, want refused", err, out)
	}
	noCert := []string{"-h", "127.0.0.1", "-p", w.port, "--cafile", filepath.Join(w.dir, "pki", "ca.pem")}
	if out, err := run(sub, append(noCert, "-i", "lock-1", "-t", NotifyTopic("lock-1"), "-C", "1", "-W", "3")...); err == nil {
		t.Errorf("no client certificate: accepted: %s", out)
	}
	// Oversized messages are refused, and the broker goes on.
	big := filepath.Join(w.dir, "big")
	os.WriteFile(big, bytes.Repeat([]byte("x"), MaxPacket+1), 0o644)
	if out, err := run(pub, append(lock1, "-i", "lock-1", "-t", "fp/dev/lock-1/status", "-q", "1", "-f", big)...); err == nil {
		t.Errorf("a %d-byte message was accepted: %s", MaxPacket+1, out)
	}
	if out, err := run(pub, append(lock1, "-i", "lock-1", "-t", "fp/dev/lock-1/status", "-q", "1", "-m", "small again")...); err != nil {
		t.Errorf("after an oversized message: %v %s", err, out)
	}
	// The broker still serves lock-1 after all that.
	if w.broker.Notify("update", "lock-1", "bad/id", "") != nil {
		t.Error("notify failed")
	}
}
