package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

// A simulated link that dropped after the last byte, before the end of
// the answer was seen, left every byte and a checkpoint short of done: the
// virtual device then finishes its download (with the signed length
// without a request, without it on the server's 416 "bytes */N") instead
// of failing on a Range past the end, attempt after attempt. A 416 for
// another length starts the download over.
func TestFetchAfterADropAtTheEnd(t *testing.T) {
	content := bytes.Repeat([]byte("fieldpatch"), 30_000)
	var calls atomic.Int32
	var serve atomic.Value
	serve.Store(content)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		http.ServeContent(w, r, "fw.img", time.Time{}, bytes.NewReader(serve.Load().([]byte)))
	}))
	defer srv.Close()
	url := srv.URL + "/fw.img"
	const dst = "/inbox/staging.img"
	newFetcher := func() (*fetcher, slot.FS) {
		fs := slot.NewMemFS()
		// What the dropped transfer left: every byte, not yet done.
		if err := slot.WriteFileAtomic(fs, dst, content); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(agent.FetchProgress{URL: url, Offset: int64(len(content))})
		if err := slot.WriteFileAtomic(fs, dst+".progress", b); err != nil {
			t.Fatal(err)
		}
		return &fetcher{fs: fs, client: srv.Client(), stats: &Stats{}, faults: func() *Faults { return &Faults{} }, rng: rand.New(rand.NewPCG(1, 2))}, fs
	}
	done := func(fs slot.FS, want []byte) {
		t.Helper()
		b, err := fs.ReadFile(dst + ".progress")
		var p agent.FetchProgress
		if err != nil || json.Unmarshal(b, &p) != nil || !p.Done {
			t.Fatalf("progress %s (%v): not done", b, err)
		}
		if got, _ := fs.ReadFile(dst); !bytes.Equal(got, want) {
			t.Fatalf("the staged file has %d bytes, not the %d served", len(got), len(want))
		}
	}

	f, fs := newFetcher()
	if err := f.Fetch(context.Background(), url, dst, int64(len(content)), nil); err != nil {
		t.Fatalf("with the signed length: %v", err)
	}
	if calls.Load() != 0 {
		t.Errorf("%d requests for a download whose every byte was kept", calls.Load())
	}
	done(fs, content)

	f, fs = newFetcher()
	if err := f.Fetch(context.Background(), url, dst, 0, nil); err != nil {
		t.Fatalf("without a signed length: %v", err)
	}
	done(fs, content)

	// A signed length longer than what the server has: what was kept is
	// not the signed image, and the download starts over.
	f, _ = newFetcher()
	if err := f.Fetch(context.Background(), url, dst, int64(len(content))+100, nil); err == nil || !strings.Contains(err.Error(), "starting over") {
		t.Fatalf("a 416 short of the signed length: %v", err)
	}

	f, fs = newFetcher()
	serve.Store(content[:100_000])
	if err := f.Fetch(context.Background(), url, dst, 0, nil); err == nil || !strings.Contains(err.Error(), "starting over") {
		t.Fatalf("a 416 for another length: %v", err)
	}
	if err := f.Fetch(context.Background(), url, dst, 0, nil); err != nil {
		t.Fatalf("the attempt after: %v", err)
	}
	done(fs, content[:100_000])
}
