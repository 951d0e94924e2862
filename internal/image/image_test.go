package image_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

var (
	newKeyPriv = filepath.Join("testdata", "keys", "ed25519-new.pem")
	newKeyPub  = filepath.Join("testdata", "keys", "ed25519-new.pub.pem")
	edPriv     = filepath.Join("testdata", "mcuboot", "ed25519.pem")
	p256Priv   = filepath.Join("testdata", "mcuboot", "ecdsa-p256.pem")
)

// Golden vectors: images of fieldpatch's own format, built from fixed keys
// (Ed25519 is deterministic). Run `go test ./internal/image -update` to
// rewrite them after a deliberate format change.
func TestGolden(t *testing.T) {
	payload := readFile(t, filepath.Join("testdata", "mcuboot", "payload.bin"))
	sc := uint32(7)
	cases := []struct {
		name string
		o    image.BuildOptions
	}{
		{"fieldpatch-ed25519.bin", image.BuildOptions{
			Version: "1.4.0-rc.1+build.7", SecurityCounter: &sc, HWClass: "smartlock-v2",
			Signers: []crypto.Signer{privKey(t, edPriv)},
		}},
		{"fieldpatch-dual-signed.bin", image.BuildOptions{
			Version: "2.0.0+17", SecurityCounter: &sc, HWClass: "smartlock-v2", HeaderSize: 0x400,
			Signers: []crypto.Signer{privKey(t, edPriv), privKey(t, newKeyPriv)},
		}},
		{"fieldpatch-padded.bin", image.BuildOptions{
			Version: "2.0.1", SecurityCounter: &sc, HWClass: "gateway.arm64", HeaderSize: 0x20,
			Signers: []crypto.Signer{privKey(t, newKeyPriv)},
			Pad:     &image.PadOptions{SlotSize: 0x8000, Align: 4, Erased: 0xff, Confirm: true},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var out bytes.Buffer
			if _, err := image.Build(context.Background(), &out, bytes.NewReader(payload), int64(len(payload)), c.o); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", "golden", c.name)
			if *update {
				if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want := readFile(t, path)
			if !bytes.Equal(out.Bytes(), want) {
				t.Fatalf("built image differs from %s at offset %d (run with -update after a deliberate change)", path, firstDiff(out.Bytes(), want))
			}
			img, err := readVerify(t, want, pubKey(t, edPub), pubKey(t, newKeyPub))
			if err != nil {
				t.Fatal(err)
			}
			sv, _ := image.ParseSemVer(c.o.Version)
			if img.SemVer != sv.String() || img.HWClass != c.o.HWClass || img.SecurityCounter != sc {
				t.Errorf("read back %q %q %d", img.SemVer, img.HWClass, img.SecurityCounter)
			}
		})
	}
}

// During a key rotation an image carries two signatures; a device that
// knows either key accepts it, one that knows neither refuses it.
func TestMultipleSignatures(t *testing.T) {
	payload := bytes.Repeat([]byte("firmware"), 1000)
	sc := uint32(1)
	var out bytes.Buffer
	_, err := image.Build(context.Background(), &out, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
		Version: "3.1.0", SecurityCounter: &sc, HWClass: "smartlock-v2",
		Signers: []crypto.Signer{privKey(t, edPriv), privKey(t, p256Priv), privKey(t, newKeyPriv)},
	})
	if err != nil {
		t.Fatal(err)
	}
	data := out.Bytes()
	for _, keys := range [][]string{{edPub}, {p256P}, {newKeyPub}, {edPub, p256P, newKeyPub}} {
		var pubs []crypto.PublicKey
		for _, k := range keys {
			pubs = append(pubs, pubKey(t, k))
		}
		img, v, err := image.ReadVerify(context.Background(), bytes.NewReader(data), pubs, image.ReadOptions{})
		if err != nil {
			t.Fatalf("keys %v: %v", keys, err)
		}
		if len(v.Keys) != len(keys) || v.Unknown != 3-len(keys) || len(img.Signatures) != 3 {
			t.Errorf("keys %v: verified %d, unknown %d", keys, len(v.Keys), v.Unknown)
		}
	}
	// A bad signature by one trusted key fails the image even when another
	// trusted signature is good.
	img, err := image.Read(context.Background(), bytes.NewReader(data), image.ReadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(data)
	bad[img.Signatures[1].Offset+10] ^= 1
	if _, err := readVerify(t, bad, pubKey(t, edPub), pubKey(t, p256P)); !errors.Is(err, image.ErrBadSignature) {
		t.Errorf("one bad trusted signature: got %v, want ErrBadSignature", err)
	}
	// The same key twice is refused at build time.
	_, err = image.Build(context.Background(), io.Discard, bytes.NewReader(payload), int64(len(payload)), image.BuildOptions{
		Version: "3.1.0", SecurityCounter: &sc, HWClass: "smartlock-v2",
		Signers: []crypto.Signer{privKey(t, edPriv), privKey(t, edPriv)},
	})
	if err == nil {
		t.Error("the same signing key twice was accepted")
	}
}

// Bad build input gets a clear error and writes nothing.
func TestBuildRefusesBadInput(t *testing.T) {
	sc := uint32(1)
	key := []crypto.Signer{privKey(t, edPriv)}
	payload := []byte("0123456789")
	cases := []struct {
		name string
		size int64
		o    image.BuildOptions
		want string // in the error message
	}{
		{"no key", 10, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, HWClass: "x"}, "no signing key"},
		{"no hardware class", 10, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, Signers: key}, "hardware class"},
		{"bad hardware class", 10, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, HWClass: "Smart Lock", Signers: key}, "Smart Lock"},
		{"no security counter", 10, image.BuildOptions{Version: "1.0.0", HWClass: "x", Signers: key}, "no security counter"},
		{"bad version", 10, image.BuildOptions{Version: "1.0.x", SecurityCounter: &sc, HWClass: "x", Signers: key}, "not a number"},
		{"major too large", 10, image.BuildOptions{Version: "256.0.0", SecurityCounter: &sc, HWClass: "x", Signers: key}, "does not fit"},
		{"header too small", 10, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, HWClass: "x", Signers: key, HeaderSize: 16}, "smaller than"},
		{"encrypted flag", 10, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, HWClass: "x", Signers: key, Flags: image.FlagEncryptedAES128}, "flags"},
		{"MCUboot mode with pre-release", 10, image.BuildOptions{Version: "1.0.0-rc.1", Signers: key, MCUbootCompatible: true}, "pre-release"},
		{"payload shorter than said", 11, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, HWClass: "x", Signers: key}, "ended after"},
		{"payload longer than said", 9, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, HWClass: "x", Signers: key}, "longer than"},
		{"slot too small", 10, image.BuildOptions{Version: "1.0.0", SecurityCounter: &sc, HWClass: "x", Signers: key,
			Pad: &image.PadOptions{SlotSize: 2048, Align: 8, Erased: 0xff}}, "do not fit"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var out bytes.Buffer
			_, err := image.Build(context.Background(), &out, bytes.NewReader(payload), c.size, c.o)
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
			// Input that can be judged before streaming writes nothing; a
			// payload of the wrong length is found only while streaming
			// (callers write to a temporary file, as the CLI does).
			if c.size == int64(len(payload)) && out.Len() != 0 {
				t.Errorf("%d bytes written before the error", out.Len())
			}
		})
	}
}

func TestSemVer(t *testing.T) {
	order := []string{"0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0"}
	for i := range order {
		for j := range order {
			a, err := image.ParseSemVer(order[i])
			if err != nil {
				t.Fatal(err)
			}
			b, _ := image.ParseSemVer(order[j])
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got := a.Compare(b); got != want {
				t.Errorf("Compare(%s, %s) = %d, want %d", a, b, got, want)
			}
		}
	}
	for _, bad := range []string{"", "1.2.3.4", "01.2.3", "1.2.x", "1.2.3-", "1.2.3-01", "1.2.3+", "1.2.3+a..b", "1.2.3-a_b"} {
		if _, err := image.ParseSemVer(bad); err == nil {
			t.Errorf("ParseSemVer(%q) accepted", bad)
		}
	}
	v, _ := image.ParseSemVer("1.2.3+4")
	if hv, err := v.HeaderVersion(); err != nil || hv != (image.Version{Major: 1, Minor: 2, Revision: 3, Build: 4}) {
		t.Errorf("HeaderVersion = %v, %v", hv, err)
	}
}

// The signatures are standard: OpenSSL verifies them over the signed region
// (ECDSA) or over its SHA-256 digest (Ed25519), with the PEM public keys.
func TestOpenSSLVerifiesSignatures(t *testing.T) {
	openssl := testenv.Command(t, "openssl")
	dir := t.TempDir()
	for _, c := range []struct{ file, pub string }{
		{"testdata/golden/fieldpatch-dual-signed.bin", edPub},
		{"testdata/mcuboot/p256-sc5.bin", p256P},
	} {
		data := readFile(t, c.file)
		img, err := readVerify(t, data, pubKey(t, c.pub), pubKey(t, newKeyPub))
		if err != nil {
			t.Fatal(err)
		}
		region := filepath.Join(dir, "region")
		digest := filepath.Join(dir, "digest")
		sig := filepath.Join(dir, "sig")
		sum := sha256.Sum256(data[:img.SignedLen])
		os.WriteFile(region, data[:img.SignedLen], 0o644)
		os.WriteFile(digest, sum[:], 0o644)
		os.WriteFile(sig, img.Signatures[0].Value, 0o644)
		var cmd *exec.Cmd
		if img.Signatures[0].Type == image.TLVEd25519 {
			cmd = exec.Command(openssl, "pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", c.pub, "-in", digest, "-sigfile", sig)
		} else {
			cmd = exec.Command(openssl, "dgst", "-sha256", "-verify", c.pub, "-signature", sig, region)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: openssl refused the signature: %v\n%s", c.file, err, out)
		}
		// And refuses it over a changed digest: the check can fail.
		sum[0] ^= 1
		os.WriteFile(digest, sum[:], 0o644)
		data[0x300] ^= 1
		os.WriteFile(region, data[:img.SignedLen], 0o644)
		if out, err := cmd.CombinedOutput(); err == nil {
			t.Fatalf("%s: openssl accepted a signature over changed data\n%s", c.file, out)
		}
	}
}

// Build and Read stream: a 2 GiB image goes through a pipe with a few
// hundred KiB of allocation, whatever the size.
func TestStreamingLargeImage(t *testing.T) {
	if testing.Short() {
		t.Skip("2 GiB through a pipe; skipped in -short")
	}
	const size = 2 << 30
	sc := uint32(9)
	pr, pw := io.Pipe()
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	errc := make(chan error, 1)
	go func() {
		_, err := image.Build(context.Background(), pw, io.LimitReader(zeroReader{}, size), size, image.BuildOptions{
			Version: "9.0.0", SecurityCounter: &sc, HWClass: "big", Signers: []crypto.Signer{privKey(t, edPriv)},
		})
		pw.CloseWithError(err)
		errc <- err
	}()
	img, _, err := image.ReadVerify(context.Background(), pr, []crypto.PublicKey{pubKey(t, edPub)}, image.ReadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&ms1)
	if img.Header.ImageSize != size {
		t.Errorf("image size %d", img.Header.ImageSize)
	}
	if alloc := ms1.TotalAlloc - ms0.TotalAlloc; alloc > 8<<20 {
		t.Errorf("building and verifying 2 GiB allocated %d bytes; streaming should need well under 8 MiB", alloc)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// A cancelled context stops a read part-way with the context's error.
func TestReadCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := image.Read(ctx, bytes.NewReader(baseImage(t)), image.ReadOptions{})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
}

// BenchmarkReadVerify measures verification of a 64 MiB image held in
// memory (no I/O): the cost of parsing, hashing and one Ed25519 check.
// bench/imageverify compares the whole path against openssl.
func BenchmarkReadVerify(b *testing.B) {
	const size = 64 << 20
	sc := uint32(1)
	var buf bytes.Buffer
	if _, err := image.Build(context.Background(), &buf, io.LimitReader(zeroReader{}, size), size, image.BuildOptions{
		Version: "1.0.0", SecurityCounter: &sc, HWClass: "bench", Signers: []crypto.Signer{privKey(b, edPriv)},
	}); err != nil {
		b.Fatal(err)
	}
	data := buf.Bytes()
	keys := []crypto.PublicKey{pubKey(b, edPub)}
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, _, err := image.ReadVerify(context.Background(), bytes.NewReader(data), keys, image.ReadOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

// Peek reads the same header and TLVs as Read without the payload.
func TestPeek(t *testing.T) {
	data := readFile(t, filepath.Join("testdata", "golden", "fieldpatch-dual-signed.bin"))
	img, err := image.Peek(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	full, _ := image.Read(context.Background(), bytes.NewReader(data), image.ReadOptions{})
	if img.SemVer != full.SemVer || img.HWClass != full.HWClass || img.SecurityCounter != full.SecurityCounter || img.Len != full.Len || len(img.Signatures) != 2 {
		t.Errorf("Peek %+v, Read %+v", img, full)
	}
	if _, err := image.Peek(bytes.NewReader(data[:100])); err == nil {
		t.Error("Peek accepted a truncated image")
	}
	if _, err := image.Peek(bytes.NewReader(make([]byte, 64))); !errors.Is(err, image.ErrBadMagic) {
		t.Errorf("Peek of zeros: %v", err)
	}
}
