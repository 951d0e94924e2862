package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/deviceapi"
)

// CheckInTopic is where a device publishes its check-ins (a JSON
// proto.MQTTCheckIn) while its session is up.
func CheckInTopic(deviceID string) string { return TopicPrefix + deviceID + "/checkin" }

// AnswerTopic is where the server answers them (a proto.MQTTAnswer).
func AnswerTopic(deviceID string) string { return TopicPrefix + deviceID + "/answer" }

// answerQoS is the QoS of answers (and of the agent's check-ins): 0, since
// the answer is the acknowledgement, and a check-in or answer lost with its
// connection sends the device to HTTPS after its timeout.
const answerQoS = 0

// CheckInFilter is the server's subscription to every device's check-ins.
const CheckInFilter = TopicPrefix + "+/checkin"

// MaxCheckInBytes is the largest check-in payload the server takes over
// MQTT.
const MaxCheckInBytes = proto.MaxMQTTCheckInBytes

// Check-in queue sizes. A rollout's notification makes every connected
// device of its phase check in at once, so the queue holds a large
// fleet's worth; the workers are many because each waits for a group
// commit (the store commits the check-ins of all waiting workers in one
// transaction), and fewer than the device API's in-flight bound, so
// HTTPS keeps room. Past the queue, a check-in is answered 503.
const (
	checkInQueueDepth = 32 << 10
	checkInWorkers    = 128
	checkInRetryAfter = 5 // seconds, when the queue is full
	// checkInMaxWait is how long a check-in may wait in the queue: past
	// it, it is answered 503 before the device (which waits 10 s for an
	// answer) gives up on MQTT.
	checkInMaxWait = 8 * time.Second
)

// CheckIns answers the check-ins devices publish over MQTT with the device
// API itself, called in process for the device the broker authenticated:
// the same validation, authorisation, load bounds and answers as over
// HTTPS, without a TLS handshake and an HTTP exchange per check-in.
type CheckIns struct {
	// Handler is the device API's handler.
	Handler http.Handler
	// Refused hears of every check-in dropped or answered without reaching
	// the device API, with a reason (too_large, malformed, busy, topic).
	Refused func(reason string)
	Log     *slog.Logger
}

func (ci *CheckIns) log() *slog.Logger {
	if ci.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return ci.Log
}

// checkInQueue answers check-ins on workers.
type checkInQueue struct {
	ci     *CheckIns
	answer func(deviceID string, payload []byte)
	q      *queue[checkInMsg]

	mu      sync.Mutex
	waiting map[string]bool // devices with a check-in queued or being answered

	// fanOut holds the workers back while notifications go out (notifyEach).
	fanOut fanOut
}

// fanOutHold is the longest a worker waits for notifications to go out
// before it answers a check-in anyway (a notifier stuck on a stalled
// external broker must not stop the answers). A variable for tests.
var fanOutHold = 2 * time.Second

// fanOut holds the check-in workers back while notifications go out: a
// rollout's notification makes every device of its phase check in at
// once, and the first devices notified would otherwise take the CPU from
// the notification of the rest (bench/mqtt: 10,000 notifications went out
// in 0.9 s with the check-ins answered meanwhile). What the devices
// publish is still read and queued meanwhile.
type fanOut struct {
	serial sync.Mutex                    // one notification round at a time
	done   atomic.Pointer[chan struct{}] // closed when the round ends; nil between rounds
}

// notifyEach publishes to each valid device ID in ids with the workers
// held back (for at most fanOutHold each); on a nil queue (no check-ins
// over MQTT) it just publishes. Both brokers' Notify go through it.
func (q *checkInQueue) notifyEach(ids []string, publish func(deviceID string)) {
	each := func() {
		for _, id := range ids {
			if proto.ValidID("device", id) == nil {
				publish(id)
			}
		}
	}
	if q == nil {
		each()
		return
	}
	f := &q.fanOut
	f.serial.Lock()
	defer f.serial.Unlock()
	done := make(chan struct{})
	f.done.Store(&done)
	defer func() {
		f.done.Store(nil)
		close(done)
	}()
	each()
}

// wait returns once no notification round is under way, or after at most
// hold.
func (f *fanOut) wait(hold time.Duration) {
	done := f.done.Load()
	if done == nil {
		return
	}
	t := time.NewTimer(hold)
	defer t.Stop()
	select {
	case <-*done:
	case <-t.C:
	}
}

type checkInMsg struct {
	deviceID string
	c        proto.MQTTCheckIn
	at       time.Time // queued
}

func newCheckInQueue(ci *CheckIns, answer func(deviceID string, payload []byte)) *checkInQueue {
	cq := &checkInQueue{ci: ci, answer: answer, waiting: map[string]bool{}}
	cq.q = newQueue(checkInQueueDepth, checkInWorkers, cq.handle)
	return cq
}

// offer takes a payload a device published on its check-in topic. It
// never blocks: what is malformed or invalid is answered (or, without a
// request ID to answer to, dropped) at once, and so is a device's second
// check-in while its first waits; the rest is queued, each valid check-in
// bounded in size (proto.CheckIn.Validate), one per device.
func (q *checkInQueue) offer(deviceID string, payload []byte) {
	if len(payload) > MaxCheckInBytes {
		q.refuse(deviceID, "", RefusedTooLarge, 0, fmt.Sprintf("check-in larger than %d bytes", MaxCheckInBytes))
		return
	}
	var c proto.MQTTCheckIn
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	err := dec.Decode(&c)
	if err == nil && dec.More() {
		err = errors.New("more than one JSON value")
	}
	if proto.ValidID("request_id", c.RequestID) != nil {
		q.refuse(deviceID, "", RefusedMalformed, 0, "")
		return
	}
	if err != nil {
		q.refuse(deviceID, c.RequestID, RefusedMalformed, http.StatusBadRequest, "malformed JSON: "+err.Error())
		return
	}
	if err := c.Validate(); err != nil {
		q.refuse(deviceID, c.RequestID, RefusedInvalid, http.StatusBadRequest, err.Error())
		return
	}
	q.mu.Lock()
	busy := q.waiting[deviceID]
	q.waiting[deviceID] = true
	q.mu.Unlock()
	if busy {
		q.refuse(deviceID, c.RequestID, RefusedBusy, http.StatusServiceUnavailable, "a check-in of this device is being answered: retry later")
		return
	}
	if err := q.q.put(checkInMsg{deviceID: deviceID, c: c, at: time.Now()}); err != nil {
		q.done(deviceID)
		if errors.Is(err, errQueueFull) {
			q.refuse(deviceID, c.RequestID, RefusedBusy, http.StatusServiceUnavailable, "server busy: retry later")
		}
	}
}

// done ends a device's turn.
func (q *checkInQueue) done(deviceID string) {
	q.mu.Lock()
	delete(q.waiting, deviceID)
	q.mu.Unlock()
}

// refuse counts and logs a check-in that did not reach the device API and
// answers it when it has a request ID.
func (q *checkInQueue) refuse(deviceID, requestID, reason string, status int, msg string) {
	q.ci.log().Warn("mqtt: check-in refused", "device", deviceID, "request", requestID, "reason", reason, "err", msg)
	if q.ci.Refused != nil {
		q.ci.Refused(reason)
	}
	if requestID == "" {
		return
	}
	body, _ := json.Marshal(proto.Error{Error: msg})
	a := proto.MQTTAnswer{RequestID: requestID, Status: status, Body: body}
	if status == http.StatusServiceUnavailable {
		a.RetryAfter = checkInRetryAfter
	}
	b, _ := json.Marshal(a)
	q.answer(deviceID, b)
}

// handle runs one check-in through the device API and publishes its
// answer.
func (q *checkInQueue) handle(m checkInMsg) {
	defer q.done(m.deviceID)
	q.fanOut.wait(fanOutHold) // notifications first (notifyEach)
	if time.Since(m.at) > checkInMaxWait {
		q.refuse(m.deviceID, m.c.RequestID, RefusedBusy, http.StatusServiceUnavailable, "server busy: retry later")
		return
	}
	body, _ := json.Marshal(m.c.CheckIn)
	ctx, cancel := context.WithTimeout(deviceapi.WithDevice(context.Background(), m.deviceID), statusTimeout)
	defer cancel()
	req := httptest.NewRequestWithContext(ctx, http.MethodPost, proto.PathCheckIn, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	q.ci.Handler.ServeHTTP(rec, req)
	a := proto.MQTTAnswer{RequestID: m.c.RequestID, Status: rec.Code, Body: bytes.TrimSpace(rec.Body.Bytes())}
	if !json.Valid(a.Body) {
		a.Body = nil
	}
	if rec.Code == http.StatusServiceUnavailable {
		a.RetryAfter, _ = strconv.Atoi(rec.Header().Get("Retry-After"))
	}
	b, _ := json.Marshal(a)
	q.answer(m.deviceID, b)
}

// close stops taking check-ins and waits for those queued to be answered.
func (q *checkInQueue) close() { q.q.close() }
