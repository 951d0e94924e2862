package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// HTTPFetcher downloads over HTTP(S) into a file, resuming with a Range
// request after an interruption. Every CheckpointEvery bytes it fsyncs the
// file and records the durable length beside it (DST.progress), so that a
// power cut loses at most that much: on resume the file is cut back to the
// recorded length and the rest is asked for again.
type HTTPFetcher struct {
	Client          *http.Client
	CheckpointEvery int64 // default 4 MiB
	MaxSize         int64 // refuse larger downloads; default 4 GiB
}

// FetchProgress is what a download has made durable (kept beside the
// file as DST.progress): the URL, the bytes synced, and whether it is whole.
type FetchProgress struct {
	URL    string `json:"url"`
	Offset int64  `json:"offset"`
	Done   bool   `json:"done"`
}

// GetFrom asks for url from offset on: a Range request when offset > 0.
func GetFrom(ctx context.Context, c *http.Client, url string, offset int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if offset > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(offset, 10)+"-")
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("download %s: %w", url, err)
	}
	return resp, nil
}

func (f *HTTPFetcher) client() *http.Client {
	if f.Client != nil {
		return f.Client
	}
	return &http.Client{Timeout: 0, Transport: &http.Transport{
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
	}}
}

func readProgress(path string) FetchProgress {
	var p FetchProgress
	if b, err := os.ReadFile(path); err == nil {
		json.Unmarshal(b, &p)
	}
	return p
}

func writeProgress(path string, p FetchProgress) error {
	b, _ := json.Marshal(p)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	f, err := os.Open(tmp)
	if err == nil {
		f.Sync()
		f.Close()
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// TooLargeError is a download longer than allowed (endless data).
type TooLargeError struct {
	URL        string
	Limit, Got int64
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("download %s: %d bytes or more, more than the %d bytes allowed", e.URL, e.Got, e.Limit)
}

// Fetch downloads url into dst, resuming a previous attempt at the same URL.
func (f *HTTPFetcher) Fetch(ctx context.Context, url, dst string, limit int64, progress func(done, total int64)) error {
	every := f.CheckpointEvery
	if every <= 0 {
		every = 4 << 20
	}
	maxSize := f.MaxSize
	if maxSize <= 0 {
		maxSize = 4 << 30
	}
	if limit > 0 {
		maxSize = min(maxSize, limit)
	}
	progPath := dst + ".progress"
	p := readProgress(progPath)
	if p.URL != url {
		p = FetchProgress{URL: url}
	}
	if p.Done {
		return nil
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	if fi, err := out.Stat(); err != nil {
		return err
	} else if fi.Size() < p.Offset { // the file lost what the checkpoint says it kept
		p.Offset = 0
	}
	if err := out.Truncate(p.Offset); err != nil {
		return err
	}
	// The link dropped after the last byte was made durable but before
	// the end of the answer was seen: with the length known (signed
	// metadata), nothing is left to ask for (a Range from the end would be
	// refused, 416). More than that length: start over.
	if limit > 0 && p.Offset >= limit && p.Offset > 0 {
		if p.Offset == limit {
			return f.finish(out, progPath, p)
		}
		p.Offset = 0
		if err := out.Truncate(0); err != nil {
			return err
		}
	}
	resp, err := GetFrom(ctx, f.client(), url, p.Offset)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && p.Offset > 0:
		// Asked from past the end: without a signed length, the bytes are
		// all here when the server says the resource is as long as what
		// was kept ("bytes */N"); otherwise (with a signed length, a
		// resource shorter than it) what was kept does not belong, and the
		// next attempt starts over.
		if n, ok := UnsatisfiedLength(resp.Header.Get("Content-Range")); ok && limit <= 0 && n == p.Offset && n <= maxSize {
			return f.finish(out, progPath, p)
		}
		if err := out.Truncate(0); err != nil {
			return err
		}
		if err := writeProgress(progPath, FetchProgress{URL: url}); err != nil {
			return err
		}
		return fmt.Errorf("download %s: %s from byte %d: starting over", url, resp.Status, p.Offset)
	case resp.StatusCode == http.StatusPartialContent && p.Offset > 0:
	case resp.StatusCode == http.StatusOK:
		if p.Offset > 0 {
			// The server ignored the range: start over.
			p.Offset = 0
			if err := out.Truncate(0); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("download %s: %s", url, resp.Status)
	}
	total := int64(-1)
	if resp.ContentLength >= 0 {
		total = p.Offset + resp.ContentLength
		if total > maxSize {
			return &TooLargeError{URL: url, Limit: maxSize, Got: total}
		}
	}
	buf := make([]byte, 256<<10)
	next := p.Offset + every
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if p.Offset+int64(n) > maxSize {
				return &TooLargeError{URL: url, Limit: maxSize, Got: p.Offset + int64(n)}
			}
			if _, err := out.WriteAt(buf[:n], p.Offset); err != nil {
				return err
			}
			p.Offset += int64(n)
			if progress != nil {
				progress(p.Offset, total)
			}
			if p.Offset >= next {
				if err := out.Sync(); err != nil {
					return err
				}
				if err := writeProgress(progPath, p); err != nil {
					return err
				}
				next = p.Offset + every
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			out.Sync()
			writeProgress(progPath, p)
			return fmt.Errorf("download %s interrupted at %d bytes: %w", url, p.Offset, rerr)
		}
	}
	if total >= 0 && p.Offset != total {
		return fmt.Errorf("download %s: got %d of %d bytes", url, p.Offset, total)
	}
	return f.finish(out, progPath, p)
}

// finish makes a whole download durable and records it done.
func (f *HTTPFetcher) finish(out *os.File, progPath string, p FetchProgress) error {
	if err := out.Sync(); err != nil {
		return err
	}
	p.Done = true
	return writeProgress(progPath, p)
}

// UnsatisfiedLength reads the length from a 416 answer's Content-Range,
// "bytes */N" (RFC 9110 14.4).
func UnsatisfiedLength(cr string) (int64, bool) {
	v, ok := strings.CutPrefix(cr, "bytes */")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil && n >= 0
}
