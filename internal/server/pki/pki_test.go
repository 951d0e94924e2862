package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
)

func TestCAIssuesAndReloads(t *testing.T) {
	dir := t.TempDir()
	ca, created, err := LoadOrCreateCA(dir)
	if err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, "ca.key.pem")); fi.Mode().Perm() != 0o600 {
		t.Errorf("CA key mode %v", fi.Mode().Perm())
	}
	again, created, err := LoadOrCreateCA(dir)
	if err != nil || created || !again.Cert.Equal(ca.Cert) {
		t.Fatalf("reload: %v %v", created, err)
	}
	devKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pemCert, err := ca.IssueDevice("lock-17", devKey.Public())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ParseCert(pemCert)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("device certificate does not verify: %v", err)
	}
	if id, err := DeviceID(cert); err != nil || id != "lock-17" {
		t.Fatalf("DeviceID = %q %v", id, err)
	}
	srv, _, err := ca.LoadOrCreateServerCert(dir, []string{"127.0.0.1", "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(srv.Certificate[0])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "localhost"}); err != nil {
		t.Fatalf("server certificate: %v", err)
	}
	// Another CA's certificate does not verify.
	other, _, _ := LoadOrCreateCA(t.TempDir())
	foreign, _ := other.IssueDevice("lock-17", devKey.Public())
	fc, _ := ParseCert(foreign)
	if _, err := fc.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Fatal("a certificate from another CA verified")
	}
}
