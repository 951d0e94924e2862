package grub

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// keyring holds two GnuPG keys: "good", which GRUB trusts, and "evil".
// GRUB 2.06 verifies RSA and DSA signatures only (Ed25519 ones always fail).
type keyring struct {
	dir  string
	err  error
	once sync.Once
}

var keys keyring

func (k *keyring) get(t *testing.T) string {
	t.Helper()
	gpg := testenv.Command(t, "gpg")
	k.once.Do(func() {
		k.dir, k.err = os.MkdirTemp("", "fieldpatch-grub-keys")
		if k.err != nil {
			return
		}
		for _, name := range []string{"good", "evil"} {
			home := filepath.Join(k.dir, name+".gnupg")
			os.Mkdir(home, 0o700)
			cmd := exec.Command(gpg, "-q", "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
				"--quick-gen-key", "fieldpatch-"+name+" <"+name+"@fieldpatch.invalid>", "rsa2048", "sign", "never")
			cmd.Env = append(os.Environ(), "GNUPGHOME="+home)
			if out, err := cmd.CombinedOutput(); err != nil {
				k.err = fmt.Errorf("gpg key generation: %v\n%s", err, out)
				return
			}
			cmd = exec.Command(gpg, "-q", "--batch", "--export")
			cmd.Env = append(os.Environ(), "GNUPGHOME="+home)
			pub, err := cmd.Output()
			if err != nil {
				k.err = err
				return
			}
			os.WriteFile(filepath.Join(k.dir, name+".pub"), pub, 0o644)
		}
	})
	if k.err != nil {
		t.Fatal(k.err)
	}
	return k.dir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if keys.dir != "" {
		for _, name := range []string{"good", "evil"} {
			exec.Command("gpgconf", "--homedir", filepath.Join(keys.dir, name+".gnupg"), "--kill", "gpg-agent").Run()
		}
		os.RemoveAll(keys.dir)
	}
	os.Exit(code)
}

// slotSpec describes what goes into one slot directory.
type slotSpec struct {
	counter   int
	key       string // signing key: "good" or "evil"
	tamper    bool   // change the kernel after signing
	tamperCtr bool   // raise the counter after signing
}

// board is a disk image for grub-emu: an ext2 file system holding the
// environment block and the two slots.
type board struct {
	t    *testing.T
	dir  string
	disk string
}

func newBoard(t *testing.T, env bootenv.Env, a, b slotSpec, extraEnv []byte) *board {
	t.Helper()
	mke2fs := testenv.Command(t, "mke2fs")
	gpg := testenv.Command(t, "gpg")
	keyDir := keys.get(t)
	bd := &board{t: t, dir: t.TempDir()}
	root := filepath.Join(bd.dir, "root")
	for name, s := range map[string]slotSpec{"a": a, "b": b} {
		d := filepath.Join(root, "slot_"+name)
		os.MkdirAll(d, 0o755)
		kernel := []byte("fieldpatch kernel for slot " + name + "\n")
		slotEnv, err := bootenv.EncodeGRUB(bootenv.Env{"fp_slot_counter": strconv.Itoa(s.counter)}, bootenv.GRUBBlockSize)
		if err != nil {
			t.Fatal(err)
		}
		ks, es := sha256.Sum256(kernel), sha256.Sum256(slotEnv)
		sums := fmt.Sprintf("%s  kernel\n%s  slot.env\n", hex.EncodeToString(ks[:]), hex.EncodeToString(es[:]))
		os.WriteFile(filepath.Join(d, "kernel"), kernel, 0o644)
		os.WriteFile(filepath.Join(d, "slot.env"), slotEnv, 0o644)
		os.WriteFile(filepath.Join(d, "SHA256SUMS"), []byte(sums), 0o644)
		key := s.key
		if key == "" {
			key = "good"
		}
		cmd := exec.Command(gpg, "-q", "--batch", "--yes", "--detach-sign", "-o", filepath.Join(d, "SHA256SUMS.sig"), filepath.Join(d, "SHA256SUMS"))
		cmd.Env = append(os.Environ(), "GNUPGHOME="+filepath.Join(keyDir, key+".gnupg"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("gpg sign: %v\n%s", err, out)
		}
		if s.tamper {
			os.WriteFile(filepath.Join(d, "kernel"), append(kernel, "tampered\n"...), 0o644)
		}
		if s.tamperCtr {
			raised, _ := bootenv.EncodeGRUB(bootenv.Env{"fp_slot_counter": "99"}, bootenv.GRUBBlockSize)
			os.WriteFile(filepath.Join(d, "slot.env"), raised, 0o644)
		}
	}
	block, err := bootenv.EncodeGRUB(env, bootenv.GRUBBlockSize)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "grubenv"), append(block, extraEnv...), 0o644)
	bd.disk = filepath.Join(bd.dir, "disk.img")
	// 1 KiB blocks: the environment block is exactly one file-system block.
	if out, err := exec.Command(mke2fs, "-q", "-F", "-t", "ext2", "-b", "1024", "-L", "fpboot", "-d", root, bd.disk, "4096").CombinedOutput(); err != nil {
		t.Fatalf("mke2fs: %v\n%s", err, out)
	}
	grubDir := filepath.Join(bd.dir, "grub")
	os.MkdirAll(grubDir, 0o755)
	cfg, err := os.ReadFile("grub.cfg")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(grubDir, "grub.cfg"), cfg, 0o644)
	pub, _ := os.ReadFile(filepath.Join(keyDir, "good.pub"))
	os.WriteFile(filepath.Join(grubDir, "fieldpatch.pub"), pub, 0o644)
	os.WriteFile(filepath.Join(bd.dir, "device.map"), []byte("(hd0) "+bd.disk+"\n"), 0o644)
	return bd
}

var (
	ansi     = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]`)
	decision = regexp.MustCompile(`(?m)^FIELDPATCH: booted=(a|b|none) reason=(\w+) active=(a|b) trial=(a|b|-) left=(\d)$`)
)

// boot powers the board on once: grub-emu runs grub.cfg, which prints its
// decision and halts.
func (bd *board) boot() string {
	t := bd.t
	t.Helper()
	emu := testenv.Command(t, "grub-emu")
	args := []string{"-d", filepath.Join(bd.dir, "grub"), "-m", filepath.Join(bd.dir, "device.map")}
	name := emu
	if os.Geteuid() == 0 {
		// As root grub-emu makes and removes a tap device on every run; without
		// CAP_NET_ADMIN it cannot, and runs are faster and steadier.
		if setpriv, err := exec.LookPath("setpriv"); err == nil {
			name = setpriv
			args = append([]string{"--bounding-set=-net_admin", "--inh-caps=-net_admin", emu}, args...)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = nil
	out, err := cmd.CombinedOutput()
	clean := strings.ReplaceAll(ansi.ReplaceAllString(string(out), ""), "\r", "")
	m := decision.FindString(clean)
	if m == "" {
		t.Fatalf("grub-emu printed no decision (%v):\n%s", err, clean)
	}
	return m
}

// env reads the environment block back out of the image, with our codec and
// with grub-editenv, and checks that they agree.
func (bd *board) env() bootenv.Env {
	t := bd.t
	t.Helper()
	debugfs := testenv.Command(t, "debugfs")
	editenv := testenv.Command(t, "grub-editenv")
	out := filepath.Join(bd.dir, "grubenv.out")
	os.Remove(out)
	if b, err := exec.Command(debugfs, "-R", "dump /grubenv "+out, bd.disk).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, b)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	ours, err := bootenv.DecodeGRUB(raw)
	if err != nil {
		t.Fatalf("our codec cannot read what GRUB saved: %v", err)
	}
	listed, err := exec.Command(editenv, out, "list").Output()
	if err != nil {
		t.Fatalf("grub-editenv list: %v", err)
	}
	theirs := bootenv.Env{}
	for _, line := range strings.Split(strings.TrimSpace(string(listed)), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			theirs[k] = v
		}
	}
	if !ours.Equal(theirs) {
		t.Fatalf("our codec read %v, grub-editenv %v", ours, theirs)
	}
	return ours
}

// setEnv is the agent writing the block in place (as GRUB's save_env does),
// with our codec, into the file's own block inside the image.
func (bd *board) setEnv(e bootenv.Env) {
	t := bd.t
	t.Helper()
	debugfs := testenv.Command(t, "debugfs")
	out, err := exec.Command(debugfs, "-R", "bmap /grubenv 0", bd.disk).Output()
	if err != nil {
		t.Fatalf("debugfs bmap: %v", err)
	}
	blk, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		t.Fatalf("debugfs bmap printed %q", out)
	}
	b, err := bootenv.EncodeGRUB(e, bootenv.GRUBBlockSize)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(bd.disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, blk*1024); err != nil {
		t.Fatal(err)
	}
}

func (bd *board) diskSum() [32]byte {
	b, _ := os.ReadFile(bd.disk)
	return sha256.Sum256(b)
}

func line(booted, reason, active, trial string, left int) string {
	return fmt.Sprintf("FIELDPATCH: booted=%s reason=%s active=%s trial=%s left=%d", booted, reason, active, trial, left)
}

func trialEnv(left int) bootenv.Env {
	return bootenv.Env{"fp_active": "a", "fp_trial": "b", "fp_trial_left": strconv.Itoa(left)}
}

// Every outcome in real GRUB, with the environment read back by our codec
// and grub-editenv after each boot.
func TestGRUBOutcomes(t *testing.T) {
	good := slotSpec{counter: 1}
	cases := []struct {
		name string
		env  bootenv.Env
		a, b slotSpec
		want string
	}{
		{"fresh device", bootenv.Env{}, good, good, line("a", "active", "a", "-", 0)},
		{"trial with attempts left", trialEnv(3), good, good, line("b", "trial", "a", "b", 2)},
		{"trial exhausted", trialEnv(0), good, good, line("a", "rollback", "a", "-", 0)},
		{"trial image tampered", trialEnv(3), good, slotSpec{counter: 1, tamper: true}, line("a", "rollback", "a", "-", 0)},
		{"trial signed by an untrusted key", trialEnv(3), good, slotSpec{counter: 1, key: "evil"}, line("a", "rollback", "a", "-", 0)},
		{"trial counter raised after signing", trialEnv(3), good, slotSpec{counter: 1, tamperCtr: true}, line("a", "rollback", "a", "-", 0)},
		{"trial below the non-volatile counter", bootenv.Env{"fp_active": "a", "fp_trial": "b", "fp_trial_left": "3", "fp_nv_counter": "5"},
			slotSpec{counter: 5}, slotSpec{counter: 4}, line("a", "rollback", "a", "-", 0)},
		{"trial at the non-volatile counter", bootenv.Env{"fp_active": "a", "fp_trial": "b", "fp_trial_left": "3", "fp_nv_counter": "5"},
			slotSpec{counter: 5}, slotSpec{counter: 5}, line("b", "trial", "a", "b", 2)},
		{"active tampered, other good", bootenv.Env{"fp_active": "a"}, slotSpec{counter: 1, tamper: true}, good, line("b", "fallback", "b", "-", 0)},
		{"fallback below the counter refused", bootenv.Env{"fp_active": "a", "fp_nv_counter": "5"},
			slotSpec{counter: 5, tamper: true}, slotSpec{counter: 4}, line("none", "recovery", "a", "-", 0)},
		{"both tampered", bootenv.Env{"fp_active": "a"}, slotSpec{counter: 1, tamper: true}, slotSpec{counter: 1, tamper: true}, line("none", "recovery", "a", "-", 0)},
		{"garbage variables", bootenv.Env{"fp_active": "x", "fp_trial": "c", "fp_trial_left": "7"}, good, good, line("a", "rollback", "a", "-", 0)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bd := newBoard(t, c.env, c.a, c.b, nil)
			if got := bd.boot(); got != c.want {
				t.Fatalf("GRUB decided\n  %s\nwant\n  %s", got, c.want)
			}
			e := bd.env()
			m := decision.FindStringSubmatch(c.want)
			booted := m[1]
			if booted == "none" {
				booted = ""
			}
			if e["fp_booted"] != booted || e["fp_boot_reason"] != m[2] || e["fp_active"] != m[3] {
				t.Errorf("saved environment %v does not match the decision", e)
			}
		})
	}
}

// A trial counts down in real GRUB, then rolls back; after that, boots
// leave the disk untouched.
func TestGRUBTrialCountdown(t *testing.T) {
	bd := newBoard(t, trialEnv(3), slotSpec{counter: 1}, slotSpec{counter: 1}, nil)
	want := []string{
		line("b", "trial", "a", "b", 2),
		line("b", "trial", "a", "b", 1),
		line("b", "trial", "a", "b", 0),
		line("a", "rollback", "a", "-", 0),
		line("a", "active", "a", "-", 0),
	}
	for i, w := range want {
		if got := bd.boot(); got != w {
			t.Fatalf("boot %d: %s\nwant    %s", i+1, got, w)
		}
		if left := bd.env()["fp_trial_left"]; i < 3 && left != strconv.Itoa(2-i) {
			t.Fatalf("boot %d: saved fp_trial_left=%s", i+1, left)
		}
	}
	before := bd.diskSum()
	bd.boot()
	if bd.diskSum() != before {
		t.Error("a steady-state boot wrote to the disk")
	}
}

// The agent commits a healthy trial by writing the block with our codec;
// GRUB then boots the new slot as the active one.
func TestGRUBAgentCommit(t *testing.T) {
	bd := newBoard(t, trialEnv(3), slotSpec{counter: 1}, slotSpec{counter: 2}, nil)
	if got := bd.boot(); got != line("b", "trial", "a", "b", 2) {
		t.Fatalf("trial boot: %s", got)
	}
	e := bd.env()
	e["fp_active"], e["fp_trial"], e["fp_trial_left"] = "b", "", "0"
	bd.setEnv(e)
	if got := bd.boot(); got != line("b", "active", "b", "-", 0) {
		t.Fatalf("after commit: %s", got)
	}
}

// When GRUB cannot save (an environment file GRUB refuses to write: here a
// sparse one), the trial is not attempted and the environment is unchanged.
func TestGRUBTrialNotAttemptedWhenSaveFails(t *testing.T) {
	bd := newBoard(t, trialEnv(3), slotSpec{counter: 1}, slotSpec{counter: 1}, make([]byte, 1024))
	if got := bd.boot(); got != line("a", "active", "a", "b", 3) {
		t.Fatalf("GRUB decided %s", got)
	}
}
