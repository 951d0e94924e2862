// Package deps writes down fieldpatch's import rules as data and checks them
// (its test runs the check over the whole module, as go/build's deps_test
// does for the standard library).
//
// The rules keep the two sides of the system apart:
//
//   - device code (internal/device/..., cmd/fieldpatch-agent) never imports
//     server code (internal/server/...), and server code never imports
//     device code;
//   - shared packages (internal/image, internal/trust, internal/proto,
//     internal/atomicfile, internal/cli, internal/testenv, internal/deps) import neither side;
//   - only the wiring at the top (cmd/fieldpatch, and internal/fleet, whose
//     virtual devices run real agent code against a real server) may use both;
//   - the agent binary's dependency list holds no server code and no
//     third-party module outside AgentModules.
package deps

import (
	"fmt"
	"sort"
	"strings"
)

// Module is the module path.
const Module = "github.com/fieldpatch/fieldpatch"

// Side is where a package belongs.
type Side string

const (
	Device  Side = "device"
	Server  Side = "server"
	Shared  Side = "shared"
	Wiring  Side = "wiring"
	Foreign Side = "foreign" // standard library or third-party
)

// sides maps path prefixes (relative to Module) to their side; the longest
// matching prefix wins.
var sides = map[string]Side{
	"cmd/fieldpatch-agent": Device,
	"internal/device":      Device,
	"bootloader":           Device,
	"internal/server":      Server,
	"cmd/fieldpatch":       Wiring,
	"internal/fleet":       Wiring,
	"internal/image":       Shared,
	"internal/atomicfile":  Shared,
	"internal/trust":       Shared,
	"internal/proto":       Shared,
	"internal/cli":         Shared,
	"internal/testenv":     Shared,
	"internal/deps":        Shared,
	"bench":                Wiring,
	"internal/attacks":     Wiring,
}

// allowed says which sides a side may import.
var allowed = map[Side][]Side{
	Device: {Device, Shared, Foreign},
	Server: {Server, Shared, Foreign},
	Shared: {Shared, Foreign},
	Wiring: {Device, Server, Shared, Wiring, Foreign},
}

// AgentModules are the third-party modules the agent binary may link.
// go-tuf v2 (TUF metadata and its client workflow) and what it links: its
// canonical JSON and signature code, and sigstore's signature package with
// the protobuf definitions that package carries. Eclipse Paho (the MQTT
// client for notifications) and what it links: gorilla/websocket (MQTT over
// WebSocket, unused here but linked), x/net's proxy dialer and x/sync.
// go-coap v3 and pion/dtls (CoAP over DTLS for constrained links) and what
// they link: pion's logging and transport, uber's atomic, dsnet's memfile
// (go-coap's block-wise buffers) and x/exp's constraints. The x/ modules
// are Go's own.
var AgentModules = []string{
	"github.com/eclipse/paho.mqtt.golang",
	"github.com/plgd-dev/go-coap/v3",
	"github.com/pion/dtls/v3",
	"github.com/pion/logging",
	"github.com/pion/transport/v5",
	"go.uber.org/atomic",
	"github.com/dsnet/golib/memfile",
	"golang.org/x/exp",
	"github.com/gorilla/websocket",
	"golang.org/x/net",
	"golang.org/x/sync",
	"github.com/theupdateframework/go-tuf/v2",
	"github.com/secure-systems-lab/go-securesystemslib",
	"github.com/sigstore/sigstore",
	"github.com/sigstore/protobuf-specs",
	"github.com/google/go-containerregistry",
	"github.com/opencontainers/go-digest",
	"github.com/cenkalti/backoff/v5",
	"google.golang.org/protobuf",
	"google.golang.org/genproto/googleapis/api",
	"golang.org/x/crypto",
	"golang.org/x/sys",
	"golang.org/x/term",
}

// SideOf classifies an import path. Test variants as `go list -test` names
// them ("p [p.test]", "p_test") belong to their package's side.
func SideOf(path string) Side {
	path, _, _ = strings.Cut(path, " [")
	path = strings.TrimSuffix(path, "_test")
	if path != Module && !strings.HasPrefix(path, Module+"/") {
		return Foreign
	}
	rel := strings.TrimPrefix(strings.TrimPrefix(path, Module), "/")
	best, side := -1, Side("")
	for prefix, s := range sides {
		if (rel == prefix || strings.HasPrefix(rel, prefix+"/")) && len(prefix) > best {
			best, side = len(prefix), s
		}
	}
	return side
}

// Package is what the check needs to know of a package (as `go list -json`
// prints it).
type Package struct {
	ImportPath string
	Name       string
	Imports    []string
	Deps       []string
	Module     *struct{ Path string }
	Standard   bool
	DepOnly    bool
}

// Check returns every broken rule, one line each.
func Check(pkgs []Package) []string {
	var bad []string
	for _, p := range pkgs {
		if p.Standard || p.DepOnly || SideOf(p.ImportPath) == Foreign || strings.HasSuffix(p.ImportPath, ".test") {
			continue
		}
		from := SideOf(p.ImportPath)
		if from == "" {
			bad = append(bad, fmt.Sprintf("%s: no side assigned: add it to deps.sides", p.ImportPath))
			continue
		}
		for _, imp := range p.Imports {
			to := SideOf(imp)
			if to == "" {
				to = "unassigned"
			}
			ok := false
			for _, a := range allowed[from] {
				ok = ok || a == to
			}
			if !ok {
				bad = append(bad, fmt.Sprintf("%s (%s) imports %s (%s)", p.ImportPath, from, imp, to))
			}
		}
	}
	sort.Strings(bad)
	return bad
}

// CheckAgent checks the agent binary's full dependency list: no server or
// wiring code, and third-party modules only from AgentModules.
func CheckAgent(agent Package, modules map[string]string) []string {
	var bad []string
	for _, d := range agent.Deps {
		switch SideOf(d) {
		case Server, Wiring:
			bad = append(bad, fmt.Sprintf("agent depends on %s", d))
		case Foreign:
			mod, ok := modules[d]
			if !ok || mod == "" {
				continue // standard library
			}
			allowedMod := false
			for _, m := range AgentModules {
				allowedMod = allowedMod || m == mod
			}
			if !allowedMod {
				bad = append(bad, fmt.Sprintf("agent links %s from module %s, which is not in deps.AgentModules", d, mod))
			}
		}
	}
	sort.Strings(bad)
	return bad
}
