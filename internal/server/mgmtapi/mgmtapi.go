// Package mgmtapi is the operators' API: JSON over HTTPS, authenticated with
// a bearer token. It uploads releases (each image's signature is checked
// against the server's image keys before it is accepted), assigns them to
// devices or groups, lists and shows devices, and provisions new ones.
package mgmtapi

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/blob"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

// Paths of the management API.
const (
	PathReleases    = "/api/mgmt/v1/releases"
	PathAssignments = "/api/mgmt/v1/assignments"
	PathDevices     = "/api/mgmt/v1/devices"
	PathTokens      = "/api/mgmt/v1/enrollment-tokens"
	PathPending     = "/api/mgmt/v1/pending"
)

// MaxImageBytes bounds an uploaded image.
const MaxImageBytes = 4 << 30

// API is the management API.
type API struct {
	Store     *store.Store
	Blobs     *blob.Store
	CA        *pki.CA
	ImageKeys []crypto.PublicKey
	Token     string // the admin bearer token
	Log       *slog.Logger
}

// Handler returns the HTTP handler.
func (a *API) Handler() http.Handler {
	if a.Log == nil {
		a.Log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+PathReleases, a.auth(a.uploadRelease))
	mux.HandleFunc("POST "+PathAssignments, a.auth(a.assign))
	mux.HandleFunc("GET "+PathDevices, a.auth(a.listDevices))
	mux.HandleFunc("POST "+PathDevices, a.auth(a.provision))
	mux.HandleFunc("GET "+PathDevices+"/{id}", a.auth(a.showDevice))
	mux.HandleFunc("POST "+PathDevices+"/{id}/retry", a.auth(a.retry))
	mux.HandleFunc("POST "+PathDevices+"/{id}/revoke", a.auth(a.revoke))
	mux.HandleFunc("POST "+PathDevices+"/{id}/approve", a.auth(a.approve))
	mux.HandleFunc("GET "+PathPending, a.auth(a.pending))
	mux.HandleFunc("POST "+PathTokens, a.auth(a.createToken))
	return mux
}

func (a *API) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || a.Token == "" || subtle.ConstantTimeCompare([]byte(tok), []byte(a.Token)) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			fail(w, http.StatusUnauthorized, "a valid admin token is required")
			return
		}
		h(w, r)
	}
}

func fail(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(proto.Error{Error: msg})
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
	if errors.Is(err, store.ErrNotFound) {
		fail(w, http.StatusNotFound, err.Error())
		return
	}
	fail(w, http.StatusBadRequest, err.Error())
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
	devs, err := a.Store.ListDevices(r.Context())
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
	resp := ProvisionResponse{DeviceID: req.ID, CertPEM: string(cert), CAPEM: string(a.CA.CertPEM)}
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
