package bootenv

import (
	"errors"
	"fmt"
	"strconv"
)

// SeqVar is the variable that orders the two copies of a Pair.
const SeqVar = "fp_seq"

// Pair is fieldpatch's two-copy scheme for U-Boot scripts, whose
// `env import -c` / `env export -c` handle one plain copy (CRC32, no flags
// byte). Each copy is an ordinary single U-Boot copy that fw_printenv reads
// with a one-line fw_env.config; the valid copy with the higher fp_seq is
// current, and a save writes fp_seq+1 into the other copy. docs/BOOTLOADER.md
// has the layout.
type Pair struct {
	Copies [2]Location
}

func seqOf(e Env) uint64 {
	n, err := strconv.ParseUint(e[SeqVar], 0, 64)
	if err != nil {
		return 0
	}
	return n
}

func (p *Pair) current() (int, Env, error) {
	var envs [2]Env
	var errs [2]error
	for i, l := range p.Copies {
		b, err := l.read()
		if err != nil {
			return -1, nil, fmt.Errorf("read environment copy %d: %w", i, err)
		}
		envs[i], _, errs[i] = DecodeUBoot(b, false)
	}
	switch {
	case errs[0] != nil && errs[1] != nil:
		return -1, nil, fmt.Errorf("%w: both copies are invalid (%v; %v)", ErrNoEnv, errs[0], errs[1])
	case errs[0] != nil:
		return 1, envs[1], nil
	case errs[1] != nil:
		return 0, envs[0], nil
	case seqOf(envs[1]) > seqOf(envs[0]):
		return 1, envs[1], nil
	}
	return 0, envs[0], nil
}

// Load returns the current copy's variables, fp_seq included.
func (p *Pair) Load() (Env, error) {
	_, e, err := p.current()
	return e, err
}

// Save writes e, with fp_seq one above the current copy's, into the other copy.
func (p *Pair) Save(e Env) error {
	cur, curEnv, err := p.current()
	next := 0
	var seq uint64
	switch {
	case errors.Is(err, ErrNoEnv):
	case err != nil:
		return err
	default:
		next, seq = 1-cur, seqOf(curEnv)
	}
	out := e.Clone()
	out[SeqVar] = strconv.FormatUint(seq+1, 10)
	b, err := EncodeUBoot(out, p.Copies[next].Size, false, 0)
	if err != nil {
		return err
	}
	return p.Copies[next].write(b)
}
