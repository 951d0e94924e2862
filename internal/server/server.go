// Package server assembles the update server: the store, the blob folder,
// the certificate authority, the device API and the management API, served
// over HTTPS (TLS 1.3 only, HTTP/2) on embedded defaults in one data
// directory.
package server

import (
	"cmp"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/blob"
	"github.com/fieldpatch/fieldpatch/internal/server/coapapi"
	"github.com/fieldpatch/fieldpatch/internal/server/deviceapi"
	"github.com/fieldpatch/fieldpatch/internal/server/metrics"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
	"github.com/fieldpatch/fieldpatch/internal/server/notify"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/server/repo"
	"github.com/fieldpatch/fieldpatch/internal/server/rollout"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// Config is the server's configuration.
type Config struct {
	// Listen is the address to serve HTTPS on.
	Listen string
	// DataDir holds everything: fieldpatch.db, blobs/, pki/ (the CA and the
	// server certificate, created on first start), admin.token and
	// image-keys/ (*.pub.pem: the image-signing keys releases must carry).
	DataDir string
	// Hosts are the names and addresses the server certificate covers
	// when the server creates it.
	Hosts []string
	// ImageKeys are more image-signing public key files.
	ImageKeys []string
	// PollInterval is the devices' base check-in interval.
	PollInterval time.Duration
	// DeviceCertLifetime is how long device certificates are valid
	// (default pki.DefaultDeviceLifetime); agents renew at a third left.
	DeviceCertLifetime time.Duration
	// RolloutTick is how often the rollout engine judges gates and
	// advances phases (default 10s).
	RolloutTick time.Duration
	// Clock, if set, is the scheduling clock of rollouts (soak times,
	// windows, rate limits, last seen): a simulation runs it faster. Nil is
	// the real time. Certificates and TLS always use the real time.
	Clock func() time.Time
	// MaxConns caps the connections held at once (default
	// DefaultMaxConns); more wait to be accepted. It bounds the CoAP
	// listener's DTLS sessions too (coapapi.Config.MaxSessions).
	MaxConns int
	// MQTTListen is the address of the embedded MQTT broker devices
	// connect to for notifications and status reports (empty: no
	// embedded broker).
	MQTTListen string
	// MQTTBroker is an external MQTT broker (mqtts://HOST:PORT, such as
	// Mosquitto) to use instead of the embedded one: the server connects
	// to it as a client with a certificate of its own (notify.ServerIdentity)
	// and devices connect there. It excludes MQTTListen.
	MQTTBroker string
	// CoAPListen is the UDP address of the device API over CoAP on DTLS
	// (empty: none).
	CoAPListen string
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("listen address is required"))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("data directory is required"))
	}
	if c.PollInterval < 0 {
		errs = append(errs, errors.New("poll interval must not be negative"))
	}
	if c.MaxConns < 0 {
		errs = append(errs, errors.New("connection cap must not be negative"))
	}
	if c.RolloutTick < 0 {
		errs = append(errs, errors.New("rollout tick must not be negative"))
	}
	if c.MQTTBroker != "" {
		if _, _, err := notify.ParseBroker(c.MQTTBroker); err != nil {
			errs = append(errs, err)
		}
		if c.MQTTListen != "" {
			errs = append(errs, errors.New("an external MQTT broker and the embedded one exclude each other: set mqtt_listen off"))
		}
	}
	return errors.Join(errs...)
}

// Server is a configured update server.
type Server struct {
	Metrics *metrics.Registry
	Store   *store.Store
	CA      *pki.CA
	TLS     *tls.Config
	Handler http.Handler
	Token   string
	// Engine advances rollouts; Serve runs it every tick.
	Engine *rollout.Engine
	// Repo is the TUF repository; Serve re-signs its timestamp in time.
	Repo     *repo.Repo
	tick     time.Duration
	maxConns int
	// Broker is the embedded MQTT broker (nil when off).
	Broker *notify.Broker
	// MQTT is the connection to an external MQTT broker (nil when none).
	MQTT *notify.Client
	// renotify asks notifyRollouts to notify every current cohort again
	// (the external broker is back after an outage).
	renotify chan struct{}
	// changed wakes notifyRollouts at once when a rollout changes (an
	// operator's command, or the engine moving a phase), instead of at
	// its next look.
	changed chan struct{}
	// CoAP serves the device API over CoAP on DTLS (nil when off).
	CoAP *coapapi.Server
	log  *slog.Logger
}

// New opens (or, on first start, creates) everything in the data directory.
func New(ctx context.Context, c Config, lg *slog.Logger) (*Server, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(c.DataDir, 0o700); err != nil {
		return nil, err
	}
	st, err := store.Open(ctx, filepath.Join(c.DataDir, "fieldpatch.db"))
	if err != nil {
		return nil, err
	}
	// last_seen is kept to a tenth of the poll interval (at most a minute):
	// a repeated check-in within that is answered without a write.
	st.LastSeenResolution = min(c.PollInterval/10, time.Minute)
	st.Log = lg
	if c.Clock != nil {
		st.SetClock(c.Clock)
	}
	pkiDir := filepath.Join(c.DataDir, "pki")
	ca, created, err := pki.LoadOrCreateCA(pkiDir)
	if err != nil {
		st.Close()
		return nil, err
	}
	if created {
		lg.Info("created a certificate authority for devices", "ca", filepath.Join(pkiDir, "ca.pem"))
	}
	ca.DeviceLifetime = c.DeviceCertLifetime
	hosts := c.Hosts
	if len(hosts) == 0 {
		hosts = []string{"localhost", "127.0.0.1", "::1"}
	}
	cert, created, err := ca.LoadOrCreateServerCert(pkiDir, hosts)
	if err != nil {
		st.Close()
		return nil, err
	}
	if created {
		lg.Info("created a server certificate", "cert", filepath.Join(pkiDir, "server.pem"), "hosts", hosts)
	}
	token, err := adminToken(filepath.Join(c.DataDir, "admin.token"), lg)
	if err != nil {
		st.Close()
		return nil, err
	}
	keys, err := imageKeys(c)
	if err != nil {
		st.Close()
		return nil, err
	}
	if len(keys) == 0 {
		lg.Warn("no image-signing keys: every release upload will be refused", "add", filepath.Join(c.DataDir, "image-keys", "NAME.pub.pem"))
	}
	if n, _ := strconv.Atoi(os.Getenv("FIELDPATCH_TEST_FAIL_OUTCOME_REPORTS")); n > 0 {
		// Test-only: the first n outcome reports fail to commit, as a full
		// disk would make them, so tests can see devices send them again.
		lg.Warn("test mode: failing outcome report commits", "count", n)
		st.BeforeReportCommit = func(status string) error {
			if proto.Final(status) && n > 0 {
				n--
				return errors.New("injected commit failure")
			}
			return nil
		}
	}
	tuf, err := repo.Open(filepath.Join(c.DataDir, "tuf"))
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("TUF repository: %w", err)
	}
	st.Offerable = func(r *store.Release) bool { return tuf.Offerable(r.HWClass, r.Version, r.Length, r.SHA256) }
	blobs := &blob.Store{Dir: filepath.Join(c.DataDir, "blobs")}
	reg := metrics.New()
	reg.Counter("fieldpatch_http_requests_total", "HTTP requests by API and status code.", "api", "code")
	reg.Histogram("fieldpatch_http_request_duration_seconds", "HTTP request latency by API.", metrics.LatencyBuckets, "api")
	dev := &deviceapi.API{Store: st, Blobs: blobs, Log: lg, PollInterval: c.PollInterval, Metrics: reg, CA: ca, Repo: tuf}
	changed := make(chan struct{}, 1)
	rolloutChanged := func() {
		select {
		case changed <- struct{}{}:
		default: // a look is already due
		}
	}
	mgmt := &mgmtapi.API{Store: st, Blobs: blobs, CA: ca, ImageKeys: keys, Token: token, Log: lg, Repo: tuf, RolloutChanged: rolloutChanged}
	mux := http.NewServeMux()
	devHandler := dev.Handler() // HTTPS, CoAP and MQTT check-ins share its bounds
	mux.Handle("/api/v1/", instrument(reg, "device", devHandler))
	mux.Handle("/api/mgmt/v1/", instrument(reg, "management", mgmt.Handler()))
	mux.Handle("GET "+mgmtapi.PathOpenAPI, mgmt.Handler())
	mux.Handle("GET /metrics", reg.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := st.Ping(ctx); err != nil {
			http.Error(w, "database: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	reg.Counter("fieldpatch_notifications_total", "Devices notified over MQTT that an update may wait for them.")
	reg.Counter("fieldpatch_rollout_decisions_total", "Rollout phases advanced and gates tripped by the engine.", "kind")
	clock := c.Clock
	if clock == nil {
		clock = time.Now
	}
	tick := c.RolloutTick
	if tick == 0 {
		tick = 10 * time.Second
	}
	engine := &rollout.Engine{Backend: st, Now: clock, Log: lg, Decided: func(e rollout.Event) {
		reg.Add("fieldpatch_rollout_decisions_total", 1, e.Kind)
		rolloutChanged()
	}}
	srv := &Server{
		Store: st, CA: ca, Token: token, Handler: mux, Metrics: reg, log: lg, Engine: engine, tick: tick, Repo: tuf, maxConns: cmp.Or(c.MaxConns, DefaultMaxConns),
		changed: changed,
		TLS: &tls.Config{
			MinVersion:   tls.VersionTLS13, // TLS 1.2 and older are refused
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.VerifyClientCertIfGiven, // devices must present one; operators use a token
			ClientCAs:    ca.Pool(),
			NextProtos:   []string{"h2", "http/1.1"},
		},
	}
	if err := srv.setUpMQTT(c, reg, instrument(reg, "mqtt", devHandler)); err != nil {
		st.Close()
		return nil, err
	}
	if c.CoAPListen != "" {
		reg.Counter("fieldpatch_coap_sessions_closed_total", "DTLS sessions closed by the session bounds, by reason (full: a new session refused, every slot held; replaced: a device's oldest session, for its new one).", "reason")
		cs, err := coapapi.Listen(c.CoAPListen, coapapi.Config{Handler: instrument(reg, "coap", devHandler), Certificate: cert,
			ClientCAs: ca.Pool(), Log: lg, MaxSessions: cmp.Or(c.MaxConns, DefaultMaxConns),
			Closed: func(reason string) { reg.Add("fieldpatch_coap_sessions_closed_total", 1, reason) },
			PSK: func(id string) ([]byte, error) {
				psk, err := st.DevicePSK(context.Background(), id)
				return []byte(psk), err
			}})
		if err != nil {
			srv.Close()
			return nil, err
		}
		srv.CoAP = cs
	}
	return srv, nil
}

// Serve serves on ln until ctx ends, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s.Handler,
		TLSConfig:         s.TLS,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          log.New(slogWriter{s.log}, "", 0),
	}
	errc := make(chan error, 1)
	ln = limitConns(ln, s.maxConns)
	go func() { errc <- hs.ServeTLS(ln, "", "") }()
	ectx, stopEngine := context.WithCancel(ctx)
	defer stopEngine()
	go s.Engine.Run(ectx, s.tick)
	if s.Broker != nil {
		if err := s.Broker.Serve(); err != nil {
			return fmt.Errorf("mqtt broker: %w", err)
		}
		s.log.Info("mqtt broker serving", "addr", s.Broker.Addr().String())
		defer s.Broker.Close()
	}
	if s.MQTT != nil {
		s.MQTT.Start()
		defer s.MQTT.Close()
	}
	if n := s.notifier(); n != nil {
		go s.notifyRollouts(ectx, n, time.Second)
	}
	if s.CoAP != nil {
		s.CoAP.Serve()
		s.log.Info("coap serving", "addr", s.CoAP.Addr().String())
		defer s.CoAP.Close()
	}
	go s.refreshTUF(ectx)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
		return nil
	}
}

// notifyRollouts tells devices over MQTT when a rollout lets them in: each
// time an active rollout is seen in a new state (started, a new phase,
// resumed), the devices of its current cohort that have neither the
// release nor an outcome for it are notified once. A device that is not
// connected finds the offer at its next poll.
func (s *Server) notifyRollouts(ctx context.Context, n notifier, every time.Duration) {
	seen := map[string]bool{}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		rs, err := s.Store.Rollouts(ctx, rollout.StateActive)
		if err != nil && ctx.Err() == nil {
			s.log.Error("notify: listing rollouts", "err", err)
		}
		live := map[string]bool{}
		for i := range rs {
			r := &rs[i]
			key := fmt.Sprintf("%s/%d/%d/%d", r.Spec.ID, r.Phase, r.StartedAt.UnixNano(), r.Baseline.At.UnixNano())
			live[key] = true
			if seen[key] {
				continue
			}
			began := time.Now()
			ids, err := s.Store.CohortWaiting(ctx, r, r.Phase)
			if err != nil {
				s.log.Error("notify: cohort", "rollout", r.Spec.ID, "err", err)
				continue
			}
			listed := time.Now()
			err = n.Notify("update", ids...)
			if err == nil && len(ids) > 0 {
				s.log.Info("notify: cohort notified", "rollout", r.Spec.ID, "phase", r.Phase, "devices", len(ids),
					"listed_ms", listed.Sub(began).Milliseconds(), "published_ms", time.Since(listed).Milliseconds())
			}
			switch {
			case errors.Is(err, notify.ErrNotConnected):
				// Those devices poll; when the broker is back the cohort
				// is notified again (renotify).
				s.Metrics.Add("fieldpatch_notifications_dropped_total", float64(len(ids)))
			case err != nil:
				s.log.Warn("notify", "rollout", r.Spec.ID, "err", err)
				s.Metrics.Add("fieldpatch_notifications_total", float64(len(ids)))
			default:
				s.Metrics.Add("fieldpatch_notifications_total", float64(len(ids)))
			}
			seen[key] = true
		}
		for k := range seen { // forget rollouts that moved on or ended
			if !live[k] {
				delete(seen, k)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.renotify:
			clear(seen)
		case <-s.changed:
		}
	}
}

// notifier is where notifications go: the embedded broker or the
// connection to an external one.
type notifier interface {
	Notify(kind string, deviceIDs ...string) error
}

func (s *Server) notifier() notifier {
	switch {
	case s.Broker != nil:
		return s.Broker
	case s.MQTT != nil:
		return s.MQTT
	}
	return nil
}

// setUpMQTT makes the embedded broker or the client of an external one,
// both taking the status reports devices publish and answering their
// check-ins with devAPI, the device API's handler.
func (s *Server) setUpMQTT(c Config, reg *metrics.Registry, devAPI http.Handler) error {
	reg.Counter("fieldpatch_notifications_dropped_total", "Device notifications not sent because the external MQTT broker was down (those devices poll, and are notified again once it is back).")
	reg.Counter("fieldpatch_mqtt_reports_total", "Status reports received over MQTT and stored.")
	reg.Counter("fieldpatch_mqtt_rejected_total", "Status reports over MQTT refused (nothing stored), by reason.", "reason")
	reg.Counter("fieldpatch_mqtt_checkins_rejected_total", "Check-ins over MQTT dropped or answered before reaching the device API, by reason.", "reason")
	reg.Counter("fieldpatch_mqtt_broker_connects_total", "Connections made to the external MQTT broker.")
	reg.Counter("fieldpatch_mqtt_broker_disconnects_total", "Connections to the external MQTT broker lost.")
	allowed := func(id string) bool { return s.Store.Active(context.Background(), id) == nil }
	reports := &notify.Reports{
		Record:   s.Store.RecordReport,
		NoUpdate: store.ErrNotFound,
		Allowed:  allowed,
		Stored: func(status string) {
			reg.Add("fieldpatch_reports_total", 1, status)
			reg.Add("fieldpatch_mqtt_reports_total", 1)
		},
		Refused: func(reason string) { reg.Add("fieldpatch_mqtt_rejected_total", 1, reason) },
		Log:     s.log,
	}
	checkIns := &notify.CheckIns{Handler: devAPI, Log: s.log,
		Refused: func(reason string) { reg.Add("fieldpatch_mqtt_checkins_rejected_total", 1, reason) }}
	switch {
	case c.MQTTListen != "":
		b, err := notify.Listen(c.MQTTListen, notify.Config{TLS: s.TLS, Log: s.log, Allowed: allowed, Reports: reports, CheckIns: checkIns})
		if err != nil {
			return err
		}
		s.Broker = b
	case c.MQTTBroker != "":
		s.renotify = make(chan struct{}, 1)
		cl, err := notify.NewClient(notify.ClientConfig{Broker: c.MQTTBroker, CA: s.CA, Reports: reports, CheckIns: checkIns, Log: s.log,
			Up: func() {
				reg.Add("fieldpatch_mqtt_broker_connects_total", 1)
				select {
				case s.renotify <- struct{}{}:
				default:
				}
			},
			Down: func(error) { reg.Add("fieldpatch_mqtt_broker_disconnects_total", 1) }})
		if err != nil {
			return err
		}
		s.MQTT = cl
	}
	return nil
}

// refreshTUF re-signs the online TUF metadata at half its lifetime, checking
// every minute, so devices never see it expire while the server runs.
func (s *Server) refreshTUF(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		if did, err := s.Repo.Refresh(); err != nil {
			s.log.Error("TUF timestamp refresh", "err", err)
		} else if did {
			s.log.Info("re-signed the TUF timestamp")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// instrument counts requests and their latency.
func instrument(reg *metrics.Registry, api string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		h.ServeHTTP(sw, r)
		reg.Add("fieldpatch_http_requests_total", 1, api, strconv.Itoa(sw.code))
		reg.Observe("fieldpatch_http_request_duration_seconds", metrics.Since(start), api)
	})
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (s *statusWriter) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the real writer.
func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Close closes the store.
func (s *Server) Close() error {
	if s.Broker != nil {
		s.Broker.Close()
	}
	if s.MQTT != nil {
		s.MQTT.Close()
	}
	if s.CoAP != nil {
		s.CoAP.Close()
	}
	return s.Store.Close()
}

type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Debug(strings.TrimSpace(string(p)))
	return len(p), nil
}

func adminToken(path string, lg *slog.Logger) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		return strings.TrimSpace(string(b)), nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	var raw [24]byte
	rand.Read(raw[:])
	tok := hex.EncodeToString(raw[:])
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		return "", err
	}
	lg.Info("created the admin token", "file", path)
	return tok, nil
}

func imageKeys(c Config) ([]crypto.PublicKey, error) {
	paths, _ := filepath.Glob(filepath.Join(c.DataDir, "image-keys", "*.pub.pem"))
	paths = append(paths, c.ImageKeys...)
	var keys []crypto.PublicKey
	for _, p := range paths {
		k, err := trust.LoadPublicKey(p)
		if err != nil {
			return nil, fmt.Errorf("image key: %w", err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}
