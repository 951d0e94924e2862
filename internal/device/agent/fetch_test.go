package agent

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A download cut off mid-way resumes with a Range request from the last
// durable checkpoint, and the file ends up whole.
func TestFetchResumes(t *testing.T) {
	content := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	var calls atomic.Int32
	var ranges []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/fw.img" {
			http.NotFound(w, r)
			return
		}
		n := calls.Add(1)
		ranges = append(ranges, r.Header.Get("Range"))
		if n == 1 {
			// Send 600 KiB and drop the connection.
			w.Header().Set("Content-Length", "1048576")
			w.WriteHeader(http.StatusOK)
			w.Write(content[:600<<10])
			hj, _ := w.(http.Hijacker)
			conn, _, _ := hj.Hijack()
			conn.Close()
			return
		}
		http.ServeContent(w, r, "fw.img", time.Time{}, bytes.NewReader(content))
	}))
	defer srv.Close()
	dst := filepath.Join(t.TempDir(), "staging.img")
	f := &HTTPFetcher{CheckpointEvery: 256 << 10}
	err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, 0, nil)
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Fatalf("first fetch: %v", err)
	}
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, 0, nil); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, content) {
		t.Fatalf("downloaded %d bytes, differing from the %d served", len(got), len(content))
	}
	if len(ranges) != 2 || !strings.HasPrefix(ranges[1], "bytes=") || ranges[1] == "bytes=0-" {
		t.Fatalf("second request's range %q: the download did not resume", ranges)
	}
	// Done: a third fetch of the same URL does nothing.
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, 0, nil); err != nil || calls.Load() != 2 {
		t.Fatalf("fetch after completion: %v, %d calls", err, calls.Load())
	}
	// A server that refuses: a clear error naming the status.
	if err := f.Fetch(context.Background(), srv.URL+"/missing", filepath.Join(t.TempDir(), "x"), 0, nil); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("missing file: %v", err)
	}
}

// A download larger than allowed is refused (endless data).
func TestFetchRefusesEndlessData(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i < 100; i++ {
			w.Write(make([]byte, 64<<10))
		}
	}))
	defer srv.Close()
	f := &HTTPFetcher{MaxSize: 1 << 20}
	err := f.Fetch(context.Background(), srv.URL, filepath.Join(t.TempDir(), "x"), 0, nil)
	if err == nil || !strings.Contains(err.Error(), "allowed") {
		t.Fatalf("endless download: %v", err)
	}
	// The length signed metadata gives is a limit too.
	err = (&HTTPFetcher{}).Fetch(context.Background(), srv.URL, filepath.Join(t.TempDir(), "y"), 100<<10, nil)
	if err == nil || !strings.Contains(err.Error(), "more than the 102400 bytes allowed") {
		t.Fatalf("download past the signed length: %v", err)
	}
}

// A link that drops after the last byte, before the end of the answer is
// seen, leaves every byte durable: the next attempt finishes the download
// instead of asking for a range past the end (416) again and again. With
// the length signed (limit), it asks for nothing; without, the server's
// 416 "bytes */N" says the file is whole. A 416 naming another length
// means what was kept does not belong: the attempt after starts over.
func TestFetchFinishesWhenTheLinkDropsAtTheEnd(t *testing.T) {
	content := bytes.Repeat([]byte("fieldpatch"), 50_000) // 500,000 bytes
	var calls atomic.Int32
	var serve atomic.Value // []byte, the resource now
	serve.Store(content)
	var dropNext atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		b := serve.Load().([]byte)
		if dropNext.CompareAndSwap(true, false) {
			// Every byte, chunked, then the connection drops before the
			// last chunk: the client reads all of it and then an error.
			w.WriteHeader(http.StatusOK)
			w.Write(b)
			w.(http.Flusher).Flush()
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
			return
		}
		http.ServeContent(w, r, "fw.img", time.Time{}, bytes.NewReader(b))
	}))
	defer srv.Close()
	f := &HTTPFetcher{CheckpointEvery: 64 << 10}
	fetchCut := func(dst string, limit int64) {
		t.Helper()
		dropNext.Store(true)
		if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, limit, nil); err == nil || !strings.Contains(err.Error(), "interrupted at 500000 bytes") {
			t.Fatalf("the cut fetch: %v", err)
		}
	}
	whole := func(dst string) {
		t.Helper()
		if got, _ := os.ReadFile(dst); !bytes.Equal(got, serve.Load().([]byte)) {
			t.Fatalf("%s: %d bytes, not the %d served", dst, len(got), len(serve.Load().([]byte)))
		}
	}

	// No length known: the server's 416 says the file is whole.
	dst := filepath.Join(t.TempDir(), "staging.img")
	fetchCut(dst, 0)
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, 0, nil); err != nil {
		t.Fatalf("after the cut, without a signed length: %v", err)
	}
	whole(dst)

	// The length signed: no request at all.
	dst = filepath.Join(t.TempDir(), "staging.img")
	fetchCut(dst, int64(len(content)))
	before := calls.Load()
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, int64(len(content)), nil); err != nil {
		t.Fatalf("after the cut, with the signed length: %v", err)
	}
	if n := calls.Load() - before; n != 0 {
		t.Errorf("%d requests to finish a download whose every byte was kept", n)
	}
	whole(dst)

	// The server serves fewer bytes than the signed length: what was kept
	// is not the signed image, and the next attempt starts over rather
	// than finish it (verification would refuse it for good).
	dst = filepath.Join(t.TempDir(), "staging.img")
	fetchCut(dst, int64(len(content))+100)
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, int64(len(content))+100, nil); err == nil || !strings.Contains(err.Error(), "starting over") {
		t.Fatalf("a 416 short of the signed length: %v", err)
	}

	// The staging file lost bytes the checkpoint says it kept: the
	// download starts over instead of padding it with zeros.
	dst = filepath.Join(t.TempDir(), "staging.img")
	fetchCut(dst, 0)
	if err := os.Truncate(dst, 1000); err != nil {
		t.Fatal(err)
	}
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, int64(len(content)), nil); err != nil {
		t.Fatalf("after the staging file lost bytes: %v", err)
	}
	whole(dst)

	// The resource is shorter than what was kept: 416 "bytes */250000",
	// then the next attempt starts over.
	dst = filepath.Join(t.TempDir(), "staging.img")
	fetchCut(dst, 0)
	serve.Store(content[:250_000])
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, 0, nil); err == nil || !strings.Contains(err.Error(), "starting over") {
		t.Fatalf("a 416 for another length: %v", err)
	}
	if err := f.Fetch(context.Background(), srv.URL+"/fw.img", dst, 0, nil); err != nil {
		t.Fatalf("the attempt after the 416: %v", err)
	}
	whole(dst)
}
