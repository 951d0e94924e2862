package image

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"regexp"
)

// BuildOptions describe the image to build.
type BuildOptions struct {
	// Version is the semantic version, MAJOR.MINOR.PATCH[-PRE][+BUILD].
	Version string
	// SecurityCounter goes into the SEC_CNT TLV (anti-rollback). Nil leaves
	// it out, which only MCUboot-compatible mode allows.
	SecurityCounter *uint32
	// HWClass names the hardware the image is for, such as "smartlock-v2".
	// Required unless MCUbootCompatible.
	HWClass string
	// VendorUUID and ClassUUID, if set, go into MCUboot's 0x74 and 0x75 TLVs.
	VendorUUID, ClassUUID *[16]byte
	// HeaderSize is the header plus its padding; 0 means DefaultHdrSize.
	HeaderSize uint16
	// HeaderFill is the value of the header's padding bytes (imgtool's -R).
	HeaderFill byte
	// LoadAddr and Flags go into the header as they are. Flags for encrypted
	// or compressed payloads are refused.
	LoadAddr uint32
	Flags    uint32
	// MCUbootCompatible leaves out fieldpatch's own TLVs, so the output is
	// what MCUboot's imgtool makes from the same inputs.
	MCUbootCompatible bool
	// Signers sign the image, each adding a KEYHASH and a signature TLV.
	// At least one is required; several are normal during a key rotation.
	Signers []crypto.Signer
	// Pad, if set, pads the image to a slot and appends an MCUboot trailer.
	Pad *PadOptions
	// Rand is the randomness for ECDSA; nil means crypto/rand.
	Rand io.Reader
	// Progress, if set, is called as payload bytes are written.
	Progress func(done, total int64)
}

// PadOptions pad an image to its slot size with an MCUboot trailer, as
// imgtool's --pad (and --confirm) do.
type PadOptions struct {
	SlotSize int64 // total bytes, image and trailer
	Align    int   // flash write size: 1, 2, 4, 8, 16 or 32 (imgtool's --align)
	MaxAlign int   // 8, 16 or 32; 0 means max(8, Align)
	Erased   byte  // the flash's erased value, 0xff or 0x00
	Confirm  bool  // set image_ok, so MCUboot boots it without a test swap
}

var hwClassRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// ValidHWClass reports whether s is a well-formed hardware class.
func ValidHWClass(s string) error {
	if !hwClassRE.MatchString(s) {
		return fmt.Errorf("hardware class %q: want 1 to %d characters of [a-z0-9._-], starting with a letter or digit", s, maxHWClassLen)
	}
	return nil
}

// Build writes a signed image to w. The payload is read from payload and
// must be exactly size bytes; it is streamed, never held in memory.
// It returns the image as Read would see it.
//
// Every option is checked before the first byte is written. A payload that
// turns out shorter or longer than size is found only while streaming, so on
// error w may hold part of an image: write to a temporary file and rename it
// into place on success.
func Build(ctx context.Context, w io.Writer, payload io.Reader, size int64, o BuildOptions) (*Image, error) {
	hdrSize := o.HeaderSize
	if hdrSize == 0 {
		hdrSize = DefaultHdrSize
	}
	if hdrSize < HeaderLen {
		return nil, fmt.Errorf("header size %d is smaller than the %d-byte header", hdrSize, HeaderLen)
	}
	if size < 0 || size > 0xffffffff {
		return nil, fmt.Errorf("payload of %d bytes: the format allows at most 4 GiB - 1", size)
	}
	if o.Flags&^knownFlags != 0 || o.Flags&unsupportedFlags != 0 {
		return nil, fmt.Errorf("header flags 0x%x: only PIC, NON_BOOTABLE, RAM_LOAD and ROM_FIXED are supported", o.Flags)
	}
	if len(o.Signers) == 0 {
		return nil, errors.New("no signing key")
	}
	if len(o.Signers) > maxSignatures {
		return nil, fmt.Errorf("%d signing keys: at most %d", len(o.Signers), maxSignatures)
	}
	sv, err := ParseSemVer(o.Version)
	if err != nil {
		return nil, err
	}
	hv, err := sv.HeaderVersion()
	if err != nil {
		return nil, err
	}

	var prot []TLV
	if o.SecurityCounter != nil {
		prot = append(prot, TLV{Type: TLVSecCounter, Value: binary.LittleEndian.AppendUint32(nil, *o.SecurityCounter)})
	}
	if o.VendorUUID != nil {
		prot = append(prot, TLV{Type: TLVVendorUUID, Value: o.VendorUUID[:]})
	}
	if o.ClassUUID != nil {
		prot = append(prot, TLV{Type: TLVClassUUID, Value: o.ClassUUID[:]})
	}
	if o.MCUbootCompatible {
		if o.HWClass != "" {
			return nil, errors.New("MCUboot-compatible images carry no hardware class TLV: leave HWClass empty")
		}
		if !sv.plainMCUboot() {
			return nil, fmt.Errorf("version %s cannot be said by the MCUboot header alone (no pre-release; build must be a number)", sv)
		}
	} else {
		if o.SecurityCounter == nil {
			return nil, errors.New("no security counter: fieldpatch images always carry one")
		}
		if err := ValidHWClass(o.HWClass); err != nil {
			return nil, err
		}
		prot = append(prot,
			TLV{Type: TLVHWClass, Value: []byte(o.HWClass)},
			TLV{Type: TLVSemVer, Value: []byte(sv.String())})
	}
	protArea, err := encodeArea(TLVProtMagic, prot)
	if err != nil {
		return nil, err
	}
	signedLen := int64(hdrSize) + size + int64(len(protArea))
	if signedLen > 0xffffffff {
		return nil, fmt.Errorf("image of %d bytes: the format allows at most 4 GiB - 1", signedLen)
	}

	// Precompute key hashes so a bad key fails before any byte is written.
	type signer struct {
		s    crypto.Signer
		typ  uint16
		hash KeyHash
	}
	signers := make([]signer, len(o.Signers))
	for i, s := range o.Signers {
		typ, err := sigType(s.Public())
		if err != nil {
			return nil, fmt.Errorf("signing key %d: %w", i+1, err)
		}
		kh, err := HashKey(s.Public())
		if err != nil {
			return nil, fmt.Errorf("signing key %d: %w", i+1, err)
		}
		for _, prev := range signers[:i] {
			if prev.hash == kh {
				return nil, fmt.Errorf("signing key %d is the same key as an earlier one (%s)", i+1, kh.Short())
			}
		}
		signers[i] = signer{s, typ, kh}
	}

	if o.Pad != nil {
		p, err := o.Pad.normalized()
		if err != nil {
			return nil, err
		}
		// The unprotected area's largest size: SHA256, then a key hash and
		// the longest signature per key.
		maxUnprot := int64(tlvInfoLen + tlvHeaderLen + sha256Len)
		for _, s := range signers {
			maxUnprot += 2*tlvHeaderLen + sha256Len + ed25519SigLen
			if s.typ == TLVECDSASig {
				maxUnprot += ecdsaMaxSigLen - ed25519SigLen
			}
		}
		if need := signedLen + maxUnprot + int64(trailerSize(p.Align, p.MaxAlign)); need > p.SlotSize {
			return nil, fmt.Errorf("pad: image of up to %d bytes and trailer of %d do not fit a %d-byte slot", signedLen+maxUnprot, trailerSize(p.Align, p.MaxAlign), p.SlotSize)
		}
	}

	h := Header{
		Magic:            Magic,
		LoadAddr:         o.LoadAddr,
		HeaderSize:       hdrSize,
		ProtectedTLVSize: uint16(len(protArea)),
		ImageSize:        uint32(size),
		Flags:            o.Flags,
		Version:          hv,
	}
	hb, _ := h.MarshalBinary()
	for n := int(hdrSize) - HeaderLen; n > 0; n-- {
		hb = append(hb, o.HeaderFill)
	}

	cw := &countWriter{w: w}
	d := sha256.New()
	signed := io.MultiWriter(cw, d)
	if _, err := signed.Write(hb); err != nil {
		return nil, fmt.Errorf("write header: %w", err)
	}
	n, err := copyPayload(ctx, signed, payload, size, o.Progress)
	if err != nil {
		return nil, err
	}
	if n != size {
		return nil, fmt.Errorf("payload ended after %d of %d bytes", n, size)
	}
	// The payload must end where promised: a longer file is an error, not a
	// silently cut image.
	var one [1]byte
	if k, _ := io.ReadFull(payload, one[:]); k != 0 {
		return nil, fmt.Errorf("payload is longer than the %d bytes given", size)
	}
	if _, err := signed.Write(protArea); err != nil {
		return nil, fmt.Errorf("write protected TLVs: %w", err)
	}
	var digest [sha256Len]byte
	d.Sum(digest[:0])

	unprot := []TLV{{Type: TLVSHA256, Value: digest[:]}}
	rnd := o.Rand
	if rnd == nil {
		rnd = rand.Reader
	}
	for i, s := range signers {
		var sig []byte
		if s.typ == TLVEd25519 {
			// Ed25519 signs the 32-byte digest itself, as imgtool does.
			sig, err = s.s.Sign(rnd, digest[:], crypto.Hash(0))
		} else {
			sig, err = s.s.Sign(rnd, digest[:], crypto.SHA256)
		}
		if err != nil {
			return nil, fmt.Errorf("sign with key %d (%s): %w", i+1, s.hash.Short(), err)
		}
		if !verifySig(s.s.Public(), s.typ, digest[:], sig) {
			return nil, fmt.Errorf("signing key %d (%s) made a signature that does not verify", i+1, s.hash.Short())
		}
		unprot = append(unprot, TLV{Type: TLVKeyHash, Value: append([]byte(nil), s.hash[:]...)}, TLV{Type: s.typ, Value: sig})
	}
	unprotArea, err := encodeArea(TLVInfoMagic, unprot)
	if err != nil {
		return nil, err
	}
	if _, err := cw.Write(unprotArea); err != nil {
		return nil, fmt.Errorf("write TLVs: %w", err)
	}
	if o.Pad != nil {
		if err := writeTrailer(cw, cw.n, *o.Pad); err != nil {
			return nil, err
		}
	}

	// Describe what was written by parsing the parts we still hold.
	img := &Image{Header: h, SignedLen: signedLen, Len: signedLen + int64(len(unprotArea)), Digest: digest}
	if len(protArea) > 0 {
		if err := img.parseArea(RegionProtected, signedLen-int64(len(protArea)), protArea); err != nil {
			return nil, fmt.Errorf("internal: built image does not parse: %w", err)
		}
	}
	if err := img.parseArea(RegionUnprotected, signedLen, unprotArea); err != nil {
		return nil, fmt.Errorf("internal: built image does not parse: %w", err)
	}
	if err := img.check(); err != nil {
		return nil, fmt.Errorf("internal: built image does not parse: %w", err)
	}
	return img, nil
}

// copyBufSize is the streaming buffer: big enough that system calls do not
// dominate, small enough to be irrelevant next to a device's memory.
const copyBufSize = 256 << 10

// copyPayload copies exactly n bytes (or until EOF), checking ctx between reads.
func copyPayload(ctx context.Context, dst io.Writer, src io.Reader, n int64, progress func(done, total int64)) (int64, error) {
	buf := make([]byte, min(n, copyBufSize))
	var done int64
	for done < n {
		if err := ctx.Err(); err != nil {
			return done, err
		}
		want := int64(len(buf))
		if n-done < want {
			want = n - done
		}
		k, rerr := io.ReadFull(src, buf[:want])
		if k > 0 {
			if _, err := dst.Write(buf[:k]); err != nil {
				return done, fmt.Errorf("write payload: %w", err)
			}
			done += int64(k)
			if progress != nil {
				progress(done, n)
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			return done, nil
		}
		if rerr != nil {
			return done, fmt.Errorf("read payload: %w", rerr)
		}
	}
	return done, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// ed25519Signer is satisfied by ed25519.PrivateKey; kept to document that a
// crypto.Signer for Ed25519 must sign the message itself (Hash(0)).
var _ crypto.Signer = ed25519.PrivateKey(nil)
