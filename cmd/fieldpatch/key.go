package main

import (
	"context"
	"fmt"
	"io"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

func runKeyGen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "key gen", "--out NAME [--type ed25519|p256]",
		`Makes a signing key pair: NAME.pem holds the private key (PKCS#8 PEM, mode 0600)
and NAME.pub.pem the public key (SubjectPublicKeyInfo PEM). Existing files are
never overwritten. Ed25519 is the default; p256 (ECDSA P-256) is for devices
whose secure element needs it.`)
	typ := fs.String("type", trust.KeyEd25519, "key type: ed25519 or p256")
	out := fs.String("out", "", "file name prefix of the key pair (required)")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return cli.Usagef("unexpected argument %q", pos[0])
	}
	if *out == "" {
		return cli.Usagef("--out NAME is required")
	}
	key, err := trust.GenerateKey(*typ)
	if err != nil {
		return cli.Usagef("%v", err)
	}
	privPath, pubPath, err := trust.WriteKeyPair(*out, key)
	if err != nil {
		return cli.Failed(err)
	}
	kh, err := image.HashKey(key.Public())
	if err != nil {
		return cli.Failed(err)
	}
	fmt.Fprintf(stdout, "private key  %s (keep it offline)\npublic key   %s\ntype         %s\nkey hash     %s\n", privPath, pubPath, *typ, kh)
	return nil
}
