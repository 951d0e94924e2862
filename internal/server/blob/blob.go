// Package blob stores firmware images on the server, content-addressed by
// SHA-256. An image is written to a temporary file, fsynced and renamed into
// place, so an interrupted upload is never visible, and served straight from
// its file (with Range and ETag) without being read into memory.
package blob

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Store is a directory of blobs.
type Store struct {
	Dir string
}

// ErrTooLarge is returned by Put when the input exceeds the limit.
var ErrTooLarge = errors.New("blob larger than allowed")

// ErrNotFound is returned for an unknown blob.
var ErrNotFound = errors.New("no such blob")

// Path is where a blob with this SHA-256 lives.
func (s *Store) Path(sum string) string {
	return filepath.Join(s.Dir, "sha256", sum[:2], sum)
}

// validSum accepts exactly 64 lowercase hex digits: nothing else can name
// a file in the store.
func validSum(sum string) bool {
	if len(sum) != 64 {
		return false
	}
	for i := 0; i < len(sum); i++ {
		if c := sum[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Put stores what r yields (at most max bytes) and returns its SHA-256 and
// size. Storing the same content twice keeps one copy.
func (s *Store) Put(ctx context.Context, r io.Reader, max int64) (string, int64, error) {
	tmpDir := filepath.Join(s.Dir, "tmp")
	if err := os.MkdirAll(tmpDir, 0o755); err != nil {
		return "", 0, err
	}
	f, err := os.CreateTemp(tmpDir, "upload-*")
	if err != nil {
		return "", 0, err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), &ctxReader{ctx: ctx, r: io.LimitReader(r, max+1)})
	if err == nil && n > max {
		err = fmt.Errorf("%w: more than %d bytes", ErrTooLarge, max)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", 0, err
	}
	sum := hex.EncodeToString(h.Sum(nil))
	dst := s.Path(sum)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", 0, err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return "", 0, err
	}
	if err := syncDir(filepath.Dir(dst)); err != nil {
		return "", 0, err
	}
	return sum, n, nil
}

// Open opens a blob for reading.
func (s *Store) Open(sum string) (*os.File, error) {
	if !validSum(sum) {
		return nil, fmt.Errorf("%w: %q is not a SHA-256", ErrNotFound, sum)
	}
	f, err := os.Open(s.Path(sum))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, sum)
	}
	return f, err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
