package trust

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestKeyPairRoundTrip(t *testing.T) {
	dir := t.TempDir()
	for _, typ := range []string{KeyEd25519, KeyP256} {
		key, err := GenerateKey(typ)
		if err != nil {
			t.Fatal(err)
		}
		priv, pub, err := WriteKeyPair(filepath.Join(dir, typ), key)
		if err != nil {
			t.Fatal(err)
		}
		s, err := LoadPrivateKey(priv)
		if err != nil {
			t.Fatal(err)
		}
		p, err := LoadPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		if KeyType(s.Public()) != typ || KeyType(p) != typ {
			t.Errorf("%s: loaded %s / %s", typ, KeyType(s.Public()), KeyType(p))
		}
		if !s.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(p) {
			t.Errorf("%s: public key file does not match the private key", typ)
		}
		if _, _, err := WriteKeyPair(filepath.Join(dir, typ), key); !errors.Is(err, ErrExists) {
			t.Errorf("%s: overwrite: got %v, want ErrExists", typ, err)
		}
	}
	if _, err := GenerateKey("rsa"); err == nil {
		t.Error("rsa key type accepted")
	}
}

// Wrong files get errors that say what is wrong.
func TestLoadKeyErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		return p
	}
	key, _ := GenerateKey(KeyEd25519)
	priv, pub, err := WriteKeyPair(filepath.Join(dir, "k"), key)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 1024)
	rsaDER, _ := x509.MarshalPKCS8PrivateKey(rsaKey)
	rsaPubDER, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	rsaPriv := write("rsa.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: rsaDER})))
	rsaPub := write("rsa.pub.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: rsaPubDER})))
	garbage := write("garbage.pem", "not a key")
	encrypted := write("enc.pem", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")

	privCases := map[string]string{pub: "holds a public key", rsaPriv: "not supported", garbage: "no PEM block", encrypted: "encrypted", filepath.Join(dir, "none"): "no such file"}
	for path, want := range privCases {
		if _, err := LoadPrivateKey(path); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("LoadPrivateKey(%s) = %v, want %q", filepath.Base(path), err, want)
		}
	}
	pubCases := map[string]string{priv: "holds a private key", rsaPub: "not supported", garbage: "no PEM block"}
	for path, want := range pubCases {
		if _, err := LoadPublicKey(path); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("LoadPublicKey(%s) = %v, want %q", filepath.Base(path), err, want)
		}
	}
}
