package boot

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// Config describes a device's boot side; it is the boot half of the agent's
// config file (agent.LoadConfig reads it). Relative paths are resolved
// against the file's directory (SetBase).
//
//	{
//	  "slots": {"a": "/dev/mmcblk0p2", "b": "/dev/mmcblk0p3"},
//	  "env": {"type": "uboot", "fw_env_config": "/etc/fw_env.config"},
//	  "keys": [{"path": "/etc/fieldpatch/release.pub.pem"},
//	           {"path": "/etc/fieldpatch/old.pub.pem", "revoked_at_epoch": 1}],
//	  "nv": "/var/lib/fieldpatch/nv",
//	  "hw_class": "smartlock-v2"
//	}
type Config struct {
	// Slots maps "a" and "b" to a block device or an image file.
	Slots map[string]string `json:"slots"`
	// Env says where the boot environment lives.
	Env EnvConfig `json:"env"`
	// Keys are the image-signing public keys the device trusts.
	Keys []KeyConfig `json:"keys"`
	// KeysFile, if it exists, holds more trusted image keys, learned from
	// signed TUF metadata (the agent writes it; default
	// STATE_DIR/tuf/image-keys.json). A file that cannot be read adds
	// nothing: the keys above still count.
	KeysFile string `json:"keys_file,omitempty"`
	// NV is the file standing in for OTP/eFuse storage.
	NV string `json:"nv"`
	// HWClass, if set, refuses images built for other hardware.
	HWClass string `json:"hw_class,omitempty"`

	dir string
}

// EnvConfig locates the boot environment.
type EnvConfig struct {
	// Type is "uboot" (fw_env.config: one copy or redundant copies),
	// "uboot-pair" (fieldpatch's two-copy scheme for U-Boot scripts) or
	// "grub" (a GRUB environment block file).
	Type string `json:"type"`
	// FwEnvConfig is the fw_env.config file, for "uboot".
	FwEnvConfig string `json:"fw_env_config,omitempty"`
	// Device, Offsets and Size place the two copies, for "uboot-pair".
	Device  string   `json:"device,omitempty"`
	Offsets [2]int64 `json:"offsets,omitempty"`
	Size    int      `json:"size,omitempty"`
	// Path is the block file, for "grub".
	Path string `json:"path,omitempty"`
}

// KeyConfig is a trusted public key file and the key epoch that revokes it.
type KeyConfig struct {
	Path           string `json:"path"`
	RevokedAtEpoch uint32 `json:"revoked_at_epoch,omitempty"`
}

// Validate checks that the config is complete.
func (c *Config) Validate() error {
	var errs []error
	for _, s := range Slots {
		if c.Slots[s] == "" {
			errs = append(errs, fmt.Errorf("slots.%s is missing", s))
		}
	}
	for name := range c.Slots {
		if name != "a" && name != "b" {
			errs = append(errs, fmt.Errorf("slot %q: slots are named a and b", name))
		}
	}
	switch c.Env.Type {
	case "uboot":
		if c.Env.FwEnvConfig == "" {
			errs = append(errs, errors.New("env.fw_env_config is required for type uboot"))
		}
	case "uboot-pair":
		if c.Env.Device == "" || c.Env.Size <= 0 || c.Env.Offsets[0] == c.Env.Offsets[1] {
			errs = append(errs, errors.New("env.device, env.offsets (two different) and env.size are required for type uboot-pair"))
		}
	case "grub":
		if c.Env.Path == "" {
			errs = append(errs, errors.New("env.path is required for type grub"))
		}
	default:
		errs = append(errs, fmt.Errorf("env.type %q: want uboot, uboot-pair or grub", c.Env.Type))
	}
	if len(c.Keys) == 0 {
		errs = append(errs, errors.New("keys: at least one trusted public key is required"))
	}
	if c.NV == "" {
		errs = append(errs, errors.New("nv is required"))
	}
	return errors.Join(errs...)
}

// SetBase sets the directory that relative paths are resolved against (the
// config file's).
func (c *Config) SetBase(dir string) { c.dir = dir }

// Path resolves a path from the config against its base directory.
func (c *Config) Path(p string) string { return c.path(p) }

func (c *Config) path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.dir, p)
}

// Open opens the devices and files the config names. readOnly opens them
// for reading only (and an environment that refuses saves), for a dry run.
func (c *Config) Open(readOnly bool) (Device, func(), error) {
	var closers []io.Closer
	closeAll := func() {
		for _, cl := range closers {
			cl.Close()
		}
	}
	openDev := func(p string) (*slot.FileDevice, error) {
		d, err := slot.OpenDevice(c.path(p), readOnly)
		if err != nil {
			return nil, err
		}
		closers = append(closers, d)
		return d, nil
	}
	dev := Device{Slots: map[string]slot.Device{}, HWClass: c.HWClass, NV: c.NVStore()}
	fail := func(err error) (Device, func(), error) {
		closeAll()
		return Device{}, nil, err
	}
	for name, p := range c.Slots {
		d, err := openDev(p)
		if err != nil {
			return fail(fmt.Errorf("slot %s: %w", name, err))
		}
		dev.Slots[name] = d
	}
	for _, k := range c.Keys {
		pub, err := trust.LoadPublicKey(c.path(k.Path))
		if err != nil {
			return fail(err)
		}
		dev.Keys = append(dev.Keys, TrustedKey{Key: pub, RevokedAtEpoch: k.RevokedAtEpoch, Name: k.Path})
	}
	if c.KeysFile != "" {
		more, _ := LoadKeysFile(c.path(c.KeysFile))
		dev.Keys = MergeKeys(dev.Keys, more)
	}
	switch c.Env.Type {
	case "uboot":
		cfgPath := c.path(c.Env.FwEnvConfig)
		lines, err := bootenv.LoadConfig(cfgPath)
		if err != nil {
			return fail(err)
		}
		st, err := bootenv.OpenFwEnvConfig(lines, filepath.Dir(cfgPath), slot.OSFS{}, func(p string) (bootenv.Device, bool, error) {
			d, err := openDev(p)
			if err != nil {
				return nil, false, err
			}
			fi, err := os.Stat(p)
			return d, err == nil && fi.Mode().IsRegular(), err
		})
		if err != nil {
			return fail(err)
		}
		dev.Env = st
	case "uboot-pair":
		d, err := openDev(c.Env.Device)
		if err != nil {
			return fail(err)
		}
		dev.Env = &bootenv.Pair{Copies: [2]bootenv.Location{
			{Dev: d, Offset: c.Env.Offsets[0], Size: c.Env.Size},
			{Dev: d, Offset: c.Env.Offsets[1], Size: c.Env.Size},
		}}
	case "grub":
		dev.Env = &bootenv.GRUBFile{FS: slot.OSFS{}, Path: c.path(c.Env.Path)}
	}
	if readOnly {
		dev.Env = readOnlyEnv{dev.Env}
	}
	return dev, closeAll, nil
}

// NVStore is the config's non-volatile store.
func (c *Config) NVStore() *NVFile {
	return &NVFile{FS: slot.OSFS{}, Path: c.path(c.NV)}
}

// readOnlyEnv loads but never saves, for dry runs.
type readOnlyEnv struct{ bootenv.Store }

func (readOnlyEnv) Save(bootenv.Env) error { return nil }

// KeysFile is the document of image keys learned from signed metadata.
type KeysFile struct {
	Keys []struct {
		PEM            string `json:"pem"`
		RevokedAtEpoch uint32 `json:"revoked_at_epoch,omitempty"`
	} `json:"keys"`
}

// LoadKeysFile reads image keys learned from signed metadata; a missing
// file is no keys.
func LoadKeysFile(path string) ([]TrustedKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var f KeysFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out []TrustedKey
	for i, k := range f.Keys {
		pub, err := trust.ParsePublicKeyPEM([]byte(k.PEM))
		if err != nil {
			return nil, fmt.Errorf("%s: key %d: %w", path, i+1, err)
		}
		out = append(out, TrustedKey{Key: pub, RevokedAtEpoch: k.RevokedAtEpoch, Name: fmt.Sprintf("%s#%d", filepath.Base(path), i+1)})
	}
	return out, nil
}

// MergeKeys adds learned keys to a device's own: a key both lists is one
// key, revoked at the lower non-zero epoch of the two (so signed metadata
// can revoke a key the device was built with, but never un-revoke one).
func MergeKeys(own, learned []TrustedKey) []TrustedKey {
	out := append([]TrustedKey(nil), own...)
	for _, l := range learned {
		lb, err := x509.MarshalPKIXPublicKey(l.Key)
		if err != nil {
			continue
		}
		found := false
		for i := range out {
			ob, err := x509.MarshalPKIXPublicKey(out[i].Key)
			if err != nil || !bytes.Equal(ob, lb) {
				continue
			}
			found = true
			if r := l.RevokedAtEpoch; r != 0 && (out[i].RevokedAtEpoch == 0 || r < out[i].RevokedAtEpoch) {
				out[i].RevokedAtEpoch = r
			}
		}
		if !found {
			out = append(out, l)
		}
	}
	return out
}
