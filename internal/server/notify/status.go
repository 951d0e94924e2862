package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// StatusTopic is where a device publishes its status reports (a JSON
// proto.Report, as for POST /api/v1/reports).
func StatusTopic(deviceID string) string { return TopicPrefix + deviceID + "/status" }

// AckTopic is where the server answers a status report with a
// proto.ReportAck: stored true once the report is in the database, false
// when it was refused.
func AckTopic(deviceID string) string { return TopicPrefix + deviceID + "/ack" }

// StatusFilter is the server's subscription to every device's status.
const StatusFilter = TopicPrefix + "+/status"

// MaxStatusBytes is the largest status payload the server takes (a
// progress report is about 200 bytes; outcomes with their log tail go
// over HTTPS).
const MaxStatusBytes = 12 << 10

// Refusal reasons, the label of the rejected-status metric.
const (
	RefusedTooLarge  = "too_large"   // over MaxStatusBytes
	RefusedMalformed = "malformed"   // not one JSON report: bad JSON, unknown fields, trailing data
	RefusedInvalid   = "invalid"     // proto.Report.Validate failed
	RefusedTopic     = "topic"       // not fp/dev/ID/status, or ID is not the publisher
	RefusedDevice    = "device"      // revoked or unknown device
	RefusedUpdate    = "update"      // no such update for this device (another device's, or none)
	RefusedBusy      = "busy"        // the queue of reports to store is full
	RefusedStore     = "store_error" // the database failed; the device sends it again over HTTPS
)

// Reports is what the server does with the status reports devices publish.
type Reports struct {
	// Record stores a report of deviceID's, as the device API does
	// (Store.RecordReport): stored is false for a report already stored;
	// an error wrapping ErrNoUpdate means the update is not the device's.
	Record func(ctx context.Context, deviceID string, r proto.Report) (stored bool, err error)
	// NoUpdate is the error Record returns (wrapped) for an update that
	// is not the device's (store.ErrNotFound).
	NoUpdate error
	// Allowed says whether the device may report (false for revoked or
	// unknown devices).
	Allowed func(deviceID string) bool
	// Stored hears of every report newly stored (for metrics); Refused of
	// every status refused, with one of the Refused* reasons.
	Stored  func(status string)
	Refused func(reason string)
	Log     *slog.Logger
}

// ErrRefused wraps every refusal of a status report.
var ErrRefused = errors.New("status report refused")

type refusal struct {
	reason string
	err    error
}

func (r *refusal) Error() string            { return fmt.Sprintf("%s (%s): %v", ErrRefused, r.reason, r.err) }
func (r *refusal) Unwrap() []error          { return []error{ErrRefused, r.err} }
func refuse(reason string, err error) error { return &refusal{reason: reason, err: err} }

// Reason is the refusal reason an error from Handle carries ("" if none).
func Reason(err error) string {
	var r *refusal
	if errors.As(err, &r) {
		return r.reason
	}
	return ""
}

// Handle checks one status payload of deviceID's and stores it: at most
// MaxStatusBytes, exactly one JSON report with no unknown field, valid,
// from a device that is allowed, on one of its own updates. It returns the
// report's ID when it has one (to acknowledge) and a refusal or store
// error; nothing is stored unless the error is nil.
func (rs *Reports) Handle(ctx context.Context, deviceID string, payload []byte) (reportID string, stored bool, err error) {
	if len(payload) > MaxStatusBytes {
		return "", false, refuse(RefusedTooLarge, fmt.Errorf("%d bytes, at most %d", len(payload), MaxStatusBytes))
	}
	var r proto.Report
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return "", false, refuse(RefusedMalformed, err)
	}
	if dec.More() {
		return "", false, refuse(RefusedMalformed, errors.New("more than one JSON value"))
	}
	if proto.ValidID("report_id", r.ReportID) == nil {
		reportID = r.ReportID
	}
	if err := r.Validate(); err != nil {
		return reportID, false, refuse(RefusedInvalid, err)
	}
	if !rs.Allowed(deviceID) {
		return reportID, false, refuse(RefusedDevice, fmt.Errorf("device %s is revoked or unknown", deviceID))
	}
	stored, err = rs.Record(ctx, deviceID, r)
	if err != nil {
		if rs.NoUpdate != nil && errors.Is(err, rs.NoUpdate) {
			return reportID, false, refuse(RefusedUpdate, err)
		}
		return reportID, false, refuse(RefusedStore, err)
	}
	rs.log().Info("report", "device", deviceID, "update", r.UpdateID, "status", r.Status, "new", stored, "via", "mqtt")
	if stored && rs.Stored != nil {
		rs.Stored(r.Status)
	}
	return reportID, stored, nil
}

func (rs *Reports) log() *slog.Logger {
	if rs.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return rs.Log
}

// DeviceFromTopic is the device ID in fp/dev/ID/LEAF ("" for any other
// topic).
func DeviceFromTopic(topic, leaf string) string {
	rest, ok := strings.CutPrefix(topic, TopicPrefix)
	if !ok {
		return ""
	}
	id, ok := strings.CutSuffix(rest, "/"+leaf)
	if !ok || proto.ValidID("device", id) != nil {
		return ""
	}
	return id
}

// queue hands what devices publish to a few workers, so a broker's
// network loop never waits for the database. put never blocks.
type queue[T any] struct {
	in   chan T
	wg   sync.WaitGroup
	once sync.Once
	mu   sync.RWMutex // held for reading while putting, for writing to close
	done bool
}

// Errors of queue.put.
var (
	errQueueFull   = errors.New("queue full")
	errQueueClosed = errors.New("queue closed")
)

func newQueue[T any](depth, workers int, handle func(T)) *queue[T] {
	q := &queue[T]{in: make(chan T, depth)}
	for range workers {
		q.wg.Add(1)
		go func() {
			defer q.wg.Done()
			for m := range q.in {
				handle(m)
			}
		}()
	}
	return q
}

// put queues m, or says the queue is full or closed.
func (q *queue[T]) put(m T) error {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.done {
		return errQueueClosed
	}
	select {
	case q.in <- m:
		return nil
	default:
		return errQueueFull
	}
}

// close stops taking messages and waits for those queued to be handled.
func (q *queue[T]) close() {
	q.once.Do(func() {
		q.mu.Lock()
		q.done = true
		close(q.in)
		q.mu.Unlock()
		q.wg.Wait()
	})
}

// statusQueue stores status reports; when its queue is full a report is
// refused (unacknowledged: the device sends it over HTTPS).
type statusQueue struct {
	rs  *Reports
	ack func(deviceID string, payload []byte)
	q   *queue[statusMsg]
}

type statusMsg struct {
	deviceID string
	payload  []byte
}

// Status queue sizes: reports waiting to be stored, and how many are
// stored at once (SQLite takes one writer at a time anyway).
const (
	statusQueueDepth = 1024
	statusWorkers    = 4
	statusTimeout    = 30 * time.Second
)

func newStatusQueue(rs *Reports, ack func(deviceID string, payload []byte)) *statusQueue {
	sq := &statusQueue{rs: rs, ack: ack}
	sq.q = newQueue(statusQueueDepth, statusWorkers, sq.handle)
	return sq
}

// offer queues a payload a device published on its status topic. It never
// blocks.
func (q *statusQueue) offer(deviceID string, payload []byte) {
	if len(payload) > MaxStatusBytes { // refused before it takes room
		q.refused(deviceID, "", refuse(RefusedTooLarge, fmt.Errorf("%d bytes, at most %d", len(payload), MaxStatusBytes)))
		return
	}
	if err := q.q.put(statusMsg{deviceID: deviceID, payload: bytes.Clone(payload)}); errors.Is(err, errQueueFull) {
		q.refused(deviceID, "", refuse(RefusedBusy, errors.New("too many reports waiting to be stored")))
	}
}

func (q *statusQueue) handle(m statusMsg) {
	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
	id, _, err := q.rs.Handle(ctx, m.deviceID, m.payload)
	cancel()
	if err != nil {
		q.refused(m.deviceID, id, err)
		return
	}
	a, _ := json.Marshal(proto.ReportAck{ReportID: id, Stored: true})
	q.ack(m.deviceID, a)
}

// refused logs and counts a refusal and, when the report had an ID, says
// so to the device (it then sends the report over HTTPS, which answers
// with the reason).
func (q *statusQueue) refused(deviceID, reportID string, err error) {
	reason := Reason(err)
	q.rs.log().Warn("mqtt: status report refused", "device", deviceID, "report", reportID, "reason", reason, "err", err)
	if q.rs.Refused != nil {
		q.rs.Refused(reason)
	}
	if reportID != "" {
		a, _ := json.Marshal(proto.ReportAck{ReportID: reportID, Stored: false})
		q.ack(deviceID, a)
	}
}

// close stops taking reports and waits for those queued to be stored.
func (q *statusQueue) close() { q.q.close() }
