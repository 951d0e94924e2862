package image_test

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/image"
)

// FuzzRead feeds arbitrary bytes to the parser: it must never panic, every
// error must be an *image.Error or a context error, and whatever it accepts
// must be self-consistent.
func FuzzRead(f *testing.F) {
	// Seeds are small whole images, so mutations reach every region (the
	// fuzzer stalls on seeds of many KiB). Each kind of image appears: plain
	// MCUboot, fieldpatch, dual-signed, ECDSA, padded with a trailer.
	sc := uint32(2)
	vid := image.NameUUID(image.NamespaceDNS, "fieldpatch.example")
	for i, o := range []image.BuildOptions{
		{Version: "1.0.0", SecurityCounter: &sc, HWClass: "a", HeaderSize: 32, Signers: []crypto.Signer{privKey(f, edPriv)}},
		{Version: "1.0.0+3", MCUbootCompatible: true, HeaderSize: 32, Signers: []crypto.Signer{privKey(f, p256Priv)}},
		{Version: "2.0.0-rc.1", SecurityCounter: &sc, HWClass: "b", HeaderSize: 64, VendorUUID: &vid, ClassUUID: &vid,
			Signers: []crypto.Signer{privKey(f, edPriv), privKey(f, newKeyPriv)}},
		{Version: "1.2.3", SecurityCounter: &sc, HWClass: "c", HeaderSize: 32, Signers: []crypto.Signer{privKey(f, edPriv)},
			Pad: &image.PadOptions{SlotSize: 1024, Align: 1, Erased: 0xff, Confirm: true}},
	} {
		var b bytes.Buffer
		payload := bytes.Repeat([]byte{byte(i)}, 16)
		if _, err := image.Build(context.Background(), &b, bytes.NewReader(payload), int64(len(payload)), o); err != nil {
			f.Fatal(err)
		}
		f.Add(b.Bytes())
	}
	f.Add([]byte{})
	f.Add([]byte{0x3d, 0xb8, 0xf3, 0x96})
	keys := []crypto.PublicKey{pubKey(f, edPub), pubKey(f, p256P), pubKey(f, newKeyPub)}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, pol := range []image.TrailerPolicy{image.TrailerMCUboot, image.TrailerIgnore} {
			img, err := image.Read(context.Background(), bytes.NewReader(data), image.ReadOptions{Trailer: pol})
			if err != nil {
				var ie *image.Error
				if !errors.As(err, &ie) {
					t.Fatalf("error %v is not an *image.Error", err)
				}
				if ie.Offset < 0 || ie.Offset > int64(len(data)) {
					t.Fatalf("error offset %d outside the %d-byte input", ie.Offset, len(data))
				}
				continue
			}
			if img.Len > int64(len(data)) || img.SignedLen > img.Len {
				t.Fatalf("lengths %d/%d for %d bytes", img.SignedLen, img.Len, len(data))
			}
			if pol == image.TrailerMCUboot && img.Trailer == nil && img.Len != int64(len(data)) {
				t.Fatalf("%d bytes after the image and no trailer reported", int64(len(data))-img.Len)
			}
			if _, err := img.Verify(keys); err != nil && !image.IsSecurity(err) {
				t.Fatalf("Verify: %v is not a security error", err)
			}
		}
	})
}
