package image

import (
	"encoding/binary"
	"fmt"
)

// Sizes and magic numbers of the MCUboot layout.
const (
	Magic           = 0x96f3b83d // image header magic
	HeaderLen       = 32         // bytes of the fixed header
	TLVInfoMagic    = 0x6907     // unprotected TLV area
	TLVProtMagic    = 0x6908     // protected TLV area
	tlvInfoLen      = 4          // area info header: magic u16, total u16
	tlvHeaderLen    = 4          // TLV header: type u16, length u16
	maxAreaLen      = 0xffff     // an area's total is a u16
	DefaultHdrSize  = 0x200      // the header size most MCUboot images use
	maxSignatures   = 8          // refuse images carrying more signatures than this
	maxHWClassLen   = 64
	maxSemVerLen    = 128
	sha256Len       = 32
	ed25519SigLen   = 64
	ecdsaMinSigLen  = 8  // the smallest DER ECDSA signature we parse at all
	ecdsaMaxSigLen  = 72 // DER ECDSA P-256: 70 to 72 bytes
	securityCtrLen  = 4
	uuidLen         = 16
	maxPubKeyTLVLen = 256
)

// Header flags (MCUboot's IMAGE_F_*).
const (
	FlagPIC             = 0x00000001
	FlagEncryptedAES128 = 0x00000004
	FlagEncryptedAES256 = 0x00000008
	FlagNonBootable     = 0x00000010
	FlagRAMLoad         = 0x00000020
	FlagROMFixed        = 0x00000100
	FlagCompressedLZMA1 = 0x00000200
	FlagCompressedLZMA2 = 0x00000400
	FlagCompressedThumb = 0x00000800

	// flags this reader cannot honour: the payload would not be what was hashed
	// or what a slot can boot as is.
	unsupportedFlags = FlagEncryptedAES128 | FlagEncryptedAES256 |
		FlagCompressedLZMA1 | FlagCompressedLZMA2 | FlagCompressedThumb
	knownFlags = FlagPIC | FlagNonBootable | FlagRAMLoad | FlagROMFixed | unsupportedFlags
)

// TLV types. The values below 0x100 are MCUboot's; TLVHWClass and TLVSemVer
// are fieldpatch's own, in MCUboot's vendor range (0x00a0 to 0xfffe).
const (
	TLVKeyHash      uint16 = 0x01 // SHA-256 of the signing key's DER SubjectPublicKeyInfo
	TLVPubKey       uint16 = 0x02 // the signing key itself (DER SubjectPublicKeyInfo)
	TLVKeyID        uint16 = 0x03 // PSA key id (not supported for verification)
	TLVSHA256       uint16 = 0x10 // digest of the signed region
	TLVSHA384       uint16 = 0x11
	TLVSHA512       uint16 = 0x12
	TLVRSA2048      uint16 = 0x20
	TLVECDSASig     uint16 = 0x22 // ECDSA P-256 (DER) over the signed region
	TLVRSA3072      uint16 = 0x23
	TLVEd25519      uint16 = 0x24 // Ed25519 over the 32-byte digest
	TLVSigPure      uint16 = 0x25
	TLVEncRSA2048   uint16 = 0x30
	TLVEncKW        uint16 = 0x31
	TLVEncEC256     uint16 = 0x32
	TLVEncX25519    uint16 = 0x33
	TLVDependency   uint16 = 0x40
	TLVSecCounter   uint16 = 0x50 // u32 security counter (anti-rollback)
	TLVBootRecord   uint16 = 0x60
	TLVDecompSize   uint16 = 0x70
	TLVDecompSHA    uint16 = 0x71
	TLVDecompSig    uint16 = 0x72
	TLVCompDecSize  uint16 = 0x73
	TLVVendorUUID   uint16 = 0x74 // 16-byte vendor UUID
	TLVClassUUID    uint16 = 0x75 // 16-byte image class UUID
	TLVHWClass      uint16 = 0x4601
	TLVSemVer       uint16 = 0x4602
	tlvVendorResMin uint16 = 0x00a0
)

// tlvKind says where a TLV type may appear and whether this package acts on it.
type tlvKind struct {
	name      string
	protected bool // must be in the protected area (true) or the unprotected one (false)
	supported bool // false: recognised, but an image carrying it is refused
}

var tlvKinds = map[uint16]tlvKind{
	TLVKeyHash:     {"KEYHASH", false, true},
	TLVPubKey:      {"PUBKEY", false, true},
	TLVKeyID:       {"KEYID", false, false},
	TLVSHA256:      {"SHA256", false, true},
	TLVSHA384:      {"SHA384", false, false},
	TLVSHA512:      {"SHA512", false, false},
	TLVRSA2048:     {"RSA2048", false, false},
	TLVECDSASig:    {"ECDSASIG", false, true},
	TLVRSA3072:     {"RSA3072", false, false},
	TLVEd25519:     {"ED25519", false, true},
	TLVSigPure:     {"SIG_PURE", false, false},
	TLVEncRSA2048:  {"ENCRSA2048", false, false},
	TLVEncKW:       {"ENCKW", false, false},
	TLVEncEC256:    {"ENCEC256", false, false},
	TLVEncX25519:   {"ENCX25519", false, false},
	TLVDependency:  {"DEPENDENCY", true, true},
	TLVSecCounter:  {"SEC_CNT", true, true},
	TLVBootRecord:  {"BOOT_RECORD", true, true},
	TLVDecompSize:  {"DECOMP_SIZE", true, false},
	TLVDecompSHA:   {"DECOMP_SHA", true, false},
	TLVDecompSig:   {"DECOMP_SIGNATURE", true, false},
	TLVCompDecSize: {"COMP_DEC_SIZE", true, false},
	TLVVendorUUID:  {"VENDOR_UUID", true, true},
	TLVClassUUID:   {"CLASS_UUID", true, true},
	TLVHWClass:     {"FP_HW_CLASS", true, true},
	TLVSemVer:      {"FP_SEMVER", true, true},
}

// TLVName returns a readable name for a TLV type.
func TLVName(t uint16) string {
	if k, ok := tlvKinds[t]; ok {
		return k.name
	}
	if t >= tlvVendorResMin {
		return fmt.Sprintf("VENDOR_0x%04x", t)
	}
	return fmt.Sprintf("UNKNOWN_0x%02x", t)
}

// Version is the version field of the MCUboot header.
type Version struct {
	Major    uint8
	Minor    uint8
	Revision uint16
	Build    uint32
}

func (v Version) String() string {
	return fmt.Sprintf("%d.%d.%d+%d", v.Major, v.Minor, v.Revision, v.Build)
}

// Header is the fixed 32-byte image header.
type Header struct {
	Magic            uint32
	LoadAddr         uint32
	HeaderSize       uint16 // bytes before the payload, including padding
	ProtectedTLVSize uint16 // bytes of the protected TLV area, its info header included; 0 if none
	ImageSize        uint32 // bytes of payload
	Flags            uint32
	Version          Version
	Pad              uint32
}

// MarshalBinary encodes the header in its 32-byte little-endian form.
func (h *Header) MarshalBinary() ([]byte, error) {
	b := make([]byte, HeaderLen)
	le := binary.LittleEndian
	le.PutUint32(b[0:], h.Magic)
	le.PutUint32(b[4:], h.LoadAddr)
	le.PutUint16(b[8:], h.HeaderSize)
	le.PutUint16(b[10:], h.ProtectedTLVSize)
	le.PutUint32(b[12:], h.ImageSize)
	le.PutUint32(b[16:], h.Flags)
	b[20] = h.Version.Major
	b[21] = h.Version.Minor
	le.PutUint16(b[22:], h.Version.Revision)
	le.PutUint32(b[24:], h.Version.Build)
	le.PutUint32(b[28:], h.Pad)
	return b, nil
}

// decodeHeader reads the fields of a 32-byte header without judging them.
func decodeHeader(b []byte) Header {
	le := binary.LittleEndian
	return Header{
		Magic:            le.Uint32(b[0:]),
		LoadAddr:         le.Uint32(b[4:]),
		HeaderSize:       le.Uint16(b[8:]),
		ProtectedTLVSize: le.Uint16(b[10:]),
		ImageSize:        le.Uint32(b[12:]),
		Flags:            le.Uint32(b[16:]),
		Version: Version{
			Major:    b[20],
			Minor:    b[21],
			Revision: le.Uint16(b[22:]),
			Build:    le.Uint32(b[24:]),
		},
		Pad: le.Uint32(b[28:]),
	}
}

// TLV is one type-length-value record as found in an image.
type TLV struct {
	Type   uint16
	Offset int64 // of the TLV header, from the start of the image
	Value  []byte
}

// Name is the TLV type's readable name.
func (t TLV) Name() string { return TLVName(t.Type) }

func putTLV(b []byte, typ uint16, val []byte) []byte {
	b = binary.LittleEndian.AppendUint16(b, typ)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(val)))
	return append(b, val...)
}

// encodeArea returns a TLV area (info header and records), or nil if there are
// no records, as imgtool does.
func encodeArea(magic uint16, tlvs []TLV) ([]byte, error) {
	if len(tlvs) == 0 {
		return nil, nil
	}
	b := make([]byte, tlvInfoLen, 256)
	for _, t := range tlvs {
		if len(t.Value) > maxAreaLen {
			return nil, fmt.Errorf("TLV %s: %d bytes is more than a TLV can hold", TLVName(t.Type), len(t.Value))
		}
		b = putTLV(b, t.Type, t.Value)
	}
	if len(b) > maxAreaLen {
		return nil, fmt.Errorf("TLV area of %d bytes is larger than the format allows (%d)", len(b), maxAreaLen)
	}
	binary.LittleEndian.PutUint16(b[0:], magic)
	binary.LittleEndian.PutUint16(b[2:], uint16(len(b)))
	return b, nil
}
