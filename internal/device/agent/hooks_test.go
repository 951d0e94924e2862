package agent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeHook(t *testing.T, dir, name, body string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), mode); err != nil {
		t.Fatal(err)
	}
}

// Hooks run in lexical order (NAME, then NAME.SUFFIX), see the transition
// in their environment, have their output logged, and only executables run.
func TestExecHooksOrderEnvAndLog(t *testing.T) {
	dir := t.TempDir()
	trace := filepath.Join(t.TempDir(), "trace")
	writeHook(t, dir, "migrate-data.20-second", `echo "second $FIELDPATCH_FROM_VERSION->$FIELDPATCH_TO_VERSION" >> `+trace, 0o755)
	writeHook(t, dir, "migrate-data", `echo "plain $FIELDPATCH_HOOK $FIELDPATCH_DATA_DIR" >> `+trace+`; echo "to the log"; echo "err line" >&2`, 0o755)
	writeHook(t, dir, "migrate-data.10-first", `echo "first $FIELDPATCH_TO_SLOT" >> `+trace, 0o755)
	writeHook(t, dir, "migrate-data.30-not-executable", `echo "must not run" >> `+trace, 0o644)
	writeHook(t, dir, "migrate-database", `echo "another hook's name" >> `+trace, 0o755)
	var log bytes.Buffer
	h := &ExecHooks{Dir: dir, Log: slog.New(slog.NewTextHandler(&log, nil))}
	env := HookEnv{Hook: HookMigrateData, FromVersion: "1.0.0", ToVersion: "2.0.0", ToSlot: "b", DataDir: "/data"}
	if err := h.Run(context.Background(), HookMigrateData, env); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(trace)
	want := "plain migrate-data /data\nfirst b\nsecond 1.0.0->2.0.0\n"
	if string(got) != want {
		t.Fatalf("hooks ran as\n%s\nwant\n%s", got, want)
	}
	if !strings.Contains(log.String(), "to the log") || !strings.Contains(log.String(), "err line") {
		t.Errorf("hook output missing from the log:\n%s", log.String())
	}
	// A directory without the hook: nothing to do.
	if err := h.Run(context.Background(), HookCommit, env); err != nil {
		t.Errorf("absent hook: %v", err)
	}
}

func TestExecHooksFailureRetryTimeout(t *testing.T) {
	dir := t.TempDir()
	writeHook(t, dir, "health-check", "exit 3", 0o755)
	writeHook(t, dir, "pre-install", "exit 75", 0o755)
	writeHook(t, dir, "post-install", "sleep 10", 0o755)
	h := &ExecHooks{Dir: dir, Timeout: 200 * time.Millisecond}
	ctx := context.Background()
	if err := h.Run(ctx, HookHealthCheck, HookEnv{}); err == nil || errors.Is(err, ErrRetryLater) || !strings.Contains(err.Error(), "exit status 3") {
		t.Errorf("failing hook: %v", err)
	}
	if err := h.Run(ctx, HookPreInstall, HookEnv{}); !errors.Is(err, ErrRetryLater) {
		t.Errorf("exit 75: %v, want ErrRetryLater", err)
	}
	start := time.Now()
	err := h.Run(ctx, HookPostInstall, HookEnv{})
	if err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Errorf("slow hook: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the timeout took %v to act", d)
	}
}

// SaveRevert copies the revert-data hook, runnable from where it was saved.
func TestExecHooksSaveRevert(t *testing.T) {
	dir, saved := t.TempDir(), filepath.Join(t.TempDir(), "revert-data")
	h := &ExecHooks{Dir: dir}
	if ok, err := h.SaveRevert(context.Background(), saved); ok || err != nil {
		t.Fatalf("no revert hook: %v %v", ok, err)
	}
	out := filepath.Join(t.TempDir(), "out")
	writeHook(t, dir, "revert-data", `echo "reverting $FIELDPATCH_TO_VERSION" > `+out, 0o755)
	if ok, err := h.SaveRevert(context.Background(), saved); !ok || err != nil {
		t.Fatalf("save: %v %v", ok, err)
	}
	os.Remove(filepath.Join(dir, "revert-data")) // the new firmware is gone; its saved hook remains
	if err := h.RunSaved(context.Background(), saved, HookEnv{ToVersion: "2.0.0"}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); string(b) != "reverting 2.0.0\n" {
		t.Fatalf("saved hook wrote %q", b)
	}
}
