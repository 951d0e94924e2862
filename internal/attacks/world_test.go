package attacks

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
	"github.com/fieldpatch/fieldpatch/internal/server/repo"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

const hw = "lock"

// world is a running server with a TUF repository (root 2 of 3, targets
// 1 of 1, keys held here as an operator holds them offline) and an image
// key.
type world struct {
	t           *testing.T
	ctx         context.Context
	dir         string
	srv         *server.Server
	url         string
	admin       *http.Client
	rootKeys    []crypto.Signer
	targetsKeys []crypto.Signer
	imageKey    crypto.Signer
	imagePub    string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{t: t, ctx: context.Background(), dir: t.TempDir()}
	w.imageKey = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, 32))
	var err error
	if _, w.imagePub, err = trust.WriteKeyPair(filepath.Join(t.TempDir(), "image"), w.imageKey); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.srv, err = server.New(ctx, server.Config{Listen: "127.0.0.1:0", DataDir: filepath.Join(w.dir, "server"), PollInterval: time.Hour,
		ImageKeys: []string{w.imagePub}, RolloutTick: time.Hour}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { w.srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done; w.srv.Close() })
	w.url = "https://" + ln.Addr().String()
	w.admin = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: w.srv.CA.Pool(), MinVersion: tls.VersionTLS13}}}
	w.rootKeys = genKeys(t, 3)
	w.targetsKeys = genKeys(t, 1)
	online, _ := w.srv.Repo.OnlineKeys()
	root, err := repo.NewRoot(repo.RootKeys{Root: pubs(w.rootKeys), RootThreshold: 2, Targets: pubs(w.targetsKeys), TargetsThreshold: 1, Online: online}, time.Now().Add(365*24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	w.mustPublish(metadata.ROOT, sign(t, root, w.rootKeys[:2]...))
	w.mustPublish(metadata.TARGETS, sign(t, metadata.Targets(time.Now().Add(90*24*time.Hour)), w.targetsKeys...))
	return w
}

func genKeys(t *testing.T, n int) []crypto.Signer {
	var out []crypto.Signer
	for range n {
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, k)
	}
	return out
}

func pubs(ks []crypto.Signer) []crypto.PublicKey {
	var out []crypto.PublicKey
	for _, k := range ks {
		out = append(out, k.Public())
	}
	return out
}

func sign[T metadata.Roles](t *testing.T, md *metadata.Metadata[T], keys ...crypto.Signer) []byte {
	t.Helper()
	b, err := repo.Sign(md, keys...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (w *world) publish(role string, raw []byte) error {
	var err error
	if role == metadata.ROOT {
		_, err = w.srv.Repo.PublishRoot(raw)
	} else {
		_, err = w.srv.Repo.PublishTargets(raw, nil)
	}
	return err
}

func (w *world) mustPublish(role string, raw []byte) {
	w.t.Helper()
	if err := w.publish(role, raw); err != nil {
		w.t.Fatalf("publish %s: %v", role, err)
	}
}

func (w *world) current(role string) []byte {
	w.t.Helper()
	b, err := w.srv.Repo.Current(role)
	if err != nil {
		w.t.Fatal(err)
	}
	return b
}

// nextTargets is the current targets metadata, one version on.
func (w *world) nextTargets() *metadata.Metadata[metadata.TargetsType] {
	w.t.Helper()
	md, err := metadata.Targets().FromBytes(w.current(metadata.TARGETS))
	if err != nil {
		w.t.Fatal(err)
	}
	repo.Bump(md, time.Now().Add(90*24*time.Hour))
	return md
}

// nextRoot is the current root metadata, one version on.
func (w *world) nextRoot() *metadata.Metadata[metadata.RootType] {
	w.t.Helper()
	md, err := metadata.Root().FromBytes(w.current(metadata.ROOT))
	if err != nil {
		w.t.Fatal(err)
	}
	repo.Bump(md, time.Now().Add(365*24*time.Hour))
	return md
}

// buildImage makes a signed image.
func (w *world) buildImage(version string, counter uint32, hwClass string, key crypto.Signer) []byte {
	w.t.Helper()
	return w.buildImageSigned(version, counter, hwClass, key)
}

// buildImageSigned makes an image signed by every key given.
func (w *world) buildImageSigned(version string, counter uint32, hwClass string, keys ...crypto.Signer) []byte {
	w.t.Helper()
	payload := bytes.Repeat([]byte("fw "+version+" "), 3000)
	var b bytes.Buffer
	if _, err := image.Build(w.ctx, &b, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{Version: version, SecurityCounter: &counter, HWClass: hwClass, Signers: keys}); err != nil {
		w.t.Fatal(err)
	}
	return b.Bytes()
}

// rel describes an image to release.
type rel struct {
	id, version string
	counter     uint32
	hwClass     string
	img         []byte
}

// release uploads an image as a release and, when publish is set,
// publishes it in the targets (custom may change what the targets say).
func (w *world) release(r rel, publish bool, custom func(*proto.TargetCustom)) {
	w.t.Helper()
	req, _ := http.NewRequest("POST", w.url+mgmtapi.PathReleases+"?id="+r.id, bytes.NewReader(r.img))
	req.Header.Set("Authorization", "Bearer "+w.srv.Token)
	resp, err := w.admin.Do(req)
	if err != nil {
		w.t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 201 {
		w.t.Fatalf("upload %s: %s %s", r.id, resp.Status, body)
	}
	if publish {
		c := proto.TargetCustom{Version: r.version, HWClass: r.hwClass, SecurityCounter: r.counter}
		if custom != nil {
			custom(&c)
		}
		sum := sha256.Sum256(r.img)
		md := w.nextTargets()
		if _, err := repo.SetTarget(md, int64(len(r.img)), sum[:], c); err != nil {
			w.t.Fatal(err)
		}
		raw := sign(w.t, md, w.targetsKeys...)
		if _, err := w.srv.Repo.PublishTargets(raw, nil); err != nil {
			w.t.Fatal(err)
		}
	}
}

// assign offers a release to a device.
func (w *world) assign(releaseID, deviceID string) {
	w.t.Helper()
	if err := w.srv.Store.Assign(w.ctx, "to-"+deviceID+"-"+releaseID, releaseID, "device", deviceID, false); err != nil {
		w.t.Fatal(err)
	}
}
