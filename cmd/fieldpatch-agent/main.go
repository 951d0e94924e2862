// Command fieldpatch-agent is the device daemon. In this version it checks
// images the way a device does before it installs or boots one, and runs
// the reference A/B boot selector against a device described by a config
// file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/image"
)

var version = "dev"

func usage(w io.Writer) {
	fmt.Fprintf(w, `fieldpatch-agent: the fieldpatch device agent

Usage: fieldpatch-agent COMMAND [flags] [args]

Commands:
  install    install an update (file or URL): verify, write the inactive slot, arm a trial
  resume     carry on the update the journal holds (run at every boot)
  run        the daemon: resume, then stay up until stopped
  commit     commit a trial by hand (skipping the remaining health checks)
  rollback   abandon the update: roll a trial back, or cancel one not yet booted
  status     the update in progress, the last outcome, what the device runs
  renew      renew the device certificate now
  boot       run the A/B boot selector: decide which slot boots, and record it
  env        print or change the boot environment (any layout)
  nv         show (or, at provisioning, create) the non-volatile store
  verify     check an image file or a slot against the device's trusted keys
  version    print the version

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
	if len(args) == 0 {
		usage(stderr)
		return cli.ExitUsage
	}
	var err error
	switch args[0] {
	case "help", "-h", "--help":
		usage(stdout)
		return cli.ExitOK
	case "version":
		fmt.Fprintln(stdout, "fieldpatch-agent", version)
		return cli.ExitOK
	case "verify":
		err = runVerify(ctx, args[1:], stdout)
	case "boot":
		err = runBoot(ctx, args[1:], stdout)
	case "nv":
		err = runNV(args[1:], stdout)
	case "env":
		err = runEnv(args[1:], stdout)
	case "install":
		err = runInstall(ctx, args[1:], stdout, stderr)
	case "resume":
		err = runResume(ctx, args[1:], stdout, stderr)
	case "run":
		err = runDaemon(ctx, args[1:], stdout, stderr)
	case "commit":
		err = runRequest(agent.EvCommitRequested, "commit", `Commits a trial now, skipping the health checks that have not run yet:
the trial slot becomes the active one and the non-volatile counter is raised.`)(ctx, args[1:], stdout, stderr)
	case "rollback":
		err = runRequest(agent.EvRollbackRequest, "rollback", `Abandons the update in progress: on a trial boot, puts the data back and
clears the trial (then reboots into the old slot); before the trial boot,
cancels the update and disarms the trial.`)(ctx, args[1:], stdout, stderr)
	case "status":
		err = runStatus(ctx, args[1:], stdout, stderr)
	case "renew":
		err = runRenew(ctx, args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "fieldpatch-agent: unknown command %q\n\n", args[0])
		usage(stderr)
		return cli.ExitUsage
	}
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stderr, "fieldpatch-agent %s: %v\n", args[0], err)
	}
	return cli.Code(err)
}

func runVerify(ctx context.Context, args []string, stdout io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", "verify", "--key PUB [--key PUB2] [--slot] [--json] FILE",
		`Checks an image as the device does: structure, SHA-256 of the signed region,
and a signature by one of the trusted keys. With --slot, FILE is a slot (a
partition or its image file): reading stops at the end of the image and
whatever follows it in the slot is ignored.`)
	var keys cli.Strings
	fs.Var(&keys, "key", "trusted public key (PEM); repeat to trust several")
	slot := fs.Bool("slot", false, "FILE is a slot: ignore what follows the image")
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return cli.Usagef("want one image file or slot, got %d arguments", len(pos))
	}
	if len(keys) == 0 {
		return cli.Usagef("--key PUB is required")
	}
	pubs, err := cli.PublicKeys(keys)
	if err != nil {
		return err
	}
	policy := image.TrailerMCUboot
	if *slot {
		policy = image.TrailerIgnore
	}
	img, err := cli.ReadImage(ctx, pos[0], policy)
	if err != nil {
		return err
	}
	v, err := img.Verify(pubs)
	if err != nil {
		return cli.Refused(fmt.Errorf("refused: %w", err))
	}
	r := img.Report(v)
	if *asJSON {
		return cli.WriteJSON(stdout, r)
	}
	fmt.Fprintf(stdout, "valid: %s: %s\n", pos[0], r.Summary())
	return nil
}
