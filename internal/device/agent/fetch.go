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
	fi, err := out.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < p.Offset || limit > 0 && p.Offset > limit {
		p.Offset = 0 // lost what the checkpoint says was kept, or more than the signed length: start over
	}
	if err := out.Truncate(p.Offset); err != nil {
		return err
	}
	if limit > 0 && p.Offset == limit {
		// Every byte kept: the link dropped after the last one, before
		// the end of the answer was seen. Nothing is left to ask for (a
		// Range from the end would be refused, 416).
		return f.finish(out, progPath, p)
	}
	resp, err := GetFrom(ctx, f.client(), url, p.Offset)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && p.Offset > 0:
		if KeptWhole(resp, p.Offset, limit) {
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

// KeptWhole says what a 416 answer to a download resumed from byte kept
// means: true when every byte is already there, which only the server
// can say, without a signed length (limit <= 0), by naming the resource's
// length as kept ("bytes */N", RFC 9110 14.4). Otherwise (with a signed
// length, whose every byte kept is finished before asking, or another
// length, or none) what was kept does not belong, and the download must
// start over.
func KeptWhole(resp *http.Response, kept, limit int64) bool {
	v, ok := strings.CutPrefix(resp.Header.Get("Content-Range"), "bytes */")
	if !ok || limit > 0 {
		return false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return err == nil && n == kept
}
