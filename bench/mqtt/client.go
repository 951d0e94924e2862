package main

// The client process: this program re-executed, holding every device's
// MQTT connection (a process may hold 20,000 open files here, the server
// another 20,000). It takes requests from the parent as JSON lines on
// stdin and answers each with one JSON line on stdout.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// request is what the parent asks of the client process.
type request struct {
	Op string `json:"op"` // enroll, connect, disconnect, arm, collect
	// enroll
	Server    string `json:"server,omitempty"`
	CAPEM     string `json:"ca_pem,omitempty"`
	Token     string `json:"token,omitempty"`
	Devices   int    `json:"devices,omitempty"`
	Addresses int    `json:"addresses,omitempty"`
	HWClass   string `json:"hw_class,omitempty"`
	Version   string `json:"version,omitempty"`
	// connect
	Broker string `json:"broker,omitempty"`
	// enroll, connect, disconnect: requests in flight at once
	Workers int `json:"workers,omitempty"`
	// arm: check-in connections open at once (the client's file limit);
	// NoCheckIn: devices only note their notification
	CheckInConns int  `json:"checkin_conns,omitempty"`
	NoCheckIn    bool `json:"no_checkin,omitempty"`
	// arm: the first check-in after a notification goes over MQTT, as
	// the agent's does (later ones, after a 503 or a failure, over HTTPS)
	OverMQTT bool `json:"over_mqtt,omitempty"`
	// arm, collect: when devices stop trying (Unix nanoseconds)
	Deadline int64 `json:"deadline,omitempty"`
}

// reply answers a request.
type reply struct {
	Err      string        `json:"err,omitempty"`
	Done     int           `json:"done"`
	Failed   int           `json:"failed"`
	FirstErr string        `json:"first_err,omitempty"`
	Took     time.Duration `json:"took"`
	Lost     int64         `json:"lost"` // MQTT connections lost so far
	// collect: per device, Unix nanoseconds (0: never)
	Notified []int64 `json:"notified,omitempty"`
	Sent     []int64 `json:"sent,omitempty"` // the first check-in written to the connection
	Answered []int64 `json:"answered,omitempty"`
	Offered  []bool  `json:"offered,omitempty"`
	Tries    []int32 `json:"tries,omitempty"` // check-ins sent
	Attempts int64   `json:"attempts"`        // check-in requests sent
	ViaMQTT  int64   `json:"via_mqtt"`        // of them sent over MQTT
	Busy     int64   `json:"busy"`            // of them answered 503
	Errors   int64   `json:"errors"`          // of them failed otherwise
	MaxConns int64   `json:"max_conns"`
}

type device struct {
	id   string
	src  net.IP
	cert tls.Certificate
	http *http.Client
	mq   paho.Client

	notified, sent, answered atomic.Int64
	offered                  atomic.Bool
	tries                    atomic.Int32
	answer                   chan []byte // the server's answers to MQTT check-ins
}

type clientProc struct {
	devs    []*device
	server  string
	pool    *x509.CertPool
	hwClass string
	version string

	armed     atomic.Bool
	noCheckIn bool
	overMQTT  bool
	deadline  time.Time
	sem       chan struct{}
	lost      atomic.Int64

	attempts, busy, errs atomic.Int64
	viaMQTT              atomic.Int64
	conns, maxConns      atomic.Int64
	firstErr             atomic.Pointer[string]
	wg                   sync.WaitGroup
}

// runClient serves the parent's requests until stdin closes.
func runClient() {
	debug.SetGCPercent(400) // the load generator trades memory for CPU
	p := &clientProc{}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var req request
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			out.Encode(reply{Err: err.Error()})
			continue
		}
		start := time.Now()
		var r reply
		switch req.Op {
		case "enroll":
			r = p.enroll(req)
		case "connect":
			r = p.connect(req)
		case "disconnect":
			r = p.disconnect(req)
		case "arm":
			p.deadline = time.Unix(0, req.Deadline)
			p.sem = make(chan struct{}, max(req.CheckInConns, 1))
			p.noCheckIn = req.NoCheckIn
			p.overMQTT = req.OverMQTT
			p.attempts.Store(0)
			p.viaMQTT.Store(0)
			p.busy.Store(0)
			p.errs.Store(0)
			for _, d := range p.devs {
				d.notified.Store(0)
				d.sent.Store(0)
				d.answered.Store(0)
				d.offered.Store(false)
				d.tries.Store(0)
			}
			p.armed.Store(true)
		case "collect":
			r = p.collect(req)
		default:
			r.Err = "unknown op " + req.Op
		}
		r.Took = time.Since(start)
		r.Lost = p.lost.Load()
		if err := out.Encode(r); err != nil {
			os.Exit(1)
		}
	}
	os.Exit(0)
}

// parallel runs f for every device, workers at a time, and counts.
func (p *clientProc) parallel(workers int, f func(*device) error) reply {
	var r reply
	var mu sync.Mutex
	jobs := make(chan *device)
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range jobs {
				err := f(d)
				mu.Lock()
				if err != nil {
					r.Failed++
					if r.FirstErr == "" {
						r.FirstErr = d.id + ": " + err.Error()
					}
				} else {
					r.Done++
				}
				mu.Unlock()
			}
		}()
	}
	for _, d := range p.devs {
		jobs <- d
	}
	close(jobs)
	wg.Wait()
	return r
}

// enroll makes the devices, enrolls each with the fleet token (a key of
// its own, a certificate from the server) and checks each in once on the
// old version, so that the server knows its hardware class and the device
// holds a TLS session ticket, as a device in service does.
func (p *clientProc) enroll(req request) reply {
	p.server, p.hwClass, p.version = req.Server, req.HWClass, req.Version
	p.pool = x509.NewCertPool()
	if !p.pool.AppendCertsFromPEM([]byte(req.CAPEM)) {
		return reply{Err: "no CA certificate"}
	}
	addrs := max(req.Addresses, 1)
	p.devs = make([]*device, req.Devices)
	for i := range p.devs {
		a := i % addrs
		src := net.IPv4(127, byte(1+a/65536%254), byte(a/256%256), byte(a%256))
		if src[15] == 0 {
			src[15] = 255
		}
		p.devs[i] = &device{id: fmt.Sprintf("mq%05d", i+1), src: src, answer: make(chan []byte, 1)}
	}
	// Enrollment goes over a few kept-alive connections (no client
	// certificate yet); it is setup, not what is measured.
	enrollHTTP := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: p.pool}, MaxIdleConnsPerHost: req.Workers}}
	defer enrollHTTP.CloseIdleConnections()
	ctx := context.Background()
	r := p.parallel(req.Workers, func(d *device) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		der, _ := x509.MarshalPKIXPublicKey(key.Public())
		pub := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
		var er proto.EnrollResponse
		if err := postJSON(ctx, enrollHTTP, p.server+proto.PathEnroll, proto.EnrollRequest{DeviceID: d.id, PublicKey: pub, Token: req.Token}, &er); err != nil {
			return err
		}
		if er.Status != "enrolled" {
			return fmt.Errorf("enrollment %s", er.Status)
		}
		blk, _ := pem.Decode([]byte(er.CertPEM))
		if blk == nil {
			return errors.New("no certificate in the answer")
		}
		d.cert = tls.Certificate{Certificate: [][]byte{blk.Bytes}, PrivateKey: key}
		d.http = p.deviceHTTP(d)
		var resp proto.CheckInResponse
		return p.checkIn(ctx, d, &resp)
	})
	return r
}

// tlsConfig is a device's TLS: its certificate, the server's CA, TLS 1.3,
// X25519 alone as small devices' TLS stacks offer it, and one session to
// resume.
func (p *clientProc) tlsConfig(d *device) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: p.pool, Certificates: []tls.Certificate{d.cert},
		CurvePreferences: []tls.CurveID{tls.X25519}, ClientSessionCache: tls.NewLRUClientSessionCache(1)}
}

// deviceHTTP is a device's HTTPS client: a connection per check-in from
// the device's own loopback address (a device asleep between check-ins
// holds no connection), resuming its TLS session.
func (p *clientProc) deviceHTTP(d *device) *http.Client {
	dl := &net.Dialer{Timeout: 15 * time.Second, LocalAddr: &net.TCPAddr{IP: d.src}}
	return &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		TLSClientConfig:   p.tlsConfig(d),
		DialContext:       dl.DialContext,
		DisableKeepAlives: true,
	}}
}

func (p *clientProc) checkIn(ctx context.Context, d *device, resp *proto.CheckInResponse) error {
	return postJSON(ctx, d.http, p.server+proto.PathCheckIn, proto.CheckIn{Version: p.version, Slot: "a", HWClass: p.hwClass, SecurityCounter: 1}, resp)
}

// busyError is a 503 with the wait the server asked for.
type busyError struct{ wait time.Duration }

func (e *busyError) Error() string { return fmt.Sprintf("busy: retry after %v", e.wait) }

func postJSON(ctx context.Context, c *http.Client, url string, in, out any) error {
	body, _ := json.Marshal(in)
	req, err := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, proto.MaxBodyBytes))
	switch resp.StatusCode {
	case http.StatusOK:
		return json.Unmarshal(b, out)
	case http.StatusServiceUnavailable:
		secs, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
		return &busyError{wait: time.Duration(max(secs, 1)) * time.Second}
	default:
		return fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(b))
	}
}

// connect connects every device to the broker (clean session, its own
// certificate, client ID = device ID) and subscribes it to its
// notifications and check-in answers, workers at a time.
func (p *clientProc) connect(req request) reply {
	return p.parallel(req.Workers, func(d *device) error {
		topic, answers := "fp/dev/"+d.id+"/notify", "fp/dev/"+d.id+"/answer"
		opts := paho.NewClientOptions().
			AddBroker("tls://" + req.Broker).
			SetClientID(d.id).
			SetTLSConfig(p.tlsConfig(d)).
			SetDialer(&net.Dialer{Timeout: 30 * time.Second, LocalAddr: &net.TCPAddr{IP: d.src}}).
			SetCleanSession(true).
			SetKeepAlive(60 * time.Second). // as the agent does
			SetConnectTimeout(30 * time.Second).
			SetAutoReconnect(false).
			SetOrderMatters(false).
			SetConnectionLostHandler(func(paho.Client, error) { p.lost.Add(1) })
		c := paho.NewClient(opts)
		tok := c.Connect()
		if !tok.WaitTimeout(40 * time.Second) {
			c.Disconnect(0)
			return errors.New("connect timed out")
		}
		if err := tok.Error(); err != nil {
			return err
		}
		st := c.SubscribeMultiple(map[string]byte{topic: 1, answers: 1}, func(_ paho.Client, m paho.Message) {
			if m.Topic() == answers {
				select {
				case d.answer <- m.Payload():
				default:
				}
				return
			}
			p.notified(d)
		})
		if !st.WaitTimeout(30 * time.Second) {
			c.Disconnect(0)
			return errors.New("subscribe timed out")
		}
		if err := st.Error(); err != nil {
			c.Disconnect(0)
			return err
		}
		if res := st.(*paho.SubscribeToken).Result(); res[topic] > 2 || res[answers] > 2 {
			c.Disconnect(0)
			return fmt.Errorf("subscription refused (%v)", res)
		}
		d.mq = c
		return nil
	})
}

func (p *clientProc) disconnect(req request) reply {
	return p.parallel(req.Workers, func(d *device) error {
		if d.mq != nil {
			d.mq.Disconnect(50)
			d.mq = nil
		}
		return nil
	})
}

// notified is a device hearing its notification: it checks in at once
// (once per armed run; a second notification changes nothing).
func (p *clientProc) notified(d *device) {
	if !p.armed.Load() || !d.notified.CompareAndSwap(0, time.Now().UnixNano()) || p.noCheckIn {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.checkInUntilAnswered(d)
	}()
}

// checkInMQTT is the agent's check-in over MQTT: published on the
// device's check-in topic, answered on its answer topic within 10 s.
func (p *clientProc) checkInMQTT(ctx context.Context, d *device, resp *proto.CheckInResponse) error {
	for len(d.answer) > 0 { // a late answer to an earlier run
		<-d.answer
	}
	id := fmt.Sprintf("%s-%d", d.id, time.Now().UnixNano())
	body, _ := json.Marshal(proto.MQTTCheckIn{RequestID: id,
		CheckIn: proto.CheckIn{Version: p.version, Slot: "a", HWClass: p.hwClass, SecurityCounter: 1}})
	tok := d.mq.Publish("fp/dev/"+d.id+"/checkin", 0, false, body)
	switch { // at QoS 0 the token completes once the check-in is written to the connection
	case !tok.WaitTimeout(10 * time.Second):
		return errors.New("the check-in was not written to the MQTT connection within 10 s")
	case tok.Error() != nil:
		return fmt.Errorf("check-in over MQTT: %w", tok.Error())
	}
	d.sent.CompareAndSwap(0, time.Now().UnixNano())
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case b := <-d.answer:
			var a proto.MQTTAnswer
			if json.Unmarshal(b, &a) != nil || a.RequestID != id {
				continue
			}
			switch a.Status {
			case http.StatusOK:
				return json.Unmarshal(a.Body, resp)
			case http.StatusServiceUnavailable:
				return &busyError{wait: time.Duration(max(a.RetryAfter, 1)) * time.Second}
			}
			return fmt.Errorf("answered %d over MQTT: %s", a.Status, a.Body)
		case <-t.C:
			return errors.New("no answer over MQTT within 10 s")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// checkInUntilAnswered checks in as the agent does: the first time over
// MQTT (with -checkin mqtt), then over HTTPS; after a 503 it waits the
// Retry-After out, after an error it backs off (1 s, doubling; at once
// after an MQTT check-in that went unanswered), with the agent's jitter
// (up to a tenth more), until the deadline. An HTTPS connection slot is
// held only while a request is out.
func (p *clientProc) checkInUntilAnswered(d *device) {
	ctx, cancel := context.WithDeadline(context.Background(), p.deadline)
	defer cancel()
	backoff := time.Second
	for try := 0; ctx.Err() == nil; try++ {
		overMQTT := try == 0 && p.overMQTT
		var resp proto.CheckInResponse
		var err error
		if overMQTT {
			p.attempts.Add(1)
			p.viaMQTT.Add(1)
			d.tries.Add(1)
			err = p.checkInMQTT(ctx, d, &resp)
		} else {
			select {
			case p.sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			for n, m := p.conns.Add(1), p.maxConns.Load(); n > m && !p.maxConns.CompareAndSwap(m, n); m = p.maxConns.Load() {
			}
			p.attempts.Add(1)
			d.tries.Add(1)
			d.sent.CompareAndSwap(0, time.Now().UnixNano()) // the request begins (connection and handshake after)
			err = p.checkIn(ctx, d, &resp)
			p.conns.Add(-1)
			<-p.sem
		}
		var wait time.Duration
		var be *busyError
		switch {
		case err == nil:
			d.answered.Store(time.Now().UnixNano())
			d.offered.Store(resp.Offer != nil)
			return
		case errors.As(err, &be):
			p.busy.Add(1)
			wait = be.wait
		case ctx.Err() != nil:
			return // the deadline passed with the request out: not the server's error
		default:
			p.errs.Add(1)
			s := err.Error()
			p.firstErr.CompareAndSwap(nil, &s)
			if !overMQTT { // an unanswered MQTT check-in goes over HTTPS at once
				wait, backoff = backoff, min(2*backoff, 30*time.Second)
			}
		}
		p.sleep(ctx, wait)
	}
}

// sleep waits d and the agent's jitter (up to a tenth more), or until ctx
// ends; it says whether ctx is still live.
func (p *clientProc) sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d + mrand.N(d/10+1))
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// collect waits until every device was answered (or notified, without
// check-ins) or the deadline passed, and returns what each saw.
func (p *clientProc) collect(req request) reply {
	deadline := time.Unix(0, req.Deadline)
	for time.Now().Before(deadline) {
		all := true
		for _, d := range p.devs {
			if p.noCheckIn && d.notified.Load() == 0 || !p.noCheckIn && d.answered.Load() == 0 {
				all = false
				break
			}
		}
		if all {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.armed.Store(false)
	p.wg.Wait() // the deadline ends every device's attempts
	r := reply{Notified: make([]int64, len(p.devs)), Sent: make([]int64, len(p.devs)), Answered: make([]int64, len(p.devs)), Offered: make([]bool, len(p.devs)), Tries: make([]int32, len(p.devs)),
		Attempts: p.attempts.Load(), ViaMQTT: p.viaMQTT.Load(), Busy: p.busy.Load(), Errors: p.errs.Load(), MaxConns: p.maxConns.Load()}
	for i, d := range p.devs {
		r.Sent[i] = d.sent.Load()
		r.Notified[i], r.Answered[i], r.Offered[i], r.Tries[i] = d.notified.Load(), d.answered.Load(), d.offered.Load(), d.tries.Load()
	}
	if e := p.firstErr.Load(); e != nil {
		r.FirstErr = *e
	}
	return r
}
