package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/link"
	"github.com/fieldpatch/fieldpatch/internal/device/tufclient"
	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// openRunner loads the config and makes a runner whose log goes to stderr
// and to the update log in the state directory.
func openRunner(cfgPath string, stderr io.Writer) (*agent.Runner, *agent.Config, func(), error) {
	cfg, err := agent.LoadConfig(cfgPath)
	if err != nil {
		return nil, nil, nil, cli.Failed(err)
	}
	stateDir := cfg.Path(cfg.StateDir)
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		return nil, nil, nil, cli.Failed(err)
	}
	logFile, err := os.OpenFile(filepath.Join(stateDir, "update.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, nil, cli.Failed(err)
	}
	lg := slog.New(slog.NewTextHandler(io.MultiWriter(stderr, logFile), nil))
	r, closeDev, err := cfg.NewRunner(lg)
	if err != nil {
		logFile.Close()
		return nil, nil, nil, cli.Failed(err)
	}
	if os.Getenv("FIELDPATCH_TEST_PAUSE_AT") != "" {
		r.AtPhase = testPause
	}
	if f, ok := stderr.(*os.File); ok {
		r.Progress = func(what string, done, total int64) {
			if p := cli.Progress(f, what, total); p != nil {
				p(done, total)
			}
		}
	}
	return r, cfg, func() { closeDev(); logFile.Close() }, nil
}

// testPause is a test-only pause point: when the runner enters the phase
// named by FIELDPATCH_TEST_PAUSE_AT (after persisting it, before its
// effects), the agent writes FIELDPATCH_TEST_PAUSE_FILE and waits to be
// killed. The kill test uses it to stop the agent in every phase exactly.
func testPause(p agent.Phase) {
	if string(p) != os.Getenv("FIELDPATCH_TEST_PAUSE_AT") {
		return
	}
	os.WriteFile(os.Getenv("FIELDPATCH_TEST_PAUSE_FILE"), []byte(p), 0o644)
	select {}
}

// finish turns the runner's stop into the command's result.
func finish(stdout io.Writer, st agent.State, err error) error {
	switch {
	case errors.Is(err, agent.ErrReboot):
		if st.Phase == agent.PhaseRollingBack {
			fmt.Fprintf(stdout, "phase %s: data restored and trial cleared; reboot the device to return to slot %s\n", st.Phase, st.Update.FromSlot)
		} else {
			fmt.Fprintf(stdout, "phase %s: reboot the device to continue (the boot selector then boots slot %s on trial)\n", st.Phase, st.Update.ToSlot)
		}
		return nil
	case err != nil:
		return cli.Failed(err)
	}
	if st.Phase == agent.PhaseIdle && st.Last != nil {
		fmt.Fprintf(stdout, "%s: %s -> %s", st.Last.Result, st.Last.From, st.Last.To)
		if st.Last.Reason != "" {
			fmt.Fprintf(stdout, " (%s)", st.Last.Reason)
		}
		fmt.Fprintln(stdout)
		if st.Last.Result == agent.ResultFailed {
			return cli.Refused(errors.New(st.Last.Reason))
		}
		return nil
	}
	fmt.Fprintf(stdout, "phase %s\n", st.Phase)
	return nil
}

func runInstall(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", "install", "--config FILE [--version V --security-counter N --downgrade] FILE|URL",
		`Installs an update: downloads it (URLs; resumable), verifies it against the
device's trusted keys, refuses an image below the device's security counter,
for other hardware, or older than the running version (unless --downgrade),
runs the pre-install hooks, streams it into the inactive slot while hashing,
re-reads and verifies the slot, and arms a trial boot. Then it reboots
(reboot_command) or asks for a reboot. After the reboot, "resume" (run at
every boot) carries on: migrate-data, health-check, commit or rollback.

--version and --security-counter describe the update as an offer would, so
it can be refused before anything is downloaded.`)
	cfgPath := fs.String("config", "", "device config file")
	ver := fs.String("version", "", "the version the update is said to be")
	var sc cli.Uint
	cli.UintVar(fs, &sc, "security-counter", 0, 0xffffffff, "the security counter the update is said to have")
	down := fs.Bool("downgrade", false, "a deliberate downgrade: allow a lower version with an equal security counter")
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if *cfgPath == "" || len(pos) != 1 {
		return cli.Usagef("want --config FILE and one image file or URL")
	}
	r, cfg, done, err := openRunner(*cfgPath, stderr)
	if err != nil {
		return err
	}
	defer done()
	src := pos[0]
	if !agent.IsURL(src) {
		if src, err = filepath.Abs(src); err != nil {
			return cli.Failed(err)
		}
	}
	offer := &agent.Offer{Version: *ver, SecurityCounter: uint32(sc.V), HasCounter: sc.Given, Downgrade: *down, HWClass: cfg.HWClass}
	if *ver == "" && !sc.Given {
		offer.HWClass = ""
	}
	st, err := r.Load()
	if err != nil {
		return cli.Failed(err)
	}
	if st.Phase != agent.PhaseIdle {
		return cli.Failed(fmt.Errorf("an update is in progress (phase %s): run resume, or rollback to cancel it", st.Phase))
	}
	st, err = r.Install(ctx, src, offer)
	return finish(stdout, st, err)
}

func runResume(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return resume(ctx, args, stdout, stderr, "resume", `Carries on whatever the journal says, from what booted: run it at every
boot (a systemd unit does). On a trial boot it prepares the revert material,
runs migrate-data and health-check, and commits or rolls back; back on the
old slot after a failed trial it restores the data and reports the rollback;
interrupted downloads and installs continue.`, false)
}

func runDaemon(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return resume(ctx, args, stdout, stderr, "run", `Runs the agent as the device's daemon: carries on whatever the journal says
(as resume does), then stays up until it is stopped (SIGINT or SIGTERM).
With a link to an update server in the config ("link": {"bundle": DIR}), it
checks in, installs what is offered, reports its progress and outcome (again
until the server acknowledges it), and exits when a reboot is needed.`, true)
}

// resume carries on the journal; stay keeps the process up afterwards.
func resume(ctx context.Context, args []string, stdout, stderr io.Writer, name, about string, stay bool) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", name, "--config FILE", about)
	cfgPath := fs.String("config", "", "device config file")
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	if *cfgPath == "" {
		return cli.Usagef("--config FILE is required")
	}
	r, cfg, done, err := openRunner(*cfgPath, stderr)
	if err != nil {
		return err
	}
	defer done()
	if stay && cfg.Link != nil {
		l, err := openLink(ctx, cfg, stderr, false)
		if err != nil {
			return err
		}
		l.Logf = func(format string, args ...any) { fmt.Fprintf(stderr, format+"\n", args...) }
		r.Fetcher = &agent.HTTPFetcher{Client: l.HTTP}
		if err := checkOffersWithTUF(r, l); err != nil {
			return err
		}
		var srv agent.Server = l
		if cfg.Link.MQTT != "" {
			// Notifications wake the daemon; progress reports go over MQTT
			// while it is up (outcomes always over HTTPS).
			wake := make(chan struct{}, 1)
			m, err := l.DialMQTT(cfg.Link.MQTT, func() {
				select {
				case wake <- struct{}{}:
				default: // a wake-up is already pending
				}
			})
			if err != nil {
				fmt.Fprintf(stderr, "mqtt: %v (polling only)\n", err)
			} else {
				defer m.Close()
				r.Wake = wake
				srv = link.WithMQTT{Server: l, MQTT: m}
			}
		}
		err = r.Daemon(ctx, srv)
		switch {
		case errors.Is(err, agent.ErrReboot):
			fmt.Fprintln(stdout, "reboot required to continue the update")
			return nil
		case ctx.Err() != nil:
			return nil
		}
		return cli.Failed(err)
	}
	st, err := r.Start(ctx)
	if err := finish(stdout, st, err); err != nil || !stay {
		return err
	}
	<-ctx.Done()
	return nil
}

// checkOffersWithTUF makes the agent check every offer against the
// server's signed TUF targets when the bundle carries a trusted root: the
// image's length, SHA-256 and custom fields then come from there.
func checkOffersWithTUF(r *agent.Runner, l *link.Link) error {
	root, err := l.Bundle.TUFRoot()
	if err != nil {
		return cli.Failed(err)
	}
	if root == nil {
		return nil
	}
	tc := &tufclient.Client{Dir: filepath.Join(r.StateDir, "tuf"), FactoryRoot: root, HTTP: l.HTTP, BaseURL: l.URL(proto.PathTUF),
		Now: l.Clock.Now, KeysFile: r.KeysFile}
	r.CheckOffer = tc.CheckOffer
	return nil
}

// openLink opens the link to the server: it enrolls first when the
// config says how and there is no bundle yet, and renews the certificate
// now with force. Without force, renewal is the link's business: before
// each check-in, when a third of the lifetime is left, and a failure there
// does not stop a device whose certificate is still valid.
func openLink(ctx context.Context, cfg *agent.Config, stderr io.Writer, force bool) (*link.Link, error) {
	dir := cfg.Path(cfg.Link.Bundle)
	if _, err := os.Stat(filepath.Join(dir, "bundle.json")); err != nil && cfg.Link.Enroll != nil {
		e := cfg.Link.Enroll
		ec := link.EnrollConfig{Server: e.Server, CAFile: cfg.Path(e.CA), DeviceID: e.DeviceID}
		if e.TokenFile != "" {
			tok, err := os.ReadFile(cfg.Path(e.TokenFile))
			if err != nil {
				return nil, cli.Failed(err)
			}
			ec.Token = strings.TrimSpace(string(tok))
		}
		if e.Poll != "" {
			ec.Poll, _ = time.ParseDuration(e.Poll)
		}
		fmt.Fprintf(stderr, "enrolling %s with %s\n", e.DeviceID, e.Server)
		if err := link.Enroll(ctx, ec, dir, func(m string) { fmt.Fprintln(stderr, m) }); err != nil {
			return nil, cli.Failed(err)
		}
	}
	l, err := link.OpenWith(dir, link.Options{CoAP: cfg.Link.CoAP, CoAPAuth: cfg.Link.CoAPAuth})
	if err != nil {
		return nil, cli.Failed(err)
	}
	if force {
		if _, err := l.Renew(ctx); err != nil { // Renew also switches l to the new identity
			return nil, cli.Failed(fmt.Errorf("renew the device certificate: %w", err))
		}
	}
	return l, nil
}

func runRenew(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", "renew", "--config FILE",
		`Renews the device's certificate now: a new key, certified by the server
with the current certificate, replacing the old pair atomically. The daemon
does this by itself when a third of the certificate's lifetime is left.`)
	cfgPath := fs.String("config", "", "device config file")
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return cli.Failed(err)
	}
	if cfg.Link == nil {
		return cli.Usagef("the config has no link to a server")
	}
	l, err := openLink(ctx, cfg, stderr, true)
	if err != nil {
		return err
	}
	cert, err := l.Certificate()
	if err != nil {
		return cli.Failed(err)
	}
	fmt.Fprintf(stdout, "renewed: valid until %s\n", cert.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

func runRequest(kind agent.EventKind, name, about string) func(context.Context, []string, io.Writer, io.Writer) error {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs := cli.NewFlags(stdout, "fieldpatch-agent", name, "--config FILE", about)
		cfgPath := fs.String("config", "", "device config file")
		if _, err := cli.ParseFlags(fs, args); err != nil {
			return err
		}
		if *cfgPath == "" {
			return cli.Usagef("--config FILE is required")
		}
		r, _, done, err := openRunner(*cfgPath, stderr)
		if err != nil {
			return err
		}
		defer done()
		before, err := r.Load()
		if err != nil {
			return cli.Failed(err)
		}
		f, err := r.Facts()
		if err != nil {
			return cli.Failed(err)
		}
		st, err := r.Handle(ctx, agent.Event{Kind: kind, Facts: f})
		if err == nil && st.Phase == before.Phase && st.Phase != agent.PhaseIdle || err == nil && before.Phase == agent.PhaseIdle {
			return cli.Failed(fmt.Errorf("nothing to %s in phase %s", name, before.Phase))
		}
		return finish(stdout, st, err)
	}
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch-agent", "status", "--config FILE [--json]",
		`Shows the update in progress (phase, versions, slots) or the last outcome,
and what the device runs: the booted slot and why, the running version, the
non-volatile counter and key epoch.`)
	cfgPath := fs.String("config", "", "device config file")
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	if *cfgPath == "" {
		return cli.Usagef("--config FILE is required")
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return cli.Failed(err)
	}
	r, closeDev, err := cfg.NewRunner(nil)
	if err != nil {
		return cli.Failed(err)
	}
	defer closeDev()
	st, err := r.Load()
	if err != nil {
		return cli.Failed(err)
	}
	f, err := r.Facts()
	if err != nil {
		return cli.Failed(err)
	}
	if *asJSON {
		return cli.WriteJSON(stdout, map[string]any{"device": f, "journal": st})
	}
	fmt.Fprintf(stdout, "running   %s in slot %s (boot reason %s; active slot %s)\n", f.RunningVersion, f.Booted, f.BootReason, f.Active)
	fmt.Fprintf(stdout, "nv        security counter %d, key epoch %d\n", f.NVCounter, f.KeyEpoch)
	if u := st.Update; u != nil {
		fmt.Fprintf(stdout, "update    %s: %s -> %s, slot %s -> %s, phase %s", u.ID, u.FromVersion, u.Image.VersionOr(u.Source), u.FromSlot, u.ToSlot, st.Phase)
		if u.TrialStep != "" {
			fmt.Fprintf(stdout, " (%s)", u.TrialStep)
		}
		fmt.Fprintln(stdout)
	} else {
		fmt.Fprintln(stdout, "update    none in progress")
	}
	if st.Last != nil {
		fmt.Fprintf(stdout, "last      %s %s -> %s %s\n", st.Last.Result, st.Last.From, st.Last.To, st.Last.Reason)
	}
	return nil
}
