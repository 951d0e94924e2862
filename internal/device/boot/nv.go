package boot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

// NVState is what the device keeps in non-volatile, only-increasing storage
// (OTP or eFuses on real hardware): the anti-rollback security counter and
// the key epoch.
type NVState struct {
	Counter  uint32 // images with a lower security counter never boot
	KeyEpoch uint32 // keys revoked at or below this epoch are no longer trusted
}

var (
	// ErrNVMissing: the store does not exist.
	ErrNVMissing = errors.New("non-volatile store missing")
	// ErrNVCorrupt: the store exists but cannot be trusted.
	ErrNVCorrupt = errors.New("non-volatile store corrupt")
	// ErrNVLower: a write would lower a value, which the store never does.
	ErrNVLower = errors.New("non-volatile values only increase")
)

// NVFile is a file standing in for OTP/eFuse storage. Its record is 20
// bytes: magic "FPNV", version 1, counter, key epoch and a CRC32 of the
// preceding 16 bytes, all little endian. Writes replace the file atomically
// and never lower a value.
type NVFile struct {
	FS   slot.FS
	Path string
}

const (
	nvMagic   = "FPNV"
	nvVersion = 1
	nvLen     = 20
)

func encodeNV(s NVState) []byte {
	b := make([]byte, 0, nvLen)
	b = append(b, nvMagic...)
	b = binary.LittleEndian.AppendUint32(b, nvVersion)
	b = binary.LittleEndian.AppendUint32(b, s.Counter)
	b = binary.LittleEndian.AppendUint32(b, s.KeyEpoch)
	return binary.LittleEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
}

// Load reads the store.
func (n *NVFile) Load() (NVState, error) {
	b, err := n.FS.ReadFile(n.Path)
	if slot.IsNotExist(err) {
		return NVState{}, fmt.Errorf("%w: %s", ErrNVMissing, n.Path)
	}
	if err != nil {
		return NVState{}, fmt.Errorf("%w: %v", ErrNVCorrupt, err)
	}
	if len(b) != nvLen || string(b[:4]) != nvMagic || binary.LittleEndian.Uint32(b[4:]) != nvVersion ||
		crc32.ChecksumIEEE(b[:16]) != binary.LittleEndian.Uint32(b[16:]) {
		return NVState{}, fmt.Errorf("%w: %s (%d bytes, bad magic, version or CRC)", ErrNVCorrupt, n.Path, len(b))
	}
	return NVState{Counter: binary.LittleEndian.Uint32(b[8:]), KeyEpoch: binary.LittleEndian.Uint32(b[12:])}, nil
}

// Init creates the store for a new device (provisioning). It refuses to
// overwrite a readable store with lower values.
func (n *NVFile) Init(s NVState) error {
	if cur, err := n.Load(); err == nil && (s.Counter < cur.Counter || s.KeyEpoch < cur.KeyEpoch) {
		return fmt.Errorf("%w: store holds counter %d epoch %d", ErrNVLower, cur.Counter, cur.KeyEpoch)
	}
	return slot.WriteFileAtomic(n.FS, n.Path, encodeNV(s))
}

// Raise sets the counter and epoch to at least the given values (the agent
// does this at commit). Asking for lower values than stored is an error and
// changes nothing.
func (n *NVFile) Raise(s NVState) (NVState, error) {
	cur, err := n.Load()
	if err != nil {
		return NVState{}, err
	}
	if s.Counter < cur.Counter || s.KeyEpoch < cur.KeyEpoch {
		return cur, fmt.Errorf("%w: store holds counter %d epoch %d, asked for %d and %d", ErrNVLower, cur.Counter, cur.KeyEpoch, s.Counter, s.KeyEpoch)
	}
	if s == cur {
		return cur, nil
	}
	return s, slot.WriteFileAtomic(n.FS, n.Path, encodeNV(s))
}
