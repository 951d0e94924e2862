package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ExitRetryLater is the exit status with which a hook asks to be run again
// later (EX_TEMPFAIL from sysexits.h).
const ExitRetryLater = 75

// DefaultHookTimeout bounds one hook's run.
const DefaultHookTimeout = 5 * time.Minute

// ExecHooks runs executables from the running firmware's hooks directory.
// A hook named NAME is the file NAME or any file NAME.SUFFIX (for example
// migrate-data.10-database), run in lexical order; files that are not
// executable are skipped. Each gets the transition in FIELDPATCH_* variables,
// is killed after Timeout, and has its output copied into the update log.
// Hooks must be idempotent: a power cut can run one again.
type ExecHooks struct {
	Dir     string
	Timeout time.Duration
	Log     *slog.Logger
}

func (h *ExecHooks) find(name string) ([]string, error) {
	entries, err := os.ReadDir(h.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		n := e.Name()
		if n != name && !strings.HasPrefix(n, name+".") {
			continue
		}
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			continue
		}
		out = append(out, filepath.Join(h.Dir, n))
	}
	sort.Strings(out)
	return out, nil
}

// Run runs every hook of that name.
func (h *ExecHooks) Run(ctx context.Context, name string, env HookEnv) error {
	files, err := h.find(name)
	if err != nil {
		return err
	}
	for _, f := range files {
		if err := h.exec(ctx, f, env); err != nil {
			return err
		}
	}
	return nil
}

// SaveRevert copies the revert-data hook, if the firmware has one.
func (h *ExecHooks) SaveRevert(ctx context.Context, path string) (bool, error) {
	files, err := h.find(HookRevertData)
	if err != nil || len(files) == 0 {
		return false, err
	}
	if len(files) > 1 {
		return false, fmt.Errorf("%d %s hooks: there must be one, as it is saved as a single file", len(files), HookRevertData)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		return false, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		return false, err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return false, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return false, err
	}
	return true, f.Close()
}

// RunSaved runs a saved revert-data hook.
func (h *ExecHooks) RunSaved(ctx context.Context, path string, env HookEnv) error {
	return h.exec(ctx, path, env)
}

func (h *ExecHooks) exec(ctx context.Context, path string, env HookEnv) error {
	timeout := h.Timeout
	if timeout <= 0 {
		timeout = DefaultHookTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = append(os.Environ(), env.Vars()...)
	cmd.Dir = filepath.Dir(path)
	// The hook and everything it starts form one process group, killed
	// together at the timeout.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	lg := h.Log
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			lg.Info("hook output", "hook", filepath.Base(path), "line", sc.Text())
		}
		io.Copy(io.Discard, pr)
	}()
	start := time.Now()
	err := cmd.Run()
	pw.Close()
	wg.Wait()
	lg.Info("hook ran", "hook", filepath.Base(path), "took", time.Since(start).Round(time.Millisecond), "err", err)
	if err == nil {
		return nil
	}
	if ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("hook %s timed out after %v", filepath.Base(path), timeout)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == ExitRetryLater {
		return fmt.Errorf("hook %s: %w", filepath.Base(path), ErrRetryLater)
	}
	return fmt.Errorf("hook %s: %w", filepath.Base(path), err)
}
