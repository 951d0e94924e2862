package repo

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

func keys(t *testing.T, n int) ([]crypto.Signer, []crypto.PublicKey) {
	t.Helper()
	var s []crypto.Signer
	var p []crypto.PublicKey
	for range n {
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		s, p = append(s, k), append(p, k.Public())
	}
	return s, p
}

type operator struct {
	t                  *testing.T
	r                  *Repo
	root, targets      []crypto.Signer
	rootPub, targetPub []crypto.PublicKey
	rootMD             *metadata.Metadata[metadata.RootType]
	targetsMD          *metadata.Metadata[metadata.TargetsType]
}

// setup makes a repository with a root of 2 of 3 root keys and 1 targets
// key, published, and empty targets.
func setup(t *testing.T) *operator {
	t.Helper()
	r, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	o := &operator{t: t, r: r}
	o.root, o.rootPub = keys(t, 3)
	o.targets, o.targetPub = keys(t, 1)
	online, _ := r.OnlineKeys()
	o.rootMD, err = NewRoot(RootKeys{Root: o.rootPub, RootThreshold: 2, Targets: o.targetPub, TargetsThreshold: 1, Online: online}, time.Now().Add(365*24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := Sign(o.rootMD, o.root[0], o.root[1])
	if _, err := r.PublishRoot(raw); err != nil {
		t.Fatal(err)
	}
	o.targetsMD = metadata.Targets(time.Now().Add(90 * 24 * time.Hour))
	raw, _ = Sign(o.targetsMD, o.targets...)
	if _, err := r.PublishTargets(raw, nil); err != nil {
		t.Fatal(err)
	}
	return o
}

func TestPublishChecksEverything(t *testing.T) {
	o := setup(t)
	sum := sha256.Sum256([]byte("image"))
	next := func() *metadata.Metadata[metadata.TargetsType] {
		md, _ := metadata.Targets().FromBytes(mustCurrent(t, o.r, metadata.TARGETS))
		Bump(md, time.Now().Add(24*time.Hour))
		return md
	}
	md := next()
	if _, err := SetTarget(md, 5, sum[:], proto.TargetCustom{Version: "2.0.0", HWClass: "lock", SecurityCounter: 2}); err != nil {
		t.Fatal(err)
	}
	// Refusals first: nothing is published by them.
	otherSigner, _ := keys(t, 1)
	cases := map[string]func() ([]byte, error){
		"foreign key":     func() ([]byte, error) { return Sign(md, otherSigner...) },
		"unsigned":        func() ([]byte, error) { return Sign(md) },
		"same sig twice":  func() ([]byte, error) { return Sign(md, o.targets[0], o.targets[0]) },
		"skipped version": func() ([]byte, error) { m := next(); Bump(m, time.Now().Add(time.Hour)); return Sign(m, o.targets...) },
		"expired": func() ([]byte, error) {
			m := next()
			m.Signed.Expires = time.Now().Add(-time.Hour)
			return Sign(m, o.targets...)
		},
		"bad custom": func() ([]byte, error) {
			m := next()
			SetTarget(m, 5, sum[:], proto.TargetCustom{Version: "2.0.0", HWClass: "lock"})
			m.Signed.Targets["other/name.img"] = m.Signed.Targets["lock/2.0.0.img"]
			return Sign(m, o.targets...)
		},
	}
	for name, mk := range cases {
		raw, err := mk()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := o.r.PublishTargets(raw, nil); err == nil {
			t.Errorf("%s: published", name)
		}
	}
	if st, _ := o.r.Status(); st.Roles[metadata.TARGETS].Version != 1 || st.Roles[metadata.SNAPSHOT].Version != 1 || st.Roles[metadata.TIMESTAMP].Version != 1 {
		t.Fatalf("a refused upload changed the repository: %+v", st.Roles)
	}
	refuse := errors.New("no such blob")
	raw, _ := Sign(md, o.targets...)
	if _, err := o.r.PublishTargets(raw, func(string, *metadata.TargetFiles, *proto.TargetCustom) error { return refuse }); !errors.Is(err, refuse) {
		t.Fatalf("the check was not asked: %v", err)
	}
	if v, err := o.r.PublishTargets(raw, nil); err != nil || v != 2 {
		t.Fatalf("publish: %d %v", v, err)
	}
	st, _ := o.r.Status()
	if st.Roles[metadata.SNAPSHOT].Version != 2 || st.Roles[metadata.TIMESTAMP].Version != 2 || len(st.Targets) != 1 || st.Targets[0] != "lock/2.0.0.img" {
		t.Fatalf("after publishing: %+v", st)
	}
	for _, f := range []string{"1.root.json", "2.targets.json", "2.snapshot.json", "timestamp.json"} {
		if _, err := o.r.File(f); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	for _, f := range []string{"../keys/snapshot.pem", "3.targets.json", "root.json", "2.root.json"} {
		if _, err := o.r.File(f); err == nil {
			t.Errorf("%s served", f)
		}
	}
}

func mustCurrent(t *testing.T, r *Repo, role string) []byte {
	t.Helper()
	b, err := r.Current(role)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Root rotation: the next root needs a threshold of the old root keys and
// of its own; the online keys must stay the server's.
func TestRootRotation(t *testing.T) {
	o := setup(t)
	newRoot, newPub := keys(t, 2)
	online, _ := o.r.OnlineKeys()
	md, _ := metadata.Root().FromBytes(mustCurrent(t, o.r, metadata.ROOT))
	Bump(md, time.Now().Add(365*24*time.Hour))
	if err := Rekey(md, RootKeys{Root: newPub, RootThreshold: 2, Targets: o.targetPub, TargetsThreshold: 1, Online: online}); err != nil {
		t.Fatal(err)
	}
	for name, signers := range map[string][]crypto.Signer{
		"new keys only":       newRoot,
		"old keys only":       o.root[:2],
		"one old, two new":    {o.root[0], newRoot[0], newRoot[1]},
		"two old, one new":    {o.root[0], o.root[1], newRoot[0]},
		"old signature twice": {o.root[0], o.root[0], newRoot[0], newRoot[1]},
	} {
		raw, _ := Sign(md, signers...)
		if _, err := o.r.PublishRoot(raw); err == nil {
			t.Errorf("%s: published", name)
		}
	}
	raw, _ := Sign(md, o.root[0], o.root[2], newRoot[0], newRoot[1])
	if v, err := o.r.PublishRoot(raw); err != nil || v != 2 {
		t.Fatalf("rotation: %d %v", v, err)
	}
	// A root that takes the online roles away from the server is refused.
	md2, _ := metadata.Root().FromBytes(raw)
	Bump(md2, time.Now().Add(time.Hour))
	_, stranger := keys(t, 1)
	k, _ := metadata.KeyFromPublicKey(stranger[0])
	Rekey(md2, RootKeys{Root: newPub, RootThreshold: 2, Targets: o.targetPub, TargetsThreshold: 1, Online: map[string]*metadata.Key{metadata.SNAPSHOT: k, metadata.TIMESTAMP: online[metadata.TIMESTAMP]}})
	raw2, _ := Sign(md2, newRoot...)
	if _, err := o.r.PublishRoot(raw2); err == nil || !strings.Contains(err.Error(), "online key") {
		t.Fatalf("foreign online key: %v", err)
	}
}

// The online roles are re-signed at half their lifetime, not before.
func TestRefreshAtHalfLife(t *testing.T) {
	o := setup(t)
	now := time.Now()
	o.r.Now = func() time.Time { return now }
	if did, err := o.r.Refresh(); err != nil || did {
		t.Fatalf("fresh: %v %v", did, err)
	}
	now = now.Add(DefaultTimestampLifetime/2 + time.Minute)
	if did, err := o.r.Refresh(); err != nil || !did {
		t.Fatalf("half-life: %v %v", did, err)
	}
	st, _ := o.r.Status()
	if st.Roles[metadata.TIMESTAMP].Version != 2 || st.Roles[metadata.SNAPSHOT].Version != 1 {
		t.Fatalf("after refresh: %+v", st.Roles)
	}
	// Reopened from disk, it is the same.
	r2, err := Open(o.r.dir)
	if err != nil {
		t.Fatal(err)
	}
	if st2, _ := r2.Status(); st2.Roles[metadata.TIMESTAMP].Version != 2 || st2.OnlineKeys[metadata.SNAPSHOT].Value.PublicKey != st.OnlineKeys[metadata.SNAPSHOT].Value.PublicKey {
		t.Fatalf("reopened: %+v", st2)
	}
}

// A server that stops after publishing a root that names new online keys,
// before they took over, finishes the change when it starts again; one
// whose online keys are gone refuses to start rather than make new ones no
// root names.
func TestOnlineKeyRotationSurvivesACrash(t *testing.T) {
	o := setup(t)
	next, err := o.r.RotateOnline()
	if err != nil {
		t.Fatal(err)
	}
	md, _ := metadata.Root().FromBytes(mustCurrent(t, o.r, metadata.ROOT))
	Bump(md, time.Now().Add(time.Hour))
	Rekey(md, RootKeys{Root: o.rootPub, RootThreshold: 2, Targets: o.targetPub, TargetsThreshold: 1, Online: next})
	raw, _ := Sign(md, o.root[0], o.root[1])
	// The root is on disk; the server died before the keys moved.
	if err := o.r.write("2.root.json", raw); err != nil {
		t.Fatal(err)
	}
	r2, err := Open(o.r.dir)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := r2.OnlineKeys()
	for role, k := range next {
		want, _ := k.ID()
		if id, _ := got[role].ID(); id != want {
			t.Fatalf("%s: online key %s after the restart, want %s", role, id, want)
		}
	}
	r2.Now = func() time.Time { return time.Now().Add(DefaultSnapshotLifetime) }
	if did, err := r2.Refresh(); err != nil || !did {
		t.Fatalf("signing with the new keys: %v %v", did, err)
	}
	os.Remove(filepath.Join(o.r.dir, "keys", "snapshot.pem"))
	if _, err := Open(o.r.dir); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("a missing online key: %v", err)
	}
}

// Between a root that changes the targets keys and the targets re-signed
// with them, nothing is offered (devices would refuse the old targets).
func TestNothingOfferedWhileTargetsAreStale(t *testing.T) {
	o := setup(t)
	sum := sha256.Sum256([]byte("image"))
	md, _ := metadata.Targets().FromBytes(mustCurrent(t, o.r, metadata.TARGETS))
	Bump(md, time.Now().Add(time.Hour))
	SetTarget(md, 5, sum[:], proto.TargetCustom{Version: "2.0.0", HWClass: "lock", SecurityCounter: 2})
	raw, _ := Sign(md, o.targets...)
	if _, err := o.r.PublishTargets(raw, nil); err != nil {
		t.Fatal(err)
	}
	offerable := func() bool { return o.r.Offerable("lock", "2.0.0", 5, hex.EncodeToString(sum[:])) }
	if !offerable() {
		t.Fatal("a published release is not offerable")
	}
	fresh, freshPub := keys(t, 1)
	online, _ := o.r.OnlineKeys()
	root, _ := metadata.Root().FromBytes(mustCurrent(t, o.r, metadata.ROOT))
	Bump(root, time.Now().Add(time.Hour))
	Rekey(root, RootKeys{Root: o.rootPub, RootThreshold: 2, Targets: freshPub, TargetsThreshold: 1, Online: online})
	rraw, _ := Sign(root, o.root[0], o.root[1])
	if _, err := o.r.PublishRoot(rraw); err != nil {
		t.Fatal(err)
	}
	if offerable() {
		t.Fatal("offerable while the targets are signed by keys the root no longer names")
	}
	if r2, _ := Open(o.r.dir); r2.Offerable("lock", "2.0.0", 5, hex.EncodeToString(sum[:])) {
		t.Fatal("offerable after a restart while the targets are stale")
	}
	md, _ = metadata.Targets().FromBytes(mustCurrent(t, o.r, metadata.TARGETS))
	Bump(md, time.Now().Add(time.Hour))
	raw, _ = Sign(md, fresh...)
	if _, err := o.r.PublishTargets(raw, nil); err != nil {
		t.Fatal(err)
	}
	if !offerable() {
		t.Fatal("not offerable once the targets are re-signed")
	}
}
