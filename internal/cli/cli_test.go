package cli

import (
	"errors"
	"flag"
	"fmt"
	"reflect"
	"testing"
)

func TestParseInterspersed(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	j := fs.Bool("json", false, "")
	var keys Strings
	fs.Var(&keys, "key", "")
	pos, err := Parse(fs, []string{"a.img", "--json", "--key", "k1", "b.img", "--key=k2", "--", "--c"})
	if err != nil {
		t.Fatal(err)
	}
	if !*j || !reflect.DeepEqual([]string(keys), []string{"k1", "k2"}) || !reflect.DeepEqual(pos, []string{"a.img", "b.img", "--c"}) {
		t.Errorf("json=%v keys=%v pos=%v", *j, keys, pos)
	}
	if _, err := Parse(flag.NewFlagSet("y", flag.ContinueOnError), []string{"--nope"}); Code(err) != ExitUsage {
		t.Errorf("unknown flag: code %d (%v)", Code(err), err)
	}
}

func TestUint(t *testing.T) {
	var u Uint
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	UintVar(fs, &u, "n", 7, 0xffff, "")
	if u.V != 7 || u.Given {
		t.Fatalf("default: %+v", u)
	}
	for in, want := range map[string]uint64{"0x200": 512, "10": 10, "0": 0} {
		if err := u.Set(in); err != nil || u.V != want || !u.Given {
			t.Errorf("Set(%q) = %v, %d", in, err, u.V)
		}
	}
	for _, bad := range []string{"-1", "0x10000", "ten", ""} {
		if err := u.Set(bad); err == nil {
			t.Errorf("Set(%q) accepted", bad)
		}
	}
}

func TestCode(t *testing.T) {
	base := errors.New("x")
	for err, want := range map[error]int{
		nil:                                   ExitOK,
		Refused(base):                         ExitRefused,
		Usagef("bad"):                         ExitUsage,
		Failed(base):                          ExitFailure,
		base:                                  ExitFailure,
		fmt.Errorf("wrap: %w", Refused(base)): ExitRefused,
		flag.ErrHelp:                          ExitOK,
	} {
		if got := Code(err); got != want {
			t.Errorf("Code(%v) = %d, want %d", err, got, want)
		}
	}
}
