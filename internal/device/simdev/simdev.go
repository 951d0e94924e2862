// Package simdev is a virtual device for tests and the fleet simulator: the
// storage models (two flash slots, a flash boot environment, file-system
// models of the data partition, all on one power supply that can be cut at
// any write), the real boot selector and the real agent, together.
//
// PowerOn runs the boot selector and then "runs" the chosen firmware. The
// firmware is simulated: its image payload declares how it behaves (boots
// fine or crashes at boot; passes or fails its health check; migrates the
// application data safely, corruptingly, or not at all; ships a revert-data
// hook or relies on the agent's snapshot). Its hooks are Go functions acting
// on the data partition model, and it runs the same agent code as a real
// device.
package simdev

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/image"
)

// Behavior is how a simulated firmware behaves.
type Behavior struct {
	Version    string `json:"version"`
	DataFormat int    `json:"data_format"` // the application data format this firmware reads
	Boot       string `json:"boot"`        // "ok" or "crash" (crashes at every boot)
	Health     string `json:"health"`      // "ok", "fail", or "crash" (the firmware dies during its health check)
	// Migration is what migrate-data does to data one format older:
	// "safe" (atomic rewrite), "corrupting" (leaves garbage) or "none".
	Migration  string `json:"migration"`
	RevertHook bool   `json:"revert_hook"` // ships a revert-data hook
}

const payloadMagic = "FIELDPATCH-SIM "

// Payload makes a firmware payload of size bytes declaring b.
func Payload(b Behavior, size int) []byte {
	j, _ := json.Marshal(b)
	p := append([]byte(payloadMagic), j...)
	p = append(p, '\n')
	for len(p) < size {
		p = append(p, byte(len(p)*7))
	}
	return p
}

// ParsePayload reads what a payload declares.
func ParsePayload(p []byte) (Behavior, error) {
	var b Behavior
	if !bytes.HasPrefix(p, []byte(payloadMagic)) {
		return b, errors.New("not a simulated firmware payload")
	}
	line := p[len(payloadMagic):]
	if i := bytes.IndexByte(line, '\n'); i >= 0 {
		line = line[:i]
	}
	err := json.Unmarshal(line, &b)
	return b, err
}

// Paths on the device's file systems.
const (
	StateDir = "/state/fieldpatch" // journal, staging, revert material
	Inbox    = "/inbox/update.img" // where a downloaded image lands
	NVPath   = "/nv/counter"
	DataDir  = "/app"
)

// Device is one virtual device.
type Device struct {
	Power   *slot.Power
	Slots   map[string]*slot.Flash
	EnvDev  *slot.Flash
	State   *slot.MemFS // journal, staging, revert material
	Inbox   *slot.MemFS // downloads
	NVFS    *slot.MemFS
	Data    *slot.MemFS // the application's data
	Keys    []boot.TrustedKey
	HWClass string
	Log     *slog.Logger

	// Online, if set, finishes the agent of every power-on for a device
	// that talks to an update server (fetcher, offer checks, reports,
	// sleeps); see Serve.
	Online func(*agent.Runner)
	// FailHealth makes the next FailHealth health checks fail whatever
	// the firmware is (a device that misbehaves on its first boots).
	FailHealth int

	fs    *muxFS
	Boots []Boot // every power-on, in order
	// KeepBoots is how many power-ons Boots keeps (0: all).
	KeepBoots int
}

// Boot is what one power-on did.
type Boot struct {
	Decision  boot.Decision
	Firmware  Behavior
	Counter   uint32 // the booted image's security counter
	NVCounter uint32 // the non-volatile counter when it booted
	Result    string // recovery, crashed, reboot, running, cut
	Phase     agent.Phase
	DataOK    bool // the running firmware can read its data
	DataErr   string
}

// Results of a power-on.
const (
	Recovery = "recovery"
	Crashed  = "crashed"
	Rebooted = "reboot"
	Running  = "running"
	Cut      = "cut" // power failed during this power-on
)

// SlotSize is the size of each virtual slot.
const SlotSize = 1 << 20

// New makes a factory-fresh device: firmware v1 committed in slot a, its
// data in format v1.DataFormat, the non-volatile counter at v1's counter.
func New(v1 []byte, keys []boot.TrustedKey, hwClass string) (*Device, error) {
	return NewShared(v1, keys, hwClass, nil, SlotSize)
}

// NewShared is New with slots of slotSize bytes whose blocks are shared
// through pool (nil: private slots), so that a fleet of devices fits in
// memory.
func NewShared(v1 []byte, keys []boot.TrustedKey, hwClass string, pool *slot.BlockPool, slotSize int64) (*Device, error) {
	newSlot := func() *slot.Flash {
		if pool != nil {
			return slot.NewSharedFlash(slotSize, 4096, pool)
		}
		return slot.NewFlash(slotSize, 4096)
	}
	d := &Device{
		Slots:  map[string]*slot.Flash{"a": newSlot(), "b": newSlot()},
		EnvDev: slot.NewFlash(0x800, 256),
		State:  slot.NewMemFS(), Inbox: slot.NewMemFS(), NVFS: slot.NewMemFS(), Data: slot.NewMemFS(),
		Keys: keys, HWClass: hwClass,
	}
	d.fs = &muxFS{mounts: []mount{{"/state", d.State}, {"/inbox", d.Inbox}, {"/nv", d.NVFS}, {"/app", d.Data}}}
	if _, err := d.Slots["a"].WriteAt(v1, 0); err != nil {
		return nil, err
	}
	img, err := image.Peek(bytes.NewReader(v1))
	if err != nil {
		return nil, err
	}
	beh, err := d.behavior("a")
	if err != nil {
		return nil, err
	}
	if err := d.env().Save(bootenv.Env{boot.VarActive: "a"}); err != nil {
		return nil, err
	}
	if err := d.nv().Init(boot.NVState{Counter: img.SecurityCounter}); err != nil {
		return nil, err
	}
	if err := writeData(d.fs, beh.DataFormat, []string{"alice", "bob", "carol"}); err != nil {
		return nil, err
	}
	d.Power = slot.NewPower()
	for name, f := range d.Slots {
		f.Attach(d.Power, "slot-"+name)
	}
	d.EnvDev.Attach(d.Power, "env")
	d.State.Attach(d.Power, "journal")
	d.Inbox.Attach(d.Power, "download")
	d.NVFS.Attach(d.Power, "nv")
	d.Data.Attach(d.Power, "data")
	return d, nil
}

func (d *Device) env() bootenv.Store {
	return &bootenv.Pair{Copies: [2]bootenv.Location{{Dev: d.EnvDev, Offset: 0, Size: 0x400}, {Dev: d.EnvDev, Offset: 0x400, Size: 0x400}}}
}

func (d *Device) nv() *boot.NVFile { return &boot.NVFile{FS: d.fs, Path: NVPath} }

func (d *Device) bootDevice() boot.Device {
	slots := map[string]slot.Device{}
	for k, v := range d.Slots {
		slots[k] = v
	}
	return boot.Device{Env: d.env(), Slots: slots, Keys: d.Keys, NV: d.nv(), HWClass: d.HWClass}
}

// behavior reads the firmware a slot holds (header and payload start only).
func (d *Device) behavior(s string) (Behavior, error) {
	f := d.Slots[s]
	img, err := image.Peek(f)
	if err != nil {
		return Behavior{}, err
	}
	head := make([]byte, min(int(img.Header.ImageSize), 512))
	if _, err := f.ReadAt(head, int64(img.Header.HeaderSize)); err != nil {
		return Behavior{}, err
	}
	return ParsePayload(head)
}

func (d *Device) runner(beh Behavior, crash func()) *agent.Runner {
	r := &agent.Runner{
		FS: d.fs, StateDir: StateDir, DataDir: DataDir,
		Device: d.bootDevice(), NV: d.nv(),
		Hooks: &simHooks{fs: d.fs, beh: beh, crash: crash, dev: d},
		Sleep: func(context.Context, time.Duration) error { return nil },
		Log:   d.Log,
	}
	if d.Online != nil {
		d.Online(r)
	}
	return r
}

// FS is the device's file system tree as its agent sees it.
func (d *Device) FS() slot.FS { return d.fs }

// Serve runs the agent daemon of the firmware that last powered on
// (Result Running) against srv, until the agent asks for a reboot
// (agent.ErrReboot), the firmware crashes, power fails or ctx ends.
func (d *Device) Serve(ctx context.Context, srv agent.Server) error {
	last := d.Boots[len(d.Boots)-1]
	fwCtx, crash := context.WithCancel(ctx)
	defer crash()
	return d.runner(last.Firmware, crash).Daemon(fwCtx, srv)
}

// PowerOn powers the device on: boot selection, then the firmware, whose
// agent resumes whatever its journal says. A power cut at any point ends the
// power-on with Result Cut.
func (d *Device) PowerOn(ctx context.Context) Boot {
	d.Power.On()
	b := d.powerOn(ctx)
	if d.KeepBoots > 0 && len(d.Boots) >= d.KeepBoots {
		d.Boots = append(d.Boots[:0], d.Boots[len(d.Boots)-d.KeepBoots+1:]...)
	}
	d.Boots = append(d.Boots, b)
	return b
}

func (d *Device) powerOn(ctx context.Context) Boot {
	var b Boot
	dec, err := boot.Select(ctx, d.bootDevice())
	b.Decision = dec
	if dec.NV != nil {
		b.NVCounter = dec.NV.Counter
	}
	for _, c := range dec.Checks {
		if c.Slot == dec.Boot {
			b.Counter = c.SecurityCounter
		}
	}
	if err != nil && d.Power.Off() {
		b.Result = Cut
		return b
	}
	if dec.Boot == "" {
		b.Result = Recovery
		return b
	}
	beh, err := d.behavior(dec.Boot)
	if err != nil {
		b.Result = Cut
		if !d.Power.Off() {
			b.Result, b.DataErr = Crashed, err.Error()
		}
		return b
	}
	b.Firmware = beh
	if beh.Boot == "crash" {
		b.Result = Crashed
		return b
	}
	fwCtx, crash := context.WithCancel(ctx)
	defer crash()
	st, err := d.runner(beh, crash).Start(fwCtx)
	b.Phase = st.Phase
	switch {
	case errors.Is(err, agent.ErrReboot):
		b.Result = Rebooted
		return b
	case d.Power.Off():
		b.Result = Cut
		return b
	case err != nil:
		b.Result, b.DataErr = Crashed, "agent: "+err.Error()
		return b
	}
	b.Result = Running
	if err := readData(d.fs, beh.DataFormat); err != nil {
		b.DataErr = err.Error()
	} else {
		b.DataOK = true
	}
	return b
}

// Download puts an image in the inbox, as a download would, durably.
func (d *Device) Download(img []byte) error {
	if err := d.fs.MkdirAll(filepath.Dir(Inbox)); err != nil {
		return err
	}
	return slot.WriteFileAtomic(d.fs, Inbox, img)
}

// Install asks the running firmware's agent to install the inbox image.
func (d *Device) Install(ctx context.Context, offer *agent.Offer) (agent.State, error) {
	last := d.Boots[len(d.Boots)-1]
	return d.runner(last.Firmware, func() {}).Install(ctx, Inbox, offer)
}

// Journal reads the agent's journal.
func (d *Device) Journal() (agent.State, error) {
	return (&agent.Runner{FS: d.fs, StateDir: StateDir}).Load()
}

// NV reads the non-volatile store.
func (d *Device) NV() (boot.NVState, error) { return d.nv().Load() }

// --- application data: records, one per line, tagged with the format ---

func writeData(fsys slot.FS, format int, names []string) error {
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "v%d|%s\n", format, n)
	}
	if err := fsys.MkdirAll(DataDir); err != nil {
		return err
	}
	if err := slot.WriteFileAtomic(fsys, DataDir+"/records", []byte(b.String())); err != nil {
		return err
	}
	return slot.WriteFileAtomic(fsys, DataDir+"/format", []byte(fmt.Sprint(format)))
}

// readData checks that firmware reading format can read the data.
func readData(fsys slot.FS, format int) error {
	f, err := fsys.ReadFile(DataDir + "/format")
	if err != nil {
		return fmt.Errorf("data format marker: %w", err)
	}
	if string(f) != fmt.Sprint(format) {
		return fmt.Errorf("data is in format %s, this firmware reads format %d", f, format)
	}
	recs, err := fsys.ReadFile(DataDir + "/records")
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimSuffix(string(recs), "\n"), "\n")
	if len(lines) != 3 {
		return fmt.Errorf("data holds %d records, want 3", len(lines))
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, fmt.Sprintf("v%d|", format)) {
			return fmt.Errorf("record %q is not in format %d", l, format)
		}
	}
	return nil
}

// convert rewrites the records from one format to another, atomically and
// idempotently: records already converted stay as they are.
func convert(fsys slot.FS, from, to int) error {
	recs, err := fsys.ReadFile(DataDir + "/records")
	if err != nil {
		return err
	}
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimSuffix(string(recs), "\n"), "\n") {
		l = strings.TrimPrefix(l, fmt.Sprintf("v%d|", from))
		l = strings.TrimPrefix(l, fmt.Sprintf("v%d|", to))
		fmt.Fprintf(&b, "v%d|%s\n", to, l)
	}
	if err := slot.WriteFileAtomic(fsys, DataDir+"/records", []byte(b.String())); err != nil {
		return err
	}
	return slot.WriteFileAtomic(fsys, DataDir+"/format", []byte(fmt.Sprint(to)))
}

// simHooks are a simulated firmware's hooks.
type simHooks struct {
	fs    slot.FS
	beh   Behavior
	crash func() // the firmware dies
	dev   *Device
}

func (h *simHooks) Run(ctx context.Context, name string, env agent.HookEnv) error {
	switch name {
	case agent.HookMigrateData:
		cur, err := h.fs.ReadFile(DataDir + "/format")
		if err != nil {
			return err
		}
		from := h.beh.DataFormat - 1
		if h.beh.Migration == "none" || string(cur) != fmt.Sprint(from) {
			return nil // nothing to migrate, or already migrated
		}
		if h.beh.Migration == "corrupting" {
			// A buggy migration: writes garbage, then marks the new format.
			if err := slot.WriteFileAtomic(h.fs, DataDir+"/records", []byte("\x00\x00garbage")); err != nil {
				return err
			}
			return slot.WriteFileAtomic(h.fs, DataDir+"/format", []byte(fmt.Sprint(h.beh.DataFormat)))
		}
		return convert(h.fs, from, h.beh.DataFormat)
	case agent.HookHealthCheck:
		if h.dev != nil && h.dev.FailHealth > 0 {
			h.dev.FailHealth--
			return errors.New("health check failed: the device misbehaves on this firmware")
		}
		switch h.beh.Health {
		case "fail":
			return errors.New("health check failed: the service does not answer")
		case "crash":
			h.crash()
			return ctx.Err()
		}
		return readData(h.fs, h.beh.DataFormat)
	}
	return nil
}

// SaveRevert saves a "hook" that is data: the formats to convert between.
func (h *simHooks) SaveRevert(ctx context.Context, path string) (bool, error) {
	if !h.beh.RevertHook {
		return false, nil
	}
	spec := fmt.Sprintf("sim-revert-data %d %d", h.beh.DataFormat, h.beh.DataFormat-1)
	return true, slot.WriteFileAtomic(h.fs, path, []byte(spec))
}

func (h *simHooks) RunSaved(ctx context.Context, path string, env agent.HookEnv) error {
	b, err := h.fs.ReadFile(path)
	if err != nil {
		return err
	}
	var from, to int
	if _, err := fmt.Sscanf(string(b), "sim-revert-data %d %d", &from, &to); err != nil {
		return fmt.Errorf("saved revert hook %q: %v", b, err)
	}
	return convert(h.fs, from, to)
}

// ErrBricked means a power-on found nothing bootable.
var ErrBricked = errors.New("device bricked: no slot boots")

// UpdateTo drives the device the way the field does: power on, and whenever
// the firmware is up with its agent idle, (re)offer the image until the
// agent reports an outcome for version target. It gives up after maxBoots
// power-ons. Power cuts scheduled on d.Power strike wherever they fall.
func (d *Device) UpdateTo(ctx context.Context, img []byte, target string, offer *agent.Offer, maxBoots int) error {
	for i := 0; i < maxBoots; i++ {
		b := d.PowerOn(ctx)
		switch b.Result {
		case Recovery:
			return ErrBricked
		case Running:
		default:
			continue // crashed, rebooted or cut: power on again
		}
		j, err := d.Journal()
		if err != nil {
			continue
		}
		if j.Last != nil && j.Last.To == target {
			return nil
		}
		if j.Phase != agent.PhaseIdle {
			continue
		}
		if err := d.Download(img); err != nil {
			continue
		}
		if _, err := d.Install(ctx, offer); err != nil && !errors.Is(err, agent.ErrReboot) && !d.Power.Off() {
			return fmt.Errorf("install: %w", err)
		}
	}
	return fmt.Errorf("no outcome for %s after %d power-ons", target, maxBoots)
}

// Settle powers the device on until its firmware runs with the agent idle.
func (d *Device) Settle(ctx context.Context, maxBoots int) (Boot, error) {
	for i := 0; i < maxBoots; i++ {
		b := d.PowerOn(ctx)
		if b.Result == Recovery {
			return b, ErrBricked
		}
		if b.Result == Running {
			return b, nil
		}
	}
	return Boot{}, fmt.Errorf("not settled after %d power-ons", maxBoots)
}
