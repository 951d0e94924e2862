package notify

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// checkIn is a check-in payload of lock-N on 1.0.0 with extra fields.
func checkIn(requestID string, extra string) string {
	return fmt.Sprintf(`{"request_id":%q,"version":"1.0.0","slot":"a","hw_class":"lock"%s}`, requestID, extra)
}

// ask publishes a check-in of id's with mosquitto_rr and returns the
// server's answer.
func ask(t *testing.T, conn []string, id, payload string) proto.MQTTAnswer {
	t.Helper()
	return rrJSON[proto.MQTTAnswer](t, conn, CheckInTopic(id), AnswerTopic(id), payload)
}

// Devices check in over MQTT (embedded broker, and Mosquitto as the
// external one) and get the device API's own answer on fp/dev/ID/answer:
// a good check-in is stored and answered with the device's offer; bad
// ones (garbage, no request ID, unknown fields, trailing data, too large,
// an invalid check-in, another device's topic, a revoked device) change
// nothing, are answered with their status when they carry a request ID,
// and the broker goes on: the next good check-in is answered.
func TestCheckInsOverMQTT(t *testing.T) {
	withEachBroker(t, func(t *testing.T, f *fleet, mode string) {
		lock1, lock3 := f.device("lock-1"), f.device("lock-3")
		ctx := context.Background()

		a := ask(t, lock1, "lock-1", checkIn("q-1", `,"attributes":{"site":"north"}`))
		var resp proto.CheckInResponse
		if a.RequestID != "q-1" || a.Status != http.StatusOK || json.Unmarshal(a.Body, &resp) != nil {
			t.Fatalf("answer %+v (%s)", a, a.Body)
		}
		if resp.Offer == nil || resp.Offer.UpdateID != f.updates["lock-1"] || resp.NextPollSeconds < 3600 {
			t.Fatalf("check-in answered %s, want lock-1's update %s offered", a.Body, f.updates["lock-1"])
		}
		if d, err := f.st.GetDevice(ctx, "lock-1"); err != nil || d.Attributes["site"] != "north" {
			t.Fatalf("the check-in was not stored: %+v %v", d, err)
		}

		// Answered with the device API's status.
		for _, c := range []struct {
			name, payload string
			status        int
		}{
			{"unknown field", checkIn("q-2", `,"colour":"red"`), http.StatusBadRequest},
			{"trailing data", checkIn("q-3", "") + `{}`, http.StatusBadRequest},
			{"invalid slot", `{"request_id":"q-4","version":"1.0.0","slot":"z","hw_class":"lock"}`, http.StatusBadRequest},
			{"invalid time zone", checkIn("q-5", `,"time_zone":"../../etc/passwd"`), http.StatusBadRequest},
		} {
			a := ask(t, lock1, "lock-1", c.payload)
			var pe proto.Error
			json.Unmarshal(a.Body, &pe)
			if a.Status != c.status || pe.Error == "" {
				t.Errorf("%s: answered %d %s, want %d with the reason", c.name, a.Status, a.Body, c.status)
			}
		}
		// Dropped, with no request ID to answer to: counted by reason.
		big := checkIn("q-big", `,"attributes":{"a":"`+strings.Repeat("x", 13<<10)+`"}`)
		for _, c := range []struct{ name, payload, reason string }{
			{"garbage", "\x00\xffnot json{", RefusedMalformed},
			{"no request ID", checkIn("", ""), RefusedMalformed},
			{"a request ID that is not an ID", checkIn("../x", ""), RefusedMalformed},
			{"13 KiB (over the server's cap, under the broker's)", big, RefusedTooLarge},
		} {
			before := f.refusals("checkin:" + c.reason)
			file := filepath.Join(t.TempDir(), "payload")
			os.WriteFile(file, []byte(c.payload), 0o644)
			if out, err := pub(t, append(lock1, "-t", CheckInTopic("lock-1"), "-q", "1", "-f", file)...); err != nil {
				t.Errorf("%s: mosquitto_pub: %v %s", c.name, err, out)
			}
			waitFor(t, c.name+" refused ("+c.reason+")", func() bool { return f.refusals("checkin:"+c.reason) > before })
		}
		// lock-1 writing lock-2's check-in topic: the broker's ACL drops it.
		pub(t, append(lock1, "-t", CheckInTopic("lock-2"), "-q", "1", "-m", checkIn("q-forged", `,"attributes":{"site":"forged"}`))...)
		// A revoked device: the embedded broker refuses it at CONNECT;
		// Mosquitto lets it publish, and the device API answers 403.
		if err := f.st.Revoke(ctx, "lock-3"); err != nil {
			t.Fatal(err)
		}
		if mode == "embedded" {
			if out, err := pub(t, append(lock3, "-t", CheckInTopic("lock-3"), "-q", "1", "-m", checkIn("q-rev", ""))...); err == nil {
				t.Errorf("a revoked device published: %s", out)
			}
		} else if a := ask(t, lock3, "lock-3", checkIn("q-rev", "")); a.Status != http.StatusForbidden {
			t.Errorf("a revoked device's check-in answered %d %s, want 403", a.Status, a.Body)
		}

		// The broker goes on, and nothing bad was stored.
		if a := ask(t, lock1, "lock-1", checkIn("q-6", `,"attributes":{"site":"south"}`)); a.Status != http.StatusOK {
			t.Fatalf("after the bad input: %+v", a)
		}
		if d, _ := f.st.GetDevice(ctx, "lock-1"); d.Attributes["site"] != "south" || d.Slot != "a" || d.TimeZone != "" {
			t.Errorf("lock-1 after the bad input: %+v", d)
		}
		if d, _ := f.st.GetDevice(ctx, "lock-2"); d.Attributes["site"] != "" {
			t.Errorf("lock-2 took a check-in lock-1 published: %+v", d.Attributes)
		}
	})
}

// While notifications go out (notifyEach), the workers answer no
// check-in: one queued meanwhile reaches the device API only after the
// notifying is done, and is then answered; but a notifier that does not
// finish holds them back for fanOutHold at most. Invalid device IDs are
// not published to.
func TestCheckInsWaitForTheNotifications(t *testing.T) {
	reached := make(chan struct{}, 1)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached <- struct{}{}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"poll_seconds":60}`))
	})
	answers := make(chan proto.MQTTAnswer, 1)
	q := newCheckInQueue(&CheckIns{Handler: handler}, func(_ string, b []byte) {
		var a proto.MQTTAnswer
		if err := json.Unmarshal(b, &a); err != nil {
			t.Errorf("answer %s: %v", b, err)
		}
		answers <- a
	})
	defer q.close()

	// notify starts a notification round whose first publish lasts until
	// release is closed, and returns once it is under way.
	notify := func(release chan struct{}) {
		under := make(chan struct{})
		go q.notifyEach([]string{"lock-7"}, func(string) {
			close(under)
			<-release
		})
		<-under
	}
	answered := func(id string) {
		t.Helper()
		if a := <-answers; a.RequestID != id || a.Status != http.StatusOK {
			t.Errorf("answer: %+v, want %s answered 200", a, id)
		}
	}

	released := make(chan struct{})
	notify(released)
	q.offer("lock-1", []byte(checkIn("r1", "")))
	select {
	case <-reached:
		t.Fatal("a check-in reached the device API while notifications were going out")
	case <-time.After(200 * time.Millisecond):
	}
	close(released)
	select {
	case <-reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the check-in was not answered after the notifications")
	}
	answered("r1")

	// A notifier stuck past fanOutHold (a stalled external broker) holds
	// the answers back no longer than that.
	defer func(h time.Duration) { fanOutHold = h }(fanOutHold)
	fanOutHold = 300 * time.Millisecond
	stuck := make(chan struct{})
	notify(stuck)
	q.offer("lock-2", []byte(checkIn("r2", ""))) // another device: lock-1's turn may not have ended yet
	select {
	case <-reached:
	case <-time.After(10 * time.Second):
		t.Fatal("a check-in was held back past fanOutHold by a stuck notifier")
	}
	answered("r2")
	close(stuck) // the round ends: the next one may begin

	for _, q := range []*checkInQueue{q, nil} { // nil: no check-ins over MQTT, notifying just runs
		var got []string
		q.notifyEach([]string{"lock-1", "a/b", "", "lock-#", "lock-2"}, func(id string) { got = append(got, id) })
		if !slices.Equal(got, []string{"lock-1", "lock-2"}) {
			t.Errorf("notified %q, want the valid IDs lock-1 and lock-2", got)
		}
	}
}
