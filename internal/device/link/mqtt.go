package link

import (
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// NotifyTopic is where the server tells this device to check in.
func (l *Link) NotifyTopic() string { return "fp/dev/" + l.Bundle.DeviceID + "/notify" }

// StatusTopic is where this device publishes its status reports.
func (l *Link) StatusTopic() string { return "fp/dev/" + l.Bundle.DeviceID + "/status" }

// AckTopic is where the server acknowledges them.
func (l *Link) AckTopic() string { return "fp/dev/" + l.Bundle.DeviceID + "/ack" }

// CheckInTopic is where this device publishes the check-in that answers a
// notification.
func (l *Link) CheckInTopic() string { return "fp/dev/" + l.Bundle.DeviceID + "/checkin" }

// AnswerTopic is where the server answers it.
func (l *Link) AnswerTopic() string { return "fp/dev/" + l.Bundle.DeviceID + "/answer" }

// MQTT timings: how long a status report waits for the server's
// acknowledgement before it goes over HTTPS instead, and over how long a
// fleet that reconnects at once (the broker restarted) spreads the
// check-ins that follow.
const (
	mqttAckTimeout      = 5 * time.Second
	mqttReconnectSpread = 5 * time.Second
)

// mqttNotifiedFor is how soon after a notification a check-in counts as
// the one it prompted (later, as when an update was under way, it is a
// timed poll and goes over HTTPS).
const mqttNotifiedFor = 30 * time.Second

// mqttAnswerTimeout is how long a check-in over MQTT waits for its answer
// before it goes over HTTPS instead (a variable for the tests).
var mqttAnswerTimeout = 10 * time.Second

// ErrMQTTDown is returned by MQTT.Report while the broker connection is
// not up, or after a report went unacknowledged on it (the report then
// goes over HTTPS).
var ErrMQTTDown = errors.New("mqtt: not connected")

// MQTT is the device's session with the MQTT broker: notifications wake
// the agent, and status reports may go there while it is connected. It
// reconnects by itself until Close; while it is down the agent simply
// polls and reports over HTTPS.
type MQTT struct {
	l     *Link
	c     mqtt.Client
	host  string
	ready atomic.Bool // connected and subscribed to notifications and acknowledgements
	// silent is set when a report went unacknowledged: the server takes
	// no reports over MQTT (an older one), so until the next connection
	// reports go straight over HTTPS.
	silent atomic.Bool
	conns  atomic.Int64
	// notified is when the last notification came (Unix nanoseconds; 0:
	// taken), taken by the check-in it prompts, which goes over MQTT if it
	// follows within mqttNotifiedFor.
	notified atomic.Int64

	mu      sync.Mutex
	waiters map[string]chan []byte // "ack:" + report ID or "answer:" + request ID -> its waiter
}

// DialMQTT starts a session with the broker at mqtts://HOST:PORT with the
// device's certificate (the broker's is checked against the bundle's CA,
// for HOST, on the trusted clock). It returns at once, or with an error
// for a bad address; the connection is made, and made again whenever it
// is lost, in the background. wake is called for every notification, and
// on every connection made (a notification may have been missed while
// there was none; after a reconnection with a random delay, so a fleet
// whose broker restarted does not check in all at once).
func (l *Link) DialMQTT(broker string, wake func()) (*MQTT, error) {
	u, err := url.Parse(broker)
	if err != nil || u.Scheme != "mqtts" || u.Hostname() == "" || u.Port() == "" {
		return nil, fmt.Errorf("mqtt broker %q: want mqtts://HOST:PORT", broker)
	}
	caPEM, err := os.ReadFile(filepath.Join(l.Bundle.Dir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("provisioning bundle %s: ca.pem holds no certificate", l.Bundle.Dir)
	}
	host := u.Hostname()
	tc := l.tlsConfig.Clone()
	tc.NextProtos = nil
	tc.VerifyConnection = func(cs tls.ConnectionState) error { return l.verifyServer(cs, pool, host) }
	m := &MQTT{l: l, host: u.Host, waiters: map[string]chan []byte{}}
	notify, ack, answer := l.NotifyTopic(), l.AckTopic(), l.AnswerTopic()
	opts := mqtt.NewClientOptions().
		AddBroker("tls://" + u.Host).
		SetClientID(l.Bundle.DeviceID).
		SetTLSConfig(tc).
		SetCleanSession(true).
		SetKeepAlive(60 * time.Second).
		SetConnectTimeout(15 * time.Second).
		SetWriteTimeout(15 * time.Second).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(5 * time.Second).
		SetMaxReconnectInterval(2 * time.Minute).
		SetOnConnectHandler(func(c mqtt.Client) {
			// Subscribed anew on every connection (a clean session
			// forgets it). Runs on a goroutine of its own.
			handler := func(_ mqtt.Client, msg mqtt.Message) {
				switch msg.Topic() {
				case ack:
					var a proto.ReportAck
					if json.Unmarshal(msg.Payload(), &a) == nil && a.ReportID != "" {
						m.deliver("ack:"+a.ReportID, msg.Payload())
					}
				case answer:
					var a proto.MQTTAnswer
					if json.Unmarshal(msg.Payload(), &a) == nil && a.RequestID != "" {
						m.deliver("answer:"+a.RequestID, msg.Payload())
					}
				default:
					m.notified.Store(time.Now().UnixNano())
					wake()
				}
			}
			for try := 0; ; try++ {
				tok := c.SubscribeMultiple(map[string]byte{notify: 1, ack: 1, answer: 1}, handler)
				if tok.WaitTimeout(15*time.Second) && tok.Error() == nil && subscribed(tok) {
					break
				}
				l.logf("mqtt: subscribing to %s: %v (trying again)", notify, tok.Error())
				time.Sleep(time.Second << min(try, 6))
				if !c.IsConnectionOpen() {
					return // the next connection subscribes
				}
			}
			m.silent.Store(false)
			m.ready.Store(true)
			l.logf("mqtt: connected to %s, listening on %s", u.Host, notify)
			if m.conns.Add(1) == 1 {
				wake()
			} else {
				time.AfterFunc(rand.N(mqttReconnectSpread), wake)
			}
		}).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			m.ready.Store(false)
			l.logf("mqtt: connection lost (%v): polling until it is back", err)
		})
	m.c = mqtt.NewClient(opts)
	m.c.Connect() // with ConnectRetry it keeps trying in the background
	return m, nil
}

// subscribed says whether the broker granted every subscription of a
// SUBSCRIBE (0x80 is a refusal).
func subscribed(tok mqtt.Token) bool {
	st, ok := tok.(*mqtt.SubscribeToken)
	if !ok {
		return false
	}
	for _, q := range st.Result() {
		if q > 2 {
			return false
		}
	}
	return true
}

// Close ends the session.
func (m *MQTT) Close() {
	m.ready.Store(false)
	m.c.Disconnect(250)
}

// Connected says whether the session is up and subscribed.
func (m *MQTT) Connected() bool { return m.ready.Load() && m.c.IsConnectionOpen() }

// takeNotified returns when the last notification came and forgets it (0
// if none, or m is nil).
func (m *MQTT) takeNotified() int64 {
	if m == nil {
		return 0
	}
	return m.notified.Swap(0)
}

// deliver hands a message to whoever waits for key.
func (m *MQTT) deliver(key string, payload []byte) {
	m.mu.Lock()
	ch := m.waiters[key]
	m.mu.Unlock()
	if ch != nil {
		select {
		case ch <- payload:
		default:
		}
	}
}

// request publishes payload on topic at qos and waits up to timeout for
// the message delivered under key. On a timeout the session turns silent:
// the server does not answer over MQTT (an older one), so until the next
// connection everything goes straight over HTTPS.
func (m *MQTT) request(ctx context.Context, topic string, qos byte, key string, payload []byte, timeout time.Duration) ([]byte, error) {
	if !m.Connected() || m.silent.Load() {
		return nil, ErrMQTTDown
	}
	ch := make(chan []byte, 1)
	m.mu.Lock()
	m.waiters[key] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		if m.waiters[key] == ch {
			delete(m.waiters, key)
		}
		m.mu.Unlock()
	}()
	m.c.Publish(topic, qos, false, payload)
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case b := <-ch:
		return b, nil
	case <-t.C:
		m.silent.Store(true)
		return nil, fmt.Errorf("mqtt: no answer within %v (going over HTTPS until the next connection)", timeout)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Report publishes a status report (QoS 1) and waits for the server to
// say it is stored. It fails when the session is down, when the server
// refuses the report, and when no acknowledgement comes within a few
// seconds (then, until the next connection, it fails at once): the
// caller then sends it over HTTPS (the same report ID, so a report that
// was stored after all is not stored twice).
func (m *MQTT) Report(ctx context.Context, r proto.Report) error {
	body, err := json.Marshal(r)
	if err != nil {
		return err
	}
	b, err := m.request(ctx, m.l.StatusTopic(), 1, "ack:"+r.ReportID, body, mqttAckTimeout)
	if err != nil {
		return err
	}
	var a proto.ReportAck
	if json.Unmarshal(b, &a) != nil || !a.Stored {
		return errors.New("mqtt: the server refused the report")
	}
	return nil
}

// CheckIn publishes a check-in and waits for the server's answer, which is
// the device API's: an offer, or a 503 (a *BusyError, with the wait the
// server asked for). It fails when the session is down, when no answer
// comes in time, and for any other answer: the caller then checks in over
// HTTPS.
func (m *MQTT) CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error) {
	var id [12]byte
	crand.Read(id[:])
	req := proto.MQTTCheckIn{RequestID: hex.EncodeToString(id[:]), CheckIn: c}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if len(body) > proto.MaxMQTTCheckInBytes {
		return nil, fmt.Errorf("mqtt: a check-in of %d bytes is over the %d MQTT takes", len(body), proto.MaxMQTTCheckInBytes)
	}
	// QoS 0: the answer is the acknowledgement (a check-in lost with its
	// connection goes over HTTPS after the timeout).
	b, err := m.request(ctx, m.l.CheckInTopic(), 0, "answer:"+req.RequestID, body, mqttAnswerTimeout)
	if err != nil {
		return nil, err
	}
	var a proto.MQTTAnswer
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("mqtt: check-in answer: %w", err)
	}
	switch a.Status {
	case 200:
		var resp proto.CheckInResponse
		if err := json.Unmarshal(a.Body, &resp); err != nil {
			return nil, fmt.Errorf("mqtt: check-in answer: %w", err)
		}
		return &resp, nil
	case 503:
		return nil, &BusyError{RetryAfter: time.Duration(max(a.RetryAfter, 1)) * time.Second}
	default:
		var pe proto.Error
		json.Unmarshal(a.Body, &pe)
		return nil, fmt.Errorf("mqtt: check-in answered %d: %s", a.Status, pe.Error)
	}
}

// ListenMQTT runs a session (DialMQTT) until ctx ends. It returns when ctx
// ends, or at once for a bad broker address.
func (l *Link) ListenMQTT(ctx context.Context, broker string, wake func()) error {
	m, err := l.DialMQTT(broker, wake)
	if err != nil {
		return err
	}
	defer m.Close()
	<-ctx.Done()
	return nil
}

// Server is the update server as the agent's daemon sees it (the HTTPS
// link implements it).
type Server interface {
	CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error)
	Report(ctx context.Context, r proto.Report) error
	URL(path string) string
}

// WithMQTT is a link that uses its MQTT session while it is up for two
// things. The check-in that answers a notification goes to the broker, so
// a fleet notified at once does not make a TLS handshake and an HTTPS
// exchange each. A report that does not end an update (downloading,
// installing, rebooting) goes there too and counts once the server
// acknowledges it. Everything else goes over the link as always: timed
// polls (which keep the trusted clock and certificate renewal on their
// HTTPS path), outcomes (so the agent's resend-until-acknowledged rule
// works exactly as without MQTT), and whatever the broker did not carry
// to an answer.
type WithMQTT struct {
	Server
	MQTT *MQTT
}

// CheckIn checks in: over MQTT when a notification prompted it and the
// session is up, otherwise (or when MQTT fails) over the link.
func (w WithMQTT) CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error) {
	if at := w.MQTT.takeNotified(); at != 0 && time.Since(time.Unix(0, at)) < mqttNotifiedFor {
		resp, err := w.MQTT.CheckIn(ctx, c)
		var busy *BusyError
		if err == nil || errors.As(err, &busy) || ctx.Err() != nil {
			return resp, err
		}
		if !errors.Is(err, ErrMQTTDown) {
			w.MQTT.l.logf("%v: checking in over HTTPS", err)
		}
	}
	return w.Server.CheckIn(ctx, c)
}

// Report sends a status report; it succeeds only when the server says the
// report is stored.
func (w WithMQTT) Report(ctx context.Context, r proto.Report) error {
	if w.MQTT != nil && !proto.Final(r.Status) {
		err := w.MQTT.Report(ctx, r)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		if !errors.Is(err, ErrMQTTDown) {
			w.MQTT.l.logf("%v: sending report %s over HTTPS", err, r.ReportID)
		}
	}
	return w.Server.Report(ctx, r)
}
