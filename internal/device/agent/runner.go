package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strconv"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/bootenv"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/image"
	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Hooks runs the integrator's hooks of the firmware that is running.
type Hooks interface {
	// Run runs every hook of that name; none is not an error. A hook asking
	// to be retried later returns an error wrapping ErrRetryLater.
	Run(ctx context.Context, name string, env HookEnv) error
	// SaveRevert copies the firmware's revert-data hook to path, if it has
	// one, and reports whether it did.
	SaveRevert(ctx context.Context, path string) (bool, error)
	// RunSaved runs a revert-data hook saved by SaveRevert (possibly by
	// another firmware version).
	RunSaved(ctx context.Context, path string, env HookEnv) error
}

// ErrRetryLater is what a hook's "retry later" exit becomes.
var ErrRetryLater = errors.New("hook asked to be retried later")

// HookEnv tells a hook about the transition.
type HookEnv struct {
	Hook        string
	UpdateID    string
	FromVersion string
	ToVersion   string
	FromSlot    string
	ToSlot      string
	DataDir     string
	RevertDir   string
}

// Vars returns the environment variables hooks see.
func (h HookEnv) Vars() []string {
	return []string{
		"FIELDPATCH_HOOK=" + h.Hook, "FIELDPATCH_UPDATE_ID=" + h.UpdateID,
		"FIELDPATCH_FROM_VERSION=" + h.FromVersion, "FIELDPATCH_TO_VERSION=" + h.ToVersion,
		"FIELDPATCH_FROM_SLOT=" + h.FromSlot, "FIELDPATCH_TO_SLOT=" + h.ToSlot,
		"FIELDPATCH_DATA_DIR=" + h.DataDir, "FIELDPATCH_REVERT_DIR=" + h.RevertDir,
	}
}

// Fetcher downloads an update into a file, resuming what a previous
// attempt left.
type Fetcher interface {
	// Fetch downloads url into dst, resuming; limit > 0 refuses more
	// bytes than that.
	Fetch(ctx context.Context, url, dst string, limit int64, progress func(done, total int64)) error
}

// Reporter tells someone the outcome of an update.
type Reporter interface {
	Report(ctx context.Context, o Outcome) error
}

// ReporterFunc adapts a function to Reporter.
type ReporterFunc func(ctx context.Context, o Outcome) error

// Report calls f.
func (f ReporterFunc) Report(ctx context.Context, o Outcome) error { return f(ctx, o) }

// NV is the non-volatile store the agent raises at commit.
type NV interface {
	Load() (boot.NVState, error)
	Raise(boot.NVState) (boot.NVState, error)
}

// ErrReportLater, wrapped by a Reporter's error, says the outcome will be
// sent again later by someone else (the daemon's check-in loop): the runner
// then finishes the update without retrying, and leaves it unreported.
var ErrReportLater = errors.New("report later")

// ErrReboot is returned by Handle when the device must reboot to continue.
var ErrReboot = errors.New("reboot required to continue the update")

// Runner carries out the state machine's effects and keeps the journal.
type Runner struct {
	FS       slot.FS     // the data partition
	StateDir string      // journal, staging file, revert material
	DataDir  string      // the application's data, snapshotted before a migration
	Device   boot.Device // slots, boot environment, trusted keys, hardware class
	NV       NV
	Hooks    Hooks
	Fetcher  Fetcher  // nil: URLs are refused
	Reporter Reporter // nil: outcomes are only logged
	// OpenSource opens a local image file to install (default: from FS).
	OpenSource func(path string) (io.ReadCloser, error)
	// Reboot asks for a reboot; nil means the caller reboots (Handle
	// returns ErrReboot).
	Reboot func(ctx context.Context) error
	// Sleep waits between retries (default: time.Sleep with ctx).
	Sleep func(ctx context.Context, d time.Duration) error
	Log   *slog.Logger
	// Progress, if set, hears about long work (download, install).
	Progress func(what string, done, total int64)
	// AtPhase, if set, is called after each new phase is persisted and
	// before its effects run: a test's pause point.
	AtPhase func(Phase)
	// Notify, if set, hears each new state once it is persisted (status
	// reports to the server).
	Notify func(State)
	// KeysFile, if set, holds more trusted image keys, learned from signed
	// TUF metadata (read at every verification: it may change while the
	// agent runs).
	KeysFile string
	// TimeZone and Attributes are reported at every check-in.
	TimeZone   string
	Attributes map[string]string
	// Health, if set, gives the device's health counters for a check-in
	// (nil when there are none to give).
	Health func() *proto.Health
	// CheckOffer, if set, vouches for a server's offer before anything is
	// downloaded: it returns what signed metadata says the image is (the
	// agent installs only that), or an error. An error whose Security()
	// is true refuses the offer for good (it is reported as failed);
	// others are tried again at the next check-in.
	CheckOffer func(ctx context.Context, o *proto.Offer) (*Offer, error)
	// Wake, if set, ends the daemon's wait between check-ins early: a
	// notification that an update may be waiting (MQTT).
	Wake <-chan struct{}
}

func (r *Runner) journalPath() string { return filepath.Join(r.StateDir, "journal.json") }
func (r *Runner) stagingPath() string { return filepath.Join(r.StateDir, "staging.img") }
func (r *Runner) revertDir(u *Update) string {
	return filepath.Join(r.StateDir, "revert", u.ID)
}

func (r *Runner) log() *slog.Logger {
	if r.Log != nil {
		return r.Log
	}
	return slog.New(slog.DiscardHandler)
}

// sleep waits d (with Sleep if set), or until ctx ends.
func (r *Runner) sleep(ctx context.Context, d time.Duration) error {
	if r.Sleep != nil {
		return r.Sleep(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Load reads the journal; a missing journal is an idle device.
func (r *Runner) Load() (State, error) {
	b, err := r.FS.ReadFile(r.journalPath())
	if slot.IsNotExist(err) {
		return State{Format: JournalFormat, Phase: PhaseIdle}, nil
	}
	if err != nil {
		return State{}, fmt.Errorf("read journal: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("journal %s is unreadable: %w", r.journalPath(), err)
	}
	if s.Format > JournalFormat {
		return State{}, fmt.Errorf("journal format %d is newer than this agent's %d", s.Format, JournalFormat)
	}
	return s, nil
}

func (r *Runner) save(s State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := r.FS.MkdirAll(r.StateDir); err != nil {
		return err
	}
	if err := slot.WriteFileAtomic(r.FS, r.journalPath(), b); err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	return nil
}

// Facts reads what the device is now: the boot environment, the running
// image's version, the non-volatile store.
func (r *Runner) Facts() (*Facts, error) {
	f := &Facts{HWClass: r.Device.HWClass}
	env, err := r.Device.Env.Load()
	if err != nil && !errors.Is(err, bootenv.ErrNoEnv) {
		return nil, fmt.Errorf("read boot environment: %w", err)
	}
	f.Booted, f.BootReason, f.Active, f.Trial = env[boot.VarBooted], env[boot.VarBootReason], env[boot.VarActive], env[boot.VarTrial]
	if f.Booted == "" {
		f.Booted = f.Active
	}
	if f.Booted == "" {
		f.Booted = "a"
	}
	if d, ok := r.Device.Slots[f.Booted]; ok {
		if img, err := image.Peek(d); err == nil {
			f.RunningVersion = img.Version().String()
		}
	}
	nv, err := r.NV.Load()
	if err != nil {
		return nil, fmt.Errorf("read non-volatile store: %w", err)
	}
	f.NVCounter, f.KeyEpoch = nv.Counter, nv.KeyEpoch
	return f, nil
}

// Start resumes whatever the journal says, after a boot or a restart.
func (r *Runner) Start(ctx context.Context) (State, error) {
	f, err := r.Facts()
	if err != nil {
		return State{}, err
	}
	return r.Handle(ctx, Event{Kind: EvStart, Facts: f})
}

// Install begins an update from a local file or a URL.
func (r *Runner) Install(ctx context.Context, source string, offer *Offer) (State, error) {
	var id [8]byte
	rand.Read(id[:])
	return r.InstallAs(ctx, hex.EncodeToString(id[:]), source, offer)
}

// InstallAs begins an update with a given ID (the server's, for an offer).
func (r *Runner) InstallAs(ctx context.Context, id, source string, offer *Offer) (State, error) {
	f, err := r.Facts()
	if err != nil {
		return State{}, err
	}
	return r.Handle(ctx, Event{Kind: EvOffer, Source: source, Offer: offer, Facts: f, ID: id})
}

// MarkReported records that the last outcome reached the server.
func (r *Runner) MarkReported() error {
	s, err := r.Load()
	if err != nil || s.Last == nil || s.Last.Reported {
		return err
	}
	s.Last.Reported = true
	return r.save(s)
}

// Handle feeds one event to the machine and then carries out effects until
// the machine waits for nothing more (idle), or a reboot is needed
// (ErrReboot), or an error stops it (a power cut, a cancelled context).
func (r *Runner) Handle(ctx context.Context, ev Event) (State, error) {
	cur, err := r.Load()
	if err != nil {
		return cur, err
	}
	for {
		next, fx := Step(cur, ev)
		if !sameState(cur, next) {
			if err := r.save(next); err != nil {
				return cur, err
			}
			if next.Phase != cur.Phase {
				r.log().Info("update phase", "phase", next.Phase, "event", ev.Kind)
			}
		}
		changedPhase := next.Phase != cur.Phase
		cur = next
		if changedPhase && r.Notify != nil {
			r.Notify(cur)
		}
		if r.AtPhase != nil {
			r.AtPhase(cur.Phase)
		}
		if len(fx) == 0 {
			return cur, nil
		}
		ev, err = r.do(ctx, cur, fx)
		if err != nil {
			return cur, err
		}
	}
}

func sameState(a, b State) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// do carries out effects in order; the last one's result is the next event.
// An error is returned only for what stops the runner itself.
func (r *Runner) do(ctx context.Context, s State, fx []Effect) (Event, error) {
	var ev Event
	for _, f := range fx {
		var err error
		ev, err = r.effect(ctx, s, f)
		if err != nil {
			return Event{}, err
		}
	}
	return ev, nil
}

// stop says whether an error must stop the runner rather than become an
// event: power gone, context cancelled.
func stop(err error) bool {
	return errors.Is(err, slot.ErrPowerCut) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

func failed(err error, retryable bool) Event {
	return Event{Kind: EvFailed, Err: err.Error(), Retryable: retryable, Security: isSecurity(err)}
}

// isSecurity says whether an error is an attack or forgery (never retried):
// a bad image, or a download that is not the signed target.
func isSecurity(err error) bool {
	var tm *TargetMismatchError
	return image.IsSecurity(err) || errors.As(err, &tm)
}

func (r *Runner) hookEnv(u *Update, hook string) HookEnv {
	return HookEnv{Hook: hook, UpdateID: u.ID, FromVersion: u.FromVersion, ToVersion: u.toVersion(),
		FromSlot: u.FromSlot, ToSlot: u.ToSlot, DataDir: r.DataDir, RevertDir: r.revertDir(u)}
}

func (r *Runner) effect(ctx context.Context, s State, f Effect) (Event, error) {
	u := s.Update
	lg := r.log()
	switch f.Kind {
	case FxSleep:
		return Event{}, r.sleep(ctx, f.Delay)

	case FxCheckServer:
		return Event{Kind: EvNoUpdate}, nil // the server link comes with the update server

	case FxDownload:
		if r.Fetcher == nil {
			return failed(errors.New("downloads are not configured on this device"), false), nil
		}
		var limit int64
		if u.Offer != nil && u.Offer.SHA256 != "" {
			limit = u.Offer.Size // signed metadata says how long it is: no byte more
		}
		err := r.Fetcher.Fetch(ctx, u.Source, r.stagingPath(), limit, r.progress("downloading"))
		if stop(err) {
			return Event{}, err
		}
		if err != nil {
			return failed(err, true), nil
		}
		return Event{Kind: EvDownloaded, Staged: r.stagingPath()}, nil

	case FxVerify:
		info, err := r.verifyFile(ctx, u.Staged, u.Offer)
		if stop(err) {
			return Event{}, err
		}
		if err != nil {
			return failed(err, !isSecurity(err) && !isFormat(err)), nil
		}
		return Event{Kind: EvVerified, Image: info}, nil

	case FxInstall:
		if err := r.Hooks.Run(ctx, HookPreInstall, r.hookEnv(u, HookPreInstall)); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return Event{Kind: EvFailed, Hook: HookPreInstall, Err: err.Error(), Retryable: errors.Is(err, ErrRetryLater)}, nil
		}
		if err := r.install(ctx, u); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return failed(err, !isSecurity(err) && !isFormat(err)), nil
		}
		if err := r.Hooks.Run(ctx, HookPostInstall, r.hookEnv(u, HookPostInstall)); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return Event{Kind: EvFailed, Hook: HookPostInstall, Err: err.Error(), Retryable: errors.Is(err, ErrRetryLater)}, nil
		}
		return Event{Kind: EvInstalled}, nil

	case FxArm:
		err := r.arm(ctx, u)
		if stop(err) {
			return Event{}, err
		}
		if err != nil {
			return Event{Kind: EvFailed, Err: err.Error(), Security: true}, nil
		}
		return Event{Kind: EvArmed}, nil

	case FxReboot:
		lg.Info("rebooting", "into", u.ToSlot)
		if r.Reboot == nil {
			return Event{}, ErrReboot
		}
		if err := r.Reboot(ctx); err != nil {
			return Event{}, err
		}
		return Event{}, ErrReboot

	case FxPrepareRevert:
		if err := r.prepareRevert(ctx, u); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return failed(err, true), nil
		}
		return Event{Kind: EvRevertPrepared}, nil

	case FxRunHook:
		if err := r.Hooks.Run(ctx, f.Hook, r.hookEnv(u, f.Hook)); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return Event{Kind: EvFailed, Hook: f.Hook, Err: err.Error(), Retryable: errors.Is(err, ErrRetryLater)}, nil
		}
		return Event{Kind: EvHookDone, Hook: f.Hook}, nil

	case FxCommit:
		if err := r.commit(ctx, u); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return failed(err, true), nil
		}
		return Event{Kind: EvCommitted}, nil

	case FxRollback:
		if err := r.rollback(ctx, u, f.OnNewSlot); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return failed(err, true), nil
		}
		return Event{Kind: EvRolledBack}, nil

	case FxCleanup:
		if err := r.cleanup(u, s.Phase); err != nil {
			if stop(err) {
				return Event{}, err
			}
			lg.Warn("cleanup", "err", err)
		}
		return Event{Kind: EvCleaned}, nil

	case FxReport:
		lg.Info("update outcome", "result", u.Outcome.Result, "reason", u.Outcome.Reason, "from", u.Outcome.From, "to", u.Outcome.To)
		if r.Reporter == nil {
			return Event{Kind: EvReported}, nil
		}
		o := u.Outcome
		o.UpdateID = u.ID
		if err := r.Reporter.Report(ctx, o); err != nil {
			if stop(err) {
				return Event{}, err
			}
			return failed(err, !errors.Is(err, ErrReportLater)), nil
		}
		return Event{Kind: EvReported}, nil
	}
	return Event{}, fmt.Errorf("internal: unknown effect %q", f.Kind)
}

func isFormat(err error) bool {
	var ie *image.Error
	return errors.As(err, &ie)
}

func (r *Runner) progress(what string) func(done, total int64) {
	if r.Progress == nil {
		return nil
	}
	return func(done, total int64) { r.Progress(what, done, total) }
}

// trustedKeys are the device's keys not revoked by its key epoch.
func (r *Runner) trustedKeys() ([]crypto.PublicKey, error) {
	nv, err := r.NV.Load()
	if err != nil {
		return nil, err
	}
	all := r.Device.Keys
	if r.KeysFile != "" {
		more, err := boot.LoadKeysFile(r.KeysFile)
		if err != nil {
			// Its revocations cannot be known: verify nothing rather than
			// trust a key it may revoke.
			return nil, fmt.Errorf("image keys learned from signed metadata: %w", err)
		}
		all = boot.MergeKeys(all, more)
	}
	var keys []crypto.PublicKey
	for _, k := range all {
		if k.RevokedAtEpoch == 0 || nv.KeyEpoch < k.RevokedAtEpoch {
			keys = append(keys, k.Key)
		}
	}
	return keys, nil
}

func (r *Runner) openSource(path string) (io.ReadCloser, error) {
	if r.OpenSource != nil {
		return r.OpenSource(path)
	}
	b, err := r.FS.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func infoOf(img *image.Image) *ImageInfo {
	return &ImageInfo{Version: img.Version().String(), SecurityCounter: img.SecurityCounter, HWClass: img.HWClass, Len: img.Len}
}

// VerifyStaged checks a downloaded image as the verifying phase does: its
// signature by a trusted key and, when o carries them, the length and
// SHA-256 signed metadata gave.
func (r *Runner) VerifyStaged(ctx context.Context, path string, o *Offer) (*ImageInfo, error) {
	return r.verifyFile(ctx, path, o)
}

func (r *Runner) verifyFile(ctx context.Context, path string, o *Offer) (*ImageInfo, error) {
	keys, err := r.trustedKeys()
	if err != nil {
		return nil, err
	}
	f, err := r.openSource(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	n := &countWriter{}
	src := io.TeeReader(f, io.MultiWriter(h, n))
	img, _, verr := image.ReadVerify(ctx, src, keys, image.ReadOptions{Trailer: image.TrailerMCUboot})
	if o != nil && o.SHA256 != "" {
		// What signed metadata says comes first: a download that is not
		// the signed target is refused as such, whatever else is wrong.
		if _, err := io.Copy(io.Discard, src); err != nil {
			return nil, err
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != o.SHA256 || n.n != o.Size {
			return nil, &TargetMismatchError{WantSHA256: o.SHA256, GotSHA256: got, WantLen: o.Size, GotLen: n.n}
		}
	}
	if verr != nil {
		return nil, verr
	}
	return infoOf(img), nil
}

// TargetMismatchError is a download that is not what signed metadata
// described: another length or SHA-256. A security failure.
type TargetMismatchError struct {
	WantSHA256, GotSHA256 string
	WantLen, GotLen       int64
}

func (e *TargetMismatchError) Error() string {
	return fmt.Sprintf("refused: the download (%d bytes, SHA-256 %s) is not the signed target (%d bytes, SHA-256 %s)", e.GotLen, e.GotSHA256, e.WantLen, e.WantSHA256)
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// install streams the staged image into the inactive slot, verifying it on
// the way (one pass: the hash is computed from the bytes being written),
// and syncs the slot.
func (r *Runner) install(ctx context.Context, u *Update) error {
	dst, ok := r.Device.Slots[u.ToSlot]
	if !ok {
		return fmt.Errorf("no slot %q", u.ToSlot)
	}
	keys, err := r.trustedKeys()
	if err != nil {
		return err
	}
	src, err := r.openSource(u.Staged)
	if err != nil {
		return err
	}
	defer src.Close()
	if u.Image != nil && u.Image.Len > dst.Size() {
		return fmt.Errorf("image of %d bytes does not fit slot %s (%d bytes)", u.Image.Len, u.ToSlot, dst.Size())
	}
	var total int64
	if u.Image != nil {
		total = u.Image.Len
	}
	img, err := InstallImage(ctx, src, dst, keys, total, r.progress("installing"))
	if err != nil {
		return err
	}
	if u.Image != nil && (img.Version().String() != u.Image.Version || img.Len != u.Image.Len) {
		return fmt.Errorf("the image changed between verification and installation")
	}
	return nil
}

// InstallImage streams an image from src into a slot, verifying it in the
// same pass, and syncs the slot: one read of the source, one write of the
// slot, constant memory. Reading, hashing and writing overlap: a reader
// fills 256 KiB buffers, the verifier hashes them, and a writer writes each
// buffer once the verifier has consumed it, at offsets aligned to the buffer
// size (unaligned writes would make the kernel read slot pages back first).
// Exactly the bytes the verifier read are written, up to the end of the
// image. total, if known, is the image length for progress reports.
func InstallImage(ctx context.Context, src io.Reader, dst slot.Device, keys []crypto.PublicKey, total int64, progress func(done, total int64)) (*image.Image, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	free := make(chan []byte, installBuffers)
	for i := 0; i < installBuffers; i++ {
		free <- make([]byte, installBufSize)
	}
	filled := make(chan chunk, installBuffers)
	toWrite := make(chan chunk, installBuffers)

	go func() { // reader
		defer close(filled)
		for {
			var b []byte
			select {
			case b = <-free:
			case <-ctx.Done():
				return
			}
			n, err := io.ReadFull(src, b)
			if err == io.ErrUnexpectedEOF {
				err = io.EOF
			}
			select {
			case filled <- chunk{b, n, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	werr := make(chan error, 1)
	go func() { // writer
		var off int64
		var err error
		for c := range toWrite {
			if err == nil && c.n > 0 {
				_, err = dst.WriteAt(c.b[:c.n], off)
				off += int64(c.n)
				if err != nil {
					cancel()
				}
			}
			free <- c.b
		}
		werr <- err
	}()

	cr := &chunkReader{ctx: ctx, filled: filled, toWrite: toWrite}
	opts := image.ReadOptions{Trailer: image.TrailerIgnore}
	if progress != nil && total > 0 {
		opts.Progress = func(done, _ int64) { progress(done, total) }
	}
	img, _, verr := image.ReadVerify(ctx, cr, keys, opts)
	cr.flush()
	close(toWrite)
	if err := <-werr; err != nil {
		return nil, fmt.Errorf("write slot: %w", err)
	}
	if verr != nil {
		return nil, verr
	}
	return img, dst.Sync()
}

const (
	installBufSize = InstallChunk
	installBuffers = 4
)

// InstallChunk is the size of the writes that install an image into a
// slot (one write per chunk, the last one shorter).
const InstallChunk = 256 << 10

type chunk struct {
	b   []byte
	n   int
	err error // io.EOF after the last bytes of the source, or a read error
}

// chunkReader serves the reader's buffers to the verifier and hands each
// one to the writer once it has been consumed.
type chunkReader struct {
	ctx     context.Context
	filled  <-chan chunk
	toWrite chan<- chunk
	cur     chunk
	pos     int
	have    bool
}

func (r *chunkReader) Read(p []byte) (int, error) {
	for !r.have || r.pos == r.cur.n {
		if r.have {
			r.toWrite <- chunk{b: r.cur.b, n: r.cur.n}
			r.have = false
			if r.cur.err != nil {
				return 0, r.cur.err
			}
		}
		select {
		case c, ok := <-r.filled:
			if !ok {
				return 0, io.ErrUnexpectedEOF
			}
			r.cur, r.pos, r.have = c, 0, true
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
	n := copy(p, r.cur.b[r.pos:r.cur.n])
	r.pos += n
	return n, nil
}

// flush hands the consumed part of the current buffer to the writer.
func (r *chunkReader) flush() {
	if r.have {
		r.toWrite <- chunk{b: r.cur.b, n: r.pos}
		r.have = false
	}
}

// arm re-reads the slot, verifies the image there and judges it again from
// its signed TLVs, then sets the trial in the boot environment.
func (r *Runner) arm(ctx context.Context, u *Update) error {
	d, ok := r.Device.Slots[u.ToSlot]
	if !ok {
		return fmt.Errorf("no slot %q", u.ToSlot)
	}
	keys, err := r.trustedKeys()
	if err != nil {
		return err
	}
	img, _, err := image.ReadVerify(ctx, slot.Reader(d), keys, image.ReadOptions{Trailer: image.TrailerIgnore})
	if err != nil {
		return fmt.Errorf("slot %s after installation: %w", u.ToSlot, err)
	}
	info := infoOf(img)
	if u.Image != nil && *info != *u.Image {
		return fmt.Errorf("slot %s holds %+v, not the verified image %+v", u.ToSlot, *info, *u.Image)
	}
	down := u.Offer != nil && u.Offer.Downgrade
	if why := judge(u.Device, info.Version, info.SecurityCounter, true, info.HWClass, down); why != "" {
		return errors.New(why)
	}
	env, err := r.Device.Env.Load()
	if errors.Is(err, bootenv.ErrNoEnv) {
		env = bootenv.Env{boot.VarActive: u.FromSlot}
	} else if err != nil {
		return err
	}
	env[boot.VarTrial] = u.ToSlot
	env[boot.VarTrialLeft] = strconv.Itoa(TrialBoots)
	if env[boot.VarActive] == "" {
		env[boot.VarActive] = u.FromSlot
	}
	return r.Device.Env.Save(env)
}

// commit makes the trial slot the active one, then raises the non-volatile
// counter and key epoch (only now: a rollback stays possible until here),
// then runs the commit hook. Each step is idempotent.
func (r *Runner) commit(ctx context.Context, u *Update) error {
	env, err := r.Device.Env.Load()
	if err != nil {
		return err
	}
	if env[boot.VarActive] != u.ToSlot || env[boot.VarTrial] != "" {
		env[boot.VarActive] = u.ToSlot
		env[boot.VarTrial] = ""
		env[boot.VarTrialLeft] = "0"
		if err := r.Device.Env.Save(env); err != nil {
			return err
		}
	}
	cur, err := r.NV.Load()
	if err != nil {
		return err
	}
	want := cur
	if u.Image != nil && u.Image.SecurityCounter > want.Counter {
		want.Counter = u.Image.SecurityCounter
	}
	if u.Offer != nil && u.Offer.KeyEpoch > want.KeyEpoch {
		want.KeyEpoch = u.Offer.KeyEpoch
	}
	if want != cur {
		if _, err := r.NV.Raise(want); err != nil {
			return err
		}
	}
	if err := r.Hooks.Run(ctx, HookCommit, r.hookEnv(u, HookCommit)); err != nil {
		if stop(err) {
			return err
		}
		r.log().Warn("commit hook failed; the update is committed", "err", err)
	}
	return nil
}

// rollback puts the data back in the old firmware's format, and on the new
// slot clears the trial so the next boot is the old slot.
func (r *Runner) rollback(ctx context.Context, u *Update, onNewSlot bool) error {
	if onNewSlot {
		if err := r.Hooks.Run(ctx, HookRollback, r.hookEnv(u, HookRollback)); err != nil {
			if stop(err) {
				return err
			}
			r.log().Warn("rollback hook failed; restoring from the revert material", "err", err)
		}
	}
	if u.TrialStep != TrialStarted && !u.DataRestored {
		if err := r.restore(ctx, u); err != nil {
			return err
		}
	}
	if !onNewSlot {
		return nil
	}
	env, err := r.Device.Env.Load()
	if err != nil {
		return err
	}
	if env[boot.VarTrial] == "" && env[boot.VarActive] == u.FromSlot {
		return nil
	}
	env[boot.VarTrial] = ""
	env[boot.VarTrialLeft] = "0"
	env[boot.VarActive] = u.FromSlot
	return r.Device.Env.Save(env)
}

// cleanup removes the staging file and the revert material, and disarms a
// trial that an update which failed had set.
func (r *Runner) cleanup(u *Update, p Phase) error {
	if u.Staged == r.stagingPath() {
		for _, p := range []string{u.Staged, u.Staged + ".progress"} {
			if err := r.FS.Remove(p); err != nil && !slot.IsNotExist(err) {
				return err
			}
		}
	}
	if err := removeAll(r.FS, r.revertDir(u)); err != nil {
		return err
	}
	if p == PhaseFailed && u.Device.Booted != u.ToSlot {
		env, err := r.Device.Env.Load()
		if err == nil && env[boot.VarTrial] == u.ToSlot {
			env[boot.VarTrial] = ""
			env[boot.VarTrialLeft] = "0"
			return r.Device.Env.Save(env)
		}
	}
	return r.FS.SyncDir(r.StateDir)
}
