package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/image"
)

type noHooks struct{}

func (noHooks) Run(context.Context, string, HookEnv) error       { return nil }
func (noHooks) SaveRevert(context.Context, string) (bool, error) { return false, nil }
func (noHooks) RunSaved(context.Context, string, HookEnv) error  { return nil }

func testImage(t *testing.T, key ed25519.PrivateKey, version string, counter uint32) []byte {
	t.Helper()
	p := bytes.Repeat([]byte(version), 2000)
	var b bytes.Buffer
	if _, err := image.Build(context.Background(), &b, bytes.NewReader(p), int64(len(p)), image.BuildOptions{
		Version: version, SecurityCounter: &counter, HWClass: "lock", Signers: []crypto.Signer{key},
	}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func testRunner(t *testing.T) (*Runner, map[string]*slot.Flash, *slot.MemFS) {
	t.Helper()
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{3}, 32))
	fs := slot.NewMemFS()
	slots := map[string]*slot.Flash{"a": slot.NewFlash(64<<10, 256), "b": slot.NewFlash(64<<10, 256)}
	slots["a"].WriteAt(testImage(t, key, "1.0.0", 1), 0)
	envFl := slot.NewFlash(0x800, 256)
	env := &bootenv.Pair{Copies: [2]bootenv.Location{{Dev: envFl, Offset: 0, Size: 0x400}, {Dev: envFl, Offset: 0x400, Size: 0x400}}}
	env.Save(bootenv.Env{boot.VarActive: "a", boot.VarBooted: "a"})
	nv := &boot.NVFile{FS: fs, Path: "/nv"}
	nv.Init(boot.NVState{Counter: 1})
	fs.Put("/inbox/v2.img", testImage(t, key, "2.0.0", 2))
	r := &Runner{
		FS: fs, StateDir: "/state", DataDir: "/data", NV: nv, Hooks: noHooks{},
		Device: boot.Device{Env: env, Slots: map[string]slot.Device{"a": slots["a"], "b": slots["b"]},
			Keys: []boot.TrustedKey{{Key: key.Public()}}, NV: nv, HWClass: "lock"},
	}
	return r, slots, fs
}

// A slot altered after it was written and before the trial is armed is
// caught by the re-read: the update fails and no trial is armed.
func TestArmRereadsTheSlot(t *testing.T) {
	r, slots, _ := testRunner(t)
	r.AtPhase = func(p Phase) {
		if p == PhaseArmed {
			b := make([]byte, 1)
			slots["b"].ReadAt(b, 1000)
			b[0] ^= 1
			slots["b"].WriteAt(b, 1000)
		}
	}
	st, err := r.Install(context.Background(), "/inbox/v2.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Last == nil || st.Last.Result != ResultFailed || !strings.Contains(st.Last.Reason, "refused before arming") {
		t.Fatalf("outcome %+v", st.Last)
	}
	env, _ := r.Device.Env.Load()
	if env[boot.VarTrial] != "" {
		t.Fatalf("a trial was armed: %v", env)
	}
}

// Without the alteration the same install arms the trial and asks for a reboot.
func TestInstallArmsTrial(t *testing.T) {
	r, _, fs := testRunner(t)
	st, err := r.Install(context.Background(), "/inbox/v2.img", nil)
	if !errors.Is(err, ErrReboot) || st.Phase != PhaseRebooting {
		t.Fatalf("install: %v, phase %s", err, st.Phase)
	}
	env, _ := r.Device.Env.Load()
	if env[boot.VarTrial] != "b" || env[boot.VarTrialLeft] != "3" {
		t.Fatalf("environment %v", env)
	}
	if _, err := fs.ReadFile("/state/journal.json"); err != nil {
		t.Fatalf("no journal: %v", err)
	}
}
