package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
	"github.com/fieldpatch/fieldpatch/internal/server/rollout"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

func runRolloutCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "rollout create", "--id ID RELEASE (target flags | --spec FILE) [flags] [server flags]",
		`Creates a staged rollout of RELEASE. The target is every device matching all
the criteria given (--device and --group together are a union); devices that
come to match later are picked up. Phases are cumulative percentages of the
target; each soaks for --soak before the next starts, and only when its
gates pass (the soak gate stops watching once the last phase has soaked). A tripped gate pauses the rollout (or aborts it, with
--on-trip abort). The rollout waits in state "created" until "fieldpatch
rollout start", unless --start is given.

For different gates per phase, write the whole spec as JSON (docs/OPERATIONS.md
shows one) and give it with --spec; the other flags are then refused.

Example:
  fieldpatch rollout create lock-1.0.2 --id fix-cve --group eu --phases 1,10,50,100 \
    --soak 2h --max-rollback-rate 0.02 --window '22:00-05:00' --starts-per-minute 200 --start`)
	id := fs.String("id", "", "rollout ID (required unless in --spec)")
	specFile := fs.String("spec", "", "a JSON rollout spec file, instead of the flags")
	var devices, groups, tags, versions, attrs, windows cli.Strings
	fs.Var(&devices, "device", "a device in the target (repeatable)")
	fs.Var(&groups, "group", "a group in the target (repeatable)")
	fs.Var(&tags, "tag", "devices must have this tag (repeatable: all of them)")
	fs.Var(&versions, "from-version", "devices must run this version now (repeatable: any of them)")
	fs.Var(&attrs, "attr", "devices must report attribute KEY=VALUE (repeatable)")
	all := fs.Bool("all", false, "the whole fleet (of the release's hardware class)")
	hw := fs.String("hw-class", "", "devices must be of this hardware class")
	phases := fs.String("phases", "100", "cumulative percentages, e.g. 1,10,50,100")
	soak := fs.Duration("soak", 0, "soak time of every phase (on the last, how long the soak gate keeps watching)")
	failRate := fs.Float64("max-failure-rate", rollout.DefaultMaxRate, "gate: failed / devices with an outcome")
	rbRate := fs.Float64("max-rollback-rate", rollout.DefaultMaxRate, "gate: rolled back / devices with an outcome")
	sickRate := fs.Float64("max-unhealthy-rate", rollout.DefaultMaxRate, "soak gate: unhealthy / committed devices")
	minSample := fs.Int("min-sample", rollout.DefaultMinSample, "devices with an outcome before a gate may judge")
	silence := fs.Duration("silence", rollout.DefaultSilence, "a committed device not seen this long is unhealthy")
	slack := fs.Int("health-slack", rollout.DefaultHealthSlack, "watchdog resets or crashes tolerated above a device's old rate")
	onTrip := fs.String("on-trip", rollout.TripPause, "what a tripped gate does: pause or abort")
	startAt := fs.String("start-at", "", "no device starts before this time (RFC 3339)")
	fs.Var(&windows, "window", "a maintenance window in device-local time, [DAYS ]HH:MM-HH:MM, e.g. 'mon,tue 22:00-05:00' (repeatable)")
	zone := fs.String("default-zone", "", "time zone of devices that report none (default UTC)")
	perMin := fs.Int("starts-per-minute", 0, "devices started per minute (0: no limit)")
	maxDl := fs.Int("max-downloads", 0, "devices downloading at once (0: no limit)")
	down := fs.Bool("downgrade", false, "a deliberate downgrade")
	start := fs.Bool("start", false, "start it at once")
	asJSON := fs.Bool("json", false, "print the stored rollout as JSON")
	conn := remoteFlags(fs)
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	var req mgmtapi.RolloutRequest
	if *specFile != "" {
		set := 0
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "spec", "start", "json", "server", "data-dir", "ca", "token-file":
			default:
				set++
			}
		})
		if set > 0 || len(pos) > 1 {
			return cli.Usagef("--spec holds the whole rollout: give no other rollout flags")
		}
		b, err := os.ReadFile(*specFile)
		if err != nil {
			return cli.Failed(err)
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req.Spec); err != nil {
			return cli.Usagef("%s: %v", *specFile, err)
		}
		if len(pos) == 1 {
			req.Spec.Release = pos[0]
		}
	} else {
		if len(pos) != 1 || *id == "" {
			return cli.Usagef("want --id ID and one release")
		}
		s := &req.Spec
		s.ID, s.Release, s.OnTrip, s.Downgrade = *id, pos[0], *onTrip, *down
		s.Target = rollout.Target{All: *all, Devices: devices, Groups: groups, Tags: tags, HWClass: *hw, Versions: versions}
		for _, kv := range attrs {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return cli.Usagef("--attr %q: want KEY=VALUE", kv)
			}
			if s.Target.Attributes == nil {
				s.Target.Attributes = map[string]string{}
			}
			s.Target.Attributes[k] = v
		}
		pcts := strings.Split(*phases, ",")
		for _, p := range pcts {
			v, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(p), "%"), 64)
			if err != nil {
				return cli.Usagef("--phases %q: want percentages such as 1,10,50,100", *phases)
			}
			ph := rollout.Phase{Percent: v, Gates: rollout.Gates{MaxFailureRate: failRate, MaxRollbackRate: rbRate, MaxUnhealthyRate: sickRate,
				MinSample: minSample, HealthSlack: slack}}
			sil := rollout.Duration(*silence)
			ph.Gates.Silence = &sil
			ph.Soak = rollout.Duration(*soak) // on the last phase: how long the soak gate keeps watching
			s.Phases = append(s.Phases, ph)
		}
		if *startAt != "" {
			t, err := time.Parse(time.RFC3339, *startAt)
			if err != nil {
				return cli.Usagef("--start-at: %v", err)
			}
			s.Schedule.Start = t
		}
		for _, w := range windows {
			win, err := parseWindow(w)
			if err != nil {
				return cli.Usagef("--window %q: %v", w, err)
			}
			s.Schedule.Windows = append(s.Schedule.Windows, win)
		}
		s.Schedule.DefaultZone = *zone
		s.Limits = rollout.Limits{StartsPerMinute: *perMin, MaxDownloads: *maxDl}
	}
	req.Start = *start
	// Check it here too, so a mistake is explained before anything is sent.
	check := req.Spec
	if err := check.Normalize(); err != nil {
		return cli.Usagef("%v", err)
	}
	r, err := conn()
	if err != nil {
		return err
	}
	var got rollout.Rollout
	if err := r.do(ctx, "POST", mgmtapi.PathRollouts, jsonBody(req), &got); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, got)
	}
	fmt.Fprintf(stdout, "rollout %s of %s: %s, %d phases (%s)\n", got.Spec.ID, got.Spec.Release, got.State, len(got.Spec.Phases), percents(got.Spec))
	if got.State == rollout.StateCreated {
		fmt.Fprintf(stdout, "start it with: fieldpatch rollout start %s\n", got.Spec.ID)
	}
	return nil
}

// parseWindow reads "[DAYS ]HH:MM-HH:MM".
func parseWindow(s string) (rollout.Window, error) {
	var w rollout.Window
	f := strings.Fields(s)
	switch len(f) {
	case 1:
	case 2:
		w.Days = strings.Split(f[0], ",")
		f = f[1:]
	default:
		return w, fmt.Errorf("want [DAYS ]HH:MM-HH:MM")
	}
	var ok bool
	if w.Start, w.End, ok = strings.Cut(f[0], "-"); !ok {
		return w, fmt.Errorf("want HH:MM-HH:MM")
	}
	return w, nil
}

func percents(s rollout.Spec) string {
	var p []string
	for _, ph := range s.Phases {
		p = append(p, strconv.FormatFloat(ph.Percent, 'f', -1, 64)+"%")
	}
	return strings.Join(p, " → ")
}

func runRolloutList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "rollout list", "[--state S] [--json] [server flags]", "Lists rollouts, newest first.")
	state := fs.String("state", "", "only rollouts in this state: created, active, paused, aborted")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	path := mgmtapi.PathRollouts
	if *state != "" {
		path += "?state=" + url.QueryEscape(*state)
	}
	var rs []rollout.Rollout
	if err := r.do(ctx, "GET", path, nil, &rs); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, rs)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tRELEASE\tSTATE\tPHASE\tREASON")
	for _, ro := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d (%g%%)\t%s\n", ro.Spec.ID, ro.Spec.Release, ro.State, ro.Phase+1, len(ro.Spec.Phases), ro.Spec.Phases[ro.Phase].Percent, ro.Reason)
	}
	return tw.Flush()
}

func runRolloutShow(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "rollout show", "ID [--json] [server flags]",
		`Shows a rollout: its state and why, each phase's devices by state, the health
of committed devices, why the current phase has not handed over yet, devices
committed over time, failure reasons grouped, and its history.`)
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one rollout ID")
	if err != nil {
		return err
	}
	var st store.RolloutStatus
	if err := r.do(ctx, "GET", mgmtapi.PathRollouts+"/"+url.PathEscape(pos[0]), nil, &st); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, st)
	}
	io.WriteString(stdout, describe(&st, true))
	return nil
}

// describe renders a rollout's status for people: a header, a progress bar
// per phase, and (in full) health, failure reasons and history.
func describe(st *store.RolloutStatus, full bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "rollout %s: %s %s → %s, %d devices targeted\n", st.Spec.ID, st.Release.ID, st.Release.Version, st.State, st.Targeted)
	if st.Reason != "" {
		fmt.Fprintf(&b, "  why: %s\n", st.Reason)
	}
	if st.Waiting != "" {
		fmt.Fprintf(&b, "  phase %d waits: %s\n", st.Phase+1, st.Waiting)
	}
	for i, p := range st.Phases {
		mark := " "
		if i == st.Phase {
			mark = "▶"
		}
		done := p.Stats.Outcomes()
		fmt.Fprintf(&b, "%s phase %d %5s %s %d/%d  committed %d, failed %d, rolled back %d, in progress %d\n", mark, p.Phase,
			strconv.FormatFloat(p.Percent, 'f', -1, 64)+"%", bar(done, p.Cohort, 24), done, p.Cohort,
			p.Stats.Committed, p.Stats.Failed, p.Stats.RolledBack, p.Stats.InProgress)
	}
	h := st.Health
	fmt.Fprintf(&b, "  health of %d committed devices: %d silent, %d with more resets or crashes\n", h.Committed, h.Silent, h.Misbehaving)
	if !full {
		return b.String()
	}
	if len(st.Failures) > 0 {
		b.WriteString("  failures:\n")
		for _, f := range st.Failures {
			fmt.Fprintf(&b, "    %5d  %s\n", f.Devices, f.Reason)
		}
	}
	if n := len(st.Series); n > 0 {
		fmt.Fprintf(&b, "  committed over time: %s (%d by %s)\n", spark(st.Series), st.Series[n-1].Committed, st.Series[n-1].At.UTC().Format(time.RFC3339))
	}
	b.WriteString("  history:\n")
	for _, e := range st.Events {
		fmt.Fprintf(&b, "    %s  %-16s phase %d  %s\n", e.At.UTC().Format(time.RFC3339), e.Kind, e.Phase, e.Detail)
	}
	return b.String()
}

func bar(n, of, width int) string {
	fill := 0
	if of > 0 {
		fill = min(n*width/of, width)
	}
	return "[" + strings.Repeat("█", fill) + strings.Repeat("░", width-fill) + "]"
}

func spark(s []store.SeriesPoint) string {
	levels := []rune("▁▂▃▄▅▆▇█")
	top := s[len(s)-1].Committed
	var b strings.Builder
	for _, p := range s {
		i := 0
		if top > 0 {
			i = p.Committed * (len(levels) - 1) / top
		}
		b.WriteRune(levels[i])
	}
	return b.String()
}

func runRolloutWatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "rollout watch", "ID [--interval D] [--json] [server flags]",
		`Shows a rollout's progress live, a bar per phase, until it settles: every
targeted device has an outcome in the last phase (exit 0), or it is paused
or aborted (exit 1, with the reason). Interrupt to stop watching; the
rollout goes on. With --json it prints one status object per change.`)
	interval := fs.Duration("interval", 2*time.Second, "how often to look")
	asJSON := fs.Bool("json", false, "print JSON lines")
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one rollout ID")
	if err != nil {
		return err
	}
	if *interval <= 0 {
		return cli.Usagef("--interval must be positive")
	}
	tty := false
	if f, ok := stdout.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	last, lines := "", 0
	for {
		var st store.RolloutStatus
		if err := r.do(ctx, "GET", mgmtapi.PathRollouts+"/"+url.PathEscape(pos[0]), nil, &st); err != nil {
			return err
		}
		var out string
		if *asJSON {
			b, _ := json.Marshal(st)
			out = string(b) + "\n"
		} else {
			out = describe(&st, false)
		}
		// Print only what changed (the time stamps in JSON aside, the
		// counts say whether anything did).
		key := fmt.Sprint(st.State, st.Phase, st.Phases, st.Health, st.Reason, st.Waiting)
		if key != last {
			if tty && lines > 0 && !*asJSON {
				fmt.Fprintf(stdout, "\x1b[%dA\x1b[J", lines) // redraw in place
			}
			io.WriteString(stdout, out)
			lines, last = strings.Count(out, "\n"), key
		}
		switch {
		case st.State == rollout.StatePaused || st.State == rollout.StateAborted:
			return cli.Refused(fmt.Errorf("rollout %s is %s: %s", st.Spec.ID, st.State, st.Reason))
		case st.State == rollout.StateActive && st.Phase == len(st.Phases)-1 && st.Totals.InProgress == 0 &&
			st.Phases[st.Phase].Cohort > 0 && settled(&st):
			fmt.Fprintf(stdout, "rollout %s settled: %d committed, %d failed, %d rolled back\n", st.Spec.ID, st.Totals.Committed, st.Totals.Failed, st.Totals.RolledBack)
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(*interval):
		}
	}
}

// settled: every targeted device runs the release or has an outcome.
func settled(st *store.RolloutStatus) bool { return st.Pending == 0 }

// rolloutAction makes the command for one operator action.
func rolloutAction(action string) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs := cli.NewFlags(stdout, "fieldpatch", "rollout "+action, "ID [--reason TEXT] [--json] [server flags]", map[string]string{
			store.ActionStart:   "Starts a created rollout; devices start once its schedule allows.",
			store.ActionPause:   "Pauses a rollout: devices not yet started wait; those mid-update finish.",
			store.ActionResume:  "Resumes a paused rollout. After a tripped gate this acknowledges what tripped\nit: from then on the gates judge only what happens next.",
			store.ActionAbort:   "Aborts a rollout for good: devices not yet started are never offered the\nrelease; those mid-update finish or roll back by their own rules.",
			store.ActionPromote: "Moves a rollout to its next phase now, without waiting for soak and gates.",
		}[action])
		reason := fs.String("reason", "", "why (kept in the rollout's history)")
		asJSON := fs.Bool("json", false, "print the rollout as JSON")
		conn := remoteFlags(fs)
		r, pos, err := connect(fs, conn, args, 1, "want one rollout ID")
		if err != nil {
			return err
		}
		var got rollout.Rollout
		if err := r.do(ctx, "POST", mgmtapi.PathRollouts+"/"+url.PathEscape(pos[0])+"/"+action, jsonBody(mgmtapi.ControlRequest{Reason: *reason}), &got); err != nil {
			return err
		}
		if *asJSON {
			return cli.WriteJSON(stdout, got)
		}
		fmt.Fprintf(stdout, "rollout %s: %s, phase %d/%d (%g%%)\n", got.Spec.ID, got.State, got.Phase+1, len(got.Spec.Phases), got.Spec.Phases[got.Phase].Percent)
		return nil
	}
}
