package notify

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/url"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fieldpatch/fieldpatch/internal/server/pki"
)

// ServerIdentity is the name in the certificate the server presents to an
// external broker (its subject CN, which Mosquitto's
// use_identity_as_username makes the user name its ACL grants fp/dev/#).
// The colon keeps it outside the device ID grammar (proto.ValidID) and
// outside what a device certificate's URI may name (pki.DeviceID): no
// device can be provisioned or enroll under it, so no device certificate
// ever carries it.
const ServerIdentity = "fieldpatch:server"

// identityLifetime is how long the server's broker certificate is valid;
// it lives in memory only and is issued again when a third is left.
const identityLifetime = 7 * 24 * time.Hour

// ErrNotConnected is returned while the server has no connection to the
// external broker.
var ErrNotConnected = errors.New("not connected to the MQTT broker")

// ParseBroker checks an external broker's address, mqtts://HOST:PORT, and
// returns its host and port.
func ParseBroker(s string) (host, hostport string, err error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "mqtts" || u.Hostname() == "" || u.Port() == "" || u.User != nil ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return "", "", fmt.Errorf("mqtt broker %q: want mqtts://HOST:PORT", s)
	}
	return u.Hostname(), u.Host, nil
}

// ClientConfig configures the server's connection to an external broker.
type ClientConfig struct {
	// Broker is the broker's address, mqtts://HOST:PORT. Its certificate
	// must be issued by CA for HOST (devices check it the same way).
	Broker string
	// CA issues the server's client certificate for ServerIdentity (kept in
	// memory, renewed by itself) and verifies the broker's certificate.
	CA *pki.CA
	// Reports, if set, takes the status reports devices publish on
	// fp/dev/ID/status (ID taken from the topic, which the broker's ACL
	// keeps to the device its certificate names) and acknowledges them on
	// fp/dev/ID/ack.
	Reports *Reports
	// CheckIns, if set, answers the check-ins devices publish on
	// fp/dev/ID/checkin (ID from the topic, as for reports) on
	// fp/dev/ID/answer.
	CheckIns *CheckIns
	Log      *slog.Logger
	// Up hears of every connection made (after which devices missed
	// notifications while it was down); Down of every one lost.
	Up   func()
	Down func(err error)
	// MaxRetry is the longest wait between connection attempts (default
	// 10 s; attempts start a second apart and double).
	MaxRetry time.Duration
}

// Client is the server's connection to an external MQTT broker: it
// publishes notifications and takes status reports and check-ins there, and connects
// again by itself whenever the connection is lost.
type Client struct {
	c      ClientConfig
	cl     paho.Client
	host   string
	status *statusQueue
	checks *checkInQueue
	once   sync.Once
}

// NewClient checks the configuration and makes the client (not yet
// connected: Start connects).
func NewClient(c ClientConfig) (*Client, error) {
	host, hostport, err := ParseBroker(c.Broker)
	if err != nil {
		return nil, err
	}
	if c.CA == nil {
		return nil, errors.New("notify: a CA is required")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.MaxRetry <= 0 {
		c.MaxRetry = 10 * time.Second
	}
	id := &identity{ca: c.CA}
	tc := &tls.Config{
		MinVersion:           tls.VersionTLS13,
		RootCAs:              c.CA.Pool(),
		ServerName:           host,
		GetClientCertificate: id.get,
	}
	var suffix [6]byte
	rand.Read(suffix[:])
	cli := &Client{c: c, host: hostport}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + hostport).
		// A client ID of its own each start: devices, which Mosquitto does
		// not tie to their certificate's client ID, cannot guess it to
		// take the server's session over.
		SetClientID(fmt.Sprintf("%s-%x", ServerIdentity, suffix)).
		SetTLSConfig(tc).
		SetCleanSession(true).
		SetKeepAlive(30 * time.Second).
		SetPingTimeout(10 * time.Second).
		SetConnectTimeout(10 * time.Second).
		SetWriteTimeout(10 * time.Second).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(time.Second).
		SetMaxReconnectInterval(c.MaxRetry).
		SetOnConnectHandler(cli.connected).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			c.Log.Warn("mqtt: connection to the broker lost: devices are not notified until it is back (they poll)", "broker", hostport, "err", err)
			if c.Down != nil {
				c.Down(err)
			}
		})
	cli.cl = paho.NewClient(opts)
	// Answers are not waited for: without one, the device falls back to HTTPS.
	publish := func(topic string, qos byte, payload []byte) {
		if cli.cl.IsConnectionOpen() {
			cli.cl.Publish(topic, qos, false, payload)
		}
	}
	if c.Reports != nil {
		cli.status = newStatusQueue(c.Reports, func(id string, ack []byte) { publish(AckTopic(id), 1, ack) })
	}
	if c.CheckIns != nil {
		cli.checks = newCheckInQueue(c.CheckIns, func(id string, a []byte) { publish(AnswerTopic(id), answerQoS, a) })
	}
	return cli, nil
}

// connected runs on every connection: it subscribes anew (the session is
// clean) and says the broker is up.
func (cli *Client) connected(c paho.Client) {
	cli.c.Log.Info("mqtt: connected to the broker", "broker", cli.host, "identity", ServerIdentity)
	// The broker's ACL lets a device publish only below its own prefix
	// (pattern fp/dev/%u/...), so the topic names the device.
	if cli.status != nil {
		cli.subscribe(c, StatusFilter, "status", cli.status.offer, func(topic string) {
			cli.status.refused("", "", refuse(RefusedTopic, fmt.Errorf("published on %s", topic)))
		})
	}
	if cli.checks != nil {
		cli.subscribe(c, CheckInFilter, "checkin", cli.checks.offer, func(topic string) {
			cli.checks.refuse("", "", RefusedTopic, 0, "published on "+topic)
		})
	}
	if cli.c.Up != nil {
		cli.c.Up()
	}
}

// Start connects in the background; it returns at once. Until the broker
// answers the client tries again, a second apart at first and then up to
// MaxRetry apart.
func (cli *Client) Start() {
	tok := cli.cl.Connect()
	go func() {
		if !tok.WaitTimeout(15 * time.Second) {
			cli.c.Log.Warn("mqtt: the broker does not answer yet: retrying; devices poll meanwhile", "broker", cli.host)
		} else if tok.Error() != nil {
			cli.c.Log.Error("mqtt: connecting to the broker", "broker", cli.host, "err", tok.Error())
		}
	}()
}

// Connected says whether the connection to the broker is up.
func (cli *Client) Connected() bool { return cli.cl.IsConnectionOpen() }

// Notify tells devices to check in (QoS 0, notifyQoS). While the broker is down it
// returns ErrNotConnected at once: devices find their offers by polling,
// and those connected are notified again when the broker is back (Up).
func (cli *Client) Notify(kind string, deviceIDs ...string) error {
	if !cli.cl.IsConnectionOpen() {
		return ErrNotConnected
	}
	payload, _ := json.Marshal(Notice{Kind: kind, At: time.Now().UTC()})
	var errs []error
	var pending []paho.Token
	// flush waits for the batch to be written, 10 s in all: a token of a
	// publish made while the connection drops may never complete.
	flush := func() {
		deadline := time.Now().Add(notifyFlushWait)
		late := 0
		for _, t := range pending {
			if !t.WaitTimeout(max(time.Until(deadline), time.Millisecond)) {
				late++
			} else if err := t.Error(); err != nil {
				errs = append(errs, err)
			}
		}
		if late > 0 {
			errs = append(errs, fmt.Errorf("%d notifications not written to the broker within %v", late, notifyFlushWait))
		}
		pending = pending[:0]
	}
	// A batch at a time, the check-in workers held back while it is
	// handed to the client (not while the notifier waits on the broker).
	for len(deviceIDs) > 0 {
		batch := deviceIDs[:min(len(deviceIDs), 1000)] // well below the 65,535 packet IDs in flight
		deviceIDs = deviceIDs[len(batch):]
		cli.checks.notifyEach(batch, func(id string) {
			pending = append(pending, cli.cl.Publish(NotifyTopic(id), notifyQoS, false, payload))
		})
		flush()
	}
	return errors.Join(errs...)
}

// notifyFlushWait is how long Client.Notify waits for a batch of
// notifications to be written to the broker.
const notifyFlushWait = 10 * time.Second

// subscribe takes what devices publish on filter (fp/dev/+/LEAF) and
// hands it to take with the device the topic names.
func (cli *Client) subscribe(c paho.Client, filter, leaf string, take func(id string, payload []byte), wrongTopic func(topic string)) {
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) {
		id := DeviceFromTopic(m.Topic(), leaf)
		if id == "" {
			wrongTopic(m.Topic())
			return
		}
		take(id, m.Payload())
	})
	go func() { // not waited for here: this runs on the client's own goroutine
		if tok.WaitTimeout(10*time.Second) && tok.Error() != nil {
			cli.c.Log.Error("mqtt: subscribing to what devices publish", "filter", filter, "err", tok.Error())
		}
	}()
}

// Close disconnects, after storing the status reports and answering the
// check-ins already taken.
func (cli *Client) Close() error {
	cli.once.Do(func() {
		cli.cl.Disconnect(250)
		if cli.status != nil {
			cli.status.close()
		}
		if cli.checks != nil {
			cli.checks.close()
		}
	})
	return nil
}

// identity is the server's client certificate for the broker.
type identity struct {
	ca       *pki.CA
	mu       sync.Mutex
	cert     *tls.Certificate
	notAfter time.Time
}

func (i *identity) get(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.cert != nil && time.Until(i.notAfter) > identityLifetime/3 {
		return i.cert, nil
	}
	c, notAfter, err := IssueServerIdentity(i.ca, identityLifetime)
	if err != nil {
		return nil, err
	}
	i.cert, i.notAfter = c, notAfter
	return c, nil
}

// IssueServerIdentity issues the server's client certificate for an
// external broker: subject CN ServerIdentity, client authentication only,
// no device URI (the device API and the embedded broker refuse it), for a
// new key that never leaves memory.
func IssueServerIdentity(ca *pki.CA, lifetime time.Duration) (*tls.Certificate, time.Time, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, time.Time{}, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: ServerIdentity},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(lifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("the server's broker certificate: %w", err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, tmpl.NotAfter, nil
}
