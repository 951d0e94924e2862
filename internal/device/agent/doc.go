// Package agent is the device agent: a state machine that carries a device
// from one firmware version to the next through power cuts, kills and bad
// firmware, and the runner that drives it.
//
// The machine is a pure function, Step: state and event in, next state and
// effects out, with no I/O and no clock. The Runner persists every new state
// in the journal (temporary file, fsync, rename, fsync the directory) before
// it carries out the state's effects, and on start resumes from the journal.
//
//	idle ──offer──▶ downloading ──▶ verifying ──▶ installing ──▶ armed ──▶ rebooting
//	  ▲                  │              │             │            │          │ (boot selector: trial)
//	  │                  └──────────────┴─────────────┴────────────┴──▶ failed│
//	  │                                                                       ▼
//	reporting ◀── committed ◀── committing ◀──────────────────────── trial_running
//	  ▲                                                                       │ health fails, or the
//	  └──────────── rolled_back ◀────────── rolling_back ◀────────────────────┘ bootloader gave up
//
// The old firmware downloads, verifies, installs and arms; the new firmware,
// booted on trial, prepares what it takes to go back, migrates data, checks
// its health and commits (raising the non-volatile counter and key epoch
// only then) or rolls back. If the new firmware never comes up far enough,
// the bootloader's attempts run out and the old firmware's agent finds the
// journal in trial_running: it restores the data from what the new version
// left and reports the rollback. docs/ARCHITECTURE.md has the full diagram
// and docs/HOOKS.md the hooks.
package agent
