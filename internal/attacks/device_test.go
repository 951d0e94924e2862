package attacks

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/link"
	"github.com/fieldpatch/fieldpatch/internal/device/tufclient"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
)

// device is a file-backed device running the real agent, provisioned on
// the world's server, whose HTTP traffic passes the attacker.
type device struct {
	t    *testing.T
	w    *world
	id   string
	dir  string
	cfg  *agent.Config
	r    *agent.Runner
	link *link.Link
	tuf  *tufclient.Client
	mitm *mitm
}

func (w *world) device(id string) *device {
	t := w.t
	t.Helper()
	d := &device{t: t, w: w, id: id, dir: t.TempDir()}
	p := func(s string) string { return filepath.Join(d.dir, s) }
	// Provision: a key made here, a certificate from the server, the
	// bundle with the current TUF root.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pubDER, _ := x509.MarshalPKIXPublicKey(key.Public())
	body, _ := json.Marshal(mgmtapi.ProvisionRequest{ID: id, PublicKey: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}))})
	req, _ := http.NewRequest("POST", w.url+mgmtapi.PathDevices, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+w.srv.Token)
	resp, err := w.admin.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var pr mgmtapi.ProvisionResponse
	json.NewDecoder(resp.Body).Decode(&pr)
	resp.Body.Close()
	if resp.StatusCode != 201 || len(pr.TUFRoot) == 0 {
		t.Fatalf("provision %s: %s (root %d bytes)", id, resp.Status, len(pr.TUFRoot))
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	manifest, _ := json.Marshal(link.Bundle{Server: w.url, DeviceID: id})
	os.MkdirAll(p("bundle"), 0o700)
	for name, data := range map[string][]byte{"device.key.pem": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		"device.pem": []byte(pr.CertPEM), "ca.pem": []byte(pr.CAPEM), "bundle.json": manifest, link.TUFRootFile: pr.TUFRoot} {
		if err := os.WriteFile(filepath.Join(p("bundle"), name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The device: v1.0.0 committed in slot a.
	v1 := w.buildImage("1.0.0", 1, hw, w.imageKey)
	os.WriteFile(p("slot-a.img"), append(v1, make([]byte, 512<<10-len(v1))...), 0o644)
	os.WriteFile(p("slot-b.img"), make([]byte, 512<<10), 0o644)
	os.WriteFile(p("env.img"), make([]byte, 0x8000), 0o644)
	os.MkdirAll(p("data"), 0o755)
	cfg := map[string]any{
		"slots": map[string]string{"a": "slot-a.img", "b": "slot-b.img"},
		"env":   map[string]any{"type": "uboot-pair", "device": "env.img", "offsets": []int{0, 0x4000}, "size": 0x4000},
		"keys":  []map[string]string{{"path": w.imagePub}},
		"nv":    "nv", "hw_class": hw, "state_dir": "state", "data_dir": "data",
	}
	b, _ := json.Marshal(cfg)
	os.WriteFile(p("device.json"), b, 0o644)
	if d.cfg, err = agent.LoadConfig(p("device.json")); err != nil {
		t.Fatal(err)
	}
	if err := d.cfg.NVStore().Init(boot.NVState{Counter: 1}); err != nil {
		t.Fatal(err)
	}
	dev, closeDev, err := d.cfg.Open(false)
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.Env.Save(bootenv.Env{"fp_active": "a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := boot.Select(w.ctx, dev); err != nil {
		t.Fatal(err)
	}
	closeDev()
	r, done, err := d.cfg.NewRunner(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(done)
	d.r = r
	if d.link, err = link.Open(p("bundle")); err != nil {
		t.Fatal(err)
	}
	d.mitm = &mitm{base: d.link.HTTP.Transport, files: map[string][]byte{}}
	through := &http.Client{Transport: d.mitm, Timeout: time.Minute}
	d.r.Fetcher = &agent.HTTPFetcher{Client: through}
	root, _ := d.link.Bundle.TUFRoot()
	d.tuf = &tufclient.Client{Dir: filepath.Join(d.r.StateDir, "tuf"), FactoryRoot: root, HTTP: through, BaseURL: d.link.URL(proto.PathTUF),
		Now: d.link.Clock.Now, KeysFile: d.r.KeysFile}
	d.r.CheckOffer = d.tuf.CheckOffer
	return d
}

// offer checks in and returns the server's offer (which must exist).
func (d *device) offer() *proto.Offer {
	d.t.Helper()
	f, err := d.r.Facts()
	if err != nil {
		d.t.Fatal(err)
	}
	resp, err := d.link.CheckIn(d.w.ctx, proto.CheckIn{Version: f.RunningVersion, Slot: f.Booted, HWClass: hw, SecurityCounter: f.NVCounter, KeyEpoch: f.KeyEpoch})
	if err != nil {
		d.t.Fatal(err)
	}
	if resp.Offer == nil {
		d.t.Fatal("no offer")
	}
	return resp.Offer
}

// report tells the server the outcome of an offer (what the daemon would
// send).
func (d *device) report(o *proto.Offer, status string) {
	d.t.Helper()
	if err := d.link.Report(d.w.ctx, proto.Report{ReportID: o.UpdateID + "-" + status, UpdateID: o.UpdateID, Status: status}); err != nil {
		d.t.Fatal(err)
	}
}

// take runs what the daemon does with an offer: check it against the
// signed metadata and the device, then download, verify and install it.
// nil means it was installed and armed (a reboot is due).
func (d *device) take(o *proto.Offer) error {
	vouched, err := d.r.CheckOffer(d.w.ctx, o)
	if err != nil {
		return err
	}
	f, err := d.r.Facts()
	if err != nil {
		return err
	}
	if err := agent.Judge(*f, vouched); err != nil {
		return err
	}
	st, err := d.r.InstallAs(d.w.ctx, o.UpdateID, d.link.URL(o.URL), vouched)
	switch {
	case errors.Is(err, agent.ErrReboot):
		return nil
	case err != nil:
		return err
	}
	if st.Last != nil && st.Last.Result != agent.ResultCommitted {
		return &installFailed{reason: st.Last.Reason}
	}
	return nil
}

// reboot powers the device through the boot selector and lets the agent
// carry on (a trial boot commits or rolls back); it returns the selector's
// decision.
func (d *device) reboot() boot.Decision {
	d.t.Helper()
	dev, closeDev, err := d.cfg.Open(false)
	if err != nil {
		d.t.Fatal(err)
	}
	dec, err := boot.Select(d.w.ctx, dev)
	closeDev()
	if err != nil {
		d.t.Fatal(err)
	}
	if _, err := d.r.Start(d.w.ctx); err != nil && !errors.Is(err, agent.ErrReboot) {
		d.t.Fatal(err)
	}
	return dec
}

// installFailed is an install the agent's own checks ended (its reason is
// in the journal).
type installFailed struct{ reason string }

func (e *installFailed) Error() string { return "install failed: " + e.reason }

// fingerprint is everything an attack must not change: both slots, the
// non-volatile counter and key epoch, the trusted root version.
func (d *device) fingerprint() string {
	d.t.Helper()
	var b strings.Builder
	for _, s := range []string{"slot-a.img", "slot-b.img"} {
		data, _ := os.ReadFile(filepath.Join(d.dir, s))
		sum := sha256.Sum256(data)
		fmt.Fprintf(&b, "%s=%s ", s, hex.EncodeToString(sum[:8]))
	}
	nv, err := d.cfg.NVStore().Load()
	if err != nil {
		d.t.Fatal(err)
	}
	v, _ := d.tuf.TrustedRootVersion()
	fmt.Fprintf(&b, "counter=%d epoch=%d root=v%d", nv.Counter, nv.KeyEpoch, v)
	return b.String()
}

// reset undoes an install that was armed but not booted (so the next row
// starts from the same device): the agent abandons the update.
func (d *device) rootVersion() int64 {
	v, _ := d.tuf.TrustedRootVersion()
	return v
}

// mitm is the attacker between the device and the server: it can replace
// any TUF metadata file (nil: answer 404), change a blob's bytes, or
// trickle a response.
type mitm struct {
	base    http.RoundTripper
	mu      sync.Mutex
	files   map[string][]byte
	blob    func([]byte) []byte
	trickle time.Duration // delay between 1-byte writes of metadata
}

func (m *mitm) set(name string, b []byte) { m.mu.Lock(); m.files[name] = b; m.mu.Unlock() }

func (m *mitm) clear() {
	m.mu.Lock()
	m.files, m.blob, m.trickle = map[string][]byte{}, nil, 0
	m.mu.Unlock()
}

func (m *mitm) RoundTrip(req *http.Request) (*http.Response, error) {
	m.mu.Lock()
	name := path.Base(req.URL.Path)
	body, replaced := m.files[name]
	blob, trickle := m.blob, m.trickle
	m.mu.Unlock()
	isTUF := strings.HasPrefix(req.URL.Path, proto.PathTUF)
	if isTUF && replaced {
		if body == nil {
			return &http.Response{StatusCode: 404, Status: "404 Not Found", Body: io.NopCloser(strings.NewReader("")), Header: http.Header{}, Request: req}, nil
		}
		return respond(req, body, trickle), nil
	}
	resp, err := m.base.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	switch {
	case isTUF && trickle > 0:
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return respond(req, b, trickle), nil
	case strings.HasPrefix(req.URL.Path, proto.PathBlobs) && blob != nil:
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return respond(req, blob(b), 0), nil
	}
	return resp, nil
}

func respond(req *http.Request, b []byte, trickle time.Duration) *http.Response {
	var body io.ReadCloser = io.NopCloser(bytes.NewReader(b))
	length := int64(len(b))
	if trickle > 0 {
		body = &slowBody{ctx: req.Context(), b: b, every: trickle}
		length = -1
	}
	return &http.Response{StatusCode: 200, Status: "200 OK", Body: body, ContentLength: length, Header: http.Header{}, Request: req}
}

// slowBody gives one byte per interval.
type slowBody struct {
	ctx   context.Context
	b     []byte
	every time.Duration
}

func (s *slowBody) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		return 0, io.EOF
	}
	select {
	case <-s.ctx.Done():
		return 0, s.ctx.Err()
	case <-time.After(s.every):
	}
	p[0], s.b = s.b[0], s.b[1:]
	return 1, nil
}

func (s *slowBody) Close() error { return nil }

var _ = metadata.ROOT
