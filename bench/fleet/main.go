// Command fleet is the scale benchmark: fleets of virtual devices (the
// real agent and boot selector on shared simulated flash, in this process)
// against one `fieldpatch serve` process, updated to a new 1 MiB image in
// one phase. It reports the time to update the fleet, the server's peak
// RSS, the p99 check-in latency, errors, bricked devices, and the
// achieved transfer rate as a ratio of the loopback TLS throughput
// measured in the same run.
//
//	go run ./bench/fleet -bin bin -devices 10000,50000
package main

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"flag"
	"fmt"
	"github.com/fieldpatch/fieldpatch/bench/internal/harness"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/fleet"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

type options struct {
	bin       string
	sizes     []int
	imageKiB  int
	speed     float64
	poll      time.Duration
	maxDl     int
	maxReq    int
	timeout   time.Duration
	keep      bool
	addresses int
	cpuProf   string
	memProf   string
	serverCPU string
	fleetCPU  string
}

func main() {
	var o options
	var sizes string
	flag.StringVar(&o.bin, "bin", "bin", "directory holding the fieldpatch binary")
	flag.StringVar(&sizes, "devices", "10000,50000", "fleet sizes, comma-separated")
	flag.IntVar(&o.imageKiB, "image-kib", 1024, "payload size of the new image in KiB")
	flag.Float64Var(&o.speed, "speed", 10, "simulated seconds per real second (devices and the server's rollout clock)")
	flag.DurationVar(&o.poll, "poll", time.Hour, "the devices' check-in interval, simulated (an hour at 10x: 6 real minutes)")
	flag.IntVar(&o.maxReq, "max-requests", 512, "requests the simulator runs at once (devices queue before they connect, so none is starved of CPU mid-handshake; 0: no bound)")
	flag.IntVar(&o.maxDl, "max-downloads", 250, "devices downloading at once (the rollout's limit; each holds its download in memory here)")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Minute, "give up on one fleet after this long")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directories")
	flag.IntVar(&o.addresses, "source-addresses", 256, "loopback source addresses the devices connect from")
	flag.StringVar(&o.cpuProf, "cpuprofile", "", "write a CPU profile of the simulator while the fleet updates")
	flag.StringVar(&o.memProf, "memprofile", "", "write a heap profile of the simulator when the fleet has updated")
	flag.StringVar(&o.serverCPU, "server-cpu", "", "CPU list for the server (taskset -c; default: not pinned)")
	flag.StringVar(&o.fleetCPU, "fleet-cpu", "", "CPU list for the simulated fleet, this program (default: not pinned)")
	flag.Parse()
	if o.maxReq > 0 && o.maxReq <= o.maxDl {
		// A download holds its slot to the end and sends progress reports
		// meanwhile, which need a slot of their own.
		fmt.Fprintf(os.Stderr, "-max-requests %d: must be more than -max-downloads %d (or 0)\n", o.maxReq, o.maxDl)
		os.Exit(2)
	}
	if o.fleetCPU != "" {
		harness.PinSelf(o.fleetCPU)
	}
	for _, s := range strings.Split(sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			fmt.Fprintln(os.Stderr, "bad -devices:", s)
			os.Exit(2)
		}
		o.sizes = append(o.sizes, n)
	}
	loop, err := loopbackTLS(1 << 30)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loopback TLS:", err)
		os.Exit(1)
	}
	fmt.Printf("loopback TLS 1.3 throughput (one connection, this machine, now): %.0f MiB/s\n\n", loop)
	var rows []result
	failed := false
	for _, n := range o.sizes {
		r, err := runFleet(o, n)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%d devices: %v\n", n, err)
			failed = true
		}
		if r != nil {
			r.loopback = loop
			rows = append(rows, *r)
			fmt.Printf("  %d devices: updated in %.0f s, server peak RSS %.0f MiB, p99 %.1f ms, %d busy, %d errors, %d bricked, %.2fx loopback TLS\n",
				r.devices, r.update.Seconds(), float64(r.rssKiB)/1024, ms(r.p99), r.busy, r.errors, r.bricked, r.rate()/r.loopback)
		}
	}
	fmt.Println("\n| devices | enroll | time to update all | server peak RSS | check-ins | p50 | p99 | busy (503) | errors | bricked | MiB sent | MiB/s | vs loopback TLS |")
	fmt.Println("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, r := range rows {
		fmt.Printf("| %d | %.0f s | %.0f s | %.0f MiB | %d | %.1f ms | %.1f ms | %d | %d | %d | %.0f | %.0f | %.2fx |\n",
			r.devices, r.enroll.Seconds(), r.update.Seconds(), float64(r.rssKiB)/1024, r.checkIns, ms(r.p50), ms(r.p99), r.busy, r.errors, r.bricked,
			float64(r.bytes)/(1<<20), r.rate(), r.rate()/r.loopback)
		if r.errors > 0 || r.bricked > 0 || !r.complete {
			failed = true
		}
	}
	if failed {
		fmt.Println("\ntarget missed: every device updated with 0 errors and 0 bricked")
		os.Exit(1)
	}
	fmt.Println("\ntarget met: every device updated, 0 errors, 0 bricked")
}

type result struct {
	devices          int
	enroll, update   time.Duration
	rssKiB           int64
	checkIns         int64
	p50, p99         time.Duration
	errors, bricked  int
	busy             int
	bytes            int64
	loopback         float64
	complete         bool
	clientRSSKiB     int64
	sharedFlashBlock int
}

func (r result) rate() float64 { return float64(r.bytes) / (1 << 20) / r.update.Seconds() }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func runFleet(o options, n int) (*result, error) {
	fmt.Printf("== %d devices\n", n)
	base := "/dev/shm"
	if fi, err := os.Stat(base); err != nil || !fi.IsDir() {
		base = os.TempDir()
	}
	w, done, err := harness.NewWork(base, "fieldpatch-bench-fleet-", o.bin, o.keep)
	if err != nil {
		return nil, err
	}
	defer done()
	dir := w.Dir
	fp := filepath.Join(o.bin, "fieldpatch")
	// The server's data on disk (its database is what a real one fsyncs),
	// the devices' bundles in dir (tmpfs).
	data, err := os.MkdirTemp("", "fieldpatch-bench-fleet-server-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(data)
	addr, err := harness.FreeAddr()
	if err != nil {
		return nil, err
	}
	serveArgs := []string{fp, "serve", "--listen", addr, "--mqtt-listen", "off", "--data-dir", data, "--image-key", w.ImageKey(),
		"--poll-interval", o.poll.String(), "--rollout-tick", "1s", "--time-scale", fmt.Sprint(o.speed), "--log-format", "json"}
	if o.serverCPU != "" {
		serveArgs = append([]string{"taskset", "-c", o.serverCPU}, serveArgs...)
	}
	srv := exec.Command(serveArgs[0], serveArgs[1:]...)
	logf, _ := os.Create(filepath.Join(data, "server.log"))
	defer logf.Close()
	srv.Stdout, srv.Stderr = logf, logf
	if err := srv.Start(); err != nil {
		return nil, err
	}
	defer harness.Stop(srv, 20*time.Second)
	url := "https://" + addr
	if _, err := harness.WaitReady(url, filepath.Join(data, "pki", "ca.pem")); err != nil {
		return nil, err
	}
	rcli := w.Remote(url, data)
	imgs := map[string][]byte{}
	for _, v := range []string{"1.0.0", "1.0.1"} {
		img, err := w.Image(v, o.imageKiB<<10)
		if err != nil {
			return nil, err
		}
		if imgs[v], err = os.ReadFile(img); err != nil {
			return nil, err
		}
		if v == "1.0.1" {
			if err := w.Publish(rcli, "lock-"+v, img); err != nil {
				return nil, err
			}
		}
	}
	tok, err := rcli("enroll-token", "create", "--uses", fmt.Sprint(n), "--ttl", "6h")
	if err != nil {
		return nil, err
	}
	caPEM, _ := os.ReadFile(filepath.Join(data, "pki", "ca.pem"))
	pub, err := trust.LoadPublicKey(w.ImageKey())
	if err != nil {
		return nil, err
	}
	defer fleet.TuneGC()()
	f, err := fleet.New(fleet.Config{Devices: n, IDPrefix: "b", Server: url, CAPEM: caPEM, Token: strings.TrimSpace(strings.SplitN(tok, "\n", 2)[0]),
		Dir: filepath.Join(dir, "fleet"), Factory: imgs["1.0.0"], Keys: []boot.TrustedKey{{Key: pub}}, HWClass: "bench-lock",
		Speed: o.speed, Addresses: o.addresses, Seed: 1, MaxRequests: o.maxReq,
		// As a fleet that has run a while: first check-ins spread over a
		// poll interval, not a wave of full handshakes.
		StartSpread: time.Duration(float64(o.poll) / o.speed)})
	if err != nil {
		return nil, err
	}
	r := &result{devices: n}
	start := time.Now()
	if err := f.Enroll(context.Background(), 2*runtime.NumCPU(), func(done int) {
		if done%5000 == 0 {
			fmt.Printf("  enrolled %d (%.0fs)\n", done, time.Since(start).Seconds())
		}
	}); err != nil {
		return nil, err
	}
	r.enroll = time.Since(start)
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	f.Start(ctx)
	// Every device checks in once on the old version, then the rollout.
	for f.Snapshot().CheckIns < int64(n) && ctx.Err() == nil {
		time.Sleep(time.Second)
	}
	if _, err := rcli("rollout", "create", "--id", "all", "--all", "--phases", "100", "--soak", "1m", "--max-downloads", fmt.Sprint(o.maxDl),
		"--start", "lock-1.0.1"); err != nil {
		f.Stop()
		return nil, err
	}
	start = time.Now()
	f.ResetLatency() // latency and errors while the fleet updates
	if o.cpuProf != "" {
		pf, err := os.Create(fmt.Sprintf("%s.%d", o.cpuProf, n))
		if err == nil {
			pprof.StartCPUProfile(pf)
			defer func() { pprof.StopCPUProfile(); pf.Close() }()
		}
	}
	before := f.Snapshot()
	last := time.Now()
	for ctx.Err() == nil {
		time.Sleep(time.Second)
		st := f.Snapshot()
		if st.Versions["1.0.1"] == n && st.Updating == 0 {
			r.complete = true
			break
		}
		if time.Since(last) >= 10*time.Second {
			last = time.Now()
			fmt.Printf("  t=%4.0fs %6d on 1.0.1, %5d updating, check-ins %d (%d failed), p99 %.1f ms, server RSS %.0f MiB %v\n",
				time.Since(start).Seconds(), st.Versions["1.0.1"], st.Updating, st.CheckIns, st.CheckInErrors, ms(st.P99), float64(peakRSS(srv.Process.Pid))/1024, st.Errors)
		}
	}
	r.update = time.Since(start)
	r.rssKiB = peakRSS(srv.Process.Pid)
	if o.memProf != "" {
		if pf, err := os.Create(fmt.Sprintf("%s.%d", o.memProf, n)); err == nil {
			pprof.WriteHeapProfile(pf)
			pf.Close()
		}
	}
	st := f.Snapshot() // before Stop, which cancels what is in flight
	f.Stop()
	r.checkIns, r.p50, r.p99 = st.CheckIns, st.P50, st.P99
	// A 503 with Retry-After is the server pacing its load, not an error;
	// any other failed check-in, and any update not committed, is.
	r.busy = st.Errors[fleet.BusyKind]
	r.errors = int(st.CheckInErrors) - r.busy + st.Outcomes["failed"] + st.Outcomes["rolled_back"]
	r.bytes = st.Received - before.Received
	r.clientRSSKiB = peakRSS(os.Getpid())
	r.sharedFlashBlock = f.Pool().Blocks()
	census := f.PowerOnAll(context.Background())
	r.bricked = len(census.Bricked)
	if census.Versions["1.0.1"] != n {
		r.complete = false
	}
	// Every updated device downloaded the whole image at least once.
	if need := int64(n) * int64(len(imgs["1.0.1"])); r.bytes < need {
		fmt.Printf("  only %d bytes received for %d devices of a %d-byte image\n", r.bytes, n, len(imgs["1.0.1"]))
		r.complete = false
	}
	fmt.Printf("  check-in errors by kind: %v\n", st.Errors)
	fmt.Printf("  census through the boot selector: %v, bricked %d; simulator peak RSS %.0f MiB, %d shared flash blocks; TLS resumed %d, full handshakes %d\n",
		census.Versions, r.bricked, float64(r.clientRSSKiB)/1024, r.sharedFlashBlock, st.Resumed, st.FullHandshakes)
	return r, nil
}

// peakRSS is a process's peak resident set (VmHWM) in KiB.
func peakRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			v, _ := strconv.ParseInt(strings.Fields(l)[1], 10, 64)
			return v
		}
	}
	return 0
}

// loopbackTLS measures one TLS 1.3 connection's throughput over loopback
// (MiB/s): the ceiling the fleet's downloads are compared with.
func loopbackTLS(total int64) (float64, error) {
	key, err := trust.GenerateKey(trust.KeyP256)
	if err != nil {
		return 0, err
	}
	cert, err := selfSigned(key)
	if err != nil {
		return 0, err
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		for sent := int64(0); sent < total; sent += int64(len(buf)) {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	start := time.Now()
	n, err := io.Copy(io.Discard, c)
	if err != nil {
		return 0, err
	}
	return float64(n) / (1 << 20) / time.Since(start).Seconds(), nil
}

func selfSigned(key crypto.Signer) (tls.Certificate, error) {
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "loopback"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
