package image

import (
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"strings"
)

// NamespaceDNS is RFC 4122's DNS namespace, which imgtool uses to turn a
// vendor name into the vendor UUID.
var NamespaceDNS = [16]byte{0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30, 0xc8}

// NameUUID is the RFC 4122 version 5 (SHA-1, name-based) UUID of name in ns.
func NameUUID(ns [16]byte, name string) [16]byte {
	h := sha1.New()
	h.Write(ns[:])
	h.Write([]byte(name))
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = u[6]&0x0f | 0x50
	u[8] = u[8]&0x3f | 0x80
	return u
}

// ParseUUIDOrName reads a UUID written as 8-4-4-4-12 or 32 hex digits; any
// other non-empty string is a name, turned into NameUUID(ns, s). This is how
// imgtool reads --vid (namespace DNS) and --cid (namespace: the vendor UUID).
func ParseUUIDOrName(s string, ns [16]byte) ([16]byte, error) {
	var u [16]byte
	if s == "" {
		return u, fmt.Errorf("empty UUID or name")
	}
	h := strings.ReplaceAll(s, "-", "")
	if len(h) == 32 && (len(s) == 32 || len(s) == 36 && s[8] == '-' && s[13] == '-' && s[18] == '-' && s[23] == '-') {
		if _, err := hex.Decode(u[:], []byte(h)); err == nil {
			return u, nil
		}
	}
	for _, c := range s {
		if c < 0x20 || c > 0x7e {
			return u, fmt.Errorf("name %q: printable ASCII only", s)
		}
	}
	return NameUUID(ns, s), nil
}
