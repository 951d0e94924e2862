// Command installslot measures installing an image into an A/B slot against
// the raw write floor.
//
// Throughput: agent.InstallImage streaming a signed 256 MiB image from a file
// into a file-backed slot (verifying it in the same pass, then fsyncing the
// slot) against `dd if=IMAGE of=SLOT bs=4M conv=fsync,notrunc` of the same
// file into the same slot: dd does no hashing and no parsing, so it is the
// floor for any installer that must read every byte, write it and make it
// durable. Both run as child processes, from a cold page cache (sync and
// drop_caches before every timed run), alternating dd and install; the
// median of several runs counts. Target: the install takes at most 1.10x
// dd's time.
//
// Memory: peak RSS of the install child (the program re-executes itself to
// run one InstallImage), from the kernel's rusage of the child. Target: at
// most 16 MiB.
//
// It also prints every run, the best run of each side, the children's CPU
// times and bytes read from storage, and the install's fsync time, which
// say where the time goes. The agent daemon's idle RSS is measured by
// bench/agentidle.
package main

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// Targets.
const (
	maxRatio = 1.10     // install time / dd time
	maxRSS   = 16 << 20 // bytes, peak RSS of the install child
)

// childFlag makes the program a child that installs one image and exits:
// -child-install SRC SLOT PUBKEY. It is left out of the usage text.
const childFlag = "child-install"

func main() {
	dir := flag.String("dir", "", "work directory (default: a temporary one, removed afterwards)")
	runs := flag.Int("runs", 5, "timed runs of each side; the median counts")
	sizeMiB := flag.Int64("size", 256, "MiB of image payload")
	slotMiB := flag.Int64("slot-size", 320, "MiB of the slot file")
	child := flag.Bool(childFlag, false, "internal: install SRC into SLOT with the key PUBKEY, once, and exit")
	flag.Usage = usage
	flag.Parse()
	if *child {
		if err := runChild(flag.Args()); err != nil {
			fmt.Fprintln(os.Stderr, "installslot child:", err)
			os.Exit(1)
		}
		return
	}
	if *runs < 1 || *sizeMiB < 1 || *slotMiB < *sizeMiB+1 {
		fmt.Fprintln(os.Stderr, "installslot: want -runs >= 1, -size >= 1 and -slot-size > -size")
		os.Exit(2)
	}
	if err := run(*dir, *runs, *sizeMiB<<20, *slotMiB<<20); err != nil {
		fmt.Fprintln(os.Stderr, "installslot:", err)
		os.Exit(1)
	}
}

func usage() {
	out := flag.CommandLine.Output()
	fmt.Fprintf(out, "usage: %s [flags]\n", filepath.Base(os.Args[0]))
	flag.VisitAll(func(f *flag.Flag) {
		if strings.HasPrefix(f.Name, "child-") {
			return
		}
		def := ""
		if f.DefValue != "" && f.DefValue != "false" {
			def = " (default " + f.DefValue + ")"
		}
		fmt.Fprintf(out, "  -%s\n    \t%s%s\n", f.Name, f.Usage, def)
	})
}

// sample is one timed run of one side.
type sample struct {
	wall   time.Duration // parent's view: start to exit of the child
	inside time.Duration // the child's own timing of the operation (0 for dd)
	sync   time.Duration // of which the final fsync (0 for dd)
	user   time.Duration // CPU time of the child in user mode
	sys    time.Duration // and in the kernel
	inDisk int64         // bytes the child read from storage
	maxRSS int64         // bytes
}

func run(dir string, runs int, size, slotSize int64) error {
	ctx := context.Background()
	if dir == "" {
		d, err := os.MkdirTemp("", "fieldpatch-bench")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	dd, err := exec.LookPath("dd")
	if err != nil {
		return fmt.Errorf("dd is the yardstick and is not installed: %w", err)
	}
	key, err := trust.GenerateKey(trust.KeyEd25519)
	if err != nil {
		return err
	}
	keyName := filepath.Join(dir, "bench-key")
	os.Remove(keyName + ".pem")
	os.Remove(keyName + ".pub.pem")
	_, pubPath, err := trust.WriteKeyPair(keyName, key)
	if err != nil {
		return err
	}

	fmt.Printf("building a %d MiB image...\n", size>>20)
	img := filepath.Join(dir, "image.img")
	if err := buildImage(ctx, img, size, key); err != nil {
		return err
	}
	fi, err := os.Stat(img)
	if err != nil {
		return err
	}
	imgLen := fi.Size()
	fmt.Printf("allocating a %d MiB slot file...\n", slotSize>>20)
	slotPath := filepath.Join(dir, "slot-b")
	if err := allocate(slotPath, slotSize); err != nil {
		return err
	}

	cold := true
	drop := func() {
		if err := dropCaches(); err != nil && cold {
			cold = false
			fmt.Fprintf(os.Stderr, "\nWARNING: the page cache could not be dropped (%v);\n"+
				"the figures below are NOT cold-cache figures (run as root on Linux for them).\n\n", err)
		}
	}

	ddCmd := func() *exec.Cmd {
		return exec.Command(dd, "if="+img, "of="+slotPath, "bs=4M", "conv=fsync,notrunc", "status=none")
	}
	installCmd := func() *exec.Cmd {
		return exec.Command(self, "-"+childFlag, img, slotPath, pubPath)
	}

	sides := []struct {
		name string
		cmd  func() *exec.Cmd
	}{
		{"dd", ddCmd},
		{"install", installCmd},
	}
	samples := make([][]sample, len(sides))
	for i := 0; i < runs; i++ {
		for j, s := range sides {
			drop()
			smp, err := timeChild(s.cmd())
			if err != nil {
				return fmt.Errorf("%s, run %d: %w", s.name, i+1, err)
			}
			samples[j] = append(samples[j], smp)
			fmt.Printf("run %d %-14s %v\n", i+1, s.name, smp.wall.Round(time.Millisecond))
		}
	}
	// dd leaves the same bytes in the slot, so check each install path on
	// its own: zero the slot, run it once more (untimed), read the slot back.
	for _, s := range sides[1:] {
		if err := allocate(slotPath, slotSize); err != nil {
			return err
		}
		if _, err := timeChild(s.cmd()); err != nil {
			return fmt.Errorf("%s, check run: %w", s.name, err)
		}
		if err := checkSlot(ctx, slotPath, key.Public()); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}

	ddMed := median(samples[0], func(s sample) time.Duration { return s.wall })
	inMed := median(samples[1], func(s sample) time.Duration { return s.wall })
	var peak int64
	for _, s := range samples[1] {
		peak = max(peak, s.maxRSS)
	}
	ratio := inMed.Seconds() / ddMed.Seconds()
	mibps := func(d time.Duration) float64 { return float64(imgLen) / (1 << 20) / d.Seconds() }
	okRatio := ratio <= maxRatio
	okRSS := peak <= maxRSS

	cache := "cold page cache (sync + drop_caches before every run)"
	if !cold {
		cache = "page cache NOT dropped"
	}
	fmt.Printf("\ninstalling a %.1f MiB image into a %d MiB slot file, median of %d, %s\n\n",
		float64(imgLen)/(1<<20), slotSize>>20, runs, cache)
	ms := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
	wall := func(s sample) time.Duration { return s.wall }
	fmt.Printf("| what | median | MiB/s | vs dd | best | CPU user | CPU sys | read from disk | peak RSS |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|\n")
	unsteady := false
	for j, sd := range sides {
		name := sd.name
		if j == 0 {
			name = "dd bs=4M conv=fsync (floor)"
		} else {
			name = "agent.InstallImage (child process)"
		}
		m := median(samples[j], wall)
		lo, hi := slices.MinFunc(samples[j], cmpWall).wall, slices.MaxFunc(samples[j], cmpWall).wall
		if j < 2 && hi > lo*3/2 {
			unsteady = true
		}
		fmt.Printf("| %s | %v | %.0f | %.2fx | %v | %v | %v | %.1f MiB | %.1f MiB |\n",
			name, ms(m), mibps(m), m.Seconds()/ddMed.Seconds(), ms(lo),
			ms(median(samples[j], func(s sample) time.Duration { return s.user })),
			ms(median(samples[j], func(s sample) time.Duration { return s.sys })),
			mib(median(samples[j], func(s sample) int64 { return s.inDisk })),
			mib(maxOf(samples[j])))
	}
	ddBest, inBest := slices.MinFunc(samples[0], cmpWall).wall, slices.MinFunc(samples[1], cmpWall).wall
	fmt.Printf("\nbest against best: install %.2fx dd\n", inBest.Seconds()/ddBest.Seconds())
	if unsteady {
		fmt.Printf("NOTE: the slowest run of dd or of the install took over 1.5x its fastest: the medians\n" +
			"are unsteady on this machine (see the system CPU times below and bench/README.md).\n")
	}

	fmt.Printf("\neach run: wall time of the child process (its system CPU time; for the install, the final fsync's share)\n\n")
	fmt.Printf("| run |")
	for _, s := range sides {
		fmt.Printf(" %s |", s.name)
	}
	fmt.Printf("\n|---|%s\n", strings.Repeat("---|", len(sides)))
	for i := 0; i < runs; i++ {
		fmt.Printf("| %d |", i+1)
		for j := range sides {
			if s := samples[j][i]; s.inside > 0 {
				fmt.Printf(" %v (sys %v, fsync %v) |", ms(s.wall), ms(s.sys), ms(s.sync))
			} else {
				fmt.Printf(" %v (sys %v) |", ms(s.wall), ms(s.sys))
			}
		}
		fmt.Println()
	}
	fmt.Printf("\ntargets: install <= %.2fx dd: %s (%.2fx); peak RSS <= %d MiB: %s (%.1f MiB)\n",
		maxRatio, verdict(okRatio), ratio, maxRSS>>20, verdict(okRSS), mib(peak))
	if !cold {
		fmt.Println("(the page cache was not dropped: these are not the cold-cache figures the targets are about)")
	}
	if !okRatio || !okRSS {
		return errors.New("a target was missed")
	}
	return nil
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

func cmpWall(a, b sample) int { return int(a.wall - b.wall) }

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func maxOf(s []sample) int64 {
	var m int64
	for _, x := range s {
		m = max(m, x.maxRSS)
	}
	return m
}

// median of the values f picks out of s (the mean of the middle two for an
// even count).
func median[T ~int64](s []sample, f func(sample) T) T {
	d := make([]T, len(s))
	for i, x := range s {
		d[i] = f(x)
	}
	slices.Sort(d)
	n := len(d)
	if n%2 == 1 {
		return d[n/2]
	}
	return (d[n/2-1] + d[n/2]) / 2
}

// buildImage writes an image with a pseudo-random payload streamed from a
// generator: nothing of that size is ever held in memory.
func buildImage(ctx context.Context, path string, size int64, key crypto.Signer) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	sc := uint32(1)
	src := io.LimitReader(rand.NewChaCha8([32]byte{1}), size)
	_, err = image.Build(ctx, f, src, size, image.BuildOptions{
		Version: "1.0.0", SecurityCounter: &sc, HWClass: "bench", Signers: []crypto.Signer{key},
	})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// allocate writes a file of size zero bytes (allocated blocks, not a
// sparse file: a slot is storage that exists) and syncs it.
func allocate(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	zero := make([]byte, 4<<20)
	for done := int64(0); done < size && err == nil; {
		n := int(min(int64(len(zero)), size-done))
		_, err = f.Write(zero[:n])
		done += int64(n)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// dropCaches writes back dirty pages and empties the page cache, so the next
// run reads its source from the disk.
func dropCaches() error {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

// timeChild runs cmd and returns its wall time, its CPU time, its peak RSS
// and its own timings (the operation and its fsync, in nanoseconds on
// stdout, if it prints them).
func timeChild(cmd *exec.Cmd) (sample, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return sample{}, fmt.Errorf("%v: %s", err, stderr.String())
	}
	s := sample{wall: time.Since(start)}
	ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		return sample{}, errors.New("no rusage on this system")
	}
	s.maxRSS = ru.Maxrss * 1024 // Linux reports KiB
	s.inDisk = ru.Inblock * 512
	s.user, s.sys = time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
	if out := strings.Fields(stdout.String()); len(out) > 0 {
		if len(out) != 2 {
			return sample{}, fmt.Errorf("child printed %q, want two durations in nanoseconds", stdout.String())
		}
		for i, p := range []*time.Duration{&s.inside, &s.sync} {
			ns, err := strconv.ParseInt(out[i], 10, 64)
			if err != nil {
				return sample{}, fmt.Errorf("child printed %q, want two durations in nanoseconds", stdout.String())
			}
			*p = time.Duration(ns)
		}
	}
	return s, nil
}

// checkSlot reads the image back from the slot and verifies it.
func checkSlot(ctx context.Context, path string, pub crypto.PublicKey) error {
	d, err := slot.OpenDevice(path, true)
	if err != nil {
		return err
	}
	defer d.Close()
	if _, _, err := image.ReadVerify(ctx, slot.Reader(d), []crypto.PublicKey{pub}, image.ReadOptions{Trailer: image.TrailerIgnore}); err != nil {
		return fmt.Errorf("the slot does not hold the image after the runs: %w", err)
	}
	return nil
}

// runChild installs one image: args are SRC SLOT PUBKEY. It prints the
// duration of the operation alone, in nanoseconds.
func runChild(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("want SRC SLOT PUBKEY, got %q", args)
	}
	pub, err := trust.LoadPublicKey(args[2])
	if err != nil {
		return err
	}
	src, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := slot.OpenDevice(args[1], false)
	if err != nil {
		return err
	}
	defer dst.Close()
	fi, err := src.Stat()
	if err != nil {
		return err
	}
	keys := []crypto.PublicKey{pub}
	ctx := context.Background()
	// Only the final Sync is timed on its own; writes go straight through.
	timed := &syncTimer{Device: dst}

	start := time.Now()
	if _, err = agent.InstallImage(ctx, src, timed, keys, fi.Size(), nil); err != nil {
		return err
	}
	fmt.Println(time.Since(start).Nanoseconds(), timed.sync.Nanoseconds())
	return nil
}

// syncTimer is a slot that times its Sync calls.
type syncTimer struct {
	slot.Device
	sync time.Duration
}

func (d *syncTimer) Sync() error {
	start := time.Now()
	err := d.Device.Sync()
	d.sync += time.Since(start)
	return err
}
