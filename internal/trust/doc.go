// Package trust holds fieldpatch's keys: generating them, and reading and
// writing them as PEM files (private keys as PKCS#8, public keys as
// SubjectPublicKeyInfo), the formats MCUboot's imgtool and OpenSSL use.
//
// Image-signing keys are Ed25519 by default, ECDSA P-256 where a secure
// element needs it. Nothing here does network I/O.
package trust
