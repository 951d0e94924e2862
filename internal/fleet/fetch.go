package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

// fetcher is the agent's Fetcher on a virtual device: it downloads over
// the device's link into the device's file system model, resuming with a
// Range request from the last checkpoint (what survives a power cut), and
// is where downloads get dropped or stalled.
type fetcher struct {
	fs     slot.FS      // the device's file system model
	client *http.Client // the device's link
	stats  *Stats
	faults func() *Faults
	rng    *rand.Rand // the device goroutine's
}

// checkpointEvery is how often a download is made durable.
const checkpointEvery = 256 << 10

func (f *fetcher) Fetch(ctx context.Context, url, dst string, limit int64, progress func(done, total int64)) error {
	fsys := f.fs
	progPath := dst + ".progress"
	var p agent.FetchProgress
	if b, err := fsys.ReadFile(progPath); err == nil {
		json.Unmarshal(b, &p)
	}
	if p.URL != url {
		p = agent.FetchProgress{URL: url}
	}
	if p.Done {
		return nil
	}
	var kept []byte
	if p.Offset > 0 {
		b, err := fsys.ReadFile(dst)
		if err != nil || int64(len(b)) < p.Offset || limit > 0 && p.Offset > limit {
			p.Offset = 0 // lost, or more than the signed length: start over
		} else {
			kept = b[:p.Offset]
		}
	}
	out, err := fsys.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	if _, err := out.Write(kept); err != nil {
		return err
	}
	checkpoint := func() error {
		if err := out.Sync(); err != nil {
			return err
		}
		b, _ := json.Marshal(p)
		return slot.WriteFileAtomic(fsys, progPath, b)
	}
	// As the agent's HTTPFetcher: every byte kept (the link dropped after
	// the last one, before the end of the answer was seen) is a whole
	// download, not a Range past the end.
	if limit > 0 && p.Offset == limit {
		p.Done = true
		return checkpoint()
	}
	if p.Offset > 0 {
		f.stats.resumes.Add(1)
	}
	resp, err := agent.GetFrom(ctx, f.client, url, p.Offset)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && p.Offset > 0:
		if agent.KeptWhole(resp, p.Offset, limit) {
			p.Done = true
			return checkpoint()
		}
		p = agent.FetchProgress{URL: url}
		if err := checkpoint(); err != nil {
			return err
		}
		return fmt.Errorf("download %s: %s: starting over", url, resp.Status)
	case resp.StatusCode == http.StatusPartialContent && p.Offset > 0:
	case resp.StatusCode == http.StatusOK:
		if p.Offset > 0 {
			return errors.New("the server ignored the range: starting over")
		}
	case resp.StatusCode == http.StatusServiceUnavailable:
		// The server's downloads are at their bound: wait what it asks
		// (real time, like any Retry-After here), then the agent retries.
		secs, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
		if err := sleep(ctx, time.Duration(max(secs, 1))*time.Second); err != nil {
			return err
		}
		return fmt.Errorf("download %s: %s", url, resp.Status)
	default:
		return fmt.Errorf("download %s: %s", url, resp.Status)
	}
	total := int64(-1)
	if resp.ContentLength >= 0 {
		total = p.Offset + resp.ContentLength
		if limit > 0 && total > limit {
			return &agent.TooLargeError{URL: url, Limit: limit, Got: total}
		}
	}
	// Faults planned for this transfer, at a random point of what is left.
	fl := f.faults()
	dropAt, stallAt := int64(-1), int64(-1)
	if left := total - p.Offset; left > 0 {
		if pct(f.rng, fl.Drop) {
			dropAt = p.Offset + f.rng.Int64N(left)
		}
		if pct(f.rng, fl.Stall) {
			stallAt = p.Offset + f.rng.Int64N(left)
		}
	}
	buf := make([]byte, 32<<10)
	next := p.Offset + checkpointEvery
	for {
		if dropAt >= 0 && p.Offset >= dropAt {
			f.stats.drops.Add(1)
			resp.Body.Close() // mid-body: the connection goes
			checkpoint()
			return fmt.Errorf("download %s interrupted at %d bytes: connection reset (simulated link drop)", url, p.Offset)
		}
		if stallAt >= 0 && p.Offset >= stallAt {
			stallAt = -1
			f.stats.stalls.Add(1)
			if err := sleep(ctx, fl.StallFor); err != nil {
				return err
			}
		}
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if limit > 0 && p.Offset+int64(n) > limit {
				return &agent.TooLargeError{URL: url, Limit: limit, Got: p.Offset + int64(n)}
			}
			if _, err := out.Write(buf[:n]); err != nil {
				return err
			}
			p.Offset += int64(n)
			f.stats.received.Add(int64(n))
			if progress != nil {
				progress(p.Offset, total)
			}
			if p.Offset >= next {
				if err := checkpoint(); err != nil {
					return err
				}
				next = p.Offset + checkpointEvery
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			checkpoint()
			return fmt.Errorf("download %s interrupted at %d bytes: %w", url, p.Offset, rerr)
		}
	}
	if total >= 0 && p.Offset != total {
		return fmt.Errorf("download %s: got %d of %d bytes", url, p.Offset, total)
	}
	p.Done = true
	return checkpoint()
}

// noLink is the transport of a device that has no link (not enrolled).
type noLink struct{}

func (noLink) RoundTrip(*http.Request) (*http.Response, error) {
	return nil, errors.New("the device has no link to the server")
}
