package link

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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

// MQTT timings: how long a status report waits for the server's
// acknowledgement before it goes over HTTPS instead, and over how long a
// fleet that reconnects at once (the broker restarted) spreads the
// check-ins that follow.
const (
	mqttAckTimeout      = 5 * time.Second
	mqttReconnectSpread = 5 * time.Second
)

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

	mu   sync.Mutex
	acks map[string]chan bool // report ID -> its waiter
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
	m := &MQTT{l: l, host: u.Host, acks: map[string]chan bool{}}
	notify, ack := l.NotifyTopic(), l.AckTopic()
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
				if msg.Topic() == ack {
					m.acked(msg.Payload())
				} else {
					wake()
				}
			}
			for try := 0; ; try++ {
				tok := c.SubscribeMultiple(map[string]byte{notify: 1, ack: 1}, handler)
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

// acked hands the server's acknowledgement to the report waiting for it.
func (m *MQTT) acked(payload []byte) {
	var a proto.ReportAck
	if json.Unmarshal(payload, &a) != nil || a.ReportID == "" {
		return
	}
	m.mu.Lock()
	ch := m.acks[a.ReportID]
	m.mu.Unlock()
	if ch != nil {
		select {
		case ch <- a.Stored:
		default:
		}
	}
}

// Report publishes a status report (QoS 1) and waits for the server to
// say it is stored. It fails when the session is down, when the server
// refuses the report, and when no acknowledgement comes within a few
// seconds (then, until the next connection, it fails at once): the
// caller then sends it over HTTPS (the same report ID, so a report that
// was stored after all is not stored twice).
func (m *MQTT) Report(ctx context.Context, r proto.Report) error {
	if !m.Connected() || m.silent.Load() {
		return ErrMQTTDown
	}
	body, err := json.Marshal(r)
	if err != nil {
		return err
	}
	ch := make(chan bool, 1)
	m.mu.Lock()
	m.acks[r.ReportID] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		if m.acks[r.ReportID] == ch {
			delete(m.acks, r.ReportID)
		}
		m.mu.Unlock()
	}()
	m.c.Publish(m.l.StatusTopic(), 1, false, body)
	t := time.NewTimer(mqttAckTimeout)
	defer t.Stop()
	select {
	case stored := <-ch:
		if !stored {
			return errors.New("mqtt: the server refused the report")
		}
		return nil
	case <-t.C:
		m.silent.Store(true)
		return errors.New("mqtt: the report was not acknowledged (reports go over HTTPS until the next connection)")
	case <-ctx.Done():
		return ctx.Err()
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

// WithMQTT is a link with progress reports over MQTT: while the session
// is up, a report that does not end an update (downloading, installing,
// rebooting) goes to the broker and counts once the server acknowledges
// it there. Everything else goes over the link as always: outcomes (so
// the agent's resend-until-acknowledged rule works exactly as without
// MQTT), and any report the broker did not carry to an acknowledgement.
type WithMQTT struct {
	Server
	MQTT *MQTT
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
