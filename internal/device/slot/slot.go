// Package slot is the device's storage: A/B slots and raw areas (such as a
// redundant U-Boot environment) as a Device, and files on the data partition
// as an FS. Each has a real implementation over the operating system and an
// in-memory model for simulation that can cut power at any write:
//
//   - OpenDevice opens a regular file or a block device through the same code.
//   - Flash models raw storage: a power cut at a chosen write call or byte
//     stops every byte after it from landing, and can tear the page being
//     programmed.
//   - OSFS is the real file system; MemFS models one whose writes are
//     volatile until fsync, and whose creates and renames are volatile until
//     the directory is fsynced. A power cut throws away whatever was volatile.
//
// The agent and the fleet simulator use the same interfaces, so every
// crash-safety claim is tested against the model with cuts at every point.
package slot

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// Device is storage addressed by offset: a slot or a raw environment area.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable.
	Sync() error
	// Size is the device's capacity in bytes.
	Size() int64
}

// ErrPowerCut is returned by the models for every operation after a power
// cut, until the model is powered on again.
var ErrPowerCut = errors.New("power cut")

// FileDevice is a Device over a regular file or a block device.
type FileDevice struct {
	f    *os.File
	size int64
}

// OpenDevice opens path for reading and writing (or reading only). A block
// device's size is found by seeking to its end, a regular file's by stat.
func OpenDevice(path string, readOnly bool) (*FileDevice, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	var size int64
	switch {
	case fi.Mode().IsRegular():
		size = fi.Size()
	case fi.Mode()&os.ModeDevice != 0:
		size, err = f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: size of block device: %w", path, err)
		}
	default:
		f.Close()
		return nil, fmt.Errorf("%s is neither a regular file nor a block device", path)
	}
	return &FileDevice{f: f, size: size}, nil
}

func (d *FileDevice) ReadAt(p []byte, off int64) (int, error) { return d.f.ReadAt(p, off) }

// WriteAt refuses writes past the device's size: a slot never grows.
func (d *FileDevice) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, fmt.Errorf("write of %d bytes at %d past the end of %s (%d bytes)", len(p), off, d.f.Name(), d.size)
	}
	return d.f.WriteAt(p, off)
}

func (d *FileDevice) Sync() error  { return d.f.Sync() }
func (d *FileDevice) Size() int64  { return d.size }
func (d *FileDevice) Close() error { return d.f.Close() }
func (d *FileDevice) Name() string { return d.f.Name() }

// Reader returns a reader over the whole device, for streaming an image out
// of a slot.
func Reader(d Device) io.Reader { return io.NewSectionReader(d, 0, d.Size()) }
