// Command mqtt is the notification benchmark: devices connected to the
// server's embedded MQTT broker, in a separate client process (this
// program, re-executed), and a rollout that lets them all in. It measures
// the latency from the rollout's start until each device, notified over
// MQTT, has checked in (over MQTT as the agent does, or over HTTPS with
// -checkin https) and been offered the release (the target judges the
// check-in: p99 at most 1 s from the start); and the
// broker's memory per connected device against Mosquitto holding the same
// clients in the same run.
//
//	go run ./bench/mqtt -bin bin -devices 10000
package main

import (
	"bufio"
	"cmp"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fieldpatch/fieldpatch/bench/internal/harness"
)

type options struct {
	bin          string
	devices      int
	wait         time.Duration
	settle       time.Duration
	timeout      time.Duration
	addresses    int
	workers      int
	checkInConns int
	mosquitto    string
	serverGOGC   int
	noCheckIn    bool
	checkInOver  string
	serverData   string
	keep         bool
}

const clientEnv = "FIELDPATCH_BENCH_MQTT_CLIENT"

func main() {
	if os.Getenv(clientEnv) != "" {
		runClient()
		return
	}
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding the fieldpatch binary")
	flag.IntVar(&o.devices, "devices", 10000, "devices connected to the broker")
	flag.DurationVar(&o.wait, "wait", time.Minute, "how long after the rollout's start devices may take to be notified and check in")
	flag.DurationVar(&o.settle, "settle", 150*time.Second, "how long memory is watched after the connections (long enough for the server's garbage collector to run: it runs at least every 2 minutes)")
	flag.DurationVar(&o.timeout, "timeout", 20*time.Minute, "give up on the whole run after this long")
	flag.IntVar(&o.addresses, "source-addresses", 256, "loopback source addresses the devices connect from")
	flag.IntVar(&o.workers, "workers", 32, "enrollments and MQTT connections made at once")
	flag.IntVar(&o.checkInConns, "checkin-conns", 4000, "check-in connections the client process opens at once (it holds every MQTT connection too, within its 20,000 files)")
	flag.StringVar(&o.mosquitto, "mosquitto", "mosquitto", `the Mosquitto broker to compare with ("off": none)`)
	flag.BoolVar(&o.noCheckIn, "no-checkin", false, "devices only note their notification and do not check in (the broker's fan-out alone)")
	flag.StringVar(&o.checkInOver, "checkin", "mqtt", `how a notified device checks in first: "mqtt" (as the agent does; after a 503 or a failure, over HTTPS) or "https"`)
	flag.IntVar(&o.serverGOGC, "server-gogc", 0, "GOGC for the server (0: Go's default, 100)")
	flag.StringVar(&o.serverData, "server-data", "", "where the server's data directory is made (default the system's temporary directory, on disk; /dev/shm takes the database's fsync out)")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (server data and log, Mosquitto's configuration and log)")
	flag.Parse()
	if o.checkInOver != "mqtt" && o.checkInOver != "https" {
		fmt.Fprintln(os.Stderr, `-checkin: want "mqtt" or "https"`)
		os.Exit(2)
	}
	timer := time.AfterFunc(o.timeout, func() {
		fmt.Fprintf(os.Stderr, "mqtt bench: gave up after %v\n", o.timeout)
		children.kill()
		os.Exit(3)
	})
	defer timer.Stop()
	res, err := run(o)
	if res != nil {
		res.print(o)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mqtt bench:", err)
		os.Exit(1)
	}
	if !res.met(o) {
		os.Exit(1)
	}
}

// children are the processes this program started (the server, Mosquitto,
// the client process), killed if the run gives up.
var children procs

type procs struct {
	sync.Mutex
	cmds []*exec.Cmd
}

func (c *procs) start(cmd *exec.Cmd) error {
	c.Lock()
	defer c.Unlock()
	if err := cmd.Start(); err != nil {
		return err
	}
	c.cmds = append(c.cmds, cmd)
	return nil
}

func (c *procs) kill() {
	c.Lock()
	defer c.Unlock()
	for _, cmd := range c.cmds {
		cmd.Process.Kill()
	}
}

// memory is one broker's resident memory, idle and holding the clients.
type memory struct {
	name             string
	connected        int
	failed           int
	firstErr         string
	connect          time.Duration
	idleKiB, fullKiB int64 // fullKiB: at the end of the settle time
	peakKiB          int64 // the highest seen in the settle time
}

func (m memory) perClient() float64 { return m.per(m.fullKiB) }

func (m memory) per(kib int64) float64 {
	if m.connected == 0 {
		return 0
	}
	return float64(kib-m.idleKiB) / float64(m.connected)
}

type result struct {
	devices        int
	mosq, fp       memory
	command        time.Duration // how long `rollout create --start` took
	notified       []time.Duration
	checkedIn      []time.Duration // the first check-in sent
	answered       []time.Duration // with an offer
	firstTry       []time.Duration // of them, those offered at their first check-in
	noOffer        int
	attempts, busy int64
	viaMQTT        int64
	errs           int64
	maxConns       int64
	lost           int64
	firstErr       string
}

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	i := int(float64(len(ds))*p/100+0.5) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

func (r *result) ratio() float64 {
	if r.mosq.perClient() <= 0 {
		return 0
	}
	return r.fp.perClient() / r.mosq.perClient()
}

// met says whether the targets judged in this run were met (latency
// unless -no-checkin, memory unless -mosquitto off). The latency target
// is the issue's: from the rollout's start to each device's check-in, p99
// at most 1 s; and every device must then be offered the release within
// the wait.
func (r *result) met(o options) bool {
	latency := o.noCheckIn || len(r.checkedIn) == r.devices && pct(r.checkedIn, 99) <= time.Second && len(r.answered) == r.devices
	memory := o.mosquitto == "off" || r.ratio() > 0 && r.ratio() <= 1.5
	return latency && memory
}

func (r *result) print(o options) {
	fmt.Printf("\nmemory: RSS idle, then with the clients connected: at the end of %v after the connections, and the highest seen in that time\n", o.settle)
	fmt.Println("\n| broker | clients connected | connect time | RSS idle | RSS with the clients | KiB per client | highest RSS | KiB per client at the highest |")
	fmt.Println("| --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, m := range []memory{r.mosq, r.fp} {
		if m.name == "" {
			continue
		}
		fmt.Printf("| %s | %d of %d | %.1f s | %.1f MiB | %.1f MiB | %.1f | %.1f MiB | %.1f |\n", m.name, m.connected, r.devices, m.connect.Seconds(),
			float64(m.idleKiB)/1024, float64(m.fullKiB)/1024, m.perClient(), float64(m.peakKiB)/1024, m.per(m.peakKiB))
		if m.failed > 0 {
			fmt.Printf("  %s: %d connections failed, first: %s\n", m.name, m.failed, m.firstErr)
		}
	}
	if r.ratio() > 0 {
		fmt.Printf("\nfieldpatch / Mosquitto memory per client: %.2fx at the end, %.2fx at the highest (target at most 1.5x)\n", r.ratio(), r.fp.per(r.fp.peakKiB)/r.mosq.per(r.mosq.peakKiB))
	}
	if r.notified == nil && r.answered == nil {
		return
	}
	fmt.Printf("\nlatency from the moment `fieldpatch rollout create --start` is run (the command took %s):\n", ms(r.command))
	if o.noCheckIn {
		fmt.Println("\n| devices | notified within the wait | notification p50 | p99 | max | MQTT connections lost |")
		fmt.Println("| --- | --- | --- | --- | --- | --- |")
		fmt.Printf("| %d | %d | %s | %s | %s | %d |\n", r.devices, len(r.notified), ms(pct(r.notified, 50)), ms(pct(r.notified, 99)), ms(pct(r.notified, 100)), r.lost)
		fmt.Println("  (-no-checkin: the devices did not check in; no latency target is judged)")
		return
	}
	fmt.Printf("\n| devices | first check-in over | notified within the wait | offered within the wait | notification p50 / p99 | check-in p50 | check-in p99 | check-in max | offer p50 / p99 / max | check-ins sent (over MQTT) | busy (503) | errors | MQTT connections lost |\n")
	fmt.Println("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
	fmt.Printf("| %d | %s | %d | %d | %s / %s | %s | %s | %s | %s / %s / %s | %d (%d) | %d | %d | %d |\n", r.devices, strings.ToUpper(o.checkInOver), len(r.notified), len(r.answered),
		ms(pct(r.notified, 50)), ms(pct(r.notified, 99)), ms(pct(r.checkedIn, 50)), ms(pct(r.checkedIn, 99)), ms(pct(r.checkedIn, 100)),
		ms(pct(r.answered, 50)), ms(pct(r.answered, 99)), ms(pct(r.answered, 100)),
		r.attempts, r.viaMQTT, r.busy, r.errs, r.lost)
	fmt.Printf("  check-in: the device's first check-in written to its connection (over HTTPS: the request begun)\n")
	fmt.Printf("  offer: the answer carrying the offer received\n")
	fmt.Printf("  offered at their first check-in: %d devices, p50 %s, p99 %s, max %s (the others were answered 503 first and waited its Retry-After)\n",
		len(r.firstTry), ms(pct(r.firstTry, 50)), ms(pct(r.firstTry, 99)), ms(pct(r.firstTry, 100)))
	if r.noOffer > 0 {
		fmt.Printf("  %d devices were answered without an offer\n", r.noOffer)
	}
	if r.firstErr != "" {
		fmt.Printf("  first check-in error: %s\n", r.firstErr)
	}
	fmt.Printf("  at most %d check-in connections open at once in the client process (limit %d)\n", r.maxConns, o.checkInConns)
	switch {
	case len(r.checkedIn) < r.devices:
		fmt.Printf("\ntarget missed: %d of %d devices checked in within %v\n", len(r.checkedIn), r.devices, o.wait)
	case pct(r.checkedIn, 99) > time.Second:
		fmt.Printf("\ntarget missed: p99 %s from the rollout's start to the check-in (target at most 1 s)\n", ms(pct(r.checkedIn, 99)))
	case len(r.answered) < r.devices:
		fmt.Printf("\ntarget missed: %d of %d devices offered the release within %v\n", len(r.answered), r.devices, o.wait)
	}
	if r.ratio() > 1.5 {
		fmt.Printf("target missed: %.2fx Mosquitto's memory per client (target at most 1.5x)\n", r.ratio())
	}
	if r.met(o) {
		var met []string
		if !o.noCheckIn {
			met = append(met, "check-in p99 at most 1 s (every device offered the release)")
		}
		if o.mosquitto != "off" {
			met = append(met, "memory per client at most 1.5x Mosquitto's")
		}
		fmt.Printf("\ntargets met: %s\n", cmp.Or(strings.Join(met, ", "), "none judged in this run"))
	}
}

// client is the client process.
type client struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startClient() (*client, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), clientEnv+"=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := children.start(cmd); err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	return &client{cmd: cmd, in: in, out: sc}, nil
}

func (c *client) do(req request) (reply, error) {
	b, _ := json.Marshal(req)
	if _, err := c.in.Write(append(b, '\n')); err != nil {
		return reply{}, err
	}
	if !c.out.Scan() {
		return reply{}, fmt.Errorf("client process: %s: no answer (%v)", req.Op, c.out.Err())
	}
	var r reply
	if err := json.Unmarshal(c.out.Bytes(), &r); err != nil {
		return r, err
	}
	if r.Err != "" {
		return r, fmt.Errorf("client process: %s: %s", req.Op, r.Err)
	}
	return r, nil
}

func (c *client) stop() {
	c.in.Close()
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
}

func run(o options) (*result, error) {
	fmt.Printf("== %d devices on MQTT\n", o.devices)
	r := &result{devices: o.devices}
	w, done, err := harness.NewWork("", "fieldpatch-bench-mqtt-", o.bin, o.keep)
	if err != nil {
		return nil, err
	}
	defer done()
	dir := w.Dir
	fp := filepath.Join(o.bin, "fieldpatch")
	data := filepath.Join(dir, "server")
	if o.serverData != "" {
		if data, err = os.MkdirTemp(o.serverData, "fieldpatch-bench-mqtt-server-"); err != nil {
			return nil, err
		}
		if o.keep {
			fmt.Println("server data directory:", data)
		} else {
			defer os.RemoveAll(data)
		}
	}
	addr, err := harness.FreeAddr()
	if err != nil {
		return nil, err
	}
	mqttAddr, err := harness.FreeAddr()
	if err != nil {
		return nil, err
	}
	srv := exec.Command(fp, "serve", "--listen", addr, "--mqtt-listen", mqttAddr, "--data-dir", data,
		"--image-key", w.ImageKey(), "--rollout-tick", "1s", "--log-format", "json")
	if o.serverGOGC > 0 {
		srv.Env = append(os.Environ(), fmt.Sprintf("GOGC=%d", o.serverGOGC))
		r.fp.name = fmt.Sprintf("fieldpatch serve, GOGC=%d", o.serverGOGC)
	}
	os.MkdirAll(data, 0o700)
	logf, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	srv.Stdout, srv.Stderr = logf, logf
	if err := children.start(srv); err != nil {
		return nil, err
	}
	defer harness.Stop(srv, 20*time.Second)
	url := "https://" + addr
	if _, err := harness.WaitReady(url, filepath.Join(data, "pki", "ca.pem")); err != nil {
		return nil, err
	}
	rcli := w.Remote(url, data)
	img, err := w.Image("1.0.1", 65536)
	if err != nil {
		return nil, err
	}
	if err := w.Publish(rcli, "lock-1.0.1", img); err != nil {
		return nil, err
	}
	tok, err := rcli("enroll-token", "create", "--uses", fmt.Sprint(o.devices), "--ttl", "6h")
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(filepath.Join(data, "pki", "ca.pem"))
	if err != nil {
		return nil, err
	}

	c, err := startClient()
	if err != nil {
		return nil, err
	}
	defer c.stop()
	rep, err := c.do(request{Op: "enroll", Server: url, CAPEM: string(caPEM), Token: strings.TrimSpace(strings.SplitN(tok, "\n", 2)[0]),
		Devices: o.devices, Addresses: o.addresses, HWClass: "bench-lock", Version: "1.0.0", Workers: o.workers})
	if err != nil {
		return nil, err
	}
	fmt.Printf("  enrolled and checked in %d devices in %.1f s\n", rep.Done, rep.Took.Seconds())
	if rep.Failed > 0 {
		return r, fmt.Errorf("%d devices failed to enroll or check in; first: %s", rep.Failed, rep.FirstErr)
	}

	// Mosquitto first: the server idles meanwhile, so that its own idle
	// figure is read after enrollment's garbage had time to go.
	if o.mosquitto != "off" {
		if r.mosq, err = measureMosquitto(o, c, dir, data); err != nil {
			return r, fmt.Errorf("mosquitto: %w", err)
		}
	}

	r.fp.name = cmp.Or(r.fp.name, "fieldpatch serve")
	pid := srv.Process.Pid
	r.fp.idleKiB = rss(pid)
	fmt.Printf("  fieldpatch serve idle: %.1f MiB\n", float64(r.fp.idleKiB)/1024)
	rep, err = c.do(request{Op: "connect", Broker: mqttAddr, Workers: o.workers})
	if err != nil {
		return r, err
	}
	r.fp.connected, r.fp.failed, r.fp.firstErr, r.fp.connect = rep.Done, rep.Failed, rep.FirstErr, rep.Took
	fmt.Printf("  %d connected to fieldpatch's broker in %.1f s (%d failed)\n", rep.Done, rep.Took.Seconds(), rep.Failed)
	r.fp.fullKiB, r.fp.peakKiB = settle(pid, o.settle)

	// The rollout: one phase, the whole fleet.
	deadline := time.Now().Add(o.wait + 5*time.Second)
	if _, err := c.do(request{Op: "arm", CheckInConns: o.checkInConns, NoCheckIn: o.noCheckIn, OverMQTT: o.checkInOver == "mqtt", Deadline: deadline.UnixNano()}); err != nil {
		return r, err
	}
	start := time.Now()
	if _, err := rcli("rollout", "create", "--id", "now", "--all", "--phases", "100", "--soak", "1m", "--start", "lock-1.0.1"); err != nil {
		return r, err
	}
	r.command = time.Since(start)
	fmt.Printf("  rollout started; waiting up to %v for the devices\n", o.wait)
	rep, err = c.do(request{Op: "collect", Deadline: start.Add(o.wait).UnixNano()})
	if err != nil {
		return r, err
	}
	r.attempts, r.viaMQTT, r.busy, r.errs, r.maxConns, r.lost, r.firstErr = rep.Attempts, rep.ViaMQTT, rep.Busy, rep.Errors, rep.MaxConns, rep.Lost, rep.FirstErr
	r.notified, r.checkedIn, r.answered = []time.Duration{}, []time.Duration{}, []time.Duration{}
	limit := start.Add(o.wait)
	for i := range rep.Notified {
		if n := rep.Notified[i]; n != 0 && !time.Unix(0, n).After(limit) {
			r.notified = append(r.notified, time.Unix(0, n).Sub(start))
		}
		if n := rep.Sent[i]; n != 0 && !time.Unix(0, n).After(limit) {
			r.checkedIn = append(r.checkedIn, time.Unix(0, n).Sub(start))
		}
		a := rep.Answered[i]
		switch {
		case a == 0 || time.Unix(0, a).After(limit):
		case rep.Offered[i]:
			r.answered = append(r.answered, time.Unix(0, a).Sub(start))
			if rep.Tries[i] == 1 {
				r.firstTry = append(r.firstTry, time.Unix(0, a).Sub(start))
			}
		default:
			r.noOffer++
		}
	}
	slices.Sort(r.notified)
	slices.Sort(r.checkedIn)
	slices.Sort(r.answered)
	slices.Sort(r.firstTry)
	return r, nil
}

// measureMosquitto starts Mosquitto with the server's CA and certificate
// (TLS 1.3, client certificates required, the certificate's name as the
// user, each device to its own topics), reads its memory idle, connects
// the devices, reads it again once they settled, and stops it.
func measureMosquitto(o options, c *client, dir, data string) (memory, error) {
	m := memory{name: "Mosquitto"}
	path, err := exec.LookPath(o.mosquitto)
	if err != nil {
		return m, fmt.Errorf("%w (apt-get install mosquitto)", err)
	}
	if v, err := exec.Command(path, "-h").CombinedOutput(); len(v) > 0 {
		if line, _, _ := strings.Cut(string(v), "\n"); strings.HasPrefix(line, "mosquitto version") {
			m.name = "Mosquitto " + strings.TrimPrefix(line, "mosquitto version ")
		}
	} else if err != nil {
		return m, err
	}
	addr, err := harness.FreeAddr()
	if err != nil {
		return m, err
	}
	host, port, _ := strings.Cut(addr, ":")
	pki := filepath.Join(data, "pki")
	acl := filepath.Join(dir, "mosquitto.acl")
	if err := os.WriteFile(acl, []byte("pattern readwrite fp/dev/%u/#\n"), 0o644); err != nil {
		return m, err
	}
	conf := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(conf, []byte(strings.Join([]string{
		"per_listener_settings false",
		"allow_anonymous false",
		"persistence false",
		"user root",
		"log_dest stderr",
		"log_type error",
		"log_type warning",
		"connection_messages false",
		"acl_file " + acl,
		"listener " + port + " " + host,
		"cafile " + filepath.Join(pki, "ca.pem"),
		"certfile " + filepath.Join(pki, "server.pem"),
		"keyfile " + filepath.Join(pki, "server.key.pem"),
		"tls_version tlsv1.3",
		"require_certificate true",
		"use_identity_as_username true",
	}, "\n")+"\n"), 0o644); err != nil {
		return m, err
	}
	logf, err := os.Create(filepath.Join(dir, "mosquitto.log"))
	if err != nil {
		return m, err
	}
	defer logf.Close()
	cmd := exec.Command(path, "-c", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := children.start(cmd); err != nil {
		return m, err
	}
	defer harness.Stop(cmd, 10*time.Second)
	if err := waitListening(addr, 10*time.Second); err != nil {
		b, _ := os.ReadFile(filepath.Join(dir, "mosquitto.log"))
		return m, fmt.Errorf("%v: %s", err, b)
	}
	time.Sleep(time.Second)
	m.idleKiB = rss(cmd.Process.Pid)
	fmt.Printf("  %s idle: %.1f MiB\n", m.name, float64(m.idleKiB)/1024)
	rep, err := c.do(request{Op: "connect", Broker: addr, Workers: o.workers})
	if err != nil {
		return m, err
	}
	m.connected, m.failed, m.firstErr, m.connect = rep.Done, rep.Failed, rep.FirstErr, rep.Took
	fmt.Printf("  %d connected to Mosquitto in %.1f s (%d failed)\n", rep.Done, rep.Took.Seconds(), rep.Failed)
	m.fullKiB, m.peakKiB = settle(cmd.Process.Pid, o.settle)
	if _, err := c.do(request{Op: "disconnect", Workers: o.workers}); err != nil {
		return m, err
	}
	return m, nil
}

// settle watches a process's resident memory for d (every second,
// printed every 15 s) and returns it at the end, and the highest seen.
func settle(pid int, d time.Duration) (total, peak int64) {
	start := time.Now()
	last := start
	for {
		total = rss(pid)
		peak = max(peak, total)
		if time.Since(start) >= d {
			break
		}
		if time.Since(last) >= 15*time.Second {
			last = time.Now()
			fmt.Printf("    %3.0f s: RSS %.1f MiB\n", time.Since(start).Seconds(), float64(total)/1024)
		}
		time.Sleep(time.Second)
	}
	return total, peak
}

// rss is a process's resident memory now (VmRSS), in KiB.
func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return 0
}

func waitListening(addr string, within time.Duration) error {
	end := time.Now().Add(within)
	for time.Now().Before(end) {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("not listening on " + addr)
}
