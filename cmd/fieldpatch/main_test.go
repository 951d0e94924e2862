package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

const vectors = "../../internal/image/testdata/mcuboot"

// fp runs the CLI in-process and returns its exit code and output.
func fp(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func mustFP(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errs := fp(t, args...)
	if code != 0 {
		t.Fatalf("fieldpatch %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// The path the README promises: key gen, build, inspect, verify, and a
// tampered copy refused.
func TestKeyBuildInspectVerify(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "signing")
	for _, typ := range []string{"ed25519", "p256"} {
		t.Run(typ, func(t *testing.T) {
			key := name + "-" + typ
			mustFP(t, "key", "gen", "--type", typ, "--out", key)
			fi, err := os.Stat(key + ".pem")
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("private key mode %v, want 0600", fi.Mode().Perm())
			}
			if code, _, errs := fp(t, "key", "gen", "--type", typ, "--out", key); code != cli.ExitFailure || !strings.Contains(errs, "exists") {
				t.Errorf("overwriting a key: exit %d %q", code, errs)
			}

			payload := filepath.Join(dir, "payload.bin")
			os.WriteFile(payload, bytes.Repeat([]byte("lock firmware "), 5000), 0o644)
			img := filepath.Join(dir, "fw-"+typ+".img")
			out := mustFP(t, "image", "build", "--payload", payload, "--version", "2.1.0-rc.2", "--security-counter", "4",
				"--hw-class", "smartlock-v2", "--key", key+".pem", "-o", img)
			if !strings.Contains(out, "fieldpatch 2.1.0-rc.2 for smartlock-v2, security counter 4") {
				t.Errorf("build said %q", out)
			}

			out = mustFP(t, "image", "inspect", img)
			for _, want := range []string{"2.1.0-rc.2", "smartlock-v2", "security counter  4", "matches the SHA256 TLV"} {
				if !strings.Contains(out, want) {
					t.Errorf("inspect output lacks %q:\n%s", want, out)
				}
			}
			var rep struct {
				File            string `json:"file"`
				Version         string `json:"version"`
				HWClass         string `json:"hw_class"`
				SecurityCounter uint32 `json:"security_counter"`
				Signatures      []struct {
					Alg string `json:"alg"`
				} `json:"signatures"`
			}
			if err := json.Unmarshal([]byte(mustFP(t, "image", "inspect", img, "--json")), &rep); err != nil {
				t.Fatal(err)
			}
			wantAlg := map[string]string{"ed25519": "ed25519", "p256": "ecdsa-p256"}[typ]
			if rep.Version != "2.1.0-rc.2" || rep.HWClass != "smartlock-v2" || rep.SecurityCounter != 4 || len(rep.Signatures) != 1 || rep.Signatures[0].Alg != wantAlg {
				t.Errorf("inspect --json = %+v", rep)
			}

			if out := mustFP(t, "image", "verify", "--key", key+".pub.pem", img); !strings.HasPrefix(out, "valid:") {
				t.Errorf("verify said %q", out)
			}
			data, _ := os.ReadFile(img)
			data[0x200+100] ^= 1
			bad := filepath.Join(dir, "bad-"+typ+".img")
			os.WriteFile(bad, data, 0o644)
			code, _, errs := fp(t, "image", "verify", "--key", key+".pub.pem", bad)
			if code != cli.ExitRefused || !strings.Contains(errs, "does not match") {
				t.Errorf("tampered image: exit %d, %q", code, errs)
			}
			code, _, errs = fp(t, "image", "verify", "--key", filepath.Join(vectors, "ed25519.pub.pem"), img)
			if code != cli.ExitRefused || !strings.Contains(errs, "no signature by a trusted key") {
				t.Errorf("foreign key: exit %d, %q", code, errs)
			}
		})
	}
}

// The key files are standard: OpenSSL reads them.
func TestOpenSSLReadsKeyFiles(t *testing.T) {
	openssl := testenv.Command(t, "openssl")
	dir := t.TempDir()
	for _, typ := range []string{"ed25519", "p256"} {
		key := filepath.Join(dir, typ)
		mustFP(t, "key", "gen", "--type", typ, "--out", key)
		out, err := exec.Command(openssl, "pkey", "-in", key+".pem", "-pubout").CombinedOutput()
		if err != nil {
			t.Fatalf("openssl pkey: %v\n%s", err, out)
		}
		pub, _ := os.ReadFile(key + ".pub.pem")
		if !bytes.Equal(out, pub) {
			t.Errorf("%s: openssl derives public key\n%s\nwe wrote\n%s", typ, out, pub)
		}
	}
}

// With --mcuboot the CLI reproduces imgtool's output byte for byte.
func TestBuildMCUbootMode(t *testing.T) {
	out := filepath.Join(t.TempDir(), "out.bin")
	mustFP(t, "image", "build", "--mcuboot", "--payload", filepath.Join(vectors, "payload.bin"), "--version", "1.2.3+4",
		"--security-counter", "5", "--header-size", "0x200", "--key", filepath.Join(vectors, "ed25519.pem"), "-o", out)
	got, _ := os.ReadFile(out)
	want, _ := os.ReadFile(filepath.Join(vectors, "ed25519-sc5.bin"))
	if !bytes.Equal(got, want) {
		t.Fatalf("built %d bytes that differ from imgtool's %d", len(got), len(want))
	}
	padded := filepath.Join(t.TempDir(), "padded.bin")
	mustFP(t, "image", "build", "--mcuboot", "--payload", filepath.Join(vectors, "payload.bin"), "--version", "1.2.3+4",
		"--security-counter", "5", "--header-fill", "0xff", "--key", filepath.Join(vectors, "ed25519.pem"),
		"--pad", "--slot-size", "0x20000", "--align", "32", "--max-align", "32", "--confirm", "-o", padded)
	got, _ = os.ReadFile(padded)
	want, _ = os.ReadFile("../../internal/image/testdata/imgtool/ed25519-sc5-pad-confirm-align32.bin")
	if !bytes.Equal(got, want) {
		t.Fatalf("padded build differs from imgtool's")
	}
}

// Bad command lines exit 2, missing files 3; a failed build leaves no
// output and an existing output file untouched.
func TestExitCodesAndNoPartialOutput(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(vectors, "ed25519.pem")
	payload := filepath.Join(vectors, "payload.bin")
	out := filepath.Join(dir, "out.img")
	cases := []struct {
		args []string
		code int
	}{
		{[]string{"image", "build", "--payload", payload}, cli.ExitUsage},
		{[]string{"image", "build", "--payload", payload, "--version", "1.0.0", "--hw-class", "x", "--key", key, "-o", out}, cli.ExitUsage},
		{[]string{"image", "build", "--payload", payload, "--version", "1.0.0", "--security-counter", "x1", "--hw-class", "x", "--key", key, "-o", out}, cli.ExitUsage},
		{[]string{"image", "build", "--payload", payload, "--version", "1.0.0", "--security-counter", "1", "--hw-class", "x", "--key", "missing.pem", "-o", out}, cli.ExitFailure},
		{[]string{"image", "build", "--payload", "missing.bin", "--version", "1.0.0", "--security-counter", "1", "--hw-class", "x", "--key", key, "-o", out}, cli.ExitFailure},
		{[]string{"image", "build", "--payload", payload, "--version", "1.0.0", "--security-counter", "1", "--hw-class", "x", "--key", key,
			"--pad", "--slot-size", "0x1000", "-o", out}, cli.ExitFailure},
		{[]string{"image", "build", "--payload", payload, "--version", "1.0.0", "--security-counter", "1", "--hw-class", "x",
			"--key", filepath.Join(vectors, "ed25519.pub.pem"), "-o", out}, cli.ExitFailure},
		{[]string{"image", "inspect"}, cli.ExitUsage},
		{[]string{"image", "inspect", "missing.img"}, cli.ExitFailure},
		{[]string{"image", "inspect", payload}, cli.ExitRefused},
		{[]string{"image", "verify", filepath.Join(vectors, "ed25519-sc5.bin")}, cli.ExitUsage},
		{[]string{"image", "frobnicate"}, cli.ExitUsage},
		{[]string{}, cli.ExitUsage},
		{[]string{"--help"}, cli.ExitOK},
		{[]string{"image", "build", "--help"}, cli.ExitOK},
	}
	for _, c := range cases {
		code, _, errs := fp(t, c.args...)
		if code != c.code {
			t.Errorf("%v: exit %d, want %d (%s)", c.args, code, c.code, errs)
		}
		if _, err := os.Stat(out); err == nil {
			t.Fatalf("%v: left %s behind", c.args, out)
		}
	}
	// An existing output survives a failed build unchanged.
	os.WriteFile(out, []byte("previous image"), 0o644)
	if code, _, _ := fp(t, "image", "build", "--payload", payload, "--version", "1.0.0", "--security-counter", "1", "--hw-class", "x",
		"--key", key, "--pad", "--slot-size", "0x1000", "-o", out); code == 0 {
		t.Fatal("build into a too-small slot succeeded")
	}
	if b, _ := os.ReadFile(out); string(b) != "previous image" {
		t.Errorf("failed build changed the existing output: %q", b)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*tmp*")); len(left) > 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
}

// The server's settings: file, then environment, then flags.
func TestServerConfigLayers(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "server.json")
	os.WriteFile(f, []byte(`{"listen": "127.0.0.1:9000", "data_dir": "/srv/fp", "poll_interval": "10m", "hosts": ["ota.example"]}`), 0o644)
	cfg, err := serverConfig(f)
	if err != nil || cfg.Listen != "127.0.0.1:9000" || cfg.DataDir != "/srv/fp" || cfg.PollInterval.Minutes() != 10 || len(cfg.Hosts) != 1 {
		t.Fatalf("from the file: %+v %v", cfg, err)
	}
	os.WriteFile(f, []byte(`{"listen": "x", "surprise": 1}`), 0o644)
	if _, err := serverConfig(f); cli.Code(err) != cli.ExitUsage {
		t.Errorf("unknown field: %v", err)
	}
	os.WriteFile(f, []byte(`{"poll_interval": "soon"}`), 0o644)
	if _, err := serverConfig(f); cli.Code(err) != cli.ExitUsage {
		t.Errorf("bad duration: %v", err)
	}
	if cfg, _ := serverConfig(""); cfg.Listen != "127.0.0.1:8443" || cfg.DataDir != "fieldpatch-data" || cfg.MQTTListen != "127.0.0.1:8883" {
		t.Errorf("defaults: %+v", cfg)
	}
	os.WriteFile(f, []byte(`{"mqtt_listen": "off"}`), 0o644)
	if cfg, err := serverConfig(f); err != nil || cfg.MQTTListen != "" {
		t.Errorf("mqtt_listen off: %q %v", cfg.MQTTListen, err)
	}
}
