package simdev

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"flag"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/image"
)

var (
	campaign = flag.Int("campaign", 500, "power cuts injected by TestPowerCutCampaign (make bench runs 10000)")
	seedFlag = flag.Uint64("seed", 0, "random seed for the campaign (0: from the clock)")
)

var testKey = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32))

func keys() []boot.TrustedKey { return []boot.TrustedKey{{Key: testKey.Public(), Name: "test"}} }

func firmware(t testing.TB, b Behavior, counter uint32) []byte {
	t.Helper()
	p := Payload(b, 300<<10) // two slot writes (256 KiB buffers): cuts land inside each
	var out bytes.Buffer
	if _, err := image.Build(context.Background(), &out, bytes.NewReader(p), int64(len(p)), image.BuildOptions{
		Version: b.Version, SecurityCounter: &counter, HWClass: "lock", Signers: []crypto.Signer{testKey},
	}); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

var (
	fwV1 = Behavior{Version: "1.0.0", DataFormat: 1, Boot: "ok", Health: "ok", Migration: "none"}
	fwV2 = Behavior{Version: "2.0.0", DataFormat: 2, Boot: "ok", Health: "ok", Migration: "safe"}
)

func newDevice(t testing.TB) *Device {
	t.Helper()
	d, err := New(firmware(t, fwV1, 1), keys(), "lock")
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// final checks what must hold after any update, good or bad.
func final(t testing.TB, d *Device, wantVersion string) {
	t.Helper()
	for i, b := range d.Boots {
		if b.Result == Recovery {
			t.Fatalf("boot %d: bricked", i)
		}
		if b.Decision.Boot != "" && b.Counter < b.NVCounter {
			t.Fatalf("boot %d: booted an image with counter %d below the device's %d", i, b.Counter, b.NVCounter)
		}
		if b.Result == Running && !b.DataOK {
			t.Fatalf("boot %d: firmware %s runs on data it cannot read: %s", i, b.Firmware.Version, b.DataErr)
		}
	}
	last, err := d.Settle(context.Background(), 10)
	if err != nil {
		t.Fatal(err)
	}
	if last.Firmware.Version != wantVersion || !last.DataOK {
		t.Fatalf("ends on %s (data ok %v: %s), want %s", last.Firmware.Version, last.DataOK, last.DataErr, wantVersion)
	}
}

func TestGoodUpdateCommits(t *testing.T) {
	d := newDevice(t)
	if err := d.UpdateTo(context.Background(), firmware(t, fwV2, 2), "2.0.0", nil, 20); err != nil {
		t.Fatal(err)
	}
	final(t, d, "2.0.0")
	j, _ := d.Journal()
	if j.Last.Result != agent.ResultCommitted {
		t.Fatalf("outcome %+v", j.Last)
	}
	if nv, _ := d.NV(); nv.Counter != 2 {
		t.Errorf("non-volatile counter %d after commit, want 2", nv.Counter)
	}
	if names := d.State.Names(); len(names) != 1 {
		t.Errorf("state left behind after cleanup: %v", names)
	}
}

// Transition tests: bad firmware of every kind ends back on v1 with the data
// v1 can read.
func TestBadUpdatesRollBack(t *testing.T) {
	cases := []struct {
		name   string
		fw     Behavior
		reason string
	}{
		{"crashes at boot", Behavior{Version: "2.0.0", DataFormat: 2, Boot: "crash", Health: "ok", Migration: "safe"}, "bootloader rolled back"},
		{"fails its health check after migrating (snapshot)", Behavior{Version: "2.0.0", DataFormat: 2, Boot: "ok", Health: "fail", Migration: "safe"}, "health-check"},
		{"fails its health check after migrating (revert hook)", Behavior{Version: "2.0.0", DataFormat: 2, Boot: "ok", Health: "fail", Migration: "safe", RevertHook: true}, "health-check"},
		{"corrupting migration caught by the health check", Behavior{Version: "2.0.0", DataFormat: 2, Boot: "ok", Health: "ok", Migration: "corrupting"}, "health-check"},
		{"migrates then crashes until the trial runs out (snapshot)", Behavior{Version: "2.0.0", DataFormat: 2, Boot: "ok", Health: "crash", Migration: "safe"}, "bootloader rolled back"},
		{"migrates then crashes until the trial runs out (revert hook)", Behavior{Version: "2.0.0", DataFormat: 2, Boot: "ok", Health: "crash", Migration: "safe", RevertHook: true}, "bootloader rolled back"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := newDevice(t)
			if err := d.UpdateTo(context.Background(), firmware(t, c.fw, 2), "2.0.0", nil, 30); err != nil {
				t.Fatal(err)
			}
			final(t, d, "1.0.0")
			j, _ := d.Journal()
			if j.Last.Result != agent.ResultRolledBack || !strings.Contains(j.Last.Reason, c.reason) {
				t.Fatalf("outcome %+v, want rolled back with %q", j.Last, c.reason)
			}
			if nv, _ := d.NV(); nv.Counter != 1 {
				t.Errorf("non-volatile counter raised to %d by an update that rolled back", nv.Counter)
			}
		})
	}
}

// Refusals change nothing: no slot written, no trial armed.
func TestRefusedUpdatesChangeNothing(t *testing.T) {
	cases := []struct {
		name  string
		img   func(t *testing.T) []byte
		offer *agent.Offer
	}{
		{"older version", func(t *testing.T) []byte {
			return firmware(t, Behavior{Version: "0.9.0", DataFormat: 1, Boot: "ok", Health: "ok"}, 1)
		}, nil},
		{"below the counter", func(t *testing.T) []byte {
			return firmware(t, Behavior{Version: "2.0.0", DataFormat: 1, Boot: "ok", Health: "ok"}, 0)
		}, nil},
		{"tampered", func(t *testing.T) []byte { b := firmware(t, fwV2, 2); b[4000] ^= 1; return b }, &agent.Offer{Version: "2.0.0"}},
		{"foreign key", func(t *testing.T) []byte {
			k := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, 32))
			p := Payload(fwV2, 4096)
			var out bytes.Buffer
			two := uint32(2)
			image.Build(context.Background(), &out, bytes.NewReader(p), int64(len(p)), image.BuildOptions{Version: "2.0.0", SecurityCounter: &two, HWClass: "lock", Signers: []crypto.Signer{k}})
			return out.Bytes()
		}, &agent.Offer{Version: "2.0.0"}},
		{"offer below the counter", func(t *testing.T) []byte { return firmware(t, fwV2, 2) }, &agent.Offer{Version: "2.0.0", SecurityCounter: 0, HasCounter: true, HWClass: "lock"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := newDevice(t)
			slotB := d.Slots["b"].Bytes()
			if _, err := d.Settle(context.Background(), 3); err != nil {
				t.Fatal(err)
			}
			img := c.img(t)
			target := "2.0.0"
			if strings.Contains(c.name, "older") {
				target = "0.9.0"
			}
			if err := d.UpdateTo(context.Background(), img, target, c.offer, 5); err != nil {
				t.Fatal(err)
			}
			j, _ := d.Journal()
			if j.Last.Result != agent.ResultFailed || !strings.Contains(j.Last.Reason, "refused") {
				t.Fatalf("outcome %+v", j.Last)
			}
			if !bytes.Equal(d.Slots["b"].Bytes(), slotB) {
				t.Error("a refused image changed slot b")
			}
			final(t, d, "1.0.0")
		})
	}
}

type cutResult struct {
	area  string
	final string
}

// The power-cut campaign: count the write operations of a clean update from
// v1 to v2 (slots, boot environment, journal, non-volatile store, data,
// download), then cut power at each of them and at random byte offsets
// inside writes, power on and go on. After every cut the device must boot a
// verified image, never one below its counter, end on v2 with data v2 can
// read, and never be bricked.
func TestPowerCutCampaign(t *testing.T) {
	seed := *seedFlag
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (rerun with -seed %d)", seed, seed)
	t.Run("good v2", func(t *testing.T) { runCampaign(t, seed, fwV2, "2.0.0") })
	bad := fwV2
	bad.Health = "fail"
	t.Run("v2 fails its health check after migrating", func(t *testing.T) { runCampaign(t, seed, bad, "1.0.0") })
	crash := fwV2
	crash.Health, crash.RevertHook = "crash", true
	t.Run("v2 migrates then crashes until the trial runs out", func(t *testing.T) { runCampaign(t, seed, crash, "1.0.0") })
}

func runCampaign(t *testing.T, seed uint64, fw2 Behavior, want string) {
	rng := rand.New(rand.NewPCG(seed, 1))
	v1, v2 := firmware(t, fwV1, 1), firmware(t, fw2, 2)
	ctx := context.Background()

	clean, err := New(v1, keys(), "lock")
	if err != nil {
		t.Fatal(err)
	}
	if err := clean.UpdateTo(ctx, v2, "2.0.0", nil, 20); err != nil {
		t.Fatal(err)
	}
	total, perArea := clean.Power.Ops()
	t.Logf("a clean update makes %d write operations: %v", total, perArea)

	var cuts []struct {
		at   int
		frac float64
		tear bool
	}
	for k := 1; k <= total; k++ {
		cuts = append(cuts, struct {
			at   int
			frac float64
			tear bool
		}{k, rng.Float64(), rng.IntN(2) == 0})
	}
	for len(cuts) < *campaign {
		at, frac, tear := 1+rng.IntN(total), rng.Float64(), rng.IntN(2) == 0
		cuts = append(cuts, struct {
			at   int
			frac float64
			tear bool
		}{at, frac, tear})
	}

	cutsPerArea := map[string]int{}
	finals := map[string]int{}
	bricked, wrongImage, unreadable := 0, 0, 0
	for i, c := range cuts {
		d, err := New(v1, keys(), "lock")
		if err != nil {
			t.Fatal(err)
		}
		d.Power.CutAt(c.at, c.frac, c.tear)
		if err := d.UpdateTo(ctx, v2, "2.0.0", nil, 40); err != nil {
			t.Fatalf("cut %d at op %d (frac %.2f, tear %v): %v", i, c.at, c.frac, c.tear, err)
		}
		area := d.Power.CutArea()
		if area == "" {
			t.Fatalf("cut %d at op %d never struck", i, c.at)
		}
		if i < total {
			cutsPerArea[area]++
		}
		for _, b := range d.Boots {
			switch {
			case b.Result == Recovery:
				bricked++
			case b.Decision.Boot != "" && b.Counter < b.NVCounter:
				wrongImage++
			case b.Result == Running && !b.DataOK:
				unreadable++
			}
		}
		func() {
			defer func() {
				if t.Failed() {
					t.Logf("cut %d at op %d in %s (frac %.2f, tear %v); boots: %s", i, c.at, area, c.frac, c.tear, bootTrace(d))
				}
			}()
			final(t, d, want)
		}()
		j, _ := d.Journal()
		finals[fmt.Sprintf("%s on %s", j.Last.Result, d.Boots[len(d.Boots)-1].Firmware.Version)]++
	}
	sum := 0
	for _, a := range slotAreas(perArea) {
		if cutsPerArea[a] == 0 {
			t.Errorf("area %s had %d operations and got no cut", a, perArea[a])
		}
		sum += cutsPerArea[a]
	}
	if sum != total {
		t.Errorf("cuts at every operation add up to %d, the clean update made %d", sum, total)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d power cuts (seed %d): %d at each operation of a clean update, %d at random operations and byte offsets\n", len(cuts), seed, total, len(cuts)-total)
	fmt.Fprintf(&b, "  cuts per area (one per operation): ")
	for _, a := range slotAreas(perArea) {
		fmt.Fprintf(&b, "%s %d  ", a, cutsPerArea[a])
	}
	fmt.Fprintf(&b, "\n  bricked: %d, wrong-image boots: %d, runs on unreadable data: %d, final states: %v", bricked, wrongImage, unreadable, finals)
	t.Log(b.String())
}

func slotAreas(m map[string]int) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func bootTrace(d *Device) string {
	var parts []string
	for _, b := range d.Boots {
		parts = append(parts, fmt.Sprintf("%s:%s/%s/%s", b.Decision.Boot, b.Decision.Reason, b.Result, b.Phase))
	}
	return strings.Join(parts, " ")
}
