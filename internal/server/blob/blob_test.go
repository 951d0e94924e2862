package blob

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPutOpen(t *testing.T) {
	s := &Store{Dir: t.TempDir()}
	data := bytes.Repeat([]byte("image"), 100000)
	sum, n, err := s.Put(context.Background(), bytes.NewReader(data), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	if sum != hex.EncodeToString(want[:]) || n != int64(len(data)) {
		t.Fatalf("sum %s n %d", sum, n)
	}
	f, err := s.Open(sum)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(f)
	f.Close()
	if !bytes.Equal(got, data) {
		t.Fatal("content differs")
	}
	// The same content again: one copy, no leftovers.
	if sum2, _, err := s.Put(context.Background(), bytes.NewReader(data), 1<<20); err != nil || sum2 != sum {
		t.Fatalf("second put: %s %v", sum2, err)
	}
	if left, _ := os.ReadDir(filepath.Join(s.Dir, "tmp")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// An upload that is too large or interrupted leaves nothing visible.
func TestPutRefusesAndLeavesNothing(t *testing.T) {
	s := &Store{Dir: t.TempDir()}
	if _, _, err := s.Put(context.Background(), bytes.NewReader(make([]byte, 2000)), 1000); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("too large: %v", err)
	}
	_, _, err := s.Put(context.Background(), io.MultiReader(strings.NewReader("half an image"), errReader{}), 1<<20)
	if err == nil {
		t.Fatal("interrupted upload accepted")
	}
	entries, _ := os.ReadDir(filepath.Join(s.Dir, "tmp"))
	blobs, _ := filepath.Glob(filepath.Join(s.Dir, "sha256", "*", "*"))
	if len(entries) != 0 || len(blobs) != 0 {
		t.Fatalf("leftovers: tmp %v, blobs %v", entries, blobs)
	}
	for _, bad := range []string{"../../etc/passwd", strings.Repeat("A", 64), "abc"} {
		if _, err := s.Open(bad); !errors.Is(err, ErrNotFound) {
			t.Errorf("Open(%q): %v", bad, err)
		}
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("connection reset") }
