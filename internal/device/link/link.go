// Package link is the device side of the device API over HTTPS: mutual TLS
// with the provisioning bundle's key and certificate (TLS 1.3 only), check-in,
// status reports that count only once the server acknowledges them, and a
// download client for the agent's fetcher.
package link

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
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/atomicfile"
	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Bundle is a device's provisioning bundle (written by
// `fieldpatch device provision`): bundle.json, device.key.pem, device.pem,
// ca.pem, image-keys/*.pub.pem, and root.json (the first trusted TUF root).
type Bundle struct {
	Server   string `json:"server"`
	DeviceID string `json:"device_id"`
	Dir      string `json:"-"`
}

// TUFRootFile is the bundle's first trusted TUF root (the factory root),
// present when the server had a TUF repository at provisioning.
const TUFRootFile = "root.json"

// TUFRoot reads the bundle's factory TUF root; nil when it has none.
func (b *Bundle) TUFRoot() ([]byte, error) {
	data, err := os.ReadFile(filepath.Join(b.Dir, TUFRootFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return data, err
}

// ImageKeyFiles lists the bundle's image-signing keys.
func (b *Bundle) ImageKeyFiles() []string {
	files, _ := filepath.Glob(filepath.Join(b.Dir, "image-keys", "*.pub.pem"))
	return files
}

// Link talks to the update server.
type Link struct {
	Bundle Bundle
	HTTP   *http.Client
	// Clock is the device's trusted time, kept up to date from the
	// server's answers.
	Clock *Clock
	// Logf, if set, hears about renewals made on the way (see CheckIn).
	Logf func(format string, args ...any)

	tlsConfig *tls.Config // the device API's TLS settings (MQTT reuses them)

	mu        sync.Mutex
	cert      tls.Certificate // the identity presented, replaced on renewal
	leaf      *x509.Certificate
	nextRenew time.Time // after a failed renewal, not before this
}

// Options change how a link connects (a fleet simulator's devices).
type Options struct {
	// Dial, if set, makes the TCP connections (a chosen source address, a
	// modelled network).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// SessionCache, if set, keeps the TLS sessions to resume (default: a
	// small cache of the link's own).
	SessionCache tls.ClientSessionCache
	// Curves, if set, are the key exchanges offered (default Go's: the
	// X25519 + ML-KEM-768 hybrid first). A constrained device's TLS stack
	// may offer X25519 alone.
	Curves []tls.CurveID
	// CoAP, if set (coaps://HOST:PORT), carries the device API over CoAP
	// on DTLS instead of HTTPS; CoAPAuth says how the device
	// authenticates there: "cert" (default) or "psk".
	CoAP, CoAPAuth string
}

// Open reads a bundle and makes the mutual-TLS client.
func Open(dir string) (*Link, error) { return OpenWith(dir, Options{}) }

// OpenWith is Open with options.
func OpenWith(dir string, o Options) (*Link, error) {
	b, err := os.ReadFile(filepath.Join(dir, "bundle.json"))
	if err != nil {
		return nil, fmt.Errorf("provisioning bundle: %w", err)
	}
	var bun Bundle
	if err := json.Unmarshal(b, &bun); err != nil {
		return nil, fmt.Errorf("provisioning bundle %s: %w", dir, err)
	}
	bun.Dir = dir
	if bun.Server == "" || proto.ValidID("device", bun.DeviceID) != nil {
		return nil, fmt.Errorf("provisioning bundle %s: server and device_id are required", dir)
	}
	cert, err := loadIdentity(dir)
	if err != nil {
		return nil, fmt.Errorf("provisioning bundle %s: %w", dir, err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("provisioning bundle %s: ca.pem holds no certificate", dir)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("provisioning bundle %s: %w", dir, err)
	}
	su, err := url.Parse(bun.Server)
	if err != nil || su.Hostname() == "" {
		return nil, fmt.Errorf("provisioning bundle %s: server %q is not a URL", dir, bun.Server)
	}
	serverName := su.Hostname()
	l := &Link{Bundle: bun, cert: cert, leaf: leaf, Clock: newClock(dir, leaf.NotBefore)}
	sessions := o.SessionCache
	if sessions == nil {
		sessions = tls.NewLRUClientSessionCache(4)
	}
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, ClientSessionCache: sessions,
			// The server's certificate is checked below on the trusted
			// clock, not the raw one (a device at 1970 or years ahead).
			InsecureSkipVerify: true,
			VerifyConnection: func(cs tls.ConnectionState) error {
				return l.verifyServer(cs, pool, serverName)
			},
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				l.mu.Lock()
				defer l.mu.Unlock()
				c := l.cert
				return &c, nil
			}},
		ForceAttemptHTTP2:     true,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   15 * time.Second,
	}
	if o.Dial != nil {
		tr.DialContext = o.Dial
	}
	tr.TLSClientConfig.CurvePreferences = o.Curves
	l.tlsConfig = tr.TLSClientConfig
	l.HTTP = &http.Client{Transport: &observer{base: tr, clock: l.Clock}}
	if o.CoAP != "" {
		addr, err := ParseCoAP(o.CoAP)
		if err != nil {
			return nil, err
		}
		host, _, _ := net.SplitHostPort(addr)
		ct, err := l.coapTransport(addr, o.CoAPAuth, host, pool)
		if err != nil {
			return nil, fmt.Errorf("provisioning bundle %s: %w", dir, err)
		}
		l.HTTP = &http.Client{Transport: &observer{base: ct, clock: l.Clock}}
	}
	return l, nil
}

// verifyServer checks the server's chain against the bundle's CA and the
// server name, at the trusted time; if that fails, at the floor (the last
// time the device knows was real): a device whose clock runs years ahead
// still reaches its server and learns the time from it.
func (l *Link) verifyServer(cs tls.ConnectionState, pool *x509.CertPool, serverName string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the server sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	// The name (or IP address) checked is the bundle's server, always: an
	// IP address sends no SNI, and an empty name would check none.
	opts := x509.VerifyOptions{Roots: pool, Intermediates: inter, DNSName: serverName, CurrentTime: l.Clock.Now()}
	_, err := cs.PeerCertificates[0].Verify(opts)
	if err == nil {
		return nil
	}
	opts.CurrentTime = l.Clock.Floor()
	if _, ferr := cs.PeerCertificates[0].Verify(opts); ferr == nil {
		return nil
	}
	return err
}

// observer reads the server's time from every answer on the link.
type observer struct {
	base  http.RoundTripper
	clock *Clock
}

// CloseIdleConnections lets http.Client close the TLS connections (after
// a renewal, so the next one presents the new certificate).
func (o *observer) CloseIdleConnections() {
	if c, ok := o.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

func (o *observer) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := o.base.RoundTrip(req)
	// Only an answer over the verified TLS link vouches for the time, and
	// never past the server certificate's expiry (so a wrong Date cannot
	// push the floor where that certificate no longer verifies).
	if err == nil && resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
		if t, perr := http.ParseTime(resp.Header.Get("Date")); perr == nil {
			if na := resp.TLS.PeerCertificates[0].NotAfter; t.After(na) {
				t = na
			}
			o.clock.Observe(t)
		}
	}
	return resp, err
}

// BusyError is the server asking the device to come back later (503).
type BusyError struct{ RetryAfter time.Duration }

func (e *BusyError) Error() string { return fmt.Sprintf("server busy: retry after %v", e.RetryAfter) }

// Retry is how long the server asked to wait.
func (e *BusyError) Retry() time.Duration { return e.RetryAfter }

// URL resolves a path against the server's URL.
func (l *Link) URL(path string) string {
	if strings.HasPrefix(path, "https://") || strings.HasPrefix(path, "http://") {
		return path
	}
	return strings.TrimRight(l.Bundle.Server, "/") + path
}

func (l *Link) post(ctx context.Context, path string, in, out any) error {
	body, _ := json.Marshal(in)
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "POST", l.URL(path), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := l.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, proto.MaxBodyBytes))
	switch {
	case resp.StatusCode == http.StatusServiceUnavailable:
		secs, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
		return &BusyError{RetryAfter: time.Duration(max(secs, 1)) * time.Second}
	case resp.StatusCode != http.StatusOK:
		var pe proto.Error
		json.Unmarshal(b, &pe)
		return fmt.Errorf("%s %s: %s: %s", "POST", path, resp.Status, pe.Error)
	}
	return json.Unmarshal(b, out)
}

// CheckIn tells the server about the device and returns its answer. First,
// when a third or less of the certificate's lifetime is left, it renews the
// certificate (a daemon that runs for years keeps a valid identity); a failed
// renewal does not stop the check-in and is tried again an hour later, or
// sooner for short lifetimes.
func (l *Link) CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error) {
	l.renewIfDue(ctx, time.Now())
	var resp proto.CheckInResponse
	if err := l.post(ctx, proto.PathCheckIn, c, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// Report sends a status report; it succeeds only when the server says the
// report is stored.
func (l *Link) Report(ctx context.Context, r proto.Report) error {
	var ack proto.ReportAck
	if err := l.post(ctx, proto.PathReports, r, &ack); err != nil {
		return err
	}
	if !ack.Stored || ack.ReportID != r.ReportID {
		return errors.New("the server did not acknowledge the report")
	}
	return nil
}

// identityFile holds a renewed certificate and its key together, so that
// replacing both is one atomic rename; Open prefers it to the bundle's
// device.pem and device.key.pem.
const identityFile = "identity.pem"

func loadIdentity(dir string) (tls.Certificate, error) {
	if b, err := os.ReadFile(filepath.Join(dir, identityFile)); err == nil {
		return tls.X509KeyPair(b, b)
	}
	return tls.LoadX509KeyPair(filepath.Join(dir, "device.pem"), filepath.Join(dir, "device.key.pem"))
}

// Certificate returns the device's current certificate.
func (l *Link) Certificate() (*x509.Certificate, error) {
	c, err := loadIdentity(l.Bundle.Dir)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(c.Certificate[0])
}

// NeedsRenewal says whether a certificate has a third or less of its
// lifetime left at now.
func NeedsRenewal(c *x509.Certificate, now time.Time) bool {
	life := c.NotAfter.Sub(c.NotBefore)
	return c.NotAfter.Sub(now) <= life/3
}

// Renew makes a new key, has the server certify it (authenticating with the
// current certificate), and replaces the identity atomically.
func (l *Link) Renew(ctx context.Context) (*x509.Certificate, error) {
	_, pubPEM, keyPEM, err := newKey()
	if err != nil {
		return nil, err
	}
	var resp proto.EnrollResponse
	if err := l.post(ctx, proto.PathRenew, proto.RenewRequest{PublicKey: pubPEM}, &resp); err != nil {
		return nil, err
	}
	cert, err := parseCert(resp.CertPEM)
	if err != nil {
		return nil, err
	}
	pair := append([]byte(resp.CertPEM), keyPEM...)
	id, err := tls.X509KeyPair(pair, pair)
	if err != nil {
		return nil, fmt.Errorf("renewed certificate: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(l.Bundle.Dir, identityFile), pair, 0o600); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.cert, l.leaf = id, cert
	l.mu.Unlock()
	l.HTTP.CloseIdleConnections() // new connections present the new identity
	return cert, nil
}

func (l *Link) renewIfDue(ctx context.Context, now time.Time) {
	l.mu.Lock()
	leaf, next := l.leaf, l.nextRenew
	l.mu.Unlock()
	if leaf == nil || !NeedsRenewal(leaf, now) || now.Before(next) {
		return
	}
	cert, err := l.Renew(ctx)
	if err != nil {
		wait := min(time.Hour, leaf.NotAfter.Sub(leaf.NotBefore)/30)
		l.mu.Lock()
		l.nextRenew = now.Add(wait)
		l.mu.Unlock()
		l.logf("certificate renewal failed (the current one is valid until %s; trying again in %v): %v",
			leaf.NotAfter.UTC().Format(time.RFC3339), wait.Round(time.Second), err)
		return
	}
	l.logf("renewed the device certificate: valid until %s", cert.NotAfter.UTC().Format(time.RFC3339))
}

func (l *Link) logf(format string, args ...any) {
	if l.Logf != nil {
		l.Logf(format, args...)
	}
}

// EnrollConfig says how a device without a bundle gets one.
type EnrollConfig struct {
	Server   string // the server's URL
	CAFile   string // the server's CA certificate, shipped with the firmware
	DeviceID string
	Token    string        // a fleet enrollment token; empty: wait for approval
	Poll     time.Duration // between attempts while pending (default 30s)
}

// ErrPending is what Enroll returns while the device waits for approval
// and ctx ends.
var ErrPending = errors.New("enrollment pending approval")

// Enroll makes the device's key (once; it is kept for every attempt), asks
// the server for a certificate, waits while approval is pending, and writes
// the bundle into dir.
func Enroll(ctx context.Context, c EnrollConfig, dir string, log func(string)) error {
	if err := proto.ValidID("device id", c.DeviceID); err != nil {
		return err
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("%s: no CA certificate", c.CAFile)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	keyPath := filepath.Join(dir, "device.key.pem")
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		_, _, kp, err := newKey()
		if err != nil {
			return err
		}
		if err := atomicfile.Write(keyPath, kp, 0o600); err != nil {
			return err
		}
		keyPEM = kp
	}
	pubPEM, err := publicPEM(keyPEM)
	if err != nil {
		return err
	}
	l := &Link{Bundle: Bundle{Server: c.Server, DeviceID: c.DeviceID, Dir: dir},
		HTTP: &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool}}}}
	// Enrollment is done once: its connection is not kept for later.
	defer l.HTTP.CloseIdleConnections()
	poll := c.Poll
	if poll <= 0 {
		poll = 30 * time.Second
	}
	for {
		var resp proto.EnrollResponse
		err := l.postStatus(ctx, proto.PathEnroll, proto.EnrollRequest{DeviceID: c.DeviceID, PublicKey: pubPEM, Token: c.Token}, &resp)
		if err != nil {
			return err
		}
		if resp.Status == "enrolled" {
			manifest, _ := json.MarshalIndent(Bundle{Server: c.Server, DeviceID: c.DeviceID}, "", "  ")
			files := []struct {
				name string
				data []byte
			}{{"device.pem", []byte(resp.CertPEM)}, {"ca.pem", []byte(resp.CAPEM)}}
			if resp.PSK != "" {
				if err := atomicfile.Write(filepath.Join(dir, PSKFile), []byte(resp.PSK+"\n"), 0o600); err != nil {
					return err
				}
			}
			if len(resp.TUFRoot) > 0 {
				files = append(files, struct {
					name string
					data []byte
				}{TUFRootFile, resp.TUFRoot})
			}
			files = append(files, struct {
				name string
				data []byte
			}{"bundle.json", manifest}) // last: its presence says the bundle is whole
			for _, f := range files {
				if err := atomicfile.Write(filepath.Join(dir, f.name), f.data, 0o644); err != nil {
					return err
				}
			}
			return nil
		}
		if log != nil {
			log("enrollment pending approval by an operator")
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return ErrPending
		case <-t.C:
		}
	}
}

// postStatus is post that also accepts 202 (a pending enrollment).
func (l *Link) postStatus(ctx context.Context, path string, in any, out *proto.EnrollResponse) error {
	body, _ := json.Marshal(in)
	req, err := http.NewRequestWithContext(ctx, "POST", l.URL(path), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := l.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, proto.MaxBodyBytes))
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusAccepted {
		var pe proto.Error
		json.Unmarshal(b, &pe)
		return fmt.Errorf("enroll: %s: %s", resp.Status, pe.Error)
	}
	return json.Unmarshal(b, out)
}

func newKey() (*ecdsa.PrivateKey, string, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, "", nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, "", nil, err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	pubPEM, err := publicPEM(keyPEM)
	return key, pubPEM, keyPEM, err
}

func publicPEM(keyPEM []byte) (string, error) {
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return "", errors.New("device key: no PEM block")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return "", err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return "", errors.New("device key: not a signing key")
	}
	der, err := x509.MarshalPKIXPublicKey(s.Public())
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

func parseCert(p string) (*x509.Certificate, error) {
	block, _ := pem.Decode([]byte(p))
	if block == nil {
		return nil, errors.New("no certificate in the answer")
	}
	return x509.ParseCertificate(block.Bytes)
}
