package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/fleet"
)

// The main job, at 200 devices: the whole story runs through the real
// server, the real agents and boot selectors, and holds.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("the demo takes a minute or two")
	}
	dir := t.TempDir()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	code := run(ctx, []string{"demo", "--devices", "200", "--image-kib", "256", "--quiet", "--work", filepath.Join(dir, "work"),
		"--svg", filepath.Join(dir, "chart.svg"), "--json", filepath.Join(dir, "report.json")}, &out, &errb)
	if code != 0 {
		t.Fatalf("demo exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	var rep demoReport
	b, err := os.ReadFile(filepath.Join(dir, "report.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, n := range rep.Census {
		total += n
	}
	switch {
	case rep.Devices != 200 || total != 200:
		t.Fatalf("census counts %d devices of %d: %v", total, rep.Devices, rep.Census)
	case len(rep.Bricked) != 0:
		t.Fatalf("bricked: %v", rep.Bricked)
	case !rep.BadTripped || rep.BadOutside != 0 || rep.BadRolledBack == 0 || rep.Census["1.0.1"] != 0:
		t.Fatalf("the bad release was not stopped at the canary: %+v", rep)
	case rep.Patched < 0.9 || rep.Census["1.0.2"] < 180:
		t.Fatalf("the good release reached %.1f%%: %v", rep.Patched*100, rep.Census)
	case rep.BytesSent < int64(rep.Census["1.0.2"])*256<<10-int64(rep.Census["1.0.2"])*4096:
		t.Fatalf("the server sent %d bytes for %d updated devices", rep.BytesSent, rep.Census["1.0.2"])
	case rep.Faults.PowerCuts < 20 || rep.Faults.CutsInSlotOrEnv < 5 || rep.Faults.Drops < 5:
		t.Fatalf("faults: %+v", rep.Faults)
	case len(rep.Timeline) < 10:
		t.Fatalf("timeline of %d points", len(rep.Timeline))
	}
	svg, err := os.ReadFile(filepath.Join(dir, "chart.svg"))
	if err != nil || !bytes.Contains(svg, []byte("<polyline")) {
		t.Fatalf("chart: %v %.200s", err, svg)
	}
	for _, want := range []string{"The story held", "bricked          0", "share of the fleet on 1.0.2"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

// The demo's verdict fails for each way the story can break.
func TestDemoVerdict(t *testing.T) {
	good := func() *demoReport {
		r := &demoReport{Devices: 2000, BadTripped: true, BadRolledBack: 20, Census: map[string]int{"1.0.2": 1990, "1.0.0": 10},
			Patched: 0.995, BytesSent: 3 << 30, BytesNeed: 2 << 30, MinFaults: minFaults(2000),
			Faults: fleet.FaultCounts{PowerCuts: 250, CutsInSlotOrEnv: 90, Drops: 200, Stalls: 100, Offline: 100, Slow: 100, Misbehaving: 20}}
		return r
	}
	if f := judgeDemo(good()); len(f) != 0 {
		t.Fatalf("a good run judged failed: %v", f)
	}
	if m := minFaults(2000); m["power_cuts"] != 200 || m["power_cuts_in_slot_or_env_writes"] != 50 {
		t.Fatalf("minimums for 2,000 devices: %v", m)
	}
	for name, spoil := range map[string]func(*demoReport){
		"bricked":        func(r *demoReport) { r.Bricked = []string{"lock-00007"} },
		"not tripped":    func(r *demoReport) { r.BadTripped = false },
		"outside canary": func(r *demoReport) { r.BadOutside = 3 },
		"no rollback":    func(r *demoReport) { r.BadRolledBack = 0 },
		"bad remains":    func(r *demoReport) { r.Census["1.0.1"] = 1 },
		"not patched":    func(r *demoReport) { r.Patched = 0.5 },
		"bytes":          func(r *demoReport) { r.BytesSent = 1 },
		"few cuts":       func(r *demoReport) { r.Faults.CutsInSlotOrEnv = 49 },
		"few drops":      func(r *demoReport) { r.Faults.Drops = 0 },
	} {
		r := good()
		spoil(r)
		if f := judgeDemo(r); len(f) != 1 {
			t.Errorf("%s: verdict %v, want one failure", name, f)
		}
	}
}
