package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

type busyErr struct{ d time.Duration }

func (b busyErr) Error() string        { return "busy" }
func (b busyErr) Retry() time.Duration { return b.d }

// fakeServer answers check-ins from a script.
type fakeServer struct {
	answers []error
	checks  int
	reports []proto.Report
}

func (f *fakeServer) CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error) {
	f.checks++
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if len(f.answers) > 0 {
		err := f.answers[0]
		f.answers = f.answers[1:]
		if err != nil {
			return nil, err
		}
	}
	return &proto.CheckInResponse{NextPollSeconds: 60}, nil
}

func (f *fakeServer) Report(ctx context.Context, r proto.Report) error {
	f.reports = append(f.reports, r)
	return nil
}

func (f *fakeServer) URL(p string) string { return "https://server.invalid" + p }

// The daemon waits what a 503 asks, backs off exponentially on errors, and
// polls at the server's interval otherwise, each with at most 10% jitter.
func TestDaemonBacksOff(t *testing.T) {
	r, _, _ := testRunner(t)
	srv := &fakeServer{answers: []error{busyErr{7 * time.Second}, busyErr{7 * time.Second}, errors.New("connection refused"), errors.New("connection refused"), nil}}
	var waits []time.Duration
	ctx, cancel := context.WithCancel(context.Background())
	r.Sleep = func(ctx context.Context, d time.Duration) error {
		waits = append(waits, d)
		if len(waits) == 5 {
			cancel()
			return ctx.Err()
		}
		return nil
	}
	if err := r.Daemon(ctx, srv); !errors.Is(err, context.Canceled) {
		t.Fatalf("daemon: %v", err)
	}
	want := []time.Duration{7 * time.Second, 7 * time.Second, 2 * time.Second, 4 * time.Second, 60 * time.Second}
	for i, w := range want {
		if waits[i] < w || waits[i] > w+w/10 {
			t.Errorf("wait %d = %v, want %v plus at most 10%%", i, waits[i], w)
		}
	}
	if srv.checks != 5 {
		t.Errorf("%d check-ins", srv.checks)
	}
}
