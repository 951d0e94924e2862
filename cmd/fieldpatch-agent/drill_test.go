package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// Drill (a), end to end with a fleet of real agents on v1: the TUF targets
// key is declared leaked and rotated; v2 is published with the new key and
// every device installs it. Then whoever holds the leaked key (and has
// broken into the server: its online keys and files) publishes targets
// signed with it, offering v3: every device refuses the metadata before
// downloading a byte, reports why, and stays on v2.
func TestDrillLeakedTargetsKey(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	addr := strings.TrimPrefix(srv.url, "https://")
	keys := filepath.Join(t.TempDir(), "keys")
	srv.run("trust", "init", "--keys", keys)
	devs, ids := fleetOf(t, srv, 4, false)

	// The leak is declared: rotate the targets key before anything else.
	if out := srv.run("trust", "rotate-targets", "--keys", keys); !strings.Contains(out, "retired key files: targets-1") {
		t.Fatalf("rotate-targets: %s", out)
	}
	leaked, err := trust.LoadPrivateKey(filepath.Join(keys, "retired", "targets-1.pem"))
	if err != nil {
		t.Fatal(err)
	}
	srv.run("release", "upload", "--id", "lock-2.0.0", devs[ids[0]].v2)
	srv.run("trust", "publish", "lock-2.0.0", "--keys", keys)
	srv.run("rollout", "create", "lock-2.0.0", "--id", "v2", "--group", "fleet", "--min-sample", "1", "--start")
	l := startLives(t, agentBin, devs)
	waitFor(t, "every device on 2.0.0", 90*time.Second, func() bool {
		for _, d := range ids {
			if lastUpdate(srv.device(d)) != "committed" {
				return false
			}
		}
		return true
	})
	l.wait()

	// The attacker has broken into the server: with its TLS key, its
	// online TUF keys and the leaked targets key, it stops the real server
	// and answers in its place, offering v3 with targets signed by the
	// leaked key (and snapshot and timestamp by the online keys). The real
	// server would not offer them: its targets no longer verify.
	v3 := filepath.Join(t.TempDir(), "v3.img")
	os.WriteFile(v3, buildImage(t, "3.0.0", 3, 64<<10), 0o644)
	forgeTargets(t, srv.dataDir, leaked, v3)
	srv.cmd.Process.Signal(syscall.SIGTERM)
	srv.cmd.Wait()
	imp := startImpostor(t, srv.dataDir, addr, v3)
	startLives(t, agentBin, devs)
	deadline := time.Now().Add(90 * time.Second)
	for imp.refusals() < len(ids) {
		if time.Now().After(deadline) {
			for _, d := range ids {
				log, _ := os.ReadFile(filepath.Join(devs[d].dir, "state", "update.log"))
				t.Logf("%s:\n%s", d, log[max(0, len(log)-800):])
			}
			t.Fatalf("%d of %d devices refused v3 in time", imp.refusals(), len(ids))
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, d := range ids {
		why := imp.reason(d)
		if !strings.Contains(why, "refused before download: tuf") || !strings.Contains(why, "targets") {
			t.Errorf("%s refused with %q", d, why)
		}
		// Nothing was downloaded or installed: it runs 2.0.0 from slot b.
		if _, f := devs[d].status(); f.Booted != "b" || f.RunningVersion != "2.0.0" {
			t.Errorf("%s: running %s from %s", d, f.RunningVersion, f.Booted)
		}
	}
	if n := imp.downloads.Load(); n != 0 {
		t.Errorf("%d downloads of the impostor's image", n)
	}
}

// impostor answers devices in the real server's place, as an attacker with
// its keys would: an offer of an image for every check-in, its metadata
// files, and a record of the reports it gets.
type impostor struct {
	mu        sync.Mutex
	reports   map[string]string // device -> reason of its failed report
	downloads atomic.Int64
}

func (i *impostor) refusals() int { i.mu.Lock(); defer i.mu.Unlock(); return len(i.reports) }

func (i *impostor) reason(dev string) string { i.mu.Lock(); defer i.mu.Unlock(); return i.reports[dev] }

func startImpostor(t *testing.T, dataDir, addr, img string) *impostor {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dataDir, "pki", "server.pem"), filepath.Join(dataDir, "pki", "server.key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := os.ReadFile(filepath.Join(dataDir, "pki", "ca.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	b, _ := os.ReadFile(img)
	sum := sha256.Sum256(b)
	i := &impostor{reports: map[string]string{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v1/checkin", func(w http.ResponseWriter, r *http.Request) {
		dev := r.TLS.PeerCertificates[0].Subject.CommonName
		json.NewEncoder(w).Encode(map[string]any{"next_poll_seconds": 1, "offer": map[string]any{
			"update_id": "evil-" + dev, "url": "/api/v1/blobs/" + hex.EncodeToString(sum[:]),
			"target": map[string]any{"name": "lock/3.0.0.img", "length": len(b), "hashes": map[string]string{"sha256": hex.EncodeToString(sum[:])},
				"custom": map[string]any{"version": "3.0.0", "security_counter": 3, "hw_class": "lock", "format": "mcuboot"}}}})
	})
	mux.HandleFunc("GET /api/v1/tuf/{file}", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, filepath.Join(dataDir, "tuf", "metadata", filepath.Base(r.PathValue("file"))))
	})
	mux.HandleFunc("GET /api/v1/blobs/{sum}", func(w http.ResponseWriter, r *http.Request) {
		i.downloads.Add(1)
		w.Write(b)
	})
	mux.HandleFunc("POST /api/v1/reports", func(w http.ResponseWriter, r *http.Request) {
		var rep struct {
			ReportID string `json:"report_id"`
			UpdateID string `json:"update_id"`
			Status   string `json:"status"`
			Reason   string `json:"reason"`
		}
		json.NewDecoder(r.Body).Decode(&rep)
		if rep.Status == "failed" {
			i.mu.Lock()
			i.reports[strings.TrimPrefix(rep.UpdateID, "evil-")] = rep.Reason
			i.mu.Unlock()
		}
		json.NewEncoder(w).Encode(map[string]any{"report_id": rep.ReportID, "stored": true})
	})
	var ln net.Listener
	for range 50 { // the real server's port, once it has let go of it
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, MinVersion: tls.VersionTLS13}}
	go hs.ServeTLS(ln, "", "")
	t.Cleanup(func() { hs.Close() })
	return i
}

// forgeTargets writes into a server's repository targets (next version)
// listing image, signed with key, and a snapshot and timestamp naming it,
// signed with the server's online keys.
func forgeTargets(t *testing.T, dataDir string, key crypto.Signer, image string) {
	t.Helper()
	meta := filepath.Join(dataDir, "tuf", "metadata")
	newest := func(role string) (int64, []byte) {
		for v := int64(100); v > 0; v-- {
			if b, err := os.ReadFile(filepath.Join(meta, fmt.Sprintf("%d.%s.json", v, role))); err == nil {
				return v, b
			}
		}
		t.Fatalf("no %s metadata", role)
		return 0, nil
	}
	sign := func(md interface {
		Sign(signature.Signer) (*metadata.Signature, error)
		ClearSignatures()
		ToBytes(bool) ([]byte, error)
	}, k crypto.Signer) []byte {
		s, err := signature.LoadSigner(k, crypto.Hash(0))
		if err != nil {
			t.Fatal(err)
		}
		md.ClearSignatures()
		md.Sign(s)
		b, _ := md.ToBytes(true)
		return b
	}
	online := func(role string) crypto.Signer {
		k, err := trust.LoadPrivateKey(filepath.Join(dataDir, "tuf", "keys", role+".pem"))
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	tv, tb := newest(metadata.TARGETS)
	targets, _ := metadata.Targets().FromBytes(tb)
	targets.Signed.Version = tv + 1
	img, _ := os.ReadFile(image)
	sum := sha256.Sum256(img)
	custom := json.RawMessage(`{"version": "3.0.0", "security_counter": 3, "hw_class": "lock", "format": "mcuboot"}`)
	targets.Signed.Targets["lock/3.0.0.img"] = &metadata.TargetFiles{Length: int64(len(img)), Hashes: metadata.Hashes{"sha256": sum[:]}, Custom: &custom}
	os.WriteFile(filepath.Join(meta, fmt.Sprintf("%d.targets.json", tv+1)), sign(targets, key), 0o644)
	sv, sb := newest(metadata.SNAPSHOT)
	snap, _ := metadata.Snapshot().FromBytes(sb)
	snap.Signed.Version = sv + 1
	snap.Signed.Meta["targets.json"] = metadata.MetaFile(tv + 1)
	snapRaw := sign(snap, online(metadata.SNAPSHOT))
	os.WriteFile(filepath.Join(meta, fmt.Sprintf("%d.snapshot.json", sv+1)), snapRaw, 0o644)
	tsRaw, _ := os.ReadFile(filepath.Join(meta, "timestamp.json"))
	ts, _ := metadata.Timestamp().FromBytes(tsRaw)
	ts.Signed.Version++
	ssum := sha256.Sum256(snapRaw)
	mf := metadata.MetaFile(sv + 1)
	mf.Length, mf.Hashes = int64(len(snapRaw)), metadata.Hashes{"sha256": ssum[:]}
	ts.Signed.Meta["snapshot.json"] = mf
	os.WriteFile(filepath.Join(meta, "timestamp.json"), sign(ts, online(metadata.TIMESTAMP)), 0o644)
}

// Drill (b), end to end with a fleet of real agents on v1: the
// image-signing key is declared leaked. The operator publishes a new image
// key and the old one revoked at key epoch 1; v2 is dual-signed and
// published with key epoch 1; every device installs and commits it. After
// that an image signed only with the leaked key is refused at install
// (reported, nothing written) and at boot (armed by hand into the other
// slot, the selector boots the committed one) on every device.
func TestDrillLeakedImageKey(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--rollout-tick=200ms")
	keys := filepath.Join(t.TempDir(), "keys")
	srv.run("trust", "init", "--keys", keys)
	devs, ids := fleetOf(t, srv, 3, false)
	leakedPub, _ := filepath.Abs(filepath.Join(vectors, "mcuboot", "ed25519.pub.pem"))
	leaked, err := trust.LoadPrivateKey(filepath.Join(vectors, "mcuboot", "ed25519.pem"))
	if err != nil {
		t.Fatal(err)
	}
	fresh, _ := trust.GenerateKey(trust.KeyEd25519)
	_, freshPub, err := trust.WriteKeyPair(filepath.Join(t.TempDir(), "image-2"), fresh)
	if err != nil {
		t.Fatal(err)
	}
	if out := srv.run("trust", "image-keys", "--add", freshPub, "--revoke", leakedPub, "--at-epoch", "1", "--keys", keys); !strings.Contains(out, "published 2 image keys") {
		t.Fatalf("image-keys: %s", out)
	}
	v2 := filepath.Join(t.TempDir(), "v2.img")
	os.WriteFile(v2, buildImageBy(t, "2.0.0", 2, leaked, fresh), 0o644)
	srv.run("release", "upload", "--id", "lock-2.0.0", v2)
	srv.run("trust", "publish", "lock-2.0.0", "--key-epoch", "1", "--keys", keys)
	srv.run("rollout", "create", "lock-2.0.0", "--id", "v2", "--group", "fleet", "--min-sample", "1", "--start")
	l := startLives(t, agentBin, devs)
	waitFor(t, "every device on 2.0.0", 90*time.Second, func() bool {
		for _, d := range ids {
			if lastUpdate(srv.device(d)) != "committed" {
				return false
			}
		}
		return true
	})
	time.Sleep(2 * time.Second) // the committed outcome is reported after the commit itself
	l.wait()
	for _, d := range ids {
		out := devs[d].must("nv", "--config", devs[d].cfg)
		if !strings.Contains(out, "key epoch 1") && !strings.Contains(out, `"key_epoch": 1`) {
			t.Fatalf("%s: key epoch not raised:\n%s", d, out)
		}
	}

	// At install: v3, signed only with the leaked key, published.
	v3img := buildImageBy(t, "3.0.0", 3, leaked)
	v3 := filepath.Join(t.TempDir(), "v3.img")
	os.WriteFile(v3, v3img, 0o644)
	srv.run("release", "upload", "--id", "lock-3.0.0", v3)
	srv.run("trust", "publish", "lock-3.0.0", "--keys", keys)
	srv.run("rollout", "create", "lock-3.0.0", "--id", "v3", "--group", "fleet", "--min-sample", "100", "--start")
	startLives(t, agentBin, devs)
	waitFor(t, "every device to refuse v3", 90*time.Second, func() bool {
		for _, d := range ids {
			if lastUpdate(srv.device(d)) != "failed" {
				return false
			}
		}
		return true
	})
	for _, d := range ids {
		dv := srv.device(d)
		if dv.Version != "2.0.0" || !strings.Contains(dv.Updates[0].Reason, "trusted") {
			t.Errorf("%s: version %s, reason %q", d, dv.Version, dv.Updates[0].Reason)
		}
	}

	// At boot: v3 written into the other slot and armed by hand.
	for _, d := range ids {
		dev := devs[d]
		slotA := append(append([]byte(nil), v3img...), make([]byte, 512<<10-len(v3img))...)
		os.WriteFile(filepath.Join(dev.dir, "slot-a.img"), slotA, 0o644)
		dev.must("env", "--config", dev.cfg, "fp_trial=a", "fp_trial_left=3")
		out := dev.must("boot", "--config", dev.cfg)
		if !strings.Contains(out, "booted=b") {
			t.Errorf("%s: the selector did not keep slot b:\n%s", d, out)
		}
	}
}

// buildImageBy builds an image signed by every key given.
func buildImageBy(t *testing.T, version string, counter uint32, keys ...crypto.Signer) []byte {
	t.Helper()
	payload := bytes.Repeat([]byte("firmware "+version+" "), 4096)
	var b bytes.Buffer
	if _, err := image.Build(context.Background(), &b, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
		Version: version, SecurityCounter: &counter, HWClass: "lock", Signers: keys,
	}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}
