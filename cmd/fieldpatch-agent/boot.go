package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
)

func runBoot(ctx context.Context, args []string, stdout io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", "boot", "--config FILE [--json] [--dry-run]",
		`Runs the reference A/B boot selector against the device the config file
describes (slots, boot environment, trusted keys, non-volatile store): a
pending trial boots while attempts are left and its image verifies, else it
is rolled back; the active slot boots if it verifies, else the other slot
(a fallback), else recovery. Every image is verified at every boot. The
decision is recorded in the boot environment before it is printed.

The first line of the output is the decision in the same form the U-Boot
script and GRUB configuration print:
  FIELDPATCH: booted=b reason=trial active=a trial=b left=2

Here exit 1 (refused) means recovery: no slot holds an image that verifies.`)
	cfgPath := fs.String("config", "", "device config file (JSON; see docs/BOOTLOADER.md)")
	asJSON := fs.Bool("json", false, "print the decision as JSON")
	dry := fs.Bool("dry-run", false, "decide without writing anything")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return cli.Usagef("unexpected argument %q", pos[0])
	}
	if *cfgPath == "" {
		return cli.Usagef("--config FILE is required")
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return cli.Failed(err)
	}
	dev, closeAll, err := cfg.Open(*dry)
	if err != nil {
		return cli.Failed(err)
	}
	defer closeAll()
	d, selErr := boot.Select(ctx, dev)
	if *dry {
		d.EnvSaved = false
	}
	if *asJSON {
		if err := cli.WriteJSON(stdout, d); err != nil {
			return cli.Failed(err)
		}
	} else {
		printDecision(stdout, d, *dry)
	}
	switch {
	case selErr != nil:
		return cli.Failed(selErr)
	case d.Boot == "":
		return cli.Refused(errors.New("no slot holds an image that verifies: recovery"))
	}
	return nil
}

// DecisionLine is the one-line form shared with the bootloader scripts.
func decisionLine(d boot.Decision) string {
	booted, trial := d.Boot, d.Trial
	if booted == "" {
		booted = "none"
	}
	if trial == "" {
		trial = "-"
	}
	return fmt.Sprintf("FIELDPATCH: booted=%s reason=%s active=%s trial=%s left=%d", booted, d.Reason, d.Active, trial, d.TrialLeft)
}

func printDecision(w io.Writer, d boot.Decision, dry bool) {
	fmt.Fprintln(w, decisionLine(d))
	for _, c := range d.Checks {
		if c.OK {
			fmt.Fprintf(w, "  slot %s: verifies (version %s, security counter %d)\n", c.Slot, c.Version, c.SecurityCounter)
		} else {
			fmt.Fprintf(w, "  slot %s: refused: %s\n", c.Slot, c.Problem)
		}
	}
	if d.NV != nil {
		fmt.Fprintf(w, "  non-volatile: security counter %d, key epoch %d\n", d.NV.Counter, d.NV.KeyEpoch)
	}
	for _, n := range d.Notes {
		fmt.Fprintf(w, "  note: %s\n", n)
	}
	switch {
	case dry:
		fmt.Fprintln(w, "  environment: dry run, nothing written")
	case d.EnvSaved:
		fmt.Fprintln(w, "  environment: saved")
	default:
		fmt.Fprintln(w, "  environment: unchanged")
	}
}

func runNV(args []string, stdout io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", "nv", "--config FILE [--init]",
		`Shows the non-volatile store (the anti-rollback security counter and the key
epoch; a file standing in for OTP/eFuse storage). With --init, creates it
for a newly provisioned device, with both values 0; an existing store is
never lowered. The agent raises the values at commit.`)
	cfgPath := fs.String("config", "", "device config file")
	initNV := fs.Bool("init", false, "create the store (provisioning)")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return cli.Usagef("unexpected argument %q", pos[0])
	}
	if *cfgPath == "" {
		return cli.Usagef("--config FILE is required")
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return cli.Failed(err)
	}
	nv := cfg.NVStore()
	if *initNV {
		if _, err := nv.Load(); err == nil {
			return cli.Failed(fmt.Errorf("%s already exists: a store is created once", nv.Path))
		}
		if err := nv.Init(boot.NVState{}); err != nil {
			return cli.Failed(err)
		}
	}
	s, err := nv.Load()
	if err != nil {
		return cli.Failed(err)
	}
	fmt.Fprintf(stdout, "security counter %d\nkey epoch %d\n", s.Counter, s.KeyEpoch)
	return nil
}

func runEnv(args []string, stdout io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", "env", "--config FILE [NAME=VALUE ...]",
		`Prints the boot environment the config names (U-Boot single or redundant,
the two-copy scheme, or GRUB), or changes it: NAME=VALUE sets a variable,
NAME= removes it. Changes are saved the power-safe way the layout allows, in
one save. Like fw_printenv/fw_setenv, for every layout fieldpatch uses.`)
	cfgPath := fs.String("config", "", "device config file")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if *cfgPath == "" {
		return cli.Usagef("--config FILE is required")
	}
	changes := map[string]string{}
	for _, a := range pos {
		k, v, ok := strings.Cut(a, "=")
		if !ok || k == "" {
			return cli.Usagef("%q: want NAME=VALUE (or NAME= to remove)", a)
		}
		changes[k] = v
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return cli.Failed(err)
	}
	dev, closeAll, err := cfg.Open(len(changes) == 0)
	if err != nil {
		return cli.Failed(err)
	}
	defer closeAll()
	env, err := dev.Env.Load()
	if err != nil {
		if len(changes) == 0 || !errors.Is(err, bootenv.ErrNoEnv) {
			return cli.Failed(err)
		}
		env = bootenv.Env{} // a blank environment gets its first values
	}
	if len(changes) > 0 {
		for k, v := range changes {
			if v == "" {
				delete(env, k)
			} else {
				env[k] = v
			}
		}
		if err := dev.Env.Save(env); err != nil {
			return cli.Failed(err)
		}
	}
	fmt.Fprint(stdout, env.String())
	return nil
}
