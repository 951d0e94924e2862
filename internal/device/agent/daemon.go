package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Server is the update server as the daemon sees it (internal/device/link
// implements it over HTTPS).
type Server interface {
	CheckIn(ctx context.Context, c proto.CheckIn) (*proto.CheckInResponse, error)
	Report(ctx context.Context, r proto.Report) error
	// URL resolves an offer's download path.
	URL(path string) string
}

// Busy is implemented by errors that carry a server's Retry-After.
type Busy interface{ Retry() time.Duration }

// Daemon runs the agent against an update server: it resumes the journal,
// then checks in, installs what is offered, sends status reports, and sends
// again any outcome the server has not acknowledged. It returns ErrReboot
// when the device must reboot, or when ctx ends.
func (r *Runner) Daemon(ctx context.Context, srv Server) error {
	r.Reporter = ReporterFunc(func(ctx context.Context, o Outcome) error {
		if err := srv.Report(ctx, r.finalReport(o)); err != nil {
			// The check-in loop sends it again, with its own back-off.
			return fmt.Errorf("%w: %v", ErrReportLater, err)
		}
		return nil
	})
	var current string // the update in progress, for progress reports
	prevProgress := r.Progress
	lastPct := -1
	r.Progress = func(what string, done, total int64) {
		if prevProgress != nil {
			prevProgress(what, done, total)
		}
		if current == "" || total <= 0 {
			return
		}
		// Downloads report each quarter; best effort, like the phase reports.
		if pct := int(done * 4 / total * 25); what == "downloading" && pct != lastPct {
			lastPct = pct
			srv.Report(ctx, proto.Report{ReportID: fmt.Sprintf("%s-downloading-%d", current, pct), UpdateID: current,
				Status: proto.StatusDownloading, Progress: float64(pct) / 100})
		}
	}
	r.Notify = func(s State) {
		if s.Update == nil {
			current = ""
			return
		}
		current = s.Update.ID
		status := map[Phase]string{PhaseDownloading: proto.StatusDownloading, PhaseInstalling: proto.StatusInstalling, PhaseRebooting: proto.StatusRebooting}[s.Phase]
		if status != "" {
			// Best effort: progress reports may be lost; the outcome is not.
			srv.Report(ctx, proto.Report{ReportID: s.Update.ID + "-" + status, UpdateID: s.Update.ID, Status: status, Version: s.Update.FromVersion})
		}
	}
	if _, err := r.Start(ctx); err != nil {
		return err
	}
	failures := 0
	for {
		wait, err := r.poll(ctx, srv)
		if errors.Is(err, ErrReboot) || ctx.Err() != nil {
			return err
		}
		var busy Busy
		wakeable := true
		switch {
		case errors.As(err, &busy):
			wait, wakeable = busy.Retry(), false // the server asked for that long
		case err != nil:
			failures++
			wait = min(time.Second<<min(failures, 8), 5*time.Minute)
			r.log().Warn("check-in failed", "err", err, "retry_in", wait)
		default:
			failures = 0
		}
		// Jitter, so a fleet that lost its server does not return in step.
		wait += time.Duration(rand.Int64N(int64(wait/10) + 1))
		sleep := r.waitOrWake
		if !wakeable {
			sleep = r.sleep
		}
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	}
}

// waitOrWake waits d, or less when a notification wakes the daemon. (After
// a busy answer the daemon sleeps the Retry-After out instead.)
func (r *Runner) waitOrWake(ctx context.Context, d time.Duration) error {
	if r.Wake == nil {
		return r.sleep(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	case <-r.Wake:
		r.log().Info("notified: checking in now")
	}
	return nil
}

// poll is one check-in: it sends any unacknowledged outcome, checks in, and
// installs an offer when idle.
func (r *Runner) poll(ctx context.Context, srv Server) (time.Duration, error) {
	st, err := r.Load()
	if err != nil {
		return 0, err
	}
	if st.Last != nil && !st.Last.Reported && st.Last.UpdateID != "" {
		if err := srv.Report(ctx, r.finalReport(*st.Last)); err != nil {
			return 0, err
		}
		if err := r.MarkReported(); err != nil {
			return 0, err
		}
	}
	f, err := r.Facts()
	if err != nil {
		return 0, err
	}
	c := proto.CheckIn{Version: f.RunningVersion, Slot: f.Booted, HWClass: f.HWClass, SecurityCounter: f.NVCounter, KeyEpoch: f.KeyEpoch, Phase: string(st.Phase),
		TimeZone: r.TimeZone, Attributes: r.Attributes}
	if r.Health != nil {
		c.Health = r.Health()
	}
	if c.Version == "" {
		c.Version = "0.0.0"
	}
	if st.Update != nil {
		c.UpdateID = st.Update.ID
	}
	resp, err := srv.CheckIn(ctx, c)
	if err != nil {
		return 0, err
	}
	wait := time.Duration(max(resp.NextPollSeconds, 1)) * time.Second
	if o := resp.Offer; o != nil && st.Phase == PhaseIdle {
		if proto.ValidID("update_id", o.UpdateID) != nil {
			return wait, errors.New("the server offered an update with an invalid ID")
		}
		offer := &Offer{Version: o.Target.Custom.Version, SecurityCounter: o.Target.Custom.SecurityCounter, HasCounter: true,
			HWClass: o.Target.Custom.HWClass, Size: o.Target.Length, Downgrade: o.Target.Custom.Downgrade, KeyEpoch: o.Target.Custom.KeyEpoch}
		if r.CheckOffer != nil {
			vouched, err := r.CheckOffer(ctx, o)
			if err == nil {
				err = Judge(*f, vouched) // refused here, the server hears why at once
			}
			var sec interface{ Security() bool }
			switch {
			case errors.As(err, &sec) && sec.Security():
				// The server offered what signed metadata does not vouch for:
				// refused for good, and the server is told why.
				r.log().Error("offer refused", "update", o.UpdateID, "err", err)
				if rerr := srv.Report(ctx, proto.Report{ReportID: o.UpdateID + "-refused", UpdateID: o.UpdateID, Status: proto.StatusFailed,
					Reason: truncate("refused before download: "+err.Error(), proto.MaxReasonBytes)}); rerr != nil {
					return wait, rerr
				}
				return wait, nil
			case err != nil:
				return wait, fmt.Errorf("checking the offer: %w", err)
			}
			offer = vouched
		}
		r.log().Info("update offered", "update", o.UpdateID, "version", offer.Version)
		if _, err := r.InstallAs(ctx, o.UpdateID, srv.URL(o.URL), offer); err != nil {
			return wait, err
		}
		return time.Second, nil // check in again soon: the outcome may need reporting
	}
	return wait, nil
}

// OfferFromTarget is the offer signed metadata vouches for: length,
// SHA-256 and custom fields of a TUF target.
func OfferFromTarget(length int64, sha256 string, c *proto.TargetCustom) *Offer {
	return &Offer{Version: c.Version, SecurityCounter: c.SecurityCounter, HasCounter: true, HWClass: c.HWClass,
		Size: length, Downgrade: c.Downgrade, KeyEpoch: c.KeyEpoch, SHA256: sha256}
}

// finalReport makes the report of an outcome; its ID is fixed per update,
// so sending it again is harmless.
func (r *Runner) finalReport(o Outcome) proto.Report {
	status := map[string]string{ResultCommitted: proto.StatusCommitted, ResultFailed: proto.StatusFailed, ResultRolledBack: proto.StatusRolledBack}[o.Result]
	rep := proto.Report{ReportID: o.UpdateID + "-final", UpdateID: o.UpdateID, Status: status, Version: o.To, Reason: truncate(o.Reason, proto.MaxReasonBytes)}
	if status != proto.StatusCommitted {
		rep.Version = o.From
		rep.LogTail = r.logTail()
	}
	return rep
}

func (r *Runner) logTail() string {
	b, err := os.ReadFile(filepath.Join(r.StateDir, "update.log"))
	if err != nil {
		return ""
	}
	if len(b) > proto.MaxLogTailBytes {
		b = b[len(b)-proto.MaxLogTailBytes:]
	}
	return string(b)
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
