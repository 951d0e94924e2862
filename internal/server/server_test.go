package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// openAPI is the part of the OpenAPI document the tests are generated from.
type openAPI struct {
	OpenAPI    string                          `json:"openapi"`
	Paths      map[string]map[string]operation `json:"paths"`
	Components struct {
		Schemas map[string]schema `json:"schemas"`
	} `json:"components"`
}

type operation struct {
	OperationID string      `json:"operationId"`
	Role        string      `json:"x-fieldpatch-role"`
	Parameters  []parameter `json:"parameters"`
	RequestBody *struct {
		Required bool                       `json:"required"`
		Content  map[string]json.RawMessage `json:"content"`
	} `json:"requestBody"`
	Responses map[string]json.RawMessage `json:"responses"`
}

type parameter struct {
	Name     string `json:"name"`
	In       string `json:"in"`
	Required bool   `json:"required"`
	Schema   schema `json:"schema"`
}

type schema struct {
	Ref        string            `json:"$ref"`
	Type       string            `json:"type"`
	Pattern    string            `json:"pattern"`
	Enum       []string          `json:"enum"`
	Minimum    *float64          `json:"minimum"`
	Maximum    *float64          `json:"maximum"`
	MaxLength  *int              `json:"maxLength"`
	Examples   []any             `json:"examples"`
	Items      *schema           `json:"items"`
	Properties map[string]schema `json:"properties"`
	Required   []string          `json:"required"`
}

func loadOpenAPI(t *testing.T) *openAPI {
	t.Helper()
	var doc openAPI
	if err := json.Unmarshal(mgmtapi.OpenAPI, &doc); err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	return &doc
}

// op is one operation of the document with its method and path.
type op struct {
	method, path string
	operation
}

func (d *openAPI) ops() []op {
	var out []op
	for p, m := range d.Paths {
		for method, o := range m {
			out = append(out, op{strings.ToUpper(method), p, o})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].method+out[i].path < out[j].method+out[j].path })
	return out
}

func (d *openAPI) resolve(s schema) schema {
	if name, ok := strings.CutPrefix(s.Ref, "#/components/schemas/"); ok {
		return d.Components.Schemas[name]
	}
	return s
}

// The document describes exactly the routes the server serves, with the
// same roles, and docs/openapi.json is the same document.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	doc := loadOpenAPI(t)
	if doc.OpenAPI != "3.1.0" {
		t.Errorf("openapi %q", doc.OpenAPI)
	}
	documented := map[string]string{}
	for _, o := range doc.ops() {
		documented[o.method+" "+o.path] = o.Role
		if o.OperationID == "" {
			t.Errorf("%s %s: no operationId", o.method, o.path)
		}
		if _, ok := o.Responses["401"]; !ok {
			t.Errorf("%s %s: 401 not documented", o.method, o.path)
		}
	}
	served := map[string]string{}
	for _, r := range mgmtapi.Routes() {
		served[r.Method+" "+r.Path] = r.Role
	}
	for k, role := range served {
		if documented[k] != role {
			t.Errorf("%s: served for %q, documented for %q", k, role, documented[k])
		}
	}
	for k := range documented {
		if _, ok := served[k]; !ok {
			t.Errorf("%s: documented, not served", k)
		}
	}
	copyInDocs, err := os.ReadFile("../../docs/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(copyInDocs, mgmtapi.OpenAPI) {
		t.Error("docs/openapi.json differs from internal/server/mgmtapi/openapi.json: copy it over")
	}
}

// fixture is a running server with callers of every kind.
type fixture struct {
	t       *testing.T
	srv     *Server
	base    string
	dir     string
	pool    *x509.CertPool
	callers map[string]callerKind
	order   []string
}

type callerKind struct {
	rank   int    // the role rank the caller holds; 0: no valid token
	token  string // bearer token, if any
	client *http.Client
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32))
	_, pub, err := trust.WriteKeyPair(filepath.Join(t.TempDir(), "release"), key)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(ctx, Config{Listen: "127.0.0.1:0", DataDir: dir, PollInterval: time.Hour, ImageKeys: []string{pub}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done; srv.Close() })
	f := &fixture{t: t, srv: srv, base: "https://" + ln.Addr().String(), dir: dir, pool: srv.CA.Pool(), callers: map[string]callerKind{}}
	plain := f.client(nil)
	f.add("no token", callerKind{0, "", plain})
	f.add("garbage token", callerKind{0, "not-a-token", plain})
	f.add("forged api token", callerKind{0, "fpa_000000000000000000000000000000000000000000000000", plain})
	f.add("bootstrap admin", callerKind{3, srv.Token, plain})
	for _, role := range []string{"viewer", "operator", "admin", "revoked"} {
		var resp mgmtapi.APITokenResponse
		r := role
		if role == "revoked" {
			r = "admin"
		}
		f.must("POST", mgmtapi.PathAPITokens, mgmtapi.APITokenRequest{Name: "t-" + role, Role: r}, &resp, 201)
		rank := store.RoleRank(r)
		if role == "revoked" {
			f.must("POST", mgmtapi.PathAPITokens+"/t-revoked/revoke", nil, nil, 200)
			rank = 0
		}
		f.add(role+" token", callerKind{rank, resp.Token, plain})
	}
	for _, dev := range []string{"authz-dev", "authz-gone"} {
		cert := f.provision(dev)
		f.add(dev+" certificate", callerKind{0, "", f.client(cert)})
	}
	f.must("POST", mgmtapi.PathDevices+"/authz-gone/revoke", nil, nil, 200)
	// A release named as the bad-input test's valid values name things, so
	// a body that breaks a field and still got through would be accepted
	// (and fail the test) rather than refused for its release; and a
	// rollout that is not started, to act on.
	var img bytes.Buffer
	sc := uint32(1)
	payload := bytes.Repeat([]byte("fw"), 1000)
	if _, err := image.Build(ctx, &img, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{Version: "2.0.0", SecurityCounter: &sc, HWClass: "valid-name", Signers: []crypto.Signer{key}}); err != nil {
		t.Fatal(err)
	}
	if code, resp := f.do(f.callers["bootstrap admin"], "POST", mgmtapi.PathReleases+"?id=valid-name", "application/octet-stream", img.Bytes()); code != 201 {
		t.Fatalf("release upload: %d %s", code, resp)
	}
	f.must("POST", mgmtapi.PathRollouts, map[string]any{"id": "authz-dev", "release": "valid-name", "target": map[string]any{"all": true}}, nil, 201)
	f.add("device certificate with a forged bearer", callerKind{0, "fpa_" + strings.Repeat("1", 48), f.callers["authz-dev certificate"].client})
	return f
}

func (f *fixture) add(name string, c callerKind) {
	f.callers[name] = c
	f.order = append(f.order, name)
}

func (f *fixture) client(cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: f.pool, MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}

// provision registers a device and returns its client certificate.
func (f *fixture) provision(id string) *tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	var resp mgmtapi.ProvisionResponse
	f.must("POST", mgmtapi.PathDevices, mgmtapi.ProvisionRequest{ID: id, PublicKey: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}, &resp, 201)
	block, _ := pem.Decode([]byte(resp.CertPEM))
	return &tls.Certificate{Certificate: [][]byte{block.Bytes}, PrivateKey: key}
}

func (f *fixture) do(c callerKind, method, path, contentType string, body []byte) (int, []byte) {
	f.t.Helper()
	req, err := http.NewRequest(method, f.base+path, bytes.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		f.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// must calls as the bootstrap admin and wants the given status.
func (f *fixture) must(method, path string, in, out any, want int) {
	f.t.Helper()
	var body []byte
	if in != nil {
		body, _ = json.Marshal(in)
	}
	code, b := f.do(callerKind{3, f.srv.Token, f.client(nil)}, method, path, "application/json", body)
	if code != want {
		f.t.Fatalf("%s %s: %d %s", method, path, code, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			f.t.Fatal(err)
		}
	}
}

// snapshot counts the rows of every table but the audit log, and the blobs.
func (f *fixture) snapshot() string {
	f.t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(f.dir, "fieldpatch.db")+"?mode=ro")
	if err != nil {
		f.t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN ('audit_log', 'sqlite_sequence') ORDER BY name`)
	if err != nil {
		f.t.Fatal(err)
	}
	var tables []string
	for rows.Next() {
		var n string
		rows.Scan(&n)
		tables = append(tables, n)
	}
	rows.Close()
	var b strings.Builder
	for _, tb := range tables {
		cols, err := db.Query(`SELECT name FROM pragma_table_info(?)`, tb)
		if err != nil {
			f.t.Fatal(err)
		}
		var quoted []string
		for cols.Next() {
			var c string
			cols.Scan(&c)
			quoted = append(quoted, "quote("+c+")")
		}
		cols.Close()
		var n int
		var dump sql.NullString
		if err := db.QueryRow(`SELECT count(*), group_concat(`+strings.Join(quoted, "||','||")+`, '|') FROM `+tb).Scan(&n, &dump); err != nil {
			f.t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s=%d:%s;", tb, n, dump.String)
	}
	blobs, _ := filepath.Glob(filepath.Join(f.dir, "blobs", "*", "*", "*"))
	fmt.Fprintf(&b, "blobs=%v", blobs)
	return b.String()
}

// fill puts an existing object's name into the path.
func fill(path string, values map[string]string) string {
	for k, v := range values {
		path = strings.ReplaceAll(path, "{"+k+"}", v)
	}
	return path
}

// The authorization table is generated from the OpenAPI document: every
// documented operation is called by every kind of caller. Callers without a
// valid token (none, garbage, forged, a revoked token, a device certificate
// with or without a forged bearer, a revoked device's certificate) get 401;
// callers whose role is below the operation's get 403 and change nothing;
// the others are let through. A new route without a document entry fails
// TestOpenAPIMatchesRoutes, so it cannot escape this table.
func TestAuthorizationTable(t *testing.T) {
	f := newFixture(t)
	doc := loadOpenAPI(t)
	ops := doc.ops()
	if len(ops) < 15 {
		t.Fatalf("only %d operations documented", len(ops))
	}
	probe := map[string]string{"id": "no-such-device", "name": "no-such-token"}
	for _, o := range ops {
		need := store.RoleRank(o.Role)
		if need == 0 {
			t.Errorf("%s %s: role %q", o.method, o.path, o.Role)
			continue
		}
		path := fill(o.path, probe)
		ct := ""
		var body []byte
		if o.RequestBody != nil {
			if _, ok := o.RequestBody.Content["application/json"]; ok {
				ct, body = "application/json", []byte("{}")
			} else {
				ct, body = "application/octet-stream", []byte("not an image")
				path += "?id=authz-probe"
			}
		}
		for _, name := range f.order {
			c := f.callers[name]
			before := f.snapshot()
			code, resp := f.do(c, o.method, path, ct, body)
			var want string
			switch {
			case c.rank == 0:
				if code != http.StatusUnauthorized {
					want = "401"
				}
			case c.rank < need:
				if code != http.StatusForbidden {
					want = "403"
				}
			default:
				if code == http.StatusUnauthorized || code == http.StatusForbidden || code >= 500 {
					want = "let through"
				}
			}
			if want != "" {
				t.Errorf("%s %s by %s: got %d %s, want %s", o.method, o.path, name, code, resp, want)
			}
			if _, ok := o.Responses[strconv.Itoa(code)]; !ok {
				t.Errorf("%s %s by %s: status %d is not documented", o.method, o.path, name, code)
			}
			if code == http.StatusUnauthorized || code == http.StatusForbidden {
				if after := f.snapshot(); after != before {
					t.Errorf("%s %s by %s: refused but the database changed", o.method, o.path, name)
				}
			}
		}
	}
	// Every refused change by a known caller is in the audit log.
	var log []store.AuditEntry
	f.must("GET", mgmtapi.PathAudit, nil, &log, 200)
	denied := 0
	for _, e := range log {
		if e.Status == http.StatusForbidden {
			denied++
			if e.Actor != "t-viewer" && e.Actor != "t-operator" {
				t.Errorf("403 recorded for %s", e.Actor)
			}
		}
	}
	writes := 0
	for _, o := range ops {
		if o.method != "GET" {
			if store.RoleRank(o.Role) > 1 {
				writes++ // the viewer is refused
			}
			if store.RoleRank(o.Role) > 2 {
				writes++ // and the operator
			}
		}
	}
	if denied != writes {
		t.Errorf("audit log holds %d refused changes, want %d", denied, writes)
	}
}

// bad returns request bodies that break the schema in one way each.
func (d *openAPI) bad(s schema) map[string]string {
	s = d.resolve(s)
	out := map[string]string{
		"not JSON":      "{",
		"unknown field": `{"no_such_field": 1}`,
		"not an object": `[1, 2]`,
		"too large":     `{"id": "` + strings.Repeat("x", 70<<10) + `"}`,
	}
	if len(s.Required) > 0 {
		out["empty object"] = "{}"
	}
	for what, m := range d.badFields(s, 0) {
		b, _ := json.Marshal(m)
		out["bad "+what] = string(b)
	}
	return out
}

// badFields breaks one field of an object schema at a time, recursing into
// nested objects and arrays of objects; the other required fields get
// valid values, so the broken one is what is refused.
func (d *openAPI) badFields(s schema, depth int) map[string]map[string]any {
	out := map[string]map[string]any{}
	with := func(what, name string, v any) {
		m := map[string]any{name: v}
		for _, r := range s.Required {
			if r != name {
				m[r] = d.validValue(s.Properties[r])
			}
		}
		out[what] = m
	}
	for name, p := range s.Properties {
		p = d.resolve(p)
		var items schema
		if p.Items != nil {
			items = d.resolve(*p.Items)
		}
		switch {
		case p.Type == "string" && p.Pattern != "":
			with(name, name, "../escape")
		case p.Type == "string" && len(p.Enum) > 0:
			with(name, name, "superuser")
		case p.Type == "string" && p.MaxLength != nil:
			with(name, name, strings.Repeat("x", *p.MaxLength+1))
		case p.Type == "string":
			with(name, name, 12)
		case (p.Type == "integer" || p.Type == "number") && p.Minimum != nil:
			with(name, name, *p.Minimum-5)
			if p.Maximum != nil {
				with(name+" above maximum", name, *p.Maximum+5)
			}
		case p.Type == "integer" || p.Type == "number":
			with(name, name, "many")
		case p.Type == "boolean":
			with(name, name, "yes")
		case p.Type == "array" && items.Pattern != "":
			with(name, name, []string{"ok-name", "../escape"})
		case p.Type == "array" && len(items.Enum) > 0:
			with(name, name, []string{"superuser"})
		case p.Type == "array" && len(items.Properties) > 0 && depth < 3:
			with(name, name, "not-a-list")
			for what, m := range d.badFields(items, depth+1) {
				with(name+"[]."+what, name, []any{m})
			}
		case p.Type == "array":
			with(name, name, "not-a-list")
		case p.Type == "object" && len(p.Properties) > 0 && depth < 3:
			with(name, name, "not-an-object")
			for what, m := range d.badFields(p, depth+1) {
				with(name+"."+what, name, m)
			}
		}
	}
	return out
}

// validValue is a value the schema accepts: its first example, or one
// made from its type.
func (d *openAPI) validValue(p schema) any {
	p = d.resolve(p)
	switch {
	case len(p.Examples) > 0:
		return p.Examples[0]
	case len(p.Enum) > 0:
		return p.Enum[0]
	case p.Type == "integer" || p.Type == "number":
		if p.Minimum != nil {
			return max(*p.Minimum, 1)
		}
		return 1
	case p.Type == "boolean":
		return false
	case p.Type == "array":
		return []string{}
	case p.Type == "object":
		m := map[string]any{}
		for _, r := range p.Required {
			m[r] = d.validValue(p.Properties[r])
		}
		return m
	}
	return "valid-name"
}

// validBodies are bodies that the operations refuse only for the object in
// the path (for the rest, {} will do).
var validBodies = map[string]string{
	"retryDevice": `{"release": "valid-name"}`,
	"editDevice":  `{"add_tags": ["x"]}`,
}

// Bad input on every documented operation, generated from the document:
// broken JSON, unknown fields, each field made invalid, bad query and path
// parameters, a non-image upload. Each is refused with a documented 4xx,
// and nothing in the database or the blob store changes.
func TestBadInputFromOpenAPI(t *testing.T) {
	f := newFixture(t)
	doc := loadOpenAPI(t)
	admin := f.callers["bootstrap admin"]
	existing := map[string]string{"id": "authz-dev", "name": "t-viewer"}
	cases := 0
	check := func(o op, what, path, ct string, body []byte) {
		t.Helper()
		before := f.snapshot()
		code, resp := f.do(admin, o.method, path, ct, body)
		cases++
		if code < 400 || code >= 500 {
			t.Errorf("%s %s, %s: got %d %s, want a 4xx refusal", o.method, o.path, what, code, resp)
		}
		if _, ok := o.Responses[strconv.Itoa(code)]; !ok {
			t.Errorf("%s %s, %s: status %d is not documented", o.method, o.path, what, code)
		}
		var pe struct{ Error string }
		if json.Unmarshal(resp, &pe); pe.Error == "" {
			t.Errorf("%s %s, %s: no error message in %s", o.method, o.path, what, resp)
		}
		if after := f.snapshot(); after != before {
			t.Errorf("%s %s, %s: refused but something changed", o.method, o.path, what)
		}
	}
	for _, o := range doc.ops() {
		path := fill(o.path, existing)
		var pathParams, queryParams []parameter
		for _, p := range o.Parameters {
			if p.In == "path" {
				pathParams = append(pathParams, p)
			} else {
				queryParams = append(queryParams, p)
			}
		}
		ct, okBody := "", []byte(nil)
		if o.RequestBody != nil {
			if _, ok := o.RequestBody.Content["application/json"]; ok {
				ct, okBody = "application/json", []byte("{}")
			} else {
				ct = "application/octet-stream"
			}
		}
		// Unknown objects in the path.
		for _, p := range pathParams {
			missing := fill(o.path, map[string]string{p.Name: "no-such-" + p.Name})
			missing = fill(missing, existing)
			if ct == "application/json" {
				// a body that would be valid for an existing object
				okBody = []byte("{}")
				if b, ok := validBodies[o.OperationID]; ok {
					okBody = []byte(b)
				}
			}
			check(o, "unknown "+p.Name, missing, ct, okBody)
		}
		// Query parameters.
		for _, p := range queryParams {
			vals := map[string]string{}
			switch {
			case p.Schema.Pattern != "":
				vals["path-like"] = "../escape"
			case p.Schema.Type == "integer":
				vals["negative"], vals["not a number"] = "-1", "many"
			}
			if p.Required {
				vals["missing"] = ""
			}
			for what, v := range vals {
				q := ""
				if v != "" {
					q = "?" + p.Name + "=" + v
				}
				check(o, p.Name+" "+what, path+q, ct, nil)
			}
		}
		if o.method == "GET" && len(queryParams) > 0 {
			check(o, "unknown query parameter", path+"?no_such_filter=1", "", nil)
		}
		// Bodies.
		if o.RequestBody == nil {
			continue
		}
		if ct == "application/octet-stream" {
			for what, body := range map[string][]byte{"empty": nil, "not an image": []byte("hello"), "truncated header": {0x3d, 0xb8, 0xf3, 0x96, 0, 0}} {
				check(o, what, path+"?id=bad-upload", ct, body)
			}
			continue
		}
		var bs struct {
			Schema schema `json:"schema"`
		}
		json.Unmarshal(o.RequestBody.Content["application/json"], &bs)
		bads := doc.bad(bs.Schema)
		names := make([]string, 0, len(bads))
		for k := range bads {
			names = append(names, k)
		}
		slices.Sort(names)
		for _, what := range names {
			check(o, what, path, ct, []byte(bads[what]))
		}
	}
	if cases < 60 {
		t.Errorf("only %d bad-input cases ran", cases)
	}
	t.Logf("%d bad-input cases", cases)
}
