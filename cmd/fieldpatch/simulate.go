package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/simdev"
	"github.com/fieldpatch/fieldpatch/internal/fleet"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

func runSimulatePayload(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "simulate payload", "--version V [--health ok|fail|crash] [--boot ok|crash] [--size BYTES] -o FILE",
		`Writes the payload of a simulated firmware: what it declares is how the
virtual devices of "fieldpatch simulate" behave when they run it (boots or
crashes; passes, fails or crashes in its health check). Build and sign it
into an image with "fieldpatch image build --payload FILE".`)
	version := fs.String("version", "", "the firmware version it reports (required)")
	health := fs.String("health", "ok", "its health check: ok, fail or crash")
	bootAs := fs.String("boot", "ok", "at boot: ok or crash")
	size := fs.Int("size", 1<<20, "payload size in bytes")
	out := fs.String("o", "", "output file (required)")
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	switch {
	case *version == "" || *out == "":
		return cli.Usagef("--version and -o are required")
	case *health != "ok" && *health != "fail" && *health != "crash", *bootAs != "ok" && *bootAs != "crash":
		return cli.Usagef("--health is ok, fail or crash; --boot is ok or crash")
	case *size < 512 || *size > 64<<20:
		return cli.Usagef("--size must be between 512 bytes and 64 MiB")
	}
	p := simdev.Payload(simdev.Behavior{Version: *version, DataFormat: 1, Boot: *bootAs, Health: *health, Migration: "none"}, *size)
	if err := os.WriteFile(*out, p, 0o644); err != nil {
		return cli.Failed(err)
	}
	fmt.Fprintf(stdout, "%s: simulated firmware %s (%d bytes; boot %s, health check %s)\n", *out, *version, len(p), *bootAs, *health)
	return nil
}

func runSimulate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "simulate", "--server URL --ca FILE --enroll-token TOKEN --factory IMAGE --image-key PUB [flags]",
		`Runs a fleet of virtual devices against a real server: each is the real
agent and boot selector on simulated flash (identical flash blocks shared
between devices, every byte still downloaded, hashed, written and verified
at boot), enrolled with the fleet token and talking HTTPS with mutual TLS
and TUF. Devices connect per check-in (TLS session resumption) from source
addresses spread over 127.1.0.0/16, so tens of thousands fit this host's
limits.

Time on the devices runs --speed times faster than real time; start the
server with the same "serve --time-scale" so that soak times agree.
Faults are percentages: of offers (power cuts), of downloads (drops,
stalls), of devices (offline for a while, slow links, misbehaving on the
first boot of new firmware).

Runs for --duration, or until --until-share of the fleet runs
--until-version; then powers every device on through the boot selector and
reports. Exit 0 when no device is bricked.`)
	conn := struct{ server, ca *string }{fs.String("server", envOr("FIELDPATCH_SERVER", "https://127.0.0.1:8443"), "the server's URL"),
		fs.String("ca", os.Getenv("FIELDPATCH_CA"), "the server's CA certificate (required)")}
	token := fs.String("enroll-token", "", "a fleet enrollment token for at least --devices devices (required)")
	factory := fs.String("factory", "", "the signed image every device starts with (required)")
	imageKey := fs.String("image-key", "", "the image-signing public key the devices trust (required)")
	hw := fs.String("hw-class", "", "the devices' hardware class (default: the factory image's)")
	n := fs.Int("devices", 1000, "virtual devices")
	speed := fs.Float64("speed", 1, "simulated seconds per real second")
	duration := fs.Duration("duration", 5*time.Minute, "how long to run (real time)")
	untilVersion := fs.String("until-version", "", "stop once --until-share of the fleet runs this version")
	untilShare := fs.Float64("until-share", 1, "see --until-version")
	work := fs.String("work", "", "where the devices' bundles and TUF caches go (default: a fresh directory under /dev/shm, removed at the end)")
	prefix := fs.String("id-prefix", "sim-", "device IDs are this and a number")
	addrs := fs.Int("source-addresses", 64, "loopback source addresses to spread connections over")
	jsonOut := fs.String("json", "", "write the final snapshot as JSON to this file")
	var fl fleet.Faults
	fs.Float64Var(&fl.PowerCut, "fault-power-cut", 0, "percent of offers followed by a power cut at a random point")
	fs.Float64Var(&fl.Drop, "fault-drop", 0, "percent of downloads whose link drops mid-way")
	fs.Float64Var(&fl.Stall, "fault-stall", 0, "percent of downloads that stall for a while")
	fs.Float64Var(&fl.Offline, "fault-offline", 0, "percent of devices whose link goes down for a while")
	fs.Float64Var(&fl.Slow, "fault-slow", 0, "percent of devices on a 64 KiB/s link")
	fs.Float64Var(&fl.Misbehave, "fault-misbehave", 0, "percent of devices on which new firmware fails its first health check")
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	if *conn.ca == "" || *token == "" || *factory == "" || *imageKey == "" {
		return cli.Usagef("--ca, --enroll-token, --factory and --image-key are required")
	}
	if *n < 1 || *n > 99999 || *speed <= 0 {
		return cli.Usagef("--devices must be 1 to 99999 and --speed positive")
	}
	caPEM, err := os.ReadFile(*conn.ca)
	if err != nil {
		return cli.Failed(err)
	}
	img, err := os.ReadFile(*factory)
	if err != nil {
		return cli.Failed(err)
	}
	pub, err := trust.LoadPublicKey(*imageKey)
	if err != nil {
		return cli.Failed(err)
	}
	if *hw == "" {
		info, err := peekHW(img)
		if err != nil {
			return cli.Refused(fmt.Errorf("%s: %w", *factory, err))
		}
		*hw = info
	}
	dir := *work
	if dir == "" {
		base := "/dev/shm"
		if fi, err := os.Stat(base); err != nil || !fi.IsDir() {
			base = os.TempDir()
		}
		if dir, err = os.MkdirTemp(base, "fieldpatch-sim-"); err != nil {
			return cli.Failed(err)
		}
		defer os.RemoveAll(dir)
	}
	defer fleet.TuneGC()()
	f, err := fleet.New(fleet.Config{Devices: *n, IDPrefix: *prefix, Server: *conn.server, CAPEM: caPEM, Token: *token,
		Dir: filepath.Join(dir, "fleet"), Factory: img, Keys: []boot.TrustedKey{{Key: pub, Name: filepath.Base(*imageKey)}},
		HWClass: *hw, Speed: *speed, Addresses: *addrs, Seed: uint64(time.Now().UnixNano())})
	if err != nil {
		return cli.Usagef("%v", err)
	}
	start := time.Now()
	if err := f.Enroll(ctx, 8, func(done int) {
		if done%1000 == 0 || done == *n {
			fmt.Fprintf(stdout, "enrolled %d/%d (%.0fs)\n", done, *n, time.Since(start).Seconds())
		}
	}); err != nil {
		return cli.Failed(err)
	}
	f.SetFaults(fl)
	f.Start(ctx)
	deadline := time.After(*duration)
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-deadline:
			break loop
		case <-tick.C:
		}
		st := f.Snapshot()
		fmt.Fprintf(stdout, "t=%4.0fs %s  updating %d  check-ins %d (%d failed) p99 %v  cuts %d drops %d stalls %d offline %d\n",
			time.Since(start).Seconds(), versionsLine(st.Versions), st.Updating, st.CheckIns, st.CheckInErrors, st.P99.Round(100*time.Microsecond),
			st.Faults.PowerCuts, st.Faults.Drops, st.Faults.Stalls, st.Faults.Offline)
		if *untilVersion != "" && st.Share(*untilVersion) >= *untilShare {
			break loop
		}
	}
	f.Stop()
	st := f.Snapshot()
	census := f.PowerOnAll(context.Background())
	fmt.Fprintf(stdout, "powered on through the boot selector: %s; bricked %d\n", versionsLine(census.Versions), len(census.Bricked))
	fmt.Fprintf(stdout, "received %.1f MiB; outcomes %v; check-ins %d, %d failed, p50 %v p99 %v; TLS sessions resumed %d, full handshakes %d; flash blocks shared: %d (%.1f MiB)\n",
		float64(st.Received)/(1<<20), st.Outcomes, st.CheckIns, st.CheckInErrors, st.P50, st.P99, st.Resumed, st.FullHandshakes, f.Pool().Blocks(), float64(f.Pool().Blocks())*16/1024)
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(map[string]any{"snapshot": st, "census": census}, "", "  ")
		if err := os.WriteFile(*jsonOut, b, 0o644); err != nil {
			return cli.Failed(err)
		}
	}
	if len(census.Bricked) > 0 {
		return cli.Failed(fmt.Errorf("%d devices bricked", len(census.Bricked)))
	}
	return nil
}

// peekHW reads an image's hardware class (not verified: the devices do).
func peekHW(img []byte) (string, error) {
	i, err := image.Peek(bytes.NewReader(img))
	if err != nil {
		return "", err
	}
	if i.HWClass == "" {
		return "", fmt.Errorf("the image names no hardware class: give --hw-class")
	}
	return i.HWClass, nil
}
