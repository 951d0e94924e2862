package agent

import (
	"fmt"
	"time"
)

// Phase is where an update stands.
type Phase string

// The phases. Each is persisted in the journal before its effect runs, so a
// power cut or a kill resumes the phase, never skips it.
const (
	PhaseIdle         Phase = "idle"          // no update in progress
	PhaseChecking     Phase = "checking"      // asking the server for an offer
	PhaseDownloading  Phase = "downloading"   // fetching the image into the staging file (resumable)
	PhaseVerifying    Phase = "verifying"     // checking the staged image: signature, counter, class, version
	PhaseInstalling   Phase = "installing"    // hooks, then streaming into the inactive slot while hashing
	PhaseArmed        Phase = "armed"         // slot re-read and verified; the trial is set in the boot environment
	PhaseRebooting    Phase = "rebooting"     // waiting for the reboot into the trial
	PhaseTrialRunning Phase = "trial_running" // on the new slot: revert prepared, data migrated, health checked
	PhaseCommitting   Phase = "committing"    // making the new slot the active one; raising the non-volatile store
	PhaseCommitted    Phase = "committed"     // done; cleaning up before reporting
	PhaseRollingBack  Phase = "rolling_back"  // putting data and the boot environment back
	PhaseRolledBack   Phase = "rolled_back"   // back on the old slot; cleaning up before reporting
	PhaseFailed       Phase = "failed"        // the update stopped before a trial boot; nothing changed for the device
	PhaseReporting    Phase = "reporting"     // telling the reporter the outcome
)

// TrialStep is how far a trial has come.
type TrialStep string

const (
	TrialStarted        TrialStep = ""                // booted on trial, nothing done yet
	TrialRevertPrepared TrialStep = "revert_prepared" // what it takes to go back is on the data partition
	TrialMigrated       TrialStep = "migrated"        // migrate-data ran
)

// Offer is what is known of an update before its image is fetched.
type Offer struct {
	Version         string `json:"version,omitempty"`
	SecurityCounter uint32 `json:"security_counter,omitempty"`
	HasCounter      bool   `json:"has_counter,omitempty"`
	HWClass         string `json:"hw_class,omitempty"`
	Size            int64  `json:"size,omitempty"`
	// Downgrade marks a deliberate downgrade (an operator's fleet revert):
	// a lower version with an equal security counter is then allowed.
	Downgrade bool `json:"downgrade,omitempty"`
	// KeyEpoch, if above the device's, is raised at commit (key revocation).
	KeyEpoch uint32 `json:"key_epoch,omitempty"`
	// SHA256 (hex), when set, is what signed metadata says the download
	// is: the staged file must hash to it and be Size bytes long.
	SHA256 string `json:"sha256,omitempty"`
}

// ImageInfo is what verification read from the image's signed TLVs.
type ImageInfo struct {
	Version         string `json:"version"`
	SecurityCounter uint32 `json:"security_counter"`
	HWClass         string `json:"hw_class"`
	Len             int64  `json:"len"`
}

// VersionOr is the image's version, or def when it is not known yet.
func (i *ImageInfo) VersionOr(def string) string {
	if i == nil {
		return def
	}
	return i.Version
}

// Facts describe the device as the runner found it at start or at a
// request: which slot booted and why, what it runs, its non-volatile store.
type Facts struct {
	Booted         string `json:"booted"`      // slot running now
	BootReason     string `json:"boot_reason"` // as the boot selector recorded it
	Active         string `json:"active"`      // committed slot
	Trial          string `json:"trial"`       // slot armed for a trial, if any
	RunningVersion string `json:"running_version"`
	NVCounter      uint32 `json:"nv_counter"`
	KeyEpoch       uint32 `json:"key_epoch"`
	HWClass        string `json:"hw_class"`
}

// Outcome is the result of an update, as reported.
type Outcome struct {
	UpdateID string `json:"update_id,omitempty"`
	Result   string `json:"result"` // committed, rolled_back, failed
	Reason   string `json:"reason,omitempty"`
	From     string `json:"from,omitempty"`
	To       string `json:"to,omitempty"`
	Reported bool   `json:"reported"`
}

// Outcome results.
const (
	ResultCommitted  = "committed"
	ResultRolledBack = "rolled_back"
	ResultFailed     = "failed"
)

// Update is the update in progress.
type Update struct {
	ID          string     `json:"id"`
	Source      string     `json:"source"` // file path or URL
	Offer       *Offer     `json:"offer,omitempty"`
	FromVersion string     `json:"from_version"`
	FromSlot    string     `json:"from_slot"`
	ToSlot      string     `json:"to_slot"`
	Staged      string     `json:"staged,omitempty"` // the file to install from
	Device      Facts      `json:"device"`           // the device when the update began
	Image       *ImageInfo `json:"image,omitempty"`
	TrialStep   TrialStep  `json:"trial_step,omitempty"`
	// DataRestored: after a failed trial the data directory is back in the
	// old firmware's format.
	DataRestored bool `json:"data_restored,omitempty"`
	// Restarts counts agent starts in the current phase: the loop breaker.
	Restarts int `json:"restarts,omitempty"`
	// Retries counts retryable failures in the current phase.
	Retries int     `json:"retries,omitempty"`
	Outcome Outcome `json:"outcome"`
}

// State is what the journal holds.
type State struct {
	Format int     `json:"format"` // journal format version
	Phase  Phase   `json:"phase"`
	Update *Update `json:"update,omitempty"`
	// Last is the outcome of the last finished update, for status.
	Last *Outcome `json:"last,omitempty"`
}

// JournalFormat is the journal's format version. Old and new firmware read
// the same journal, so fields are only ever added.
const JournalFormat = 1

// Limits of the loop breaker and of retries.
const (
	MaxRestarts = 5 // agent starts in one phase before giving up on it
	MaxRetries  = 5 // retryable failures in one phase before giving up
	TrialBoots  = 3 // trial attempts armed in the boot environment
)

// RetryDelay is how long the runner waits before retrying attempt n.
func RetryDelay(n int) time.Duration {
	d := time.Second << min(n, 6)
	return min(d, time.Minute)
}

// EventKind says what happened.
type EventKind string

const (
	EvStart           EventKind = "start"            // the agent started (Facts)
	EvCheck           EventKind = "check"            // poll the server
	EvNoUpdate        EventKind = "no_update"        // the server has nothing
	EvOffer           EventKind = "offer"            // an update is offered or requested (Source, Offer, Facts)
	EvDownloaded      EventKind = "downloaded"       // Staged
	EvVerified        EventKind = "verified"         // Image
	EvInstalled       EventKind = "installed"        //
	EvArmed           EventKind = "armed"            //
	EvRevertPrepared  EventKind = "revert_prepared"  //
	EvHookDone        EventKind = "hook_done"        // Hook
	EvCommitted       EventKind = "committed"        //
	EvRolledBack      EventKind = "rolled_back"      // data and environment put back
	EvCleaned         EventKind = "cleaned"          //
	EvReported        EventKind = "reported"         //
	EvFailed          EventKind = "failed"           // Err, Retryable, Security, Hook
	EvCommitRequested EventKind = "commit_requested" // the operator commits a trial by hand
	EvRollbackRequest EventKind = "rollback_requested"
)

// Hooks, run at the edges of phases (docs/HOOKS.md).
const (
	HookPreInstall  = "pre-install"  // old firmware, before the slot is written
	HookPostInstall = "post-install" // old firmware, after the slot is written
	HookMigrateData = "migrate-data" // new firmware, on trial, after the revert material is saved
	HookHealthCheck = "health-check" // new firmware, on trial
	HookCommit      = "commit"       // new firmware, after the commit
	HookRollback    = "rollback"     // new firmware, undoing migrate-data before going back
	HookRevertData  = "revert-data"  // new firmware's, saved on the data partition, run by the old one
)

// Event is an input to Step.
type Event struct {
	Kind      EventKind  `json:"kind"`
	Facts     *Facts     `json:"facts,omitempty"`
	Source    string     `json:"source,omitempty"`
	Offer     *Offer     `json:"offer,omitempty"`
	Staged    string     `json:"staged,omitempty"`
	Image     *ImageInfo `json:"image,omitempty"`
	Hook      string     `json:"hook,omitempty"`
	Err       string     `json:"err,omitempty"`
	Retryable bool       `json:"retryable,omitempty"`
	Security  bool       `json:"security,omitempty"`
	ID        string     `json:"id,omitempty"` // a new update's ID (the runner makes it)
}

// EffectKind says what the runner must do.
type EffectKind string

const (
	FxCheckServer   EffectKind = "check_server"
	FxDownload      EffectKind = "download"       // Source into the staging file, resuming
	FxVerify        EffectKind = "verify"         // Staged
	FxInstall       EffectKind = "install"        // pre-install hook, stream Staged into ToSlot, post-install hook
	FxArm           EffectKind = "arm"            // re-read and verify ToSlot, check it, set the trial
	FxReboot        EffectKind = "reboot"         //
	FxPrepareRevert EffectKind = "prepare_revert" // save the revert hook or snapshot the data directory
	FxRunHook       EffectKind = "run_hook"       // Hook
	FxCommit        EffectKind = "commit"         // boot environment, non-volatile store, commit hook
	FxRollback      EffectKind = "rollback"       // restore data; OnNewSlot: rollback hook and clear the trial
	FxCleanup       EffectKind = "cleanup"        // staging file, revert material
	FxReport        EffectKind = "report"         // Outcome
	FxSleep         EffectKind = "sleep"          // Delay, then the next effect
)

// Effect is an output of Step, for the runner to carry out.
type Effect struct {
	Kind      EffectKind    `json:"kind"`
	Hook      string        `json:"hook,omitempty"`
	Delay     time.Duration `json:"delay,omitempty"`
	OnNewSlot bool          `json:"on_new_slot,omitempty"`
}

func (e Effect) String() string {
	if e.Hook != "" {
		return fmt.Sprintf("%s(%s)", e.Kind, e.Hook)
	}
	return string(e.Kind)
}
