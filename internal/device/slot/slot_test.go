package slot

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// The same code drives a regular file and a real block device (a loop
// device over a file).
func TestFileAndBlockDevice(t *testing.T) {
	dir := t.TempDir()
	backing := filepath.Join(dir, "slot.img")
	if err := os.WriteFile(backing, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	paths := map[string]string{"regular file": backing}

	losetup := testenv.Command(t, "losetup")
	blockBacking := filepath.Join(dir, "block.img")
	os.WriteFile(blockBacking, make([]byte, 1<<20), 0o644)
	out, err := exec.Command(losetup, "--find", "--show", blockBacking).CombinedOutput()
	if err != nil {
		testenv.Missing(t, "cannot attach a loop device (needs root): %v %s", err, out)
	} else {
		loop := strings.TrimSpace(string(out))
		t.Cleanup(func() { exec.Command(losetup, "-d", loop).Run() })
		paths["block device"] = loop
	}

	for kind, p := range paths {
		t.Run(kind, func(t *testing.T) {
			d, err := OpenDevice(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if d.Size() != 1<<20 {
				t.Errorf("size %d, want %d", d.Size(), 1<<20)
			}
			msg := []byte("fieldpatch slot")
			if _, err := d.WriteAt(msg, 4096); err != nil {
				t.Fatal(err)
			}
			if err := d.Sync(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(msg))
			if _, err := d.ReadAt(got, 4096); err != nil || !bytes.Equal(got, msg) {
				t.Errorf("read back %q, %v", got, err)
			}
			if _, err := d.WriteAt(msg, d.Size()-4); err == nil {
				t.Error("a write past the end was accepted")
			}
		})
	}
	if _, err := OpenDevice(dir, false); err == nil {
		t.Error("a directory opened as a device")
	}
}

func TestFlashCuts(t *testing.T) {
	f := NewFlash(1024, 16)
	f.CutAtByte(20, false)
	n, err := f.WriteAt(bytes.Repeat([]byte{0xaa}, 32), 0)
	if n != 20 || !errors.Is(err, ErrPowerCut) {
		t.Fatalf("write: %d, %v", n, err)
	}
	b := f.Bytes()
	if b[19] != 0xaa || b[20] != 0xff {
		t.Errorf("bytes around the cut: %x %x", b[19], b[20])
	}
	if _, err := f.WriteAt([]byte{1}, 100); !errors.Is(err, ErrPowerCut) {
		t.Errorf("write after the cut: %v", err)
	}
	if _, err := f.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrPowerCut) {
		t.Errorf("read while off: %v", err)
	}
	f.PowerOn()
	if _, err := f.WriteAt([]byte{1}, 100); err != nil {
		t.Fatal(err)
	}

	// Tearing: the rest of the interrupted page is garbage, the next page untouched.
	g := NewFlash(64, 16)
	g.CutAtByte(4, true)
	g.WriteAt(bytes.Repeat([]byte{0x00}, 32), 0)
	b = g.Bytes()
	if !bytes.Equal(b[:4], []byte{0, 0, 0, 0}) {
		t.Errorf("bytes before the cut: %x", b[:4])
	}
	if bytes.Equal(b[4:16], bytes.Repeat([]byte{0xff}, 12)) || bytes.Equal(b[4:16], make([]byte, 12)) {
		t.Errorf("torn page holds neither garbage: %x", b[4:16])
	}
	if !bytes.Equal(b[16:32], bytes.Repeat([]byte{0xff}, 16)) {
		t.Errorf("the next page changed: %x", b[16:32])
	}

	// A cut at a write call lands nothing of that call.
	h := NewFlash(64, 16)
	h.CutAtWrite(2)
	h.WriteAt([]byte{1}, 0)
	if n, err := h.WriteAt([]byte{2}, 1); n != 0 || !errors.Is(err, ErrPowerCut) {
		t.Errorf("second write: %d %v", n, err)
	}
	if calls, written := h.Counters(); calls != 2 || written != 1 {
		t.Errorf("counters %d %d", calls, written)
	}
}

// What was never fsynced is lost at a power cut, and so is a rename whose
// directory was never fsynced.
func TestMemFSDurability(t *testing.T) {
	m := NewMemFS()
	m.Put("/data/a", []byte("old"))

	f, _ := m.Create("/data/b")
	f.Write([]byte("unsynced"))
	f.Close()
	m.Rename("/data/a", "/data/c")
	m.PowerCut()
	m.PowerOn()
	if got, err := m.ReadFile("/data/a"); err != nil || string(got) != "old" {
		t.Errorf("after cut: a = %q, %v", got, err)
	}
	if _, err := m.ReadFile("/data/b"); !IsNotExist(err) {
		t.Errorf("an unsynced new file survived: %v", err)
	}
	if _, err := m.ReadFile("/data/c"); !IsNotExist(err) {
		t.Errorf("an unsynced rename survived: %v", err)
	}

	// Synced data in a synced directory survives.
	f, _ = m.Create("/data/d")
	f.Write([]byte("kept"))
	f.Sync()
	f.Close()
	m.SyncDir("/data")
	f, _ = m.Create("/data/d") // truncate, not synced
	f.Write([]byte("lost"))
	m.PowerCut()
	m.PowerOn()
	if got, _ := m.ReadFile("/data/d"); string(got) != "kept" {
		t.Errorf("d = %q, want kept", got)
	}
}

// WriteFileAtomic leaves the old or the new contents at a cut anywhere.
func TestWriteFileAtomicAtEveryCut(t *testing.T) {
	probe := NewMemFS()
	probe.Put("/data/state", []byte("old state"))
	if err := WriteFileAtomic(probe, "/data/state", []byte("new state")); err != nil {
		t.Fatal(err)
	}
	total := probe.Ops()
	sawOld, sawNew := false, false
	for cut := 1; cut <= total+1; cut++ {
		m := NewMemFS()
		m.Put("/data/state", []byte("old state"))
		m.CutAtOp(cut)
		err := WriteFileAtomic(m, "/data/state", []byte("new state"))
		if cut <= total && !errors.Is(err, ErrPowerCut) {
			t.Fatalf("cut %d: %v", cut, err)
		}
		m.PowerCut()
		m.PowerOn()
		got, err := m.ReadFile("/data/state")
		switch {
		case err != nil:
			t.Fatalf("cut %d: %v", cut, err)
		case string(got) == "old state":
			sawOld = true
		case string(got) == "new state":
			sawNew = true
		default:
			t.Fatalf("cut %d: file holds %q", cut, got)
		}
	}
	if !sawOld || !sawNew {
		t.Errorf("old seen %v, new seen %v: the cuts did not span the write", sawOld, sawNew)
	}
}
