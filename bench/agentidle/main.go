// Command agentidle measures the device agent daemon's resident memory when
// idle: it sets up a small file-backed device (one committed slot, a
// two-copy boot environment, the non-volatile store), starts
// `fieldpatch-agent run` on it, waits for it to settle, and reads VmRSS from
// /proc. Target: at most 10 MiB.
package main

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

func main() {
	bin := flag.String("bin", "bin", "directory holding fieldpatch-agent")
	settle := flag.Duration("settle", 2*time.Second, "how long the daemon idles before it is measured")
	flag.Parse()
	if err := run(filepath.Join(*bin, "fieldpatch-agent"), *settle); err != nil {
		fmt.Fprintln(os.Stderr, "agentidle:", err)
		os.Exit(1)
	}
}

func run(agent string, settle time.Duration) error {
	dir, err := os.MkdirTemp("", "fieldpatch-agentidle")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	key, err := trust.GenerateKey(trust.KeyEd25519)
	if err != nil {
		return err
	}
	if _, _, err := trust.WriteKeyPair(filepath.Join(dir, "key"), key); err != nil {
		return err
	}
	sc := uint32(1)
	payload := bytes.Repeat([]byte("idle firmware "), 4096)
	var img bytes.Buffer
	if _, err := image.Build(context.Background(), &img, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
		Version: "1.0.0", SecurityCounter: &sc, HWClass: "bench", Signers: []crypto.Signer{key},
	}); err != nil {
		return err
	}
	slotA := append(img.Bytes(), make([]byte, 1<<20-img.Len())...)
	for name, b := range map[string][]byte{"slot-a.img": slotA, "slot-b.img": make([]byte, 1<<20), "env.img": make([]byte, 0x8000)} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return err
		}
	}
	cfg, _ := json.Marshal(map[string]any{
		"slots":     map[string]string{"a": "slot-a.img", "b": "slot-b.img"},
		"env":       map[string]any{"type": "uboot-pair", "device": "env.img", "offsets": []int{0, 0x4000}, "size": 0x4000},
		"keys":      []map[string]string{{"path": "key.pub.pem"}},
		"nv":        "nv",
		"hw_class":  "bench",
		"state_dir": "state",
	})
	cfgPath := filepath.Join(dir, "device.json")
	os.WriteFile(cfgPath, cfg, 0o644)
	for _, args := range [][]string{{"nv", "--config", cfgPath, "--init"}, {"boot", "--config", cfgPath}} {
		if out, err := exec.Command(agent, args...).CombinedOutput(); err != nil {
			return fmt.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	cmd := exec.Command(agent, "run", "--config", cfgPath)
	if err := cmd.Start(); err != nil {
		return err
	}
	time.Sleep(settle)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	rollup, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", cmd.Process.Pid))
	cmd.Process.Signal(syscall.SIGTERM)
	werr := cmd.Wait()
	if err != nil {
		return err
	}
	var rss, hwm string
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rss = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			hwm = strings.TrimSpace(v)
		}
	}
	var anon string
	for _, line := range strings.Split(string(rollup), "\n") {
		if v, ok := strings.CutPrefix(line, "Anonymous:"); ok {
			anon = strings.TrimSpace(v)
		}
	}
	var kib int
	fmt.Sscanf(rss, "%d", &kib)
	fi, _ := os.Stat(agent)
	fmt.Printf("\nagent daemon, idle after %v\n\n| what | value |\n|---|---|\n| idle RSS (VmRSS) | %s |\n| of which anonymous (heap, stacks) | %s |\n| peak RSS so far (VmHWM) | %s |\n| binary size | %.1f MiB |\n", settle, rss, anon, hwm, float64(fi.Size())/(1<<20))
	if werr != nil {
		return fmt.Errorf("the daemon did not stop cleanly on SIGTERM: %v", werr)
	}
	ok := kib > 0 && kib <= 10<<10
	verdict := "met"
	if !ok {
		verdict = "MISSED"
	}
	fmt.Printf("\ntarget: idle RSS <= 10 MiB: %s (%.1f MiB)\n", verdict, float64(kib)/1024)
	if !ok {
		return fmt.Errorf("a target was missed")
	}
	return nil
}
