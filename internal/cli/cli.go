// Package cli holds what fieldpatch's two programs share on the command
// line: flag parsing that accepts flags after arguments, repeatable flags,
// exit codes, progress output, and reading image files. It depends only on
// the shared packages, never on device or server code.
package cli

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// Exit codes, the same for every command of both programs.
const (
	ExitOK       = 0 // success
	ExitRefused  = 1 // the input was judged and refused (invalid image, bad signature...)
	ExitUsage    = 2 // bad command line
	ExitFailure  = 3 // could not do the job (I/O error, unreadable key...)
	ExitCodeHelp = `Exit codes:
  0  success
  1  refused: the image (or other input) was read and found invalid or untrusted
  2  usage: bad command line
  3  failure: the work could not be done (file not found, I/O error, unreadable key)`
)

// Error carries an exit code.
type Error struct {
	Code int
	Err  error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Usagef is a command-line mistake (exit 2).
func Usagef(format string, args ...any) error {
	return &Error{ExitUsage, fmt.Errorf(format, args...)}
}

// Refused wraps a judgement against the input (exit 1).
func Refused(err error) error { return &Error{ExitRefused, err} }

// Failed wraps an error that kept the work from being done (exit 3).
func Failed(err error) error { return &Error{ExitFailure, err} }

// Code returns the exit code for err.
func Code(err error) int {
	if err == nil {
		return ExitOK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	if errors.Is(err, flag.ErrHelp) {
		return ExitOK
	}
	return ExitFailure
}

// Parse parses args with fs, accepting flags before and after positional
// arguments ("inspect FILE --json" as well as "inspect --json FILE"). A
// lone "--" ends flag parsing.
func Parse(fs *flag.FlagSet, args []string) ([]string, error) {
	fs.SetOutput(io.Discard)
	// The flag package prints the usage page itself on --help; here the
	// caller decides (ParseFlags prints it, once).
	usage := fs.Usage
	fs.Usage = func() {}
	defer func() { fs.Usage = usage }()
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, Usagef("%v (see --help)", err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// NewFlags makes a flag set for "PROG NAME" whose --help prints a usage
// page to w: the synopsis, what the command does, its flags and the exit
// codes.
func NewFlags(w io.Writer, prog, name, synopsis, about string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(w, "Usage: %s %s %s\n\n%s\n\nFlags:\n", prog, name, synopsis, about)
		fs.SetOutput(w)
		fs.PrintDefaults()
		fmt.Fprintf(w, "\n%s\n", ExitCodeHelp)
	}
	return fs
}

// ParseFlags is Parse that prints the usage page on --help.
func ParseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	pos, err := Parse(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
	}
	return pos, err
}

// PublicKeys loads trusted public key files (a failure: exit 3).
func PublicKeys(paths []string) ([]crypto.PublicKey, error) {
	var pubs []crypto.PublicKey
	for _, p := range paths {
		k, err := trust.LoadPublicKey(p)
		if err != nil {
			return nil, Failed(err)
		}
		pubs = append(pubs, k)
	}
	return pubs, nil
}

// Strings is a repeatable string flag.
type Strings []string

func (s *Strings) String() string     { return strings.Join(*s, ",") }
func (s *Strings) Set(v string) error { *s = append(*s, v); return nil }

// Uint is an unsigned flag that takes decimal or 0x-prefixed hex, with an
// upper bound; Given says whether it was on the command line.
type Uint struct {
	V     uint64
	Given bool
	Max   uint64
}

func (u *Uint) String() string {
	if u == nil {
		return ""
	}
	return strconv.FormatUint(u.V, 10)
}

// Set implements flag.Value.
func (u *Uint) Set(v string) error {
	n, err := strconv.ParseUint(v, 0, 64)
	if err != nil {
		return fmt.Errorf("%q is not a number (decimal or 0x hex)", v)
	}
	if u.Max != 0 && n > u.Max {
		return fmt.Errorf("%d is larger than %d", n, u.Max)
	}
	u.V, u.Given = n, true
	return nil
}

// UintVar defines a bounded unsigned flag with a default.
func UintVar(fs *flag.FlagSet, u *Uint, name string, def, max uint64, usage string) {
	u.V, u.Max = def, max
	fs.Var(u, name, usage)
}

// Progress returns a callback that reports progress of long work on w when
// w is a terminal and the work is large; otherwise nil.
func Progress(w *os.File, what string, total int64) func(done, total int64) {
	const worthIt = 64 << 20
	if total < worthIt {
		return nil
	}
	if fi, err := w.Stat(); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	start := time.Now()
	last := -1
	return func(done, total int64) {
		pct := int(done * 100 / total)
		if pct == last {
			return
		}
		last = pct
		mib := float64(done) / (1 << 20)
		rate := mib / max(time.Since(start).Seconds(), 1e-3)
		fmt.Fprintf(w, "\r%s: %3d%% %.0f MiB (%.0f MiB/s)", what, pct, mib, rate)
		if done == total {
			fmt.Fprintln(w)
		}
	}
}

// ReadImage reads an image file; malformed input is refused (exit 1), an
// unreadable file a failure (exit 3).
func ReadImage(ctx context.Context, path string, trailer image.TrailerPolicy) (*image.Image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, Failed(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, Failed(err)
	}
	img, err := image.Read(ctx, f, image.ReadOptions{Trailer: trailer, Progress: Progress(os.Stderr, "reading", fi.Size())})
	if err != nil {
		var ie *image.Error
		if errors.As(err, &ie) {
			return nil, Refused(fmt.Errorf("refused: %w", err))
		}
		return nil, Failed(err)
	}
	return img, nil
}

// WriteJSON writes v as indented JSON.
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
