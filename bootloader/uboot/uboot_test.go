package uboot

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// The board: QEMU's virt machine with Debian's U-Boot for qemu_arm64. Its
// built-in environment (second pflash) only says "run boot.scr from the
// FAT partition"; the A/B state lives in the two-copy area on the virtio
// disk, written by our codec.
const (
	ubootBin = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"
	sector   = 512
	p1Start  = 2048 // FAT: boot.scr
	p1Size   = 8192
	p2Start  = 10240 // slot a: a signed FIT, raw
	p3Start  = 18432 // slot b
	slotSize = 8192
	envOff0  = 0x8000
	envOff1  = 0xC000
	envSize  = 0x4000
)

var qemuBase = []string{"-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-nographic", "-no-reboot", "-nic", "none"}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

// kit is what every board shares: keys, the control DTB holding the public
// key, the U-Boot environment flash, boot.scr on a FAT image, and a few
// signed FITs. Built once per test run.
type kit struct {
	once sync.Once
	err  error
	dir  string
	fits map[string][]byte // "v1c1" etc.
}

var shared kit

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func (k *kit) get(t *testing.T) *kit {
	t.Helper()
	for _, tool := range []string{"qemu-system-aarch64", "mkimage", "mkenvimage", "openssl", "sfdisk", "mkfs.vfat", "mcopy", "dtc"} {
		testenv.Command(t, tool)
	}
	if _, err := os.Stat(ubootBin); err != nil {
		testenv.Missing(t, "U-Boot for qemu_arm64 is not installed (%v): package u-boot-qemu", err)
	}
	k.once.Do(func() { k.err = k.build() })
	if k.err != nil {
		t.Fatal(k.err)
	}
	return k
}

func (k *kit) build() error {
	dir, err := os.MkdirTemp("", "fieldpatch-uboot")
	if err != nil {
		return err
	}
	k.dir = dir
	keys := filepath.Join(dir, "keys")
	os.Mkdir(keys, 0o700)
	steps := [][]string{
		{"openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", filepath.Join(keys, "fp-dev.key")},
		{"openssl", "req", "-batch", "-new", "-x509", "-key", filepath.Join(keys, "fp-dev.key"), "-out", filepath.Join(keys, "fp-dev.crt"), "-subj", "/CN=fp-dev", "-days", "3650"},
		// The control DTB must come from the machine that boots; mkimage -K adds the key to it.
		append(append([]string{"qemu-system-aarch64"}, qemuBase...), "-machine", "dumpdtb="+filepath.Join(dir, "ctl.dtb")),
	}
	other := filepath.Join(dir, "otherkeys")
	os.Mkdir(other, 0o700)
	steps = append(steps,
		[]string{"openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", filepath.Join(other, "fp-dev.key")},
		[]string{"openssl", "req", "-batch", "-new", "-x509", "-key", filepath.Join(other, "fp-dev.key"), "-out", filepath.Join(other, "fp-dev.crt"), "-subj", "/CN=other", "-days", "3650"},
	)
	for _, s := range steps {
		if err := run(s[0], s[1:]...); err != nil {
			return err
		}
	}
	k.fits = map[string][]byte{}
	for _, f := range []struct {
		name, version, counter, keys string
	}{
		{"v1c1", "1.0.0", "1", keys},
		{"v1c2", "1.0.0", "2", keys},
		{"v2c1", "2.0.0", "1", keys},
		{"v2c2", "2.0.0", "2", keys},
		{"v2c1-foreign", "2.0.0", "1", other},
	} {
		b, err := k.makeFIT(f.name, f.version, f.counter, f.keys)
		if err != nil {
			return err
		}
		k.fits[f.name] = b
	}
	// U-Boot's own environment: no delay, run boot.scr, power off.
	envTxt := filepath.Join(dir, "uboot-env.txt")
	os.WriteFile(envTxt, []byte("bootdelay=0\nbootcmd=virtio scan; if load virtio 0:1 0x40200000 boot.scr; then source 0x40200000; fi; echo FIELDPATCH: boot.scr failed; poweroff\n"), 0o644)
	flash := filepath.Join(dir, "flash1.img")
	if err := run("mkenvimage", "-s", "0x40000", "-o", flash, envTxt); err != nil {
		return err
	}
	if err := os.Truncate(flash, 64<<20); err != nil {
		return err
	}
	script, err := filepath.Abs("boot.cmd")
	if err != nil {
		return err
	}
	scr, vfat := filepath.Join(dir, "boot.scr"), filepath.Join(dir, "boot.vfat")
	for _, s := range [][]string{
		{"mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-n", "fieldpatch", "-d", script, scr},
		{"mkfs.vfat", "-n", "FPBOOT", "-i", "46500001", "-C", vfat, fmt.Sprint(p1Size / 2)},
		{"mcopy", "-i", vfat, scr, "::boot.scr"},
	} {
		if err := run(s[0], s[1:]...); err != nil {
			return err
		}
	}
	// The base disk: MBR with the FAT and two raw slot partitions; the
	// environment copies sit in the gap before the first partition.
	disk := filepath.Join(dir, "base.img")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		return err
	}
	cmd := exec.Command("sfdisk", "-q", disk)
	cmd.Stdin = strings.NewReader(fmt.Sprintf("label: dos\nlabel-id: 0x46500001\nstart=%d, size=%d, type=c\nstart=%d, size=%d, type=da\nstart=%d, size=%d, type=da\n",
		p1Start, p1Size, p2Start, slotSize, p3Start, slotSize))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("sfdisk: %v\n%s", err, out)
	}
	fat, err := os.ReadFile(vfat)
	if err != nil {
		return err
	}
	return writeAt(disk, fat, p1Start*sector)
}

func (k *kit) makeFIT(name, version, counter, keys string) ([]byte, error) {
	tmpl, err := os.ReadFile("slot.its.in")
	if err != nil {
		return nil, err
	}
	payload := filepath.Join(k.dir, name+".payload")
	os.WriteFile(payload, []byte(fmt.Sprintf("FIELDPATCH-PAYLOAD %s version=%s counter=%s\n", name, version, counter)), 0o644)
	its := strings.NewReplacer("@PAYLOAD@", payload, "@VERSION@", version, "@COUNTER@", counter).Replace(string(tmpl))
	itsPath, itb := filepath.Join(k.dir, name+".its"), filepath.Join(k.dir, name+".itb")
	os.WriteFile(itsPath, []byte(its), 0o644)
	dtb := filepath.Join(k.dir, "ctl.dtb")
	if keys != filepath.Join(k.dir, "keys") {
		// A foreign key must not be added to the board's control DTB.
		scratch := filepath.Join(k.dir, "scratch.dtb")
		b, _ := os.ReadFile(dtb)
		os.WriteFile(scratch, b, 0o644)
		dtb = scratch
	}
	if err := run("mkimage", "-f", itsPath, "-k", keys, "-K", dtb, "-r", itb); err != nil {
		return nil, err
	}
	return os.ReadFile(itb)
}

func writeAt(path string, b []byte, off int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteAt(b, off)
	return err
}

// board is one device: a copy of the base disk with its own slots and
// environment.
type board struct {
	t    *testing.T
	k    *kit
	dir  string
	disk string
}

func newBoard(t *testing.T, slotA, slotB string, env bootenv.Env) *board {
	t.Helper()
	k := shared.get(t)
	bd := &board{t: t, k: k, dir: t.TempDir()}
	bd.disk = filepath.Join(bd.dir, "disk.img")
	base, err := os.ReadFile(filepath.Join(k.dir, "base.img"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bd.disk, base, 0o644); err != nil {
		t.Fatal(err)
	}
	bd.putSlot("a", k.fits[slotA])
	bd.putSlot("b", k.fits[slotB])
	if env != nil {
		bd.save(env)
	}
	return bd
}

func (bd *board) putSlot(s string, fit []byte) {
	start := int64(p2Start)
	if s == "b" {
		start = p3Start
	}
	if err := writeAt(bd.disk, make([]byte, slotSize*sector), start*sector); err != nil {
		bd.t.Fatal(err)
	}
	if err := writeAt(bd.disk, fit, start*sector); err != nil {
		bd.t.Fatal(err)
	}
}

// tamper flips one payload byte of a slot's FIT, leaving its signature and
// hash nodes intact.
func (bd *board) tamper(s string) {
	start := int64(p2Start)
	if s == "b" {
		start = p3Start
	}
	b, _ := os.ReadFile(bd.disk)
	region := b[start*sector : (start+slotSize)*sector]
	i := bytes.Index(region, []byte("FIELDPATCH-PAYLOAD"))
	if i < 0 {
		bd.t.Fatal("payload not found in the slot")
	}
	region[i] = 'f'
	os.WriteFile(bd.disk, b, 0o644)
}

// store opens the two-copy environment area of the disk with our codec.
func (bd *board) store() (*bootenv.Pair, func()) {
	d, err := slot.OpenDevice(bd.disk, false)
	if err != nil {
		bd.t.Fatal(err)
	}
	return &bootenv.Pair{Copies: [2]bootenv.Location{{Dev: d, Offset: envOff0, Size: envSize}, {Dev: d, Offset: envOff1, Size: envSize}}}, func() { d.Close() }
}

// save is the agent writing the A/B state with our codec.
func (bd *board) save(e bootenv.Env) {
	st, done := bd.store()
	defer done()
	if err := st.Save(e); err != nil {
		bd.t.Fatal(err)
	}
}

// env reads the state back with our codec, and checks it against
// fw_printenv reading each copy on its own (the higher fp_seq wins).
func (bd *board) env() bootenv.Env {
	t := bd.t
	t.Helper()
	st, done := bd.store()
	ours, err := st.Load()
	done()
	if err != nil {
		t.Fatalf("our codec cannot read the state U-Boot saved: %v", err)
	}
	fw := testenv.Command(t, "fw_printenv")
	var best bootenv.Env
	for _, off := range []int{envOff0, envOff1} {
		cfg := filepath.Join(bd.dir, fmt.Sprintf("copy-%x.config", off))
		os.WriteFile(cfg, []byte(fmt.Sprintf("%s 0x%x 0x%x\n", bd.disk, off, envSize)), 0o644)
		out, err := exec.Command(fw, "-c", cfg).Output()
		if err != nil {
			continue // this copy's CRC fails
		}
		e := bootenv.Env{}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				e[k] = v
			}
		}
		if best == nil || seq(e) > seq(best) {
			best = e
		}
	}
	if !best.Equal(ours) {
		t.Fatalf("our codec read %v, fw_printenv's copies %v", ours, best)
	}
	return ours
}

func seq(e bootenv.Env) int {
	var n int
	fmt.Sscan(e[bootenv.SeqVar], &n)
	return n
}

var decisionRE = regexp.MustCompile(`(?m)^FIELDPATCH: (booted=\S+ reason=\S+ active=\S+ trial=\S+ left=\d+) seq=(\d+)$`)

// boot powers the board on once and returns U-Boot's decision line (without
// its seq field, so it reads exactly like the Go selector's and GRUB's).
func (bd *board) boot(readOnly bool) string {
	t := bd.t
	t.Helper()
	// QEMU option values escape a comma by doubling it.
	esc := func(p string) string { return strings.ReplaceAll(p, ",", ",,") }
	drive := "if=none,id=vd0,format=raw,file=" + esc(bd.disk)
	if readOnly {
		drive += ",readonly=on"
	}
	args := append(append([]string{}, qemuBase...),
		"-bios", ubootBin, "-dtb", filepath.Join(bd.k.dir, "ctl.dtb"),
		"-drive", "if=pflash,unit=1,format=raw,readonly=on,file="+esc(filepath.Join(bd.k.dir, "flash1.img")),
		"-drive", drive, "-device", "virtio-blk-device,drive=vd0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-aarch64", args...)
	cmd.Stdin = nil
	out, err := cmd.CombinedOutput()
	console := strings.ReplaceAll(string(out), "\r", "")
	m := decisionRE.FindStringSubmatch(console)
	if m == nil {
		t.Fatalf("U-Boot printed no decision (%v):\n%s", err, console)
	}
	return "FIELDPATCH: " + m[1]
}

func line(booted, reason, active, trial string, left int) string {
	return fmt.Sprintf("FIELDPATCH: booted=%s reason=%s active=%s trial=%s left=%d", booted, reason, active, trial, left)
}

func state(active, trial string, left int, nv int) bootenv.Env {
	return bootenv.Env{"fp_active": active, "fp_trial": trial, "fp_trial_left": fmt.Sprint(left), "fp_nv_counter": fmt.Sprint(nv)}
}

// Every outcome in real U-Boot: decisions, and the state read back by our
// codec and by fw_printenv after each boot.
func TestUBootOutcomes(t *testing.T) {
	cases := []struct {
		name   string
		a, b   string
		env    bootenv.Env
		tamper []string
		want   string
	}{
		{"fresh device", "v1c1", "v2c1", state("a", "", 0, 1), nil, line("a", "active", "a", "-", 0)},
		{"trial with attempts left", "v1c1", "v2c1", state("a", "b", 3, 1), nil, line("b", "trial", "a", "b", 2)},
		{"trial exhausted", "v1c1", "v2c1", state("a", "b", 0, 1), nil, line("a", "rollback", "a", "-", 0)},
		{"trial FIT tampered", "v1c1", "v2c1", state("a", "b", 3, 1), []string{"b"}, line("a", "rollback", "a", "-", 0)},
		{"trial FIT signed by another key", "v1c1", "v2c1-foreign", state("a", "b", 3, 1), nil, line("a", "rollback", "a", "-", 0)},
		{"trial FIT below the counter", "v1c2", "v2c1", state("a", "b", 3, 2), nil, line("a", "rollback", "a", "-", 0)},
		{"trial FIT at the counter", "v1c2", "v2c2", state("a", "b", 3, 2), nil, line("b", "trial", "a", "b", 2)},
		{"fallback below the counter refused", "v1c2", "v2c1", state("a", "", 0, 2), []string{"a"}, line("none", "recovery", "a", "-", 0)},
		{"active tampered, other good", "v1c1", "v2c1", state("a", "", 0, 1), []string{"a"}, line("b", "fallback", "b", "-", 0)},
		{"both tampered", "v1c1", "v2c1", state("a", "b", 2, 1), []string{"a", "b"}, line("none", "recovery", "a", "-", 0)},
		{"no environment at all", "v1c1", "v2c1", nil, nil, line("a", "active", "a", "-", 0)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bd := newBoard(t, c.a, c.b, c.env)
			for _, s := range c.tamper {
				bd.tamper(s)
			}
			if got := bd.boot(false); got != c.want {
				t.Fatalf("U-Boot decided\n  %s\nwant\n  %s", got, c.want)
			}
			e := bd.env()
			m := regexp.MustCompile(`booted=(\S+) reason=(\S+) active=(\S+)`).FindStringSubmatch(c.want)
			booted := m[1]
			if booted == "none" {
				booted = ""
			}
			if e["fp_booted"] != booted || e["fp_boot_reason"] != m[2] || e["fp_active"] != m[3] {
				t.Errorf("saved state %v does not match the decision", e)
			}
		})
	}
}

// A trial counts down in real U-Boot, then rolls back; a steady boot after
// that writes nothing.
func TestUBootTrialCountdown(t *testing.T) {
	bd := newBoard(t, "v1c1", "v2c1", state("a", "b", 3, 1))
	want := []string{
		line("b", "trial", "a", "b", 2),
		line("b", "trial", "a", "b", 1),
		line("b", "trial", "a", "b", 0),
		line("a", "rollback", "a", "-", 0),
		line("a", "active", "a", "-", 0),
	}
	for i, w := range want {
		if got := bd.boot(false); got != w {
			t.Fatalf("boot %d: %s\nwant    %s", i+1, got, w)
		}
		bd.env()
	}
	before, _ := os.ReadFile(bd.disk)
	bd.boot(false)
	after, _ := os.ReadFile(bd.disk)
	if !bytes.Equal(before, after) {
		t.Error("a steady-state boot wrote to the disk")
	}
}

// The agent commits with our codec; U-Boot then boots the new slot as the
// active one.
func TestUBootAgentCommit(t *testing.T) {
	bd := newBoard(t, "v1c1", "v2c2", state("a", "b", 3, 1))
	if got := bd.boot(false); got != line("b", "trial", "a", "b", 2) {
		t.Fatalf("trial boot: %s", got)
	}
	e := bd.env()
	e["fp_active"], e["fp_trial"], e["fp_trial_left"], e["fp_nv_counter"] = "b", "", "0", "2"
	bd.save(e)
	if got := bd.boot(false); got != line("b", "active", "b", "-", 0) {
		t.Fatalf("after commit: %s", got)
	}
}

// Our codec tears the copy it is writing (a power cut at the agent's
// arming of a trial); U-Boot boots what the intact copy says, and so the
// next arming goes through.
func TestUBootTornCopy(t *testing.T) {
	for _, cut := range []int64{3, 40, 200} {
		t.Run(fmt.Sprint("cut at byte ", cut), func(t *testing.T) {
			bd := newBoard(t, "v1c1", "v2c1", state("a", "", 0, 1))
			// Load the environment area into the flash model, tear a save, write it back.
			disk, _ := os.ReadFile(bd.disk)
			area := disk[envOff0 : envOff1+envSize]
			fl := slot.NewFlashFrom(area, 256)
			st := &bootenv.Pair{Copies: [2]bootenv.Location{{Dev: fl, Offset: 0, Size: envSize}, {Dev: fl, Offset: envOff1 - envOff0, Size: envSize}}}
			fl.CutAtByte(cut, true)
			if err := st.Save(state("a", "b", 3, 1)); err == nil {
				t.Fatal("the save was not cut")
			}
			copy(disk[envOff0:], fl.Bytes())
			os.WriteFile(bd.disk, disk, 0o644)
			if got := bd.boot(false); got != line("a", "active", "a", "-", 0) {
				t.Fatalf("after a torn arm U-Boot decided %s", got)
			}
			e := bd.env()
			e["fp_trial"], e["fp_trial_left"] = "b", "3"
			bd.save(e)
			if got := bd.boot(false); got != line("b", "trial", "a", "b", 2) {
				t.Fatalf("re-armed trial: %s", got)
			}
		})
	}
}

// A trial whose attempt cannot be recorded (the disk is read-only) is not
// made, and the disk is unchanged.
func TestUBootTrialNotAttemptedWhenSaveFails(t *testing.T) {
	bd := newBoard(t, "v1c1", "v2c1", state("a", "b", 3, 1))
	before, _ := os.ReadFile(bd.disk)
	if got := bd.boot(true); got != line("a", "active", "a", "b", 3) {
		t.Fatalf("U-Boot decided %s", got)
	}
	after, _ := os.ReadFile(bd.disk)
	if !bytes.Equal(before, after) {
		t.Error("the read-only disk changed")
	}
}
