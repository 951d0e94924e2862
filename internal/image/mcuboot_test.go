package image_test

import (
	"bytes"
	"context"
	"crypto"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// dumpinfo is the part of `imgtool dumpinfo -f json` the tests compare.
type dumpinfo struct {
	Header struct {
		Magic            uint32 `json:"magic"`
		LoadAddr         uint32 `json:"load_addr"`
		HdrSize          uint16 `json:"hdr_size"`
		ProtectedTLVSize uint16 `json:"protected_tlv_size"`
		ImgSize          uint32 `json:"img_size"`
		Flags            uint32 `json:"flags"`
		Version          string `json:"version"`
	} `json:"header"`
	TLVArea struct {
		Prot    []dumpTLV `json:"tlvs_prot"`
		Unprot  []dumpTLV `json:"tlvs"`
		HdrProt struct {
			Tot int `json:"tlv_tot"`
		} `json:"tlv_hdr_prot"`
		Hdr struct {
			Tot int `json:"tlv_tot"`
		} `json:"tlv_hdr"`
	} `json:"tlv_area"`
}

type dumpTLV struct {
	Type int    `json:"type"`
	Len  int    `json:"len"`
	Data string `json:"data"`
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func pubKey(t testing.TB, path string) crypto.PublicKey {
	t.Helper()
	k, err := trust.LoadPublicKey(path)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func privKey(t testing.TB, path string) crypto.Signer {
	t.Helper()
	k, err := trust.LoadPrivateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var (
	edPub = filepath.Join("testdata", "mcuboot", "ed25519.pub.pem")
	p256P = filepath.Join("testdata", "mcuboot", "ecdsa-p256.pub.pem")
)

// Every image MCUboot's imgtool made must read as imgtool read it, verify
// with its key, and be refused with the other key.
func TestImgtoolVectors(t *testing.T) {
	cases := []struct {
		file     string
		key      string
		otherKey string
	}{
		{"mcuboot/ed25519-sc5.bin", edPub, p256P},
		{"mcuboot/ed25519-nosc.bin", edPub, p256P},
		{"mcuboot/p256-sc5.bin", p256P, edPub},
		{"imgtool/ed25519-sc5-pad-confirm.bin", edPub, p256P},
		{"imgtool/ed25519-sc5-pad-confirm-ff.bin", edPub, p256P},
		{"imgtool/ed25519-sc5-pad-ff.bin", edPub, p256P},
		{"imgtool/ed25519-sc5-pad-confirm-align32.bin", edPub, p256P},
		{"imgtool/ed25519-sc5-uuid.bin", edPub, p256P},
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			path := filepath.Join("testdata", c.file)
			data := readFile(t, path)
			var want dumpinfo
			if err := json.Unmarshal(readFile(t, strings.TrimSuffix(path, ".bin")+".dumpinfo.json"), &want); err != nil {
				t.Fatal(err)
			}
			img, v, err := image.ReadVerify(context.Background(), bytes.NewReader(data), []crypto.PublicKey{pubKey(t, c.key)}, image.ReadOptions{})
			if err != nil {
				t.Fatalf("verify with the signing key: %v", err)
			}
			if len(v.Keys) != 1 {
				t.Errorf("verified keys = %d, want 1", len(v.Keys))
			}
			h := img.Header
			if h.Magic != want.Header.Magic || h.LoadAddr != want.Header.LoadAddr || h.HeaderSize != want.Header.HdrSize ||
				h.ProtectedTLVSize != want.Header.ProtectedTLVSize || h.ImageSize != want.Header.ImgSize || h.Flags != want.Header.Flags {
				t.Errorf("header = %+v, imgtool read %+v", h, want.Header)
			}
			if got := h.Version.String(); got != want.Header.Version {
				t.Errorf("version = %s, imgtool read %s", got, want.Header.Version)
			}
			compareTLVs(t, "protected", img.Protected, want.TLVArea.Prot)
			compareTLVs(t, "unprotected", img.Unprotected, want.TLVArea.Unprot)
			if int64(want.TLVArea.Hdr.Tot) != img.Len-img.SignedLen {
				t.Errorf("unprotected area = %d bytes, imgtool read %d", img.Len-img.SignedLen, want.TLVArea.Hdr.Tot)
			}
			// The SEC_CNT TLV, when present, is what imgtool was given.
			if want.Header.ProtectedTLVSize > 0 && (!img.HasSecurityCounter || img.SecurityCounter != 5) {
				t.Errorf("security counter = %v/%d, want 5", img.HasSecurityCounter, img.SecurityCounter)
			}
			if img.Fieldpatch() {
				t.Error("an imgtool image reads as a fieldpatch image")
			}

			_, _, err = image.ReadVerify(context.Background(), bytes.NewReader(data), []crypto.PublicKey{pubKey(t, c.otherKey)}, image.ReadOptions{})
			if !errors.Is(err, image.ErrUntrusted) {
				t.Errorf("verify with the other key: got %v, want ErrUntrusted", err)
			}
		})
	}
}

func compareTLVs(t *testing.T, area string, got []image.TLV, want []dumpTLV) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s TLVs: %d, imgtool read %d", area, len(got), len(want))
		return
	}
	for i := range got {
		if int(got[i].Type) != want[i].Type || len(got[i].Value) != want[i].Len || hex.EncodeToString(got[i].Value) != want[i].Data {
			t.Errorf("%s TLV %d = %s %x, imgtool read type %d %s", area, i, got[i].Name(), got[i].Value, want[i].Type, want[i].Data)
		}
	}
}

// The trailer imgtool --pad [--confirm] writes is accepted and reported.
func TestImgtoolTrailers(t *testing.T) {
	cases := []struct {
		file     string
		erased   byte
		maxAlign int
		imageOK  bool
	}{
		{"ed25519-sc5-pad-confirm.bin", 0x00, 8, true},
		{"ed25519-sc5-pad-confirm-ff.bin", 0xff, 8, true},
		{"ed25519-sc5-pad-ff.bin", 0xff, 8, false},
		{"ed25519-sc5-pad-confirm-align32.bin", 0xff, 32, true},
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			data := readFile(t, filepath.Join("testdata", "imgtool", c.file))
			img, err := image.Read(context.Background(), bytes.NewReader(data), image.ReadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			tr := img.Trailer
			if tr == nil {
				t.Fatal("no trailer reported")
			}
			if tr.SlotSize != int64(len(data)) || tr.ErasedValue != c.erased || tr.MaxAlign != c.maxAlign || tr.ImageOK != c.imageOK {
				t.Errorf("trailer = %+v, want slot %d erased 0x%02x align %d image_ok %v", *tr, len(data), c.erased, c.maxAlign, c.imageOK)
			}
			// With TrailerIgnore the same bytes read as the bare image.
			img2, err := image.Read(context.Background(), bytes.NewReader(data), image.ReadOptions{Trailer: image.TrailerIgnore})
			if err != nil || img2.Trailer != nil || img2.Len != img.Len {
				t.Errorf("TrailerIgnore: %v, trailer %v", err, img2.Trailer)
			}
		})
	}
}

// The vendor and class UUIDs imgtool derived from names are read back, and
// NameUUID derives the same values from the same names.
func TestImgtoolUUIDs(t *testing.T) {
	data := readFile(t, filepath.Join("testdata", "imgtool", "ed25519-sc5-uuid.bin"))
	img, err := image.Read(context.Background(), bytes.NewReader(data), image.ReadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vid, err := image.ParseUUIDOrName("fieldpatch.example", image.NamespaceDNS)
	if err != nil {
		t.Fatal(err)
	}
	cid, err := image.ParseUUIDOrName("smartlock-v2", vid)
	if err != nil {
		t.Fatal(err)
	}
	if got := image.UUIDString(img.VendorUUID); got != "2d7a26ce-c56d-5172-bdac-1529e491dfd7" || !bytes.Equal(img.VendorUUID, vid[:]) {
		t.Errorf("vendor UUID = %s, derived %s", got, image.UUIDString(vid[:]))
	}
	if got := image.UUIDString(img.ClassUUID); got != "93866710-8fcf-5b1b-993a-aa9b4c1df8dd" || !bytes.Equal(img.ClassUUID, cid[:]) {
		t.Errorf("class UUID = %s, derived %s", got, image.UUIDString(cid[:]))
	}
	// A literal UUID is taken as it is.
	u, err := image.ParseUUIDOrName("2d7a26ce-c56d-5172-bdac-1529e491dfd7", image.NamespaceDNS)
	if err != nil || u != vid {
		t.Errorf("literal UUID = %x, %v", u, err)
	}
}

// In MCUboot-compatible mode the builder reproduces imgtool's output byte
// for byte, padded or not.
func TestBuildMatchesImgtool(t *testing.T) {
	edKey := privKey(t, filepath.Join("testdata", "mcuboot", "ed25519.pem"))
	payload := readFile(t, filepath.Join("testdata", "mcuboot", "payload.bin"))
	five := uint32(5)
	vid, _ := image.ParseUUIDOrName("fieldpatch.example", image.NamespaceDNS)
	cid, _ := image.ParseUUIDOrName("smartlock-v2", vid)
	cases := []struct {
		want string
		opt  func(*image.BuildOptions)
	}{
		{"mcuboot/ed25519-sc5.bin", func(o *image.BuildOptions) {}},
		{"mcuboot/ed25519-nosc.bin", func(o *image.BuildOptions) { o.SecurityCounter = nil; o.Version = "2.0.0+0" }},
		{"imgtool/ed25519-sc5-pad-confirm.bin", func(o *image.BuildOptions) {
			o.Pad = &image.PadOptions{SlotSize: 0x20000, Align: 8, Erased: 0x00, Confirm: true}
		}},
		{"imgtool/ed25519-sc5-pad-confirm-ff.bin", func(o *image.BuildOptions) {
			o.HeaderFill = 0xff
			o.Pad = &image.PadOptions{SlotSize: 0x20000, Align: 8, Erased: 0xff, Confirm: true}
		}},
		{"imgtool/ed25519-sc5-pad-ff.bin", func(o *image.BuildOptions) {
			o.HeaderFill = 0xff
			o.Pad = &image.PadOptions{SlotSize: 0x20000, Align: 8, Erased: 0xff}
		}},
		{"imgtool/ed25519-sc5-pad-confirm-align32.bin", func(o *image.BuildOptions) {
			o.HeaderFill = 0xff
			o.Pad = &image.PadOptions{SlotSize: 0x20000, Align: 32, MaxAlign: 32, Erased: 0xff, Confirm: true}
		}},
		{"imgtool/ed25519-sc5-uuid.bin", func(o *image.BuildOptions) { o.VendorUUID, o.ClassUUID = &vid, &cid }},
	}
	for _, c := range cases {
		t.Run(c.want, func(t *testing.T) {
			o := image.BuildOptions{
				Version:           "1.2.3+4",
				SecurityCounter:   &five,
				HeaderSize:        0x200,
				MCUbootCompatible: true,
				Signers:           []crypto.Signer{edKey},
			}
			c.opt(&o)
			var out bytes.Buffer
			if _, err := image.Build(context.Background(), &out, bytes.NewReader(payload), int64(len(payload)), o); err != nil {
				t.Fatal(err)
			}
			want := readFile(t, filepath.Join("testdata", c.want))
			if !bytes.Equal(out.Bytes(), want) {
				t.Fatalf("built %d bytes, imgtool made %d; first difference at offset %d", out.Len(), len(want), firstDiff(out.Bytes(), want))
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
