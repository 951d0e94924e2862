package mgmtapi

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/repo"
)

// PathTUF is the TUF repository as operators see it.
const PathTUF = "/api/mgmt/v1/tuf"

// MaxMetadataBytes bounds uploaded root or targets metadata.
const MaxMetadataBytes = 8 << 20

// Published answers an upload of root or targets metadata.
type Published struct {
	Role    string `json:"role"`
	Version int64  `json:"version"`
}

func (a *API) tufStatus(w http.ResponseWriter, r *http.Request) {
	if !onlyParams(w, r) {
		return
	}
	st, err := a.Repo.Status()
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// tufCurrent returns the current root or targets metadata, to be changed
// and signed offline.
func (a *API) tufCurrent(w http.ResponseWriter, r *http.Request) {
	role := r.PathValue("role")
	if role != metadata.ROOT && role != metadata.TARGETS {
		fail(w, http.StatusNotFound, "role "+role+": want root or targets")
		return
	}
	if !onlyParams(w, r, "version") {
		return
	}
	if v := r.URL.Query().Get("version"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 1 {
			fail(w, http.StatusBadRequest, "version "+v+": want a number from 1")
			return
		}
		b, err := a.Repo.File(fmt.Sprintf("%d.%s.json", n, role))
		if err != nil {
			fail(w, http.StatusNotFound, fmt.Sprintf("no %s version %d", role, n))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
		return
	}
	b, err := a.Repo.Current(role)
	if err != nil {
		fail(w, http.StatusNotFound, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

func readMetadata(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxMetadataBytes))
	if err != nil {
		fail(w, http.StatusBadRequest, fmt.Sprintf("metadata: %v (at most %d bytes)", err, MaxMetadataBytes))
		return nil, false
	}
	return b, true
}

func (a *API) tufPutRoot(w http.ResponseWriter, r *http.Request) {
	b, ok := readMetadata(w, r)
	if !ok {
		return
	}
	v, err := a.Repo.PublishRoot(b)
	if err != nil {
		fail(w, http.StatusBadRequest, "refused: "+err.Error())
		return
	}
	a.Log.Info("published TUF root", "version", v)
	writeJSON(w, http.StatusOK, Published{Role: metadata.ROOT, Version: v})
}

// tufPutTargets publishes targets metadata whose every target is a release
// the server holds, described as it is: the same image (length and
// SHA-256), version, hardware class and security counter.
func (a *API) tufPutTargets(w http.ResponseWriter, r *http.Request) {
	b, ok := readMetadata(w, r)
	if !ok {
		return
	}
	rels, err := a.Store.ListReleases(r.Context(), "")
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	check := func(path string, t *metadata.TargetFiles, c *proto.TargetCustom) error {
		if c.Format == "image-keys" {
			return nil // keys, not a release: checked by the repository
		}
		sum := hex.EncodeToString(t.Hashes["sha256"])
		for _, rel := range rels {
			if rel.SHA256 == sum {
				if rel.Length != t.Length || rel.Version != c.Version || rel.HWClass != c.HWClass || rel.SecurityCounter != c.SecurityCounter {
					return fmt.Errorf("does not describe release %s as it is (length, version, hardware class, security counter)", rel.ID)
				}
				return nil
			}
		}
		return errors.New("no release has this image")
	}
	v, err := a.Repo.PublishTargets(b, check)
	switch {
	case errors.Is(err, repo.ErrNotInitialized):
		fail(w, http.StatusConflict, err.Error())
		return
	case err != nil:
		fail(w, http.StatusBadRequest, "refused: "+err.Error())
		return
	}
	a.Log.Info("published TUF targets", "version", v)
	writeJSON(w, http.StatusOK, Published{Role: metadata.TARGETS, Version: v})
}

// tufRotateOnline makes new online keys (snapshot, timestamp) and returns
// them; they take over once a root naming them is published.
func (a *API) tufRotateOnline(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength > 0 {
		var req struct{}
		if !decode(w, r, &req) {
			return
		}
	}
	keys, err := a.Repo.RotateOnline()
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	a.Log.Info("made new online TUF keys; they sign once a root names them")
	writeJSON(w, http.StatusOK, keys)
}
