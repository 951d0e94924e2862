package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/cli"
)

const vectors = "../../internal/image/testdata"

func runAgent(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

// A slot holds an image followed by whatever the partition had before:
// with --slot that is ignored, without it the bytes are refused.
func TestVerifySlot(t *testing.T) {
	img, err := os.ReadFile(filepath.Join(vectors, "golden", "fieldpatch-ed25519.bin"))
	if err != nil {
		t.Fatal(err)
	}
	slot := filepath.Join(t.TempDir(), "slot-b")
	os.WriteFile(slot, append(img, bytes.Repeat([]byte("old firmware"), 1000)...), 0o644)
	key := filepath.Join(vectors, "mcuboot", "ed25519.pub.pem")

	code, out, errs := runAgent("verify", "--key", key, "--slot", slot)
	if code != cli.ExitOK || !strings.Contains(out, "1.4.0-rc.1+build.7") {
		t.Fatalf("--slot: exit %d %q %q", code, out, errs)
	}
	if code, _, errs := runAgent("verify", "--key", key, slot); code != cli.ExitRefused || !strings.Contains(errs, "unexpected bytes after the image") {
		t.Errorf("without --slot: exit %d %q", code, errs)
	}
	// A corrupt image in the slot is refused either way.
	data, _ := os.ReadFile(slot)
	data[0x300] ^= 1
	os.WriteFile(slot, data, 0o644)
	if code, _, errs := runAgent("verify", "--key", key, "--slot", slot); code != cli.ExitRefused || !strings.Contains(errs, "does not match") {
		t.Errorf("corrupt slot: exit %d %q", code, errs)
	}
	if code, _, _ := runAgent("verify", slot); code != cli.ExitUsage {
		t.Errorf("no key: exit %d", code)
	}
	if code, _, _ := runAgent("bogus"); code != cli.ExitUsage {
		t.Errorf("unknown command: exit %d", code)
	}
}
