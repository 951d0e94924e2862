// Package harness is what the benchmark programs share: a free loopback
// address, waiting for a server to be ready, stopping a child gracefully,
// and a work directory with a release key, images and the CLI (Work).
package harness

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// FreeAddr is a loopback address with a port free now.
func FreeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// WaitReady polls /healthz until the server answers; it returns the
// server's CA as a pool.
func WaitReady(base, caFile string) (*x509.CertPool, error) {
	var last error
	for range 200 {
		time.Sleep(50 * time.Millisecond)
		ca, err := os.ReadFile(caFile)
		if err != nil {
			last = err
			continue
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(ca)
		c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		resp, err := c.Get(base + "/healthz")
		if err != nil {
			last = err
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == 200 {
			return pool, nil
		}
		return pool, fmt.Errorf("/healthz: %d", resp.StatusCode)
	}
	return nil, fmt.Errorf("not ready: %v", last)
}

// Stop asks a child to stop (SIGINT) and kills it after grace.
func Stop(cmd *exec.Cmd, grace time.Duration) {
	cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		cmd.Process.Kill()
		<-done
	}
}

// PinSelf runs this program again pinned to the CPUs listed (taskset -c)
// and exits with its exit code; in the pinned copy it returns. Measuring
// a server on one core and its load on another keeps them from taking
// each other's time, and runs comparable.
func PinSelf(cpus string) {
	if os.Getenv("FIELDPATCH_BENCH_PINNED") != "" {
		return
	}
	self, err := os.Executable()
	if err != nil {
		return
	}
	cmd := exec.Command("taskset", append([]string{"-c", cpus, self}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), "FIELDPATCH_BENCH_PINNED=1")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			os.Exit(ee.ExitCode())
		}
		fmt.Fprintln(os.Stderr, "taskset:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// CLI runs the fieldpatch binary in dir bin with arguments and returns
// its output; a failure carries the command and what it printed.
func CLI(bin string) func(args ...string) (string, error) {
	fp := filepath.Join(bin, "fieldpatch")
	return func(args ...string) (string, error) {
		out, err := exec.Command(fp, args...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("fieldpatch %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out), nil
	}
}

// Work is a benchmark run's work directory: a release signing key in
// Keys, images built there, and the fieldpatch CLI.
type Work struct {
	Dir, Keys string
	CLI       func(args ...string) (string, error)
}

// NewWork makes a work directory under base ("" for the system's
// temporary directory) and a release signing key in it. done removes it,
// unless keep is set (its path is then printed).
func NewWork(base, prefix, bin string, keep bool) (w *Work, done func(), err error) {
	dir, err := os.MkdirTemp(base, prefix)
	if err != nil {
		return nil, nil, err
	}
	done = func() { os.RemoveAll(dir) }
	if keep {
		fmt.Println("work directory:", dir)
		done = func() {}
	}
	w = &Work{Dir: dir, Keys: filepath.Join(dir, "keys"), CLI: CLI(bin)}
	if err := os.MkdirAll(w.Keys, 0o700); err != nil {
		done()
		return nil, nil, err
	}
	if _, err := w.CLI("key", "gen", "--out", filepath.Join(w.Keys, "release")); err != nil {
		done()
		return nil, nil, err
	}
	return w, done, nil
}

// ImageKey is the release key's public half, for `serve --image-key`.
func (w *Work) ImageKey() string { return filepath.Join(w.Keys, "release.pub.pem") }

// Image builds a signed image of version (hardware class bench-lock,
// security counter 1) with a payload of size bytes, and returns its path.
func (w *Work) Image(version string, size int) (string, error) {
	payload := filepath.Join(w.Dir, "payload-"+version)
	if _, err := w.CLI("simulate", "payload", "--version", version, "--size", fmt.Sprint(size), "-o", payload); err != nil {
		return "", err
	}
	img := filepath.Join(w.Dir, version+".img")
	_, err := w.CLI("image", "build", "--payload", payload, "--version", version, "--security-counter", "1", "--hw-class", "bench-lock",
		"--key", filepath.Join(w.Keys, "release.pem"), "-o", img)
	return img, err
}

// Remote is the CLI pointed at a running server (its URL and data
// directory).
func (w *Work) Remote(url, data string) func(args ...string) (string, error) {
	return func(args ...string) (string, error) {
		return w.CLI(append(args, "--server", url, "--data-dir", data)...)
	}
}

// Publish sets up the server's TUF repository, uploads img as release id
// and publishes it in the signed targets.
func (w *Work) Publish(remote func(args ...string) (string, error), id, img string) error {
	tuf := filepath.Join(w.Keys, "tuf")
	if _, err := remote("trust", "init", "--keys", tuf); err != nil {
		return err
	}
	if _, err := remote("release", "upload", "--id", id, img); err != nil {
		return err
	}
	_, err := remote("trust", "publish", id, "--keys", tuf)
	return err
}
