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

func TestReadDir(t *testing.T) {
	m := NewMemFS()
	m.Put("/data/app/db", []byte("1"))
	m.Put("/data/app/conf/x", []byte("2"))
	m.Put("/data/other", []byte("3"))
	m.Put("/datax/no", []byte("4"))
	got, err := m.ReadDir("/data")
	if err != nil || len(got) != 2 || got[0] != (DirEntry{"app", true}) || got[1] != (DirEntry{"other", false}) {
		t.Fatalf("ReadDir = %+v, %v", got, err)
	}
	got, _ = m.ReadDir("/data/app")
	if len(got) != 2 || got[0] != (DirEntry{"conf", true}) || got[1] != (DirEntry{"db", false}) {
		t.Fatalf("ReadDir(app) = %+v", got)
	}
	if got, _ := m.ReadDir("/missing"); len(got) != 0 {
		t.Fatalf("missing dir: %+v", got)
	}
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "f"), nil, 0o644)
	got, _ = OSFS{}.ReadDir(dir)
	if len(got) != 2 || got[0] != (DirEntry{"f", false}) || got[1] != (DirEntry{"sub", true}) {
		t.Fatalf("OSFS ReadDir = %+v", got)
	}
}

// One supply for several models: a cut anywhere stops all of them, the
// file system loses what was volatile, and the count is kept per area.
func TestSharedPower(t *testing.T) {
	p := NewPower()
	fl := NewFlash(4096, 256)
	fl.Attach(p, "slot")
	m := NewMemFS()
	m.Attach(p, "data")
	f, _ := m.Create("/d/x")    // op 1 (data)
	f.Write([]byte("volatile")) // op 2 (data)
	fl.WriteAt([]byte{1}, 0)    // op 3 (slot)
	p.CutAt(4, 0.5, false)
	if n, err := fl.WriteAt([]byte{9, 9, 9, 9}, 8); n != 2 || !errors.Is(err, ErrPowerCut) { // op 4: cut, half lands
		t.Fatalf("cut write: %d %v", n, err)
	}
	if _, err := m.ReadFile("/d/x"); !errors.Is(err, ErrPowerCut) {
		t.Fatalf("file system still on: %v", err)
	}
	if !p.Off() || p.CutArea() != "slot" {
		t.Fatalf("off %v area %q", p.Off(), p.CutArea())
	}
	p.On()
	if _, err := m.ReadFile("/d/x"); !IsNotExist(err) {
		t.Errorf("volatile file survived the cut: %v", err)
	}
	b := fl.Bytes()
	if b[0] != 1 || b[8] != 9 || b[9] != 9 || b[10] != 0xff {
		t.Errorf("flash after cut: %x", b[:12])
	}
	total, per := p.Ops()
	if total != 4 || per["data"] != 2 || per["slot"] != 2 {
		t.Errorf("ops %d %v", total, per)
	}
}

// Shared flash models behave byte for byte like private ones, and models
// holding the same contents share their blocks.
func TestSharedFlash(t *testing.T) {
	pool := NewBlockPool()
	img := make([]byte, 3*BlockSize+100)
	for i := range img {
		img[i] = byte(i * 13)
	}
	const size = 8 * BlockSize
	var shared []*Flash
	for i := 0; i < 50; i++ {
		f := NewSharedFlash(size, 4096, pool)
		if _, err := f.WriteAt(img[:BlockSize/3], 0); err != nil { // partial block first
			t.Fatal(err)
		}
		if _, err := f.WriteAt(img[BlockSize/3:], BlockSize/3); err != nil {
			t.Fatal(err)
		}
		shared = append(shared, f)
	}
	private := NewFlash(size, 4096)
	private.WriteAt(img, 0)
	for i, f := range shared {
		if !bytes.Equal(f.Bytes(), private.Bytes()) {
			t.Fatalf("shared model %d differs from a private one", i)
		}
	}
	// erased, the image's four blocks, and the two partial states of
	// block 0 and 1 seen on the way: far fewer than 50 devices' blocks.
	if n := pool.Blocks(); n > 8 {
		t.Fatalf("pool holds %d distinct blocks for 50 identical models, want at most 8", n)
	}
	// A write to one model changes only that model.
	shared[0].WriteAt([]byte("changed"), 10)
	if bytes.Equal(shared[0].Bytes(), shared[1].Bytes()) || !bytes.Equal(shared[1].Bytes(), private.Bytes()) {
		t.Fatal("a write to one shared model leaked into another")
	}
	// Power cuts and tearing work the same as on a private model.
	p := NewPower()
	a, b := NewSharedFlash(size, 4096, pool), NewFlash(size, 4096)
	a.Attach(p, "slot-a")
	p.CutAt(1, 0.5, true)
	n, err := a.WriteAt(img[:8192], 0)
	if !errors.Is(err, ErrPowerCut) || n != 4096 {
		t.Fatalf("cut write: %d, %v", n, err)
	}
	p.On()
	buf := make([]byte, 8192)
	a.ReadAt(buf, 0)
	b.WriteAt(img[:4096], 0)
	want := b.Bytes()[:4096]
	if !bytes.Equal(buf[:4096], want) {
		t.Fatal("the landed half of a cut write differs")
	}
	if bytes.Equal(buf[4096:8192], bytes.Repeat([]byte{0xff}, 4096)) {
		t.Fatal("a torn page kept its erased bytes")
	}
}

// CutInArea strikes at the n-th operation of the named area only.
func TestCutInArea(t *testing.T) {
	p := NewPower()
	journal, s := NewMemFS(), NewFlash(4096, 256)
	journal.Attach(p, "journal")
	s.Attach(p, "slot-b")
	var hit []string
	p.OnCut(func(area string) { hit = append(hit, area) })
	p.CutInArea("slot-", 2, 0, false)
	for i := 0; i < 5; i++ {
		if err := WriteFileSynced(journal, "/j", []byte("x")); err != nil {
			t.Fatalf("journal write %d cut: %v", i, err)
		}
	}
	if _, err := s.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteAt([]byte{2}, 1); !errors.Is(err, ErrPowerCut) {
		t.Fatalf("second slot write: %v, want a power cut", err)
	}
	if len(hit) != 1 || hit[0] != "slot-b" || p.CutArea() != "slot-b" || p.Cuts() != 1 {
		t.Fatalf("cut hit %v (area %q, %d cuts)", hit, p.CutArea(), p.Cuts())
	}
}
