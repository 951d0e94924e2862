package main

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
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/notify"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// --mqtt-broker and "mqtt_broker": an external broker replaces the
// embedded one; asking for both, or for a broker that is not
// mqtts://HOST:PORT, is a usage error.
func TestMQTTBrokerSettings(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		args []string
		file string
		want string
	}{
		{"both flags", []string{"--mqtt-listen", "127.0.0.1:0", "--mqtt-broker", "mqtts://127.0.0.1:8883"}, "", "exclude each other"},
		{"not mqtts", []string{"--mqtt-broker", "mqtt://127.0.0.1:1883"}, "", "want mqtts://HOST:PORT"},
		{"no port", []string{"--mqtt-broker", "mqtts://broker.example"}, "", "want mqtts://HOST:PORT"},
		{"a path", []string{"--mqtt-broker", "mqtts://broker.example:8883/fp"}, "", "want mqtts://HOST:PORT"},
		{"both keys", nil, `{"mqtt_listen": "127.0.0.1:0", "mqtt_broker": "mqtts://127.0.0.1:8883"}`, "exclude each other"},
		{"a bad key", nil, `{"mqtt_broker": "tcp://127.0.0.1:8883"}`, "want mqtts://HOST:PORT"},
	} {
		args := append([]string{"serve", "--listen", "127.0.0.1:0", "--data-dir", filepath.Join(dir, "data")}, c.args...)
		if c.file != "" {
			f := filepath.Join(dir, "serve.json")
			os.WriteFile(f, []byte(c.file), 0o644)
			args = append(args, "--config", f)
		}
		if code, _, errs := fp(t, args...); code != 2 || !strings.Contains(errs, c.want) {
			t.Errorf("%s: exit %d %q, want 2 and %q", c.name, code, errs, c.want)
		}
	}

	// From the file: the embedded broker is off, the server names the
	// external one and the identity it connects as.
	f := filepath.Join(dir, "serve.json")
	os.WriteFile(f, []byte(`{"mqtt_broker": "mqtts://127.0.0.1:1"}`), 0o644)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var out, errs testenv.Buffer
	done := make(chan int)
	go func() {
		done <- run(ctx, []string{"serve", "--listen", addr, "--data-dir", filepath.Join(dir, "external"), "--config", f}, &out, &errs)
	}()
	defer func() { cancel(); <-done }()
	for i := 0; i < 400 && !strings.Contains(out.String(), "MQTT broker"); i++ {
		time.Sleep(25 * time.Millisecond)
	}
	if want := "MQTT broker     mqtts://127.0.0.1:1 (external; the server connects as " + notify.ServerIdentity + ")"; !strings.Contains(out.String(), want) {
		t.Fatalf("serve with mqtt_broker said %q (%s), want %q", out.String(), errs.String(), want)
	}
}

// No device can be provisioned or enroll under the name the server's own
// certificate carries on an external broker.
func TestServerIdentityCannotEnroll(t *testing.T) {
	url, data := serveInProcess(t)
	srv := []string{"--server", url, "--data-dir", data}
	if code, _, errs := fp(t, append([]string{"device", "provision", notify.ServerIdentity, "--out", filepath.Join(t.TempDir(), "b")}, srv...)...); code == 0 {
		t.Fatalf("provisioned a device named %s", notify.ServerIdentity)
	} else if !strings.Contains(errs, "400") {
		t.Errorf("provisioning %s: exit %d %s, want a 400", notify.ServerIdentity, code, errs)
	}
	tok := strings.Fields(mustFP(t, append([]string{"enroll-token", "create", "--uses", "5"}, srv...)...))[0]
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(k.Public())
	body, _ := json.Marshal(proto.EnrollRequest{DeviceID: notify.ServerIdentity, Token: tok,
		PublicKey: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))})
	ca, _ := os.ReadFile(filepath.Join(data, "pki", "ca.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := hc.Post(url+proto.PathEnroll, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("enrolling as %s with a fleet token: %s, want 400", notify.ServerIdentity, resp.Status)
	}
	// The token was not spent on it: a real device still enrolls with it.
	body, _ = json.Marshal(proto.EnrollRequest{DeviceID: "lock-1", Token: tok,
		PublicKey: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))})
	if resp, err = hc.Post(url+proto.PathEnroll, "application/json", bytes.NewReader(body)); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("a device enrolling with the same token: %v %v", resp, err)
	}
	resp.Body.Close()
}
