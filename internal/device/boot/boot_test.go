package boot

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/image"
)

const slotSize = 64 << 10

var (
	oldKey  = newKey()
	newKey2 = newKey()
	foreign = newKey()
)

func newKey() ed25519.PrivateKey {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}

// build makes an image for a slot.
func build(t *testing.T, version string, counter uint32, hw string, keys ...ed25519.PrivateKey) []byte {
	t.Helper()
	payload := bytes.Repeat([]byte(version), 1000)
	var signers []crypto.Signer
	for _, k := range keys {
		signers = append(signers, k)
	}
	var b bytes.Buffer
	if _, err := image.Build(context.Background(), &b, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
		Version: version, SecurityCounter: &counter, HWClass: hw, Signers: signers,
	}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// fixture is a device: two slots, an environment, a non-volatile store.
type fixture struct {
	dev   Device
	slots map[string]*slot.Flash
	fs    *slot.MemFS
	nv    *NVFile
	envFl *slot.Flash // backing of Pair and Redundant environments
}

type envKind string

const (
	envPair      envKind = "uboot-pair"
	envRedundant envKind = "uboot-redundant"
	envGRUB      envKind = "grub"
	envSingle    envKind = "uboot-single-file"
)

var envKinds = []envKind{envPair, envRedundant, envGRUB, envSingle}

func newFixture(t *testing.T, kind envKind) *fixture {
	t.Helper()
	f := &fixture{slots: map[string]*slot.Flash{}, fs: slot.NewMemFS()}
	f.nv = &NVFile{FS: f.fs, Path: "/nv/state"}
	if err := f.nv.Init(NVState{}); err != nil {
		t.Fatal(err)
	}
	f.envFl = slot.NewFlash(0x800, 64)
	switch kind {
	case envPair:
		f.dev.Env = &bootenv.Pair{Copies: [2]bootenv.Location{{Dev: f.envFl, Offset: 0, Size: 0x400}, {Dev: f.envFl, Offset: 0x400, Size: 0x400}}}
	case envRedundant:
		f.dev.Env = &bootenv.Redundant{Copies: [2]bootenv.Location{{Dev: f.envFl, Offset: 0, Size: 0x400}, {Dev: f.envFl, Offset: 0x400, Size: 0x400}}}
	case envGRUB:
		f.dev.Env = &bootenv.GRUBFile{FS: f.fs, Path: "/boot/grubenv"}
	case envSingle:
		f.dev.Env = &bootenv.SingleFile{FS: f.fs, Path: "/boot/uboot.env", Size: 0x400}
	}
	f.dev.Slots = map[string]slot.Device{}
	for _, s := range Slots {
		f.slots[s] = slot.NewFlash(slotSize, 256)
		f.dev.Slots[s] = f.slots[s]
	}
	f.dev.Keys = []TrustedKey{{Key: oldKey.Public(), Name: "old"}, {Key: newKey2.Public(), Name: "new"}}
	f.dev.NV = f.nv
	f.dev.HWClass = "lock"
	return f
}

func (f *fixture) put(t *testing.T, s string, img []byte) {
	t.Helper()
	if _, err := f.slots[s].WriteAt(img, 0); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) corrupt(s string, off int64) {
	b := make([]byte, 1)
	f.slots[s].ReadAt(b, off)
	b[0] ^= 0x20
	f.slots[s].WriteAt(b, off)
}

func (f *fixture) setEnv(t *testing.T, e bootenv.Env) {
	t.Helper()
	if err := f.dev.Env.Save(e); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) env(t *testing.T) bootenv.Env {
	t.Helper()
	e, err := f.dev.Env.Load()
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func (f *fixture) selectOK(t *testing.T) Decision {
	t.Helper()
	d, err := Select(context.Background(), f.dev)
	if err != nil {
		t.Fatalf("select: %v", err)
	}
	return d
}

func trialEnv(trial string, left int) bootenv.Env {
	return bootenv.Env{VarActive: "a", VarTrial: trial, VarTrialLeft: fmt.Sprint(left)}
}

// Every boot case, on every kind of environment.
func TestBootCases(t *testing.T) {
	v1 := func(t *testing.T) []byte { return build(t, "1.0.0", 1, "lock", oldKey) }
	v2 := func(t *testing.T) []byte { return build(t, "2.0.0", 2, "lock", oldKey) }
	cases := []struct {
		name       string
		setup      func(t *testing.T, f *fixture)
		boot       string
		reason     Reason
		active     string
		trial      string
		left       int
		noteHas    string
		wantNoSave bool
	}{
		{"fresh device", func(t *testing.T, f *fixture) { f.put(t, "a", v1(t)) }, "a", ReasonActive, "a", "", 0, "unreadable", false},
		{"steady state writes nothing", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.setEnv(t, bootenv.Env{VarActive: "a", VarTrial: "", VarTrialLeft: "0", VarBooted: "a", VarBootReason: "active"})
		}, "a", ReasonActive, "a", "", 0, "", true},
		{"trial with attempts left", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.put(t, "b", v2(t))
			f.setEnv(t, trialEnv("b", 3))
		}, "b", ReasonTrial, "a", "b", 2, "", false},
		{"trial exhausted", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.put(t, "b", v2(t))
			f.setEnv(t, trialEnv("b", 0))
		}, "a", ReasonRollback, "a", "", 0, "no attempts left", false},
		{"trial image corrupt", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.put(t, "b", v2(t))
			f.corrupt("b", 3000)
			f.setEnv(t, trialEnv("b", 3))
		}, "a", ReasonRollback, "a", "", 0, "does not match", false},
		{"trial image by an unknown key", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.put(t, "b", build(t, "2.0.0", 2, "lock", foreign))
			f.setEnv(t, trialEnv("b", 3))
		}, "a", ReasonRollback, "a", "", 0, "no signature by a trusted key", false},
		{"trial image by a revoked key", func(t *testing.T, f *fixture) {
			f.dev.Keys[0].RevokedAtEpoch = 1
			f.nv.Raise(NVState{KeyEpoch: 1})
			f.put(t, "a", build(t, "1.0.0", 1, "lock", oldKey, newKey2))
			f.put(t, "b", build(t, "2.0.0", 2, "lock", oldKey))
			f.setEnv(t, trialEnv("b", 3))
		}, "a", ReasonRollback, "a", "", 0, "no signature by a trusted key", false},
		{"trial image dual-signed during a rotation", func(t *testing.T, f *fixture) {
			f.dev.Keys[0].RevokedAtEpoch = 1
			f.nv.Raise(NVState{KeyEpoch: 1})
			f.put(t, "a", build(t, "1.0.0", 1, "lock", oldKey, newKey2))
			f.put(t, "b", build(t, "2.0.0", 2, "lock", oldKey, newKey2))
			f.setEnv(t, trialEnv("b", 3))
		}, "b", ReasonTrial, "a", "b", 2, "", false},
		{"trial image below the counter", func(t *testing.T, f *fixture) {
			f.nv.Raise(NVState{Counter: 5})
			f.put(t, "a", build(t, "1.0.0", 5, "lock", oldKey))
			f.put(t, "b", build(t, "2.0.0", 3, "lock", oldKey))
			f.setEnv(t, trialEnv("b", 3))
		}, "a", ReasonRollback, "a", "", 0, "below the device's 5", false},
		{"trial image for other hardware", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.put(t, "b", build(t, "2.0.0", 2, "thermostat", oldKey))
			f.setEnv(t, trialEnv("b", 3))
		}, "a", ReasonRollback, "a", "", 0, "hardware class", false},
		{"active corrupt, other good", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.put(t, "b", v2(t))
			f.corrupt("a", 100)
			f.setEnv(t, trialEnv("", 0))
		}, "b", ReasonFallback, "b", "", 0, "falling back", false},
		{"active signed only by a revoked key", func(t *testing.T, f *fixture) {
			f.dev.Keys[0].RevokedAtEpoch = 2
			f.nv.Raise(NVState{KeyEpoch: 2})
			f.put(t, "a", v1(t))
			f.put(t, "b", build(t, "2.0.0", 2, "lock", newKey2))
			f.setEnv(t, trialEnv("", 0))
		}, "b", ReasonFallback, "b", "", 0, "falling back", false},
		{"both corrupt", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.put(t, "b", v2(t))
			f.corrupt("a", 100)
			f.corrupt("b", 100)
			f.setEnv(t, trialEnv("b", 2))
		}, "", ReasonRecovery, "a", "", 0, "refused", false},
		{"empty slots", func(t *testing.T, f *fixture) {}, "", ReasonRecovery, "a", "", 0, "", false},
		{"non-volatile store missing", func(t *testing.T, f *fixture) {
			f.fs.Remove("/nv/state")
			f.fs.SyncDir("/nv")
			f.put(t, "a", v1(t))
			f.put(t, "b", v2(t))
			f.setEnv(t, trialEnv("b", 3))
		}, "a", ReasonRollback, "a", "", 0, "fail-safe", false},
		{"non-volatile store corrupt, active corrupt: no fallback", func(t *testing.T, f *fixture) {
			f.fs.Put("/nv/state", []byte("garbage"))
			f.put(t, "a", v1(t))
			f.put(t, "b", v2(t))
			f.corrupt("a", 100)
			f.setEnv(t, trialEnv("", 0))
		}, "", ReasonRecovery, "a", "", 0, "corrupt", false},
		{"garbage variables", func(t *testing.T, f *fixture) {
			f.put(t, "a", v1(t))
			f.setEnv(t, bootenv.Env{VarActive: "c", VarTrial: "z", VarTrialLeft: "x"})
		}, "a", ReasonActive, "a", "", 0, "not a slot", false},
	}
	for _, kind := range envKinds {
		for _, c := range cases {
			t.Run(string(kind)+"/"+c.name, func(t *testing.T) {
				f := newFixture(t, kind)
				c.setup(t, f)
				d := f.selectOK(t)
				if d.Boot != c.boot || d.Reason != c.reason || d.Active != c.active || d.Trial != c.trial || d.TrialLeft != c.left {
					t.Fatalf("decision boot=%q reason=%s active=%s trial=%q left=%d; want %q %s %s %q %d\nnotes: %q\nchecks: %+v",
						d.Boot, d.Reason, d.Active, d.Trial, d.TrialLeft, c.boot, c.reason, c.active, c.trial, c.left, d.Notes, d.Checks)
				}
				all := strings.Join(d.Notes, "; ")
				for _, ch := range d.Checks {
					all += "; " + ch.Problem
				}
				if !strings.Contains(all, c.noteHas) {
					t.Errorf("notes and checks %q do not mention %q", all, c.noteHas)
				}
				if d.EnvSaved == c.wantNoSave {
					t.Errorf("env saved = %v", d.EnvSaved)
				}
				// What was saved is what was decided.
				e := f.env(t)
				if e[VarBooted] != c.boot || e[VarBootReason] != string(c.reason) || e[VarActive] != c.active || e[VarTrial] != c.trial || e[VarTrialLeft] != fmt.Sprint(c.left) {
					t.Errorf("saved environment %v does not match the decision", e)
				}
			})
		}
	}
}

// A trial counts down, attempt by attempt, then rolls back; the next boot
// is an ordinary one that writes nothing.
func TestTrialCountdown(t *testing.T) {
	for _, kind := range envKinds {
		t.Run(string(kind), func(t *testing.T) {
			f := newFixture(t, kind)
			f.put(t, "a", build(t, "1.0.0", 1, "lock", oldKey))
			f.put(t, "b", build(t, "2.0.0", 2, "lock", oldKey))
			f.setEnv(t, trialEnv("b", 3))
			var got []string
			for i := 0; i < 5; i++ {
				d := f.selectOK(t)
				got = append(got, fmt.Sprintf("%s/%s/%d/%v", d.Boot, d.Reason, d.TrialLeft, d.EnvSaved))
			}
			want := "b/trial/2/true b/trial/1/true b/trial/0/true a/rollback/0/true a/active/0/true"
			if strings.Join(got, " ") != want {
				t.Fatalf("boots: %s\nwant:  %s", strings.Join(got, " "), want)
			}
			if d := f.selectOK(t); d.EnvSaved {
				t.Error("a steady boot wrote the environment")
			}
		})
	}
}

// A torn environment copy: the other copy's state decides.
func TestTornEnvironment(t *testing.T) {
	for _, kind := range []envKind{envPair, envRedundant} {
		t.Run(string(kind), func(t *testing.T) {
			f := newFixture(t, kind)
			f.put(t, "a", build(t, "1.0.0", 1, "lock", oldKey))
			f.put(t, "b", build(t, "2.0.0", 2, "lock", oldKey))
			f.setEnv(t, trialEnv("", 0))
			f.envFl.CutAtByte(40, true) // the trial being armed is torn mid-copy
			if err := f.dev.Env.Save(trialEnv("b", 3)); !errors.Is(err, slot.ErrPowerCut) {
				t.Fatalf("save: %v", err)
			}
			f.envFl.PowerOn()
			d := f.selectOK(t)
			if d.Boot != "a" || d.Reason != ReasonActive {
				t.Fatalf("after a torn arm: %s %s", d.Boot, d.Reason)
			}
		})
	}
}

// A trial whose attempt cannot be recorded is not made.
func TestTrialNotAttemptedWhenSaveFails(t *testing.T) {
	f := newFixture(t, envPair)
	f.put(t, "a", build(t, "1.0.0", 1, "lock", oldKey))
	f.put(t, "b", build(t, "2.0.0", 2, "lock", oldKey))
	f.setEnv(t, trialEnv("b", 3))
	f.envFl.CutAtWrite(1)
	d, err := Select(context.Background(), f.dev)
	if err == nil {
		t.Fatal("no error from a failed save")
	}
	if d.Boot != "a" || d.Reason != ReasonActive || d.Trial != "b" || d.TrialLeft != 3 {
		t.Fatalf("decision %+v", d)
	}
	f.envFl.PowerOn()
	if e := f.env(t); e[VarTrialLeft] != "3" {
		t.Errorf("attempts changed to %s", e[VarTrialLeft])
	}
	// With storage back, the trial goes ahead.
	if d := f.selectOK(t); d.Boot != "b" || d.TrialLeft != 2 {
		t.Errorf("next boot %s left %d", d.Boot, d.TrialLeft)
	}
}

// Power cut at every byte of the selector's own save, on both raw layouts:
// the next boot still decides safely (the trial or the active slot, never
// recovery, never a trial with more attempts than before).
func TestPowerCutDuringSelect(t *testing.T) {
	for _, kind := range []envKind{envPair, envRedundant} {
		t.Run(string(kind), func(t *testing.T) {
			a := build(t, "1.0.0", 1, "lock", oldKey)
			b := build(t, "2.0.0", 2, "lock", oldKey)
			probe := newFixture(t, kind)
			probe.put(t, "a", a)
			probe.put(t, "b", b)
			probe.setEnv(t, trialEnv("b", 1))
			before := probe.envFl.Bytes()
			_, w0 := probe.envFl.Counters()
			probe.selectOK(t)
			_, w1 := probe.envFl.Counters()
			for k := int64(0); k < w1-w0; k += 7 {
				f := newFixture(t, kind)
				f.put(t, "a", a)
				f.put(t, "b", b)
				f.envFl = slot.NewFlashFrom(before, 64)
				switch st := f.dev.Env.(type) {
				case *bootenv.Pair:
					st.Copies[0].Dev, st.Copies[1].Dev = f.envFl, f.envFl
				case *bootenv.Redundant:
					st.Copies[0].Dev, st.Copies[1].Dev = f.envFl, f.envFl
				}
				f.envFl.CutAtByte(k, true)
				Select(context.Background(), f.dev)
				f.envFl.PowerOn()
				d := f.selectOK(t)
				ok := d.Boot == "b" && d.Reason == ReasonTrial && d.TrialLeft == 0 || d.Boot == "a" && d.Reason == ReasonRollback
				if !ok {
					t.Fatalf("cut at byte %d: next boot %s %s left %d", k, d.Boot, d.Reason, d.TrialLeft)
				}
			}
		})
	}
}

func TestNVStore(t *testing.T) {
	fs := slot.NewMemFS()
	nv := &NVFile{FS: fs, Path: "/nv"}
	if _, err := nv.Load(); !errors.Is(err, ErrNVMissing) {
		t.Fatalf("missing: %v", err)
	}
	if err := nv.Init(NVState{Counter: 2}); err != nil {
		t.Fatal(err)
	}
	if s, err := nv.Raise(NVState{Counter: 5, KeyEpoch: 1}); err != nil || s.Counter != 5 {
		t.Fatalf("raise: %v %v", s, err)
	}
	if _, err := nv.Raise(NVState{Counter: 4, KeyEpoch: 1}); !errors.Is(err, ErrNVLower) {
		t.Fatalf("lowering: %v", err)
	}
	if err := nv.Init(NVState{}); !errors.Is(err, ErrNVLower) {
		t.Fatalf("re-init lower: %v", err)
	}
	if s, _ := nv.Load(); s != (NVState{Counter: 5, KeyEpoch: 1}) {
		t.Fatalf("state %v", s)
	}
	b, _ := fs.ReadFile("/nv")
	b[9] ^= 1
	fs.Put("/nv", b)
	if _, err := nv.Load(); !errors.Is(err, ErrNVCorrupt) {
		t.Fatalf("corrupt: %v", err)
	}
}
