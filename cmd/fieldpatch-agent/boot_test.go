package main

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// A device in a directory: slot files, a redundant U-Boot environment that
// the real fw_setenv arms and fw_printenv reads, and the selector deciding.
func TestBootCommandWithRealEnvTools(t *testing.T) {
	fwSetenv := testenv.Command(t, "fw_setenv")
	fwPrintenv := testenv.Command(t, "fw_printenv")
	dir := t.TempDir()
	key := filepath.Join(vectors, "mcuboot", "ed25519.pem")
	signer, err := trust.LoadPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for slotName, ver := range map[string]string{"a": "1.0.0", "b": "2.0.0"} {
		sc := uint32(1)
		var b bytes.Buffer
		payload := bytes.Repeat([]byte(ver), 4000)
		if _, err := image.Build(context.Background(), &b, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
			Version: ver, SecurityCounter: &sc, HWClass: "lock", Signers: []crypto.Signer{signer},
		}); err != nil {
			t.Fatal(err)
		}
		img := append(b.Bytes(), make([]byte, 256<<10-b.Len())...) // a slot is bigger than its image
		os.WriteFile(filepath.Join(dir, "slot-"+slotName+".img"), img, 0o644)
	}
	os.WriteFile(filepath.Join(dir, "env.img"), bytes.Repeat([]byte{0xff}, 0x8000), 0o644)
	os.WriteFile(filepath.Join(dir, "fw_env.config"), []byte("env.img 0x0 0x4000\nenv.img 0x4000 0x4000\n"), 0o644)
	cfg := map[string]any{
		"slots":    map[string]string{"a": "slot-a.img", "b": "slot-b.img"},
		"env":      map[string]string{"type": "uboot", "fw_env_config": "fw_env.config"},
		"keys":     []map[string]any{{"path": mustAbs(t, filepath.Join(vectors, "mcuboot", "ed25519.pub.pem"))}},
		"nv":       "nv.bin",
		"hw_class": "lock",
	}
	cb, _ := json.Marshal(cfg)
	cfgPath := filepath.Join(dir, "device.json")
	os.WriteFile(cfgPath, cb, 0o644)

	tool := func(bin string, args ...string) string {
		cmd := exec.Command(bin, append([]string{"-c", "fw_env.config"}, args...)...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", filepath.Base(bin), args, err, out)
		}
		return string(out)
	}
	bootOnce := func() string {
		code, out, errs := runAgent("boot", "--config", cfgPath)
		if code != cli.ExitOK {
			t.Fatalf("boot: exit %d\n%s%s", code, out, errs)
		}
		return strings.SplitN(out, "\n", 2)[0]
	}

	if code, out, errs := runAgent("nv", "--config", cfgPath, "--init"); code != 0 || !strings.Contains(out, "security counter 0") {
		t.Fatalf("nv --init: %d %s %s", code, out, errs)
	}
	if got := bootOnce(); got != "FIELDPATCH: booted=a reason=active active=a trial=- left=0" {
		t.Fatalf("fresh device: %s", got)
	}
	tool(fwSetenv, "fp_trial", "b", "fp_trial_left", "2")
	want := []string{
		"FIELDPATCH: booted=b reason=trial active=a trial=b left=1",
		"FIELDPATCH: booted=b reason=trial active=a trial=b left=0",
		"FIELDPATCH: booted=a reason=rollback active=a trial=- left=0",
		"FIELDPATCH: booted=a reason=active active=a trial=- left=0",
	}
	for i, w := range want {
		if got := bootOnce(); got != w {
			t.Fatalf("boot %d: %s\nwant    %s", i+1, got, w)
		}
		if i == 0 {
			if env := tool(fwPrintenv); !strings.Contains(env, "fp_trial_left=1") || !strings.Contains(env, "fp_booted=b") {
				t.Fatalf("fw_printenv after the first trial boot:\n%s", env)
			}
		}
	}

	// The agent's own env command arms a trial; fw_printenv sees it.
	if code, out, errs := runAgent("env", "--config", cfgPath, "fp_trial=b", "fp_trial_left=1", "note="); code != 0 || !strings.Contains(out, "fp_trial=b") {
		t.Fatalf("env set: %d %s %s", code, out, errs)
	}
	if env := tool(fwPrintenv); !strings.Contains(env, "fp_trial=b") || !strings.Contains(env, "fp_trial_left=1") {
		t.Fatalf("fw_printenv after env set:\n%s", env)
	}
	if got := bootOnce(); got != "FIELDPATCH: booted=b reason=trial active=a trial=b left=0" {
		t.Fatalf("trial armed by env: %s", got)
	}
	if code, _, _ := runAgent("env", "--config", cfgPath, "novalue"); code != cli.ExitUsage {
		t.Errorf("env with a bad argument: exit %d", code)
	}

	// A corrupt active slot with a good other one: a fallback, in JSON.
	a, _ := os.ReadFile(filepath.Join(dir, "slot-a.img"))
	a[1000] ^= 1
	os.WriteFile(filepath.Join(dir, "slot-a.img"), a, 0o644)
	code, out, _ := runAgent("boot", "--config", cfgPath, "--json")
	var d boot.Decision
	if err := json.Unmarshal([]byte(out), &d); err != nil || code != 0 || d.Boot != "b" || d.Reason != boot.ReasonFallback {
		t.Fatalf("fallback: exit %d %+v %v\n%s", code, d, err, out)
	}
	// Both corrupt: recovery, exit 1.
	b, _ := os.ReadFile(filepath.Join(dir, "slot-b.img"))
	b[1000] ^= 1
	os.WriteFile(filepath.Join(dir, "slot-b.img"), b, 0o644)
	code, out, _ = runAgent("boot", "--config", cfgPath)
	if code != cli.ExitRefused || !strings.HasPrefix(out, "FIELDPATCH: booted=none reason=recovery") {
		t.Fatalf("recovery: exit %d\n%s", code, out)
	}
	// A config that does not validate: exit 3 with every problem named.
	os.WriteFile(cfgPath, []byte(`{"slots": {"a": "x"}, "env": {"type": "floppy"}}`), 0o644)
	code, _, errs := runAgent("boot", "--config", cfgPath)
	for _, w := range []string{"slots.b is missing", "env.type", "keys", "nv is required"} {
		if !strings.Contains(errs, w) {
			t.Errorf("bad config: error %q lacks %q", errs, w)
		}
	}
	if code != cli.ExitFailure {
		t.Errorf("bad config: exit %d", code)
	}
}

func mustAbs(t *testing.T, p string) string {
	t.Helper()
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
