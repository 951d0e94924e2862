package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// externalServer starts a server that uses a real Mosquitto, configured as
// docs/OPERATIONS.md says, in place of its embedded broker: the broker
// serves the server's own certificate (made at the server's first start)
// and trusts the device CA.
func externalServer(t *testing.T, flags ...string) (*liveServer, *testenv.Mosquitto) {
	t.Helper()
	dataDir := t.TempDir()
	os.MkdirAll(filepath.Join(dataDir, "image-keys"), 0o755)
	pub, _ := os.ReadFile(filepath.Join(vectors, "mcuboot", "ed25519.pub.pem"))
	os.WriteFile(filepath.Join(dataDir, "image-keys", "release.pub.pem"), pub, 0o644)
	pki := filepath.Join(dataDir, "pki")
	m := testenv.NewMosquitto(t, filepath.Join(pki, "ca.pem"), filepath.Join(pki, "server.pem"), filepath.Join(pki, "server.key.pem"))
	srv := startServer(t, dataDir, "127.0.0.1:0", append(flags, "--mqtt-listen=off", "--mqtt-broker="+m.URL)...)
	if srv.mqtt != m.URL {
		t.Fatalf("the server names %q as its MQTT broker, want %s", srv.mqtt, m.URL)
	}
	m.Start()
	waitFor(t, "the server to connect to mosquitto", 30*time.Second, func() bool { return srv.metric("fieldpatch_mqtt_broker_connects_total") >= 1 })
	return srv, m
}

// metric reads a counter from the server's /metrics (0 when absent).
func (s *liveServer) metric(series string) float64 {
	s.t.Helper()
	ca, err := os.ReadFile(filepath.Join(s.dataDir, "pki", "ca.pem"))
	if err != nil {
		s.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := hc.Get(s.url + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

// listening points a device's agent at an MQTT broker.
func listening(t *testing.T, d *fileDevice, broker string) {
	t.Helper()
	var cfg map[string]any
	b, _ := os.ReadFile(d.cfg)
	json.Unmarshal(b, &cfg)
	cfg["link"] = map[string]string{"bundle": "bundle", "mqtt": broker}
	b, _ = json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(d.cfg, b, 0o644)
}

// With Mosquitto in place of the embedded broker, an agent whose poll
// interval is an hour updates within seconds of a rollout starting: the
// server, connected to Mosquitto with its own certificate, notifies it
// there. The check-in that follows and its progress reports went over
// MQTT, answered there; its outcome over HTTPS.
func TestOnlineExternalMosquittoWakesAgent(t *testing.T) {
	agentBin := agentBinary(t)
	srv, mosq := externalServer(t, "--rollout-tick=200ms", "--poll-interval=1h")
	d := linkedDevice(t, srv, "lock-ext", "fleet")
	listening(t, d, srv.mqtt)
	srv.run("release", "upload", "--id", "lock-2.0.0", d.v2)
	startLives(t, agentBin, map[string]*fileDevice{"lock-ext": d})
	waitFor(t, "the first check-in", 30*time.Second, func() bool { return !srv.device("lock-ext").LastSeen.IsZero() })
	waitFor(t, "the agent to subscribe on mosquitto", 30*time.Second, func() bool { return mosq.Subscribed("lock-ext", "fp/dev/lock-ext/notify") })
	start := time.Now()
	srv.run("rollout", "create", "lock-2.0.0", "--id", "now", "--device", "lock-ext", "--start")
	waitFor(t, "the device to commit 2.0.0", 60*time.Second, func() bool { return lastUpdate(srv.device("lock-ext")) == "committed" })
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("committed %v after the rollout started", took)
	}
	if n := srv.metric("fieldpatch_mqtt_reports_total"); n < 1 {
		t.Errorf("%v progress reports arrived over MQTT, want some", n)
	}
	if n := srv.metric(`fieldpatch_reports_total{status="committed"}`); n != 1 {
		t.Errorf("%v committed reports stored, want 1", n)
	}
	if n := srv.metric("fieldpatch_notifications_total"); n < 1 {
		t.Errorf("%v notifications sent", n)
	}
	if n := srv.metric(`fieldpatch_http_requests_total{api="mqtt",code="200"}`); n < 1 {
		t.Errorf("%v check-ins answered over MQTT, want at least 1", n)
	}
}

// The broker goes down mid-rollout and comes back; every device still
// updates, though each polls only once an hour: the canary of a two-phase
// rollout commits, then the broker dies (the embedded one with its server,
// killed and started again on the same ports; Mosquitto killed while the
// server stays up, so the second phase starts while it is down and its
// notifications cannot be sent). Once it is back, agents reconnect, and
// are notified again or check in as they reconnect; the rest of the fleet
// updates within seconds, not at the next hourly poll.
func TestOnlineBrokerRestartMidRollout(t *testing.T) {
	for _, mode := range []string{"embedded", "external"} {
		t.Run(mode, func(t *testing.T) {
			agentBin := agentBinary(t)
			flags := []string{"--rollout-tick=200ms", "--poll-interval=1h"}
			var srv *liveServer
			var mosq *testenv.Mosquitto
			if mode == "external" {
				srv, mosq = externalServer(t, flags...)
			} else {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				mq, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				ln.Close()
				mq.Close()
				flags = append(flags, "--mqtt-listen="+mq.Addr().String())
				srv = newServer(t, ln.Addr().String(), flags...)
			}
			devs, ids := fleetOf(t, srv, 3, false)
			for _, d := range devs {
				listening(t, d, srv.mqtt)
			}
			srv.run("release", "upload", "--id", "lock-2.0.0", devs[ids[0]].v2)
			startLives(t, agentBin, devs)
			for _, id := range ids {
				waitFor(t, id+"'s first check-in", 30*time.Second, func() bool { return !srv.device(id).LastSeen.IsZero() })
			}
			rid, canaries := pickRollout(t, "broker", ids, 34, 1, 1)
			var canary string
			for c := range canaries {
				canary = c
			}
			srv.run("rollout", "create", "lock-2.0.0", "--id", rid, "--group", "fleet", "--phases", "34,100", "--soak", "3s", "--min-sample", "1", "--start")
			waitFor(t, "the canary to commit", 60*time.Second, func() bool { return lastUpdate(srv.device(canary)) == "committed" })

			if mode == "external" {
				mosq.Kill()
				waitFor(t, "the second phase", 30*time.Second, func() bool { return srv.rollout(rid).Phase == 1 })
				waitFor(t, "the second phase's notifications to be dropped", 10*time.Second, func() bool {
					return srv.metric("fieldpatch_notifications_dropped_total") >= 2
				})
				for _, id := range ids {
					if id != canary && len(srv.device(id).Updates) != 0 {
						t.Fatalf("%s started while the broker was down (it polls hourly; nothing told it)", id)
					}
				}
				mosq.Start()
			} else {
				srv.cmd.Process.Signal(syscall.SIGKILL)
				srv.cmd.Wait()
				srv = startServer(t, srv.dataDir, strings.TrimPrefix(srv.url, "https://"), flags...)
			}
			waitFor(t, "every device to commit", 90*time.Second, func() bool {
				for _, id := range ids {
					if lastUpdate(srv.device(id)) != "committed" {
						return false
					}
				}
				return true
			})
			for _, id := range ids {
				if dv := srv.device(id); len(dv.Updates) != 1 || dv.Version != "2.0.0" {
					t.Errorf("%s: version %s, %d updates (want one)", id, dv.Version, len(dv.Updates))
				}
			}
			if mode == "external" {
				if n := srv.metric("fieldpatch_mqtt_broker_disconnects_total"); n < 1 {
					t.Errorf("the server counted %v lost broker connections, want at least 1", n)
				}
				if n := srv.metric("fieldpatch_mqtt_broker_connects_total"); n < 2 {
					t.Errorf("the server counted %v broker connections, want at least 2", n)
				}
			}
		})
	}
}
