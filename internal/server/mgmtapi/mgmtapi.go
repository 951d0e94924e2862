// Package mgmtapi is the operators' API: JSON over HTTPS, authenticated with
// a bearer token. It uploads releases (each image's signature is checked
// against the server's image keys before it is accepted), assigns them to
// devices or groups, lists and shows devices, and provisions new ones.
package mgmtapi

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/blob"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/server/repo"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

// Paths of the management API.
const (
	PathReleases    = "/api/mgmt/v1/releases"
	PathAssignments = "/api/mgmt/v1/assignments"
	PathDevices     = "/api/mgmt/v1/devices"
	PathTokens      = "/api/mgmt/v1/enrollment-tokens"
	PathPending     = "/api/mgmt/v1/pending"
	PathAPITokens   = "/api/mgmt/v1/api-tokens"
	PathAudit       = "/api/mgmt/v1/audit"
	PathOpenAPI     = "/api/openapi.json"
)

// apiTokenPrefix starts every named API token, so a leaked one is easy to
// find in logs and repositories.
const apiTokenPrefix = "fpa_"

// MaxImageBytes bounds an uploaded image.
const MaxImageBytes = 4 << 30

// API is the management API.
type API struct {
	Store     *store.Store
	Blobs     *blob.Store
	CA        *pki.CA
	ImageKeys []crypto.PublicKey
	Token     string // the bootstrap admin token (DATA-DIR/admin.token)
	Repo      *repo.Repo
	Log       *slog.Logger
	// RolloutChanged, if set, hears that an operator created or
	// controlled a rollout (the server notifies its devices at once).
	RolloutChanged func()
}

// Route is one operation of the management API and the least role that may
// call it. The table is the single source of the API's authorization; the
// OpenAPI document (/api/openapi.json) must describe exactly these routes.
type Route struct {
	Method, Path, Role string
	handler            func(*API) http.HandlerFunc
}

// Routes lists the management API's operations.
func Routes() []Route {
	return []Route{
		{"GET", PathReleases, store.RoleViewer, func(a *API) http.HandlerFunc { return a.listReleases }},
		{"POST", PathReleases, store.RoleOperator, func(a *API) http.HandlerFunc { return a.uploadRelease }},
		{"POST", PathAssignments, store.RoleOperator, func(a *API) http.HandlerFunc { return a.assign }},
		{"GET", PathDevices, store.RoleViewer, func(a *API) http.HandlerFunc { return a.listDevices }},
		{"POST", PathDevices, store.RoleOperator, func(a *API) http.HandlerFunc { return a.provision }},
		{"GET", PathDevices + "/{id}", store.RoleViewer, func(a *API) http.HandlerFunc { return a.showDevice }},
		{"PATCH", PathDevices + "/{id}", store.RoleOperator, func(a *API) http.HandlerFunc { return a.editDevice }},
		{"POST", PathDevices + "/{id}/retry", store.RoleOperator, func(a *API) http.HandlerFunc { return a.retry }},
		{"POST", PathDevices + "/{id}/revoke", store.RoleOperator, func(a *API) http.HandlerFunc { return a.revoke }},
		{"POST", PathDevices + "/{id}/approve", store.RoleOperator, func(a *API) http.HandlerFunc { return a.approve }},
		{"GET", PathPending, store.RoleViewer, func(a *API) http.HandlerFunc { return a.pending }},
		{"POST", PathTokens, store.RoleOperator, func(a *API) http.HandlerFunc { return a.createToken }},
		{"GET", PathAPITokens, store.RoleAdmin, func(a *API) http.HandlerFunc { return a.listAPITokens }},
		{"POST", PathAPITokens, store.RoleAdmin, func(a *API) http.HandlerFunc { return a.createAPIToken }},
		{"POST", PathAPITokens + "/{name}/revoke", store.RoleAdmin, func(a *API) http.HandlerFunc { return a.revokeAPIToken }},
		{"GET", PathAudit, store.RoleAdmin, func(a *API) http.HandlerFunc { return a.auditLog }},
		{"GET", PathRollouts, store.RoleViewer, func(a *API) http.HandlerFunc { return a.listRollouts }},
		{"POST", PathRollouts, store.RoleOperator, func(a *API) http.HandlerFunc { return a.createRollout }},
		{"GET", PathRollouts + "/{id}", store.RoleViewer, func(a *API) http.HandlerFunc { return a.showRollout }},
		{"POST", PathRollouts + "/{id}/start", store.RoleOperator, func(a *API) http.HandlerFunc { return a.control(store.ActionStart) }},
		{"POST", PathRollouts + "/{id}/pause", store.RoleOperator, func(a *API) http.HandlerFunc { return a.control(store.ActionPause) }},
		{"POST", PathRollouts + "/{id}/resume", store.RoleOperator, func(a *API) http.HandlerFunc { return a.control(store.ActionResume) }},
		{"POST", PathRollouts + "/{id}/abort", store.RoleOperator, func(a *API) http.HandlerFunc { return a.control(store.ActionAbort) }},
		{"POST", PathRollouts + "/{id}/promote", store.RoleOperator, func(a *API) http.HandlerFunc { return a.control(store.ActionPromote) }},
		{"GET", PathTUF, store.RoleViewer, func(a *API) http.HandlerFunc { return a.tufStatus }},
		{"GET", PathTUF + "/{role}", store.RoleViewer, func(a *API) http.HandlerFunc { return a.tufCurrent }},
		{"PUT", PathTUF + "/root", store.RoleAdmin, func(a *API) http.HandlerFunc { return a.tufPutRoot }},
		{"PUT", PathTUF + "/targets", store.RoleOperator, func(a *API) http.HandlerFunc { return a.tufPutTargets }},
		{"POST", PathTUF + "/online-keys", store.RoleAdmin, func(a *API) http.HandlerFunc { return a.tufRotateOnline }},
	}
}

// Handler returns the HTTP handler.
func (a *API) Handler() http.Handler {
	if a.Log == nil {
		a.Log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	for _, rt := range Routes() {
		mux.HandleFunc(rt.Method+" "+rt.Path, a.auth(rt, rt.handler(a)))
	}
	mux.HandleFunc("GET "+PathOpenAPI, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(OpenAPI)
	})
	return mux
}

// caller is who sent a request.
type caller struct{ name, role string }

// identify resolves the bearer token: the bootstrap admin token from the
// data directory, or a named API token (by its hash).
func (a *API) identify(r *http.Request) (caller, bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || tok == "" {
		return caller{}, false
	}
	if a.Token != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(a.Token)) == 1 {
		return caller{"admin", store.RoleAdmin}, true
	}
	if !strings.HasPrefix(tok, apiTokenPrefix) {
		return caller{}, false
	}
	sum := sha256.Sum256([]byte(tok))
	t, err := a.Store.LookupAPIToken(r.Context(), hex.EncodeToString(sum[:]))
	if err != nil {
		return caller{}, false
	}
	return caller{t.Name, t.Role}, true
}

// auth admits callers whose role reaches the route's, and records every
// request that would change something (allowed or refused) in the audit log.
func (a *API) auth(rt Route, h http.HandlerFunc) http.HandlerFunc {
	action := rt.Method + " " + rt.Path
	return func(w http.ResponseWriter, r *http.Request) {
		c, ok := a.identify(r)
		if !ok {
			w.Header().Set("WWW-Authenticate", "Bearer")
			fail(w, http.StatusUnauthorized, "a valid API token is required")
			return
		}
		if rt.Method == http.MethodGet {
			if store.RoleRank(c.role) < store.RoleRank(rt.Role) {
				fail(w, http.StatusForbidden, "this needs the "+rt.Role+" role; token "+c.name+" has "+c.role)
				return
			}
			h(w, r)
			return
		}
		var body []byte
		if r.URL.Path != PathReleases {
			// The first 64 KiB are kept for the audit log; the handler
			// reads the whole body (TUF metadata can be larger).
			body, _ = io.ReadAll(io.LimitReader(r.Body, 64<<10+1))
			r.Body = struct {
				io.Reader
				io.Closer
			}{io.MultiReader(bytes.NewReader(body), r.Body), r.Body}
		}
		rec := &recorder{ResponseWriter: w}
		if store.RoleRank(c.role) < store.RoleRank(rt.Role) {
			fail(rec, http.StatusForbidden, "this needs the "+rt.Role+" role; token "+c.name+" has "+c.role)
		} else {
			h(rec, r)
		}
		target := r.PathValue("id") + r.PathValue("name")
		if target == "" {
			target = r.URL.Query().Get("id")
		}
		if target == "" && len(body) > 0 {
			var named struct{ ID, Name string }
			json.Unmarshal(body, &named)
			target = named.ID + named.Name
		}
		detail := auditDetail(body, r.URL.RawQuery, rec)
		if err := a.Store.Audit(context.WithoutCancel(r.Context()), store.AuditEntry{
			Actor: c.name, Role: c.role, Action: action, Target: target, Status: rec.status(), Detail: detail,
		}); err != nil {
			a.Log.Error("audit log", "action", action, "actor", c.name, "err", err)
		}
	}
}

// auditDetail keeps the request (its query and a bounded JSON body, minus
// any secret) and, for a refusal, the error answered.
func auditDetail(body []byte, query string, rec *recorder) string {
	var b strings.Builder
	if query != "" {
		b.WriteString(query)
	}
	if len(body) > 0 && len(body) <= 4096 && json.Valid(body) {
		var m map[string]any
		if json.Unmarshal(body, &m) == nil {
			for _, secret := range []string{"token", "password"} {
				if _, ok := m[secret]; ok {
					m[secret] = "(hidden)"
				}
			}
			body, _ = json.Marshal(m)
		}
		if b.Len() > 0 {
			b.WriteString(" ")
		}
		b.Write(body)
	}
	if rec.status() >= 400 {
		var pe proto.Error
		json.Unmarshal(rec.errBody, &pe)
		if b.Len() > 0 {
			b.WriteString(" ")
		}
		b.WriteString("error: " + pe.Error)
	}
	return b.String()
}

// recorder remembers the status and the start of an error's body.
type recorder struct {
	http.ResponseWriter
	code    int
	errBody []byte
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	if r.code >= 400 && len(r.errBody) < 1024 {
		r.errBody = append(r.errBody, p[:min(len(p), 1024-len(r.errBody))]...)
	}
	return r.ResponseWriter.Write(p)
}

func (r *recorder) status() int {
	if r.code == 0 {
		return http.StatusOK
	}
	return r.code
}

func fail(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(proto.Error{Error: msg})
}

// onlyParams refuses a query parameter the operation does not know, so a
// misspelt filter is an error rather than a silent "match everything".
func onlyParams(w http.ResponseWriter, r *http.Request, names ...string) bool {
	for k := range r.URL.Query() {
		if !slices.Contains(names, k) {
			fail(w, http.StatusBadRequest, "unknown parameter "+k+": want one of "+strings.Join(names, ", "))
			return false
		}
	}
	return true
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		fail(w, http.StatusBadRequest, "malformed JSON: "+err.Error())
		return false
	}
	return true
}

func (a *API) storeError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusNotFound, err.Error())
	case errors.Is(err, store.ErrConflict):
		fail(w, http.StatusConflict, err.Error())
	default:
		fail(w, http.StatusBadRequest, err.Error())
	}
}

// uploadRelease stores the image, verifies it against the image keys and
// records the release; a bad image is refused and not kept.
func (a *API) uploadRelease(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	if err := proto.ValidID("release id", id); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	sum, n, err := a.Blobs.Put(r.Context(), r.Body, MaxImageBytes)
	if err != nil {
		fail(w, http.StatusBadRequest, "upload: "+err.Error())
		return
	}
	img, err := a.verify(r.Context(), sum)
	if err != nil {
		a.forget(r.Context(), sum)
		fail(w, http.StatusBadRequest, "refused: "+err.Error())
		return
	}
	if !img.Fieldpatch() {
		a.forget(r.Context(), sum)
		fail(w, http.StatusBadRequest, "refused: the image carries no hardware class (build it with fieldpatch image build)")
		return
	}
	rel := store.Release{ID: id, Version: img.Version().String(), HWClass: img.HWClass, SecurityCounter: img.SecurityCounter, SHA256: sum, Length: n}
	if err := a.Store.AddRelease(r.Context(), rel); err != nil {
		fail(w, http.StatusConflict, err.Error())
		return
	}
	a.Log.Info("release uploaded", "release", id, "version", rel.Version, "hw_class", rel.HWClass, "sha256", sum)
	writeJSON(w, http.StatusCreated, rel)
}

func (a *API) verify(ctx context.Context, sum string) (*image.Image, error) {
	f, err := a.Blobs.Open(sum)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	img, _, err := image.ReadVerify(ctx, f, a.ImageKeys, image.ReadOptions{})
	return img, err
}

// forget removes a refused upload unless a release already uses the bytes.
func (a *API) forget(ctx context.Context, sum string) {
	if used, err := a.Store.ReleaseUses(ctx, sum); err == nil && !used {
		os.Remove(a.Blobs.Path(sum))
	}
}

// AssignRequest assigns a release to a device or a group.
type AssignRequest struct {
	ID        string `json:"id"`
	Release   string `json:"release"`
	Device    string `json:"device,omitempty"`
	Group     string `json:"group,omitempty"`
	Downgrade bool   `json:"downgrade,omitempty"`
}

func (a *API) assign(w http.ResponseWriter, r *http.Request) {
	var req AssignRequest
	if !decode(w, r, &req) {
		return
	}
	kind, target := "device", req.Device
	if req.Group != "" {
		kind, target = "group", req.Group
	}
	if (req.Device == "") == (req.Group == "") {
		fail(w, http.StatusBadRequest, "give exactly one of device and group")
		return
	}
	if err := a.Store.Assign(r.Context(), req.ID, req.Release, kind, target, req.Downgrade); err != nil {
		a.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, req)
}

func (a *API) listDevices(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if !onlyParams(w, r, "group", "tag", "hw_class", "version", "phase") {
		return
	}
	for _, k := range []string{"group", "tag"} {
		if v := q.Get(k); v != "" {
			if err := proto.ValidID(k, v); err != nil {
				fail(w, http.StatusBadRequest, err.Error())
				return
			}
		}
	}
	devs, err := a.Store.ListDevices(r.Context(), store.DeviceFilter{
		Group: q.Get("group"), Tag: q.Get("tag"), HWClass: q.Get("hw_class"), Version: q.Get("version"), Phase: q.Get("phase")})
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	if devs == nil {
		devs = []store.Device{}
	}
	writeJSON(w, http.StatusOK, devs)
}

// DeviceView is a device and its update attempts.
type DeviceView struct {
	store.Device
	Updates []store.Update `json:"updates"`
}

func (a *API) showDevice(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	d, err := a.Store.GetDevice(r.Context(), id)
	if err != nil {
		a.storeError(w, err)
		return
	}
	ups, err := a.Store.Updates(r.Context(), id)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, DeviceView{Device: *d, Updates: ups})
}

// ProvisionRequest registers a device and has its key certified.
type ProvisionRequest struct {
	ID        string   `json:"id"`
	Groups    []string `json:"groups,omitempty"`
	PublicKey string   `json:"public_key"` // PEM SubjectPublicKeyInfo of the device's key
}

// ProvisionResponse is what a device needs to talk to the server.
type ProvisionResponse struct {
	DeviceID     string   `json:"device_id"`
	CertPEM      string   `json:"cert_pem"`
	CAPEM        string   `json:"ca_pem"`
	ImageKeysPEM []string `json:"image_keys_pem"` // the image-signing keys the device must trust
	// TUFRoot is the TUF repository's current root metadata, the device's
	// first trusted root (absent before "fieldpatch trust init").
	TUFRoot json.RawMessage `json:"tuf_root,omitempty"`
	// PSK is the device's pre-shared key for CoAP over DTLS.
	PSK string `json:"psk"`
}

func (a *API) provision(w http.ResponseWriter, r *http.Request) {
	var req ProvisionRequest
	if !decode(w, r, &req) {
		return
	}
	block, _ := pem.Decode([]byte(req.PublicKey))
	if block == nil {
		fail(w, http.StatusBadRequest, "public_key: no PEM block")
		return
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		fail(w, http.StatusBadRequest, "public_key: "+err.Error())
		return
	}
	if err := a.Store.AddDevice(r.Context(), req.ID, req.Groups); err != nil {
		a.storeError(w, err)
		return
	}
	cert, err := a.CA.IssueDevice(req.ID, pub)
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	psk := pki.NewPSK()
	if err := a.Store.SetDevicePSK(r.Context(), req.ID, psk); err != nil {
		a.storeError(w, err)
		return
	}
	resp := ProvisionResponse{DeviceID: req.ID, CertPEM: string(cert), CAPEM: string(a.CA.CertPEM), PSK: psk}
	if a.Repo != nil {
		if root, err := a.Repo.Current("root"); err == nil {
			resp.TUFRoot = root
		}
	}
	for _, k := range a.ImageKeys {
		der, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			fail(w, http.StatusInternalServerError, err.Error())
			return
		}
		resp.ImageKeysPEM = append(resp.ImageKeysPEM, string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})))
	}
	a.Log.Info("device provisioned", "device", req.ID, "groups", req.Groups)
	writeJSON(w, http.StatusCreated, resp)
}

// TokenRequest makes a fleet enrollment token.
type TokenRequest struct {
	Group string `json:"group,omitempty"` // devices enrolling with it join this group
	TTL   string `json:"ttl"`             // how long it works, a Go duration
	Uses  int    `json:"uses"`            // how many devices may enroll with it
}

// TokenResponse carries the token; the server keeps only its hash.
type TokenResponse struct {
	Token   string    `json:"token"`
	Expires time.Time `json:"expires"`
	Uses    int       `json:"uses"`
}

func (a *API) createToken(w http.ResponseWriter, r *http.Request) {
	var req TokenRequest
	if !decode(w, r, &req) {
		return
	}
	ttl, err := time.ParseDuration(req.TTL)
	if err != nil || ttl <= 0 || ttl > 366*24*time.Hour {
		fail(w, http.StatusBadRequest, "ttl: want a duration up to a year, such as 24h")
		return
	}
	var raw [20]byte
	rand.Read(raw[:])
	tok := "fpe_" + hex.EncodeToString(raw[:])
	sum := sha256.Sum256([]byte(tok))
	exp := time.Now().Add(ttl)
	if err := a.Store.AddEnrollmentToken(r.Context(), hex.EncodeToString(sum[:]), req.Group, exp, req.Uses); err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	a.Log.Info("enrollment token created", "group", req.Group, "uses", req.Uses, "expires", exp)
	writeJSON(w, http.StatusCreated, TokenResponse{Token: tok, Expires: exp, Uses: req.Uses})
}

func (a *API) approve(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Groups []string `json:"groups,omitempty"`
	}
	if r.ContentLength != 0 && !decode(w, r, &req) {
		return
	}
	id := r.PathValue("id")
	if err := a.Store.Approve(r.Context(), id, req.Groups); err != nil {
		a.storeError(w, err)
		return
	}
	a.Log.Info("device approved", "device", id)
	writeJSON(w, http.StatusOK, map[string]string{"approved": id})
}

func (a *API) pending(w http.ResponseWriter, r *http.Request) {
	ids, err := a.Store.Pending(r.Context())
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	if ids == nil {
		ids = []string{}
	}
	writeJSON(w, http.StatusOK, ids)
}

func (a *API) revoke(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := a.Store.Revoke(r.Context(), id); err != nil {
		a.storeError(w, err)
		return
	}
	a.Log.Warn("device revoked", "device", id)
	writeJSON(w, http.StatusOK, map[string]string{"revoked": id})
}

func (a *API) retry(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Release string `json:"release"`
	}
	if !decode(w, r, &req) {
		return
	}
	if err := a.Store.Retry(r.Context(), r.PathValue("id"), req.Release); err != nil {
		a.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"retried": req.Release})
}

func (a *API) editDevice(w http.ResponseWriter, r *http.Request) {
	var e store.DeviceEdit
	if !decode(w, r, &e) {
		return
	}
	id := r.PathValue("id")
	if err := a.Store.EditDevice(r.Context(), id, e); err != nil {
		a.storeError(w, err)
		return
	}
	d, err := a.Store.GetDevice(r.Context(), id)
	if err != nil {
		a.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// APITokenRequest makes a named management token.
type APITokenRequest struct {
	Name string `json:"name"`
	Role string `json:"role"` // viewer, operator or admin
}

// APITokenResponse carries the token once; the server keeps only its hash.
type APITokenResponse struct {
	store.APIToken
	Token string `json:"token"`
}

func (a *API) createAPIToken(w http.ResponseWriter, r *http.Request) {
	var req APITokenRequest
	if !decode(w, r, &req) {
		return
	}
	var raw [24]byte
	rand.Read(raw[:])
	tok := apiTokenPrefix + hex.EncodeToString(raw[:])
	sum := sha256.Sum256([]byte(tok))
	if err := a.Store.AddAPIToken(r.Context(), req.Name, hex.EncodeToString(sum[:]), req.Role); err != nil {
		if errors.Is(err, store.ErrConflict) {
			fail(w, http.StatusConflict, err.Error())
			return
		}
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	t, err := a.Store.LookupAPIToken(r.Context(), hex.EncodeToString(sum[:]))
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	a.Log.Info("api token created", "name", req.Name, "role", req.Role)
	writeJSON(w, http.StatusCreated, APITokenResponse{APIToken: *t, Token: tok})
}

func (a *API) listAPITokens(w http.ResponseWriter, r *http.Request) {
	ts, err := a.Store.APITokens(r.Context())
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, ts)
}

func (a *API) revokeAPIToken(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := a.Store.RevokeAPIToken(r.Context(), name); err != nil {
		a.storeError(w, err)
		return
	}
	a.Log.Warn("api token revoked", "name", name)
	writeJSON(w, http.StatusOK, map[string]string{"revoked": name})
}

func (a *API) auditLog(w http.ResponseWriter, r *http.Request) {
	if !onlyParams(w, r, "after", "limit") {
		return
	}
	var after, limit int64
	for _, p := range []struct {
		name string
		dst  *int64
	}{{"after", &after}, {"limit", &limit}} {
		if v := r.URL.Query().Get(p.name); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				fail(w, http.StatusBadRequest, p.name+": want a non-negative integer")
				return
			}
			*p.dst = n
		}
	}
	es, err := a.Store.AuditLog(r.Context(), after, int(limit))
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, es)
}

// OpenAPI is the OpenAPI 3.1 document of this API, served at PathOpenAPI;
// docs/openapi.json is a copy that a test keeps equal.
//
//go:embed openapi.json
var OpenAPI []byte

func (a *API) listReleases(w http.ResponseWriter, r *http.Request) {
	if !onlyParams(w, r, "hw_class") {
		return
	}
	rels, err := a.Store.ListReleases(r.Context(), r.URL.Query().Get("hw_class"))
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, rels)
}
