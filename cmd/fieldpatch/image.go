package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

func runImageBuild(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "image build", "--payload FILE --version V --security-counter N --hw-class C --key PRIV [--key PRIV2] -o OUT",
		`Builds a signed firmware image in the MCUboot layout: header, payload,
protected TLVs (security counter, hardware class, semantic version) and
unprotected TLVs (SHA-256, then a key hash and a signature per --key). Give
--key twice during a key rotation: devices that trust either key accept the
image. The payload is streamed, so any size up to 4 GiB works; the output is
written to a temporary file and renamed into place only when complete.

With --mcuboot, fieldpatch's own TLVs are left out and the output is what
MCUboot's imgtool makes from the same inputs (imgtool sign --pad-header -R 0).`)
	payload := fs.String("payload", "", "the firmware payload (required)")
	ver := fs.String("version", "", "semantic version MAJOR.MINOR.PATCH[-PRE][+BUILD] (required)")
	var sc, hdrSize, loadAddr, slotSize, align, maxAlign, erased, headerFill cli.Uint
	cli.UintVar(fs, &sc, "security-counter", 0, 0xffffffff, "anti-rollback security counter (required unless --mcuboot)")
	hw := fs.String("hw-class", "", "hardware class the image is for, e.g. smartlock-v2 (required unless --mcuboot)")
	var keys cli.Strings
	fs.Var(&keys, "key", "private signing key (PEM); repeat for several signatures")
	cli.UintVar(fs, &hdrSize, "header-size", image.DefaultHdrSize, 0xffff, "header size including padding")
	cli.UintVar(fs, &headerFill, "header-fill", 0, 0xff, "value of the header's padding bytes (imgtool's -R; its default is 0xff)")
	cli.UintVar(fs, &loadAddr, "load-addr", 0, 0xffffffff, "load address for RAM-load images")
	vendor := fs.String("vendor", "", "vendor UUID, or a name turned into one as imgtool --vid does")
	class := fs.String("class", "", "image class UUID, or a name turned into one as imgtool --cid does (needs --vendor)")
	mcuboot := fs.Bool("mcuboot", false, "MCUboot-compatible: no fieldpatch TLVs; the counter is optional")
	pad := fs.Bool("pad", false, "pad to --slot-size and append an MCUboot trailer")
	cli.UintVar(fs, &slotSize, "slot-size", 0, 0xffffffff, "slot size for --pad")
	cli.UintVar(fs, &align, "align", 8, 32, "flash write alignment for --pad: 1, 2, 4, 8, 16 or 32")
	cli.UintVar(fs, &maxAlign, "max-align", 0, 32, "maximum alignment for --pad: 8, 16 or 32 (default max(8, align))")
	cli.UintVar(fs, &erased, "erased", 0xff, 0xff, "erased flash value for --pad: 0xff or 0x00")
	confirm := fs.Bool("confirm", false, "with --pad: set image_ok so MCUboot boots the image without a test swap")
	out := fs.String("o", "", "output file (required)")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) > 0:
		return cli.Usagef("unexpected argument %q", pos[0])
	case *payload == "":
		return cli.Usagef("--payload FILE is required")
	case *ver == "":
		return cli.Usagef("--version is required")
	case *out == "":
		return cli.Usagef("-o OUT is required")
	case len(keys) == 0:
		return cli.Usagef("--key PRIV is required (repeat it to add signatures)")
	case !*mcuboot && !sc.Given:
		return cli.Usagef("--security-counter is required")
	case !*mcuboot && *hw == "":
		return cli.Usagef("--hw-class is required")
	case *class != "" && *vendor == "":
		return cli.Usagef("--class needs --vendor (the class UUID is derived within the vendor's namespace)")
	case *pad && !slotSize.Given:
		return cli.Usagef("--pad needs --slot-size")
	case !*pad && (slotSize.Given || *confirm):
		return cli.Usagef("--slot-size and --confirm only make sense with --pad")
	}

	o := image.BuildOptions{
		Version:           *ver,
		HWClass:           *hw,
		HeaderSize:        uint16(hdrSize.V),
		HeaderFill:        byte(headerFill.V),
		LoadAddr:          uint32(loadAddr.V),
		MCUbootCompatible: *mcuboot,
	}
	if sc.Given {
		v := uint32(sc.V)
		o.SecurityCounter = &v
	}
	if *vendor != "" {
		vid, err := image.ParseUUIDOrName(*vendor, image.NamespaceDNS)
		if err != nil {
			return cli.Usagef("--vendor: %v", err)
		}
		o.VendorUUID = &vid
		if *class != "" {
			cid, err := image.ParseUUIDOrName(*class, vid)
			if err != nil {
				return cli.Usagef("--class: %v", err)
			}
			o.ClassUUID = &cid
		}
	}
	if *pad {
		o.Pad = &image.PadOptions{SlotSize: int64(slotSize.V), Align: int(align.V), MaxAlign: int(maxAlign.V), Erased: byte(erased.V), Confirm: *confirm}
	}
	for _, k := range keys {
		s, err := trust.LoadPrivateKey(k)
		if err != nil {
			return cli.Failed(err)
		}
		o.Signers = append(o.Signers, s)
	}

	in, err := os.Open(*payload)
	if err != nil {
		return cli.Failed(err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return cli.Failed(err)
	}
	if !fi.Mode().IsRegular() {
		return cli.Usagef("--payload %s is not a regular file", *payload)
	}
	o.Progress = cli.Progress(os.Stderr, "building", fi.Size())

	img, err := writeAtomic(*out, func(w io.Writer) (*image.Image, error) {
		return image.Build(ctx, w, in, fi.Size(), o)
	})
	if err != nil {
		return err
	}
	r := img.Report(nil)
	fmt.Fprintf(stdout, "built %s: %s\n", *out, r.Summary())
	for _, s := range r.Signatures {
		fmt.Fprintf(stdout, "  signed with %s key %s\n", s.Alg, s.KeyHash)
	}
	fmt.Fprintf(stdout, "  sha256 of the signed region %s\n", r.SHA256)
	return nil
}

// writeAtomic writes a file through a temporary file in the same directory,
// fsyncs it and renames it into place only on success: a failed build leaves
// no output at all, and an existing file is replaced whole or not at all.
func writeAtomic(path string, write func(io.Writer) (*image.Image, error)) (*image.Image, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, cli.Failed(err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	img, err := write(f)
	if err != nil {
		f.Close()
		return nil, cli.Failed(err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, cli.Failed(err)
	}
	if err := f.Close(); err != nil {
		return nil, cli.Failed(err)
	}
	if err := os.Chmod(tmp, 0o644); err != nil {
		return nil, cli.Failed(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, cli.Failed(err)
	}
	return img, nil
}

func runImageInspect(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "image inspect", "[--json] FILE",
		`Shows what an image holds: header, versions, hardware class, security counter,
TLVs, signatures, and the MCUboot trailer if the image is padded to a slot.
Nothing is trusted: the digest is recomputed and compared with the SHA256 TLV,
but signatures are only checked by "image verify". Exits 1 if the file is not
a well-formed image.`)
	asJSON := fs.Bool("json", false, "print JSON instead of a table")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return cli.Usagef("want one image file, got %d arguments", len(pos))
	}
	img, err := cli.ReadImage(ctx, pos[0], image.TrailerMCUboot)
	if err != nil {
		return err
	}
	r := img.Report(nil)
	if *asJSON {
		return cli.WriteJSON(stdout, struct {
			File string `json:"file"`
			image.Report
		}{pos[0], r})
	}
	return r.WriteText(stdout, pos[0])
}

func runImageVerify(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "image verify", "--key PUB [--key PUB2] [--json] FILE",
		`Checks an image: its structure, the SHA-256 of the signed region, and its
signatures against the trusted public keys given with --key. The image is
valid when the digest matches and at least one signature by a trusted key
verifies (a signature by a trusted key that does not verify makes it
invalid). Exit 0 only when valid.`)
	var keys cli.Strings
	fs.Var(&keys, "key", "trusted public key (PEM); repeat to trust several")
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return cli.Usagef("want one image file, got %d arguments", len(pos))
	}
	if len(keys) == 0 {
		return cli.Usagef("--key PUB is required: verification means checking against keys you trust")
	}
	pubs, err := cli.PublicKeys(keys)
	if err != nil {
		return err
	}
	img, err := cli.ReadImage(ctx, pos[0], image.TrailerMCUboot)
	if err != nil {
		if *asJSON && cli.Code(err) == cli.ExitRefused {
			cli.WriteJSON(stdout, map[string]any{"file": pos[0], "valid": false, "error": err.Error()})
		}
		return err
	}
	v, verr := img.Verify(pubs)
	r := img.Report(v)
	if *asJSON {
		res := map[string]any{"file": pos[0], "valid": verr == nil, "image": r}
		if verr != nil {
			res["error"] = verr.Error()
		}
		if err := cli.WriteJSON(stdout, res); err != nil {
			return cli.Failed(err)
		}
	}
	if verr != nil {
		return cli.Refused(fmt.Errorf("refused: %w", verr))
	}
	if !*asJSON {
		fmt.Fprintf(stdout, "valid: %s: %s\n", pos[0], r.Summary())
		for _, s := range r.Signatures {
			state := "verified with a trusted key"
			if !*s.Trusted {
				state = "by a key not trusted here (ignored)"
			}
			fmt.Fprintf(stdout, "  %s signature by %s: %s\n", s.Alg, s.KeyHash[:16], state)
		}
	}
	return nil
}
