package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
)

func fieldpatchBinary(t *testing.T) string { return binary(t, "../fieldpatch", "fieldpatch") }

// liveServer is a real `fieldpatch serve` process on loopback.
type liveServer struct {
	t       *testing.T
	bin     string
	dataDir string
	url     string
	mqtt    string // mqtts://HOST:PORT
	coap    string // coaps://HOST:PORT, with --coap-listen
	cmd     *exec.Cmd
}

// newServer starts a server whose image key is the test key, in a new
// data directory.
func newServer(t *testing.T, listen string, env ...string) *liveServer {
	t.Helper()
	dataDir := t.TempDir()
	os.MkdirAll(filepath.Join(dataDir, "image-keys"), 0o755)
	pub, _ := os.ReadFile(filepath.Join(vectors, "mcuboot", "ed25519.pub.pem"))
	os.WriteFile(filepath.Join(dataDir, "image-keys", "release.pub.pem"), pub, 0o644)
	return startServer(t, dataDir, listen, env...)
}

func startServer(t *testing.T, dataDir, listen string, env ...string) *liveServer {
	t.Helper()
	s := &liveServer{t: t, bin: fieldpatchBinary(t), dataDir: dataDir}
	args := []string{"serve", "--listen", listen, "--data-dir", dataDir, "--poll-interval", "1s", "--mqtt-listen", "127.0.0.1:0"}
	s.cmd = exec.Command(s.bin)
	s.cmd.Env = os.Environ()
	for _, e := range env { // "--flag=value" entries are server flags, the rest environment
		if strings.HasPrefix(e, "--") {
			args = append(args, e)
		} else {
			s.cmd.Env = append(s.cmd.Env, e)
		}
	}
	s.cmd.Args = append(s.cmd.Args, args...)
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = nil
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// At the end the server is stopped as a service manager stops it: with
	// SIGTERM, after which it must finish and exit 0 (unless a test killed
	// it already).
	t.Cleanup(func() {
		if s.cmd.ProcessState != nil {
			return
		}
		s.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- s.cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("the server did not exit cleanly on SIGTERM: %v", err)
			}
		case <-time.After(15 * time.Second):
			s.cmd.Process.Kill()
			<-done
			t.Error("the server did not stop within 15 s of SIGTERM")
		}
	})
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if u, ok := strings.CutPrefix(sc.Text(), "serving on "); ok {
			s.url = u
			break
		}
	}
	if s.url == "" {
		t.Fatal("the server did not start")
	}
	for sc.Scan() { // CA, token, then the MQTT broker's address
		if a, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "MQTT broker     "); ok {
			s.mqtt, _, _ = strings.Cut(a, " ")
			break
		}
	}
	if slices.ContainsFunc(env, func(e string) bool { return strings.HasPrefix(e, "--coap-listen=") }) {
		for sc.Scan() {
			if a, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "CoAP over DTLS  "); ok {
				s.coap, _, _ = strings.Cut(a, " ")
				break
			}
		}
	}
	go func() {
		for sc.Scan() {
		}
	}()
	return s
}

func (s *liveServer) run(args ...string) string {
	s.t.Helper()
	args = append(args, "--server", s.url, "--data-dir", s.dataDir)
	out, err := exec.Command(s.bin, args...).CombinedOutput()
	if err != nil {
		s.t.Fatalf("fieldpatch %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// deviceView is what `fieldpatch device show` prints (decoded here rather
// than imported: device-side code never imports server packages).
type deviceView struct {
	Version  string    `json:"version"`
	LastSeen time.Time `json:"last_seen"`
	Updates  []struct {
		Status  string `json:"status"`
		Reason  string `json:"reason"`
		LogTail string `json:"log_tail"`
	} `json:"updates"`
}

func (s *liveServer) device(id string) deviceView {
	s.t.Helper()
	var v deviceView
	if err := json.Unmarshal([]byte(s.run("device", "show", id)), &v); err != nil {
		s.t.Fatal(err)
	}
	return v
}

// onlineDevice is a file-backed device provisioned on the server.
func onlineDevice(t *testing.T, s *liveServer, id string) *fileDevice {
	t.Helper()
	d := newFileDevice(t)
	bundle := filepath.Join(d.dir, "bundle")
	s.run("device", "provision", id, "--group", "lab", "--out", bundle)
	var cfg map[string]any
	b, _ := os.ReadFile(d.cfg)
	json.Unmarshal(b, &cfg)
	cfg["link"] = map[string]string{"bundle": "bundle"}
	b, _ = json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(d.cfg, b, 0o644)
	return d
}

// daemon runs `fieldpatch-agent run` until it exits by itself (a reboot is
// needed) or until stop says so, then stops it.
func (d *fileDevice) daemon(bin string, stop func() bool) {
	d.t.Helper()
	cmd := exec.Command(bin, "run", "--config", d.cfg)
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case err := <-done:
			if err != nil {
				d.t.Fatalf("agent daemon: %v", err)
			}
			return
		case <-deadline:
			cmd.Process.Kill()
			d.t.Fatal("agent daemon did not finish in time")
		case <-time.After(100 * time.Millisecond):
			if stop() {
				cmd.Process.Signal(syscall.SIGTERM)
				<-done
				return
			}
		}
	}
}

func lastUpdate(v deviceView) string {
	if len(v.Updates) == 0 {
		return ""
	}
	return v.Updates[0].Status
}

// End to end: a real server, real agents with file-backed slots; an update
// assigned to a group is downloaded, installed, trial-booted, committed and
// reported; a firmware that fails its health check is rolled back, the
// server records why, and the release is not offered to it again.
func TestOnlineUpdate(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0")

	good := onlineDevice(t, srv, "lock-1")
	bad := onlineDevice(t, srv, "lock-2")
	os.WriteFile(filepath.Join(bad.dir, "hooks/b/health-check"), []byte("#!/bin/sh\necho 'service does not answer' >&2\nexit 1\n"), 0o755)
	srv.run("release", "upload", "--id", "lock-2.0.0", good.v2)
	srv.run("release", "assign", "lock-2.0.0", "--group", "lab")
	var rels []struct{ ID, Version, HW string }
	json.Unmarshal([]byte(srv.run("release", "list", "--json", "--hw-class", "lock")), &rels)
	if len(rels) != 1 || rels[0].ID != "lock-2.0.0" || rels[0].Version != "2.0.0" {
		t.Fatalf("release list: %+v", rels)
	}
	if out := srv.run("release", "list", "--json", "--hw-class", "other-board"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("release list for other hardware: %s", out)
	}

	for _, d := range []*fileDevice{good, bad} {
		d.daemon(agentBin, func() bool { return false }) // installs, then asks for a reboot
		d.must("boot", "--config", d.cfg)                // the trial boot
	}
	// On trial: lock-1 commits; lock-2 fails its health check and rolls back.
	good.daemon(agentBin, func() bool { return lastUpdate(srv.device("lock-1")) == "committed" })
	bad.daemon(agentBin, func() bool { return false }) // rolls back, asks for a reboot into slot a
	bad.must("boot", "--config", bad.cfg)
	bad.daemon(agentBin, func() bool { return lastUpdate(srv.device("lock-2")) == "rolled_back" })

	v1, v2 := srv.device("lock-1"), srv.device("lock-2")
	if v1.Version != "2.0.0" || lastUpdate(v1) != "committed" {
		t.Fatalf("lock-1 on the server: %+v", v1)
	}
	if st, f := good.status(); f.RunningVersion != "2.0.0" || st.Last.Result != agent.ResultCommitted || !st.Last.Reported {
		t.Fatalf("lock-1: %+v %+v", st.Last, f)
	}
	if lastUpdate(v2) != "rolled_back" || !strings.Contains(v2.Updates[0].Reason, "health-check") || v2.Updates[0].LogTail == "" {
		t.Fatalf("lock-2 on the server: %+v", v2.Updates)
	}
	// lock-2 checks in again and is not offered the release again.
	bad.daemon(agentBin, func() bool { return srv.device("lock-2").LastSeen.After(v2.LastSeen) })
	if v := srv.device("lock-2"); len(v.Updates) != 1 || v.Version != "1.0.0" {
		t.Fatalf("lock-2 after checking in again: version %s, %d updates", v.Version, len(v.Updates))
	}
	if st, _ := bad.status(); st.Phase != agent.PhaseIdle {
		t.Fatalf("lock-2 started another update: %s", st.Phase)
	}
	// Operations: health, readiness and metrics that count what happened.
	ca, _ := os.ReadFile(filepath.Join(srv.dataDir, "pki", "ca.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	get := func(path string) string {
		resp, err := hc.Get(srv.url + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %s", path, resp.Status)
		}
		return string(b)
	}
	if get("/healthz") != "ok\n" || get("/readyz") != "ready\n" {
		t.Error("health endpoints")
	}
	m := get("/metrics")
	for _, want := range []string{`fieldpatch_reports_total{status="committed"} 1`, `fieldpatch_reports_total{status="rolled_back"} 1`,
		`fieldpatch_offers_total 2`, `fieldpatch_http_requests_total{api="device",code="200"}`, `fieldpatch_http_request_duration_seconds_bucket{api="device",le="+Inf"}`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// The server is killed with SIGKILL while a device is on trial and comes
// back later: the device commits locally, its outcome report is refused by
// the dead link, kept in the journal, and sent again once the server is
// back; nothing the server acknowledged before the kill is lost.
func TestOnlineServerKilledAndRestarted(t *testing.T) {
	agentBin := agentBinary(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	srv := newServer(t, addr)
	dataDir := srv.dataDir
	d := onlineDevice(t, srv, "lock-9")
	srv.run("release", "upload", "--id", "lock-2.0.0", d.v2)
	srv.run("release", "assign", "lock-2.0.0", "--device", "lock-9")
	d.daemon(agentBin, func() bool { return false }) // installs, asks for a reboot
	if got := lastUpdate(srv.device("lock-9")); got != "rebooting" {
		t.Fatalf("before the kill the server recorded %q", got)
	}
	srv.cmd.Process.Signal(syscall.SIGKILL)
	srv.cmd.Wait()

	d.must("boot", "--config", d.cfg)
	d.daemon(agentBin, func() bool {
		st, _ := d.status()
		return st.Last != nil
	}) // commits on trial; the report cannot be delivered
	st, f := d.status()
	if st.Last.Result != agent.ResultCommitted || st.Last.Reported || f.RunningVersion != "2.0.0" {
		t.Fatalf("with the server down: %+v %+v", st.Last, f)
	}
	srv2 := startServer(t, dataDir, addr)
	if got := lastUpdate(srv2.device("lock-9")); got != "rebooting" {
		t.Fatalf("after the restart the server has %q: an acknowledged report was lost", got)
	}
	d.daemon(agentBin, func() bool { return lastUpdate(srv2.device("lock-9")) == "committed" })
	if st, _ := d.status(); !st.Last.Reported {
		t.Fatalf("the outcome was stored but the device still thinks it unreported")
	}
}

// cutProxy forwards TCP to the server and cuts the first connection once it
// has carried cutAfter bytes to the device; it counts every byte served.
type cutProxy struct {
	ln       net.Listener
	target   string
	cutAfter int64
	mu       sync.Mutex
	conns    int
	served   int64
}

func (p *cutProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns++
		first := p.conns == 1
		p.mu.Unlock()
		go func() {
			defer c.Close()
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				return
			}
			defer up.Close()
			go func() { io.Copy(up, c) }()
			buf := make([]byte, 32<<10)
			var n int64
			for {
				k, err := up.Read(buf)
				if k > 0 {
					if first && n+int64(k) > p.cutAfter {
						return // the link drops
					}
					c.Write(buf[:k])
					n += int64(k)
					p.mu.Lock()
					p.served += int64(k)
					p.mu.Unlock()
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// The link drops in the middle of an 11 MiB download: the agent resumes with
// a Range request from its recorded offset instead of starting over, and
// the update completes.
func TestOnlineDownloadResumesAfterTheLinkDrops(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0")
	d := onlineDevice(t, srv, "lock-5")
	big := filepath.Join(d.dir, "v2-big.img")
	img := buildImage(t, "2.0.0", 2, 12<<20)
	os.WriteFile(big, img, 0o644)
	for _, s := range []string{"slot-a.img", "slot-b.img"} { // slots big enough
		f, _ := os.OpenFile(filepath.Join(d.dir, s), os.O_WRONLY, 0)
		f.Truncate(16 << 20)
		f.Close()
	}
	srv.run("release", "upload", "--id", "lock-2.0.0-big", big)
	srv.run("release", "assign", "lock-2.0.0-big", "--device", "lock-5")

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p := &cutProxy{ln: ln, target: strings.TrimPrefix(srv.url, "https://"), cutAfter: 6 << 20}
	go p.serve()
	bundleJSON := filepath.Join(d.dir, "bundle", "bundle.json")
	b, _ := os.ReadFile(bundleJSON)
	os.WriteFile(bundleJSON, []byte(strings.Replace(string(b), srv.url, "https://"+ln.Addr().String(), 1)), 0o644)

	d.daemon(agentBin, func() bool { return false }) // downloads (cut, resumed), installs, asks for a reboot
	p.mu.Lock()
	served, conns := p.served, p.conns
	p.mu.Unlock()
	if conns < 2 {
		t.Fatalf("the link was never cut (%d connections)", conns)
	}
	// Cut at 6 MiB: a download resumed from where it was cut (the fetcher
	// syncs and records its offset when the link errors) or from its last
	// 4 MiB checkpoint (after a power cut) serves at most image + 2 MiB; a
	// restarted one serves image + 6 MiB.
	if served >= int64(len(img))+4<<20 || served < int64(len(img)) {
		t.Fatalf("%d bytes served for a %d-byte image: the download did not resume from its offset", served, len(img))
	}
	t.Logf("%d connections, %.1f MiB served for a %.1f MiB image", conns, float64(served)/(1<<20), float64(len(img))/(1<<20))
	d.must("boot", "--config", d.cfg)
	d.daemon(agentBin, func() bool { return lastUpdate(srv.device("lock-5")) == "committed" })
}

// Commits of the outcome report fail in the server's store (injected): the
// server does not acknowledge them, and the device sends the outcome again
// until one is stored.
func TestOnlineReportCommitFailure(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "FIELDPATCH_TEST_FAIL_OUTCOME_REPORTS=2")
	d := onlineDevice(t, srv, "lock-4")
	srv.run("release", "upload", "--id", "lock-2.0.0", d.v2)
	srv.run("release", "assign", "lock-2.0.0", "--device", "lock-4")
	d.daemon(agentBin, func() bool { return false })
	d.must("boot", "--config", d.cfg)
	sawUnreported := false
	d.daemon(agentBin, func() bool {
		if st, _ := d.status(); st.Last != nil && !st.Last.Reported {
			sawUnreported = true
		}
		return lastUpdate(srv.device("lock-4")) == "committed"
	})
	if !sawUnreported {
		t.Error("the device never held an unacknowledged outcome: the injected failures did not happen")
	}
	st, _ := d.status()
	if st.Last == nil || st.Last.Result != agent.ResultCommitted {
		t.Fatalf("device outcome %+v", st.Last)
	}
	// The daemon marks it reported once the server stored it.
	deadline := time.Now().Add(10 * time.Second)
	for !st.Last.Reported && time.Now().Before(deadline) {
		d.daemon(agentBin, func() bool { s, _ := d.status(); return s.Last.Reported })
		st, _ = d.status()
	}
	if !st.Last.Reported {
		t.Fatal("the outcome stayed unreported after the server stored it")
	}
}

// enrollingDevice is a device whose config enrolls it on first start.
func enrollingDevice(t *testing.T, s *liveServer, id, token string) *fileDevice {
	t.Helper()
	d := newFileDevice(t)
	ca, _ := os.ReadFile(filepath.Join(s.dataDir, "pki", "ca.pem"))
	os.WriteFile(filepath.Join(d.dir, "server-ca.pem"), ca, 0o644)
	enroll := map[string]string{"server": s.url, "ca": "server-ca.pem", "device_id": id, "poll": "200ms"}
	if token != "" {
		os.WriteFile(filepath.Join(d.dir, "token"), []byte(token+"\n"), 0o600)
		enroll["token_file"] = "token"
	}
	var cfg map[string]any
	b, _ := os.ReadFile(d.cfg)
	json.Unmarshal(b, &cfg)
	cfg["link"] = map[string]any{"bundle": "bundle", "enroll": enroll}
	b, _ = json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(d.cfg, b, 0o644)
	return d
}

// Enrollment by a fleet token and by an operator's approval; a token's uses
// run out; the certificate is renewed with a new key.
func TestOnlineEnrollment(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--coap-listen=127.0.0.1:0")
	token := strings.Fields(srv.run("enroll-token", "create", "--group", "lab", "--uses", "1", "--ttl", "1h"))[0]

	byToken := enrollingDevice(t, srv, "lock-20", token)
	byToken.daemon(agentBin, func() bool { return !srv.device("lock-20").LastSeen.IsZero() })
	var listed []struct {
		ID     string   `json:"id"`
		Groups []string `json:"groups"`
	}
	json.Unmarshal([]byte(srv.run("device", "list", "--json")), &listed)
	if len(listed) != 1 || listed[0].ID != "lock-20" || len(listed[0].Groups) != 1 || listed[0].Groups[0] != "lab" {
		t.Fatalf("devices after enrolling by token: %+v", listed)
	}
	if fi, err := os.Stat(filepath.Join(byToken.dir, "bundle", "device.key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the device key: %v", err)
	}

	// The token had one use.
	second := enrollingDevice(t, srv, "lock-21", token)
	out, err := exec.Command(agentBin, "run", "--config", second.cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "403") {
		t.Fatalf("a used-up token enrolled another device: %v\n%s", err, out)
	}

	// Without a token the device waits for approval.
	waiting := enrollingDevice(t, srv, "lock-22", "")
	approved := false
	waiting.daemon(agentBin, func() bool {
		if !approved && strings.Contains(srv.run("device", "pending"), "lock-22") {
			srv.run("device", "approve", "lock-22", "--group", "lab")
			approved = true
		}
		return approved && !srv.device("lock-22").LastSeen.IsZero()
	})

	// Renewal: a new key and certificate, and the device keeps working.
	before, _ := os.ReadFile(filepath.Join(byToken.dir, "bundle", "device.pem"))
	if out := byToken.must("renew", "--config", byToken.cfg); !strings.Contains(out, "renewed") {
		t.Fatalf("renew said %q", out)
	}
	identity, err := os.ReadFile(filepath.Join(byToken.dir, "bundle", "identity.pem"))
	if err != nil || bytes.Contains(identity, before) {
		t.Fatalf("renewal did not replace the certificate: %v", err)
	}
	seen := srv.device("lock-20").LastSeen
	byToken.daemon(agentBin, func() bool { return srv.device("lock-20").LastSeen.After(seen) })

	// Enrollment also gave it a pre-shared key: the same device checks in
	// over CoAP with it.
	if fi, err := os.Stat(filepath.Join(byToken.dir, "bundle", "psk.txt")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the pre-shared key: %v", err)
	}
	var cfg map[string]any
	b, _ := os.ReadFile(byToken.cfg)
	json.Unmarshal(b, &cfg)
	cfg["link"].(map[string]any)["coap"] = srv.coap
	cfg["link"].(map[string]any)["coap_auth"] = "psk"
	b, _ = json.MarshalIndent(cfg, "", "  ")
	os.WriteFile(byToken.cfg, b, 0o644)
	seen = srv.device("lock-20").LastSeen
	byToken.daemon(agentBin, func() bool { return srv.device("lock-20").LastSeen.After(seen) })
	if !strings.Contains(srv.metrics(), `fieldpatch_http_requests_total{api="coap",code="200"}`) {
		t.Error("the check-in did not come over CoAP")
	}
}

// A daemon that runs for longer than its certificate lives renews it on the
// way (at a third of its lifetime left), without a restart, and keeps
// checking in after the certificates it started with have expired.
func TestOnlineDaemonRenews(t *testing.T) {
	agentBin := agentBinary(t)
	srv := newServer(t, "127.0.0.1:0", "--device-cert-lifetime=5s")
	d := onlineDevice(t, srv, "lock-30")
	read := func(name string) *x509.Certificate {
		b, err := os.ReadFile(filepath.Join(d.dir, "bundle", name))
		if err != nil {
			return nil
		}
		block, _ := pem.Decode(b)
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return c
	}
	orig := read("device.pem")
	var first *x509.Certificate // the identity the daemon had once started
	serials := map[string]bool{}
	d.daemon(agentBin, func() bool {
		c := read("identity.pem")
		if c == nil {
			return false
		}
		if first == nil {
			first = c
		}
		serials[c.SerialNumber.String()] = true
		return len(serials) >= 2 && srv.device("lock-30").LastSeen.After(first.NotAfter.Add(time.Second))
	})
	if serials[orig.SerialNumber.String()] {
		t.Fatal("identity.pem holds the provisioned certificate")
	}
	t.Logf("%d certificates issued while the daemon ran", len(serials))
}

// metrics reads the server's /metrics.
func (s *liveServer) metrics() string {
	s.t.Helper()
	ca, _ := os.ReadFile(filepath.Join(s.dataDir, "pki", "ca.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := hc.Get(s.url + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// grepLines keeps the lines that hold sub.
func grepLines(text, sub string) string {
	var out []string
	for line := range strings.Lines(text) {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "")
}
