// Command checkin measures the update server's device API against nginx in
// the same run, on the same machine, under the same CPU pinning: the server
// (or nginx, one worker) on one core, this load generator on another.
//
// Setup: a server with -devices registered devices, -certs of them with
// their own client certificates (distinct keys), and a release of -blob-mib
// MiB. Then, for the server and for nginx (TLS 1.3 only, verifying the same
// client certificates, serving a static copy of the check-in answer and of
// the blob):
//
//   - check-ins: -workers concurrent clients, each cycling over its share of
//     the certificates (one keep-alive connection per certificate), POSTing
//     check-ins for -duration after a warm-up; requests per second and
//     latency percentiles. Target: at least 0.5x nginx.
//   - blob download: -streams parallel downloads of the image, -rounds
//     times; MiB/s. Target: at least 0.9x nginx.
package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"github.com/fieldpatch/fieldpatch/bench/internal/harness"
	"io"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

type options struct {
	bin                      string
	devices, certs, workers  int
	duration, warmup         time.Duration
	blobMiB, streams, rounds int
	serverCPU, loadCPU       string
	keep                     bool
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding fieldpatch")
	flag.IntVar(&o.devices, "devices", 10000, "registered devices")
	flag.IntVar(&o.certs, "certs", 1000, "devices with their own client certificate, all used by the load")
	flag.IntVar(&o.workers, "workers", 64, "concurrent clients")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured time per target")
	flag.DurationVar(&o.warmup, "warmup", 3*time.Second, "load before measuring (opens every connection)")
	flag.IntVar(&o.blobMiB, "blob-mib", 64, "release image size in MiB")
	flag.IntVar(&o.streams, "streams", 4, "parallel blob downloads")
	flag.IntVar(&o.rounds, "rounds", 6, "downloads per stream")
	flag.StringVar(&o.serverCPU, "server-cpu", "0", "CPU list for the server and nginx (taskset -c)")
	flag.StringVar(&o.loadCPU, "load-cpu", "1", "CPU list for this load generator")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory")
	flag.Parse()
	harness.PinSelf(o.loadCPU) // re-run pinned to the load generator's core
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "checkin:", err)
		os.Exit(1)
	}
}

// device is a registered device with its own client certificate.
type device struct {
	id   string
	cert tls.Certificate
}

func run(o options) error {
	if _, err := exec.LookPath("nginx"); err != nil {
		return fmt.Errorf("nginx is not installed (make bench installs nginx-light)")
	}
	dir, err := os.MkdirTemp("", "fieldpatch-bench-checkin")
	if err != nil {
		return err
	}
	if o.keep {
		fmt.Println("work directory:", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	data := filepath.Join(dir, "data")
	os.MkdirAll(filepath.Join(data, "image-keys"), 0o755)
	key, err := trust.GenerateKey(trust.KeyEd25519)
	if err != nil {
		return err
	}
	if _, _, err := trust.WriteKeyPair(filepath.Join(data, "image-keys", "bench"), key); err != nil {
		return err
	}
	os.Remove(filepath.Join(data, "image-keys", "bench.pem")) // the server needs only the public half

	addr, err := harness.FreeAddr()
	if err != nil {
		return err
	}
	srv := exec.Command("taskset", "-c", o.serverCPU, filepath.Join(o.bin, "fieldpatch"), "serve",
		"--listen", addr, "--data-dir", data, "--poll-interval", "1h", "--mqtt-listen", "off", "--log-format", "json")
	logf, _ := os.Create(filepath.Join(dir, "server.log"))
	defer logf.Close()
	srv.Stdout, srv.Stderr = logf, logf
	if err := srv.Start(); err != nil {
		return err
	}
	defer harness.Stop(srv, 10*time.Second)
	base := "https://" + addr
	pool, err := harness.WaitReady(base, filepath.Join(data, "pki", "ca.pem"))
	if err != nil {
		return fmt.Errorf("server: %w (see %s)", err, filepath.Join(dir, "server.log"))
	}
	token, err := os.ReadFile(filepath.Join(data, "admin.token"))
	if err != nil {
		return err
	}
	admin := &adminClient{base: base, token: strings.TrimSpace(string(token)),
		http: &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, MaxIdleConnsPerHost: 16}}}

	fmt.Printf("registering %d devices (%d with their own certificates)...\n", o.devices, o.certs)
	start := time.Now()
	devs, err := register(admin, o.devices, o.certs)
	if err != nil {
		return err
	}
	fmt.Printf("  %.1f s\n", time.Since(start).Seconds())

	// The check-in answer nginx will serve: what the server answers a device
	// with nothing to install.
	body, _ := json.Marshal(proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "bench", SecurityCounter: 1})
	answer, err := checkinOnce(base, pool, devs[0], body)
	if err != nil {
		return err
	}

	// The release, offered to the first device so it may download it.
	fmt.Printf("building and uploading a %d MiB release...\n", o.blobMiB)
	sum, err := release(admin, key, o.blobMiB, filepath.Join(dir, "release.img"))
	if err != nil {
		return err
	}
	if err := admin.do("POST", "/api/mgmt/v1/assignments", fmt.Sprintf(`{"id": "bench", "release": "bench-2.0.0", "device": %q}`, devs[0].id), nil); err != nil {
		return err
	}
	if offer, err := checkinOnce(base, pool, devs[0], body); err != nil || !bytes.Contains(offer, []byte(sum)) {
		return fmt.Errorf("the first device was not offered the release: %v %s", err, offer)
	}
	blobPath := proto.PathBlobs + sum

	// nginx, with the same certificate, CA and pinning.
	ngAddr, err := harness.FreeAddr()
	if err != nil {
		return err
	}
	ng, err := startNginx(dir, ngAddr, o.serverCPU, filepath.Join(data, "pki"), answer, blobPath, filepath.Join(data, "blobs", "sha256", sum[:2], sum))
	if err != nil {
		return err
	}
	defer ng()
	if _, err := harness.WaitReady("https://"+ngAddr, filepath.Join(data, "pki", "ca.pem")); err != nil {
		return fmt.Errorf("nginx: %w", err)
	}
	if got, err := checkinOnce("https://"+ngAddr, pool, devs[1], body); err != nil || !bytes.Equal(got, answer) {
		return fmt.Errorf("nginx does not serve the check-in answer: %v %q", err, got)
	}

	fmt.Printf("\ncheck-ins: %d workers over %d client certificates, %v warm-up, %v measured, answer %d bytes\n",
		o.workers, len(devs), o.warmup, o.duration, len(answer))
	fp, err := load(base, pool, devs, body, o)
	if err != nil {
		return fmt.Errorf("fieldpatch: %w", err)
	}
	nx, err := load("https://"+ngAddr, pool, devs, body, o)
	if err != nil {
		return fmt.Errorf("nginx: %w", err)
	}
	fmt.Printf("| target | requests/s | p50 | p99 | errors |\n| --- | --- | --- | --- | --- |\n")
	for _, r := range []struct {
		name string
		s    stats
	}{{"fieldpatch serve", fp}, {"nginx (static JSON)", nx}} {
		fmt.Printf("| %s | %.0f | %.2f ms | %.2f ms | %d |\n", r.name, r.s.rps, ms(r.s.p50), ms(r.s.p99), r.s.errors)
	}
	ratio := fp.rps / nx.rps

	// Rounds alternate between the two, so drift in this machine's speed
	// over the run falls on both alike.
	fmt.Printf("\nblob download: %d streams x %d rounds of %d MiB, alternating\n", o.streams, o.rounds, o.blobMiB)
	one := o
	one.rounds = 1
	var fpSec, nxSec float64 // seconds per MiB, summed over rounds
	for i := 0; i < o.rounds; i++ {
		f, err := download(base, pool, devs[0], blobPath, one)
		if err != nil {
			return fmt.Errorf("fieldpatch blob: %w", err)
		}
		n, err := download("https://"+ngAddr, pool, devs[0], blobPath, one)
		if err != nil {
			return fmt.Errorf("nginx blob: %w", err)
		}
		fmt.Printf("  round %d: fieldpatch %.0f MiB/s, nginx %.0f MiB/s\n", i+1, f, n)
		fpSec += 1 / f
		nxSec += 1 / n
	}
	fpBlob, nxBlob := float64(o.rounds)/fpSec, float64(o.rounds)/nxSec
	fmt.Printf("| target | MiB/s |\n| --- | --- |\n| fieldpatch serve | %.0f |\n| nginx | %.0f |\n", fpBlob, nxBlob)
	blobRatio := fpBlob / nxBlob

	ok := true
	verdict := func(what string, got, want float64) {
		v := "met"
		if got < want {
			v, ok = "MISSED", false
		}
		fmt.Printf("target: %s >= %.1fx nginx: %s (%.2fx)\n", what, want, v, got)
	}
	fmt.Println()
	verdict("check-in throughput", ratio, 0.5)
	verdict("blob download throughput", blobRatio, 0.9)
	if !ok {
		return errors.New("a target was missed")
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

type adminClient struct {
	base, token string
	http        *http.Client
}

func (a *adminClient) do(method, path string, body any, out any) error {
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case io.Reader:
		r = b
	default:
		j, _ := json.Marshal(b)
		r = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, a.base+path, r)
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %s %s", method, path, resp.Status, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// register provisions n devices; the first certs get their own keys and
// certificates, the others share one key (their certificates are unused).
func register(a *adminClient, n, certs int) ([]device, error) {
	shared, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	devs := make([]device, certs)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				k := shared
				if i < certs {
					k, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				}
				der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
				id := fmt.Sprintf("bench-%05d", i)
				var resp struct {
					CertPEM string `json:"cert_pem"`
				}
				err := a.do("POST", "/api/mgmt/v1/devices", map[string]any{
					"id": id, "groups": []string{"bench"},
					"public_key": string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})),
				}, &resp)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				if i < certs {
					block, _ := pem.Decode([]byte(resp.CertPEM))
					devs[i] = device{id: id, cert: tls.Certificate{Certificate: [][]byte{block.Bytes}, PrivateKey: k}}
				}
				if (i+1)%2000 == 0 {
					fmt.Printf("  %d\n", i+1)
				}
			}
		}()
	}
	wg.Wait()
	return devs, firstErr
}

// release builds a signed image of mib MiB and uploads it; it returns the
// image's SHA-256 as the server stored it.
func release(a *adminClient, key crypto.Signer, mib int, path string) (string, error) {
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	payload := io.LimitReader(randReader{mrand.NewChaCha8([32]byte{7})}, int64(mib)<<20)
	sc := uint32(2)
	if _, err := image.Build(context.Background(), f, payload, int64(mib)<<20, image.BuildOptions{
		Version: "2.0.0", SecurityCounter: &sc, HWClass: "bench", Signers: []crypto.Signer{key},
	}); err != nil {
		return "", err
	}
	if _, err := f.Seek(0, 0); err != nil {
		return "", err
	}
	var rel struct {
		SHA256 string `json:"sha256"`
	}
	if err := a.do("POST", "/api/mgmt/v1/releases?id=bench-2.0.0", f, &rel); err != nil {
		return "", err
	}
	return rel.SHA256, nil
}

type randReader struct{ r *mrand.ChaCha8 }

func (r randReader) Read(p []byte) (int, error) { return r.r.Read(p) }

func transport(pool *x509.CertPool, d device) *http.Transport {
	return &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{d.cert}},
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1 against both
		MaxIdleConnsPerHost: 1,
		MaxConnsPerHost:     1,
		DisableCompression:  true,
	}
}

func checkinOnce(base string, pool *x509.CertPool, d device, body []byte) ([]byte, error) {
	c := &http.Client{Timeout: 10 * time.Second, Transport: transport(pool, d)}
	resp, err := c.Post(base+proto.PathCheckIn, "application/json", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("check-in: %s %s", resp.Status, b)
	}
	return b, nil
}

type stats struct {
	rps      float64
	p50, p99 time.Duration
	errors   int64
}

// load runs the check-in load against base.
func load(base string, pool *x509.CertPool, devs []device, body []byte, o options) (stats, error) {
	clients := make([]*http.Client, len(devs))
	for i, d := range devs {
		clients[i] = &http.Client{Timeout: 30 * time.Second, Transport: transport(pool, d)}
	}
	defer func() {
		for _, c := range clients {
			c.Transport.(*http.Transport).CloseIdleConnections()
		}
	}()
	var measuring atomic.Bool
	var stop atomic.Bool
	var errs, ok atomic.Int64
	lat := make([][]time.Duration, o.workers)
	var wg sync.WaitGroup
	for w := range o.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; !stop.Load(); i += o.workers {
				c := clients[i%len(clients)]
				t0 := time.Now()
				resp, err := c.Post(base+proto.PathCheckIn, "application/json", bytes.NewReader(body))
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("%s", resp.Status)
					}
				}
				if !measuring.Load() {
					continue
				}
				if err != nil {
					errs.Add(1)
					continue
				}
				ok.Add(1)
				lat[w] = append(lat[w], time.Since(t0))
			}
		}()
	}
	time.Sleep(o.warmup)
	measuring.Store(true)
	t0 := time.Now()
	time.Sleep(o.duration)
	measuring.Store(false)
	elapsed := time.Since(t0)
	stop.Store(true)
	wg.Wait()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	if len(all) == 0 {
		return stats{}, fmt.Errorf("no request succeeded (%d errors)", errs.Load())
	}
	slices.Sort(all)
	pct := func(p float64) time.Duration { return all[int(math.Ceil(p*float64(len(all))))-1] }
	return stats{rps: float64(ok.Load()) / elapsed.Seconds(), p50: pct(0.50), p99: pct(0.99), errors: errs.Load()}, nil
}

// download fetches the blob in parallel streams and returns MiB/s.
func download(base string, pool *x509.CertPool, d device, path string, o options) (float64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, o.streams)
	t0 := time.Now()
	for range o.streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 10 * time.Minute, Transport: transport(pool, d)}
			for range o.rounds {
				resp, err := c.Get(base + path)
				if err != nil {
					errc <- err
					return
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 {
					errc <- fmt.Errorf("%s after %d bytes: %v", resp.Status, n, err)
					return
				}
				total.Add(n)
			}
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return 0, err
	}
	return float64(total.Load()) / (1 << 20) / time.Since(t0).Seconds(), nil
}

// startNginx runs nginx with one worker, pinned like the server, TLS 1.3
// only with the server's certificate, verifying client certificates against
// the same CA, serving the check-in answer (also to POST) and the blob.
func startNginx(dir, addr, cpu, pki string, answer []byte, blobPath, blobFile string) (func(), error) {
	ngDir := filepath.Join(dir, "nginx")
	os.MkdirAll(filepath.Join(ngDir, "tmp"), 0o755)
	if err := os.WriteFile(filepath.Join(ngDir, "checkin.json"), answer, 0o644); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf(`daemon off;
user root;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %[1]s/tmp;
    proxy_temp_path %[1]s/tmp;
    fastcgi_temp_path %[1]s/tmp;
    uwsgi_temp_path %[1]s/tmp;
    scgi_temp_path %[1]s/tmp;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {
        listen %[2]s ssl;
        ssl_certificate %[3]s/server.pem;
        ssl_certificate_key %[3]s/server.key.pem;
        ssl_protocols TLSv1.3;
        ssl_client_certificate %[3]s/ca.pem;
        ssl_verify_client optional;
        location = /healthz { return 200 "ok\n"; }
        location = %[4]s {
            if ($ssl_client_verify != SUCCESS) { return 401; }
            default_type application/json;
            alias %[1]s/checkin.json;
            error_page 405 =200 $uri;
        }
        location = %[5]s {
            if ($ssl_client_verify != SUCCESS) { return 401; }
            default_type application/octet-stream;
            alias %[6]s;
        }
    }
}
`, ngDir, addr, pki, proto.PathCheckIn, blobPath, blobFile)
	cf := filepath.Join(ngDir, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command("taskset", "-c", cpu, "nginx", "-c", cf, "-p", ngDir)
	out, _ := os.Create(filepath.Join(ngDir, "stderr.log"))
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return func() {
		harness.Stop(cmd, 5*time.Second)
		out.Close()
	}, nil
}

// stop interrupts a process and waits for it, killing it after grace.
