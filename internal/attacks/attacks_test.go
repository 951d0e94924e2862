package attacks

import (
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/link"
	"github.com/fieldpatch/fieldpatch/internal/device/tufclient"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/repo"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// scene is a world with one device offered release v2 (published).
type scene struct {
	w  *world
	d  *device
	v2 rel
	o  *proto.Offer
}

func newScene(t *testing.T) *scene {
	t.Helper()
	w := newWorld(t)
	d := w.device("lock-1")
	v2 := rel{id: "v2", version: "2.0.0", counter: 2, hwClass: hw}
	v2.img = w.buildImage(v2.version, v2.counter, hw, w.imageKey)
	w.release(v2, true, nil)
	w.assign("v2", d.id)
	s := &scene{w: w, d: d, v2: v2}
	s.o = d.offer()
	return s
}

// legit shows the legitimate case accepted: the offer checks out against
// the signed metadata and the device.
func (s *scene) legit(t *testing.T) *agent.Offer {
	t.Helper()
	v, err := s.d.r.CheckOffer(s.w.ctx, s.o)
	if err != nil {
		t.Fatalf("the legitimate offer was refused: %v", err)
	}
	f, _ := s.d.r.Facts()
	if err := agent.Judge(*f, v); err != nil {
		t.Fatalf("the legitimate offer was refused: %v", err)
	}
	return v
}

// refused runs an attack and checks that it fails with the given error
// type and changes nothing on the device.
func refused[E error](t *testing.T, d *device, attack func() error) E {
	t.Helper()
	before := d.fingerprint()
	err := attack()
	var want E
	if !errors.As(err, &want) {
		t.Fatalf("want a %T, got %v", want, err)
	}
	if after := d.fingerprint(); after != before {
		t.Fatalf("the attack changed the device:\n  before %s\n  after  %s", before, after)
	}
	return want
}

// Arbitrary software: an image changed in transit is not the signed
// target, and is refused at verification; the install path ends failed
// with the slot untouched. The same image unchanged installs.
func TestAttackTamperedImage(t *testing.T) {
	s := newScene(t)
	v := s.legit(t)
	s.d.mitm.blob = func(b []byte) []byte { b[len(b)/2] ^= 1; return b }
	staged := filepath.Join(t.TempDir(), "staged")
	refused[*agent.TargetMismatchError](t, s.d, func() error {
		if err := s.d.r.Fetcher.Fetch(s.w.ctx, s.d.link.URL(s.o.URL), staged, v.Size, nil); err != nil {
			return err
		}
		_, err := s.d.r.VerifyStaged(s.w.ctx, staged, v)
		return err
	})
	before := s.d.fingerprint()
	if err := s.d.take(s.o); err == nil || !strings.Contains(err.Error(), "not the signed target") {
		t.Fatalf("install of a tampered image: %v", err)
	}
	if s.d.fingerprint() != before {
		t.Fatal("a refused install changed the device")
	}
	// The legitimate image installs (on a fresh device).
	s.d.mitm.clear()
	fresh := newScene(t)
	if err := fresh.d.take(fresh.o); err != nil {
		t.Fatalf("the legitimate install: %v", err)
	}
}

// Arbitrary software: targets metadata signed by a key the root does not
// name is refused.
func TestAttackForeignTargetsKey(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	// A server that holds the online keys but not the targets key: it
	// lists new targets in a snapshot it signs, and signs the targets with
	// a key of its own.
	md := s.w.nextTargets()
	s.serveTargets(t, sign(t, md, genKeys(t, 1)...), md.Signed.Version)
	refused[*metadata.ErrUnsignedMetadata](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
}

// Threshold: a new root signed by one of the two root keys it needs, or by
// one key twice, is refused; signed by two, it is accepted.
func TestAttackThreshold(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	md := s.w.nextRoot()
	s.d.mitm.set("2.root.json", sign(t, md, s.w.rootKeys[0]))
	refused[*metadata.ErrUnsignedMetadata](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.set("2.root.json", sign(t, md, s.w.rootKeys[0], s.w.rootKeys[0]))
	refused[*metadata.ErrValue](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.clear()
	s.w.mustPublish(metadata.ROOT, sign(t, md, s.w.rootKeys[1], s.w.rootKeys[2]))
	s.legit(t)
	if v := s.d.rootVersion(); v != 2 {
		t.Fatalf("trusted root v%d after a valid rotation", v)
	}
}

// Rollback: an older timestamp replayed is refused; so is an offer below
// the device's security counter, and an older, validly signed release
// without the downgrade mark. With the mark, the older release is taken.
func TestAttackRollback(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	old, _ := s.w.srv.Repo.File("timestamp.json")
	// New targets: the timestamp moves on, and the device sees it.
	v3 := rel{id: "v3", version: "3.0.0", counter: 3, hwClass: hw}
	v3.img = s.w.buildImage(v3.version, v3.counter, hw, s.w.imageKey)
	s.w.release(v3, true, nil)
	s.legit(t)
	s.d.mitm.set("timestamp.json", old)
	refused[*metadata.ErrBadVersionNumber](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.clear()
	// An older snapshot, named by a fresh timestamp signed with the (stolen)
	// online key.
	snap := s.onlineSnapshot(t)
	oldRaw, err := s.w.srv.Repo.File(versioned(snap.Signed.Version-1, metadata.SNAPSHOT))
	if err != nil {
		t.Fatal(err)
	}
	oldSnap, _ := metadata.Snapshot().FromBytes(oldRaw)
	s.serveSnapshot(t, oldSnap)
	refused[*metadata.ErrBadVersionNumber](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.clear()

	// The device's counter is 1: a counter-0 release is refused.
	lowCounter := rel{id: "v2-low", version: "2.1.0", counter: 0, hwClass: hw}
	lowCounter.img = s.w.buildImage(lowCounter.version, lowCounter.counter, hw, s.w.imageKey)
	s.w.release(lowCounter, true, nil)
	o := *s.o
	o.Target.Name = repo.TargetName(hw, "2.1.0")
	if err := refused[*agent.RefusedError](t, s.d, func() error { return s.d.take(&o) }); !strings.Contains(err.Reason, "security counter 0 is below the device's 1") {
		t.Fatalf("reason: %s", err.Reason)
	}

	// Older than what runs (0.9.0 < 1.0.0), same counter, validly signed:
	// refused without the downgrade mark, taken with it.
	older := rel{id: "v0.9", version: "0.9.0", counter: 1, hwClass: hw}
	older.img = s.w.buildImage(older.version, older.counter, hw, s.w.imageKey)
	s.w.release(older, true, nil)
	o.Target.Name = repo.TargetName(hw, "0.9.0")
	if err := refused[*agent.RefusedError](t, s.d, func() error { return s.d.take(&o) }); !strings.Contains(err.Reason, "older") && !strings.Contains(err.Reason, "downgrade") {
		t.Fatalf("reason: %s", err.Reason)
	}
	md := s.w.nextTargets()
	sum := sha256Of(older.img)
	repo.SetTarget(md, int64(len(older.img)), sum, proto.TargetCustom{Version: "0.9.0", HWClass: hw, SecurityCounter: 1, Downgrade: true})
	s.w.mustPublish(metadata.TARGETS, sign(t, md, s.w.targetsKeys...))
	v, err := s.d.r.CheckOffer(s.w.ctx, &o)
	if err != nil || !v.Downgrade {
		t.Fatalf("the marked downgrade: %+v %v", v, err)
	}
	f, _ := s.d.r.Facts()
	if err := agent.Judge(*f, v); err != nil {
		t.Fatalf("the marked downgrade was refused: %v", err)
	}
}

// Freeze: each role's metadata, validly signed but expired, is refused.
func TestAttackFreeze(t *testing.T) {
	for _, role := range []string{metadata.TIMESTAMP, metadata.SNAPSHOT, metadata.TARGETS, metadata.ROOT} {
		t.Run(role, func(t *testing.T) {
			s := newScene(t)
			s.legit(t)
			past := time.Now().Add(-time.Hour)
			switch role {
			case metadata.ROOT:
				md := s.w.nextRoot()
				md.Signed.Expires = past
				s.d.mitm.set("2.root.json", sign(t, md, s.w.rootKeys...))
			case metadata.TARGETS:
				md := s.w.nextTargets()
				md.Signed.Expires = past
				raw := sign(t, md, s.w.targetsKeys...)
				s.serveTargets(t, raw, md.Signed.Version)
			case metadata.SNAPSHOT:
				snap := s.onlineSnapshot(t)
				snap.Signed.Version++
				snap.Signed.Expires = past
				s.serveSnapshot(t, snap)
			case metadata.TIMESTAMP:
				ts := s.onlineTimestamp(t)
				ts.Signed.Version++
				ts.Signed.Expires = past
				s.d.mitm.set("timestamp.json", sign(t, ts, s.onlineKey(t, metadata.TIMESTAMP)))
			}
			refused[*metadata.ErrExpiredMetadata](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
		})
	}
}

// Mix-and-match: a snapshot other than the one the timestamp names, or
// targets other than the version the snapshot names, are refused.
func TestAttackMixAndMatch(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	// A timestamp names snapshot v+1 with its hash; another snapshot v+1
	// (validly signed, different) is served under that name.
	snap := s.onlineSnapshot(t)
	snap.Signed.Version++
	s.serveSnapshot(t, snap)
	other := s.onlineSnapshot(t)
	other.Signed.Version = snap.Signed.Version
	other.Signed.Expires = other.Signed.Expires.Add(time.Hour)
	s.d.mitm.set(versioned(snap.Signed.Version, metadata.SNAPSHOT), sign(t, other, s.onlineKey(t, metadata.SNAPSHOT)))
	refused[*metadata.ErrLengthOrHashMismatch](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.clear()
	// A snapshot names targets v+1; targets v+2 (validly signed) are
	// served under that name.
	next := s.w.nextTargets()
	s.serveTargets(t, nil, next.Signed.Version)
	later := s.w.nextTargets()
	later.Signed.Version++
	s.d.mitm.set(versioned(next.Signed.Version, metadata.TARGETS), sign(t, later, s.w.targetsKeys...))
	refused[*metadata.ErrBadVersionNumber](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
}

// Endless data: metadata longer than its limit, and an image longer than
// its signed length, are cut off and refused.
func TestAttackEndlessData(t *testing.T) {
	s := newScene(t)
	v := s.legit(t)
	s.d.mitm.set("timestamp.json", make([]byte, tufclient.DefaultLimits.Timestamp+1))
	refused[*metadata.ErrDownloadLengthMismatch](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.clear()
	// With the online keys: a timestamp that gives the snapshot a huge
	// length, and a huge snapshot. The device's own limit still holds.
	ts := s.onlineTimestamp(t)
	ts.Signed.Version++
	snapMeta := metadata.MetaFile(ts.Signed.Meta["snapshot.json"].Version + 1)
	snapMeta.Length = 1 << 40
	ts.Signed.Meta["snapshot.json"] = snapMeta
	s.d.mitm.set("timestamp.json", sign(t, ts, s.onlineKey(t, metadata.TIMESTAMP)))
	s.d.mitm.set(versioned(snapMeta.Version, metadata.SNAPSHOT), make([]byte, 2<<20))
	refused[*metadata.ErrDownloadLengthMismatch](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.clear()
	// And a timestamp that names no snapshot at all: refused, no crash.
	ts = s.onlineTimestamp(t)
	ts.Signed.Version += 2
	delete(ts.Signed.Meta, "snapshot.json")
	s.d.mitm.set("timestamp.json", sign(t, ts, s.onlineKey(t, metadata.TIMESTAMP)))
	refused[*metadata.ErrRepository](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	s.d.mitm.clear()
	s.d.mitm.blob = func(b []byte) []byte { return append(b, make([]byte, 1<<20)...) }
	refused[*agent.TooLargeError](t, s.d, func() error {
		return s.d.r.Fetcher.Fetch(s.w.ctx, s.d.link.URL(s.o.URL), filepath.Join(t.TempDir(), "staged"), v.Size, nil)
	})
}

// Slow retrieval: a server trickling metadata below the minimum rate over
// the window is dropped.
func TestAttackSlowRetrieval(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	s.d.tuf.Limits = tufclient.DefaultLimits
	s.d.tuf.Limits.MinRate, s.d.tuf.Limits.Window = 200, 500*time.Millisecond
	s.d.mitm.trickle = 20 * time.Millisecond // 50 bytes a second
	start := time.Now()
	refused[*tufclient.SlowError](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("dropped only after %v", el)
	}
}

// A revoked targets key: after the operator rotates the targets key (a
// new root naming the new key, targets re-signed), targets metadata
// signed with the old key is refused, while the re-signed targets are
// accepted.
func TestAttackRevokedTargetsKey(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	leaked := s.w.targetsKeys
	fresh := genKeys(t, 1)
	online, _ := s.w.srv.Repo.OnlineKeys()
	root := s.w.nextRoot()
	repo.Rekey(root, repo.RootKeys{Root: pubs(s.w.rootKeys), RootThreshold: 2, Targets: pubs(fresh), TargetsThreshold: 1, Online: online})
	s.w.mustPublish(metadata.ROOT, sign(t, root, s.w.rootKeys[:2]...))
	s.w.targetsKeys = fresh
	resigned := s.w.nextTargets()
	s.w.mustPublish(metadata.TARGETS, sign(t, resigned, fresh...))
	s.legit(t)
	if v := s.d.rootVersion(); v != 2 {
		t.Fatalf("trusted root v%d", v)
	}
	// The attacker, holding the leaked key, serves targets signed with it.
	forged := s.w.nextTargets()
	s.serveTargets(t, sign(t, forged, leaked...), forged.Signed.Version)
	refused[*metadata.ErrUnsignedMetadata](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
}

// Fast-forward: an attacker with the stolen timestamp key feeds a timestamp
// whose version is inflated. The device cannot tell (it is validly
// signed) and from then on refuses the real ones. The operator rotates the
// online keys (trust rotate-online): the new root no longer trusts the
// stolen key, the device sets the inflated timestamp aside and recovers.
func TestAttackFastForward(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	ts := s.onlineTimestamp(t)
	ts.Signed.Version = 1 << 40
	s.d.mitm.set("timestamp.json", sign(t, ts, s.onlineKey(t, metadata.TIMESTAMP)))
	s.legit(t) // validly signed: accepted
	s.d.mitm.clear()
	refused[*metadata.ErrBadVersionNumber](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, s.o); return err })
	keys, err := s.w.srv.Repo.RotateOnline()
	if err != nil {
		t.Fatal(err)
	}
	root := s.w.nextRoot()
	repo.Rekey(root, repo.RootKeys{Root: pubs(s.w.rootKeys), RootThreshold: 2, Targets: pubs(s.w.targetsKeys), TargetsThreshold: 1, Online: keys})
	s.w.mustPublish(metadata.ROOT, sign(t, root, s.w.rootKeys[:2]...))
	s.legit(t)
	b, _ := os.ReadFile(filepath.Join(s.d.r.StateDir, "tuf", "timestamp.json"))
	cached, err := metadata.Timestamp().FromBytes(b)
	if err != nil || cached.Signed.Version >= 1<<40 {
		t.Fatalf("after recovery the device trusts timestamp v%d (%v)", cached.Signed.Version, err)
	}
	if v := s.d.rootVersion(); v != 2 {
		t.Fatalf("root v%d", v)
	}
}

// A revoked image-signing key. The operator publishes, through the signed
// targets, a new image key and the old one revoked at key epoch 1; the
// next release is signed by both keys with key epoch 1, and the device
// installs and commits it (raising its key epoch). From then on an image
// signed only by the old key is refused at install, and at boot, whatever
// a slot holds.
func TestAttackRevokedImageKey(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	old := s.w.imageKey
	fresh := genKeys(t, 1)[0]
	md := s.w.nextTargets()
	repo.SetImageKeys(md, []proto.ImageKey{{PEM: pemOf(t, fresh.Public())}, {PEM: pemOf(t, old.Public()), RevokedAtEpoch: 1}})
	s.w.mustPublish(metadata.TARGETS, sign(t, md, s.w.targetsKeys...))
	// v3, dual-signed, key epoch 1.
	v3 := rel{id: "v3", version: "3.0.0", counter: 3, hwClass: hw}
	v3.img = s.w.buildImageSigned(v3.version, v3.counter, hw, old, fresh)
	s.w.release(v3, true, func(c *proto.TargetCustom) { c.KeyEpoch = 1 })
	s.d.report(s.o, proto.StatusFailed) // the scene's v2 attempt: set aside
	s.w.assign("v3", s.d.id)
	o := s.d.offer()
	if o.Target.Name != repo.TargetName(hw, "3.0.0") {
		t.Fatalf("offered %s", o.Target.Name)
	}
	if err := s.d.take(o); err != nil {
		t.Fatalf("the dual-signed release: %v", err)
	}
	if dec := s.d.reboot(); dec.Boot != "b" {
		t.Fatalf("trial boot: %+v", dec)
	}
	nv, _ := s.d.cfg.NVStore().Load()
	if nv.KeyEpoch != 1 {
		t.Fatalf("key epoch %d after committing the dual-signed release", nv.KeyEpoch)
	}
	s.d.report(o, proto.StatusCommitted)
	// At install: v4 signed only by the old key, validly published.
	v4 := rel{id: "v4", version: "4.0.0", counter: 4, hwClass: hw}
	v4.img = s.w.buildImage(v4.version, v4.counter, hw, old)
	s.w.release(v4, true, nil)
	s.w.assign("v4", s.d.id)
	o4 := s.d.offer()
	vouched, err := s.d.r.CheckOffer(s.w.ctx, o4)
	if err != nil {
		t.Fatal(err)
	}
	staged := filepath.Join(t.TempDir(), "staged")
	ierr := refused[*image.Error](t, s.d, func() error {
		if err := s.d.r.Fetcher.Fetch(s.w.ctx, s.d.link.URL(o4.URL), staged, vouched.Size, nil); err != nil {
			return err
		}
		_, err := s.d.r.VerifyStaged(s.w.ctx, staged, vouched)
		return err
	})
	if !errors.Is(ierr, image.ErrUntrusted) {
		t.Fatalf("want ErrUntrusted, got %v", ierr)
	}
	// At boot: v4 (counter 4, above the device's 3: only its key is wrong)
	// written into slot a by whatever means and armed as a trial; the
	// selector refuses it and boots the committed slot.
	slotA := append(append([]byte(nil), v4.img...), make([]byte, 512<<10-len(v4.img))...)
	if err := os.WriteFile(filepath.Join(s.d.dir, "slot-a.img"), slotA, 0o644); err != nil {
		t.Fatal(err)
	}
	before := s.d.fingerprint()
	dev, closeDev, _ := s.d.cfg.Open(false)
	env, _ := dev.Env.Load()
	env[boot.VarTrial], env[boot.VarTrialLeft] = "a", "3"
	dev.Env.Save(env)
	dec, _ := boot.Select(s.w.ctx, dev)
	closeDev()
	if dec.Boot != "b" {
		t.Fatalf("the selector booted %q: %+v", dec.Boot, dec)
	}
	refusedA := false
	for _, c := range dec.Checks {
		if c.Slot == "a" && !c.OK && strings.Contains(c.Problem, "key") {
			refusedA = true
		}
	}
	if !refusedA {
		t.Fatalf("slot a was not refused for its key: %+v", dec.Checks)
	}
	if s.d.fingerprint() != before {
		t.Fatal("the refused boot changed the device")
	}
}

// A device with its factory root walks several root rotations (each new
// root signed by the previous root's keys and its own) and ends trusting
// the newest.
func TestFactoryRootWalksRotations(t *testing.T) {
	s := newScene(t)
	online, _ := s.w.srv.Repo.OnlineKeys()
	keys := s.w.rootKeys
	for range 3 {
		next := genKeys(t, 3)
		root := s.w.nextRoot()
		repo.Rekey(root, repo.RootKeys{Root: pubs(next), RootThreshold: 2, Targets: pubs(s.w.targetsKeys), TargetsThreshold: 1, Online: online})
		s.w.mustPublish(metadata.ROOT, sign(t, root, keys[0], keys[1], next[0], next[1]))
		keys = next
	}
	if v := s.d.rootVersion(); v != 1 {
		t.Fatalf("factory root v%d", v)
	}
	s.legit(t)
	if v := s.d.rootVersion(); v != 4 {
		t.Fatalf("after walking: root v%d, want v4", v)
	}
	b, err := os.ReadFile(filepath.Join(s.d.r.StateDir, "tuf", "root.json"))
	if err != nil || !strings.Contains(string(b), `"version": 4`) {
		t.Fatalf("the cached root is not v4: %v", err)
	}
}

// Wrong hardware class: a signed target for other hardware, offered by a
// compromised server, is refused before download; the device's own is
// taken.
func TestAttackWrongHardwareClass(t *testing.T) {
	s := newScene(t)
	s.legit(t)
	gate := rel{id: "gate-2", version: "2.0.0", counter: 2, hwClass: "gate"}
	gate.img = s.w.buildImage(gate.version, gate.counter, "gate", s.w.imageKey)
	s.w.release(gate, true, nil)
	o := *s.o
	o.Target.Name = repo.TargetName("gate", "2.0.0")
	if err := refused[*agent.RefusedError](t, s.d, func() error { return s.d.take(&o) }); !strings.Contains(err.Reason, "hardware class") {
		t.Fatalf("reason %s", err.Reason)
	}
}

// A device whose clock says 1970, or runs five years ahead, still judges
// certificates and expiry at a sane time: TLS to its server works (the
// server's certificate is checked at the device's floor, the newest time
// it knows has passed, when its clock makes it look invalid), the
// server's authenticated time corrects the clock, and the legitimate
// update installs. Expired metadata is still refused on the corrected
// time.
func TestDeviceClockWrong(t *testing.T) {
	for name, clock := range map[string]func() time.Time{
		"1970":             func() time.Time { return time.Unix(0, 0) },
		"five years ahead": func() time.Time { return time.Now().AddDate(5, 0, 0) },
	} {
		t.Run(name, func(t *testing.T) {
			s := newScene(t)
			s.d.link.Clock.Device = clock
			o := s.d.offer() // TLS on the trusted clock; the server's Date corrects it
			if now := s.d.link.Clock.Now(); now.Sub(time.Now()).Abs() > time.Minute {
				t.Fatalf("trusted time %v after talking to the server", now)
			}
			if err := s.d.take(o); err != nil {
				t.Fatalf("install: %v", err)
			}
			// Freeze is still caught: an expired timestamp on the corrected time.
			ts := s.onlineTimestamp(t)
			ts.Signed.Version++
			ts.Signed.Expires = time.Now().Add(-time.Hour)
			s.d.mitm.set("timestamp.json", sign(t, ts, s.onlineKey(t, metadata.TIMESTAMP)))
			refused[*metadata.ErrExpiredMetadata](t, s.d, func() error { _, err := s.d.r.CheckOffer(s.w.ctx, o); return err })
		})
	}
}

// helpers for crafting online metadata as an attacker with the online keys
// (or replaying the server's).

func (s *scene) onlineKey(t *testing.T, role string) crypto.Signer {
	t.Helper()
	k, err := loadKey(filepath.Join(s.w.dir, "server", "tuf", "keys", role+".pem"))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func (s *scene) onlineSnapshot(t *testing.T) *metadata.Metadata[metadata.SnapshotType] {
	t.Helper()
	st, _ := s.w.srv.Repo.Status()
	b, err := s.w.srv.Repo.File(versioned(st.Roles[metadata.SNAPSHOT].Version, metadata.SNAPSHOT))
	if err != nil {
		t.Fatal(err)
	}
	md, err := metadata.Snapshot().FromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	return md
}

func (s *scene) onlineTimestamp(t *testing.T) *metadata.Metadata[metadata.TimestampType] {
	t.Helper()
	b, _ := s.w.srv.Repo.File("timestamp.json")
	md, err := metadata.Timestamp().FromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	return md
}

// serveSnapshot serves a crafted snapshot, and a timestamp (signed with
// the online key) that names it, so the snapshot itself is judged.
func (s *scene) serveSnapshot(t *testing.T, snap *metadata.Metadata[metadata.SnapshotType]) {
	t.Helper()
	raw := sign(t, snap, s.onlineKey(t, metadata.SNAPSHOT))
	s.d.mitm.set(versioned(snap.Signed.Version, metadata.SNAPSHOT), raw)
	ts := s.onlineTimestamp(t)
	ts.Signed.Version++
	mf := metadata.MetaFile(snap.Signed.Version)
	mf.Length, mf.Hashes = int64(len(raw)), metadata.Hashes{"sha256": sha256Of(raw)}
	ts.Signed.Meta["snapshot.json"] = mf
	s.d.mitm.set("timestamp.json", sign(t, ts, s.onlineKey(t, metadata.TIMESTAMP)))
}

// serveTargets serves crafted targets with a snapshot and timestamp (signed
// with the online keys) that name them, so the targets themselves are
// judged.
func (s *scene) serveTargets(t *testing.T, raw []byte, version int64) {
	t.Helper()
	if raw != nil {
		s.d.mitm.set(versioned(version, metadata.TARGETS), raw)
	}
	snap := s.onlineSnapshot(t)
	snap.Signed.Version++
	snap.Signed.Meta["targets.json"] = metadata.MetaFile(version)
	s.serveSnapshot(t, snap)
}

func versioned(v int64, role string) string { return strconv.FormatInt(v, 10) + "." + role + ".json" }

func sha256Of(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

func pemOf(t *testing.T, pub crypto.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

func loadKey(path string) (crypto.Signer, error) { return trust.LoadPrivateKey(path) }

// An impostor with a server certificate from the same CA but for another
// name: the device checks the name (or IP address) of the server in its
// bundle, so the handshake fails and nothing is asked of the impostor.
func TestAttackImpostorServerSameCA(t *testing.T) {
	s := newScene(t)
	cert, _, err := s.w.srv.CA.LoadOrCreateServerCert(t.TempDir(), []string{"impostor.example"})
	if err != nil {
		t.Fatal(err)
	}
	asked := false
	imp := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { asked = true }))
	imp.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert}
	imp.StartTLS()
	defer imp.Close()
	bundle := filepath.Join(s.d.dir, "bundle")
	b, _ := os.ReadFile(filepath.Join(bundle, "bundle.json"))
	os.WriteFile(filepath.Join(bundle, "bundle.json"), []byte(strings.Replace(string(b), s.w.url, imp.URL, 1)), 0o600)
	l, err := link.Open(bundle)
	if err != nil {
		t.Fatal(err)
	}
	_, err = l.CheckIn(s.w.ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: hw})
	var host x509.HostnameError
	if !errors.As(err, &host) || asked {
		t.Fatalf("the impostor was accepted (asked=%v): %v", asked, err)
	}
}
