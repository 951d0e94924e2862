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
// The agent daemon's idle RSS is not measured here.
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
	experiment := flag.Bool("experiment", false, "also time the diagnostic variants of experiment.go (copy without hashing, pipelined install)")
	child := flag.Bool(childFlag, false, "internal: install SRC into SLOT with the key PUBKEY, once, and exit")
	variant := flag.String("child-variant", variantInstall, "internal: what the child runs")
	flag.Usage = usage
	flag.Parse()
	if *child {
		if err := runChild(*variant, flag.Args()); err != nil {
			fmt.Fprintln(os.Stderr, "installslot child:", err)
			os.Exit(1)
		}
		return
	}
	if *runs < 1 || *sizeMiB < 1 || *slotMiB < *sizeMiB+1 {
		fmt.Fprintln(os.Stderr, "installslot: want -runs >= 1, -size >= 1 and -slot-size > -size")
		os.Exit(2)
	}
	if err := run(*dir, *runs, *sizeMiB<<20, *slotMiB<<20, *experiment); err != nil {
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
		fmt.Fprintf(out, "  -%s\n    \t%s (default %q)\n", f.Name, f.Usage, f.DefValue)
	})
}

// sample is one timed run of one side.
type sample struct {
	wall   time.Duration // parent's view: start to exit of the child
	inside time.Duration // the child's own timing of the operation (0 for dd)
	maxRSS int64         // bytes
}

func run(dir string, runs int, size, slotSize int64, experiment bool) error {
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
	installCmd := func(variant string) *exec.Cmd {
		return exec.Command(self, "-"+childFlag, "-child-variant", variant, img, slotPath, pubPath)
	}

	sides := []struct {
		name string
		cmd  func() *exec.Cmd
	}{
		{"dd", ddCmd},
		{"install", func() *exec.Cmd { return installCmd(variantInstall) }},
	}
	if experiment {
		for _, v := range experimentVariants {
			sides = append(sides, struct {
				name string
				cmd  func() *exec.Cmd
			}{v, func() *exec.Cmd { return installCmd(v) }})
		}
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
			fmt.Printf("run %d %-10s %v\n", i+1, s.name, smp.wall.Round(time.Millisecond))
		}
	}
	// The slot must hold the image: the last writer was an install (or a
	// variant), so a read back proves the measured path wrote it all.
	if err := checkSlot(ctx, slotPath, key.Public()); err != nil {
		return err
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
	fmt.Printf("| what | median | MiB/s | vs dd | peak RSS |\n|---|---|---|---|---|\n")
	fmt.Printf("| dd bs=4M conv=fsync (floor) | %v | %.0f | 1.00x | %.1f MiB |\n",
		ddMed.Round(time.Millisecond), mibps(ddMed), mib(maxOf(samples[0])))
	fmt.Printf("| agent.InstallImage (child process) | %v | %.0f | %.2fx | %.1f MiB |\n",
		inMed.Round(time.Millisecond), mibps(inMed), ratio, mib(peak))
	for j := 2; j < len(sides); j++ {
		m := median(samples[j], func(s sample) time.Duration { return s.wall })
		fmt.Printf("| experiment: %s | %v | %.0f | %.2fx | %.1f MiB |\n",
			sides[j].name, m.Round(time.Millisecond), mibps(m), m.Seconds()/ddMed.Seconds(), mib(maxOf(samples[j])))
	}

	fmt.Printf("\neach run (wall time of the child process; in brackets, the child's own timing of the operation)\n\n")
	fmt.Printf("| run |")
	for _, s := range sides {
		fmt.Printf(" %s |", s.name)
	}
	fmt.Printf("\n|---|%s\n", strings.Repeat("---|", len(sides)))
	for i := 0; i < runs; i++ {
		fmt.Printf("| %d |", i+1)
		for j := range sides {
			s := samples[j][i]
			if s.inside > 0 {
				fmt.Printf(" %v (%v) |", s.wall.Round(time.Millisecond), s.inside.Round(time.Millisecond))
			} else {
				fmt.Printf(" %v |", s.wall.Round(time.Millisecond))
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

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func maxOf(s []sample) int64 {
	var m int64
	for _, x := range s {
		m = max(m, x.maxRSS)
	}
	return m
}

// median of the durations f picks out of s (the mean of the middle two for
// an even count).
func median(s []sample, f func(sample) time.Duration) time.Duration {
	d := make([]time.Duration, len(s))
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

// timeChild runs cmd and returns its wall time, its own timing (a duration
// in nanoseconds it prints on stdout, if any) and its peak RSS.
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
	if out := strings.TrimSpace(stdout.String()); out != "" {
		ns, err := strconv.ParseInt(out, 10, 64)
		if err != nil {
			return sample{}, fmt.Errorf("child printed %q, want nanoseconds", out)
		}
		s.inside = time.Duration(ns)
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

const variantInstall = "install"

// runChild installs one image: args are SRC SLOT PUBKEY. It prints the
// duration of the operation alone, in nanoseconds.
func runChild(variant string, args []string) error {
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

	start := time.Now()
	switch variant {
	case variantInstall:
		_, err = agent.InstallImage(ctx, src, dst, keys, fi.Size(), nil)
	default:
		err = runExperiment(ctx, variant, src, dst, keys, fi.Size())
	}
	if err != nil {
		return err
	}
	fmt.Println(time.Since(start).Nanoseconds())
	return nil
}
