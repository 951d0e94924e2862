// Package notify is the server's side of MQTT: its embedded broker
// (mochi-mqtt), or its client of an external broker (Mosquitto) for larger
// fleets. Devices connect over TLS 1.3 with the same client certificates as
// the device API, each may read only below its own topic prefix
// (fp/dev/ID/) and publish only its status reports (fp/dev/ID/status) and
// check-ins (fp/dev/ID/checkin). The server publishes "update available"
// on fp/dev/ID/notify so that a device checks in within a second instead
// of at its next poll; it takes the status reports devices publish
// (checked as strictly as over HTTPS, stored, and acknowledged on
// fp/dev/ID/ack) and answers their check-ins on fp/dev/ID/answer with the
// device API itself.
package notify

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
)

// TopicPrefix is the root of every device's topics: TopicPrefix + ID + "/".
const TopicPrefix = "fp/dev/"

// NotifyTopic is where the server tells a device to check in.
func NotifyTopic(deviceID string) string { return TopicPrefix + deviceID + "/notify" }

// notifyQoS is the QoS of notifications: 0. Sessions are clean, so a
// QoS 1 message is not kept for a device that reconnects either (and the
// agent checks in on every connection); over a live connection TCP
// delivers both alike, and QoS 0 spares the broker an acknowledgement to
// read and track per device.
const notifyQoS = 0

// Notice is the payload of a notification.
type Notice struct {
	Kind string    `json:"kind"` // "update": an update may be waiting; check in
	At   time.Time `json:"at"`
}

// MaxPacket is the largest MQTT packet the broker takes; a device sending
// more is disconnected.
const MaxPacket = 16 << 10

// Config configures the broker.
type Config struct {
	// TLS is the server's TLS configuration: its certificate, and the
	// device CA as ClientCAs (client certificates are required).
	TLS *tls.Config
	// Allowed says whether a device may connect (false for revoked or
	// unknown devices).
	Allowed func(deviceID string) bool
	Log     *slog.Logger
	// ConnectTimeout is how long a connection may take to send CONNECT
	// (default 20 s).
	ConnectTimeout time.Duration
	// Reports, if set, takes the status reports devices publish on
	// fp/dev/ID/status (ID being the device the connection's certificate
	// names) and acknowledges them on fp/dev/ID/ack.
	Reports *Reports
	// CheckIns, if set, answers the check-ins devices publish on
	// fp/dev/ID/checkin, on fp/dev/ID/answer.
	CheckIns *CheckIns
}

// Broker is the embedded MQTT broker.
type Broker struct {
	srv    *mqtt.Server
	ln     net.Listener
	log    *slog.Logger
	once   sync.Once
	status *statusQueue  // nil without Config.Reports
	checks *checkInQueue // nil without Config.CheckIns
}

// Listen makes a broker on addr (not yet serving).
func Listen(addr string, c Config) (*Broker, error) {
	if addr == "" || c.TLS == nil || c.Allowed == nil {
		return nil, errors.New("notify: TLS configuration and Allowed are required")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = 20 * time.Second
	}
	tc := c.TLS.Clone()
	tc.MinVersion = tls.VersionTLS13
	tc.ClientAuth = tls.RequireAndVerifyClientCert
	tc.NextProtos = nil
	raw, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("mqtt listener: %w", err)
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = 64 // notifications are rare: no deep queues per device
	caps.MaximumPacketSize = MaxPacket
	srv := mqtt.New(&mqtt.Options{InlineClient: true, Capabilities: caps, Logger: c.Log,
		// Memory per connected device (bench/mqtt): the TLS connection
		// already buffers a whole record, so the broker's own read buffer
		// need only hold a small packet (larger ones bypass it); 2 KiB
		// by default, 1.5 KiB more per device, twice that in resident
		// memory at the garbage collector's default pace.
		ClientNetReadBufferSize: 512,
		// No device may read $SYS (the ACL), so the broker need not
		// rebuild it every second (a stop-the-world memory read and 20
		// retained messages each time); once an hour keeps it alive.
		SysTopicResendInterval: 3600})
	if err := srv.AddHook(&deviceHook{allowed: c.Allowed, log: c.Log}, nil); err != nil {
		raw.Close()
		return nil, err
	}
	var ln listeners.Listener = newTLSListener("devices", raw, tc, c.ConnectTimeout, maxHandshakes)
	if err := srv.AddListener(ln); err != nil {
		raw.Close()
		return nil, err
	}
	b := &Broker{srv: srv, ln: raw, log: c.Log}
	if c.Reports != nil {
		b.status = newStatusQueue(c.Reports, func(id string, ack []byte) { srv.Publish(AckTopic(id), ack, false, 1) })
		// Inline subscribers are called on the publishing device's
		// connection: the hook pinned its client ID (pk.Origin) to the
		// device its certificate names, and the ACL kept it to its own
		// topic.
		err := srv.Subscribe(StatusFilter, 1, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
			if id := DeviceFromTopic(pk.TopicName, "status"); id == "" || id != pk.Origin {
				b.status.refused(pk.Origin, "", refuse(RefusedTopic, fmt.Errorf("%s published on %s", pk.Origin, pk.TopicName)))
				return
			}
			b.status.offer(pk.Origin, pk.Payload)
		})
		if err != nil {
			b.status.close()
			raw.Close()
			return nil, err
		}
	}
	if c.CheckIns != nil {
		b.checks = newCheckInQueue(c.CheckIns, func(id string, a []byte) { srv.Publish(AnswerTopic(id), a, false, answerQoS) })
		err := srv.Subscribe(CheckInFilter, 2, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
			if id := DeviceFromTopic(pk.TopicName, "checkin"); id == "" || id != pk.Origin {
				b.checks.refuse(pk.Origin, "", RefusedTopic, 0, fmt.Sprintf("%s published on %s", pk.Origin, pk.TopicName))
				return
			}
			b.checks.offer(pk.Origin, pk.Payload)
		})
		if err != nil {
			b.checks.close()
			if b.status != nil {
				b.status.close()
			}
			raw.Close()
			return nil, err
		}
	}
	return b, nil
}

// Addr is the broker's listening address.
func (b *Broker) Addr() net.Addr { return b.ln.Addr() }

// Serve starts serving (it returns at once; Close stops).
func (b *Broker) Serve() error { return b.srv.Serve() }

// Close stops the broker and drops its clients, after storing the status
// reports already taken.
func (b *Broker) Close() error {
	var err error
	b.once.Do(func() {
		err = b.srv.Close()
		if b.status != nil {
			b.status.close()
		}
		if b.checks != nil {
			b.checks.close()
		}
	})
	return err
}

// Notify tells devices to check in (QoS 0, notifyQoS: delivered to connected
// devices; one that is not connected learns at its next poll).
func (b *Broker) Notify(kind string, deviceIDs ...string) error {
	payload, _ := json.Marshal(Notice{Kind: kind, At: time.Now().UTC()})
	var errs []error
	b.checks.notifyEach(deviceIDs, func(id string) {
		if err := b.srv.Publish(NotifyTopic(id), payload, false, notifyQoS); err != nil {
			errs = append(errs, err)
		}
	})
	return errors.Join(errs...)
}

// Clients is how many devices are connected.
func (b *Broker) Clients() int64 { return atomic.LoadInt64(&b.srv.Info.ClientsConnected) }

// deviceHook authenticates devices by their certificate and keeps each to
// its own topics.
type deviceHook struct {
	mqtt.HookBase
	allowed func(string) bool
	log     *slog.Logger
}

func (h *deviceHook) ID() string { return "fieldpatch-devices" }

func (h *deviceHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck || b == mqtt.OnPublish
}

// OnConnectAuthenticate: the TLS handshake is done; the device is the one
// its verified certificate names, the MQTT client ID must be that ID, and
// the device must be allowed. The username is overwritten with the ID (the
// ACL reads it).
func (h *deviceHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	tc, ok := cl.Net.Conn.(*tls.Conn)
	if !ok {
		return false
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return false
	}
	id, err := pki.DeviceID(st.VerifiedChains[0][0])
	if err != nil || proto.ValidID("device", id) != nil || strings.ContainsAny(id, "/+#") {
		return false
	}
	if pk.Connect.ClientIdentifier != id {
		h.log.Warn("mqtt: client id does not match the certificate", "device", id, "client_id", pk.Connect.ClientIdentifier)
		return false
	}
	if !h.allowed(id) {
		h.log.Warn("mqtt: device not allowed (revoked or unknown)", "device", id)
		return false
	}
	cl.Properties.Username = []byte(id)
	return true
}

// OnACLCheck: a device reads only below fp/dev/ID/ (which also refuses
// wildcards above it and shared subscriptions) and writes only its status
// and check-in topics, fp/dev/ID/status and fp/dev/ID/checkin.
func (h *deviceHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	id := string(cl.Properties.Username)
	if id == "" {
		return false
	}
	if write {
		return topic == StatusTopic(id) || topic == CheckInTopic(id)
	}
	return strings.HasPrefix(topic, TopicPrefix+id+"/")
}

// OnPublish: nothing a device publishes is retained (a device could
// otherwise make the broker hold messages for ever).
func (h *deviceHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if !cl.Net.Inline {
		pk.FixedHeader.Retain = false
	}
	return pk, nil
}
