package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
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
	img := filepath.Join(f.dir, "v2.img")
	var b []byte
	// The image is a whole number of 1,024-byte blocks, so that its very
	// end is a block boundary (TestCoAPLink resumes there): the payload is
	// cut by what the first build is over.
	for try := 0; try < 2; try++ {
		os.WriteFile(pf, payload, 0o644)
		mustFP(t, "image", "build", "--payload", pf, "--version", "2.0.0", "--security-counter", "2", "--hw-class", "lock", "--key", key+".pem", "-o", img)
		b, _ = os.ReadFile(img)
		payload = payload[:len(payload)-len(b)%1024]
	}
	if len(b)%1024 != 0 {
		t.Fatalf("the image is %d bytes, not a whole number of blocks", len(b))
	}
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

// Bad input over CoAP: bogus block options, a Block1 upload, oversized and
// malformed payloads, other methods and paths. Each is refused with its
// code, nothing is stored, and the server still serves afterwards.
func TestCoAPBadInput(t *testing.T) {
	f := newCoAPFixture(t)
	before := mustFP(t, append([]string{"device", "show", "lock-1"}, f.srv...)...)
	key := f.psk(t, "lock-1")
	cc, err := coapdtls.Dial(f.coap, coapdtls.NewDTLSClientOptions(
		piondtls.WithPSK(func([]byte) ([]byte, error) { return []byte(key), nil }),
		piondtls.WithPSKIdentityHint([]byte("lock-1")),
		piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256)),
		options.WithBlockwise(false, blockwise.SZX1024, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	blob := proto.PathBlobs + f.sum
	block := func(szx blockwise.SZX, num int64) message.Option {
		v, err := blockwise.EncodeBlockOption(szx, num, false)
		if err != nil {
			t.Fatal(err)
		}
		return message.Option{ID: message.Block2, Value: uint32Bytes(v)}
	}
	do := func(code codes.Code, path string, body []byte, opts ...message.Option) (codes.Code, string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req := cc.AcquireMessage(ctx)
		defer cc.ReleaseMessage(req)
		req.SetCode(code)
		req.SetType(message.Confirmable)
		if err := req.SetPath(path); err != nil {
			t.Fatal(err)
		}
		for _, o := range opts {
			req.AddOptionBytes(o.ID, o.Value)
		}
		if body != nil {
			req.SetContentFormat(message.AppJSON)
			req.SetBody(bytes.NewReader(body))
		}
		resp, err := cc.Do(req)
		if err != nil {
			t.Fatalf("%v %s: %v", code, path, err)
		}
		defer cc.ReleaseMessage(resp)
		b, _ := resp.ReadBody()
		return resp.Code(), string(b)
	}
	report := func(mut func(m map[string]any)) []byte {
		m := map[string]any{"report_id": "r-bad-1", "update_id": f.offer.UpdateID, "status": "downloading"}
		mut(m)
		b, _ := json.Marshal(m)
		return b
	}
	for _, c := range []struct {
		name string
		code codes.Code
		path string
		body []byte
		opts []message.Option
		want codes.Code
	}{
		{"block size exponent 7", codes.GET, blob, nil, []message.Option{block(blockwise.SZXBERT, 0)}, codes.BadOption},
		{"block past the end", codes.GET, blob, nil, []message.Option{block(blockwise.SZX1024, 5000)}, codes.BadOption},
		{"block number too large", codes.GET, blob, nil, []message.Option{block(blockwise.SZX16, 1<<19)}, codes.BadOption},
		{"Block1 upload", codes.POST, proto.PathReports, report(func(map[string]any) {}),
			[]message.Option{{ID: message.Block1, Value: []byte{0x0e}}}, codes.RequestEntityTooLarge},
		{"payload over a block", codes.POST, proto.PathReports, report(func(m map[string]any) { m["reason"] = strings.Repeat("x", 1050) }), nil, codes.RequestEntityTooLarge},
		{"malformed JSON", codes.POST, proto.PathReports, []byte(`{"report_id": "r-bad-2", "status": `), nil, codes.BadRequest},
		{"unknown field", codes.POST, proto.PathReports, report(func(m map[string]any) { m["extra"] = 1 }), nil, codes.BadRequest},
		{"bad status", codes.POST, proto.PathReports, report(func(m map[string]any) { m["status"] = "bricked" }), nil, codes.BadRequest},
		{"another update", codes.POST, proto.PathReports, report(func(m map[string]any) { m["update_id"] = "0123456789abcdef0123" }), nil, codes.NotFound},
		{"POST continuation without a start", codes.POST, proto.PathCheckIn, []byte(`{}`), []message.Option{block(blockwise.SZX1024, 1)}, codes.RequestEntityIncomplete},
		{"PUT", codes.PUT, proto.PathReports, []byte(`{}`), nil, codes.MethodNotAllowed},
		{"DELETE", codes.DELETE, blob, nil, nil, codes.MethodNotAllowed},
		{"unknown path", codes.GET, "/etc/passwd", nil, nil, codes.NotFound},
		{"management API", codes.GET, "/api/mgmt/v1/devices", nil, nil, codes.NotFound},
		{"another's image", codes.GET, proto.PathBlobs + strings.Repeat("ab", 32), nil, nil, codes.NotFound},
	} {
		if got, body := do(c.code, c.path, c.body, c.opts...); got != c.want {
			t.Errorf("%s: %v %s", c.name, got, body)
		}
	}
	if after := mustFP(t, append([]string{"device", "show", "lock-1"}, f.srv...)...); after != before {
		t.Errorf("the device's record changed:\nbefore %s\nafter  %s", before, after)
	}
	// Still serving: the last block of the image.
	img, err := os.ReadFile(filepath.Join(f.dir, "v2.img"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := (len(img) + 1023) / 1024
	if got, _ := do(codes.GET, blob, nil, block(blockwise.SZX1024, int64(blocks-1))); got != codes.Content {
		t.Fatalf("after the bad input, the image's last block: %v", got)
	}
}

func uint32Bytes(v uint32) []byte {
	b := make([]byte, 4)
	n, _ := message.EncodeUint32(b, v)
	return b[:n]
}

// The agent's link over CoAP: a download resumed at an offset inside a
// block or at a block boundary gets exactly the rest of the image (206
// with Content-Range), one from the very end or past it a 416, as over
// HTTPS; a
// renewal, whose answer spans several blocks, is fetched block by block
// with the POST repeated, and the next session presents the new
// certificate; after the device is revoked, its open session is refused
// at the next request and a new handshake fails.
func TestCoAPLink(t *testing.T) {
	f := newCoAPFixture(t)
	img, err := os.ReadFile(filepath.Join(f.dir, "v2.img"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, auth := range []string{link.CoAPAuthPSK, link.CoAPAuthCert} {
		l, err := link.OpenWith(f.bundle("lock-1"), link.Options{CoAP: "coaps://" + f.coap, CoAPAuth: auth})
		if err != nil {
			t.Fatal(err)
		}
		n := int64(len(img)) // a whole number of blocks (newCoAPFixture)
		// Block boundaries (the block before is asked for and skipped).
		for _, from := range []int64{0, 5000, 1024 * 7, n - 1024, n - 10} {
			resp, err := agent.GetFrom(ctx, l.HTTP, l.URL(f.offer.URL), from)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			wantStatus := http.StatusOK
			if from > 0 {
				wantStatus = http.StatusPartialContent
			}
			if err != nil || resp.StatusCode != wantStatus || !bytes.Equal(got, img[from:]) || resp.ContentLength != int64(len(img))-from {
				t.Fatalf("%s from %d: %v %s, %d bytes (length %d), match %v", auth, from, err, resp.Status, len(got), resp.ContentLength, bytes.Equal(got, img[from:]))
			}
		}
		// From the very end (a block boundary) or past it: 416, with the
		// length when the server's answer gives it, as over HTTPS.
		for from, cr := range map[int64]string{n: fmt.Sprintf("bytes */%d", n), n + 1: "", n + 1024: "", n + 5000: ""} {
			resp, err := agent.GetFrom(ctx, l.HTTP, l.URL(f.offer.URL), from)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || resp.Header.Get("Content-Range") != cr {
				t.Errorf("%s from %d: %s, Content-Range %q; want 416 with %q", auth, from, resp.Status, resp.Header.Get("Content-Range"), cr)
			}
		}
		if _, err := l.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err != nil {
			t.Fatalf("%s check-in: %v", auth, err)
		}
	}
	l, err := link.OpenWith(f.bundle("lock-1"), link.Options{CoAP: "coaps://" + f.coap, CoAPAuth: link.CoAPAuthCert})
	if err != nil {
		t.Fatal(err)
	}
	old, _ := l.Certificate()
	renewed, err := l.Renew(ctx)
	if err != nil {
		t.Fatalf("renew over CoAP: %v", err)
	}
	if renewed.SerialNumber.Cmp(old.SerialNumber) == 0 || renewed.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(old.PublicKey) {
		t.Fatal("the renewal returned the same certificate or key")
	}
	if _, err := l.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err != nil {
		t.Fatalf("check-in with the renewed certificate: %v", err)
	}
	psk, err := link.OpenWith(f.bundle("lock-1"), link.Options{CoAP: "coaps://" + f.coap, CoAPAuth: link.CoAPAuthPSK})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := psk.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err != nil {
		t.Fatal(err)
	}
	mustFP(t, append([]string{"device", "revoke", "lock-1"}, f.srv...)...)
	_, err = psk.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"})
	if err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("check-in on the open session after revocation: %v", err)
	}
	again, _ := link.OpenWith(f.bundle("lock-1"), link.Options{CoAP: "coaps://" + f.coap, CoAPAuth: link.CoAPAuthPSK})
	if _, err := again.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err == nil || !strings.Contains(err.Error(), "handshake") {
		t.Fatalf("a new PSK session after revocation: %v", err)
	}
}
