package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/link"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// coapFixture is a server with CoAP on, one release of about 300 KiB
// offered to device "lock-1", and "lock-2" enrolled without an offer.
type coapFixture struct {
	dir, url, data, coap string
	srv                  []string
	sum                  string // the offered image's SHA-256
	offer                *proto.Offer
}

func newCoAPFixture(t *testing.T) *coapFixture {
	t.Helper()
	f := &coapFixture{dir: t.TempDir()}
	key := filepath.Join(f.dir, "release")
	mustFP(t, "key", "gen", "--out", key)
	f.url, f.data = serveInProcess(t, "--image-key", key+".pub.pem", "--rollout-tick", "1s", "--coap-listen", "127.0.0.1:0")
	a, ok := coapAddrs.Load(f.data)
	if !ok {
		t.Fatal("the server did not report its CoAP address")
	}
	f.coap = a.(string)
	f.srv = []string{"--server", f.url, "--data-dir", f.data}
	payload := make([]byte, 300<<10)
	rand.Read(payload)
	pf := filepath.Join(f.dir, "payload.bin")
	os.WriteFile(pf, payload, 0o644)
	img := filepath.Join(f.dir, "v2.img")
	mustFP(t, "image", "build", "--payload", pf, "--version", "2.0.0", "--security-counter", "2", "--hw-class", "lock", "--key", key+".pem", "-o", img)
	b, _ := os.ReadFile(img)
	s := sha256.Sum256(b)
	f.sum = hex.EncodeToString(s[:])
	mustFP(t, append([]string{"release", "upload", "--id", "lock-2.0.0", img}, f.srv...)...)
	for _, id := range []string{"lock-1", "lock-2"} {
		mustFP(t, append([]string{"device", "provision", id, "--out", f.bundle(id)}, f.srv...)...)
	}
	mustFP(t, append([]string{"rollout", "create", "lock-2.0.0", "--id", "r1", "--device", "lock-1", "--start"}, f.srv...)...)
	l, err := link.Open(f.bundle("lock-1"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for f.offer == nil && ctx.Err() == nil {
		resp, err := l.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Offer == nil {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		f.offer = resp.Offer
	}
	if f.offer == nil || f.offer.URL != proto.PathBlobs+f.sum {
		t.Fatalf("no offer of the image: %+v", f.offer)
	}
	return f
}

func (f *coapFixture) bundle(id string) string { return filepath.Join(f.dir, id) }

func (f *coapFixture) psk(t *testing.T, id string) string {
	b, err := os.ReadFile(filepath.Join(f.bundle(id), proto.BundlePSKFile))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// coapClient runs libcoap's client and returns the file it wrote (nil if
// none). It always exits 0, so the output file is what tells.
func (f *coapFixture) coapClient(t *testing.T, auth []string, path string, wait int) []byte {
	t.Helper()
	bin := testenv.Command(t, "coap-client-openssl")
	out := filepath.Join(t.TempDir(), "out.bin")
	args := append(append([]string{}, auth...), "-m", "get", "-b", "1024", "-B", strconv.Itoa(wait), "-o", out, "coaps://"+f.coap+path)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.Run()
	b, err := os.ReadFile(out)
	if err != nil {
		t.Logf("coap-client wrote nothing: %s", log.String())
		return nil
	}
	return b
}

// libcoap's client downloads an offered image block-wise over DTLS, with
// the device's pre-shared key and with its certificate, and the bytes hash
// to the image's SHA-256. A wrong key, another device's identity and a
// device the image was not offered to get nothing.
func TestCoAPPeerDownloadsImage(t *testing.T) {
	f := newCoAPFixture(t)
	blob := proto.PathBlobs + f.sum
	b1 := f.bundle("lock-1")
	for name, auth := range map[string][]string{
		"psk":         {"-u", "lock-1", "-k", f.psk(t, "lock-1")},
		"certificate": {"-c", filepath.Join(b1, "device.pem"), "-j", filepath.Join(b1, "device.key.pem"), "-C", filepath.Join(b1, "ca.pem")},
	} {
		start := time.Now()
		got := f.coapClient(t, auth, blob, 20)
		sum := sha256.Sum256(got)
		if hex.EncodeToString(sum[:]) != f.sum {
			t.Fatalf("%s: downloaded %d bytes hashing to %x, want the image's %s", name, len(got), sum, f.sum)
		}
		t.Logf("%s: %d bytes in %v, %d blocks of 1024", name, len(got), time.Since(start).Round(time.Millisecond), (len(got)+1023)/1024)
	}
	var wg sync.WaitGroup
	for name, auth := range map[string][]string{
		"wrong key":             {"-u", "lock-1", "-k", strings.Repeat("0", 32)},
		"another device's key":  {"-u", "lock-1", "-k", f.psk(t, "lock-2")},
		"unknown identity":      {"-u", "lock-9", "-k", f.psk(t, "lock-1")},
		"device without offer":  {"-u", "lock-2", "-k", f.psk(t, "lock-2")},
		"certificate of lock-2": {"-c", filepath.Join(f.bundle("lock-2"), "device.pem"), "-j", filepath.Join(f.bundle("lock-2"), "device.key.pem"), "-C", filepath.Join(b1, "ca.pem")},
	} {
		// In parallel: a wrong key gets no alert (the bad Finished is
		// dropped), so libcoap waits out its handshake timeout.
		wg.Go(func() {
			if got := f.coapClient(t, auth, blob, 4); len(got) > 200 {
				t.Errorf("%s: got %d bytes of the image", name, len(got))
			}
		})
	}
	wg.Wait()
}
