package notify

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/deviceapi"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// fleet is a store with three devices, each offered an update, the
// server's status handling on it, and either broker.
type fleet struct {
	t       *testing.T
	dir     string
	ca      *pki.CA
	st      *store.Store
	updates map[string]string // device -> its update ID
	reports *Reports
	checks  *CheckIns // answered by the real device API on st

	mu      sync.Mutex
	refused map[string]int // reason -> count

	broker *Broker // embedded
	client *Client // external
	mosq   *testenv.Mosquitto
	up     chan struct{}
	port   string
}

var fleetDevices = []string{"lock-1", "lock-2", "lock-3"}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	ca, _, err := pki.LoadOrCreateCA(filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ca.LoadOrCreateServerCert(filepath.Join(dir, "pki"), []string{"127.0.0.1", "localhost"}); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(ctx, filepath.Join(dir, "fieldpatch.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fleet{t: t, dir: dir, ca: ca, st: st, updates: map[string]string{}, refused: map[string]int{}, up: make(chan struct{}, 16)}
	for _, id := range fleetDevices {
		if err := st.AddDevice(ctx, id, []string{"lab"}); err != nil {
			t.Fatal(err)
		}
		if err := st.CheckIn(ctx, id, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.AddRelease(ctx, store.Release{ID: "lock-2.0.0", Version: "2.0.0", HWClass: "lock", SecurityCounter: 2, SHA256: strings.Repeat("ab", 32), Length: 1000}); err != nil {
		t.Fatal(err)
	}
	if err := st.Assign(ctx, "r1", "lock-2.0.0", "group", "lab", false); err != nil {
		t.Fatal(err)
	}
	for i, id := range fleetDevices {
		u, _, _, err := st.Offer(ctx, id, func() string { return fmt.Sprintf("upd-%d", i+1) })
		if err != nil || u == nil {
			t.Fatalf("offer to %s: %v %v", id, u, err)
		}
		f.updates[id] = u.ID
	}
	f.reports = &Reports{
		Record:   st.RecordReport,
		NoUpdate: store.ErrNotFound,
		Allowed:  func(id string) bool { return st.Active(context.Background(), id) == nil },
		Refused: func(reason string) {
			f.mu.Lock()
			f.refused[reason]++
			f.mu.Unlock()
		},
	}
	f.checks = &CheckIns{
		Handler: (&deviceapi.API{Store: st, PollInterval: time.Hour}).Handler(),
		Refused: func(reason string) {
			f.mu.Lock()
			f.refused["checkin:"+reason]++
			f.mu.Unlock()
		},
	}
	return f
}

func (f *fleet) refusals(reason string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refused[reason]
}

// embedded starts the embedded broker with status reports and check-ins on.
func (f *fleet) embedded() {
	cert, err := tls.LoadX509KeyPair(filepath.Join(f.dir, "pki", "server.pem"), filepath.Join(f.dir, "pki", "server.key.pem"))
	if err != nil {
		f.t.Fatal(err)
	}
	b, err := Listen("127.0.0.1:0", Config{TLS: &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: f.ca.Pool()},
		Allowed: f.reports.Allowed, Reports: f.reports, CheckIns: f.checks})
	if err != nil {
		f.t.Fatal(err)
	}
	if err := b.Serve(); err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { b.Close() })
	f.broker = b
	_, f.port, _ = strings.Cut(b.Addr().String(), ":")
}

// external starts Mosquitto, configured as docs/OPERATIONS.md says, and
// the server's client of it, and waits until that is connected.
func (f *fleet) external() {
	pkiDir := filepath.Join(f.dir, "pki")
	f.mosq = testenv.StartMosquitto(f.t, filepath.Join(pkiDir, "ca.pem"), filepath.Join(pkiDir, "server.pem"), filepath.Join(pkiDir, "server.key.pem"))
	f.port = strconv.Itoa(f.mosq.Port)
	c, err := NewClient(ClientConfig{Broker: f.mosq.URL, CA: f.ca, Reports: f.reports, CheckIns: f.checks, MaxRetry: time.Second,
		Up: func() { f.up <- struct{}{} }})
	if err != nil {
		f.t.Fatal(err)
	}
	c.Start()
	f.t.Cleanup(func() { c.Close() })
	f.client = c
	f.waitUp()
}

func (f *fleet) waitUp() {
	f.t.Helper()
	select {
	case <-f.up:
	case <-time.After(20 * time.Second):
		f.t.Fatalf("the server did not connect to mosquitto: %s", f.mosq.Log())
	}
}

func (f *fleet) notify(ids ...string) error {
	if f.client != nil {
		return f.client.Notify("update", ids...)
	}
	return f.broker.Notify("update", ids...)
}

// device writes a device's key and certificate for the mosquitto tools and
// returns their connection arguments.
func (f *fleet) device(id string) []string {
	return append(deviceArgs(f.t, f.ca, f.dir, f.port, id), "-i", id)
}

// update is what the store holds on a device's update.
func (f *fleet) update(id string) store.Update {
	f.t.Helper()
	us, err := f.st.Updates(context.Background(), id)
	if err != nil || len(us) != 1 {
		f.t.Fatalf("updates of %s: %+v %v", id, us, err)
	}
	return us[0]
}

// sub is a running mosquitto_sub.
type sub struct {
	out  testenv.Buffer
	done chan error
}

func startSub(t *testing.T, args ...string) *sub {
	t.Helper()
	bin := testenv.Command(t, "mosquitto_sub")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, bin, args...)
	s := &sub{done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = &s.out, &s.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- cmd.Wait() }()
	return s
}

func pub(t *testing.T, args ...string) (string, error) {
	t.Helper()
	bin := testenv.Command(t, "mosquitto_pub")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	return string(out), err
}

// publishUntil publishes (QoS 1) until the subscriber has what it waits
// for (it may not have subscribed yet), within a bound.
func publishUntil(t *testing.T, s *sub, what string, every time.Duration, publish func()) {
	t.Helper()
	deadline := time.After(25 * time.Second)
	tick := time.NewTicker(every)
	defer tick.Stop()
	publish()
	for {
		select {
		case err := <-s.done:
			if err != nil {
				t.Fatalf("%s: mosquitto_sub: %v: %s", what, err, s.out.String())
			}
			return
		case <-tick.C:
			publish()
		case <-deadline:
			t.Fatalf("%s: nothing arrived: %s", what, s.out.String())
		}
	}
}

func report(id, update, status string, progress float64) string {
	b, _ := json.Marshal(proto.Report{ReportID: id, UpdateID: update, Status: status, Progress: progress})
	return string(b)
}

// Devices publish status reports over MQTT (embedded broker, and
// Mosquitto as the external one): a good one is stored and acknowledged
// on fp/dev/ID/ack; malformed ones (garbage, unknown fields, trailing
// data, too large, an invalid status, another device's update, another
// device's topic, a revoked device) store nothing, are counted by reason,
// and the broker goes on serving: the next good report is stored.
func TestStatusReportsOverMQTT(t *testing.T) {
	withEachBroker(t, func(t *testing.T, f *fleet, mode string) {
		lock1, lock2, lock3 := f.device("lock-1"), f.device("lock-2"), f.device("lock-3")
		u1, u2, u3 := f.updates["lock-1"], f.updates["lock-2"], f.updates["lock-3"]

		// A good report: stored, then acknowledged (mosquitto_rr
		// subscribes to the acknowledgements, publishes, and waits).
		if a := request(t, lock1, "lock-1", report("r-dl-25", u1, proto.StatusDownloading, 0.25)); a.ReportID != "r-dl-25" || !a.Stored {
			t.Fatalf("acknowledgement %+v", a)
		}
		if u := f.update("lock-1"); u.Status != proto.StatusDownloading || u.Progress != 0.25 {
			t.Fatalf("after the good report the store has %s %v", u.Status, u.Progress)
		}

		// Bad payloads from lock-1, each refused by the server.
		big := func(n int) string { // a report of more than n bytes
			return fmt.Sprintf(`{"report_id":"r-big","update_id":%q,"status":"installing","reason":%q}`, u1, strings.Repeat("x", n))
		}
		for _, c := range []struct {
			name, payload, reason string
		}{
			{"garbage", "\x00\xffnot json{", RefusedMalformed},
			{"unknown field", `{"report_id":"r-x","update_id":"` + u1 + `","status":"installing","progress_pct":50}`, RefusedMalformed},
			{"trailing data", report("r-y", u1, proto.StatusInstalling, 0) + `{}`, RefusedMalformed},
			{"14 KiB (over the server's cap, under the broker's)", big(14 << 10), RefusedTooLarge},
			{"invalid status", report("r-z", u1, "bricked", 0), RefusedInvalid},
			{"progress out of range", report("r-p", u1, proto.StatusDownloading, 7), RefusedInvalid},
			{"another device's update", report("r-u2", u2, proto.StatusCommitted, 0), RefusedUpdate},
			{"an unknown update", report("r-u9", "upd-99", proto.StatusCommitted, 0), RefusedUpdate},
		} {
			before := f.refusals(c.reason)
			file := filepath.Join(t.TempDir(), "payload")
			os.WriteFile(file, []byte(c.payload), 0o644)
			if out, err := pub(t, append(lock1, "-t", StatusTopic("lock-1"), "-q", "1", "-f", file)...); err != nil {
				t.Errorf("%s: mosquitto_pub: %v %s", c.name, err, out)
			}
			waitFor(t, c.name+" refused ("+c.reason+")", func() bool { return f.refusals(c.reason) > before })
		}
		// Refused before the server sees it: a packet over 16 KiB (the
		// broker ends the connection), and lock-1 writing lock-2's topic.
		file := filepath.Join(t.TempDir(), "big")
		os.WriteFile(file, []byte(big(20<<10)), 0o644)
		if out, err := pub(t, append(lock1, "-t", StatusTopic("lock-1"), "-q", "1", "-f", file)...); err == nil {
			t.Errorf("a 20 KiB message was accepted: %s", out)
		}
		pub(t, append(lock1, "-t", StatusTopic("lock-2"), "-q", "1", "-m", report("r-forged", u2, proto.StatusCommitted, 0))...)
		// A revoked device: the embedded broker refuses it at CONNECT;
		// Mosquitto, which does not know, lets it publish, and the
		// server refuses the report.
		if err := f.st.Revoke(context.Background(), "lock-3"); err != nil {
			t.Fatal(err)
		}
		before := f.refusals(RefusedDevice)
		out, err := pub(t, append(lock3, "-t", StatusTopic("lock-3"), "-q", "1", "-m", report("r-rev", u3, proto.StatusCommitted, 0))...)
		if mode == "embedded" {
			if err == nil {
				t.Errorf("a revoked device published: %s", out)
			}
		} else {
			waitFor(t, "the revoked device's report refused", func() bool { return f.refusals(RefusedDevice) > before })
		}

		// The broker goes on: the next good report is stored and acknowledged.
		if a := request(t, lock1, "lock-1", report("r-inst", u1, proto.StatusInstalling, 0)); a.ReportID != "r-inst" || !a.Stored {
			t.Fatalf("acknowledgement after the bad input %+v", a)
		}
		// A report refused with an ID is answered stored: false.
		if a := request(t, lock1, "lock-1", report("r-other", u2, proto.StatusDownloading, 0.5)); a.ReportID != "r-other" || a.Stored {
			t.Fatalf("answer to a report on another device's update: %+v", a)
		}
		if u := f.update("lock-1"); u.Status != proto.StatusInstalling || u.Progress != 0 {
			t.Errorf("lock-1's update after the bad input: %s %v, want installing (and none of the bad reports)", u.Status, u.Progress)
		}
		for _, id := range []string{"lock-2", "lock-3"} {
			if u := f.update(id); u.Status != store.StatusOffered {
				t.Errorf("%s's update is %s after forged reports, want it untouched", id, u.Status)
			}
		}
		// Nothing a device publishes is retained: a later subscriber to
		// its status topic hears nothing.
		pub(t, append(lock1, "-t", StatusTopic("lock-1"), "-q", "1", "-r", "-m", report("r-ret", u1, proto.StatusInstalling, 0))...)
		later := startSub(t, append(lock1, "-t", StatusTopic("lock-1"), "-q", "1", "-v", "-W", "2")...)
		var ee *exec.ExitError
		if err := <-later.done; !errors.As(err, &ee) || ee.ExitCode() != 27 || strings.Contains(later.out.String(), "r-ret") {
			t.Errorf("a retained status: %v %q, want nothing retained", err, later.out.String())
		}
		// And notifications still reach devices.
		n := startSub(t, append(lock2, "-t", NotifyTopic("lock-2"), "-q", "1", "-C", "1", "-W", "25")...)
		publishUntil(t, n, "a notification", 300*time.Millisecond, func() {
			if err := f.notify("lock-2"); err != nil {
				t.Errorf("notify: %v", err)
			}
		})
	})
}

// withEachBroker runs test on a new fleet with the embedded broker, then
// on another with Mosquitto as the external one.
func withEachBroker(t *testing.T, test func(t *testing.T, f *fleet, mode string)) {
	for _, mode := range []string{"embedded", "external"} {
		t.Run(mode, func(t *testing.T) {
			f := newFleet(t)
			if mode == "embedded" {
				f.embedded()
			} else {
				f.external()
			}
			test(t, f, mode)
		})
	}
}

// request publishes a status report with mosquitto_rr, which subscribes
// to the device's acknowledgements first, and returns the answer.
func request(t *testing.T, conn []string, id, payload string) proto.ReportAck {
	t.Helper()
	return rrJSON[proto.ReportAck](t, conn, StatusTopic(id), AckTopic(id), payload)
}

// rrJSON is rr with the answer decoded as a T.
func rrJSON[T any](t *testing.T, conn []string, topic, answers, payload string) T {
	t.Helper()
	var a T
	if out := rr(t, conn, topic, answers, payload); json.Unmarshal(out, &a) != nil {
		t.Fatalf("mosquitto_rr: the answer on %s is not JSON: %q", answers, out)
	}
	return a
}

// rr publishes payload on topic with mosquitto_rr and returns the first
// message on answers.
func rr(t *testing.T, conn []string, topic, answers, payload string) []byte {
	t.Helper()
	bin := testenv.Command(t, "mosquitto_rr")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, append(conn, "-t", topic, "-e", answers, "-q", "1", "-m", payload, "-W", "20")...).CombinedOutput()
	if err != nil {
		t.Fatalf("mosquitto_rr: %v: %q", err, out)
	}
	return bytes.TrimSpace(out)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Any payload: never a panic; what reaches the store is one valid report,
// and everything else is refused with a reason.
func FuzzStatusPayload(f *testing.F) {
	f.Add([]byte(report("r-1", "u-1", proto.StatusDownloading, 0.5)))
	f.Add([]byte(`{"report_id":"r","update_id":"u","status":"committed","reason":"ok","log_tail":"x","at":"2026-11-29T00:00:00Z"}`))
	f.Add([]byte(`{"report_id":"r","update_id":"u","status":"installing","extra":1}`))
	f.Add([]byte(`{"report_id":"r","update_id":"u","status":"installing"}{}`))
	f.Add([]byte("\x00\xff{"))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, payload []byte) {
		var got *proto.Report
		rs := &Reports{
			Allowed: func(string) bool { return true },
			Record: func(_ context.Context, _ string, r proto.Report) (bool, error) {
				got = &r
				return true, nil
			},
		}
		id, stored, err := rs.Handle(context.Background(), "lock-1", payload)
		if err != nil {
			if got != nil || stored || Reason(err) == "" {
				t.Fatalf("refused (%v) yet recorded %+v, stored %v, reason %q", err, got, stored, Reason(err))
			}
			return
		}
		if got == nil || got.Validate() != nil || got.ReportID != id || len(payload) > MaxStatusBytes {
			t.Fatalf("accepted %q as %+v", payload, got)
		}
	})
}
