package notify

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// With Mosquitto as the external broker, configured as the docs say, a
// device reads only its own topics: device A subscribed to B's notify
// topic, to fp/dev/# and to fp/dev/+/notify receives its own notifications
// and none of B's, while B receives hers. A that connects under B's client
// ID (Mosquitto does not tie client IDs to certificates) still reads only
// its own topics.
func TestMosquittoKeepsDevicesApart(t *testing.T) {
	f := newFleet(t)
	f.external()
	lock1, lock2 := f.device("lock-1"), f.device("lock-2")
	spy := startSub(t, append(lock1, "-t", NotifyTopic("lock-2"), "-t", "fp/dev/#", "-t", "fp/dev/+/notify", "-t", NotifyTopic("lock-1"), "-q", "1", "-v", "-W", "25")...)
	victim := startSub(t, append(lock2, "-t", NotifyTopic("lock-2"), "-q", "1", "-C", "1", "-v", "-W", "25")...)
	own := func() int { return strings.Count(spy.out.String(), NotifyTopic("lock-1")+" ") }
	// Notify both until each has heard its own (both subscribed by then),
	// then three rounds more, which the spy must hear (so B's reached the
	// broker while the spy was subscribed).
	deadline := time.Now().Add(20 * time.Second)
	for own() == 0 || len(victim.done) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("notifications did not arrive: spy %q, lock-2 %q", spy.out.String(), victim.out.String())
		}
		if err := f.notify("lock-2", "lock-1"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := <-victim.done; err != nil || !strings.HasPrefix(victim.out.String(), NotifyTopic("lock-2")+" ") {
		t.Fatalf("lock-2's own subscription: %v %q", err, victim.out.String())
	}
	heard := own()
	for range 3 {
		if err := f.notify("lock-2", "lock-1"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the spy to hear its own last notifications", func() bool { return own() >= heard+3 })
	if out := spy.out.String(); strings.Contains(out, "lock-2") {
		t.Fatalf("lock-1 read lock-2's topic through Mosquitto:\n%s", out)
	}

	// lock-1's certificate under lock-2's client ID.
	impostor := startSub(t, append(append(lock1[:len(lock1)-2:len(lock1)-2], "-i", "lock-2"), "-t", NotifyTopic("lock-2"), "-q", "1", "-v", "-W", "4")...)
	for range 10 {
		f.notify("lock-2")
		time.Sleep(200 * time.Millisecond)
	}
	var ee *exec.ExitError
	if err := <-impostor.done; !errors.As(err, &ee) || ee.ExitCode() != 27 { // 27: timed out, connected and subscribed
		t.Fatalf("lock-1 under lock-2's client ID: %v %q, want connected, subscribed, hearing nothing", err, impostor.out.String())
	}
	if out := impostor.out.String(); strings.Contains(out, NotifyTopic("lock-2")+" ") {
		t.Fatalf("lock-1 under lock-2's client ID read lock-2's notifications: %q", out)
	}
}

// The server's connection to Mosquitto survives the broker's crash: while
// it is down Notify says so at once (ErrNotConnected), the server connects
// again by itself once it is back, and status reports are stored again.
func TestExternalBrokerRestarts(t *testing.T) {
	f := newFleet(t)
	f.external()
	lock1 := f.device("lock-1")
	if a := request(t, lock1, "lock-1", report("r-1", f.updates["lock-1"], proto.StatusDownloading, 0.25)); !a.Stored {
		t.Fatalf("before the crash: %+v", a)
	}
	f.mosq.Kill()
	waitFor(t, "the client to see the broker gone", func() bool { return !f.client.Connected() })
	if err := f.notify("lock-1"); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("notify with the broker down: %v, want ErrNotConnected", err)
	}
	f.mosq.Start()
	f.waitUp()
	if a := request(t, lock1, "lock-1", report("r-2", f.updates["lock-1"], proto.StatusInstalling, 0)); !a.Stored {
		t.Fatalf("after the restart: %+v", a)
	}
	if u := f.update("lock-1"); u.Status != proto.StatusInstalling {
		t.Fatalf("after the restart the store has %s", u.Status)
	}
}

// The name the server's own certificate carries on an external broker can
// be no device's: it is outside the device ID grammar, so it cannot be
// provisioned; its certificate names no device (the device API refuses
// it), and the embedded broker refuses it.
func TestServerIdentityIsNoDevice(t *testing.T) {
	if err := proto.ValidID("device", ServerIdentity); err == nil {
		t.Fatalf("%q is a valid device ID", ServerIdentity)
	}
	f := newFleet(t)
	if err := f.st.AddDevice(context.Background(), ServerIdentity, nil); err == nil {
		t.Fatalf("a device %q was registered", ServerIdentity)
	}
	cert, notAfter, err := IssueServerIdentity(f.ca, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if leaf.Subject.CommonName != ServerIdentity || leaf.NotAfter.Sub(notAfter).Abs() > time.Second || len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("server identity certificate: CN %q, until %v, usage %v", leaf.Subject.CommonName, leaf.NotAfter, leaf.ExtKeyUsage)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: f.ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("not issued by the device CA: %v", err)
	}
	if id, err := pki.DeviceID(leaf); err == nil {
		t.Fatalf("the server identity names device %q", id)
	}
	// The embedded broker refuses it.
	f.embedded()
	der, _ := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	certFile, keyFile := filepath.Join(f.dir, "server-id.pem"), filepath.Join(f.dir, "server-id.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	bin := testenv.Command(t, "mosquitto_sub")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "-h", "127.0.0.1", "-p", f.port, "--cafile", filepath.Join(f.dir, "pki", "ca.pem"), "--cert", certFile, "--key", keyFile,
		"-i", ServerIdentity, "-t", "fp/dev/#", "-C", "1", "-W", "3").CombinedOutput()
	if err == nil || !strings.Contains(strings.ToLower(string(out)), "not authori") {
		t.Fatalf("the embedded broker and the server identity: %v %q, want refused", err, out)
	}
}
