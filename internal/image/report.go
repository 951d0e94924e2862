package image

import (
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Report is a JSON-friendly description of an image, for `image inspect
// --json` and `image verify --json`.
type Report struct {
	Format          string       `json:"format"` // "fieldpatch" or "mcuboot"
	Version         string       `json:"version"`
	HeaderVersion   string       `json:"header_version"`
	HWClass         string       `json:"hw_class,omitempty"`
	SecurityCounter *uint32      `json:"security_counter,omitempty"`
	VendorUUID      string       `json:"vendor_uuid,omitempty"`
	ClassUUID       string       `json:"class_uuid,omitempty"`
	Header          ReportHeader `json:"header"`
	SignedLen       int64        `json:"signed_len"`
	Len             int64        `json:"len"`
	SHA256          string       `json:"sha256"`
	SHA256Matches   bool         `json:"sha256_matches"`
	Protected       []ReportTLV  `json:"protected_tlvs"`
	Unprotected     []ReportTLV  `json:"unprotected_tlvs"`
	Signatures      []ReportSig  `json:"signatures"`
	Trailer         *Trailer     `json:"trailer,omitempty"`
}

// ReportHeader is the header in a Report.
type ReportHeader struct {
	Magic            uint32 `json:"magic"`
	LoadAddr         uint32 `json:"load_addr"`
	HeaderSize       uint16 `json:"hdr_size"`
	ProtectedTLVSize uint16 `json:"protected_tlv_size"`
	ImageSize        uint32 `json:"img_size"`
	Flags            uint32 `json:"flags"`
}

// ReportTLV is one TLV in a Report.
type ReportTLV struct {
	Type   uint16 `json:"type"`
	Name   string `json:"name"`
	Offset int64  `json:"offset"`
	Len    int    `json:"len"`
	Data   string `json:"data"` // hex
}

// ReportSig is one signature in a Report. Trusted is set only by a
// verification.
type ReportSig struct {
	Alg     string `json:"alg"`
	KeyHash string `json:"key_hash"`
	Offset  int64  `json:"offset"`
	Trusted *bool  `json:"trusted,omitempty"`
}

// Report describes the image; v, if not nil, marks which signatures verified.
func (img *Image) Report(v *Verified) Report {
	r := Report{
		Format:        "mcuboot",
		Version:       img.Version().String(),
		HeaderVersion: img.Header.Version.String(),
		HWClass:       img.HWClass,
		Header: ReportHeader{img.Header.Magic, img.Header.LoadAddr, img.Header.HeaderSize,
			img.Header.ProtectedTLVSize, img.Header.ImageSize, img.Header.Flags},
		SignedLen:     img.SignedLen,
		Len:           img.Len,
		SHA256:        hex.EncodeToString(img.Digest[:]),
		SHA256Matches: img.StatedDigestMatches(),
		Trailer:       img.Trailer,
		Protected:     []ReportTLV{},
		Unprotected:   []ReportTLV{},
		Signatures:    []ReportSig{},
	}
	if img.Fieldpatch() {
		r.Format = "fieldpatch"
	}
	if img.HasSecurityCounter {
		sc := img.SecurityCounter
		r.SecurityCounter = &sc
	}
	if img.VendorUUID != nil {
		r.VendorUUID = UUIDString(img.VendorUUID)
	}
	if img.ClassUUID != nil {
		r.ClassUUID = UUIDString(img.ClassUUID)
	}
	for _, t := range img.Protected {
		r.Protected = append(r.Protected, ReportTLV{t.Type, t.Name(), t.Offset, len(t.Value), hex.EncodeToString(t.Value)})
	}
	for _, t := range img.Unprotected {
		r.Unprotected = append(r.Unprotected, ReportTLV{t.Type, t.Name(), t.Offset, len(t.Value), hex.EncodeToString(t.Value)})
	}
	for _, s := range img.Signatures {
		rs := ReportSig{Alg: AlgName(s.Type), KeyHash: s.KeyHash.String(), Offset: s.Offset}
		if v != nil {
			ok := false
			for _, k := range v.Keys {
				ok = ok || k == s.KeyHash
			}
			rs.Trusted = &ok
		}
		r.Signatures = append(r.Signatures, rs)
	}
	return r
}

// WriteText prints the report as a readable table headed by the image's name.
func (r Report) WriteText(w io.Writer, name string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t%s\n", k, fmt.Sprintf(format, args...)) }
	row("image", "%s", name)
	row("format", "%s", r.Format)
	row("version", "%s (header %s)", r.Version, r.HeaderVersion)
	if r.HWClass != "" {
		row("hardware class", "%s", r.HWClass)
	}
	if r.SecurityCounter != nil {
		row("security counter", "%d", *r.SecurityCounter)
	} else {
		row("security counter", "none")
	}
	if r.VendorUUID != "" {
		row("vendor UUID", "%s", r.VendorUUID)
	}
	if r.ClassUUID != "" {
		row("class UUID", "%s", r.ClassUUID)
	}
	row("header", "%d bytes, load address 0x%x, flags 0x%x", r.Header.HeaderSize, r.Header.LoadAddr, r.Header.Flags)
	row("payload", "%d bytes at offset 0x%x", r.Header.ImageSize, r.Header.HeaderSize)
	match := "matches the SHA256 TLV"
	if !r.SHA256Matches {
		match = "DOES NOT MATCH the SHA256 TLV: the image was altered"
	}
	row("signed region", "[0, 0x%x) sha256 %s, %s", r.SignedLen, r.SHA256, match)
	row("image length", "%d bytes", r.Len)
	if r.Trailer != nil {
		ok := "image_ok not set"
		if r.Trailer.ImageOK {
			ok = "image_ok set (confirmed)"
		}
		row("MCUboot trailer", "padded to a %d-byte slot, erased 0x%02x, max align %d, %s", r.Trailer.SlotSize, r.Trailer.ErasedValue, r.Trailer.MaxAlign, ok)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, area := range []struct {
		name string
		tlvs []ReportTLV
	}{{"protected TLVs", r.Protected}, {"unprotected TLVs", r.Unprotected}} {
		fmt.Fprintf(tw, "\n%s\n  offset\ttype\tname\tlen\tvalue\n", area.name)
		if len(area.tlvs) == 0 {
			fmt.Fprintf(tw, "  (none)\n")
		}
		for _, t := range area.tlvs {
			val := t.Data
			switch t.Type {
			case TLVHWClass, TLVSemVer:
				b, _ := hex.DecodeString(t.Data)
				val = fmt.Sprintf("%q", b)
			case TLVSecCounter:
				b, _ := hex.DecodeString(t.Data)
				val = fmt.Sprintf("%d", uint32(b[0])|uint32(b[1])<<8|uint32(b[2])<<16|uint32(b[3])<<24)
			}
			if len(val) > 48 {
				val = val[:44] + "..."
			}
			fmt.Fprintf(tw, "  0x%x\t0x%02x\t%s\t%d\t%s\n", t.Offset, t.Type, t.Name, t.Len, val)
		}
	}
	fmt.Fprintf(tw, "\nsignatures\n")
	for i, s := range r.Signatures {
		trust := "not checked (use image verify)"
		if s.Trusted != nil {
			trust = map[bool]string{true: "verified, trusted key", false: "key not trusted here"}[*s.Trusted]
		}
		fmt.Fprintf(tw, "  %d\t%s\tkey %s\t%s\n", i+1, s.Alg, s.KeyHash[:16], trust)
	}
	return tw.Flush()
}

// Summary is a one-line description of the image.
func (r Report) Summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", r.Format, r.Version)
	if r.HWClass != "" {
		fmt.Fprintf(&b, " for %s", r.HWClass)
	}
	if r.SecurityCounter != nil {
		fmt.Fprintf(&b, ", security counter %d", *r.SecurityCounter)
	}
	fmt.Fprintf(&b, ", %d bytes", r.Len)
	return b.String()
}
