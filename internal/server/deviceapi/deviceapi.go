// Package deviceapi serves the device API (docs/PROTOCOL.md) over HTTPS with
// mutual TLS: check-in and offers, image downloads with Range and ETag, and
// status reports acknowledged only once stored. A device is who its client
// certificate says, and reads and writes only its own records.
package deviceapi

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"strconv"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/blob"
	"github.com/fieldpatch/fieldpatch/internal/server/metrics"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/server/repo"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

// API is the device API.
type API struct {
	Store *store.Store
	Blobs *blob.Store
	Log   *slog.Logger
	// PollInterval is the base time between check-ins; each answer adds up
	// to 10% of jitter so a fleet does not come back in step.
	PollInterval time.Duration
	// MaxInFlight bounds concurrent requests; past it the API answers 503
	// with Retry-After and devices back off. Image downloads, which last
	// long, have their own bound (MaxDownloads), so a fleet downloading
	// does not crowd out check-ins and reports.
	MaxInFlight int
	// MaxDownloads bounds concurrent image downloads (default 1024); past
	// it a download is answered 503 and the device resumes it later.
	MaxDownloads int
	// RetryAfter is what 503 answers ask devices to wait.
	RetryAfter time.Duration
	// Metrics, if set, counts check-ins, offers, downloads and reports.
	Metrics *metrics.Registry
	// CA issues certificates to enrolling and renewing devices; nil turns
	// enrollment off.
	CA *pki.CA
	// Repo is the TUF repository; once it has a root, only releases
	// published as its targets are offered, and devices read its metadata.
	Repo *repo.Repo

	sem, dlSem chan struct{}
}

// Handler returns the HTTP handler for the device API.
func (a *API) Handler() http.Handler {
	if a.MaxInFlight <= 0 {
		a.MaxInFlight = 256
	}
	if a.MaxDownloads <= 0 {
		a.MaxDownloads = 1024
	}
	if a.PollInterval <= 0 {
		a.PollInterval = time.Hour
	}
	if a.RetryAfter <= 0 {
		a.RetryAfter = 30 * time.Second
	}
	if a.Log == nil {
		a.Log = slog.New(slog.DiscardHandler)
	}
	if a.Metrics == nil {
		a.Metrics = metrics.New()
	}
	a.Metrics.Counter("fieldpatch_checkins_total", "Device check-ins answered.")
	a.Metrics.Counter("fieldpatch_offers_total", "Update offers made.")
	a.Metrics.Counter("fieldpatch_downloads_total", "Image downloads started (including ranged resumptions).")
	a.Metrics.Counter("fieldpatch_download_bytes_total", "Image bytes served.")
	a.Metrics.Counter("fieldpatch_reports_total", "Device reports stored, by status.", "status")
	a.Metrics.Counter("fieldpatch_shed_total", "Requests answered 503 because too many were in flight.")
	a.sem = make(chan struct{}, a.MaxInFlight)
	a.dlSem = make(chan struct{}, a.MaxDownloads)
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+proto.PathCheckIn, a.device(a.checkIn))
	mux.HandleFunc("GET "+proto.PathBlobs+"{sum}", a.limited(a.dlSem, a.blob))
	mux.HandleFunc("HEAD "+proto.PathBlobs+"{sum}", a.limited(a.dlSem, a.blob))
	mux.HandleFunc("POST "+proto.PathReports, a.device(a.report))
	mux.HandleFunc("POST "+proto.PathRenew, a.device(a.renew))
	mux.HandleFunc("POST "+proto.PathEnroll, a.enroll)
	mux.HandleFunc("GET "+proto.PathTUF+"{file}", a.device(a.tufFile))
	return mux
}

type ctxKey int

const (
	keyDevice ctxKey = iota
	keyContinuation
)

// WithDevice marks a request as coming from a device another transport
// has authenticated (CoAP over DTLS, in process): the API takes the device
// ID from the context instead of a TLS client certificate. Requests from
// the network cannot carry it.
func WithDevice(ctx context.Context, deviceID string) context.Context {
	return context.WithValue(ctx, keyDevice, deviceID)
}

// WithContinuation marks an image read as the next part of a download
// already counted (a CoAP block after the first).
func WithContinuation(ctx context.Context) context.Context {
	return context.WithValue(ctx, keyContinuation, true)
}

type deviceHandler func(w http.ResponseWriter, r *http.Request, deviceID string)

// device wraps a handler: load shedding, then the device's identity from
// its verified client certificate.
func (a *API) device(h deviceHandler) http.HandlerFunc { return a.limited(a.sem, h) }

// limited is device with the in-flight bound sem.
func (a *API) limited(sem chan struct{}, h deviceHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
		default:
			a.Metrics.Add("fieldpatch_shed_total", 1)
			w.Header().Set("Retry-After", strconv.Itoa(int(a.RetryAfter.Seconds())))
			fail(w, http.StatusServiceUnavailable, "server busy: retry later")
			return
		}
		id, ok := r.Context().Value(keyDevice).(string)
		if !ok {
			if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
				fail(w, http.StatusUnauthorized, "a device certificate is required")
				return
			}
			var err error
			id, err = pki.DeviceID(r.TLS.VerifiedChains[0][0])
			if err != nil {
				id = ""
			}
		}
		if proto.ValidID("device", id) != nil {
			fail(w, http.StatusForbidden, "the certificate names no valid device")
			return
		}
		if err := a.Store.Active(r.Context(), id); err != nil {
			if errors.Is(err, store.ErrRevoked) || errors.Is(err, store.ErrNotFound) {
				fail(w, http.StatusForbidden, "this device is not allowed: revoked or unknown")
				return
			}
			a.storeError(w, "device lookup", id, err)
			return
		}
		h(w, r, id)
	}
}

func fail(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(proto.Error{Error: msg})
}

// decode reads a bounded JSON body with no unknown fields.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, proto.MaxBodyBytes)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			fail(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body larger than %d bytes", proto.MaxBodyBytes))
		} else {
			fail(w, http.StatusBadRequest, "malformed JSON: "+err.Error())
		}
		return false
	}
	if dec.More() {
		fail(w, http.StatusBadRequest, "malformed JSON: more than one value")
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func newID() string {
	var b [10]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (a *API) jitter() int {
	base := int(a.PollInterval.Seconds())
	if base < 1 {
		base = 1
	}
	n, _ := rand.Int(rand.Reader, big.NewInt(int64(base/10+1)))
	return base + int(n.Int64())
}

func (a *API) checkIn(w http.ResponseWriter, r *http.Request, id string) {
	var c proto.CheckIn
	if !decode(w, r, &c) {
		return
	}
	if err := c.Validate(); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	ctx := r.Context()
	if err := a.Store.CheckIn(ctx, id, c); err != nil {
		a.storeError(w, "check-in", id, err)
		return
	}
	up, rel, down, err := a.Store.Offer(ctx, id, newID)
	if err != nil {
		a.storeError(w, "offer", id, err)
		return
	}
	resp := proto.CheckInResponse{NextPollSeconds: a.jitter()}
	a.Metrics.Add("fieldpatch_checkins_total", 1)
	if up != nil {
		a.Metrics.Add("fieldpatch_offers_total", 1)
		resp.Offer = &proto.Offer{
			UpdateID: up.ID,
			URL:      proto.PathBlobs + rel.SHA256,
			Target: proto.Target{
				Name:   rel.HWClass + "/" + rel.Version + ".img",
				Length: rel.Length,
				Hashes: map[string]string{"sha256": rel.SHA256},
				Custom: proto.TargetCustom{Version: rel.Version, SecurityCounter: rel.SecurityCounter, HWClass: rel.HWClass,
					Format: "mcuboot", Downgrade: down, KeyEpoch: rel.KeyEpoch},
			},
		}
		a.Log.Info("offer", "device", id, "update", up.ID, "release", rel.ID)
	}
	writeJSON(w, resp)
}

// tufRoot is the repository's current root, for a device's bundle.
func (a *API) tufRoot() json.RawMessage {
	if a.Repo == nil {
		return nil
	}
	b, err := a.Repo.Current("root")
	if err != nil {
		return nil
	}
	return b
}

// tufFile serves the repository's metadata; a file that does not exist
// (the next root, say) is a 404, which is how a device learns it has the
// newest.
func (a *API) tufFile(w http.ResponseWriter, r *http.Request, id string) {
	if a.Repo == nil {
		fail(w, http.StatusNotFound, "no TUF repository")
		return
	}
	b, err := a.Repo.File(r.PathValue("file"))
	if err != nil {
		fail(w, http.StatusNotFound, "no such metadata")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Write(b)
}

func (a *API) blob(w http.ResponseWriter, r *http.Request, id string) {
	sum := r.PathValue("sum")
	if proto.ValidSHA256(sum) != nil {
		fail(w, http.StatusNotFound, "no such image")
		return
	}
	ok, err := a.Store.DeviceMayRead(r.Context(), id, sum)
	if err != nil {
		a.storeError(w, "blob", id, err)
		return
	}
	if !ok {
		fail(w, http.StatusNotFound, "no such image") // not revealed to devices it was not offered to
		return
	}
	f, err := a.Blobs.Open(sum)
	if err != nil {
		fail(w, http.StatusNotFound, "no such image")
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		fail(w, http.StatusInternalServerError, "blob unreadable")
		return
	}
	w.Header().Set("ETag", `"`+sum+`"`)
	w.Header().Set("Content-Type", "application/octet-stream")
	if r.Context().Value(keyContinuation) == nil {
		a.Metrics.Add("fieldpatch_downloads_total", 1)
	}
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", fi.ModTime(), f)
	a.Metrics.Add("fieldpatch_download_bytes_total", float64(cw.n))
}

func (a *API) report(w http.ResponseWriter, r *http.Request, id string) {
	var rep proto.Report
	if !decode(w, r, &rep) {
		return
	}
	if err := rep.Validate(); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	stored, err := a.Store.RecordReport(r.Context(), id, rep)
	if err != nil {
		a.storeError(w, "report", id, err)
		return
	}
	a.Log.Info("report", "device", id, "update", rep.UpdateID, "status", rep.Status, "reason", rep.Reason, "new", stored)
	if stored {
		a.Metrics.Add("fieldpatch_reports_total", 1, rep.Status)
	}
	writeJSON(w, proto.ReportAck{ReportID: rep.ReportID, Stored: true})
}

// enroll issues a certificate to a device with a valid enrollment token, or
// records it as pending until an operator approves it (the device asks
// again). It needs no client certificate: it is how a device gets one.
func (a *API) enroll(w http.ResponseWriter, r *http.Request) {
	if a.CA == nil {
		fail(w, http.StatusNotFound, "enrollment is not enabled")
		return
	}
	select {
	case a.sem <- struct{}{}:
		defer func() { <-a.sem }()
	default:
		w.Header().Set("Retry-After", strconv.Itoa(int(a.RetryAfter.Seconds())))
		fail(w, http.StatusServiceUnavailable, "server busy: retry later")
		return
	}
	var req proto.EnrollRequest
	if !decode(w, r, &req) {
		return
	}
	if err := proto.ValidID("device_id", req.DeviceID); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	pub, err := pki.ParsePublicKey(req.PublicKey)
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	ctx := r.Context()
	if req.Token != "" {
		sum := sha256.Sum256([]byte(req.Token))
		if err := a.Store.EnrollWithToken(ctx, hex.EncodeToString(sum[:]), req.DeviceID); err != nil {
			a.enrollError(w, err)
			return
		}
	} else {
		state, err := a.Store.RequestEnrollment(ctx, req.DeviceID, req.PublicKey)
		if err != nil {
			a.enrollError(w, err)
			return
		}
		if state != "approved" {
			w.Header().Set("Retry-After", "30")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusAccepted)
			json.NewEncoder(w).Encode(proto.EnrollResponse{Status: "pending"})
			return
		}
		if err := a.Store.Active(ctx, req.DeviceID); err != nil {
			fail(w, http.StatusForbidden, "this device is not allowed: revoked")
			return
		}
	}
	cert, err := a.CA.IssueDevice(req.DeviceID, pub)
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	psk := pki.NewPSK()
	if err := a.Store.SetDevicePSK(ctx, req.DeviceID, psk); err != nil {
		a.storeError(w, "enroll", req.DeviceID, err)
		return
	}
	a.Log.Info("device enrolled", "device", req.DeviceID, "by_token", req.Token != "")
	writeJSON(w, proto.EnrollResponse{Status: "enrolled", CertPEM: string(cert), CAPEM: string(a.CA.CertPEM), TUFRoot: a.tufRoot(), PSK: psk})
}

func (a *API) enrollError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusForbidden, err.Error())
	case errors.Is(err, store.ErrConflict):
		fail(w, http.StatusConflict, err.Error())
	default:
		a.Log.Error("enroll failed", "err", err)
		fail(w, http.StatusBadRequest, err.Error())
	}
}

// renew issues a new certificate for a new key to a device that still
// holds a valid one.
func (a *API) renew(w http.ResponseWriter, r *http.Request, id string) {
	if a.CA == nil {
		fail(w, http.StatusNotFound, "renewal is not enabled")
		return
	}
	var req proto.RenewRequest
	if !decode(w, r, &req) {
		return
	}
	pub, err := pki.ParsePublicKey(req.PublicKey)
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	cert, err := a.CA.IssueDevice(id, pub)
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	a.Log.Info("device certificate renewed", "device", id)
	writeJSON(w, proto.EnrollResponse{Status: "enrolled", CertPEM: string(cert), CAPEM: string(a.CA.CertPEM), TUFRoot: a.tufRoot()})
}

// countingWriter counts the body bytes written.
type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach the real writer.
func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// storeError answers a store failure: unknown records are 404 (and never
// say whose they are); anything else is 500, so the device retries and
// nothing is acknowledged that was not stored.
func (a *API) storeError(w http.ResponseWriter, what, id string, err error) {
	if errors.Is(err, store.ErrNotFound) {
		fail(w, http.StatusNotFound, "not found")
		return
	}
	if errors.Is(err, context.Canceled) {
		return
	}
	a.Log.Error(what+" failed", "device", id, "err", err)
	fail(w, http.StatusInternalServerError, "not stored: retry")
}
