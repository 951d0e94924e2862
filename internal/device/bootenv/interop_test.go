package bootenv

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// fwPrintenv runs the real fw_printenv with a config; ok is false when it
// cannot read a valid environment (it exits non-zero on a bad CRC).
func fwPrintenv(t *testing.T, config string) (Env, bool) {
	t.Helper()
	bin := testenv.Command(t, "fw_printenv")
	cmd := exec.Command(bin, "-c", config)
	cmd.Dir = filepath.Dir(config) // device paths in the config are relative to it
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, false
		}
		t.Fatalf("fw_printenv: %v", err)
	}
	return parseLines(t, string(out)), true
}

// parseLines reads name=value lines as the tools print them; a line with no
// '=' continues the previous value (a value holding a newline).
func parseLines(t *testing.T, out string) Env {
	t.Helper()
	e := Env{}
	last := ""
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		k, v, ok := strings.Cut(line, "=")
		switch {
		case ok:
			e[k] = v
			last = k
		case last != "":
			e[last] += "\n" + line
		case line != "":
			t.Fatalf("tool printed %q", line)
		}
	}
	return e
}

func fwSetenv(t *testing.T, config string, args ...string) {
	t.Helper()
	bin := testenv.Command(t, "fw_setenv")
	cmd := exec.Command(bin, append([]string{"-c", config}, args...)...)
	cmd.Dir = filepath.Dir(config)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("fw_setenv %v: %v\n%s", args, err, out)
	}
}

func grubList(t *testing.T, path string) (Env, bool) {
	t.Helper()
	bin := testenv.Command(t, "grub-editenv")
	out, err := exec.Command(bin, path, "list").Output()
	if err != nil {
		return nil, false
	}
	return parseLines(t, string(out)), true
}

func writeConfig(t *testing.T, dir, text string) string {
	t.Helper()
	p := filepath.Join(dir, "fw_env.config")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func openFile(t *testing.T, path string) *slot.FileDevice {
	t.Helper()
	d, err := slot.OpenDevice(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func abState(n int) Env {
	return Env{"fp_active": "a", "fp_trial": "b", "fp_trial_left": fmt.Sprint(n), "bootdelay": "0", "bootcmd": "run fp_select; boot"}
}

// A single copy in a file: ours writes, fw_printenv reads; fw_setenv writes,
// ours reads.
func TestUBootSingleInterop(t *testing.T) {
	dir := t.TempDir()
	envPath := filepath.Join(dir, "uboot.env")
	os.WriteFile(envPath, make([]byte, 0x4000), 0o644)
	cfg := writeConfig(t, dir, "uboot.env 0x0 0x4000\n")
	lines, _ := ParseConfig("uboot.env 0x0 0x4000\n")
	st, err := OpenFwEnvConfig(lines, dir, slot.OSFS{}, osOpener)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := st.(*SingleFile); !ok {
		t.Fatalf("a whole-file copy opened as %T, want *SingleFile", st)
	}
	want := abState(3)
	if err := st.Save(want); err != nil {
		t.Fatal(err)
	}
	if got, ok := fwPrintenv(t, cfg); !ok || !got.Equal(want) {
		t.Fatalf("fw_printenv read %v (ok %v), want %v", got, ok, want)
	}
	fwSetenv(t, cfg, "fp_trial_left", "2")
	fwSetenv(t, cfg, "bootdelay") // delete
	got, err := st.Load()
	if err != nil {
		t.Fatal(err)
	}
	want["fp_trial_left"] = "2"
	delete(want, "bootdelay")
	if !got.Equal(want) {
		t.Fatalf("ours read %v after fw_setenv, want %v", got, want)
	}
}

func osOpener(path string) (Device, bool, error) {
	d, err := slot.OpenDevice(path, false)
	if err != nil {
		return nil, false, err
	}
	fi, err := os.Stat(path)
	return d, err == nil && fi.Mode().IsRegular(), err
}

// Redundant copies: saves alternate between ours and libubootenv's tools,
// each reading what the other wrote, across the flags byte's wrap-around.
func TestUBootRedundantInterop(t *testing.T) {
	dir := t.TempDir()
	devPath := filepath.Join(dir, "mmcblk0")
	os.WriteFile(devPath, bytes.Repeat([]byte{0xff}, 0x10000), 0o644)
	cfgText := "mmcblk0 0x8000 0x2000\nmmcblk0 0xA000 0x2000\n"
	cfg := writeConfig(t, dir, cfgText)
	lines, _ := ParseConfig(cfgText)
	st, err := OpenFwEnvConfig(lines, dir, slot.OSFS{}, osOpener)
	if err != nil {
		t.Fatal(err)
	}
	r, ok := st.(*Redundant)
	if !ok {
		t.Fatalf("opened as %T, want *Redundant", st)
	}
	if _, err := st.Load(); !errors.Is(err, ErrNoEnv) {
		t.Fatalf("blank storage: %v, want ErrNoEnv", err)
	}
	dev := r.Copies[0].Dev
	flagsOf := func(i int) byte {
		b := make([]byte, 5)
		dev.ReadAt(b, r.Copies[i].Offset)
		return b[4]
	}

	want := abState(3)
	for round := 0; round < 4; round++ {
		if err := st.Save(want); err != nil {
			t.Fatal(err)
		}
		if got, ok := fwPrintenv(t, cfg); !ok || !got.Equal(want) {
			t.Fatalf("round %d: fw_printenv read %v, want %v", round, got, want)
		}
		want["fp_trial_left"] = fmt.Sprint(round)
		fwSetenv(t, cfg, "fp_trial_left", want["fp_trial_left"])
		got, err := st.Load()
		if err != nil || !got.Equal(want) {
			t.Fatalf("round %d: ours read %v (%v) after fw_setenv, want %v", round, got, err, want)
		}
	}
	if f0, f1 := flagsOf(0), flagsOf(1); f0 == f1 || max(f0, f1) != 8 {
		t.Errorf("after 8 alternating saves the flags are %d and %d, want 8 and 7", f0, f1)
	}

	// Wrap-around: copy 0 at 254; ours writes 255 into copy 1, fw_setenv
	// then writes 0 into copy 0, and both sides agree that 0 is newest.
	b, _ := EncodeUBoot(Env{"stage": "254"}, 0x2000, true, 254)
	dev.WriteAt(b, r.Copies[0].Offset)
	b, _ = EncodeUBoot(Env{"stage": "253"}, 0x2000, true, 253)
	dev.WriteAt(b, r.Copies[1].Offset)
	if err := st.Save(Env{"stage": "255"}); err != nil {
		t.Fatal(err)
	}
	if flagsOf(1) != 255 {
		t.Fatalf("our save after 254 wrote flags %d into copy 1", flagsOf(1))
	}
	if got, _ := fwPrintenv(t, cfg); got["stage"] != "255" {
		t.Fatalf("fw_printenv read stage %q, want 255", got["stage"])
	}
	fwSetenv(t, cfg, "stage", "0")
	if flagsOf(0) != 0 {
		t.Fatalf("fw_setenv after 255 wrote flags %d", flagsOf(0))
	}
	if got, _ := st.Load(); got["stage"] != "0" {
		t.Fatalf("ours read stage %q after the wrap, want 0", got["stage"])
	}
	if err := st.Save(Env{"stage": "1"}); err != nil {
		t.Fatal(err)
	}
	if got, _ := fwPrintenv(t, cfg); got["stage"] != "1" || flagsOf(1) != 1 {
		t.Fatalf("after the wrap: fw_printenv read %q, copy 1 flags %d", got["stage"], flagsOf(1))
	}
}

// The script scheme: each copy is a plain single copy fw_printenv reads.
func TestPairCopiesReadByFwPrintenv(t *testing.T) {
	dir := t.TempDir()
	devPath := filepath.Join(dir, "disk.img")
	os.WriteFile(devPath, make([]byte, 0x10000), 0o644)
	dev := openFile(t, devPath)
	p := &Pair{Copies: [2]Location{{dev, 0x8000, 0x4000}, {dev, 0xC000, 0x4000}}}
	cfgs := [2]string{
		writeConfigNamed(t, dir, "copy0.config", "disk.img 0x8000 0x4000\n"),
		writeConfigNamed(t, dir, "copy1.config", "disk.img 0xC000 0x4000\n"),
	}
	for i := 1; i <= 3; i++ {
		want := abState(i)
		if err := p.Save(want); err != nil {
			t.Fatal(err)
		}
		want[SeqVar] = fmt.Sprint(i)
		got, err := p.Load()
		if err != nil || !got.Equal(want) {
			t.Fatalf("save %d: ours read %v (%v)", i, got, err)
		}
		// The copy just written is the other one each time.
		idx := (i - 1) % 2
		if fw, ok := fwPrintenv(t, cfgs[idx]); !ok || !fw.Equal(want) {
			t.Fatalf("save %d: fw_printenv read copy %d as %v (ok %v), want %v", i, idx, fw, ok, want)
		}
	}
}

func writeConfigNamed(t *testing.T, dir, name, text string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	os.WriteFile(p, []byte(text), 0o644)
	return p
}

// GRUB blocks: ours and grub-editenv read each other's, escapes included,
// and for variables set in sorted order the files are byte-identical.
func TestGRUBInterop(t *testing.T) {
	bin := testenv.Command(t, "grub-editenv")
	dir := t.TempDir()
	theirs := filepath.Join(dir, "theirs.env")
	run := func(args ...string) {
		if out, err := exec.Command(bin, append([]string{theirs}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("grub-editenv %v: %v\n%s", args, err, out)
		}
	}
	want := Env{"a": `x\y`, "b": "line1\nline2", "c": "", "fp_active": "b", "fp_trial_left": "3"}
	run("create")
	run("set", "a="+want["a"], "b="+want["b"], "c=", "fp_active=b", "fp_trial_left=3")
	theirBytes, _ := os.ReadFile(theirs)
	ours, err := EncodeGRUB(want, GRUBBlockSize)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ours, theirBytes) {
		t.Fatalf("our block differs from grub-editenv's:\nours   %q\ntheirs %q", ours[:160], theirBytes[:160])
	}
	g := &GRUBFile{FS: slot.OSFS{}, Path: theirs}
	if got, err := g.Load(); err != nil || !got.Equal(want) {
		t.Fatalf("ours read %v (%v)", got, err)
	}
	want["fp_trial_left"] = "2"
	want["new"] = "v"
	if err := g.Save(want); err != nil {
		t.Fatal(err)
	}
	run("unset", "c")
	delete(want, "c")
	if got, ok := grubList(t, theirs); !ok || !got.Equal(want) {
		t.Fatalf("grub-editenv list after our save: %v, want %v", got, want)
	}
	if back, err := g.Load(); err != nil || !back.Equal(want) {
		t.Fatalf("ours read %v (%v), want %v", back, err, want)
	}
}

// GRUB's save_env rewrites the block in place, one file-system block at a
// time, with no checksum. A sector write is atomic on the media GRUB boots
// from, so the A/B variables must all sit in the block's first 512-byte
// sector: a save torn at the sector boundary then leaves old or new.
func TestGRUBVariablesFitOneSector(t *testing.T) {
	worst := Env{
		"fp_active": "b", "fp_trial": "b", "fp_trial_left": "9", "fp_booted": "b",
		"fp_boot_reason": "rollback", "fp_nv_counter": "4294967295",
	}
	b, err := EncodeGRUB(worst, GRUBBlockSize)
	if err != nil {
		t.Fatal(err)
	}
	if used := len(bytes.TrimRight(b, "#")); used > 512 {
		t.Fatalf("A/B variables take %d bytes of the block; they must fit the first 512", used)
	}
}
