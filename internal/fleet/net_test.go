package fleet

import (
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The simulator's request bound holds: with 2 slots, 12 requests at once
// reach the server at most 2 at a time, every one is answered, and a slot
// comes back whether the body is read to its end or only closed.
func TestBoundedTransport(t *testing.T) {
	var now, peak atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := now.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		time.Sleep(20 * time.Millisecond)
		now.Add(-1)
		w.Write([]byte("answer"))
	}))
	defer srv.Close()
	sem := make(chan struct{}, 2)
	c := &http.Client{Transport: &boundedTransport{rt: http.DefaultTransport, sem: sem}}
	var wg sync.WaitGroup
	var answered atomic.Int64
	for i := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := c.Get(srv.URL)
			if err != nil {
				t.Error(err)
				return
			}
			if i%2 == 0 {
				if b, _ := io.ReadAll(resp.Body); string(b) == "answer" {
					answered.Add(1)
				}
			} else {
				answered.Add(1)
			}
			resp.Body.Close()
		}()
	}
	wg.Wait()
	if answered.Load() != 12 || peak.Load() > 2 || peak.Load() < 1 {
		t.Fatalf("%d answered, at most %d at once (bound 2)", answered.Load(), peak.Load())
	}
	if len(sem) != 0 {
		t.Fatalf("%d slots still held after every body was closed", len(sem))
	}
	c.CloseIdleConnections()
}
