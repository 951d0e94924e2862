// Package testenv helps tests find the real peer tools they run against
// (openssl, fw_printenv, qemu, mosquitto...).
//
// A developer's quick `go test` may lack a tool; the test then skips. `make
// test` sets FIELDPATCH_REQUIRE_PEERS=1, which turns every such skip into a
// failure, so CI proves the interoperability claims instead of skipping them.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// RequirePeersEnv is the environment variable that makes missing peers fatal.
const RequirePeersEnv = "FIELDPATCH_REQUIRE_PEERS"

// PeersRequired reports whether missing peer tools must fail tests.
func PeersRequired() bool { return os.Getenv(RequirePeersEnv) == "1" }

// Command returns the path of a peer tool. When it is absent the test is
// skipped, or fails if peers are required.
func Command(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "peer tool %s is not installed (%v)", name, err)
	}
	return p
}

// Missing skips the test, or fails it when peers are required.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if PeersRequired() {
		t.Fatalf(format+" (%s=1: make test installs it; see scripts/test-deps.sh)", append(args, RequirePeersEnv)...)
	}
	t.Skipf(format, args...)
}
