package image

import (
	"context"
	"crypto"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
)

// Verified tells which trusted keys signed an image.
type Verified struct {
	Keys []KeyHash // trusted keys whose signatures verified, in image order
	// Unknown counts signatures by keys not in the trusted set; they are
	// neither accepted nor held against the image (during a key rotation a
	// device knows only one of the two keys).
	Unknown int
}

// Verify checks the image's digest and signatures against trusted keys.
// The image is authentic when its SHA256 TLV matches the digest computed by
// Read and at least one signature by a trusted key verifies. A signature by a
// trusted key that does not verify is an error even if another one does:
// it means the image was altered or mis-signed.
func (img *Image) Verify(trusted []crypto.PublicKey) (*Verified, error) {
	shaAt := img.SignedLen
	for _, t := range img.Unprotected {
		if t.Type == TLVSHA256 {
			shaAt = t.Offset
		}
	}
	if !img.StatedDigestMatches() {
		return nil, fail(RegionUnprotected, shaAt, ErrHashMismatch,
			"bytes [0, %d) (header, payload, protected TLVs) hash to %x, the image says %x",
			img.SignedLen, img.Digest[:8], img.StatedSHA[:min(8, len(img.StatedSHA))])
	}
	type key struct {
		pub  crypto.PublicKey
		hash KeyHash
	}
	keys := make([]key, 0, len(trusted))
	for i, pub := range trusted {
		kh, err := HashKey(pub)
		if err != nil {
			return nil, fmt.Errorf("trusted key %d: %w", i+1, err)
		}
		keys = append(keys, key{pub, kh})
	}
	v := &Verified{}
	for _, s := range img.Signatures {
		var k *key
		for i := range keys {
			if keys[i].hash == s.KeyHash {
				k = &keys[i]
				break
			}
		}
		if k == nil {
			v.Unknown++
			continue
		}
		if !verifySig(k.pub, s.Type, img.Digest[:], s.Value) {
			return nil, fail(RegionUnprotected, s.Offset, ErrBadSignature, "%s signature by key %s", AlgName(s.Type), s.KeyHash.Short())
		}
		v.Keys = append(v.Keys, s.KeyHash)
	}
	if len(v.Keys) == 0 {
		var found []string
		for _, s := range img.Signatures {
			found = append(found, AlgName(s.Type)+" "+s.KeyHash.Short())
		}
		var want []string
		for _, k := range keys {
			want = append(want, k.hash.Short())
		}
		return nil, fail(RegionUnprotected, img.SignedLen, ErrUntrusted,
			"signed by [%s], trusted keys are [%s]", strings.Join(found, ", "), strings.Join(want, ", "))
	}
	return v, nil
}

// ReadVerify reads an image from r and verifies it against trusted keys.
func ReadVerify(ctx context.Context, r io.Reader, trusted []crypto.PublicKey, o ReadOptions) (*Image, *Verified, error) {
	img, err := Read(ctx, r, o)
	if err != nil {
		return nil, nil, err
	}
	v, err := img.Verify(trusted)
	if err != nil {
		return img, nil, err
	}
	return img, v, nil
}

// UUIDString formats a 16-byte UUID value.
func UUIDString(b []byte) string {
	if len(b) != uuidLen {
		return hex.EncodeToString(b)
	}
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
