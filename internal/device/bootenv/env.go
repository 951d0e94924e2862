// Package bootenv reads and writes boot environments: U-Boot's (one copy,
// or two redundant copies with a flags byte, as fw_printenv and fw_setenv
// from libubootenv read and write them), fieldpatch's two-copy scheme for
// U-Boot scripts (two plain copies and a sequence variable), and GRUB's
// 1024-byte environment block (as grub-editenv reads and writes it).
//
// Every Store's Save is ordered so that a power cut at any byte leaves an
// environment that reads as the old values or the new ones, never garbage:
//
//   - redundant U-Boot copies: the copy not in use is written whole and
//     synced; its CRC makes it count only once complete, and its flags byte
//     (one more than the other's) makes it win from then on;
//   - the two-copy script scheme: the same, with fp_seq in place of the
//     flags byte;
//   - a single copy in a file, and the GRUB block: a new file is written,
//     fsynced and renamed over the old one, and the directory fsynced.
//
// A single U-Boot copy on raw storage cannot be written power-safely (a
// torn write leaves a bad CRC and U-Boot falls back to its built-in
// defaults); SingleRaw is provided for reading such boards and says so.
package bootenv

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Env is a set of boot variables.
type Env map[string]string

// Clone returns a copy of e.
func (e Env) Clone() Env {
	c := make(Env, len(e))
	for k, v := range e {
		c[k] = v
	}
	return c
}

// Equal reports whether e and f hold the same variables.
func (e Env) Equal(f Env) bool {
	if len(e) != len(f) {
		return false
	}
	for k, v := range e {
		if w, ok := f[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// Keys returns the variable names, sorted.
func (e Env) Keys() []string {
	keys := make([]string, 0, len(e))
	for k := range e {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func (e Env) String() string {
	var b strings.Builder
	for _, k := range e.Keys() {
		fmt.Fprintf(&b, "%s=%s\n", k, e[k])
	}
	return b.String()
}

// Store is a boot environment on some storage.
type Store interface {
	// Load reads the environment. ErrNoEnv means no valid copy exists
	// (blank or corrupt storage): the caller decides what defaults mean.
	Load() (Env, error)
	// Save replaces the environment with e, power-safely where the layout
	// allows it (see the package comment).
	Save(e Env) error
}

var (
	// ErrNoEnv is returned by Load when no valid copy exists.
	ErrNoEnv = errors.New("no valid boot environment")
	// ErrTooLarge is returned by Save when the variables do not fit.
	ErrTooLarge = errors.New("environment does not fit its storage")
	// ErrBadVariable is returned by Save for a name or value the format
	// cannot hold.
	ErrBadVariable = errors.New("invalid variable")
)

// checkVars validates names and values for a format whose records end at
// the bytes in forbidden. In line-based formats (GRUB) a name may not start
// with '#', which would make its line a comment.
func checkVars(e Env, forbidden string) error {
	for k, v := range e {
		if k == "" || strings.ContainsAny(k, "=\x00"+forbidden) || strings.Contains(forbidden, "\n") && k[0] == '#' {
			return fmt.Errorf("%w: name %q", ErrBadVariable, k)
		}
		if strings.ContainsRune(v, 0) {
			return fmt.Errorf("%w: value of %s holds a NUL byte", ErrBadVariable, k)
		}
	}
	return nil
}
