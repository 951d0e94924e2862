// Package link is the device side of the device API over HTTPS: mutual TLS
// with the provisioning bundle's key and certificate (TLS 1.3 only), check-in,
// status reports that count only once the server acknowledges them, and a
// download client for the agent's fetcher.
package link

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Bundle is a device's provisioning bundle (written by
// `fieldpatch device provision`): bundle.json, device.key.pem, device.pem,
// ca.pem, image-keys/*.pub.pem.
type Bundle struct {
	Server   string `json:"server"`
	DeviceID string `json:"device_id"`
	Dir      string `json:"-"`
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
}

// Open reads a bundle and makes the mutual-TLS client.
func Open(dir string) (*Link, error) {
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
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "device.pem"), filepath.Join(dir, "device.key.pem"))
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
	tr := &http.Transport{
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}, ClientSessionCache: tls.NewLRUClientSessionCache(4)},
		ForceAttemptHTTP2:     true,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   15 * time.Second,
	}
	return &Link{Bundle: bun, HTTP: &http.Client{Transport: tr}}, nil
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

// CheckIn tells the server about the device and returns its answer.
func (l *Link) CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error) {
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
