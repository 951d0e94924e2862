package image_test

import (
	"bytes"
	"context"
	"crypto"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/image"
)

// baseImage builds a fieldpatch image signed with the test Ed25519 key.
func baseImage(t testing.TB) []byte {
	t.Helper()
	payload := readFile(t, filepath.Join("testdata", "mcuboot", "payload.bin"))
	sc := uint32(3)
	var out bytes.Buffer
	_, err := image.Build(context.Background(), &out, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
		Version:         "1.4.0",
		SecurityCounter: &sc,
		HWClass:         "smartlock-v2",
		HeaderSize:      0x200,
		Signers:         []crypto.Signer{privKey(t, filepath.Join("testdata", "mcuboot", "ed25519.pem"))},
	})
	if err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func readVerify(t testing.TB, data []byte, keys ...crypto.PublicKey) (*image.Image, error) {
	t.Helper()
	if len(keys) == 0 {
		keys = []crypto.PublicKey{pubKey(t, edPub)}
	}
	img, _, err := image.ReadVerify(context.Background(), bytes.NewReader(data), keys, image.ReadOptions{})
	return img, err
}

// layout finds the regions of a well-formed image.
type layout struct {
	prot, unprot, end int // offsets
	secCnt, hwClass   int // offsets of TLV headers in the protected area
	sha, keyHash, sig int // offsets of TLV headers in the unprotected area
}

func layoutOf(t testing.TB, data []byte) layout {
	t.Helper()
	img, err := readVerify(t, data)
	if err != nil {
		t.Fatalf("base image does not verify: %v", err)
	}
	l := layout{
		prot:   int(img.SignedLen) - int(img.Header.ProtectedTLVSize),
		unprot: int(img.SignedLen),
		end:    int(img.Len),
	}
	for _, tlv := range append(img.Protected, img.Unprotected...) {
		switch tlv.Type {
		case image.TLVSecCounter:
			l.secCnt = int(tlv.Offset)
		case image.TLVHWClass:
			l.hwClass = int(tlv.Offset)
		case image.TLVSHA256:
			l.sha = int(tlv.Offset)
		case image.TLVKeyHash:
			l.keyHash = int(tlv.Offset)
		case image.TLVEd25519:
			l.sig = int(tlv.Offset)
		}
	}
	return l
}

// The tamper table: each alteration gets its own error, naming the region
// and the offset where it was found. Nothing panics, nothing verifies.
func TestTamperTable(t *testing.T) {
	base := baseImage(t)
	l := layoutOf(t, base)
	le := binary.LittleEndian
	type tc struct {
		name   string
		mutate func(b []byte) []byte
		err    error
		region image.Region
		offset int // -1: do not check
		keys   []crypto.PublicKey
	}
	flip := func(off int) func([]byte) []byte {
		return func(b []byte) []byte { b[off] ^= 0x40; return b }
	}
	cut := func(n int) func([]byte) []byte { return func(b []byte) []byte { return b[:n] } }
	put16 := func(off int, v uint16) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint16(b[off:], v); return b }
	}
	put32 := func(off int, v uint32) func([]byte) []byte {
		return func(b []byte) []byte { le.PutUint32(b[off:], v); return b }
	}
	appendBytes := func(extra []byte) func([]byte) []byte {
		return func(b []byte) []byte { return append(b, extra...) }
	}
	cases := []tc{
		// Header.
		{"header magic", flip(1), image.ErrBadMagic, image.RegionHeader, 0, nil},
		{"header load address", flip(4), image.ErrHashMismatch, image.RegionUnprotected, l.sha, nil},
		{"header version vs signed semver", flip(20), image.ErrBadTLV, image.RegionProtected, -1, nil},
		{"header padding byte", flip(0x100), image.ErrHashMismatch, image.RegionUnprotected, l.sha, nil},
		{"header size below 32", put16(8, 16), image.ErrSizeOverflow, image.RegionHeader, 8, nil},
		{"header image size one more", put32(12, 4097), image.ErrBadMagic, image.RegionProtected, l.prot + 1, nil},
		{"header image size overflows", put32(12, 0xffffff00), image.ErrSizeOverflow, image.RegionHeader, 12, nil},
		{"header protected size too large", put16(10, 0xfff0), image.ErrTruncated, image.RegionProtected, -1, nil},
		{"header protected size too small", put16(10, 6), image.ErrSizeOverflow, image.RegionHeader, 10, nil},
		{"header protected size zero", put16(10, 0), image.ErrBadTLV, image.RegionUnprotected, l.prot, nil},
		{"header flags encrypted", put32(16, image.FlagEncryptedAES128), image.ErrUnsupported, image.RegionHeader, 16, nil},
		{"header flags unknown", put32(16, 0x80000000), image.ErrUnsupported, image.RegionHeader, 16, nil},
		// Payload.
		{"payload first byte", flip(0x200), image.ErrHashMismatch, image.RegionUnprotected, l.sha, nil},
		{"payload last byte", flip(l.prot - 1), image.ErrHashMismatch, image.RegionUnprotected, l.sha, nil},
		// Protected TLVs.
		{"protected info magic", flip(l.prot), image.ErrBadMagic, image.RegionProtected, l.prot, nil},
		{"protected info total", flip(l.prot + 2), image.ErrBadTLV, image.RegionProtected, l.prot + 2, nil},
		{"protected security counter value", flip(l.secCnt + 4), image.ErrHashMismatch, image.RegionUnprotected, l.sha, nil},
		{"protected TLV length overruns", put16(l.secCnt+2, 0x0100), image.ErrTLVOverrun, image.RegionProtected, l.secCnt, nil},
		{"protected TLV length wrong", put16(l.secCnt+2, 2), image.ErrBadTLV, image.RegionProtected, l.secCnt, nil},
		{"protected TLV type unknown", put16(l.secCnt, 0x4699), image.ErrUnknownTLV, image.RegionProtected, l.secCnt, nil},
		{"protected TLV type unsupported", put16(l.secCnt, 0x70), image.ErrUnsupported, image.RegionProtected, l.secCnt, nil},
		{"protected TLV of the unprotected kind", put16(l.secCnt, 0x10), image.ErrBadTLV, image.RegionProtected, l.secCnt, nil},
		{"protected hardware class invalid", func(b []byte) []byte { b[l.hwClass+4] = '/'; return b }, image.ErrBadTLV, image.RegionProtected, l.hwClass, nil},
		// Unprotected TLVs.
		{"unprotected info magic", flip(l.unprot), image.ErrBadMagic, image.RegionUnprotected, l.unprot, nil},
		{"unprotected info total too large", put16(l.unprot+2, 0x4000), image.ErrTruncated, image.RegionUnprotected, -1, nil},
		{"unprotected info total too small", put16(l.unprot+2, 4), image.ErrTLVOverrun, image.RegionUnprotected, l.unprot + 2, nil},
		{"SHA256 TLV value", flip(l.sha + 4), image.ErrHashMismatch, image.RegionUnprotected, l.sha, nil},
		{"SHA256 TLV type unknown", put16(l.sha, 0x13), image.ErrUnknownTLV, image.RegionUnprotected, l.sha, nil},
		{"SHA256 TLV type of the protected kind", put16(l.sha, 0x50), image.ErrBadTLV, image.RegionUnprotected, l.sha, nil},
		{"SHA256 TLV length overruns", put16(l.sha+2, 0x200), image.ErrTLVOverrun, image.RegionUnprotected, l.sha, nil},
		{"key hash", flip(l.keyHash + 4), image.ErrUntrusted, image.RegionUnprotected, l.unprot, nil},
		{"signature first byte", flip(l.sig + 4), image.ErrBadSignature, image.RegionUnprotected, l.sig, nil},
		{"signature last byte", flip(l.end - 1), image.ErrBadSignature, image.RegionUnprotected, l.sig, nil},
		{"signature length", put16(l.sig+2, 63), image.ErrBadTLV, image.RegionUnprotected, l.sig, nil},
		// Truncation inside each region.
		{"truncated in the fixed header", cut(20), image.ErrTruncated, image.RegionHeader, 20, nil},
		{"truncated in the header padding", cut(0x100), image.ErrTruncated, image.RegionHeader, 0x100, nil},
		{"truncated in the payload", cut(0x800), image.ErrTruncated, image.RegionPayload, 0x800, nil},
		{"truncated in the protected TLVs", cut(l.prot + 6), image.ErrTruncated, image.RegionProtected, l.prot + 6, nil},
		{"truncated before the unprotected TLVs", cut(l.unprot), image.ErrTruncated, image.RegionUnprotected, l.unprot, nil},
		{"truncated in the signature", cut(l.end - 10), image.ErrTruncated, image.RegionUnprotected, l.end - 10, nil},
		// Trailing bytes.
		{"trailing garbage", appendBytes([]byte("hello")), image.ErrTrailingBytes, image.RegionTrailer, l.end, nil},
		{"trailing erased fill without a trailer", appendBytes(bytes.Repeat([]byte{0xff}, 4096)), image.ErrTrailingBytes, image.RegionTrailer, l.end, nil},
		{"trailing zero byte", appendBytes([]byte{0}), image.ErrTrailingBytes, image.RegionTrailer, l.end, nil},
		// Keys.
		{"wrong key", func(b []byte) []byte { return b }, image.ErrUntrusted, image.RegionUnprotected, l.unprot, []crypto.PublicKey{pubKey(t, p256P)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := c.mutate(bytes.Clone(base))
			_, err := readVerify(t, data, c.keys...)
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, c.err) {
				t.Fatalf("got %v, want %v", err, c.err)
			}
			var ie *image.Error
			if !errors.As(err, &ie) {
				t.Fatalf("%v is not an *image.Error", err)
			}
			if ie.Region != c.region {
				t.Errorf("region %q, want %q (%v)", ie.Region, c.region, err)
			}
			if c.offset >= 0 && ie.Offset != int64(c.offset) {
				t.Errorf("offset %d, want %d (%v)", ie.Offset, c.offset, err)
			}
			if !strings.Contains(err.Error(), string(c.region)) {
				t.Errorf("message %q does not name the region", err)
			}
			if got := image.IsSecurity(err); got != (c.err == image.ErrHashMismatch || c.err == image.ErrBadSignature || c.err == image.ErrUntrusted) {
				t.Errorf("IsSecurity = %v for %v", got, err)
			}
		})
	}
}

// Trailer alterations: only imgtool's exact layout passes.
func TestTamperTrailer(t *testing.T) {
	padded := readFile(t, filepath.Join("testdata", "imgtool", "ed25519-sc5-pad-confirm-ff.bin"))
	n := len(padded)
	cases := []struct {
		name   string
		off    int
		val    byte
		offset int
	}{
		{"fill byte", 10000, 0x00, 10000},
		{"first byte after the image", 4764, 0x00, 4764},
		{"image_ok not 0x01", n - 24, 0x02, n - 24},
		{"image_ok row padding", n - 23, 0x00, n - 23},
		{"copy_done set", n - 32, 0x01, n - 32},
		{"magic", n - 1, 0x00, 4764},
		{"magic first byte", n - 16, 0x00, 4764},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := bytes.Clone(padded)
			b[c.off] = c.val
			_, err := readVerify(t, b)
			var ie *image.Error
			if !errors.Is(err, image.ErrTrailingBytes) || !errors.As(err, &ie) || ie.Region != image.RegionTrailer {
				t.Fatalf("got %v, want ErrTrailingBytes in the trailer", err)
			}
			if ie.Offset != int64(c.offset) {
				t.Errorf("offset %d, want %d (%v)", ie.Offset, c.offset, err)
			}
		})
	}
	// One byte short or long of the slot: the magic is no longer at the end.
	for _, b := range [][]byte{padded[:n-1], append(bytes.Clone(padded), 0xff)} {
		if _, err := readVerify(t, b); !errors.Is(err, image.ErrTrailingBytes) {
			t.Errorf("%d bytes: got %v, want ErrTrailingBytes", len(b), err)
		}
	}
}

// Every prefix of an image is refused as truncated, and every single-byte
// change of the image proper is refused.
func TestEveryTruncationAndFlipRefused(t *testing.T) {
	base := baseImage(t)
	for n := 0; n < len(base); n++ {
		_, err := readVerify(t, base[:n])
		if !errors.Is(err, image.ErrTruncated) {
			t.Fatalf("prefix of %d bytes: got %v, want ErrTruncated", n, err)
		}
	}
	for off := 0; off < len(base); off++ {
		b := bytes.Clone(base)
		b[off] ^= 0x01
		if _, err := readVerify(t, b); err == nil {
			t.Fatalf("flip at offset %d accepted", off)
		}
	}
}
