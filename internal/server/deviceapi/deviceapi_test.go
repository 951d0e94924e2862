package deviceapi

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/blob"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

type env struct {
	t     *testing.T
	srv   *httptest.Server
	st    *store.Store
	ca    *pki.CA
	image []byte
	sum   string
}

// newEnv starts the device API on a real TLS 1.3 listener on loopback,
// with a real SQLite file and blob folder, and a release assigned to lock-1.
func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, filepath.Join(dir, "db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	blobs := &blob.Store{Dir: filepath.Join(dir, "blobs")}
	e := &env{t: t, st: st, image: bytes.Repeat([]byte("firmware 2.0.0 "), 70000)}
	e.sum, _, err = blobs.Put(ctx, bytes.NewReader(e.image), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"lock-1", "lock-2"} {
		st.AddDevice(ctx, id, []string{"lab"})
	}
	st.AddRelease(ctx, store.Release{ID: "lock-2.0.0", Version: "2.0.0", HWClass: "lock", SecurityCounter: 2, SHA256: e.sum, Length: int64(len(e.image))})
	st.Assign(ctx, "r1", "lock-2.0.0", "device", "lock-1", false)
	e.ca, _, err = pki.LoadOrCreateCA(filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	cert, _, err := e.ca.LoadOrCreateServerCert(filepath.Join(dir, "pki"), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	api := &API{Store: st, Blobs: blobs}
	e.srv = httptest.NewUnstartedServer(api.Handler())
	e.srv.TLS = &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: e.ca.Pool(),
	}
	e.srv.EnableHTTP2 = true
	e.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are expected here
	e.srv.StartTLS()
	t.Cleanup(e.srv.Close)
	return e
}

// client makes an HTTPS client for a device (or none when id is "").
func (e *env) client(id string, ca *pki.CA, maxTLS uint16) *http.Client {
	tc := &tls.Config{RootCAs: e.ca.Pool(), MaxVersion: maxTLS}
	if id != "" {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		certPEM, err := ca.IssueDevice(id, key.Public())
		if err != nil {
			e.t.Fatal(err)
		}
		der, _ := x509.MarshalPKCS8PrivateKey(key)
		c, err := tls.X509KeyPair(certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
		if err != nil {
			e.t.Fatal(err)
		}
		tc.Certificates = []tls.Certificate{c}
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true}}
}

func (e *env) post(c *http.Client, path string, body any) (*http.Response, []byte) {
	e.t.Helper()
	var b []byte
	switch v := body.(type) {
	case []byte:
		b = v
	default:
		b, _ = json.Marshal(v)
	}
	resp, err := c.Post(e.srv.URL+path, "application/json", bytes.NewReader(b))
	if err != nil {
		e.t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp, out
}

var checkin = proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock", SecurityCounter: 1}

func TestCheckInOfferDownloadReport(t *testing.T) {
	e := newEnv(t)
	c := e.client("lock-1", e.ca, 0)
	resp, body := e.post(c, proto.PathCheckIn, checkin)
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
		t.Fatalf("check-in: %s %s %s", resp.Status, resp.Proto, body)
	}
	var cr proto.CheckInResponse
	json.Unmarshal(body, &cr)
	o := cr.Offer
	if o == nil || o.Target.Custom.Version != "2.0.0" || o.Target.Hashes["sha256"] != e.sum || o.Target.Length != int64(len(e.image)) || cr.NextPollSeconds < 3600 {
		t.Fatalf("offer %+v (poll %d)", o, cr.NextPollSeconds)
	}
	// Download with a Range: the server resumes from an offset.
	req, _ := http.NewRequest("GET", e.srv.URL+o.URL, nil)
	req.Header.Set("Range", "bytes=1000-")
	r2, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	part, _ := io.ReadAll(r2.Body)
	r2.Body.Close()
	if r2.StatusCode != http.StatusPartialContent || !bytes.Equal(part, e.image[1000:]) || r2.Header.Get("ETag") != `"`+e.sum+`"` {
		t.Fatalf("ranged download: %s, %d bytes, etag %q", r2.Status, len(part), r2.Header.Get("ETag"))
	}
	// Reports: acknowledged, idempotent.
	rep := proto.Report{ReportID: "rep-1", UpdateID: o.UpdateID, Status: proto.StatusCommitted, Version: "2.0.0"}
	for i := 0; i < 2; i++ {
		resp, body = e.post(c, proto.PathReports, rep)
		var ack proto.ReportAck
		json.Unmarshal(body, &ack)
		if resp.StatusCode != 200 || !ack.Stored {
			t.Fatalf("report %d: %s %s", i, resp.Status, body)
		}
	}
	ups, _ := e.st.Updates(context.Background(), "lock-1")
	if len(ups) != 1 || ups[0].Status != proto.StatusCommitted {
		t.Fatalf("updates %+v", ups)
	}
}

// Who may do what: another device, another CA, no certificate, TLS 1.2.
func TestRefusals(t *testing.T) {
	e := newEnv(t)
	c1 := e.client("lock-1", e.ca, 0)
	_, body := e.post(c1, proto.PathCheckIn, checkin)
	var cr proto.CheckInResponse
	json.Unmarshal(body, &cr)

	c2 := e.client("lock-2", e.ca, 0)
	e.post(c2, proto.PathCheckIn, checkin)
	if resp, _ := e.post(c2, proto.PathReports, proto.Report{ReportID: "x", UpdateID: cr.Offer.UpdateID, Status: proto.StatusFailed}); resp.StatusCode != 404 {
		t.Errorf("lock-2 reporting on lock-1's update: %s", resp.Status)
	}
	if resp, err := c2.Get(e.srv.URL + cr.Offer.URL); err != nil || resp.StatusCode != 404 {
		t.Errorf("lock-2 downloading an image it was not offered: %v %v", resp.Status, err)
	}
	if resp, _ := e.post(e.client("", nil, 0), proto.PathCheckIn, checkin); resp.StatusCode != 401 {
		t.Errorf("no client certificate: %s", resp.Status)
	}
	other, _, _ := pki.LoadOrCreateCA(t.TempDir())
	if _, err := e.client("lock-1", other, 0).Post(e.srv.URL+proto.PathCheckIn, "application/json", strings.NewReader("{}")); err == nil {
		t.Error("a certificate from another CA was accepted")
	}
	if _, err := e.client("lock-1", e.ca, tls.VersionTLS12).Post(e.srv.URL+proto.PathCheckIn, "application/json", strings.NewReader("{}")); err == nil {
		t.Error("a TLS 1.2 client was accepted")
	}
}

// Bad input on every endpoint: a clear 4xx and nothing stored.
func TestBadInput(t *testing.T) {
	e := newEnv(t)
	c := e.client("lock-1", e.ca, 0)
	cases := []struct {
		path string
		body []byte
		code int
	}{
		{proto.PathCheckIn, []byte(`{"version": `), 400},
		{proto.PathCheckIn, []byte(`{"version":"1.0.0","slot":"a","hw_class":"lock","surprise":1}`), 400},
		{proto.PathCheckIn, []byte(`{"version":"1.0.0","slot":"z","hw_class":"lock"}`), 400},
		{proto.PathCheckIn, bytes.Repeat([]byte(" "), proto.MaxBodyBytes+10), 413},
		{proto.PathCheckIn, []byte(`{"version":"1.0.0","slot":"a","hw_class":"lock","health":{"watchdog_resets":9007199254740993}}`), 400},
		{proto.PathCheckIn, []byte(`{"version":"1.0.0","slot":"a","hw_class":"lock","health":{"crashes":-1}}`), 400},
		{proto.PathCheckIn, []byte(`{"version":"1.0.0","slot":"a","hw_class":"lock","time_zone":"../../etc/passwd"}`), 400},
		{proto.PathCheckIn, []byte(`{"version":"1.0.0","slot":"a","hw_class":"lock","attributes":{"Bad Name":"x"}}`), 400},
		{proto.PathReports, []byte(`{"report_id":"../x","update_id":"u","status":"committed"}`), 400},
		{proto.PathReports, []byte(`{"report_id":"r","update_id":"nope","status":"committed"}`), 404},
		{proto.PathReports, []byte(`[]`), 400},
	}
	for i, tc := range cases {
		resp, body := e.post(c, tc.path, tc.body)
		var pe proto.Error
		if resp.StatusCode != tc.code || json.Unmarshal(body, &pe) != nil || pe.Error == "" {
			t.Errorf("case %d: %s %s, want %d with an error message", i, resp.Status, body, tc.code)
		}
	}
	for _, p := range []string{"../../etc/passwd", "%2e%2e%2fdb", strings.Repeat("a", 64)} {
		resp, err := c.Get(e.srv.URL + proto.PathBlobs + p)
		if err != nil || resp.StatusCode != 404 {
			t.Errorf("blob %q: %v %v", p, resp.Status, err)
		}
	}
	ups, _ := e.st.Updates(context.Background(), "lock-1")
	d, _ := e.st.GetDevice(context.Background(), "lock-1")
	if len(ups) != 0 || d.Version != "" {
		t.Fatalf("bad input stored something: updates %+v, device %+v", ups, d)
	}
}

// A commit failure in the store: the report is not acknowledged (500), and
// the device's retry is stored.
func TestReportNotAcknowledgedWhenNotStored(t *testing.T) {
	e := newEnv(t)
	c := e.client("lock-1", e.ca, 0)
	_, body := e.post(c, proto.PathCheckIn, checkin)
	var cr proto.CheckInResponse
	json.Unmarshal(body, &cr)
	e.st.BeforeCommit = func() error { return errors.New("injected: disk full") }
	rep := proto.Report{ReportID: "r1", UpdateID: cr.Offer.UpdateID, Status: proto.StatusCommitted}
	if resp, _ := e.post(c, proto.PathReports, rep); resp.StatusCode != 500 {
		t.Fatalf("report with a failing commit: %s", resp.Status)
	}
	e.st.BeforeCommit = nil
	if resp, _ := e.post(c, proto.PathReports, rep); resp.StatusCode != 200 {
		t.Fatalf("retry: %s", resp.Status)
	}
	if ups, _ := e.st.Updates(context.Background(), "lock-1"); ups[0].Status != proto.StatusCommitted {
		t.Fatalf("status %s", ups[0].Status)
	}
}

// Over its limit the API answers 503 with Retry-After.
func TestLoadShedding(t *testing.T) {
	e := newEnv(t)
	api := &API{Store: e.st, MaxInFlight: 1, RetryAfter: 7e9}
	h := api.Handler()
	api.sem <- struct{}{} // one request in flight
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", proto.PathCheckIn, strings.NewReader("{}")))
	if rec.Code != 503 || rec.Header().Get("Retry-After") != "7" {
		t.Fatalf("%d, Retry-After %q", rec.Code, rec.Header().Get("Retry-After"))
	}
}

// Downloads have their own bound: a fleet downloading does not crowd out
// check-ins, and past it a download is answered 503.
func TestDownloadsBoundedApart(t *testing.T) {
	e := newEnv(t)
	api := &API{Store: e.st, MaxInFlight: 1, MaxDownloads: 2, RetryAfter: 5e9}
	h := api.Handler()
	api.dlSem <- struct{}{}
	api.dlSem <- struct{}{} // two downloads in flight: the download bound is reached
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", proto.PathBlobs+strings.Repeat("ab", 32), nil))
	if rec.Code != 503 || rec.Header().Get("Retry-After") != "5" {
		t.Fatalf("download past its bound: %d, Retry-After %q", rec.Code, rec.Header().Get("Retry-After"))
	}
	// A check-in still gets through (and is refused for its missing
	// certificate, not shed).
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", proto.PathCheckIn, strings.NewReader("{}")))
	if rec.Code != 401 {
		t.Fatalf("check-in while downloads are at their bound: %d, want 401 (not shed)", rec.Code)
	}
}

// A revoked device is refused on its next request, on every endpoint.
func TestRevokedDeviceRefused(t *testing.T) {
	e := newEnv(t)
	c := e.client("lock-1", e.ca, 0)
	_, body := e.post(c, proto.PathCheckIn, checkin)
	var cr proto.CheckInResponse
	json.Unmarshal(body, &cr)
	if err := e.st.Revoke(context.Background(), "lock-1"); err != nil {
		t.Fatal(err)
	}
	if resp, _ := e.post(c, proto.PathCheckIn, checkin); resp.StatusCode != 403 {
		t.Errorf("check-in after revocation: %s", resp.Status)
	}
	if resp, _ := e.post(c, proto.PathReports, proto.Report{ReportID: "r", UpdateID: cr.Offer.UpdateID, Status: proto.StatusCommitted}); resp.StatusCode != 403 {
		t.Errorf("report after revocation: %s", resp.Status)
	}
	if resp, err := c.Get(e.srv.URL + cr.Offer.URL); err != nil || resp.StatusCode != 403 {
		t.Errorf("download after revocation: %v %v", resp.Status, err)
	}
	// A certificate for a device the server never registered is refused too.
	if resp, _ := e.post(e.client("stranger", e.ca, 0), proto.PathCheckIn, checkin); resp.StatusCode != 403 {
		t.Errorf("unregistered device: %s", resp.Status)
	}
	if err := e.st.Revoke(context.Background(), "lock-1"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("revoking twice: %v", err)
	}
}

func TestEnrollEndpoint(t *testing.T) {
	e := newEnv(t)
	api := &API{Store: e.st, CA: e.ca}
	h := api.Handler()
	post := func(req proto.EnrollRequest) (int, proto.EnrollResponse) {
		b, _ := json.Marshal(req)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", proto.PathEnroll, bytes.NewReader(b)))
		var resp proto.EnrollResponse
		json.Unmarshal(rec.Body.Bytes(), &resp)
		return rec.Code, resp
	}
	pubPEM := func() string {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		der, _ := x509.MarshalPKIXPublicKey(k.Public())
		return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	}
	key := pubPEM()
	// No token: pending, then approved, then enrolled with a certificate naming it.
	if code, r := post(proto.EnrollRequest{DeviceID: "lock-30", PublicKey: key}); code != 202 || r.Status != "pending" {
		t.Fatalf("pending: %d %+v", code, r)
	}
	if code, _ := post(proto.EnrollRequest{DeviceID: "lock-30", PublicKey: pubPEM()}); code != 409 {
		t.Errorf("another key for a pending device: %d", code)
	}
	if err := e.st.Approve(context.Background(), "lock-30", []string{"lab"}); err != nil {
		t.Fatal(err)
	}
	code, r := post(proto.EnrollRequest{DeviceID: "lock-30", PublicKey: key})
	if code != 200 || r.Status != "enrolled" {
		t.Fatalf("after approval: %d %+v", code, r)
	}
	cert, err := pki.ParseCert([]byte(r.CertPEM))
	if id, _ := pki.DeviceID(cert); err != nil || id != "lock-30" {
		t.Fatalf("certificate names %q (%v)", id, err)
	}
	// Bad input: nothing stored.
	for _, bad := range []proto.EnrollRequest{
		{DeviceID: "../x", PublicKey: key},
		{DeviceID: "lock-31", PublicKey: "not a key"},
		{DeviceID: "lock-31", PublicKey: key, Token: "fpe_unknown"},
	} {
		if code, _ := post(bad); code < 400 || code >= 500 {
			t.Errorf("bad enrollment %+v: %d", bad, code)
		}
	}
	if p, _ := e.st.Pending(context.Background()); len(p) != 0 {
		t.Errorf("pending after bad input: %v", p)
	}
	// A revoked device cannot come back through enrollment.
	e.st.Revoke(context.Background(), "lock-30")
	if code, _ := post(proto.EnrollRequest{DeviceID: "lock-30", PublicKey: key}); code != 403 {
		t.Errorf("revoked device re-enrolling: %d", code)
	}
}
