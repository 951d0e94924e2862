package link

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// CoAP authentication modes (Options.CoAPAuth).
const (
	CoAPAuthCert = "cert" // the device certificate (ECDHE-ECDSA suites)
	CoAPAuthPSK  = "psk"  // the pre-shared key issued at enrollment (PSK suites)
)

// PSKFile holds the device's pre-shared key for CoAP over DTLS.
const PSKFile = proto.BundlePSKFile

// coapBlock is the block size asked for (SZX 6), and the most a request
// may carry.
const coapBlock = 1024

// optionDate is the server's time in its answers (see coapapi.OptionDate).
const optionDate message.OptionID = 65000

// ParseCoAP checks a CoAP server address, coaps://HOST:PORT, and returns
// HOST:PORT.
func ParseCoAP(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "coaps" || u.Hostname() == "" || u.Port() == "" || (u.Path != "" && u.Path != "/") {
		return "", fmt.Errorf("coap server %q: want coaps://HOST:PORT", s)
	}
	return u.Host, nil
}

// coapTransport carries the device API's HTTP requests over CoAP on DTLS:
// one session, redialed when it fails, one request at a time (a
// constrained device's way). GET answers come block-wise (Block2) and are
// streamed: a Range request starts at the block holding its offset. POST
// answers longer than a block are fetched by repeating the POST with a
// Block2 option.
type coapTransport struct {
	addr   string
	dtls   func() []piondtls.ClientOption
	peer   func() *x509.Certificate // the server's certificate, once verified (certificate mode)
	mu     sync.Mutex
	cc     *udpclient.Conn
	idle   time.Duration
	usedAt time.Time
}

func (l *Link) coapTransport(addr, auth, serverName string, pool *x509.CertPool) (*coapTransport, error) {
	t := &coapTransport{addr: addr, idle: 90 * time.Second}
	switch auth {
	case "", CoAPAuthCert:
		var mu sync.Mutex
		var seen *x509.Certificate
		t.peer = func() *x509.Certificate { mu.Lock(); defer mu.Unlock(); return seen }
		t.dtls = func() []piondtls.ClientOption {
			return []piondtls.ClientOption{
				piondtls.WithGetClientCertificate(func(*piondtls.CertificateRequestInfo) (*tls.Certificate, error) {
					l.mu.Lock()
					defer l.mu.Unlock()
					c := l.cert
					return &c, nil
				}),
				// Checked on the trusted clock, as over HTTPS.
				piondtls.WithInsecureSkipVerify(true),
				piondtls.WithVerifyPeerCertificate(func(raw [][]byte, _ [][]*x509.Certificate) error {
					var certs []*x509.Certificate
					for _, r := range raw {
						c, err := x509.ParseCertificate(r)
						if err != nil {
							return err
						}
						certs = append(certs, c)
					}
					if err := l.verifyServer(tls.ConnectionState{PeerCertificates: certs}, pool, serverName); err != nil {
						return err
					}
					mu.Lock()
					seen = certs[0]
					mu.Unlock()
					return nil
				}),
				piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret),
				piondtls.WithCipherSuites(piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
			}
		}
	case CoAPAuthPSK:
		key, err := readPSK(l.Bundle.Dir)
		if err != nil {
			return nil, err
		}
		id := []byte(l.Bundle.DeviceID)
		t.dtls = func() []piondtls.ClientOption {
			return []piondtls.ClientOption{
				piondtls.WithPSK(func([]byte) ([]byte, error) { return key, nil }),
				piondtls.WithPSKIdentityHint(id),
				piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret),
				piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256, piondtls.TLS_PSK_WITH_AES_128_CCM_8),
			}
		}
	default:
		return nil, fmt.Errorf("coap auth %q: want %q or %q", auth, CoAPAuthCert, CoAPAuthPSK)
	}
	return t, nil
}

func readPSK(dir string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(dir, PSKFile))
	if err != nil {
		return nil, fmt.Errorf("the bundle has no pre-shared key for CoAP (%s): %w", PSKFile, err)
	}
	key := bytes.TrimSpace(b)
	if len(key) < 16 {
		return nil, fmt.Errorf("the bundle's pre-shared key (%s) is too short", PSKFile)
	}
	return key, nil
}

// conn is the session, dialed when there is none (or it is closed, or it
// was idle long enough for the server to have dropped it). Called with mu
// held.
func (t *coapTransport) conn(ctx context.Context) (*udpclient.Conn, error) {
	if t.cc != nil && (t.cc.Context().Err() != nil || time.Since(t.usedAt) > t.idle) {
		t.cc.Close()
		t.cc = nil
	}
	if t.cc != nil {
		return t.cc, nil
	}
	cc, err := coapdtls.Dial(t.addr, coapdtls.NewDTLSClientOptions(t.dtls()...),
		options.WithBlockwise(false, blockwise.SZX1024, time.Minute),
		options.WithContext(context.Background()),
		options.WithTransmission(1, 2*time.Second, 3),
		options.WithInactivityMonitor(10*time.Minute, func(cc *udpclient.Conn) { cc.Close() }),
	)
	if err != nil {
		return nil, fmt.Errorf("coap %s: %w", t.addr, err)
	}
	if dc, ok := cc.NetConn().(*piondtls.Conn); ok {
		hctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		err := dc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			cc.Close()
			return nil, fmt.Errorf("coap %s: DTLS handshake: %w", t.addr, err)
		}
	}
	t.cc = cc
	return cc, nil
}

// CloseIdleConnections ends the session (after a renewal, the next one
// presents the new certificate).
func (t *coapTransport) CloseIdleConnections() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cc != nil {
		t.cc.Close()
		t.cc = nil
	}
}

// exchange sends one request and returns its answer's code, payload and
// options it needs. block < 0 sends no Block2 option.
func (t *coapTransport) exchange(ctx context.Context, method codes.Code, path string, body []byte, block int64) (*reply, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cc, err := t.conn(ctx)
	if err != nil {
		return nil, err
	}
	req := cc.AcquireMessage(ctx)
	defer cc.ReleaseMessage(req)
	req.SetCode(method)
	if err := req.SetPath(path); err != nil {
		return nil, err
	}
	req.SetType(message.Confirmable)
	if method == codes.POST {
		req.SetContentFormat(message.AppJSON)
		req.SetBody(bytes.NewReader(body))
	}
	if block >= 0 {
		v, _ := blockwise.EncodeBlockOption(blockwise.SZX1024, block, false)
		req.SetOptionUint32(message.Block2, v)
	}
	resp, err := cc.Do(req)
	t.usedAt = time.Now()
	if err != nil {
		// The session may be gone (the server restarted or dropped it):
		// the next request dials a new one.
		cc.Close()
		t.cc = nil
		return nil, fmt.Errorf("coap %s %s: %w", method, path, err)
	}
	defer cc.ReleaseMessage(resp)
	r := &reply{code: resp.Code()}
	if r.payload, err = resp.ReadBody(); err != nil {
		return nil, err
	}
	r.etag, _ = resp.ETag()
	r.etag = bytes.Clone(r.etag)
	if v, err := resp.GetOptionUint32(message.Block2); err == nil {
		szx, num, more, err := blockwise.DecodeBlockOption(v)
		if err != nil {
			return nil, fmt.Errorf("coap %s: bad Block2 in the answer", path)
		}
		r.block, r.num, r.more, r.size = true, num, more, int64(szx.Size())
	}
	if v, err := resp.GetOptionUint32(message.Size2); err == nil {
		r.total = int64(v)
	} else {
		r.total = -1
	}
	if v, err := resp.GetOptionUint32(message.MaxAge); err == nil {
		r.maxAge = v
	}
	if v, err := resp.GetOptionUint32(optionDate); err == nil {
		r.date = time.Unix(int64(v), 0)
	}
	return r, nil
}

type reply struct {
	code          codes.Code
	payload, etag []byte
	block, more   bool
	num, size     int64
	total         int64
	maxAge        uint32
	date          time.Time
}

// RoundTrip carries an HTTP request over CoAP.
func (t *coapTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		b, err := io.ReadAll(io.LimitReader(req.Body, coapBlock+1))
		req.Body.Close()
		if err != nil {
			return nil, err
		}
		if len(b) > coapBlock {
			return nil, fmt.Errorf("coap %s: request longer than %d bytes", req.URL.Path, coapBlock)
		}
		body = b
	}
	ctx := req.Context()
	switch req.Method {
	case http.MethodPost:
		return t.post(ctx, req, body)
	case http.MethodGet:
		return t.get(ctx, req)
	}
	return nil, fmt.Errorf("coap: method %s is not carried", req.Method)
}

func (t *coapTransport) post(ctx context.Context, req *http.Request, body []byte) (*http.Response, error) {
	path := req.URL.Path
	r, err := t.exchange(ctx, codes.POST, path, body, -1)
	if err != nil {
		return nil, err
	}
	first := r
	all := r.payload
	for r.block && r.more && success(r.code) {
		if len(all) > proto.MaxBodyBytes {
			return nil, fmt.Errorf("coap POST %s: answer longer than %d bytes", path, proto.MaxBodyBytes)
		}
		next := r.num + 1
		if r, err = t.exchange(ctx, codes.POST, path, body, next); err != nil {
			return nil, err
		}
		if !success(r.code) || r.num != next || !bytes.Equal(r.etag, first.etag) {
			return nil, fmt.Errorf("coap POST %s: the answer changed between blocks (%v)", path, r.code)
		}
		all = append(all, r.payload...)
	}
	return t.response(req, first, io.NopCloser(bytes.NewReader(all)), int64(len(all)), ""), nil
}

func (t *coapTransport) get(ctx context.Context, req *http.Request) (*http.Response, error) {
	path := req.URL.Path
	var from int64
	if rg := req.Header.Get("Range"); rg != "" {
		v, ok := strings.CutPrefix(rg, "bytes=")
		v, ok2 := strings.CutSuffix(v, "-")
		n, err := strconv.ParseInt(v, 10, 64)
		if !ok || !ok2 || err != nil || n < 0 {
			return nil, fmt.Errorf("coap GET %s: Range %q is not carried (only bytes=N-)", path, rg)
		}
		from = n
	}
	num := from / coapBlock
	if from > 0 && from%coapBlock == 0 {
		// From a block boundary, the block before is asked for and
		// skipped whole: a download whose every byte was kept then meets
		// an empty answer, not a block past the end (4.02).
		num--
	}
	r, err := t.exchange(ctx, codes.GET, path, nil, num)
	if err != nil {
		return nil, err
	}
	if r.code == codes.BadOption && num > 0 {
		// A block past the end (the client asks for no other bad
		// option): the range cannot be met, as HTTPS says it.
		return t.unsatisfiable(req, r, -1), nil
	}
	if !success(r.code) {
		return t.response(req, r, io.NopCloser(bytes.NewReader(r.payload)), int64(len(r.payload)), ""), nil
	}
	if !r.block {
		// The whole resource in one answer.
		if from > 0 && from >= int64(len(r.payload)) {
			return t.unsatisfiable(req, r, int64(len(r.payload))), nil
		}
		p := r.payload[from:]
		return t.response(req, r, io.NopCloser(bytes.NewReader(p)), int64(len(p)), rangeOf(from, r.payload, from > 0)), nil
	}
	if r.num != num || r.size != coapBlock {
		return nil, fmt.Errorf("coap GET %s: asked for block %d of %d bytes, got block %d of %d", path, num, coapBlock, r.num, r.size)
	}
	skip := from - num*coapBlock
	end := r.total // the resource's length: Size2, or where its last block ends
	if end < 0 && !r.more {
		end = num*coapBlock + int64(len(r.payload))
	}
	if from > 0 && end >= 0 && from >= end {
		// From the end or past it: 416 with the length, as over HTTPS
		// (a download whose every byte was kept learns it is whole).
		return t.unsatisfiable(req, r, end), nil
	}
	if skip > int64(len(r.payload)) {
		return nil, fmt.Errorf("coap GET %s: offset %d is past the end", path, from)
	}
	br := &blockReader{t: t, ctx: ctx, path: path, etag: r.etag, buf: r.payload[skip:], num: r.num, more: r.more}
	length := int64(-1)
	cr := ""
	if r.total >= 0 {
		length = r.total - from
		if from > 0 {
			cr = fmt.Sprintf("bytes %d-%d/%d", from, r.total-1, r.total)
		}
	}
	return t.response(req, r, br, length, cr), nil
}

// unsatisfiable is HTTP's 416 for a range that starts at or past the
// resource's end: with Content-Range "bytes */TOTAL" when the total is
// known (total >= 0).
func (t *coapTransport) unsatisfiable(req *http.Request, r *reply, total int64) *http.Response {
	resp := t.response(req, r, http.NoBody, 0, "")
	resp.StatusCode = http.StatusRequestedRangeNotSatisfiable
	resp.Status = fmt.Sprintf("%d %s (CoAP %v)", resp.StatusCode, http.StatusText(resp.StatusCode), r.code)
	if total >= 0 {
		resp.Header.Set("Content-Range", fmt.Sprintf("bytes */%d", total))
	}
	return resp
}

func rangeOf(from int64, whole []byte, ranged bool) string {
	if !ranged {
		return ""
	}
	return fmt.Sprintf("bytes %d-%d/%d", from, len(whole)-1, len(whole))
}

// response builds the HTTP answer the caller reads; cr, if set, makes it a
// 206 with that Content-Range.
func (t *coapTransport) response(req *http.Request, r *reply, body io.ReadCloser, length int64, cr string) *http.Response {
	resp := &http.Response{Request: req, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Header: http.Header{},
		Body: body, ContentLength: length}
	resp.StatusCode = coapToHTTP(r.code)
	if cr != "" && resp.StatusCode == http.StatusOK {
		resp.StatusCode = http.StatusPartialContent
		resp.Header.Set("Content-Range", cr)
	}
	resp.Status = fmt.Sprintf("%d %s (CoAP %v)", resp.StatusCode, http.StatusText(resp.StatusCode), r.code)
	if len(r.etag) > 0 {
		resp.Header.Set("ETag", fmt.Sprintf(`"%x"`, r.etag))
	}
	if r.maxAge > 0 && resp.StatusCode == http.StatusServiceUnavailable {
		resp.Header.Set("Retry-After", strconv.Itoa(int(r.maxAge)))
	}
	if !r.date.IsZero() {
		resp.Header.Set("Date", r.date.UTC().Format(http.TimeFormat))
	}
	if t.peer != nil {
		if c := t.peer(); c != nil {
			resp.TLS = &tls.ConnectionState{HandshakeComplete: true, PeerCertificates: []*x509.Certificate{c}}
		}
	}
	return resp
}

func coapToHTTP(c codes.Code) int {
	switch c {
	case codes.Content, codes.Changed, codes.Created, codes.Valid, codes.Deleted:
		return http.StatusOK
	case codes.BadRequest, codes.BadOption:
		return http.StatusBadRequest
	case codes.Unauthorized:
		return http.StatusUnauthorized
	case codes.Forbidden:
		return http.StatusForbidden
	case codes.NotFound:
		return http.StatusNotFound
	case codes.MethodNotAllowed:
		return http.StatusMethodNotAllowed
	case codes.Conflict:
		return http.StatusConflict
	case codes.RequestEntityTooLarge:
		return http.StatusRequestEntityTooLarge
	case codes.UnsupportedMediaType:
		return http.StatusUnsupportedMediaType
	case codes.ServiceUnavailable:
		return http.StatusServiceUnavailable
	case codes.NotImplemented:
		return http.StatusNotImplemented
	}
	return http.StatusInternalServerError
}

// blockReader streams a block-wise GET: each Read past the blocks it has
// asks for the next.
type blockReader struct {
	t    *coapTransport
	ctx  context.Context
	path string
	etag []byte
	buf  []byte
	num  int64
	more bool
	err  error
}

func (b *blockReader) Read(p []byte) (int, error) {
	for len(b.buf) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		if !b.more {
			return 0, io.EOF
		}
		if err := b.ctx.Err(); err != nil {
			b.err = err
			return 0, err
		}
		next := b.num + 1
		r, err := b.t.exchange(b.ctx, codes.GET, b.path, nil, next)
		switch {
		case err != nil:
			b.err = err
		case !success(r.code):
			b.err = fmt.Errorf("coap GET %s block %d: %v", b.path, next, r.code)
		case !r.block || r.num != next:
			b.err = fmt.Errorf("coap GET %s: asked for block %d, got another", b.path, next)
		case !bytes.Equal(r.etag, b.etag):
			b.err = fmt.Errorf("coap GET %s: the resource changed during the transfer", b.path)
		default:
			b.buf, b.num, b.more = r.payload, r.num, r.more
		}
	}
	n := copy(p, b.buf)
	b.buf = b.buf[n:]
	return n, nil
}

func (b *blockReader) Close() error {
	if b.err == nil {
		b.err = errors.New("body closed")
	}
	return nil
}

// success is a 2.xx code.
func success(c codes.Code) bool { return c>>5 == 2 }
