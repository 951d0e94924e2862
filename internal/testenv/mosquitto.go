package testenv

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// MosquittoACL is the access list the docs give for Mosquitto as the
// external broker: the server (its certificate names "fieldpatch:server")
// reads and writes every device's topics; a device, named by its
// certificate's CN, reads its own and writes only its status reports and
// check-ins.
const MosquittoACL = `user fieldpatch:server
topic readwrite fp/dev/#

pattern read fp/dev/%u/#
pattern write fp/dev/%u/status
pattern write fp/dev/%u/checkin
`

// Mosquitto is a real Mosquitto broker run for a test on a free loopback
// port, configured as the docs say (TLS 1.3, client certificates required,
// the certificate's CN as user name, the ACL above). It is killed when the
// test ends.
type Mosquitto struct {
	t    testing.TB
	bin  string
	conf string
	// Port is its TCP port on 127.0.0.1; URL is mqtts://127.0.0.1:Port.
	Port int
	URL  string

	mu     sync.Mutex // guards cmd and exited
	cmd    *exec.Cmd
	exited chan struct{}
	log    Buffer
}

// StartMosquitto writes a configuration with the given CA, certificate and
// key (PEM files) and starts the broker. The test is skipped (failed under
// FIELDPATCH_REQUIRE_PEERS=1) when Mosquitto is not installed.
func StartMosquitto(t testing.TB, caFile, certFile, keyFile string) *Mosquitto {
	t.Helper()
	m := NewMosquitto(t, caFile, certFile, keyFile)
	m.Start()
	return m
}

// NewMosquitto is StartMosquitto without the start: the port is chosen
// and the configuration written, so the files it names may be made after.
func NewMosquitto(t testing.TB, caFile, certFile, keyFile string) *Mosquitto {
	t.Helper()
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/mosquitto"); serr == nil { // not on every PATH
			bin, err = "/usr/sbin/mosquitto", nil
		}
	}
	if err != nil {
		Missing(t, "peer tool mosquitto (the broker, Debian package mosquitto) is not installed (%v)", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dir := t.TempDir()
	acl := filepath.Join(dir, "acl")
	if err := os.WriteFile(acl, []byte(MosquittoACL), 0o644); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf(`per_listener_settings false
allow_anonymous false
acl_file %s
persistence false
retain_available false
max_packet_size 16384
log_dest stderr
log_type error
log_type warning
log_type notice
log_type subscribe
listener %d 127.0.0.1
cafile %s
certfile %s
keyfile %s
tls_version tlsv1.3
require_certificate true
use_identity_as_username true
`, acl, port, caFile, certFile, keyFile)
	if os.Geteuid() == 0 {
		conf = "user root\n" + conf // as root it would switch to user mosquitto, who cannot read the test's files
	}
	m := &Mosquitto{t: t, bin: bin, conf: filepath.Join(dir, "mosquitto.conf"), Port: port, URL: "mqtts://127.0.0.1:" + strconv.Itoa(port)}
	if err := os.WriteFile(m.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Kill()
		if t.Failed() {
			t.Logf("mosquitto's log:\n%s", m.Log())
		}
	})
	return m
}

// Start starts the broker (again, after Kill) on its port and waits until
// it accepts connections.
func (m *Mosquitto) Start() {
	m.t.Helper()
	m.mu.Lock()
	if m.cmd != nil {
		m.mu.Unlock()
		m.t.Fatal("mosquitto is running already")
	}
	cmd := exec.Command(m.bin, "-c", m.conf)
	cmd.Stdout, cmd.Stderr = &m.log, &m.log
	if err := cmd.Start(); err != nil {
		m.mu.Unlock()
		m.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	m.cmd, m.exited = cmd, exited
	m.mu.Unlock()
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", m.Port), time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			m.t.Fatalf("mosquitto exited at start: %s", m.Log())
		default:
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("mosquitto does not accept connections on port %d: %s", m.Port, m.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Kill kills the broker with SIGKILL (a crash) and waits for it to go.
func (m *Mosquitto) Kill() {
	m.mu.Lock()
	cmd, exited := m.cmd, m.exited
	m.cmd = nil
	m.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		m.t.Errorf("mosquitto (pid %d) did not exit after SIGKILL", cmd.Process.Pid)
	}
}

// Subscribed says whether a client has subscribed to topic (its log
// line: "CLIENT-ID QOS TOPIC").
func (m *Mosquitto) Subscribed(clientID, topic string) bool {
	return strings.Contains(m.Log(), " "+clientID+" 1 "+topic+"\n") || strings.Contains(m.Log(), " "+clientID+" 0 "+topic+"\n")
}

// Log is what the broker printed.
func (m *Mosquitto) Log() string { return m.log.String() }

// Buffer is a bytes.Buffer safe for a process writing while a test reads.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
