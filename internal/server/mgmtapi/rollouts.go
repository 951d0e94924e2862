package mgmtapi

import (
	"errors"
	"net/http"

	"github.com/fieldpatch/fieldpatch/internal/server/rollout"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

// PathRollouts is where rollouts live.
const PathRollouts = "/api/mgmt/v1/rollouts"

// RolloutRequest creates a rollout: its spec, and whether to start it at
// once (otherwise it waits for POST .../start).
type RolloutRequest struct {
	rollout.Spec
	Start bool `json:"start,omitempty"`
}

// ControlRequest is the optional body of a rollout action.
type ControlRequest struct {
	Reason string `json:"reason,omitempty"` // kept in the rollout's history
}

// MaxReasonLen bounds an operator's reason.
const MaxReasonLen = 500

func (a *API) createRollout(w http.ResponseWriter, r *http.Request) {
	var req RolloutRequest
	if !decode(w, r, &req) {
		return
	}
	ro, err := a.Store.CreateRollout(r.Context(), req.Spec, req.Start)
	if err != nil {
		a.storeError(w, err)
		return
	}
	a.rolloutChanged()
	writeJSON(w, http.StatusCreated, ro)
}

func (a *API) listRollouts(w http.ResponseWriter, r *http.Request) {
	if !onlyParams(w, r, "state") {
		return
	}
	var states []string
	switch st := r.URL.Query().Get("state"); st {
	case "":
	case rollout.StateCreated, rollout.StateActive, rollout.StatePaused, rollout.StateAborted:
		states = []string{st}
	default:
		fail(w, http.StatusBadRequest, "state "+st+": want created, active, paused or aborted")
		return
	}
	rs, err := a.Store.Rollouts(r.Context(), states...)
	if err != nil {
		fail(w, http.StatusInternalServerError, err.Error())
		return
	}
	if rs == nil {
		rs = []rollout.Rollout{}
	}
	writeJSON(w, http.StatusOK, rs)
}

func (a *API) showRollout(w http.ResponseWriter, r *http.Request) {
	st, err := a.Store.RolloutStatus(r.Context(), r.PathValue("id"))
	if err != nil {
		a.storeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// control returns the handler of one rollout action.
func (a *API) control(action string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req ControlRequest
		if r.ContentLength != 0 && !decode(w, r, &req) {
			return
		}
		if len(req.Reason) > MaxReasonLen {
			fail(w, http.StatusBadRequest, "reason: too long")
			return
		}
		ro, err := a.Store.Control(r.Context(), r.PathValue("id"), action, req.Reason)
		if errors.Is(err, store.ErrState) {
			fail(w, http.StatusConflict, err.Error())
			return
		}
		if err != nil {
			a.storeError(w, err)
			return
		}
		a.rolloutChanged()
		writeJSON(w, http.StatusOK, ro)
	}
}

// rolloutChanged tells whoever listens (the server's notifications) that
// a rollout was created, started, paused, resumed or aborted.
func (a *API) rolloutChanged() {
	if a.RolloutChanged != nil {
		a.RolloutChanged()
	}
}
