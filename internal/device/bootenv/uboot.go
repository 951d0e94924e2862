package bootenv

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"path/filepath"

	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

// Device is the raw storage an environment copy lives on.
type Device = slot.Device

const crcLen = 4

// EncodeUBoot lays out one U-Boot environment copy of size bytes: CRC32
// (little endian) of the data area, the flags byte if redundant, then the
// data area: "name=value\0" records sorted by name, an empty record, and
// zero fill.
func EncodeUBoot(e Env, size int, redundant bool, flags byte) ([]byte, error) {
	if err := checkVars(e, ""); err != nil {
		return nil, err
	}
	hdr := crcLen
	if redundant {
		hdr++
	}
	buf := make([]byte, size)
	if size < hdr+2 {
		return nil, fmt.Errorf("%w: a %d-byte copy holds nothing", ErrTooLarge, size)
	}
	data := buf[hdr:]
	p := 0
	for _, k := range e.Keys() {
		rec := k + "=" + e[k]
		if p+len(rec)+1 > len(data)-1 { // keep room for the closing NUL
			return nil, fmt.Errorf("%w: %d-byte copy", ErrTooLarge, size)
		}
		p += copy(data[p:], rec)
		data[p] = 0
		p++
	}
	// data[p] is already 0: the empty record that ends the list.
	if redundant {
		buf[crcLen] = flags
	}
	binary.LittleEndian.PutUint32(buf, crc32.ChecksumIEEE(data))
	return buf, nil
}

// DecodeUBoot reads one copy; it returns ErrNoEnv when the CRC does not match.
func DecodeUBoot(b []byte, redundant bool) (Env, byte, error) {
	hdr := crcLen
	if redundant {
		hdr++
	}
	if len(b) < hdr+2 {
		return nil, 0, fmt.Errorf("%w: copy of %d bytes", ErrNoEnv, len(b))
	}
	data := b[hdr:]
	if crc32.ChecksumIEEE(data) != binary.LittleEndian.Uint32(b) {
		return nil, 0, fmt.Errorf("%w: CRC mismatch", ErrNoEnv)
	}
	var flags byte
	if redundant {
		flags = b[crcLen]
	}
	e := Env{}
	for len(data) > 0 && data[0] != 0 {
		i := bytes.IndexByte(data, 0)
		if i < 0 {
			return nil, 0, fmt.Errorf("%w: last record has no terminating NUL", ErrNoEnv)
		}
		rec := string(data[:i])
		data = data[i+1:]
		k, v, ok := cut(rec, '=')
		if !ok || k == "" {
			return nil, 0, fmt.Errorf("%w: record %q has no name=value", ErrNoEnv, rec)
		}
		e[k] = v
	}
	return e, flags, nil
}

func cut(s string, sep byte) (string, string, bool) {
	if i := bytes.IndexByte([]byte(s), sep); i >= 0 {
		return s[:i], s[i+1:], true
	}
	return s, "", false
}

// Location is one environment copy: where on which device, and how big.
type Location struct {
	Dev    Device
	Offset int64
	Size   int
}

func (l Location) read() ([]byte, error) {
	if l.Offset < 0 || l.Offset+int64(l.Size) > l.Dev.Size() {
		return nil, fmt.Errorf("environment copy [%d, %d) outside a %d-byte device", l.Offset, l.Offset+int64(l.Size), l.Dev.Size())
	}
	b := make([]byte, l.Size)
	if _, err := l.Dev.ReadAt(b, l.Offset); err != nil {
		return nil, err
	}
	return b, nil
}

func (l Location) write(b []byte) error {
	if _, err := l.Dev.WriteAt(b, l.Offset); err != nil {
		return err
	}
	return l.Dev.Sync()
}

// Redundant is U-Boot's redundant environment: two copies, each with a flags
// byte counting up; the valid copy with the newer flags is current, and a
// save writes the other one.
type Redundant struct {
	Copies [2]Location
}

// newer reports whether flags a is newer than b, with U-Boot's wrap-around
// rule (255 then 0).
func newer(a, b byte) bool {
	switch {
	case a == 0 && b == 255:
		return true
	case a == 255 && b == 0:
		return false
	}
	return a > b
}

// current returns the index of the current copy, its env and flags.
func (r *Redundant) current() (int, Env, byte, error) {
	var envs [2]Env
	var flags [2]byte
	var errs [2]error
	for i, l := range r.Copies {
		b, err := l.read()
		if err != nil {
			return -1, nil, 0, fmt.Errorf("read environment copy %d: %w", i, err)
		}
		envs[i], flags[i], errs[i] = DecodeUBoot(b, true)
	}
	switch {
	case errs[0] != nil && errs[1] != nil:
		return -1, nil, 0, fmt.Errorf("%w: both redundant copies are invalid (%v; %v)", ErrNoEnv, errs[0], errs[1])
	case errs[0] != nil:
		return 1, envs[1], flags[1], nil
	case errs[1] != nil:
		return 0, envs[0], flags[0], nil
	case newer(flags[1], flags[0]):
		return 1, envs[1], flags[1], nil
	}
	return 0, envs[0], flags[0], nil // newer, or equal flags: U-Boot takes the first
}

func (r *Redundant) Load() (Env, error) {
	_, e, _, err := r.current()
	return e, err
}

func (r *Redundant) Save(e Env) error {
	cur, _, flags, err := r.current()
	next := 0
	switch {
	case errors.Is(err, ErrNoEnv):
		flags = 0
	case err != nil:
		return err
	default:
		next = 1 - cur
	}
	b, err := EncodeUBoot(e, r.Copies[next].Size, true, flags+1)
	if err != nil {
		return err
	}
	return r.Copies[next].write(b)
}

// SingleFile is one U-Boot environment copy that is a whole file (as
// U-Boot's ENV_IS_IN_FAT or ENV_IS_IN_EXT4 keep it). Saves replace the file
// atomically.
type SingleFile struct {
	FS   slot.FS
	Path string
	Size int
}

func (s *SingleFile) Load() (Env, error) {
	b, err := s.FS.ReadFile(s.Path)
	if slot.IsNotExist(err) {
		return nil, fmt.Errorf("%w: %s does not exist", ErrNoEnv, s.Path)
	}
	if err != nil {
		return nil, err
	}
	e, _, err := DecodeUBoot(b, false)
	return e, err
}

func (s *SingleFile) Save(e Env) error {
	b, err := EncodeUBoot(e, s.Size, false, 0)
	if err != nil {
		return err
	}
	return slot.WriteFileAtomic(s.FS, s.Path, b)
}

// SingleRaw is one U-Boot copy on raw storage. Its Save writes in place and
// is NOT power-safe: a cut mid-write leaves a copy whose CRC fails. It exists
// to read and migrate such boards; use Redundant or Pair for A/B variables.
type SingleRaw struct {
	Copy Location
}

func (s *SingleRaw) Load() (Env, error) {
	b, err := s.Copy.read()
	if err != nil {
		return nil, err
	}
	e, _, err := DecodeUBoot(b, false)
	return e, err
}

func (s *SingleRaw) Save(e Env) error {
	b, err := EncodeUBoot(e, s.Copy.Size, false, 0)
	if err != nil {
		return err
	}
	return s.Copy.write(b)
}

// Opener opens an environment device and says whether it is a regular file.
type Opener func(path string) (dev Device, regular bool, err error)

// OpenFwEnvConfig builds a Store from an fw_env.config description. One
// line is a single copy: a whole file replaced atomically when the device is
// a regular file holding exactly the copy, raw (and not power-safe)
// otherwise. Two lines are U-Boot's redundant layout. Relative device paths
// are resolved against dir.
func OpenFwEnvConfig(cfg []ConfigLine, dir string, fsys slot.FS, open Opener) (Store, error) {
	resolve := func(p string) string {
		if filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	locs := make([]Location, len(cfg))
	regular := make([]bool, len(cfg))
	for i, c := range cfg {
		dev, reg, err := open(resolve(c.Device))
		if err != nil {
			return nil, err
		}
		off := c.Offset
		if off < 0 {
			off += dev.Size()
		}
		if off < 0 || off+c.Size > dev.Size() {
			return nil, fmt.Errorf("environment copy %d at [%d, %d) does not fit %s (%d bytes)", i, off, off+c.Size, c.Device, dev.Size())
		}
		locs[i], regular[i] = Location{Dev: dev, Offset: off, Size: int(c.Size)}, reg
	}
	switch len(cfg) {
	case 1:
		if regular[0] && locs[0].Offset == 0 && locs[0].Dev.Size() == cfg[0].Size {
			return &SingleFile{FS: fsys, Path: resolve(cfg[0].Device), Size: int(cfg[0].Size)}, nil
		}
		return &SingleRaw{Copy: locs[0]}, nil
	case 2:
		if locs[0].Size != locs[1].Size {
			return nil, fmt.Errorf("redundant copies of different sizes (%d and %d)", locs[0].Size, locs[1].Size)
		}
		return &Redundant{Copies: [2]Location{locs[0], locs[1]}}, nil
	}
	return nil, fmt.Errorf("fw_env.config has %d environment lines: want 1 or 2", len(cfg))
}
