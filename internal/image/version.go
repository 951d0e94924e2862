package image

import (
	"fmt"
	"strconv"
	"strings"
)

// SemVer is a semantic version (semver.org 2.0.0).
type SemVer struct {
	Major, Minor, Patch uint64
	Pre                 []string // dot-separated pre-release identifiers
	Build               string   // build metadata, not part of precedence
}

// ParseSemVer parses MAJOR.MINOR.PATCH[-PRE][+BUILD]. For compatibility with
// MCUboot's imgtool, MAJOR and MAJOR.MINOR are accepted too and mean .0.
func ParseSemVer(s string) (SemVer, error) {
	var v SemVer
	orig := s
	if s == "" {
		return v, fmt.Errorf("empty version")
	}
	if i := strings.IndexByte(s, '+'); i >= 0 {
		v.Build = s[i+1:]
		s = s[:i]
		if err := checkIdents(v.Build, false); err != nil {
			return SemVer{}, fmt.Errorf("version %q: build metadata: %w", orig, err)
		}
	}
	if i := strings.IndexByte(s, '-'); i >= 0 {
		pre := s[i+1:]
		s = s[:i]
		if err := checkIdents(pre, true); err != nil {
			return SemVer{}, fmt.Errorf("version %q: pre-release: %w", orig, err)
		}
		v.Pre = strings.Split(pre, ".")
	}
	parts := strings.Split(s, ".")
	if len(parts) > 3 {
		return SemVer{}, fmt.Errorf("version %q: want MAJOR.MINOR.PATCH", orig)
	}
	nums := []*uint64{&v.Major, &v.Minor, &v.Patch}
	for i, p := range parts {
		if !isNumeric(p) || (len(p) > 1 && p[0] == '0') {
			return SemVer{}, fmt.Errorf("version %q: %q is not a number without leading zeros", orig, p)
		}
		n, err := strconv.ParseUint(p, 10, 64)
		if err != nil {
			return SemVer{}, fmt.Errorf("version %q: %w", orig, err)
		}
		*nums[i] = n
	}
	return v, nil
}

func isNumeric(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func checkIdents(s string, noLeadingZero bool) error {
	for _, id := range strings.Split(s, ".") {
		if id == "" {
			return fmt.Errorf("empty identifier")
		}
		for i := 0; i < len(id); i++ {
			c := id[i]
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-') {
				return fmt.Errorf("identifier %q has a character outside [0-9A-Za-z-]", id)
			}
		}
		if noLeadingZero && isNumeric(id) && len(id) > 1 && id[0] == '0' {
			return fmt.Errorf("numeric identifier %q has a leading zero", id)
		}
	}
	return nil
}

func (v SemVer) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch)
	if len(v.Pre) > 0 {
		s += "-" + strings.Join(v.Pre, ".")
	}
	if v.Build != "" {
		s += "+" + v.Build
	}
	return s
}

// Compare orders versions by semver precedence: -1, 0 or +1. Build metadata
// does not count.
func (v SemVer) Compare(w SemVer) int {
	for _, c := range [][2]uint64{{v.Major, w.Major}, {v.Minor, w.Minor}, {v.Patch, w.Patch}} {
		if c[0] != c[1] {
			if c[0] < c[1] {
				return -1
			}
			return 1
		}
	}
	switch {
	case len(v.Pre) == 0 && len(w.Pre) == 0:
		return 0
	case len(v.Pre) == 0:
		return 1 // a release outranks its pre-releases
	case len(w.Pre) == 0:
		return -1
	}
	for i := 0; i < len(v.Pre) && i < len(w.Pre); i++ {
		a, b := v.Pre[i], w.Pre[i]
		if a == b {
			continue
		}
		an, bn := isNumeric(a), isNumeric(b)
		switch {
		case an && bn:
			x, _ := strconv.ParseUint(a, 10, 64)
			y, _ := strconv.ParseUint(b, 10, 64)
			if x < y {
				return -1
			}
			return 1
		case an:
			return -1
		case bn:
			return 1
		case a < b:
			return -1
		default:
			return 1
		}
	}
	switch {
	case len(v.Pre) < len(w.Pre):
		return -1
	case len(v.Pre) > len(w.Pre):
		return 1
	}
	return 0
}

// HeaderVersion maps a semantic version onto the MCUboot header field:
// major and minor must fit a byte and patch 16 bits; a purely numeric build
// metadata becomes the build number (it must fit 32 bits), anything else
// gives build 0 (the full string travels in the FP_SEMVER TLV).
func (v SemVer) HeaderVersion() (Version, error) {
	if v.Major > 0xff || v.Minor > 0xff || v.Patch > 0xffff {
		return Version{}, fmt.Errorf("version %s does not fit the MCUboot header (major and minor at most 255, patch at most 65535)", v)
	}
	hv := Version{Major: uint8(v.Major), Minor: uint8(v.Minor), Revision: uint16(v.Patch)}
	if isNumeric(v.Build) {
		n, err := strconv.ParseUint(v.Build, 10, 32)
		if err != nil {
			return Version{}, fmt.Errorf("version %s: build number does not fit 32 bits", v)
		}
		hv.Build = uint32(n)
	}
	return hv, nil
}

// plainMCUboot reports whether the header version says all there is to say
// about v (no pre-release, build absent or numeric).
func (v SemVer) plainMCUboot() bool {
	return len(v.Pre) == 0 && (v.Build == "" || isNumeric(v.Build))
}
