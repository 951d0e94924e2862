package mgmtapi

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/server/blob"
	"github.com/fieldpatch/fieldpatch/internal/server/pki"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

func signed(t *testing.T, key ed25519.PrivateKey, hw string) []byte {
	t.Helper()
	p := bytes.Repeat([]byte("fw"), 5000)
	sc := uint32(2)
	var b bytes.Buffer
	o := image.BuildOptions{Version: "2.0.0", SecurityCounter: &sc, HWClass: hw, Signers: []crypto.Signer{key}}
	if hw == "" {
		o.MCUbootCompatible, o.SecurityCounter = true, nil
	}
	if _, err := image.Build(context.Background(), &b, bytes.NewReader(p), int64(len(p)), o); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestManagementAPI(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(dir, "db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ca, _, _ := pki.LoadOrCreateCA(filepath.Join(dir, "pki"))
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{1}, 32))
	other := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{2}, 32))
	blobs := &blob.Store{Dir: filepath.Join(dir, "blobs")}
	api := &API{Store: st, Blobs: blobs, CA: ca, ImageKeys: []crypto.PublicKey{key.Public()}, Token: "secret"}
	h := api.Handler()
	call := func(method, path, token string, body []byte) (int, string) {
		req := httptest.NewRequest(method, path, bytes.NewReader(body))
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Code, rec.Body.String()
	}
	if code, _ := call("GET", PathDevices, "", nil); code != http.StatusUnauthorized {
		t.Errorf("no token: %d", code)
	}
	if code, _ := call("GET", PathDevices, "wrong", nil); code != http.StatusUnauthorized {
		t.Errorf("wrong token: %d", code)
	}
	for name, img := range map[string][]byte{
		"foreign key":         signed(t, other, "lock"),
		"no hardware class":   signed(t, key, ""),
		"not an image at all": []byte("hello"),
	} {
		code, body := call("POST", PathReleases+"?id=r1", "secret", img)
		if code != http.StatusBadRequest || !strings.Contains(body, "refused") {
			t.Errorf("%s: %d %s", name, code, body)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "blobs", "sha256", "*", "*")); len(left) != 0 {
		t.Errorf("refused uploads were kept: %v", left)
	}
	if code, body := call("POST", PathReleases+"?id=../x", "secret", signed(t, key, "lock")); code != http.StatusBadRequest {
		t.Errorf("path-like release id: %d %s", code, body)
	}
	code, body := call("POST", PathReleases+"?id=lock-2.0.0", "secret", signed(t, key, "lock"))
	var rel store.Release
	json.Unmarshal([]byte(body), &rel)
	if code != http.StatusCreated || rel.Version != "2.0.0" || rel.HWClass != "lock" || rel.SecurityCounter != 2 {
		t.Fatalf("good upload: %d %s", code, body)
	}
	if code, _ := call("POST", PathReleases+"?id=lock-2.0.0", "secret", signed(t, key, "lock")); code != http.StatusConflict {
		t.Errorf("the same release id twice: %d", code)
	}
	if code, _ := call("POST", PathAssignments, "secret", []byte(`{"id":"a1","release":"nope","device":"d1"}`)); code != http.StatusNotFound {
		t.Errorf("assigning an unknown release: %d", code)
	}
	if code, _ := call("POST", PathAssignments, "secret", []byte(`{"id":"a1","release":"lock-2.0.0"}`)); code != http.StatusBadRequest {
		t.Errorf("assignment with no target: %d", code)
	}
	if code, body := call("POST", PathDevices, "secret", []byte(`{"id":"lock-1","public_key":"not pem"}`)); code != http.StatusBadRequest {
		t.Errorf("provision with a bad key: %d %s", code, body)
	}
	if devs, _ := st.ListDevices(ctx, store.DeviceFilter{}); len(devs) != 0 {
		t.Errorf("a refused provisioning stored a device")
	}
}
