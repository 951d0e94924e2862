package simdev

import (
	"fmt"
	"strings"

	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

// muxFS joins several file-system models under path prefixes, so that each
// partition (or area of interest) has its own model and power count while
// the agent sees one tree.
type muxFS struct {
	mounts []mount
}

type mount struct {
	prefix string
	fs     slot.FS
}

func (m *muxFS) route(path string) (slot.FS, error) {
	for _, mt := range m.mounts {
		if path == mt.prefix || strings.HasPrefix(path, mt.prefix+"/") {
			return mt.fs, nil
		}
	}
	return nil, fmt.Errorf("%s: outside every mounted file system", path)
}

func (m *muxFS) ReadFile(name string) ([]byte, error) {
	f, err := m.route(name)
	if err != nil {
		return nil, err
	}
	return f.ReadFile(name)
}

func (m *muxFS) Create(name string) (slot.File, error) {
	f, err := m.route(name)
	if err != nil {
		return nil, err
	}
	return f.Create(name)
}

func (m *muxFS) Rename(o, n string) error {
	fo, err := m.route(o)
	if err != nil {
		return err
	}
	fn, err := m.route(n)
	if err != nil {
		return err
	}
	if fo != fn {
		return fmt.Errorf("rename %s to %s crosses file systems", o, n)
	}
	return fo.Rename(o, n)
}

func (m *muxFS) Remove(name string) error {
	f, err := m.route(name)
	if err != nil {
		return err
	}
	return f.Remove(name)
}

func (m *muxFS) SyncDir(dir string) error {
	f, err := m.route(dir)
	if err != nil {
		return err
	}
	return f.SyncDir(dir)
}

func (m *muxFS) ReadDir(dir string) ([]slot.DirEntry, error) {
	f, err := m.route(dir)
	if err != nil {
		return nil, err
	}
	return f.ReadDir(dir)
}

func (m *muxFS) MkdirAll(dir string) error {
	f, err := m.route(dir)
	if err != nil {
		return err
	}
	return f.MkdirAll(dir)
}
