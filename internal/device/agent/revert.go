package agent

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

// Revert material lives in StateDir/revert/<update id>/: either the new
// firmware's revert-data hook, or a snapshot of the data directory taken
// before migrate-data ran. The file "kind" is written last, so it is there
// only when the material is complete.
const (
	revertKindHook     = "hook"
	revertKindSnapshot = "snapshot"
)

// prepareRevert leaves on the data partition what it takes to bring the data
// back to the old firmware's format, before migrate-data may change it. It
// starts afresh each time: a cut attempt may have left half a snapshot, and
// the data itself is still untouched.
func (r *Runner) prepareRevert(ctx context.Context, u *Update) error {
	dir := r.revertDir(u)
	if err := removeAll(r.FS, dir); err != nil {
		return err
	}
	if err := r.FS.MkdirAll(dir); err != nil {
		return err
	}
	kind := revertKindSnapshot
	saved, err := r.Hooks.SaveRevert(ctx, filepath.Join(dir, HookRevertData))
	if err != nil {
		return fmt.Errorf("save the revert-data hook: %w", err)
	}
	if saved {
		kind = revertKindHook
	} else if err := copyTree(r.FS, r.DataDir, filepath.Join(dir, "snapshot")); err != nil {
		return fmt.Errorf("snapshot %s: %w", r.DataDir, err)
	}
	return slot.WriteFileAtomic(r.FS, filepath.Join(dir, "kind"), []byte(kind))
}

// restore brings the data directory back from the revert material. It is
// idempotent: after a cut it runs again from the start.
func (r *Runner) restore(ctx context.Context, u *Update) error {
	dir := r.revertDir(u)
	kind, err := r.FS.ReadFile(filepath.Join(dir, "kind"))
	if err != nil {
		return fmt.Errorf("revert material for update %s is missing: %w", u.ID, err)
	}
	switch string(kind) {
	case revertKindHook:
		return r.Hooks.RunSaved(ctx, filepath.Join(dir, HookRevertData), r.hookEnv(u, HookRevertData))
	case revertKindSnapshot:
		return restoreTree(r.FS, filepath.Join(dir, "snapshot"), r.DataDir)
	}
	return fmt.Errorf("revert material of unknown kind %q", kind)
}

// copyTree copies the files under src to dst, syncing each file and
// directory.
func copyTree(fsys slot.FS, src, dst string) error {
	if err := fsys.MkdirAll(dst); err != nil {
		return err
	}
	entries, err := fsys.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range entries {
		s, d := filepath.Join(src, e.Name), filepath.Join(dst, e.Name)
		if e.IsDir {
			if err := copyTree(fsys, s, d); err != nil {
				return err
			}
			continue
		}
		b, err := fsys.ReadFile(s)
		if err != nil {
			return err
		}
		if err := slot.WriteFileSynced(fsys, d, b); err != nil {
			return err
		}
	}
	return fsys.SyncDir(dst)
}

// restoreTree makes dst hold exactly the files of snap: each file replaced
// atomically, files the snapshot lacks removed.
func restoreTree(fsys slot.FS, snap, dst string) error {
	if err := fsys.MkdirAll(dst); err != nil {
		return err
	}
	want, err := fsys.ReadDir(snap)
	if err != nil {
		return err
	}
	have, err := fsys.ReadDir(dst)
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, e := range want {
		keep[e.Name] = true
		s, d := filepath.Join(snap, e.Name), filepath.Join(dst, e.Name)
		if e.IsDir {
			if err := restoreTree(fsys, s, d); err != nil {
				return err
			}
			continue
		}
		b, err := fsys.ReadFile(s)
		if err != nil {
			return err
		}
		if old, err := fsys.ReadFile(d); err == nil && string(old) == string(b) {
			continue
		}
		if err := slot.WriteFileAtomic(fsys, d, b); err != nil {
			return err
		}
	}
	for _, e := range have {
		if !keep[e.Name] {
			if err := removeAll(fsys, filepath.Join(dst, e.Name)); err != nil {
				return err
			}
		}
	}
	return fsys.SyncDir(dst)
}

// removeAll removes a file or a directory tree; a missing one is fine.
func removeAll(fsys slot.FS, path string) error {
	entries, err := fsys.ReadDir(path)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := removeAll(fsys, filepath.Join(path, e.Name)); err != nil {
			return err
		}
	}
	if err := fsys.Remove(path); err != nil {
		if slot.IsNotExist(err) {
			return nil
		}
		return err
	}
	return fsys.SyncDir(filepath.Dir(path))
}
