// Command fieldpatch is the fieldpatch server and operator CLI: it makes
// signing keys, builds, inspects and verifies signed firmware images, runs
// the update server, and manages releases and devices on it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var commands = []command{
	{"key gen", "make a signing key pair (NAME.pem, NAME.pub.pem)", runKeyGen},
	{"image build", "build and sign a firmware image", runImageBuild},
	{"image inspect", "show what an image holds, without trusting it", runImageInspect},
	{"image verify", "check an image against trusted public keys (exit 0 only when valid)", runImageVerify},
	{"serve", "run the update server (HTTPS, TLS 1.3, SQLite, CA on first start)", runServe},
	{"release upload", "upload a signed image as a release (checked against the image keys)", runReleaseUpload},
	{"release list", "list releases", runReleaseList},
	{"release assign", "offer a release to a device or a group", runReleaseAssign},
	{"rollout create", "create a staged rollout: target, phases, soak, gates, windows, limits", runRolloutCreate},
	{"rollout list", "list rollouts", runRolloutList},
	{"rollout show", "show a rollout's progress, health, failures and history", runRolloutShow},
	{"rollout watch", "follow a rollout live until it settles or stops", runRolloutWatch},
	{"rollout start", "start a created rollout", rolloutAction(store.ActionStart)},
	{"rollout pause", "pause a rollout: devices not yet started wait", rolloutAction(store.ActionPause)},
	{"rollout resume", "resume a paused rollout (acknowledging a tripped gate)", rolloutAction(store.ActionResume)},
	{"rollout abort", "abort a rollout for good", rolloutAction(store.ActionAbort)},
	{"rollout promote", "move a rollout to its next phase now", rolloutAction(store.ActionPromote)},
	{"trust init", "set up the TUF repository: offline root and targets keys, first root", runTrustInit},
	{"trust status", "show the TUF repository's roles, versions, expiry and targets", runTrustStatus},
	{"trust publish", "sign a release into the TUF targets with the offline keys", runTrustPublish},
	{"trust rotate-root", "replace the root keys (signed by old and new)", runTrustRotate("root")},
	{"trust rotate-targets", "replace the targets keys (after a leak) and re-sign targets", runTrustRotate("targets")},
	{"trust revoke", "remove one key from the root (when enough others remain)", runTrustRevoke},
	{"trust image-keys", "tell devices which image-signing keys to trust, and revoke one at a key epoch", runTrustImageKeys},
	{"trust rotate-online", "replace the server's snapshot and timestamp keys (after a leak)", runTrustRotateOnline},
	{"device provision", "register a device and write its provisioning bundle", runDeviceProvision},
	{"device list", "list devices", runDeviceList},
	{"device show", "show a device and its updates", runDeviceShow},
	{"device retry", "offer a failed release to a device again", runDeviceRetry},
	{"device edit", "add or remove a device's groups and tags", runDeviceEdit},
	{"device revoke", "refuse a device from its next request on", runDeviceRevoke},
	{"device approve", "let in a device waiting for approval", runDeviceApprove},
	{"device pending", "list devices waiting for approval", runDevicePending},
	{"enroll-token create", "make a fleet enrollment token", runEnrollToken},
	{"api-token create", "make a named API token with a role (viewer, operator, admin)", runAPITokenCreate},
	{"api-token list", "list API tokens", runAPITokenList},
	{"api-token revoke", "stop an API token from working", runAPITokenRevoke},
	{"audit", "print the audit log of management changes", runAudit},
	{"simulate payload", "write the payload of a simulated firmware (how virtual devices running it behave)", runSimulatePayload},
	{"simulate", "run a fleet of virtual devices (real agent and boot selector) against a server, with faults", runSimulate},
	{"demo", "tell the whole story on this machine: a fleet, a bad release caught, a good one rolled out through faults", runDemo},
	{"version", "print the version", func(_ context.Context, _ []string, stdout, _ io.Writer) error {
		fmt.Fprintln(stdout, "fieldpatch", version)
		return nil
	}},
}

func usage(w io.Writer) {
	fmt.Fprintf(w, `fieldpatch: over-the-air updates for fleets of devices (server and operator CLI)

Usage: fieldpatch COMMAND [flags] [args]

Commands:
`)
	for _, c := range commands {
		fmt.Fprintf(w, "  %-20s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, `
Run "fieldpatch COMMAND --help" for a command's flags.

%s
`, cli.ExitCodeHelp)
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stdout)
		if len(args) == 0 {
			return cli.ExitUsage
		}
		return cli.ExitOK
	}
	for _, c := range commands {
		words := strings.Fields(c.name)
		if len(args) >= len(words) && strings.Join(args[:len(words)], " ") == c.name {
			err := c.run(ctx, args[len(words):], stdout, stderr)
			if err != nil && !errors.Is(err, flag.ErrHelp) {
				fmt.Fprintf(stderr, "fieldpatch %s: %v\n", c.name, err)
			}
			return cli.Code(err)
		}
	}
	fmt.Fprintf(stderr, "fieldpatch: unknown command %q\n\n", strings.Join(args, " "))
	usage(stderr)
	return cli.ExitUsage
}
