package bootenv

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

var (
	older  = Env{"fp_active": "a", "fp_trial": "", "fp_trial_left": "0", "note": "older"}
	oldEnv = Env{"fp_active": "a", "fp_trial": "", "fp_trial_left": "0", "note": "old"}
	newEnv = Env{"fp_active": "a", "fp_trial": "b", "fp_trial_left": "3", "note": "new state with a longer value to span more bytes"}
)

// sameAs says which of old and new e is, or fails.
func sameAs(t *testing.T, what string, e Env, old, new Env) string {
	t.Helper()
	switch {
	case e.Equal(old):
		return "old"
	case e.Equal(new):
		return "new"
	}
	t.Fatalf("%s: environment is neither old nor new: %v", what, e)
	return ""
}

// judge remembers what the real tool said of each distinct storage image,
// so equal images are run through the tool once.
type judge struct {
	seen map[[32]byte]Env
	runs int
}

func (j *judge) once(b []byte, run func() Env) Env {
	if j.seen == nil {
		j.seen = map[[32]byte]Env{}
	}
	h := sha256.Sum256(b)
	if e, ok := j.seen[h]; ok {
		return e
	}
	j.runs++
	e := run()
	j.seen[h] = e
	return e
}

// Redundant copies on raw flash: a power cut at every byte of a save, with
// and without a torn page, leaves the old or the new environment, by our
// codec and by fw_printenv; and the next save succeeds.
func TestRedundantPowerCutEveryByte(t *testing.T) {
	const size = 0x100
	base := slot.NewFlash(2*size, 64)
	st := &Redundant{Copies: [2]Location{{base, 0, size}, {base, size, size}}}
	if err := st.Save(older); err != nil {
		t.Fatal(err)
	}
	if err := st.Save(oldEnv); err != nil {
		t.Fatal(err)
	}
	before := base.Bytes()
	_, w0 := base.Counters()
	st.Save(newEnv)
	_, w1 := base.Counters()
	total := w1 - w0

	dir := t.TempDir()
	img := filepath.Join(dir, "flash.img")
	cfg := writeConfig(t, dir, fmt.Sprintf("flash.img 0x0 0x%x\nflash.img 0x%x 0x%x\n", size, size, size))
	var j judge
	counts := map[string]int{}
	for k := int64(0); k <= total; k++ {
		for _, tear := range []bool{false, true} {
			f := slot.NewFlashFrom(before, 64)
			s := &Redundant{Copies: [2]Location{{f, 0, size}, {f, size, size}}}
			f.CutAtByte(k, tear)
			err := s.Save(newEnv)
			if k < total && !errors.Is(err, slot.ErrPowerCut) {
				t.Fatalf("cut at byte %d: save returned %v", k, err)
			}
			f.PowerOn()
			got, err := s.Load()
			if err != nil {
				t.Fatalf("cut at byte %d (tear %v): %v", k, tear, err)
			}
			which := sameAs(t, fmt.Sprintf("cut at byte %d, tear %v", k, tear), got, oldEnv, newEnv)
			counts[which]++
			snap := f.Bytes()
			tool := j.once(snap, func() Env {
				os.WriteFile(img, snap, 0o644)
				e, ok := fwPrintenv(t, cfg)
				if !ok {
					t.Fatalf("cut at byte %d (tear %v): fw_printenv cannot read the environment", k, tear)
				}
				return e
			})
			if !tool.Equal(got) {
				t.Fatalf("cut at byte %d (tear %v): fw_printenv read %v, ours %v", k, tear, tool, got)
			}
			// Power back on, the update is retried and lands.
			if err := s.Save(newEnv); err != nil {
				t.Fatal(err)
			}
			if again, _ := s.Load(); !again.Equal(newEnv) {
				t.Fatalf("cut at byte %d: retry left %v", k, again)
			}
		}
	}
	if counts["old"] == 0 || counts["new"] == 0 {
		t.Errorf("outcomes %v: the cuts did not span the save", counts)
	}
	t.Logf("%d cut points x 2, outcomes %v, %d distinct images judged by fw_printenv", total+1, counts, j.runs)
}

// The script scheme on raw flash: the same, judged by fw_printenv reading
// each copy on its own and the higher fp_seq winning.
func TestPairPowerCutEveryByte(t *testing.T) {
	const size = 0x100
	base := slot.NewFlash(2*size, 64)
	st := &Pair{Copies: [2]Location{{base, 0, size}, {base, size, size}}}
	st.Save(older)
	st.Save(oldEnv)
	before := base.Bytes()
	_, w0 := base.Counters()
	st.Save(newEnv)
	_, w1 := base.Counters()
	total := w1 - w0

	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	cfgs := [2]string{
		writeConfigNamed(t, dir, "c0.config", fmt.Sprintf("disk.img 0x0 0x%x\n", size)),
		writeConfigNamed(t, dir, "c1.config", fmt.Sprintf("disk.img 0x%x 0x%x\n", size, size)),
	}
	oldSeq, newSeq := oldEnv.Clone(), newEnv.Clone()
	oldSeq[SeqVar], newSeq[SeqVar] = "2", "3"
	var j judge
	counts := map[string]int{}
	for k := int64(0); k <= total; k++ {
		for _, tear := range []bool{false, true} {
			f := slot.NewFlashFrom(before, 64)
			s := &Pair{Copies: [2]Location{{f, 0, size}, {f, size, size}}}
			f.CutAtByte(k, tear)
			s.Save(newEnv)
			f.PowerOn()
			got, err := s.Load()
			if err != nil {
				t.Fatalf("cut at byte %d: %v", k, err)
			}
			counts[sameAs(t, fmt.Sprintf("cut at byte %d, tear %v", k, tear), got, oldSeq, newSeq)]++
			snap := f.Bytes()
			tool := j.once(snap, func() Env {
				os.WriteFile(img, snap, 0o644)
				var best Env
				for _, c := range cfgs {
					if e, ok := fwPrintenv(t, c); ok && (best == nil || seqOf(e) > seqOf(best)) {
						best = e
					}
				}
				return best
			})
			if !tool.Equal(got) {
				t.Fatalf("cut at byte %d (tear %v): fw_printenv's copies give %v, ours %v", k, tear, tool, got)
			}
		}
	}
	if counts["old"] == 0 || counts["new"] == 0 {
		t.Errorf("outcomes %v: the cuts did not span the save", counts)
	}
	t.Logf("%d cut points x 2, outcomes %v, %d distinct images judged", total+1, counts, j.runs)
}

// Whole-file stores (a single U-Boot copy in a file, a GRUB block) on the
// file-system model: a cut at every operation leaves the old or new file,
// by our codec and by fw_printenv or grub-editenv.
func TestFileStoresPowerCutEveryOp(t *testing.T) {
	dir := t.TempDir()
	type kind struct {
		name  string
		store func(fs slot.FS) Store
		tool  func(path string) (Env, bool)
	}
	singleCfg := writeConfig(t, dir, "uboot.env 0x0 0x400\n")
	kinds := []kind{
		{"uboot single file", func(fs slot.FS) Store { return &SingleFile{FS: fs, Path: "/boot/uboot.env", Size: 0x400} },
			func(path string) (Env, bool) {
				os.Rename(path, filepath.Join(dir, "uboot.env"))
				return fwPrintenv(t, singleCfg)
			}},
		{"grub block", func(fs slot.FS) Store { return &GRUBFile{FS: fs, Path: "/boot/grubenv"} },
			func(path string) (Env, bool) { return grubList(t, path) }},
	}
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			probe := slot.NewMemFS()
			if err := k.store(probe).Save(oldEnv); err != nil {
				t.Fatal(err)
			}
			ops0 := probe.Ops()
			k.store(probe).Save(newEnv)
			total := probe.Ops() - ops0
			counts := map[string]int{}
			for cut := 1; cut <= total+1; cut++ {
				m := slot.NewMemFS()
				st := k.store(m)
				if err := st.Save(oldEnv); err != nil {
					t.Fatal(err)
				}
				m.CutAtOp(cut)
				st.Save(newEnv)
				m.PowerCut()
				m.PowerOn()
				got, err := st.Load()
				if err != nil {
					t.Fatalf("cut at op %d: %v", cut, err)
				}
				counts[sameAs(t, fmt.Sprintf("cut at op %d", cut), got, oldEnv, newEnv)]++
				var path string
				for _, n := range m.Names() {
					if filepath.Ext(n) != ".tmp" {
						path = n
					}
				}
				b, _ := m.ReadFile(path)
				tmp := filepath.Join(dir, "judged")
				os.WriteFile(tmp, b, 0o644)
				tool, ok := k.tool(tmp)
				if !ok || !tool.Equal(got) {
					t.Fatalf("cut at op %d: the real tool read %v (ok %v), ours %v", cut, tool, ok, got)
				}
			}
			if counts["old"] == 0 || counts["new"] == 0 {
				t.Errorf("outcomes %v", counts)
			}
		})
	}
}

// Why single raw copies are not used for A/B variables: a cut mid-save
// leaves no readable environment, for us and for fw_printenv alike.
func TestSingleRawIsNotPowerSafe(t *testing.T) {
	const size = 0x100
	f := slot.NewFlash(size, 64)
	st := &SingleRaw{Copy: Location{f, 0, size}}
	st.Save(oldEnv)
	f.CutAtByte(40, false) // inside the variables
	st.Save(newEnv)
	f.PowerOn()
	if _, err := st.Load(); !errors.Is(err, ErrNoEnv) {
		t.Fatalf("torn single copy: %v, want ErrNoEnv", err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "env.img"), f.Bytes(), 0o644)
	if e, ok := fwPrintenv(t, writeConfig(t, dir, fmt.Sprintf("env.img 0x0 0x%x\n", size))); ok {
		t.Fatalf("fw_printenv read a torn single copy as %v", e)
	}
}
