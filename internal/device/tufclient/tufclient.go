// Package tufclient is the device's TUF client: before the agent downloads
// an offered image, it brings its trusted metadata up to date through
// go-tuf v2's updater (walking root rotations from the root it trusts,
// then timestamp, snapshot and targets, with every check the TUF
// specification asks for) and takes the image's length, SHA-256 and
// custom fields from the signed targets, never from the offer.
//
// What go-tuf's updater does not do, this package does:
//
//   - the metadata cache (root.json, timestamp.json, snapshot.json,
//     targets.json in Dir) is written with fsync and renamed into place, so
//     a power cut leaves the old file or the new one, never a torn one;
//     go-tuf reads it (for rollback checks) but never writes it;
//   - every download is bounded (Limits) and a server that trickles below
//     a minimum rate over a window is dropped (slow retrieval);
//   - the reference time for expiry is given (Now), the device's trusted
//     time, not its raw clock (see the time policy in docs/SECURITY.md).
package tufclient

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"
	"github.com/theupdateframework/go-tuf/v2/metadata/config"
	"github.com/theupdateframework/go-tuf/v2/metadata/updater"

	"github.com/fieldpatch/fieldpatch/internal/atomicfile"
	"github.com/fieldpatch/fieldpatch/internal/device/agent"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// Limits bound what the client downloads.
type Limits struct {
	Root, Timestamp, Snapshot, Targets int64 // bytes of each role's metadata
	MaxRootRotations                   int64
	// MinRate (bytes per second) over Window: a transfer slower than that
	// once Window has passed is dropped.
	MinRate int64
	Window  time.Duration
}

// DefaultLimits suit a fleet's repository: a few hundred releases.
var DefaultLimits = Limits{Root: 64 << 10, Timestamp: 16 << 10, Snapshot: 64 << 10, Targets: 4 << 20, MaxRootRotations: 64,
	MinRate: 1024, Window: 10 * time.Second}

// Client keeps a device's trusted TUF metadata.
type Client struct {
	// Dir is the metadata cache, on the data partition.
	Dir string
	// FactoryRoot is the root the device was provisioned with; used while
	// Dir holds none.
	FactoryRoot []byte
	// HTTP and BaseURL reach the server's metadata (the device link's
	// client, and the server's URL + /api/v1/tuf/).
	HTTP    *http.Client
	BaseURL string
	// Now is the reference time for expiry: the device's trusted time.
	Now    func() time.Time
	Limits Limits
	// KeysFile, if set, is where the image keys the signed targets carry
	// (target image-keys.json) are written for the agent and the boot
	// selector (boot.LoadKeysFile), each time they change.
	KeysFile string
}

// Error is a failure to bring metadata up to date or to find a target.
// Security says whether it is an attack or a bad repository (refuse the
// offer) rather than a network failure (try again later).
type Error struct {
	Op       string
	Err      error
	security bool
}

func (e *Error) Error() string { return "tuf: " + e.Op + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Security says whether the failure is one to refuse the offer for.
func (e *Error) Security() bool { return e.security }

// classify: anything go-tuf says about the metadata itself is a security
// failure; a failed or slow download is not.
func classify(op string, err error) *Error {
	var dl *metadata.ErrDownload
	var dh *metadata.ErrDownloadHTTP
	var slow *SlowError
	var long *metadata.ErrDownloadLengthMismatch
	// A failed, refused, cut-off or slow transfer is tried again later; what
	// is refused for good is metadata that arrived and does not verify.
	network := errors.As(err, &dl) || errors.As(err, &dh) || errors.As(err, &slow) || errors.As(err, &long) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
	var netErr interface{ Timeout() bool }
	if errors.As(err, &netErr) {
		network = true
	}
	return &Error{Op: op, Err: err, security: !network}
}

// SlowError is a download dropped for being slower than the minimum rate.
type SlowError struct {
	URL   string
	Bytes int64
	After time.Duration
}

func (e *SlowError) Error() string {
	return fmt.Sprintf("%s: %d bytes in %v, below the minimum rate: dropped (slow retrieval)", e.URL, e.Bytes, e.After.Round(time.Millisecond))
}

// Files of the cache.
const (
	rootFile = "root.json"
)

// Target brings the metadata up to date and returns the signed target of
// that name with its custom fields.
func (c *Client) Target(ctx context.Context, name string) (*metadata.TargetFiles, *proto.TargetCustom, error) {
	up, err := c.Refresh(ctx)
	if err != nil {
		return nil, nil, err
	}
	if err := c.learnKeys(up); err != nil {
		return nil, nil, err
	}
	t, err := up.GetTargetInfo(name)
	if err != nil {
		return nil, nil, classify("target "+name, err)
	}
	if t.Custom == nil {
		return nil, nil, &Error{Op: "target " + name, Err: errors.New("no custom fields"), security: true}
	}
	var cu proto.TargetCustom
	if err := json.Unmarshal(*t.Custom, &cu); err != nil {
		return nil, nil, &Error{Op: "target " + name, Err: err, security: true}
	}
	if len(t.Hashes["sha256"]) != 32 || t.Length <= 0 {
		return nil, nil, &Error{Op: "target " + name, Err: errors.New("no SHA-256 or length"), security: true}
	}
	return t, &cu, nil
}

// learnKeys writes the image keys the signed targets carry, if any.
func (c *Client) learnKeys(up *updater.Updater) error {
	if c.KeysFile == "" {
		return nil
	}
	t, err := up.GetTargetInfo(proto.ImageKeysTarget)
	if err != nil || t.Custom == nil {
		return nil // none published
	}
	var cu proto.TargetCustom
	if err := json.Unmarshal(*t.Custom, &cu); err != nil || cu.Format != "image-keys" {
		return &Error{Op: "image keys", Err: fmt.Errorf("target %s: not an image-keys document", proto.ImageKeysTarget), security: true}
	}
	for i, k := range cu.ImageKeys {
		if _, err := trust.ParsePublicKeyPEM([]byte(k.PEM)); err != nil {
			return &Error{Op: "image keys", Err: fmt.Errorf("key %d: %w", i+1, err), security: true}
		}
	}
	doc, _ := json.MarshalIndent(map[string]any{"keys": cu.ImageKeys}, "", "  ")
	if old, err := os.ReadFile(c.KeysFile); err == nil && string(old) == string(doc) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(c.KeysFile), 0o700); err != nil {
		return &Error{Op: "image keys", Err: err}
	}
	if err := atomicfile.Write(c.KeysFile, doc, 0o644); err != nil {
		return &Error{Op: "image keys", Err: err}
	}
	return nil
}

// TrustedRootVersion is the version of the root the device trusts now.
func (c *Client) TrustedRootVersion() (int64, error) {
	md, err := metadata.Root().FromBytes(c.trustedRoot())
	if err != nil {
		return 0, err
	}
	return md.Signed.Version, nil
}

func (c *Client) trustedRoot() []byte {
	if b, err := os.ReadFile(filepath.Join(c.Dir, rootFile)); err == nil {
		return b
	}
	return c.FactoryRoot
}

// Refresh runs the TUF client workflow once and persists what it trusted.
func (c *Client) Refresh(ctx context.Context) (*updater.Updater, error) {
	if len(c.FactoryRoot) == 0 && c.trustedRoot() == nil {
		return nil, &Error{Op: "refresh", Err: errors.New("no trusted root"), security: true}
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return nil, &Error{Op: "refresh", Err: err}
	}
	lim := c.Limits
	if lim.Root == 0 {
		lim = DefaultLimits
	}
	f := &fetcher{ctx: ctx, c: c, lim: lim, got: map[string][]byte{}}
	cfg, err := config.New("https://device-link"+path.Clean("/"+proto.PathTUF)+"/", c.trustedRoot())
	if err != nil {
		return nil, &Error{Op: "refresh", Err: err}
	}
	cfg.Fetcher = f
	cfg.LocalMetadataDir = c.Dir
	cfg.DisableLocalCache = true // read by go-tuf, written here with fsync
	cfg.RootMaxLength, cfg.TimestampMaxLength, cfg.SnapshotMaxLength, cfg.TargetsMaxLength = lim.Root, lim.Timestamp, lim.Snapshot, lim.Targets
	cfg.MaxRootRotations = lim.MaxRootRotations
	cfg.MaxDelegations = 0
	up, err := updater.New(cfg)
	if err != nil {
		return nil, classify("load trusted root", err)
	}
	now := time.Now
	if c.Now != nil {
		now = c.Now
	}
	up.UnsafeSetRefTime(now().UTC())
	if err := refresh(up); err != nil {
		return nil, classify("refresh", err)
	}
	if err := c.persist(up, f.got); err != nil {
		return nil, &Error{Op: "persist", Err: err}
	}
	return up, nil
}

// refresh runs the updater, turning a panic inside it (metadata shaped
// so that go-tuf dereferences nil) into a refusal rather than a crash.
func refresh(up *updater.Updater) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &metadata.ErrRepository{Msg: fmt.Sprintf("metadata the TUF client could not handle: %v", p)}
		}
	}()
	return up.Refresh()
}

// persist writes what the updater now trusts, from the bytes it was given
// (root first: the most precious).
func (c *Client) persist(up *updater.Updater, got map[string][]byte) error {
	t := up.GetTrustedMetadataSet()
	write := func(name string, b []byte) error {
		if b == nil {
			return nil
		}
		return atomicfile.Write(filepath.Join(c.Dir, name), b, 0o644)
	}
	root := got[fmt.Sprintf("%d.root.json", t.Root.Signed.Version)]
	if root == nil && !fileExists(filepath.Join(c.Dir, rootFile)) {
		root = c.FactoryRoot // still the factory root: the cache starts from it
	}
	if err := write(rootFile, root); err != nil {
		return err
	}
	if t.Targets[metadata.TARGETS] != nil {
		if err := write("targets.json", got[fmt.Sprintf("%d.targets.json", t.Targets[metadata.TARGETS].Signed.Version)]); err != nil {
			return err
		}
	}
	if t.Snapshot != nil {
		if err := write("snapshot.json", got[fmt.Sprintf("%d.snapshot.json", t.Snapshot.Signed.Version)]); err != nil {
			return err
		}
	}
	if t.Timestamp != nil {
		if b := got["timestamp.json"]; b != nil {
			cached := int64(0)
			if old, err := os.ReadFile(filepath.Join(c.Dir, "timestamp.json")); err == nil {
				if md, err := metadata.Timestamp().FromBytes(old); err == nil {
					cached = md.Signed.Version
				}
			}
			// Written only when go-tuf took it: not when the cache holds the
			// same version (the download was then discarded for the cache);
			// yes when the cache holds another (older, or one set aside after
			// a key rotation, as in fast-forward recovery).
			if md, err := metadata.Timestamp().FromBytes(b); err == nil && md.Signed.Version == t.Timestamp.Signed.Version && md.Signed.Version != cached {
				return write("timestamp.json", b)
			}
		}
	}
	return nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// fetcher is go-tuf's Fetcher over the device link: bounded, rate-checked,
// a missing file reported as HTTP 404 (the end of the root chain), and
// every body kept so the cache can be written from what was verified.
type fetcher struct {
	ctx context.Context
	c   *Client
	lim Limits
	got map[string][]byte
}

func (f *fetcher) DownloadFile(urlPath string, maxLength int64, _ time.Duration) ([]byte, error) {
	name := path.Base(urlPath)
	// go-tuf passes the lengths signed metadata gives; they never exceed
	// this device's own limit for the role.
	limit := f.lim.Targets
	switch {
	case strings.HasSuffix(name, ".root.json"):
		limit = f.lim.Root
	case name == "timestamp.json":
		limit = f.lim.Timestamp
	case strings.HasSuffix(name, ".snapshot.json"):
		limit = f.lim.Snapshot
	}
	if maxLength <= 0 || maxLength > limit {
		maxLength = limit
	}
	b, err := f.c.get(f.ctx, name, maxLength, f.lim)
	if err != nil {
		return nil, err
	}
	f.got[name] = b
	return b, nil
}

// get fetches one metadata file.
func (c *Client) get(ctx context.Context, name string, maxLength int64, lim Limits) ([]byte, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	url := c.BaseURL + name
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, &metadata.ErrDownload{Msg: err.Error()}
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, &metadata.ErrDownload{Msg: err.Error()}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, &metadata.ErrDownloadHTTP{StatusCode: resp.StatusCode, URL: url}
	}
	if resp.ContentLength > maxLength {
		return nil, &metadata.ErrDownloadLengthMismatch{Msg: fmt.Sprintf("%s: %d bytes, more than the %d allowed", url, resp.ContentLength, maxLength)}
	}
	// Slow retrieval: a watchdog drops a transfer that, once the window
	// has passed, has averaged below the minimum rate.
	var n atomic.Int64
	start := time.Now()
	done := make(chan struct{})
	defer close(done)
	var slow atomic.Pointer[SlowError]
	if lim.MinRate > 0 && lim.Window > 0 {
		go func() {
			t := time.NewTicker(lim.Window / 4)
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
					el := time.Since(start)
					if el >= lim.Window && float64(n.Load()) < float64(lim.MinRate)*el.Seconds() {
						e := &SlowError{URL: url, Bytes: n.Load(), After: el}
						slow.Store(e)
						cancel(e)
						return
					}
				}
			}
		}()
	}
	buf := make([]byte, 0, min(maxLength, 64<<10))
	chunk := make([]byte, 32<<10)
	for {
		k, rerr := resp.Body.Read(chunk)
		if k > 0 {
			if int64(len(buf)+k) > maxLength {
				return nil, &metadata.ErrDownloadLengthMismatch{Msg: fmt.Sprintf("%s: more than the %d bytes allowed", url, maxLength)}
			}
			buf = append(buf, chunk[:k]...)
			n.Add(int64(k))
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			if e := slow.Load(); e != nil {
				return nil, e
			}
			return nil, &metadata.ErrDownload{Msg: rerr.Error()}
		}
	}
	if e := slow.Load(); e != nil {
		return nil, e
	}
	return buf, nil
}

// SHA256 is a target's SHA-256 in hex.
func SHA256(t *metadata.TargetFiles) string { return hex.EncodeToString(t.Hashes["sha256"]) }

// CheckOffer is an agent.Runner's CheckOffer: the offer as the signed
// targets describe the target it names (length, SHA-256, custom fields);
// the server's own description is not used.
func (c *Client) CheckOffer(ctx context.Context, o *proto.Offer) (*agent.Offer, error) {
	t, cu, err := c.Target(ctx, o.Target.Name)
	if err != nil {
		return nil, err
	}
	return agent.OfferFromTarget(t.Length, SHA256(t), cu), nil
}
