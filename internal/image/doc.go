// Package image reads, builds and verifies fieldpatch firmware images.
//
// The format is MCUboot's: a 32-byte little-endian header (optionally padded
// to a larger header size), the payload, a protected TLV area and an
// unprotected TLV area. The protected area (info magic 0x6908) is covered by
// the signature; the unprotected area (info magic 0x6907) carries the SHA-256
// digest of the signed region and one or more signatures, each preceded by
// the hash of the key that made it. An image as it sits in a slot may be
// followed by erased fill and an MCUboot image trailer; the reader accepts
// exactly that layout and refuses any other trailing bytes.
//
//	offset                      content
//	0                           header (32 bytes) + padding up to HeaderSize
//	HeaderSize                  payload (ImageSize bytes)
//	HeaderSize+ImageSize        protected TLV area (ProtectedTLVSize bytes, may be 0)
//	... + ProtectedTLVSize      unprotected TLV area (its info header says its size)
//	end of TLVs                 optional: erased fill and MCUboot trailer
//
// The signed region is [0, HeaderSize+ImageSize+ProtectedTLVSize). Ed25519
// signs the 32-byte SHA-256 digest of that region; ECDSA P-256 signs the
// region with SHA-256 (a DER signature over the same digest).
//
// fieldpatch adds two protected TLVs of its own in MCUboot's vendor range:
// the hardware class the image is for, and the full semantic version string
// (the header has room only for major.minor.revision+build).
//
// Everything streams: Read hashes the signed region as it goes and keeps only
// the header and TLVs in memory, so memory use does not depend on the image
// size; Build writes the same way. docs/IMAGE-FORMAT.md has the byte-level
// table and how each field was checked against MCUboot.
package image
