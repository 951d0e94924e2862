// Command coap measures block-wise image downloads over CoAP on DTLS
// against HTTPS in the same run: one `fieldpatch serve` with --coap-listen,
// a 1 MiB image offered to one device, downloaded by the agent's link over
// HTTPS, over CoAP with the device's pre-shared key and with its
// certificate, and by libcoap's coap-client-openssl. The round trips are
// the CoAP requests the server counted.
//
//	go run ./bench/coap -bin bin
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/bench/internal/harness"
	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/link"
	"github.com/fieldpatch/fieldpatch/internal/proto"
)

func main() {
	bin := flag.String("bin", "bin", "directory holding the fieldpatch binary")
	kib := flag.Int("image-kib", 1024, "image payload size in KiB")
	runs := flag.Int("runs", 5, "downloads per transport (the median is reported)")
	flag.Parse()
	if err := run(*bin, *kib, *runs); err != nil {
		fmt.Fprintln(os.Stderr, "bench/coap:", err)
		os.Exit(1)
	}
}

type row struct {
	name       string
	block      string
	roundTrips string
	median     time.Duration
	bytes      int
}

func run(bin string, kib, runs int) error {
	w, done, err := harness.NewWork("", "fieldpatch-bench-coap-", bin, false)
	if err != nil {
		return err
	}
	defer done()
	dir, cli := w.Dir, w.CLI
	fp := filepath.Join(bin, "fieldpatch")
	addr, err := harness.FreeAddr()
	if err != nil {
		return err
	}
	data := filepath.Join(dir, "data")
	srv := exec.Command(fp, "serve", "--listen", addr, "--data-dir", data, "--mqtt-listen", "off", "--coap-listen", "127.0.0.1:0",
		"--image-key", w.ImageKey(), "--rollout-tick", "1s")
	out, err := srv.StdoutPipe()
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	defer harness.Stop(srv, 10*time.Second)
	coapAddr := ""
	sc := bufio.NewScanner(out)
	re := regexp.MustCompile(`CoAP over DTLS  coaps://(\S+)`)
	for coapAddr == "" && sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			coapAddr = m[1]
		}
	}
	go io.Copy(io.Discard, out)
	if coapAddr == "" {
		return fmt.Errorf("the server did not report its CoAP address")
	}
	url := "https://" + addr
	pool, err := harness.WaitReady(url, filepath.Join(data, "pki", "ca.pem"))
	if err != nil {
		return err
	}
	rcli := w.Remote(url, data)
	payload := make([]byte, kib<<10)
	rand.Read(payload)
	pf := filepath.Join(dir, "payload")
	os.WriteFile(pf, payload, 0o644)
	img := filepath.Join(dir, "v2.img")
	if _, err := cli("image", "build", "--payload", pf, "--version", "2.0.0", "--security-counter", "2", "--hw-class", "lock", "--key", filepath.Join(w.Keys, "release.pem"), "-o", img); err != nil {
		return err
	}
	imgBytes, _ := os.ReadFile(img)
	sum := sha256.Sum256(imgBytes)
	want := hex.EncodeToString(sum[:])
	bundle := filepath.Join(dir, "bundle")
	for _, args := range [][]string{
		{"release", "upload", "--id", "lock-2.0.0", img},
		{"device", "provision", "lock-1", "--out", bundle},
		{"rollout", "create", "lock-2.0.0", "--id", "r1", "--device", "lock-1", "--start"},
	} {
		if _, err := rcli(args...); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	https, err := link.Open(bundle)
	if err != nil {
		return err
	}
	var offer *proto.Offer
	for offer == nil && ctx.Err() == nil {
		resp, err := https.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"})
		if err != nil {
			return err
		}
		if offer = resp.Offer; offer == nil {
			time.Sleep(300 * time.Millisecond)
		}
	}
	if offer == nil {
		return fmt.Errorf("no offer")
	}
	metrics := func() int {
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		resp, err := hc.Get(url + "/metrics")
		if err != nil {
			return -1
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		n := 0
		for line := range strings.Lines(string(b)) {
			if strings.HasPrefix(line, `fieldpatch_http_requests_total{api="coap"`) {
				f := strings.Fields(line)
				v, _ := strconv.Atoi(f[len(f)-1])
				n += v
			}
		}
		return n
	}
	fetch := func(c *http.Client) (int, error) {
		resp, err := agent.GetFrom(ctx, c, https.URL(offer.URL), 0)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if err != nil {
			return 0, err
		}
		if resp.StatusCode != http.StatusOK || hex.EncodeToString(h.Sum(nil)) != want {
			return 0, fmt.Errorf("download: %s, %d bytes not matching the image", resp.Status, n)
		}
		return int(n), nil
	}
	measure := func(name, block string, get func() (int, error)) (row, error) {
		r := row{name: name, block: block}
		var times []time.Duration
		before := metrics()
		for range runs {
			start := time.Now()
			n, err := get()
			if err != nil {
				return r, fmt.Errorf("%s: %w", name, err)
			}
			times = append(times, time.Since(start))
			r.bytes = n
		}
		slices.Sort(times)
		r.median = times[len(times)/2]
		if rt := (metrics() - before) / runs; rt > 0 {
			r.roundTrips = strconv.Itoa(rt)
		} else {
			r.roundTrips = "-"
		}
		return r, nil
	}
	var rows []row
	r, err := measure("HTTPS (TLS 1.3, one stream)", "-", func() (int, error) { return fetch(https.HTTP) })
	if err != nil {
		return err
	}
	rows = append(rows, r)
	for _, auth := range []string{link.CoAPAuthPSK, link.CoAPAuthCert} {
		l, err := link.OpenWith(bundle, link.Options{CoAP: "coaps://" + coapAddr, CoAPAuth: auth})
		if err != nil {
			return err
		}
		r, err := measure("CoAP over DTLS 1.2, "+auth+" (agent)", "1024", func() (int, error) { return fetch(l.HTTP) })
		if err != nil {
			return err
		}
		rows = append(rows, r)
		l.HTTP.CloseIdleConnections()
	}
	if client, err := exec.LookPath("coap-client-openssl"); err == nil {
		psk, _ := os.ReadFile(filepath.Join(bundle, proto.BundlePSKFile))
		o := filepath.Join(dir, "libcoap.out")
		r, err := measure("CoAP, psk (libcoap coap-client-openssl)", "1024", func() (int, error) {
			os.Remove(o)
			c := exec.CommandContext(ctx, client, "-u", "lock-1", "-k", strings.TrimSpace(string(psk)), "-m", "get", "-b", "1024", "-B", "60", "-o", o,
				"coaps://"+coapAddr+offer.URL)
			c.Run() // it exits 0 whatever happens: the file tells
			b, _ := os.ReadFile(o)
			s := sha256.Sum256(b)
			if hex.EncodeToString(s[:]) != want {
				return 0, fmt.Errorf("libcoap got %d bytes not matching the image", len(b))
			}
			return len(b), nil
		})
		if err != nil {
			return err
		}
		rows = append(rows, r)
	} else {
		fmt.Println("coap-client-openssl not installed (apt-get install libcoap3-bin): its row is left out")
	}
	fmt.Printf("\nimage %d bytes (%d KiB payload), loopback, median of %d downloads each\n\n", len(imgBytes), kib, runs)
	fmt.Println("| transport | block size | round trips | time | MiB/s | vs HTTPS |")
	fmt.Println("| --- | --- | --- | --- | --- | --- |")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %s | %v | %.1f | %.1fx |\n", r.name, r.block, r.roundTrips, r.median.Round(time.Millisecond),
			float64(r.bytes)/(1<<20)/r.median.Seconds(), float64(r.median)/float64(rows[0].median))
	}
	return nil
}
