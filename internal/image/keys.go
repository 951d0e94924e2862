package image

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
)

// KeyHash is SHA-256 of a public key's DER SubjectPublicKeyInfo, as MCUboot's
// KEYHASH TLV carries it.
type KeyHash [sha256Len]byte

func (h KeyHash) String() string { return hex.EncodeToString(h[:]) }

// Short is the first 8 bytes in hex, enough to tell keys apart in messages.
func (h KeyHash) Short() string { return hex.EncodeToString(h[:8]) }

// HashKey returns the KEYHASH of a public key (ed25519.PublicKey or a P-256
// *ecdsa.PublicKey).
func HashKey(pub crypto.PublicKey) (KeyHash, error) {
	if _, err := sigType(pub); err != nil {
		return KeyHash{}, err
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return KeyHash{}, fmt.Errorf("encode public key: %w", err)
	}
	return sha256.Sum256(der), nil
}

// sigType is the signature TLV type a key makes.
func sigType(pub crypto.PublicKey) (uint16, error) {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		if len(k) != ed25519.PublicKeySize {
			return 0, fmt.Errorf("ed25519 public key of %d bytes", len(k))
		}
		return TLVEd25519, nil
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return 0, fmt.Errorf("ECDSA key on %s: only P-256 is supported", k.Curve.Params().Name)
		}
		return TLVECDSASig, nil
	default:
		return 0, fmt.Errorf("unsupported key type %T: use Ed25519 or ECDSA P-256", pub)
	}
}

// AlgName names the algorithm of a signature TLV type.
func AlgName(t uint16) string {
	switch t {
	case TLVEd25519:
		return "ed25519"
	case TLVECDSASig:
		return "ecdsa-p256"
	}
	return TLVName(t)
}

// verifySig checks one signature over the digest of the signed region.
func verifySig(pub crypto.PublicKey, typ uint16, digest []byte, sig []byte) bool {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return typ == TLVEd25519 && ed25519.Verify(k, digest, sig)
	case *ecdsa.PublicKey:
		return typ == TLVECDSASig && ecdsa.VerifyASN1(k, digest, sig)
	}
	return false
}
