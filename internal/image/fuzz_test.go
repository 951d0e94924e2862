package image_test

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/image"
)

// FuzzRead feeds arbitrary bytes to the parser: it must never panic, every
// error must be an *image.Error or a context error, and whatever it accepts
// must be self-consistent.
func FuzzRead(f *testing.F) {
	for _, dir := range []string{"mcuboot", "imgtool", "golden"} {
		files, _ := filepath.Glob(filepath.Join("testdata", dir, "*.bin"))
		for _, p := range files {
			b, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			if len(b) > 8192 {
				b = b[:8192] // padded images: the fuzzer works on the head
			}
			f.Add(b)
		}
	}
	f.Add([]byte{})
	f.Add([]byte{0x3d, 0xb8, 0xf3, 0x96})
	keys := []crypto.PublicKey{pubKey(f, edPub), pubKey(f, p256P), pubKey(f, newKeyPub)}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, pol := range []image.TrailerPolicy{image.TrailerMCUboot, image.TrailerIgnore} {
			img, err := image.Read(context.Background(), bytes.NewReader(data), image.ReadOptions{Trailer: pol})
			if err != nil {
				var ie *image.Error
				if !errors.As(err, &ie) {
					t.Fatalf("error %v is not an *image.Error", err)
				}
				if ie.Offset < 0 || ie.Offset > int64(len(data)) {
					t.Fatalf("error offset %d outside the %d-byte input", ie.Offset, len(data))
				}
				continue
			}
			if img.Len > int64(len(data)) || img.SignedLen > img.Len {
				t.Fatalf("lengths %d/%d for %d bytes", img.SignedLen, img.Len, len(data))
			}
			if pol == image.TrailerMCUboot && img.Trailer == nil && img.Len != int64(len(data)) {
				t.Fatalf("%d bytes after the image and no trailer reported", int64(len(data))-img.Len)
			}
			if _, err := img.Verify(keys); err != nil && !image.IsSecurity(err) {
				t.Fatalf("Verify: %v is not a security error", err)
			}
		}
	})
}
