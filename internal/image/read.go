package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
)

// TrailerPolicy says what Read does with bytes after the TLV areas.
type TrailerPolicy int

const (
	// TrailerMCUboot accepts nothing, or exactly erased fill followed by an
	// MCUboot image trailer (as imgtool --pad [--confirm] writes it), and
	// refuses anything else. For image files.
	TrailerMCUboot TrailerPolicy = iota
	// TrailerIgnore stops reading at the end of the TLVs. For slots, where
	// whatever follows the image is not part of it.
	TrailerIgnore
)

// ReadOptions tune Read.
type ReadOptions struct {
	Trailer TrailerPolicy
	// Progress, if set, is called as payload bytes are hashed.
	Progress func(done, total int64)
}

// Image is what Read found: the header, the TLVs and the digest it computed
// over the signed region. It holds no payload bytes.
type Image struct {
	Header      Header
	Protected   []TLV
	Unprotected []TLV

	SignedLen int64           // bytes covered by the signature: header, payload, protected TLVs
	Len       int64           // bytes of the image proper: SignedLen plus the unprotected area
	Digest    [sha256Len]byte // computed SHA-256 of the signed region
	StatedSHA []byte          // the SHA256 TLV's value
	Trailer   *Trailer        // nil when nothing follows the TLVs (or TrailerIgnore)

	HasSecurityCounter bool
	SecurityCounter    uint32
	HWClass            string // empty for plain MCUboot images
	SemVer             string // the FP_SEMVER TLV; empty for plain MCUboot images
	VendorUUID         []byte // 16 bytes or nil
	ClassUUID          []byte // 16 bytes or nil
	Signatures         []Signature
}

// Signature is one signature TLV and the key identification before it.
type Signature struct {
	Type    uint16  // TLVEd25519 or TLVECDSASig
	KeyHash KeyHash // from KEYHASH, or computed from PUBKEY
	Value   []byte
	Offset  int64 // of the signature TLV
}

// Version returns the image's semantic version: FP_SEMVER when present, the
// header's version otherwise.
func (img *Image) Version() SemVer {
	if img.SemVer != "" {
		if v, err := ParseSemVer(img.SemVer); err == nil {
			return v
		}
	}
	hv := img.Header.Version
	v := SemVer{Major: uint64(hv.Major), Minor: uint64(hv.Minor), Patch: uint64(hv.Revision)}
	if hv.Build != 0 {
		v.Build = fmt.Sprint(hv.Build)
	}
	return v
}

// reader tracks the offset and hashes what the signed region covers.
type reader struct {
	ctx  context.Context
	r    io.Reader
	off  int64
	hash hash.Hash
}

// full reads exactly len(b) bytes; a short read is ErrTruncated in region.
func (rd *reader) full(region Region, b []byte) error {
	if err := rd.ctx.Err(); err != nil {
		return err
	}
	n, err := io.ReadFull(rd.r, b)
	start := rd.off
	rd.off += int64(n)
	if rd.hash != nil {
		rd.hash.Write(b[:n])
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fail(region, rd.off, ErrTruncated, "input ends after %d of the %d bytes expected from offset %d", n, len(b), start)
	}
	if err != nil {
		return fmt.Errorf("read image %s at offset %d: %w", region, rd.off, err)
	}
	return nil
}

// Read parses an image from r, hashing the signed region as it streams. It
// checks the structure (sizes, TLV areas, TLV placement and lengths, the
// trailer) but not the hash or the signatures: call Verify for that.
// Memory use is constant whatever the image size.
func Read(ctx context.Context, r io.Reader, o ReadOptions) (*Image, error) {
	rd := &reader{ctx: ctx, r: r, hash: sha256.New()}
	img := &Image{}

	var hb [HeaderLen]byte
	if err := rd.full(RegionHeader, hb[:]); err != nil {
		return nil, err
	}
	h := decodeHeader(hb[:])
	img.Header = h
	if h.Magic != Magic {
		return nil, fail(RegionHeader, 0, ErrBadMagic, "found 0x%08x, want 0x%08x: not an MCUboot/fieldpatch image", h.Magic, uint32(Magic))
	}
	if h.HeaderSize < HeaderLen {
		return nil, fail(RegionHeader, 8, ErrSizeOverflow, "header size %d is smaller than the %d-byte header", h.HeaderSize, HeaderLen)
	}
	if h.Flags&^knownFlags != 0 {
		return nil, fail(RegionHeader, 16, ErrUnsupported, "unknown header flags 0x%x", h.Flags&^knownFlags)
	}
	if h.Flags&unsupportedFlags != 0 {
		return nil, fail(RegionHeader, 16, ErrUnsupported, "flags 0x%x: encrypted or compressed payloads are not supported", h.Flags&unsupportedFlags)
	}
	if h.ProtectedTLVSize != 0 && h.ProtectedTLVSize < tlvInfoLen+tlvHeaderLen {
		return nil, fail(RegionHeader, 10, ErrSizeOverflow, "protected TLV size %d is too small to hold an area", h.ProtectedTLVSize)
	}
	img.SignedLen = int64(h.HeaderSize) + int64(h.ImageSize) + int64(h.ProtectedTLVSize)
	if img.SignedLen+tlvInfoLen > 0xffffffff {
		return nil, fail(RegionHeader, 12, ErrSizeOverflow, "header %d + payload %d + protected TLVs %d exceed the 32-bit address space", h.HeaderSize, h.ImageSize, h.ProtectedTLVSize)
	}

	if pad := int(h.HeaderSize) - HeaderLen; pad > 0 {
		if err := rd.full(RegionHeader, make([]byte, pad)); err != nil {
			return nil, err
		}
	}

	start := rd.off
	n, err := copyPayload(ctx, rd.hash, rd.r, int64(h.ImageSize), o.Progress)
	rd.off += n
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("read image payload at offset %d: %w", rd.off, err)
	}
	if n < int64(h.ImageSize) {
		return nil, fail(RegionPayload, rd.off, ErrTruncated, "input ends after %d of the %d payload bytes starting at offset %d", n, h.ImageSize, start)
	}

	if h.ProtectedTLVSize > 0 {
		off := rd.off
		area := make([]byte, h.ProtectedTLVSize)
		if err := rd.full(RegionProtected, area); err != nil {
			return nil, err
		}
		if err := img.parseArea(RegionProtected, off, area); err != nil {
			return nil, err
		}
	}
	rd.hash.Sum(img.Digest[:0])
	rd.hash = nil

	off := rd.off
	var info [tlvInfoLen]byte
	if err := rd.full(RegionUnprotected, info[:]); err != nil {
		return nil, err
	}
	magic := binary.LittleEndian.Uint16(info[0:])
	total := binary.LittleEndian.Uint16(info[2:])
	if magic == TLVProtMagic && h.ProtectedTLVSize == 0 {
		return nil, fail(RegionUnprotected, off, ErrBadTLV, "a protected TLV area is present but the header's protected TLV size is 0")
	}
	if int(total) < tlvInfoLen+tlvHeaderLen {
		// Check the magic first: a wrong magic is the more useful message.
		if magic != TLVInfoMagic {
			return nil, fail(RegionUnprotected, off, ErrBadMagic, "TLV info magic 0x%04x, want 0x%04x", magic, TLVInfoMagic)
		}
		return nil, fail(RegionUnprotected, off+2, ErrTLVOverrun, "area length %d cannot hold a TLV", total)
	}
	area := make([]byte, total)
	copy(area, info[:])
	if err := rd.full(RegionUnprotected, area[tlvInfoLen:]); err != nil {
		return nil, err
	}
	if err := img.parseArea(RegionUnprotected, off, area); err != nil {
		return nil, err
	}
	img.Len = rd.off
	if err := img.check(); err != nil {
		return nil, err
	}

	if o.Trailer == TrailerMCUboot {
		t, err := readTrailer(ctx, rd.r, rd.off)
		if err != nil {
			return nil, err
		}
		img.Trailer = t
	}
	return img, nil
}

// parseArea parses one TLV area (info header included) found at offset off,
// and records its TLVs and the values it understands.
func (img *Image) parseArea(region Region, off int64, area []byte) error {
	wantMagic, protected := uint16(TLVInfoMagic), false
	if region == RegionProtected {
		wantMagic, protected = TLVProtMagic, true
	}
	if len(area) < tlvInfoLen {
		return fail(region, off, ErrTruncated, "area of %d bytes has no info header", len(area))
	}
	if m := binary.LittleEndian.Uint16(area); m != wantMagic {
		return fail(region, off, ErrBadMagic, "TLV info magic 0x%04x, want 0x%04x", m, wantMagic)
	}
	if t := int(binary.LittleEndian.Uint16(area[2:])); t != len(area) {
		return fail(region, off+2, ErrBadTLV, "area says it is %d bytes, the header gives it %d", t, len(area))
	}
	seen := map[uint16]bool{}
	var pendingKey *KeyHash
	for p := tlvInfoLen; p < len(area); {
		at := off + int64(p)
		if len(area)-p < tlvHeaderLen {
			return fail(region, at, ErrTLVOverrun, "%d bytes left, too few for a TLV header", len(area)-p)
		}
		typ := binary.LittleEndian.Uint16(area[p:])
		n := int(binary.LittleEndian.Uint16(area[p+2:]))
		p += tlvHeaderLen
		if n > len(area)-p {
			return fail(region, at, ErrTLVOverrun, "TLV %s of %d bytes, only %d left in the area", TLVName(typ), n, len(area)-p)
		}
		val := area[p : p+n : p+n]
		p += n

		kind, known := tlvKinds[typ]
		switch {
		case !known:
			return fail(region, at, ErrUnknownTLV, "type 0x%04x (%d bytes)", typ, n)
		case kind.protected != protected:
			where := "unprotected"
			if kind.protected {
				where = "protected"
			}
			return fail(region, at, ErrBadTLV, "%s belongs in the %s area", kind.name, where)
		case !kind.supported:
			return fail(region, at, ErrUnsupported, "%s TLVs are not supported", kind.name)
		}
		tlv := TLV{Type: typ, Offset: at, Value: val}
		if protected {
			img.Protected = append(img.Protected, tlv)
		} else {
			img.Unprotected = append(img.Unprotected, tlv)
		}

		single := typ != TLVKeyHash && typ != TLVPubKey && typ != TLVEd25519 && typ != TLVECDSASig && typ != TLVDependency
		if single && seen[typ] {
			return fail(region, at, ErrBadTLV, "more than one %s TLV", kind.name)
		}
		seen[typ] = true
		wantLen := map[uint16]int{TLVSecCounter: securityCtrLen, TLVVendorUUID: uuidLen, TLVClassUUID: uuidLen,
			TLVSHA256: sha256Len, TLVKeyHash: sha256Len, TLVEd25519: ed25519SigLen, TLVDependency: 12}
		if w, ok := wantLen[typ]; ok && n != w {
			return fail(region, at, ErrBadTLV, "%s of %d bytes, want %d", kind.name, n, w)
		}
		if pendingKey != nil && typ != TLVEd25519 && typ != TLVECDSASig {
			return fail(region, at, ErrBadTLV, "%s follows a key hash that no signature uses", kind.name)
		}

		switch typ {
		case TLVSecCounter:
			img.HasSecurityCounter = true
			img.SecurityCounter = binary.LittleEndian.Uint32(val)
		case TLVVendorUUID:
			img.VendorUUID = val
		case TLVClassUUID:
			img.ClassUUID = val
		case TLVHWClass:
			if err := ValidHWClass(string(val)); err != nil {
				return fail(region, at, ErrBadTLV, "%v", err)
			}
			img.HWClass = string(val)
		case TLVSemVer:
			if n > maxSemVerLen {
				return fail(region, at, ErrBadTLV, "semantic version of %d bytes, at most %d", n, maxSemVerLen)
			}
			sv, err := ParseSemVer(string(val))
			if err != nil {
				return fail(region, at, ErrBadTLV, "%v", err)
			}
			hv, err := sv.HeaderVersion()
			if err != nil || hv != img.Header.Version {
				return fail(region, at, ErrBadTLV, "semantic version %s disagrees with the header's %s", sv, img.Header.Version)
			}
			img.SemVer = string(val)
		case TLVSHA256:
			img.StatedSHA = val
		case TLVKeyHash:
			var kh KeyHash
			copy(kh[:], val)
			pendingKey = &kh
		case TLVPubKey:
			if n == 0 || n > maxPubKeyTLVLen {
				return fail(region, at, ErrBadTLV, "public key of %d bytes", n)
			}
			kh := KeyHash(sha256.Sum256(val))
			pendingKey = &kh
		case TLVEd25519, TLVECDSASig:
			if typ == TLVECDSASig && (n < ecdsaMinSigLen || n > ecdsaMaxSigLen) {
				return fail(region, at, ErrBadTLV, "ECDSA signature of %d bytes, want %d to %d", n, ecdsaMinSigLen, ecdsaMaxSigLen)
			}
			if pendingKey == nil {
				return fail(region, at, ErrBadTLV, "%s signature with no KEYHASH or PUBKEY before it", kind.name)
			}
			if len(img.Signatures) == maxSignatures {
				return fail(region, at, ErrBadTLV, "more than %d signatures", maxSignatures)
			}
			img.Signatures = append(img.Signatures, Signature{Type: typ, KeyHash: *pendingKey, Value: val, Offset: at})
			pendingKey = nil
		}
	}
	if pendingKey != nil {
		return fail(region, off+int64(len(area)), ErrBadTLV, "the area ends with a key hash that no signature uses")
	}
	return nil
}

// check enforces what must hold across both areas once they are parsed.
func (img *Image) check() error {
	if img.StatedSHA == nil {
		return fail(RegionUnprotected, img.SignedLen, ErrBadTLV, "no SHA256 TLV")
	}
	if len(img.Signatures) == 0 {
		return fail(RegionUnprotected, img.SignedLen, ErrBadTLV, "no signature TLV: unsigned images are refused")
	}
	if img.HWClass != "" && img.SemVer == "" || img.HWClass == "" && img.SemVer != "" {
		return fail(RegionProtected, img.SignedLen-int64(img.Header.ProtectedTLVSize), ErrBadTLV, "FP_HW_CLASS and FP_SEMVER come together or not at all")
	}
	if img.HWClass != "" && !img.HasSecurityCounter {
		return fail(RegionProtected, img.SignedLen-int64(img.Header.ProtectedTLVSize), ErrBadTLV, "a fieldpatch image without a security counter")
	}
	return nil
}

// Fieldpatch reports whether the image carries fieldpatch's own TLVs (as
// opposed to a plain MCUboot image).
func (img *Image) Fieldpatch() bool { return img.HWClass != "" }

// StatedDigestMatches reports whether the SHA256 TLV equals the computed digest.
func (img *Image) StatedDigestMatches() bool { return bytes.Equal(img.StatedSHA, img.Digest[:]) }

// Peek reads an image's header and TLV areas from random-access storage
// without reading or hashing the payload: it learns what a slot claims to
// hold (version, counter, class) cheaply. Nothing is verified, and the
// returned Digest is zero; only Verify after Read says an image is authentic.
func Peek(ra io.ReaderAt) (*Image, error) {
	var hb [HeaderLen]byte
	if _, err := ra.ReadAt(hb[:], 0); err != nil {
		return nil, fail(RegionHeader, 0, ErrTruncated, "%v", err)
	}
	h := decodeHeader(hb[:])
	if h.Magic != Magic {
		return nil, fail(RegionHeader, 0, ErrBadMagic, "found 0x%08x, want 0x%08x", h.Magic, uint32(Magic))
	}
	if h.HeaderSize < HeaderLen {
		return nil, fail(RegionHeader, 8, ErrSizeOverflow, "header size %d is smaller than the %d-byte header", h.HeaderSize, HeaderLen)
	}
	img := &Image{Header: h}
	img.SignedLen = int64(h.HeaderSize) + int64(h.ImageSize) + int64(h.ProtectedTLVSize)
	if h.ProtectedTLVSize > 0 {
		off := img.SignedLen - int64(h.ProtectedTLVSize)
		area := make([]byte, h.ProtectedTLVSize)
		if _, err := ra.ReadAt(area, off); err != nil {
			return nil, fail(RegionProtected, off, ErrTruncated, "%v", err)
		}
		if err := img.parseArea(RegionProtected, off, area); err != nil {
			return nil, err
		}
	}
	var info [tlvInfoLen]byte
	if _, err := ra.ReadAt(info[:], img.SignedLen); err != nil {
		return nil, fail(RegionUnprotected, img.SignedLen, ErrTruncated, "%v", err)
	}
	area := make([]byte, binary.LittleEndian.Uint16(info[2:]))
	if len(area) < tlvInfoLen {
		return nil, fail(RegionUnprotected, img.SignedLen+2, ErrTLVOverrun, "area length %d", len(area))
	}
	if _, err := ra.ReadAt(area, img.SignedLen); err != nil {
		return nil, fail(RegionUnprotected, img.SignedLen, ErrTruncated, "%v", err)
	}
	if err := img.parseArea(RegionUnprotected, img.SignedLen, area); err != nil {
		return nil, err
	}
	img.Len = img.SignedLen + int64(len(area))
	return img, img.check()
}
