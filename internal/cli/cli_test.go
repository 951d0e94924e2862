package cli

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"reflect"
	"strings"
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

// --help prints the usage page once, and says so with flag.ErrHelp.
func TestHelpPrintedOnce(t *testing.T) {
	for _, help := range []string{"--help", "-h"} {
		var out bytes.Buffer
		fs := NewFlags(&out, "fieldpatch", "thing", "[--n N]", "Does a thing.")
		fs.Int("n", 1, "how many")
		if _, err := ParseFlags(fs, []string{"x", help}); !errors.Is(err, flag.ErrHelp) {
			t.Fatalf("%s: %v", help, err)
		}
		if n := strings.Count(out.String(), "Usage: fieldpatch thing"); n != 1 {
			t.Errorf("%s: the usage page printed %d times:\n%s", help, n, out.String())
		}
		if !strings.Contains(out.String(), "how many") {
			t.Errorf("%s: no flags on the page:\n%s", help, out.String())
		}
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
