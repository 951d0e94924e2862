// Package coapapi serves the device API over CoAP on DTLS (RFC 7252, RFC
// 6347) for constrained devices: the same resources as over HTTPS, at the
// same paths, answered by the same handler. A device authenticates with its
// certificate (ECDHE-ECDSA suites, the device CA) or with the pre-shared key
// issued at its enrollment (PSK suites; the PSK identity is the device ID).
//
// Large answers (images, TUF metadata) are sent block-wise (RFC 7959
// Block2). For GET the server keeps no state: block n is a ranged read of the
// resource, so a device may resume a download at any block, even with
// another connection. A POST answer longer than a block is kept for the
// session, and the device fetches its next blocks by repeating the POST with
// a Block2 option. Requests must fit in one block (1,024 bytes of payload):
// Block1 is not taken.
package coapapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	dtlsserver "github.com/plgd-dev/go-coap/v3/dtls/server"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/net/responsewriter"
	"github.com/plgd-dev/go-coap/v3/options"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/deviceapi"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
)

// BlockSize is the largest block the server sends (SZX 6) and the largest
// request payload it takes.
const BlockSize = 1024

// OptionDate is an elective option (experimental range, RFC 7252 12.2) in
// every answer: the server's time in seconds since 1970, which a device uses
// as HTTPS's Date header (to keep its trusted clock).
const OptionDate message.OptionID = 65000

// Config configures the CoAP server.
type Config struct {
	// Handler is the device API (deviceapi.API.Handler); requests reach
	// it with the device's identity in their context.
	Handler http.Handler
	// Certificate is the server's (ECDSA) certificate; ClientCAs verify
	// device certificates.
	Certificate tls.Certificate
	ClientCAs   *x509.CertPool
	// PSK returns a device's pre-shared key, or an error for an unknown,
	// revoked or key-less device (the handshake then fails).
	PSK func(deviceID string) ([]byte, error)
	Log *slog.Logger
	// Idle is how long a quiet DTLS session is kept (default 2 minutes).
	Idle time.Duration
	// MaxSessions bounds the DTLS sessions held at once (default
	// DefaultMaxSessions); one device holds at most SessionsPerDevice.
	MaxSessions int
	// Closed hears of each session closed by those bounds, with a reason
	// (ClosedFull, ClosedReplaced).
	Closed func(reason string)
}

// Server is a CoAP over DTLS server.
type Server struct {
	cfg  Config
	ln   *coapnet.DTLSListener
	addr net.Addr
	srv  *dtlsserver.Server
	held *sessions[*udpclient.Conn]
	done chan struct{}
	once sync.Once
}

type ctxKey int

const (
	keyDevice ctxKey = iota
	keyPosts
)

// Listen makes a server on a UDP address (not yet serving).
func Listen(addr string, c Config) (*Server, error) {
	if c.Handler == nil || c.ClientCAs == nil || c.PSK == nil || len(c.Certificate.Certificate) == 0 {
		return nil, errors.New("coap: handler, certificate, client CAs and PSK lookup are required")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Idle <= 0 {
		c.Idle = 2 * time.Minute
	}
	if c.MaxSessions <= 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	if c.Closed == nil {
		c.Closed = func(string) {}
	}
	ln, err := coapnet.NewDTLSListener("udp", addr, coapnet.NewDTLSServerOptions(
		piondtls.WithCertificates(c.Certificate),
		piondtls.WithClientCAs(c.ClientCAs),
		piondtls.WithClientAuth(piondtls.RequireAndVerifyClientCert),
		piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret),
		piondtls.WithCipherSuites(
			piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
			piondtls.TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256,
			piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
			piondtls.TLS_PSK_WITH_AES_128_CCM_8,
			piondtls.TLS_PSK_WITH_AES_128_CBC_SHA256,
		),
		piondtls.WithPSK(func(identity []byte) ([]byte, error) {
			id := string(identity)
			if proto.ValidID("device", id) != nil {
				return nil, errors.New("not a device identity")
			}
			return c.PSK(id)
		}),
	))
	if err != nil {
		return nil, fmt.Errorf("coap listen %s: %w", addr, err)
	}
	s := &Server{cfg: c, ln: ln, addr: ln.Addr(), done: make(chan struct{}), held: newSessions[*udpclient.Conn](c.MaxSessions, SessionsPerDevice)}
	s.srv = coapdtls.NewServer(
		options.WithHandlerFunc(s.handle),
		options.WithBlockwise(false, blockwise.SZX1024, time.Minute),
		options.WithOnNewConn(s.onNewConn),
		options.WithInactivityMonitor(c.Idle, func(cc *udpclient.Conn) { cc.Close() }),
		options.WithDTLSHandshakeTimeout(20*time.Second),
		options.WithMaxMessageSize(BlockSize+256),
		options.WithErrors(func(err error) { c.Log.Debug("coap", "err", err) }),
	)
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() net.Addr { return s.addr }

// Serve serves in the background until Close.
func (s *Server) Serve() {
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(s.ln); err != nil {
			s.cfg.Log.Error("coap server stopped", "err", err)
		}
	}()
}

// Close stops the server and waits for it.
func (s *Server) Close() error {
	s.once.Do(func() {
		s.srv.Stop()
		s.ln.Close()
	})
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
	}
	return nil
}

// onNewConn runs once the handshake is complete: the session's identity is
// the PSK identity, or the device ID in the verified certificate. The
// session then counts against the bounds (sessions.go).
func (s *Server) onNewConn(cc *udpclient.Conn) {
	dc, ok := cc.NetConn().(*piondtls.Conn)
	if !ok {
		cc.Close()
		return
	}
	st, ok := dc.ConnectionState()
	if !ok {
		cc.Close()
		return
	}
	var id string
	switch {
	case len(st.IdentityHint) > 0:
		id = string(st.IdentityHint)
	case len(st.PeerCertificates) > 0:
		cert, err := x509.ParseCertificate(st.PeerCertificates[0])
		if err == nil {
			id, err = pki.DeviceID(cert)
		}
		if err != nil {
			id = ""
		}
	}
	if proto.ValidID("device", id) != nil {
		s.cfg.Log.Warn("coap: session without a device identity", "remote", cc.RemoteAddr())
		cc.Close()
		return
	}
	ok, old, evicted := s.held.admit(id, cc)
	if evicted {
		s.cfg.Log.Info("coap: a device's oldest session closed for its new one", "device", id, "remote", old.RemoteAddr())
		s.cfg.Closed(ClosedReplaced)
		old.Close()
	}
	if !ok {
		s.cfg.Log.Warn("coap: session refused: every session slot is held", "device", id, "remote", cc.RemoteAddr(), "max", s.cfg.MaxSessions)
		s.cfg.Closed(ClosedFull)
		cc.Close()
		return
	}
	cc.AddOnClose(func() { s.held.drop(id, cc) })
	cc.SetContextValue(keyDevice, id)
	cc.SetContextValue(keyPosts, &postCache{})
}

// Sessions is how many DTLS sessions the server holds.
func (s *Server) Sessions() int { return s.held.held() }

// postCache keeps the session's last long POST answer for its next blocks.
type postCache struct {
	mu   sync.Mutex
	path string
	ans  answer
}

// answer is an HTTP answer on its way to CoAP.
type answer struct {
	code   codes.Code
	format message.MediaType
	body   []byte
	total  int64 // the resource's length (for a ranged read, more than body)
	etag   []byte
	maxAge uint32
	extra  []message.Option
}

func (s *Server) handle(w *responsewriter.ResponseWriter[*udpclient.Conn], r *pool.Message) {
	cc := w.Conn()
	id, _ := cc.Context().Value(keyDevice).(string)
	if id == "" {
		reply(w, answer{code: codes.Unauthorized, format: message.TextPlain, body: []byte("no device identity")}, 0, 0)
		return
	}
	switch r.Code() {
	case codes.GET, codes.POST:
	default:
		reply(w, errAnswer(codes.MethodNotAllowed, "only GET and POST"), 0, 0)
		return
	}
	path, err := r.Path()
	if err != nil || !strings.HasPrefix(path, "/api/v1/") {
		reply(w, errAnswer(codes.NotFound, "no such resource"), 0, 0)
		return
	}
	if r.HasOption(message.Block1) {
		// Requests fit in one block; a device that needs more is
		// told the limit (RFC 7959 2.9.3).
		reply(w, tooLarge(), 0, 0)
		return
	}
	num, size := int64(0), int64(BlockSize)
	if r.HasOption(message.Block2) {
		v, err := r.GetOptionUint32(message.Block2)
		if err != nil {
			reply(w, errAnswer(codes.BadOption, "malformed Block2 option"), 0, 0)
			return
		}
		szx, n, _, err := blockwise.DecodeBlockOption(v)
		if err != nil || szx > blockwise.SZX1024 {
			reply(w, errAnswer(codes.BadOption, "Block2: size exponent must be 0 to 6 (16 to 1024 bytes)"), 0, 0)
			return
		}
		num, size = n, min(int64(szx.Size()), BlockSize)
	}
	body, err := r.ReadBody()
	if err != nil {
		reply(w, errAnswer(codes.BadRequest, "unreadable payload"), 0, 0)
		return
	}
	if len(body) > BlockSize {
		reply(w, tooLarge(), 0, 0)
		return
	}
	ctx := deviceapi.WithDevice(r.Context(), id)
	if r.Code() == codes.GET {
		reply(w, s.get(ctx, path, num, size), num, size)
		return
	}
	pc, _ := cc.Context().Value(keyPosts).(*postCache)
	if num > 0 {
		// The next block of the last long answer to this POST.
		pc.mu.Lock()
		a, ok := pc.ans, pc.path == path
		pc.mu.Unlock()
		if !ok {
			reply(w, errAnswer(codes.RequestEntityIncomplete, "no earlier answer to continue: send the request again without Block2"), 0, 0)
			return
		}
		reply(w, a, num, size)
		return
	}
	a := s.call(ctx, http.MethodPost, path, body, "")
	if a.code == codes.Content {
		a.code = codes.Changed
	}
	if int64(len(a.body)) > size {
		pc.mu.Lock()
		pc.path, pc.ans = path, a
		pc.mu.Unlock()
	}
	reply(w, a, 0, size)
}

// get reads block num of a resource: a ranged read, so that a 1 MiB image
// is not read whole for each of its blocks.
func (s *Server) get(ctx context.Context, path string, num, size int64) answer {
	if num > 1<<20 {
		return errAnswer(codes.BadOption, "Block2: block number out of range")
	}
	from := num * size
	if num > 0 {
		ctx = deviceapi.WithContinuation(ctx)
	}
	a := s.call(ctx, http.MethodGet, path, nil, fmt.Sprintf("bytes=%d-%d", from, from+size-1))
	return a
}

// call runs the device API handler in process.
func (s *Server) call(ctx context.Context, method, path string, body []byte, rng string) answer {
	req := httptest.NewRequestWithContext(ctx, method, path, bytes.NewReader(body))
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	rec := httptest.NewRecorder()
	s.cfg.Handler.ServeHTTP(rec, req)
	res := rec.Result()
	a := answer{body: rec.Body.Bytes(), format: message.AppOctets}
	a.total = int64(len(a.body))
	switch ct := res.Header.Get("Content-Type"); {
	case strings.HasPrefix(ct, "application/json"):
		a.format = message.AppJSON
	case strings.HasPrefix(ct, "text/"):
		a.format = message.TextPlain
	}
	if et := strings.Trim(res.Header.Get("ETag"), `"`); et != "" {
		a.etag = etagOf([]byte(et))
	} else if res.StatusCode == http.StatusOK {
		a.etag = etagOf(a.body)
	}
	switch res.StatusCode {
	case http.StatusOK:
		a.code = codes.Content
	case http.StatusPartialContent:
		a.code = codes.Content
		// "bytes FROM-TO/TOTAL"
		if i := strings.LastIndexByte(res.Header.Get("Content-Range"), '/'); i >= 0 {
			a.total, _ = strconv.ParseInt(res.Header.Get("Content-Range")[i+1:], 10, 64)
		}
	case http.StatusRequestedRangeNotSatisfiable:
		return errAnswer(codes.BadOption, "Block2: block beyond the end of the resource")
	case http.StatusServiceUnavailable:
		a.code = codes.ServiceUnavailable
		secs, _ := strconv.Atoi(res.Header.Get("Retry-After"))
		a.maxAge = uint32(max(secs, 1))
	default:
		a.code = httpToCoAP(res.StatusCode)
	}
	return a
}

// httpToCoAP maps the device API's error statuses.
func httpToCoAP(status int) codes.Code {
	switch status {
	case http.StatusBadRequest:
		return codes.BadRequest
	case http.StatusUnauthorized:
		return codes.Unauthorized
	case http.StatusForbidden:
		return codes.Forbidden
	case http.StatusNotFound:
		return codes.NotFound
	case http.StatusMethodNotAllowed:
		return codes.MethodNotAllowed
	case http.StatusConflict:
		return codes.Conflict
	case http.StatusRequestEntityTooLarge:
		return codes.RequestEntityTooLarge
	case http.StatusUnsupportedMediaType:
		return codes.UnsupportedMediaType
	case http.StatusNotImplemented:
		return codes.NotImplemented
	}
	return codes.InternalServerError
}

func errAnswer(code codes.Code, msg string) answer {
	b := []byte(fmt.Sprintf(`{"error":%q}`, msg))
	return answer{code: code, format: message.AppJSON, body: b, total: int64(len(b))}
}

func etagOf(b []byte) []byte {
	sum := sha256.Sum256(b)
	return sum[:8]
}

// tooLarge refuses a request longer than a block, and says the limit in
// Size1.
func tooLarge() answer {
	a := errAnswer(codes.RequestEntityTooLarge, fmt.Sprintf("requests carry at most %d bytes", BlockSize))
	a.extra = []message.Option{{ID: message.Size1, Value: encodeUint(BlockSize)}}
	return a
}

func encodeUint(v uint32) []byte {
	buf := make([]byte, 4)
	n, _ := message.EncodeUint32(buf, v)
	return buf[:n]
}

// reply sends a, or its block num of the given size. An answer whose body
// is the whole resource is cut here; a ranged read is already the block.
func reply(w *responsewriter.ResponseWriter[*udpclient.Conn], a answer, num, size int64) {
	opts := []message.Option{{ID: OptionDate, Value: encodeUint(uint32(time.Now().Unix()))}}
	if len(a.etag) > 0 {
		opts = append(opts, message.Option{ID: message.ETag, Value: a.etag})
	}
	if a.maxAge > 0 {
		opts = append(opts, message.Option{ID: message.MaxAge, Value: encodeUint(a.maxAge)})
	}
	opts = append(opts, a.extra...)
	body := a.body
	if size > 0 && (a.code == codes.Content || a.code == codes.Changed) && (a.total > size || num > 0) {
		from := num * size
		if int64(len(body)) == a.total { // the whole resource: cut the block
			if from >= a.total && !(from == 0 && a.total == 0) {
				a = errAnswer(codes.BadOption, "Block2: block beyond the end of the resource")
				reply(w, a, 0, 0)
				return
			}
			body = body[from:min(from+size, a.total)]
		}
		more := from+int64(len(body)) < a.total
		szx := szxOf(size)
		v, _ := blockwise.EncodeBlockOption(szx, num, more)
		opts = append(opts, message.Option{ID: message.Block2, Value: encodeUint(v)},
			message.Option{ID: message.Size2, Value: encodeUint(uint32(a.total))})
	}
	if err := w.SetResponse(a.code, a.format, bytes.NewReader(body), opts...); err != nil {
		w.Conn().Close()
	}
}

func szxOf(size int64) blockwise.SZX {
	for szx := blockwise.SZX16; szx <= blockwise.SZX1024; szx++ {
		if int64(szx.Size()) == size {
			return szx
		}
	}
	return blockwise.SZX1024
}
