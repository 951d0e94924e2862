// Command imageverify measures image verification against its floor.
//
// Throughput: verifying a 256 MiB image (read, SHA-256 of the signed region,
// signature check) against `openssl dgst -sha256` of the same file, in the
// same run, both from the page cache, best of several runs. OpenSSL uses the
// CPU's SHA instructions, so it is the floor for any verifier that must hash
// every byte. Target: at least 0.9x its throughput.
//
// Memory: peak RSS of `fieldpatch image verify` on a 2 GiB image, read from
// the kernel's rusage of the child process. Target: at most 32 MiB.
package main

import (
	"bytes"
	"context"
	"crypto"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

func main() {
	bin := flag.String("bin", "bin", "directory holding the fieldpatch binary")
	dir := flag.String("dir", "", "work directory (default: a temporary one, removed afterwards)")
	runs := flag.Int("runs", 5, "runs per measurement; the best counts")
	throughputMiB := flag.Int64("size", 256, "MiB of payload for the throughput test")
	rssMiB := flag.Int64("rss-size", 2048, "MiB of payload for the memory test")
	flag.Parse()
	if err := run(*bin, *dir, *runs, *throughputMiB<<20, *rssMiB<<20); err != nil {
		fmt.Fprintln(os.Stderr, "imageverify:", err)
		os.Exit(1)
	}
}

func run(bin, dir string, runs int, size, rssSize int64) error {
	ctx := context.Background()
	if dir == "" {
		d, err := os.MkdirTemp("", "fieldpatch-bench")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	fp, err := filepath.Abs(filepath.Join(bin, "fieldpatch"))
	if err != nil {
		return err
	}
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		return fmt.Errorf("openssl is the yardstick and is not installed: %w", err)
	}
	key, err := trust.GenerateKey(trust.KeyEd25519)
	if err != nil {
		return err
	}
	keyName := filepath.Join(dir, "bench-key")
	if _, _, err := trust.WriteKeyPair(keyName, key); err != nil {
		return err
	}

	fmt.Printf("building a %d MiB image...\n", size>>20)
	small := filepath.Join(dir, "256.img")
	if err := buildImage(ctx, small, size, key); err != nil {
		return err
	}
	// Warm the page cache so both sides read from memory.
	if err := readAll(small); err != nil {
		return err
	}

	opensslBest, err := best(runs, func() error {
		return exec.Command(openssl, "dgst", "-sha256", small).Run()
	})
	if err != nil {
		return fmt.Errorf("openssl dgst: %w", err)
	}
	inProcBest, err := best(runs, func() error {
		f, err := os.Open(small)
		if err != nil {
			return err
		}
		defer f.Close()
		_, _, err = image.ReadVerify(ctx, f, []crypto.PublicKey{key.Public()}, image.ReadOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("in-process verify: %w", err)
	}
	cliBest, err := best(runs, func() error {
		return exec.Command(fp, "image", "verify", "--key", keyName+".pub.pem", small).Run()
	})
	if err != nil {
		return fmt.Errorf("fieldpatch image verify: %w", err)
	}

	fmt.Printf("building a %d MiB image...\n", rssSize>>20)
	big := filepath.Join(dir, "big.img")
	if err := buildImage(ctx, big, rssSize, key); err != nil {
		return err
	}
	verifyRSS, verifyTime, err := rss(exec.Command(fp, "image", "verify", "--key", keyName+".pub.pem", big))
	if err != nil {
		return fmt.Errorf("fieldpatch image verify (big): %w", err)
	}
	opensslRSS, opensslTime, err := rss(exec.Command(openssl, "dgst", "-sha256", big))
	if err != nil {
		return fmt.Errorf("openssl dgst (big): %w", err)
	}
	os.Remove(big)

	mibps := func(d time.Duration) float64 { return float64(size) / (1 << 20) / d.Seconds() }
	ratioIn := opensslBest.Seconds() / inProcBest.Seconds()
	ratioCLI := opensslBest.Seconds() / cliBest.Seconds()
	okThroughput := ratioCLI >= 0.9
	okRSS := verifyRSS <= 32<<20

	fmt.Printf("\nimage verification, %d MiB image, best of %d (page cache warm)\n\n", size>>20, runs)
	fmt.Printf("| what | time | MiB/s | vs openssl |\n|---|---|---|---|\n")
	fmt.Printf("| openssl dgst -sha256 (floor) | %v | %.0f | 1.00x |\n", opensslBest.Round(time.Millisecond), mibps(opensslBest))
	fmt.Printf("| fieldpatch image verify (process) | %v | %.0f | %.2fx |\n", cliBest.Round(time.Millisecond), mibps(cliBest), ratioCLI)
	fmt.Printf("| image.ReadVerify (in process) | %v | %.0f | %.2fx |\n", inProcBest.Round(time.Millisecond), mibps(inProcBest), ratioIn)
	fmt.Printf("\npeak RSS on a %d MiB image\n\n| what | max RSS | time |\n|---|---|---|\n", rssSize>>20)
	fmt.Printf("| fieldpatch image verify | %.1f MiB | %v |\n", float64(verifyRSS)/(1<<20), verifyTime.Round(time.Millisecond))
	fmt.Printf("| openssl dgst -sha256 | %.1f MiB | %v |\n", float64(opensslRSS)/(1<<20), opensslTime.Round(time.Millisecond))
	fmt.Printf("\ntargets: throughput >= 0.90x openssl: %s (%.2fx); RSS <= 32 MiB: %s (%.1f MiB)\n",
		verdict(okThroughput), ratioCLI, verdict(okRSS), float64(verifyRSS)/(1<<20))
	if !okThroughput || !okRSS {
		return fmt.Errorf("a target was missed")
	}
	return nil
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
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
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func readAll(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(io.Discard, f)
	return err
}

func best(runs int, f func() error) (time.Duration, error) {
	var b time.Duration
	for i := 0; i < runs; i++ {
		start := time.Now()
		if err := f(); err != nil {
			return 0, err
		}
		if d := time.Since(start); b == 0 || d < b {
			b = d
		}
	}
	return b, nil
}

// rss runs cmd and returns its peak resident set size in bytes.
func rss(cmd *exec.Cmd) (int64, time.Duration, error) {
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, 0, fmt.Errorf("%v: %s", err, stderr.String())
	}
	ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		return 0, 0, fmt.Errorf("no rusage on this system")
	}
	return ru.Maxrss * 1024, time.Since(start), nil // Linux reports KiB
}
