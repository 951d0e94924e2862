// Package boot is fieldpatch's reference A/B boot selector: on every power-on
// it decides which slot boots, exactly as the U-Boot script and GRUB
// configuration in bootloader/ do, on the same environment variables.
//
//	if a trial slot is set:
//	    if attempts are left and its image verifies and is not below the counter:
//	        decrement the attempts and save (before the jump), boot the trial
//	    else: clear the trial (the rollback) and fall through
//	boot the active slot if its image verifies;
//	else the other slot if it verifies (a fallback, recorded as such);
//	else recovery.
//
// "Verifies" means: the slot holds a well-formed image whose SHA-256 matches
// and which is signed by a trusted key not revoked by the device's key
// epoch, whose security counter is at least the non-volatile counter, and
// whose hardware class (if the device names one) is the device's. It is
// checked at every boot (secure boot): a slot that verified yesterday and
// was altered since does not boot.
//
// The selector only reads the non-volatile store; the agent raises it at
// commit. When the store is missing or corrupt the selector fails safe: it
// boots only the committed active slot, if it verifies with keys never
// revoked, ignoring the counter; it attempts no trial and no fallback, and
// says so in the decision. docs/BOOTLOADER.md has the table of outcomes.
package boot

import (
	"context"
	"crypto"
	"fmt"
	"strconv"

	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/image"
)

// Environment variables shared with the agent and the bootloader scripts.
const (
	VarActive     = "fp_active"      // the committed slot: a or b
	VarTrial      = "fp_trial"       // slot to boot on trial, or empty
	VarTrialLeft  = "fp_trial_left"  // trial attempts left, 0 to 9
	VarBooted     = "fp_booted"      // the slot booted last (empty: recovery)
	VarBootReason = "fp_boot_reason" // why: one of the Reason values
)

// Reason says why a slot was chosen.
type Reason string

const (
	ReasonActive   Reason = "active"   // the committed slot, nothing unusual
	ReasonTrial    Reason = "trial"    // a trial boot of a new image
	ReasonRollback Reason = "rollback" // a trial was abandoned; the active slot boots
	ReasonFallback Reason = "fallback" // the active slot no longer verifies; the other one boots
	ReasonRecovery Reason = "recovery" // nothing verifies
)

// Slots are named a and b.
var Slots = [2]string{"a", "b"}

func other(s string) string {
	if s == "a" {
		return "b"
	}
	return "a"
}

// TrustedKey is an image-signing key the device trusts until the key epoch
// reaches RevokedAtEpoch (0: never revoked).
type TrustedKey struct {
	Key            crypto.PublicKey
	RevokedAtEpoch uint32
	Name           string
}

// NV is the non-volatile store as the selector sees it.
type NV interface {
	Load() (NVState, error)
}

// Device is everything the selector looks at.
type Device struct {
	Env     bootenv.Store
	Slots   map[string]slot.Device // "a" and "b"
	Keys    []TrustedKey
	NV      NV
	HWClass string // if set, images for another hardware class do not boot
}

// SlotCheck is what the selector found in one slot.
type SlotCheck struct {
	Slot            string `json:"slot"`
	OK              bool   `json:"ok"`
	Version         string `json:"version,omitempty"`
	SecurityCounter uint32 `json:"security_counter,omitempty"`
	Problem         string `json:"problem,omitempty"`
}

// Decision is the selector's answer.
type Decision struct {
	Boot      string      `json:"boot"` // "a", "b", or "" for recovery
	Reason    Reason      `json:"reason"`
	Active    string      `json:"active"`
	Trial     string      `json:"trial"`
	TrialLeft int         `json:"trial_left"`
	Checks    []SlotCheck `json:"checks"`          // slots examined, in order
	NV        *NVState    `json:"nv,omitempty"`    // nil when the store could not be read
	Notes     []string    `json:"notes,omitempty"` // anything unusual, for the log and the report
	EnvSaved  bool        `json:"env_saved"`       // the environment was written this boot
}

// Select decides what boots and saves the environment when the decision
// changes it. It returns an error only when that save fails; d still says
// what to boot, and is never a trial whose attempt could not be recorded.
func Select(ctx context.Context, dev Device) (Decision, error) {
	s := &selector{ctx: ctx, dev: dev, checked: map[string]SlotCheck{}}
	env, err := dev.Env.Load()
	if err != nil {
		s.note("boot environment unreadable (%v): starting from defaults", err)
		env = nil
	}
	s.nv, err = dev.NV.Load()
	if err != nil {
		s.degraded = true
		s.note("%v: fail-safe mode: only the committed slot boots, with keys never revoked; no trial, no fallback", err)
	}

	d, next := s.decide(env, true)
	if next == nil {
		return d, nil
	}
	err = dev.Env.Save(next)
	if err == nil {
		d.EnvSaved = true
		return d, nil
	}
	err = fmt.Errorf("save boot environment: %w", err)
	if d.Reason != ReasonTrial {
		return d, err
	}
	// The attempt could not be recorded, so it is not made: a trial that
	// crashes must cost an attempt, or the attempts never run out.
	s.note("trial of slot %s not attempted: %v", d.Boot, err)
	d, _ = s.decide(env, false)
	return d, err
}

type selector struct {
	ctx      context.Context
	dev      Device
	nv       NVState
	degraded bool
	checked  map[string]SlotCheck
	notes    []string
}

func (s *selector) note(format string, args ...any) {
	s.notes = append(s.notes, fmt.Sprintf(format, args...))
}

// check verifies a slot once per boot, however often it is asked.
func (s *selector) check(slot string) SlotCheck {
	if c, ok := s.checked[slot]; ok {
		return c
	}
	c := s.dev.checkSlot(s.ctx, slot, s.nv, s.degraded)
	s.checked[slot] = c
	return c
}

// decide computes the decision and the environment to save (nil when it is
// unchanged). It does no writes.
func (s *selector) decide(stored bootenv.Env, allowTrial bool) (Decision, bootenv.Env) {
	env := stored.Clone()
	active := env[VarActive]
	if active != "a" && active != "b" {
		if active != "" {
			s.note("%s=%q is not a slot: taking a", VarActive, active)
		}
		active = "a"
	}
	trial := env[VarTrial]
	left, _ := strconv.Atoi(env[VarTrialLeft])
	switch {
	case trial != "" && trial != "a" && trial != "b":
		s.note("%s=%q is not a slot: trial cleared", VarTrial, trial)
		trial = ""
	case trial != "" && trial == active:
		s.note("trial slot %s is the active slot: trial cleared", trial)
		trial = ""
	}

	var order []string
	boot, reason := "", ReasonRecovery
	if trial != "" && allowTrial {
		order = append(order, trial)
		switch {
		case s.degraded:
			s.note("trial of slot %s not attempted: the non-volatile store cannot be read", trial)
		case left <= 0:
			s.note("trial of slot %s has no attempts left", trial)
		case !s.check(trial).OK:
			s.note("trial of slot %s refused: %s", trial, s.check(trial).Problem)
		default:
			// Record the attempt before the jump.
			boot, reason = trial, ReasonTrial
			left--
		}
		if boot == "" {
			trial, left = "", 0
			reason = ReasonRollback
		}
	}
	if boot == "" {
		order = append(order, active)
		switch {
		case s.check(active).OK:
			boot = active
			if reason != ReasonRollback {
				reason = ReasonActive
			}
		case s.degraded:
			reason = ReasonRecovery
		default:
			order = append(order, other(active))
			if s.check(other(active)).OK {
				s.note("slot %s does not verify: falling back to slot %s, which becomes the active slot", active, other(active))
				active = other(active)
				boot, reason = active, ReasonFallback
			} else {
				reason = ReasonRecovery
			}
		}
	}

	d := Decision{Boot: boot, Reason: reason, Active: active, Trial: trial, TrialLeft: left, Notes: s.notes}
	if trial == "" {
		d.TrialLeft = 0
	}
	if !s.degraded {
		nv := s.nv
		d.NV = &nv
	}
	for _, sl := range order {
		d.Checks = append(d.Checks, s.check(sl))
	}
	if !allowTrial {
		// Nothing is saved on this path: the storage just failed.
		return d, nil
	}
	env[VarActive] = active
	env[VarTrial] = trial
	env[VarTrialLeft] = strconv.Itoa(d.TrialLeft)
	env[VarBooted] = boot
	env[VarBootReason] = string(reason)
	if stored != nil && env.Equal(stored) {
		return d, nil
	}
	return d, env
}

// checkSlot verifies the image in slot s as the selector requires.
func (dev Device) checkSlot(ctx context.Context, s string, nv NVState, degraded bool) SlotCheck {
	c := SlotCheck{Slot: s}
	sd, ok := dev.Slots[s]
	if !ok {
		c.Problem = "no such slot"
		return c
	}
	var keys []crypto.PublicKey
	for _, k := range dev.Keys {
		revoked := k.RevokedAtEpoch != 0 && (degraded || nv.KeyEpoch >= k.RevokedAtEpoch)
		if !revoked {
			keys = append(keys, k.Key)
		}
	}
	img, _, err := image.ReadVerify(ctx, slot.Reader(sd), keys, image.ReadOptions{Trailer: image.TrailerIgnore})
	if err != nil {
		c.Problem = err.Error()
		if len(keys) == 0 {
			c.Problem = "no trusted key left (all revoked by the key epoch)"
		}
		return c
	}
	c.Version = img.Version().String()
	c.SecurityCounter = img.SecurityCounter
	if !degraded && img.SecurityCounter < nv.Counter {
		c.Problem = fmt.Sprintf("security counter %d is below the device's %d", img.SecurityCounter, nv.Counter)
		return c
	}
	if dev.HWClass != "" && img.HWClass != dev.HWClass {
		c.Problem = fmt.Sprintf("image is for hardware class %q, this device is %q", img.HWClass, dev.HWClass)
		return c
	}
	c.OK = true
	return c
}
