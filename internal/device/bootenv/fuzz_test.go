package bootenv

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzDecodeUBoot: any bytes, never a panic; whatever decodes re-encodes to
// an environment that decodes the same.
func FuzzDecodeUBoot(f *testing.F) {
	for _, red := range []bool{false, true} {
		b, _ := EncodeUBoot(abState(3), 128, red, 7)
		f.Add(b, red)
	}
	f.Add([]byte{}, false)
	f.Add(make([]byte, 64), true)
	f.Fuzz(func(t *testing.T, b []byte, redundant bool) {
		e, flags, err := DecodeUBoot(b, redundant)
		if err != nil {
			if !errors.Is(err, ErrNoEnv) {
				t.Fatalf("error %v is not ErrNoEnv", err)
			}
			return
		}
		again, err := EncodeUBoot(e, len(b), redundant, flags)
		if err != nil {
			t.Fatalf("decoded %v does not re-encode: %v", e, err)
		}
		e2, flags2, err := DecodeUBoot(again, redundant)
		if err != nil || !e2.Equal(e) || flags2 != flags {
			t.Fatalf("round trip: %v %d %v, want %v %d", e2, flags2, err, e, flags)
		}
	})
}

// FuzzDecodeGRUB: the same for GRUB blocks. The fuzzer's input is the
// block's text before its '#' fill (the fuzzer stalls on KiB-sized inputs);
// the test pads it to a whole block.
func FuzzDecodeGRUB(f *testing.F) {
	b, _ := EncodeGRUB(Env{"a": `x\y`, "b": "l1\nl2", "fp_active": "a"}, GRUBBlockSize)
	f.Add(bytes.TrimRight(b, "#"))
	f.Add([]byte(grubHeader))
	f.Fuzz(func(t *testing.T, text []byte) {
		b := text
		if len(b) < GRUBBlockSize {
			b = append(bytes.Clone(b), bytes.Repeat([]byte{'#'}, GRUBBlockSize-len(b))...)
		}
		e, err := DecodeGRUB(b)
		if err != nil {
			if !errors.Is(err, ErrNoEnv) {
				t.Fatalf("error %v is not ErrNoEnv", err)
			}
			return
		}
		again, err := EncodeGRUB(e, len(b))
		if errors.Is(err, ErrTooLarge) {
			return // ours adds the warning comment the input may lack
		}
		if err != nil {
			t.Fatalf("decoded %v does not re-encode: %v", e, err)
		}
		if e2, err := DecodeGRUB(again); err != nil || !e2.Equal(e) {
			t.Fatalf("round trip: %v %v, want %v", e2, err, e)
		}
	})
}
