// Package fleet simulates a fleet of devices against a real update server:
// each virtual device is the real boot selector and the real agent (state
// machine, TUF checks, verification, installation, trial boot, commit or
// rollback) on the simulated storage of internal/device/simdev, talking
// HTTPS with mutual TLS over loopback. Identical flash blocks are shared
// between devices (slot.BlockPool) so that tens of thousands fit in
// memory; every byte still flows through download, hashing, writing and
// boot-time verification.
//
// Faults are injected as shares of devices or downloads: power cuts at
// random points (some aimed at slot and boot-environment writes), links
// dropped or stalled mid-download, links down for a while, slow links,
// and devices on which new firmware misbehaves on its first boot.
//
// Time on the device side is compressed: every wait of the agent (the
// poll interval the server gives, back-offs, retries) lasts 1/Speed of
// its simulated length. Run the server with the same scale
// (`fieldpatch serve --time-scale`) so that soak times and silences agree.
// Certificate and TUF expiry stay on real time.
package fleet

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/link"
	"github.com/fieldpatch/fieldpatch/internal/device/simdev"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/device/tufclient"
	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Config describes a fleet.
type Config struct {
	Devices  int
	IDPrefix string // device IDs are IDPrefix + a 5-digit number (default "sim-")
	Server   string // the server's URL
	CAPEM    []byte // the server's CA certificate
	Token    string // a fleet enrollment token
	Dir      string // bundles and TUF caches (a tmpfs is best)
	Factory  []byte // the image every device starts with, in slot a
	SlotSize int64  // bytes of each slot (default 2 MiB)
	Keys     []boot.TrustedKey
	HWClass  string
	// Speed is how many simulated seconds pass per real second on the
	// devices (default 1).
	Speed float64
	// Addresses is how many loopback source addresses (127.1.0.0/16 and
	// up) the devices' connections are spread over (default 64).
	Addresses int
	// StartSpread is the real time over which devices power on for the
	// first time, each at a random point of it (default a second per 500
	// devices). A fleet that has run for a while has its check-ins spread
	// over the poll interval: give the poll interval's real length.
	StartSpread time.Duration
	// MaxRequests bounds the requests in flight at once across the
	// simulator, from the dial to the answer's last byte (0: no bound). A
	// real device runs its request on its own CPU; one process simulating
	// tens of thousands on a few cores cannot, and a connection starved of
	// CPU mid-handshake is closed by the server's deadline. With a bound,
	// devices queue before they connect, and each request in flight keeps
	// its share of the CPU. The check-in latencies measured include that
	// queueing. A download holds its slot to the end and the device sends
	// progress reports meanwhile: give more slots than the server lets
	// devices download at once.
	MaxRequests int
	Seed        uint64
	Log         *slog.Logger
	// TimeZones are given to devices in turn (none: no time zone).
	TimeZones []string
}

// Faults are the faults injected, each a percentage.
type Faults struct {
	PowerCut  float64 // of offers: power cuts at random points of the update that follows
	Drop      float64 // of downloads: the link drops mid-download
	Stall     float64 // of downloads: the link stalls for a while mid-download
	Offline   float64 // of devices: the link is down for a while
	Slow      float64 // of devices: a bandwidth cap
	Misbehave float64 // of devices: new firmware fails its first health check

	// SlowRate is the slow links' cap in bytes per second (default 64 KiB/s,
	// well above the TUF client's slow-retrieval floor of 1 KiB/s).
	SlowRate int64
	// OfflineWithin is the real time over which offline periods start, and
	// OfflineFor their simulated length (defaults 60s and 20m).
	OfflineWithin, OfflineFor time.Duration
	// StallFor is a stall's real length (default 3s).
	StallFor time.Duration
}

// Fleet is a running simulation.
type Fleet struct {
	cfg   Config
	pool  *slot.BlockPool
	devs  []*Device
	stats Stats

	faults   atomic.Pointer[Faults]
	requests chan struct{} // Config.MaxRequests slots, or nil
	wg       sync.WaitGroup
	cancel   context.CancelFunc
	start    time.Time
}

// Device is one virtual device.
type Device struct {
	ID  string
	f   *Fleet
	sim *simdev.Device
	dir string
	lnk *link.Link
	rng *rand.Rand // device goroutine only
	src net.IP

	version atomic.Pointer[string]
	phase   atomic.Pointer[string]

	// faults, set by SetFaults and read by the device
	slow         atomic.Bool
	offlineFrom  atomic.Int64 // unix nanos; the link is down from..until
	offlineUntil atomic.Int64
	wasOffline   atomic.Bool
	misbehave    atomic.Bool // apply at the next power-on
	failures     int         // check-ins failed in a row (device goroutine)
	desynced     bool        // its first poll wait was drawn at random
	stop         atomic.Pointer[context.CancelFunc]
}

// GCPercent is the garbage collector setting the simulator's programs use:
// a fleet is gigabytes of long-lived pointers that the default (100) scans
// over and over while every update allocates megabytes; memory is cheaper
// here than the CPU it would cost.
const GCPercent = 400

// TuneGC sets the garbage collector for a fleet in this process: GCPercent,
// and a soft memory limit of three quarters of the machine's memory so the
// lazier collection never runs it out. It returns what restores both.
func TuneGC() (restore func()) {
	pct := debug.SetGCPercent(GCPercent)
	limit := debug.SetMemoryLimit(memTotal() * 3 / 4)
	return func() {
		debug.SetGCPercent(pct)
		debug.SetMemoryLimit(limit)
	}
}

// memTotal is the machine's memory (MemTotal), or 8 GiB if unknown.
func memTotal() int64 {
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				if kib, err := strconv.ParseInt(f[1], 10, 64); err == nil {
					return kib << 10
				}
			}
		}
	}
	return 8 << 30
}

// New makes the fleet's devices (factory fresh, not yet enrolled).
func New(cfg Config) (*Fleet, error) {
	if cfg.Devices <= 0 || cfg.Server == "" || len(cfg.CAPEM) == 0 || cfg.Dir == "" || len(cfg.Factory) == 0 {
		return nil, errors.New("fleet: devices, server, CA, directory and factory image are required")
	}
	if cfg.Devices > 99999 {
		return nil, errors.New("fleet: at most 99,999 devices")
	}
	if cfg.IDPrefix == "" {
		cfg.IDPrefix = "sim-"
	}
	if cfg.Speed <= 0 {
		cfg.Speed = 1
	}
	if cfg.SlotSize <= 0 {
		cfg.SlotSize = 2 << 20
	}
	if cfg.Addresses <= 0 {
		cfg.Addresses = 64
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	f := &Fleet{cfg: cfg, pool: slot.NewBlockPool(), start: time.Now()}
	if cfg.MaxRequests > 0 {
		f.requests = make(chan struct{}, cfg.MaxRequests)
	}
	f.stats.init()
	f.faults.Store(&Faults{})
	for i := 0; i < cfg.Devices; i++ {
		sd, err := simdev.NewShared(cfg.Factory, cfg.Keys, cfg.HWClass, f.pool, cfg.SlotSize)
		if err != nil {
			return nil, fmt.Errorf("fleet: factory image: %w", err)
		}
		sd.KeepBoots = 4
		sd.Log = cfg.Log
		d := &Device{ID: fmt.Sprintf("%s%05d", cfg.IDPrefix, i+1), f: f, sim: sd,
			rng: rand.New(rand.NewPCG(cfg.Seed, uint64(i)))}
		d.dir = filepath.Join(cfg.Dir, d.ID)
		a := i % cfg.Addresses
		d.src = net.IPv4(127, byte(1+a/65536%254), byte(a/256%256), byte(a%256))
		if d.src[15] == 0 { // skip .0 host parts
			d.src[15] = 255
		}
		v := "unknown"
		d.version.Store(&v)
		sd.Power.OnCut(d.onCut)
		sd.Online = d.online
		f.devs = append(f.devs, d)
	}
	return f, nil
}

// Pool is the shared block pool (its size says how much flash memory the
// whole fleet takes).
func (f *Fleet) Pool() *slot.BlockPool { return f.pool }

// Enroll enrolls every device with the fleet token (concurrently), writing
// each bundle under Dir; progress hears each one done.
func (f *Fleet) Enroll(ctx context.Context, workers int, progress func(done int)) error {
	caFile := filepath.Join(f.cfg.Dir, "ca.pem")
	if err := os.MkdirAll(f.cfg.Dir, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(caFile, f.cfg.CAPEM, 0o644); err != nil {
		return err
	}
	if workers <= 0 {
		workers = 8
	}
	jobs := make(chan *Device)
	errc := make(chan error, workers)
	var done atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range jobs {
				err := link.Enroll(ctx, link.EnrollConfig{Server: f.cfg.Server, CAFile: caFile, DeviceID: d.ID, Token: f.cfg.Token}, d.dir, nil)
				if err == nil {
					d.lnk, err = link.OpenWith(d.dir, link.Options{Dial: d.dial, SessionCache: &sessionCache{d: d},
						// as the TLS stacks of small devices do (mbedTLS, wolfSSL):
						// X25519 alone, without the ML-KEM hybrid
						Curves: []tls.CurveID{tls.X25519}})
				}
				if err == nil && f.requests != nil {
					d.lnk.HTTP.Transport = &boundedTransport{rt: d.lnk.HTTP.Transport, sem: f.requests}
				}
				if err != nil {
					errc <- fmt.Errorf("enrolling %s: %w", d.ID, err)
					return
				}
				if progress != nil {
					progress(int(done.Add(1)))
				}
			}
		}()
	}
	var err error
feed:
	for _, d := range f.devs {
		select {
		case jobs <- d:
		case err = <-errc:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errc:
		default:
		}
	}
	return err
}

// Start powers every device on and lets it live (boot, check in, update,
// reboot) until Stop. Devices start at random points of Config.StartSpread
// (by default a second per 500 of them: a first check-in is a full TLS
// handshake, the costliest request), as a fleet's check-ins are spread
// over its poll interval.
func (f *Fleet) Start(ctx context.Context) {
	ctx, f.cancel = context.WithCancel(ctx)
	spread := f.cfg.StartSpread
	if spread <= 0 {
		spread = max(time.Second, time.Duration(len(f.devs))*time.Second/500)
	}
	rng := rand.New(rand.NewPCG(f.cfg.Seed^0x57a7, 1))
	for _, d := range f.devs {
		if d.lnk == nil {
			continue
		}
		f.wg.Add(1)
		delay := time.Duration(rng.Int64N(int64(spread)))
		go func() {
			defer f.wg.Done()
			if sleep(ctx, delay) != nil {
				return
			}
			d.live(ctx)
		}()
	}
}

// Stop ends every device's life and waits for them.
func (f *Fleet) Stop() {
	if f.cancel != nil {
		f.cancel()
	}
	f.wg.Wait()
}

// SetFaults sets the faults injected from now on; offline periods,
// slow links and misbehaving devices are drawn once per call.
func (f *Fleet) SetFaults(fl Faults) {
	if fl.SlowRate <= 0 {
		fl.SlowRate = 64 << 10
	}
	if fl.OfflineWithin <= 0 {
		fl.OfflineWithin = time.Minute
	}
	if fl.OfflineFor <= 0 {
		fl.OfflineFor = 20 * time.Minute
	}
	if fl.StallFor <= 0 {
		fl.StallFor = 3 * time.Second
	}
	rng := rand.New(rand.NewPCG(f.cfg.Seed^0x5eed, uint64(time.Now().UnixNano())))
	now := time.Now()
	slow, offline, misbehave := share(rng, len(f.devs), fl.Slow), share(rng, len(f.devs), fl.Offline), share(rng, len(f.devs), fl.Misbehave)
	for i, d := range f.devs {
		d.slow.Store(slow[i])
		if offline[i] {
			from := now.Add(time.Duration(rng.Int64N(int64(fl.OfflineWithin))))
			length := time.Duration(float64(fl.OfflineFor) / f.cfg.Speed * (0.5 + rng.Float64()))
			d.offlineFrom.Store(from.UnixNano())
			d.offlineUntil.Store(from.Add(length).UnixNano())
			d.wasOffline.Store(false)
		}
		if misbehave[i] {
			d.misbehave.Store(true)
		}
	}
	f.faults.Store(&fl)
}

// share marks p percent of n devices, drawn at random: exactly n*p/100 of
// them, the fraction rounded up or down at random (so that 1% of 200 is
// always 2 devices, not 0 one run in seven).
func share(rng *rand.Rand, n int, p float64) []bool {
	marked := make([]bool, n)
	if p <= 0 || n == 0 {
		return marked
	}
	want := float64(n) * min(p, 100) / 100
	k := int(want)
	if rng.Float64() < want-float64(k) {
		k++
	}
	for _, i := range rng.Perm(n)[:k] {
		marked[i] = true
	}
	return marked
}

func pct(rng *rand.Rand, p float64) bool { return p > 0 && rng.Float64()*100 < p }

// live is a device's life: power on, run, and again after every reboot,
// crash or power cut.
func (d *Device) live(ctx context.Context) {
	for ctx.Err() == nil {
		if d.misbehave.Swap(false) {
			d.sim.FailHealth = 1
			d.f.stats.misbehaving.Add(1)
		}
		noop := context.CancelFunc(func() {})
		d.stop.Store(&noop)
		b := d.sim.PowerOn(ctx)
		d.f.stats.boots.Add(1)
		switch b.Result {
		case simdev.Recovery:
			d.f.stats.bricked.Add(1)
			d.f.cfg.Log.Error("device bricked", "device", d.ID, "decision", b.Decision.Reason)
			return
		case simdev.Running:
		default:
			// Crashed, cut or rebooting: the watchdog or the user powers
			// it on again a simulated few seconds later.
			if d.sleep(ctx, 5*time.Second) != nil {
				return
			}
			continue
		}
		v := b.Firmware.Version
		d.version.Store(&v)
		sctx, cancel := context.WithCancel(ctx)
		d.stop.Store(&cancel)
		err := d.sim.Serve(sctx, d)
		cancel()
		d.lnk.HTTP.CloseIdleConnections() // rebooting, crashed or cut: the connection is gone
		switch {
		case ctx.Err() != nil:
			return
		case d.sim.Power.Off():
			// cut: counted by onCut; power returns a moment later
		case errors.Is(err, agent.ErrReboot):
			d.f.stats.reboots.Add(1)
		default:
			d.f.stats.crashes.Add(1)
		}
		if d.sleep(ctx, 2*time.Second) != nil {
			return
		}
	}
}

// onCut runs when a power cut strikes this device (with a storage
// model's lock held: it only counts and cancels).
func (d *Device) onCut(area string) {
	d.f.stats.cut(area)
	if c := d.stop.Load(); c != nil {
		(*c)()
	}
}

// online finishes the agent of a power-on: downloads into the device's
// file system over its link, offers checked against signed TUF metadata,
// outcomes reported by the daemon, waits compressed.
func (d *Device) online(r *agent.Runner) {
	fx := &fetcher{fs: d.sim.FS(), stats: &d.f.stats, faults: d.f.faults.Load, rng: d.rng, client: &http.Client{Transport: noLink{}}}
	if d.lnk != nil {
		fx.client = d.lnk.HTTP
	}
	r.Fetcher = fx
	r.Sleep = d.sleep
	r.Reporter = agent.ReporterFunc(func(context.Context, agent.Outcome) error { return agent.ErrReportLater })
	if len(d.f.cfg.TimeZones) > 0 {
		var n int
		fmt.Sscanf(d.ID[len(d.f.cfg.IDPrefix):], "%d", &n)
		r.TimeZone = d.f.cfg.TimeZones[n%len(d.f.cfg.TimeZones)]
	}
	if d.lnk == nil {
		return
	}
	root, err := d.lnk.Bundle.TUFRoot()
	if err != nil || root == nil {
		return
	}
	tc := &tufclient.Client{Dir: filepath.Join(d.dir, "tuf"), FactoryRoot: root, HTTP: d.lnk.HTTP, BaseURL: d.lnk.URL(proto.PathTUF), Now: d.lnk.Clock.Now}
	r.CheckOffer = tc.CheckOffer
}

// setPhase notes where the device's update is (from what it reports).
func (d *Device) setPhase(p string) { d.phase.Store(&p) }

// sleep waits a simulated duration.
func (d *Device) sleep(ctx context.Context, dur time.Duration) error {
	return sleep(ctx, time.Duration(float64(dur)/d.f.cfg.Speed))
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// CheckIn is the device's check-in over its link, measured, with a power
// cut scheduled on some offers.
func (d *Device) CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error) {
	start := time.Now()
	resp, err := d.lnk.CheckIn(ctx, c)
	d.f.stats.checkIn(time.Since(start), err)
	if err != nil {
		d.lnk.HTTP.CloseIdleConnections()
		return nil, d.realBackoff(ctx, err)
	}
	d.failures = 0
	if !d.desynced && resp.NextPollSeconds > 1 {
		// The fleet was switched on within seconds; a real one came up at
		// random times. Once, the device waits a random part of its poll
		// interval, so that its check-ins fall anywhere in the interval
		// from then on.
		d.desynced = true
		resp.NextPollSeconds = 1 + d.rng.IntN(resp.NextPollSeconds)
	}
	if resp.Offer == nil && c.UpdateID == "" {
		// Back to sleep until the next check-in: the connection goes (the
		// next one resumes the TLS session). During an update it stays,
		// for the reports, the metadata and the download.
		d.lnk.HTTP.CloseIdleConnections()
	}
	if err == nil && resp.Offer != nil && c.UpdateID == "" {
		d.f.stats.offers.Add(1)
		if fl := d.f.faults.Load(); pct(d.rng, fl.PowerCut) {
			d.scheduleCut(resp.Offer.Target.Length)
		}
	}
	return resp, err
}

// realBackoff keeps the waits after a failed check-in in real time: the
// server's Retry-After is the real server's load, and the daemon's own
// back-off, compressed like every other wait, would turn a fleet that lost
// its server into a storm. A busy answer keeps its Retry-After in real
// seconds; any other failure (but a link down) waits at least 1 s << n,
// up to 30 s, real time, plus jitter.
func (d *Device) realBackoff(ctx context.Context, err error) error {
	var busy interface{ Retry() time.Duration }
	if errors.As(err, &busy) {
		return &busyError{err: err, retry: time.Duration(float64(busy.Retry()) * d.f.cfg.Speed)}
	}
	if errors.Is(err, errLinkDown) {
		return err
	}
	d.failures++
	wait := min(time.Second<<min(d.failures-1, 5), 30*time.Second)
	sleep(ctx, wait+time.Duration(d.rng.Int64N(int64(wait))))
	return err
}

// busyError is a 503 whose Retry-After is scaled so that, compressed, it
// lasts as long as the server asked.
type busyError struct {
	err   error
	retry time.Duration
}

func (e *busyError) Error() string        { return e.err.Error() }
func (e *busyError) Unwrap() error        { return e.err }
func (e *busyError) Retry() time.Duration { return e.retry }

// scheduleCut aims a power cut: at one of the slot writes that installing
// an image of size bytes makes, at boot-environment writes, or anywhere in
// the next operations.
func (d *Device) scheduleCut(size int64) {
	p := d.sim.Power
	frac, tear := d.rng.Float64(), d.rng.IntN(2) == 0
	switch r := d.rng.Float64(); {
	case r < 0.3:
		writes := max(1, int((size+agent.InstallChunk-1)/agent.InstallChunk))
		p.CutInArea("slot-", 1+d.rng.IntN(writes), frac, tear)
	case r < 0.5:
		p.CutInArea("env", 1+d.rng.IntN(4), frac, tear)
	default:
		ops, _ := p.Ops()
		p.CutAt(ops+1+d.rng.IntN(150), frac, tear)
	}
}

// Report sends a status report over the link.
func (d *Device) Report(ctx context.Context, r proto.Report) error {
	err := d.lnk.Report(ctx, r)
	switch r.Status {
	case proto.StatusCommitted, proto.StatusRolledBack, proto.StatusFailed:
		if err == nil {
			d.f.stats.outcome(r.Status)
			d.setPhase("idle")
		}
	default:
		d.setPhase(r.Status)
	}
	return err
}

// URL resolves a download path on the server.
func (d *Device) URL(path string) string { return d.lnk.URL(path) }

// Version is the firmware version the device last booted.
func (d *Device) Version() string { return *d.version.Load() }

// Census is the fleet powered on through the boot selector, device by
// device, after Stop: what each boots, from what the storage holds and not
// from what the agents reported.
type Census struct {
	Devices  int
	Bricked  []string
	Versions map[string]int
}

// PowerOnAll powers every device on once more (after Stop) and counts
// what boots. A device whose power-on is a reboot mid-update (a trial to
// boot, a rollback to finish) is powered on again, up to a few times.
func (f *Fleet) PowerOnAll(ctx context.Context) Census {
	c := Census{Devices: len(f.devs), Versions: map[string]int{}}
	for _, d := range f.devs {
		d.sim.Online = nil // offline: the agent finishes on its own
		d.sim.Power.CutAt(0, 0, false)
		var b simdev.Boot
		for i := 0; i < 6; i++ {
			b = d.sim.PowerOn(ctx)
			if b.Result != simdev.Rebooted && b.Result != simdev.Cut {
				break
			}
		}
		switch b.Result {
		case simdev.Running:
			c.Versions[b.Firmware.Version]++
		case simdev.Recovery:
			c.Bricked = append(c.Bricked, d.ID)
		default:
			c.Versions["("+b.Result+")"]++
		}
	}
	return c
}
