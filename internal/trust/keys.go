package trust

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Key types for GenerateKey.
const (
	KeyEd25519 = "ed25519"
	KeyP256    = "p256"
)

// GenerateKey makes a new signing key of the given type.
func GenerateKey(typ string) (crypto.Signer, error) {
	switch typ {
	case KeyEd25519:
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		return priv, err
	case KeyP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	return nil, fmt.Errorf("key type %q: want %s or %s", typ, KeyEd25519, KeyP256)
}

// KeyType names the type of a public key, or "" if it is not one fieldpatch uses.
func KeyType(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return KeyEd25519
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() {
			return KeyP256
		}
	}
	return ""
}

// ErrExists is returned when a key file would be overwritten.
var ErrExists = errors.New("key file exists")

// WriteKeyPair writes NAME.pem (the private key, PKCS#8 PEM, mode 0600) and
// NAME.pub.pem (the public key, SubjectPublicKeyInfo PEM). It refuses to
// overwrite existing files, and writes each file completely (temporary file,
// fsync, rename) or not at all.
func WriteKeyPair(name string, key crypto.Signer) (privPath, pubPath string, err error) {
	privPath, pubPath = name+".pem", name+".pub.pem"
	for _, p := range []string{privPath, pubPath} {
		if _, err := os.Lstat(p); err == nil {
			return "", "", fmt.Errorf("%s: %w; choose another name or remove it first", p, ErrExists)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", "", err
		}
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", fmt.Errorf("encode private key: %w", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return "", "", fmt.Errorf("encode public key: %w", err)
	}
	if err := writeFileAtomic(privPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return "", "", err
	}
	if err := writeFileAtomic(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644); err != nil {
		os.Remove(privPath)
		return "", "", err
	}
	return privPath, pubPath, nil
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	// Link instead of rename so that a file created meanwhile is not replaced.
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s: %w", path, ErrExists)
		}
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

func readPEM(path string) (*pem.Block, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block found", path)
	}
	if _, ok := block.Headers["DEK-Info"]; ok || block.Type == "ENCRYPTED PRIVATE KEY" {
		return nil, fmt.Errorf("%s: encrypted keys are not supported; decrypt it with openssl pkey first", path)
	}
	return block, nil
}

// LoadPrivateKey reads a PKCS#8 (or SEC1 "EC PRIVATE KEY") PEM file holding an
// Ed25519 or ECDSA P-256 key.
func LoadPrivateKey(path string) (crypto.Signer, error) {
	block, err := readPEM(path)
	if err != nil {
		return nil, err
	}
	var key any
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "PUBLIC KEY":
		return nil, fmt.Errorf("%s holds a public key; signing needs the private key (NAME.pem, not NAME.pub.pem)", path)
	default:
		return nil, fmt.Errorf("%s: PEM block %q is not a private key", path, block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s, ok := key.(crypto.Signer)
	if !ok || KeyType(s.Public()) == "" {
		return nil, fmt.Errorf("%s: key type %T is not supported: use ed25519 or p256", path, key)
	}
	return s, nil
}

// LoadPublicKey reads a SubjectPublicKeyInfo PEM file holding an Ed25519 or
// ECDSA P-256 public key.
func LoadPublicKey(path string) (crypto.PublicKey, error) {
	block, err := readPEM(path)
	if err != nil {
		return nil, err
	}
	switch block.Type {
	case "PUBLIC KEY":
	case "PRIVATE KEY", "EC PRIVATE KEY":
		return nil, fmt.Errorf("%s holds a private key; pass the public key (NAME.pub.pem), which is all a verifier should have", path)
	default:
		return nil, fmt.Errorf("%s: PEM block %q is not a public key", path, block.Type)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if KeyType(pub) == "" {
		return nil, fmt.Errorf("%s: key type %T is not supported: use ed25519 or p256", path, pub)
	}
	return pub, nil
}

// ParsePublicKeyPEM reads an Ed25519 or ECDSA P-256 public key from PEM
// (SubjectPublicKeyInfo) bytes.
func ParsePublicKeyPEM(data []byte) (crypto.PublicKey, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("no PEM public key")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	if KeyType(pub) == "" {
		return nil, fmt.Errorf("key type %T is not supported: use ed25519 or p256", pub)
	}
	return pub, nil
}
