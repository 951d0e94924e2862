package slot

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
)

// FS is the part of a file system the device code needs: enough to write a
// file crash-safely (temporary file, fsync, rename, fsync the directory).
type FS interface {
	ReadFile(name string) ([]byte, error)
	// Create makes or truncates a file for writing.
	Create(name string) (File, error)
	Rename(oldname, newname string) error
	Remove(name string) error
	// SyncDir makes the directory's entries (creates, renames, removes) durable.
	SyncDir(dir string) error
	// ReadDir lists a directory, sorted by name; a missing path or a file
	// lists as empty.
	ReadDir(dir string) ([]DirEntry, error)
	// MkdirAll makes a directory and its parents.
	MkdirAll(dir string) error
}

// DirEntry is one name in a directory.
type DirEntry struct {
	Name  string
	IsDir bool
}

// File is a file open for writing.
type File interface {
	io.Writer
	Sync() error
	Close() error
}

// WriteFileAtomic replaces name with data so that after a power cut at any
// point the file holds either its old contents or the new ones: it writes a
// temporary file beside it, fsyncs it, renames it over name and fsyncs the
// directory.
func WriteFileAtomic(fsys FS, name string, data []byte) error {
	tmp := name + ".tmp"
	if err := WriteFileSynced(fsys, tmp, data); err != nil {
		return err
	}
	if err := fsys.Rename(tmp, name); err != nil {
		return err
	}
	return fsys.SyncDir(filepath.Dir(name))
}

// WriteFileSynced creates (or truncates) name, writes data and fsyncs it.
// The directory entry is not synced: see WriteFileAtomic.
func WriteFileSynced(fsys FS, name string, data []byte) error {
	f, err := fsys.Create(name)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// OSFS is the real file system.
type OSFS struct{}

func (OSFS) ReadFile(name string) ([]byte, error) { return os.ReadFile(name) }
func (OSFS) Create(name string) (File, error) {
	return os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
}
func (OSFS) Rename(o, n string) error  { return os.Rename(o, n) }
func (OSFS) Remove(name string) error  { return os.Remove(name) }
func (OSFS) MkdirAll(dir string) error { return os.MkdirAll(dir, 0o755) }
func (OSFS) ReadDir(dir string) ([]DirEntry, error) {
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		return nil, nil
	}
	des, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := make([]DirEntry, 0, len(des))
	for _, d := range des {
		out = append(out, DirEntry{Name: d.Name(), IsDir: d.IsDir()})
	}
	return out, nil
}
func (OSFS) SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// MemFS models a file system that loses power. File data is volatile until
// the file is fsynced; directory entries (creates, renames, removes) are
// volatile until their directory is fsynced. PowerCut throws away everything
// volatile; CutAtOp schedules that at a chosen mutating operation.
type MemFS struct {
	mu      sync.Mutex
	cur     map[string]*inode // the view a running program sees
	durable map[string]*inode // the entries that survive a power cut
	ops     int               // mutating operations so far
	cutOp   int               // power fails at this operation (1-based); 0: never
	off     bool

	power    *Power // shared supply, if attached
	area     string
	seenCuts int
}

// Attach connects the model to a shared power supply; its mutating
// operations count as operations of area, and a cut anywhere on the supply
// loses what was volatile here.
func (m *MemFS) Attach(p *Power, area string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.power, m.area = p, area
	m.seenCuts, _ = p.state()
}

// live follows the shared supply (lock held): after a cut it drops what was
// volatile, once, and reports ErrPowerCut while power is off.
func (m *MemFS) live() error {
	if m.power != nil {
		cuts, off := m.power.state()
		if cuts != m.seenCuts {
			m.seenCuts = cuts
			m.powerCut()
		}
		m.off = off
	}
	if m.off {
		return ErrPowerCut
	}
	return nil
}

type inode struct {
	data    []byte // what reads see
	durable []byte // what survives a power cut
}

// NewMemFS makes an empty model.
func NewMemFS() *MemFS {
	return &MemFS{cur: map[string]*inode{}, durable: map[string]*inode{}}
}

// Put adds a file that is already durable, for setting up a test.
func (m *MemFS) Put(name string, data []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ino := &inode{data: append([]byte(nil), data...), durable: append([]byte(nil), data...)}
	m.cur[name] = ino
	m.durable[name] = ino
}

// CutAtOp cuts power at the n-th mutating operation from now (1-based):
// that operation does not happen.
func (m *MemFS) CutAtOp(n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cutOp = m.ops + n
}

// Ops returns the mutating operations made so far.
func (m *MemFS) Ops() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ops
}

// PowerCut loses everything volatile, now.
func (m *MemFS) PowerCut() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.powerCut()
}

func (m *MemFS) powerCut() {
	m.off = true
	m.cur = map[string]*inode{}
	for name, ino := range m.durable {
		ino.data = append([]byte(nil), ino.durable...)
		m.cur[name] = ino
	}
}

// PowerOn restores power and clears any pending cut.
func (m *MemFS) PowerOn() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.off = false
	m.cutOp = 0
}

// Names lists the files a program would see, sorted.
func (m *MemFS) Names() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var names []string
	for n := range m.cur {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// op counts a mutating operation and reports whether it may happen.
func (m *MemFS) op() error {
	if err := m.live(); err != nil {
		return err
	}
	if m.power != nil {
		if ok, _, _, _ := m.power.op(m.area); !ok {
			cuts, _ := m.power.state()
			m.seenCuts = cuts
			m.powerCut()
			return ErrPowerCut
		}
	}
	m.ops++
	if m.cutOp != 0 && m.ops >= m.cutOp {
		m.powerCut()
		return ErrPowerCut
	}
	return nil
}

func (m *MemFS) ReadFile(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return nil, err
	}
	ino, ok := m.cur[name]
	if !ok {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return append([]byte(nil), ino.data...), nil
}

func (m *MemFS) Create(name string) (File, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.op(); err != nil {
		return nil, err
	}
	ino, ok := m.cur[name]
	if ok {
		ino.data = nil
	} else {
		ino = &inode{}
		m.cur[name] = ino
	}
	return &memFile{m: m, ino: ino, name: name}, nil
}

func (m *MemFS) Rename(o, n string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return err
	}
	ino, ok := m.cur[o]
	if !ok {
		return &fs.PathError{Op: "rename", Path: o, Err: fs.ErrNotExist}
	}
	if err := m.op(); err != nil {
		return err
	}
	delete(m.cur, o)
	m.cur[n] = ino
	return nil
}

func (m *MemFS) Remove(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return err
	}
	if _, ok := m.cur[name]; !ok {
		return &fs.PathError{Op: "remove", Path: name, Err: fs.ErrNotExist}
	}
	if err := m.op(); err != nil {
		return err
	}
	delete(m.cur, name)
	return nil
}

// MkdirAll does nothing: directories in the model exist by their files.
func (m *MemFS) MkdirAll(dir string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.live()
}

func (m *MemFS) ReadDir(dir string) ([]DirEntry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return nil, err
	}
	dir = filepath.Clean(dir)
	seen := map[string]bool{}
	var out []DirEntry
	for name := range m.cur {
		rel, err := filepath.Rel(dir, name)
		if err != nil || rel == "." || rel == ".." || len(rel) > 2 && rel[:3] == "../" {
			continue
		}
		first, rest, nested := cutPath(rel)
		if seen[first] {
			continue
		}
		seen[first] = true
		out = append(out, DirEntry{Name: first, IsDir: nested && rest != ""})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func cutPath(rel string) (string, string, bool) {
	for i := 0; i < len(rel); i++ {
		if rel[i] == '/' {
			return rel[:i], rel[i+1:], true
		}
	}
	return rel, "", false
}

func (m *MemFS) SyncDir(dir string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.op(); err != nil {
		return err
	}
	dir = filepath.Clean(dir)
	in := func(name string) bool { return filepath.Dir(name) == dir }
	for name := range m.durable {
		if in(name) {
			if _, ok := m.cur[name]; !ok {
				delete(m.durable, name)
			}
		}
	}
	for name, ino := range m.cur {
		if in(name) {
			m.durable[name] = ino
		}
	}
	return nil
}

type memFile struct {
	m      *MemFS
	ino    *inode
	name   string
	closed bool
}

func (f *memFile) Write(p []byte) (int, error) {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if f.closed {
		return 0, fmt.Errorf("%s: %w", f.name, os.ErrClosed)
	}
	if err := f.m.op(); err != nil {
		return 0, err
	}
	f.ino.data = append(f.ino.data, p...)
	return len(p), nil
}

func (f *memFile) Sync() error {
	f.m.mu.Lock()
	defer f.m.mu.Unlock()
	if err := f.m.op(); err != nil {
		return err
	}
	// Files only grow by appending (Create starts a new array), so the
	// durable view can share the bytes written so far.
	f.ino.durable = f.ino.data[:len(f.ino.data):len(f.ino.data)]
	return nil
}

func (f *memFile) Close() error {
	f.closed = true
	return nil
}

// IsNotExist reports whether err says a file does not exist, for either FS.
func IsNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
