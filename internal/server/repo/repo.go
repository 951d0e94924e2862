// Package repo is the update server's TUF repository (The Update
// Framework, through go-tuf v2's metadata package): what devices check an
// offer against before they download a byte.
//
// The four top-level roles are split by where their keys live:
//
//	root       offline (the operator's CLI), threshold such as 2 of 3: which keys
//	           each role has; rotated by a new root signed by old and new keys
//	targets    offline (the operator's CLI): the releases, with their length,
//	           SHA-256 and custom fields (hardware class, version, security
//	           counter, format, downgrade mark, key epoch)
//	snapshot   online (this server): the versions of targets metadata
//	timestamp  online (this server), short-lived and re-signed automatically:
//	           the version of snapshot, so a device notices a freeze
//
// The server never signs root or targets: it checks what the operator
// uploads (signatures and thresholds against the current root, versions,
// expiry, that every target's image is in the blob store) and then
// publishes new snapshot and timestamp metadata. Consistent snapshots:
// devices fetch N.root.json, timestamp.json, N.snapshot.json and
// N.targets.json. Files are written with fsync and renamed into place.
package repo

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"
	"github.com/theupdateframework/go-tuf/v2/metadata/trustedmetadata"

	"github.com/fieldpatch/fieldpatch/internal/atomicfile"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// Default lifetimes of the online roles' metadata.
const (
	DefaultTimestampLifetime = 24 * time.Hour
	DefaultSnapshotLifetime  = 7 * 24 * time.Hour
)

// ErrNotInitialized is returned before an operator uploaded a first root.
var ErrNotInitialized = errors.New("the TUF repository has no root yet: run fieldpatch trust init")

// Repo is the repository in one directory: metadata/ and keys/ (the
// online keys, mode 0600).
type Repo struct {
	dir string
	// TimestampLifetime and SnapshotLifetime: how long the online roles'
	// metadata is valid; Refresh re-signs at half of it.
	TimestampLifetime, SnapshotLifetime time.Duration
	// Now is the clock for expiry (always the real time on a server).
	Now func() time.Time

	mu        sync.Mutex
	online    map[string]crypto.Signer // snapshot, timestamp
	next      map[string]crypto.Signer // new online keys waiting for a root that names them
	root      *metadata.Metadata[metadata.RootType]
	rootRaw   []byte
	targets   *metadata.Metadata[metadata.TargetsType]
	targetRaw []byte
	snapshot  *metadata.Metadata[metadata.SnapshotType]
	timestamp *metadata.Metadata[metadata.TimestampType]
	// stale: the current targets do not verify under the current root (a
	// root that changed the targets keys, waiting for targets re-signed
	// with them): nothing is offered meanwhile.
	stale bool
}

// Open opens (creating the online keys on first use) the repository in dir.
func Open(dir string) (*Repo, error) {
	r := &Repo{dir: dir, TimestampLifetime: DefaultTimestampLifetime, SnapshotLifetime: DefaultSnapshotLifetime, Now: time.Now, online: map[string]crypto.Signer{}}
	for _, d := range []string{r.metaDir(), filepath.Join(dir, "keys")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	if err := r.load(); err != nil {
		return nil, err
	}
	keys := filepath.Join(dir, "keys")
	r.next = map[string]crypto.Signer{}
	for _, role := range []string{metadata.SNAPSHOT, metadata.TIMESTAMP} {
		if k, err := trust.LoadPrivateKey(filepath.Join(keys, role+".pem")); err == nil {
			r.online[role] = k
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("online %s key: %w", role, err)
		}
		if k, err := trust.LoadPrivateKey(filepath.Join(keys, "next-"+role+".pem")); err == nil {
			r.next[role] = k
		}
	}
	switch {
	case r.root != nil && r.names(r.root, r.next):
		// A root naming the new online keys was published, and the server
		// stopped before they took over: finish that now.
		if err := r.promote(); err != nil {
			return nil, err
		}
	case r.root != nil && len(r.online) < 2:
		return nil, fmt.Errorf("the online keys in %s are missing: restore them from a backup, or publish a root naming new ones (fieldpatch trust rotate-online)", keys)
	}
	if r.root == nil {
		for _, role := range []string{metadata.SNAPSHOT, metadata.TIMESTAMP} {
			if r.online[role] != nil {
				continue
			}
			_, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return nil, err
			}
			if _, _, err := trust.WriteKeyPair(filepath.Join(keys, role), priv); err != nil {
				return nil, fmt.Errorf("online %s key: %w", role, err)
			}
			r.online[role] = priv
		}
	}
	return r, nil
}

// names says whether a root gives the snapshot and timestamp roles exactly
// these keys, threshold 1.
func (r *Repo) names(md *metadata.Metadata[metadata.RootType], keys map[string]crypto.Signer) bool {
	if len(keys) != 2 {
		return false
	}
	for role, k := range keys {
		id, err := KeyID(k.Public())
		rl := md.Signed.Roles[role]
		if err != nil || rl == nil || rl.Threshold != 1 || len(rl.KeyIDs) != 1 || rl.KeyIDs[0] != id {
			return false
		}
	}
	return true
}

// RotateOnline makes new snapshot and timestamp keys (once; asked again,
// it returns the same) and returns their public keys. They sign nothing
// until a root that names them is published; then they replace the old
// ones. After a leak of an online key this is how devices recover, also
// from a fast-forward attack (a timestamp or snapshot version inflated
// with the stolen key): their cached metadata, signed by the old key, no
// longer verifies under the new root and is set aside.
func (r *Repo) RotateOnline() (map[string]*metadata.Key, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]*metadata.Key{}
	for _, role := range []string{metadata.SNAPSHOT, metadata.TIMESTAMP} {
		if r.next[role] == nil {
			_, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return nil, err
			}
			if _, _, err := trust.WriteKeyPair(filepath.Join(r.dir, "keys", "next-"+role), priv); err != nil {
				return nil, err
			}
			r.next[role] = priv
		}
		k, err := metadata.KeyFromPublicKey(r.next[role].Public())
		if err != nil {
			return nil, err
		}
		out[role] = k
	}
	return out, nil
}

// promote makes the waiting online keys the current ones (their files
// too: the old ones are kept as retired-*.pem). Called with mu held.
func (r *Repo) promote() error {
	for role, k := range r.next {
		keys := filepath.Join(r.dir, "keys")
		stamp := strconv.FormatInt(r.Now().Unix(), 10)
		// Each step can be repeated after a crash: an old key already
		// retired, or a next key already in place, is skipped.
		for _, ext := range []string{".pem", ".pub.pem"} {
			cur, next := filepath.Join(keys, role+ext), filepath.Join(keys, "next-"+role+ext)
			if _, err := os.Stat(next); err != nil {
				continue
			}
			if _, err := os.Stat(cur); err == nil {
				if err := os.Rename(cur, filepath.Join(keys, "retired-"+stamp+"-"+role+ext)); err != nil {
					return err
				}
			}
			if err := os.Rename(next, cur); err != nil {
				return err
			}
		}
		r.online[role] = k
	}
	r.next = map[string]crypto.Signer{}
	return nil
}

func (r *Repo) metaDir() string { return filepath.Join(r.dir, "metadata") }

var versioned = regexp.MustCompile(`^([1-9][0-9]{0,17})\.(root|snapshot|targets)\.json$`)

// load reads the newest metadata of each role.
func (r *Repo) load() error {
	entries, err := os.ReadDir(r.metaDir())
	if err != nil {
		return err
	}
	newest := map[string]int64{}
	for _, e := range entries {
		if m := versioned.FindStringSubmatch(e.Name()); m != nil {
			v, _ := strconv.ParseInt(m[1], 10, 64)
			newest[m[2]] = max(newest[m[2]], v)
		}
	}
	read := func(name string) ([]byte, error) { return os.ReadFile(filepath.Join(r.metaDir(), name)) }
	if v := newest[metadata.ROOT]; v > 0 {
		if r.rootRaw, err = read(fmt.Sprintf("%d.root.json", v)); err != nil {
			return err
		}
		if r.root, err = metadata.Root().FromBytes(r.rootRaw); err != nil {
			return err
		}
	}
	if v := newest[metadata.TARGETS]; v > 0 {
		if r.targetRaw, err = read(fmt.Sprintf("%d.targets.json", v)); err != nil {
			return err
		}
		if r.targets, err = metadata.Targets().FromBytes(r.targetRaw); err != nil {
			return err
		}
	}
	if v := newest[metadata.SNAPSHOT]; v > 0 {
		b, err := read(fmt.Sprintf("%d.snapshot.json", v))
		if err != nil {
			return err
		}
		if r.snapshot, err = metadata.Snapshot().FromBytes(b); err != nil {
			return err
		}
	}
	if b, err := read("timestamp.json"); err == nil {
		if r.timestamp, err = metadata.Timestamp().FromBytes(b); err != nil {
			return err
		}
	}
	if r.root != nil && r.targets != nil {
		r.stale = r.root.VerifyDelegate(metadata.TARGETS, r.targets) != nil
	}
	return nil
}

// OnlineKeys are the public keys of the roles this server signs; a root
// must name exactly these for snapshot and timestamp.
func (r *Repo) OnlineKeys() (map[string]*metadata.Key, error) {
	out := map[string]*metadata.Key{}
	for role, k := range r.online {
		key, err := metadata.KeyFromPublicKey(k.Public())
		if err != nil {
			return nil, err
		}
		out[role] = key
	}
	return out, nil
}

// Initialized says whether a root has been published.
func (r *Repo) Initialized() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.root != nil
}

// PublishRoot checks and publishes a new root: the first one must be
// signed by its own threshold of root keys; each next one must have the
// next version and be signed by a threshold of the current root's root
// keys and of its own. It must name this server's online keys for
// snapshot and timestamp (threshold 1), use consistent snapshots and not
// be expired. Snapshot and timestamp are then signed anew.
func (r *Repo) PublishRoot(data []byte) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.Now()
	var md *metadata.Metadata[metadata.RootType]
	if r.root == nil {
		t, err := trustedmetadata.New(data)
		if err != nil {
			return 0, fmt.Errorf("root: %w", err)
		}
		md = t.Root
		if md.Signed.Version != 1 {
			return 0, fmt.Errorf("root: the first root has version 1, not %d", md.Signed.Version)
		}
	} else {
		t, err := trustedmetadata.New(r.rootRaw)
		if err != nil {
			return 0, err
		}
		if md, err = t.UpdateRoot(data); err != nil {
			return 0, fmt.Errorf("root: %w", err)
		}
	}
	if md.Signed.IsExpired(now) {
		return 0, fmt.Errorf("root: expired at %v", md.Signed.Expires)
	}
	if !md.Signed.ConsistentSnapshot {
		return 0, errors.New("root: consistent_snapshot must be true")
	}
	promote := false
	switch {
	case r.names(md, r.online):
	case r.names(md, r.next):
		promote = true
	default:
		return 0, errors.New("root: the snapshot and timestamp roles must each have exactly this server's online key (or the new ones from a rotation), threshold 1")
	}
	if rl := md.Signed.Roles[metadata.TARGETS]; rl == nil || rl.Threshold < 1 || len(rl.KeyIDs) < rl.Threshold {
		return 0, errors.New("root: the targets role needs at least threshold keys")
	}
	if err := r.write(fmt.Sprintf("%d.root.json", md.Signed.Version), data); err != nil {
		return 0, err
	}
	r.root, r.rootRaw = md, data
	r.stale = r.targets != nil && md.VerifyDelegate(metadata.TARGETS, r.targets) != nil
	if promote {
		if err := r.promote(); err != nil {
			return 0, err
		}
	}
	if r.targets != nil {
		if err := r.publishOnline(now); err != nil {
			return 0, err
		}
	}
	return md.Signed.Version, nil
}

// TargetCheck is asked about every target of new targets metadata; an
// error refuses the upload.
type TargetCheck func(path string, t *metadata.TargetFiles, custom *proto.TargetCustom) error

// PublishTargets checks and publishes new targets metadata: signed by a
// threshold of the targets keys the current root names, the next version,
// not expired, no delegations, every target with a length, a SHA-256 and
// valid custom fields (check sees each). Then snapshot and timestamp
// follow.
func (r *Repo) PublishTargets(data []byte, check TargetCheck) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.root == nil {
		return 0, ErrNotInitialized
	}
	md, err := metadata.Targets().FromBytes(data)
	if err != nil {
		return 0, fmt.Errorf("targets: %w", err)
	}
	if err := r.root.VerifyDelegate(metadata.TARGETS, md); err != nil {
		return 0, fmt.Errorf("targets: %w", err)
	}
	want := int64(1)
	if r.targets != nil {
		want = r.targets.Signed.Version + 1
	}
	if md.Signed.Version != want {
		return 0, fmt.Errorf("targets: version %d, want %d", md.Signed.Version, want)
	}
	if md.Signed.IsExpired(r.Now()) {
		return 0, fmt.Errorf("targets: expired at %v", md.Signed.Expires)
	}
	if md.Signed.Delegations != nil {
		return 0, errors.New("targets: delegations are not supported")
	}
	for path, t := range md.Signed.Targets {
		c, err := ParseCustom(path, t)
		if err != nil {
			return 0, err
		}
		if check != nil {
			if err := check(path, t, c); err != nil {
				return 0, fmt.Errorf("target %s: %w", path, err)
			}
		}
	}
	if err := r.write(fmt.Sprintf("%d.targets.json", md.Signed.Version), data); err != nil {
		return 0, err
	}
	r.targets, r.targetRaw = md, data
	r.stale = false
	return md.Signed.Version, r.publishOnline(r.Now())
}

// ParseCustom reads and checks a target's custom fields and shape.
func ParseCustom(path string, t *metadata.TargetFiles) (*proto.TargetCustom, error) {
	if t.Length <= 0 || len(t.Hashes["sha256"]) != 32 {
		return nil, fmt.Errorf("target %s: needs a length and a SHA-256", path)
	}
	var c proto.TargetCustom
	if t.Custom == nil {
		return nil, fmt.Errorf("target %s: no custom fields", path)
	}
	if err := json.Unmarshal(*t.Custom, &c); err != nil {
		return nil, fmt.Errorf("target %s: custom fields: %w", path, err)
	}
	if path == proto.ImageKeysTarget || c.Format == "image-keys" {
		if path != proto.ImageKeysTarget || c.Format != "image-keys" || len(c.ImageKeys) == 0 {
			return nil, fmt.Errorf("target %s: the image keys are target %s, format image-keys, with at least one key", path, proto.ImageKeysTarget)
		}
		for i, k := range c.ImageKeys {
			if _, err := trust.ParsePublicKeyPEM([]byte(k.PEM)); err != nil {
				return nil, fmt.Errorf("target %s: key %d: %w", path, i+1, err)
			}
		}
		return &c, nil
	}
	if c.Version == "" || c.HWClass == "" || c.Format != "mcuboot" {
		return nil, fmt.Errorf("target %s: custom fields need version, hw_class and format mcuboot", path)
	}
	if path != TargetName(c.HWClass, c.Version) {
		return nil, fmt.Errorf("target %s: its name must be %s", path, TargetName(c.HWClass, c.Version))
	}
	return &c, nil
}

// SetImageKeys puts the image keys devices trust (and when each is
// revoked) into targets metadata, as target image-keys.json.
func SetImageKeys(md *metadata.Metadata[metadata.TargetsType], keys []proto.ImageKey) error {
	c := proto.TargetCustom{Format: "image-keys", ImageKeys: keys}
	raw, err := json.Marshal(c)
	if err != nil {
		return err
	}
	doc, _ := json.Marshal(keys)
	sum := sha256.Sum256(doc)
	msg := json.RawMessage(raw)
	md.Signed.Targets[proto.ImageKeysTarget] = &metadata.TargetFiles{Length: int64(len(doc)), Hashes: metadata.Hashes{"sha256": sum[:]}, Custom: &msg, Path: proto.ImageKeysTarget}
	return nil
}

// TargetName is a release's target path: HWCLASS/VERSION.img.
func TargetName(hwClass, version string) string { return hwClass + "/" + version + ".img" }

// publishOnline signs a new snapshot (naming the current targets version)
// and a new timestamp (naming that snapshot). Called with mu held.
func (r *Repo) publishOnline(now time.Time) error {
	if r.targets == nil {
		return nil
	}
	sv := int64(1)
	if r.snapshot != nil {
		sv = r.snapshot.Signed.Version + 1
	}
	snap := metadata.Snapshot(now.Add(r.SnapshotLifetime).UTC().Round(time.Second))
	snap.Signed.Version = sv
	snap.Signed.Meta["targets.json"] = metadata.MetaFile(r.targets.Signed.Version)
	raw, err := r.sign(snap, metadata.SNAPSHOT)
	if err != nil {
		return err
	}
	if err := r.write(fmt.Sprintf("%d.snapshot.json", sv), raw); err != nil {
		return err
	}
	r.snapshot = snap
	return r.publishTimestamp(now, raw)
}

func (r *Repo) publishTimestamp(now time.Time, snapRaw []byte) error {
	tv := int64(1)
	if r.timestamp != nil {
		tv = r.timestamp.Signed.Version + 1
	}
	ts := metadata.Timestamp(now.Add(r.TimestampLifetime).UTC().Round(time.Second))
	ts.Signed.Version = tv
	mf := metadata.MetaFile(r.snapshot.Signed.Version)
	mf.Length = int64(len(snapRaw))
	sum := sha256Sum(snapRaw)
	mf.Hashes = metadata.Hashes{"sha256": sum[:]}
	ts.Signed.Meta["snapshot.json"] = mf
	raw, err := r.sign(ts, metadata.TIMESTAMP)
	if err != nil {
		return err
	}
	if err := r.write("timestamp.json", raw); err != nil {
		return err
	}
	r.timestamp = ts
	return nil
}

func sign[T metadata.Roles](md *metadata.Metadata[T], k crypto.Signer) ([]byte, error) {
	s, err := signature.LoadSigner(k, crypto.Hash(0))
	if err != nil {
		return nil, err
	}
	if _, err := md.Sign(s); err != nil {
		return nil, err
	}
	return md.ToBytes(true)
}

func (r *Repo) sign(md any, role string) ([]byte, error) {
	switch m := md.(type) {
	case *metadata.Metadata[metadata.SnapshotType]:
		return sign(m, r.online[role])
	case *metadata.Metadata[metadata.TimestampType]:
		return sign(m, r.online[role])
	}
	return nil, fmt.Errorf("cannot sign %T online", md)
}

// Refresh re-signs snapshot and timestamp when half their lifetime has
// passed (a running server calls it every minute), so devices never see
// them expire while the server is up. It says whether it signed.
func (r *Repo) Refresh() (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.targets == nil || r.snapshot == nil || r.timestamp == nil {
		return false, nil
	}
	now := r.Now()
	switch {
	case r.snapshot.Signed.Expires.Sub(now) < r.SnapshotLifetime/2:
		return true, r.publishOnline(now)
	case r.timestamp.Signed.Expires.Sub(now) < r.TimestampLifetime/2:
		raw, err := os.ReadFile(filepath.Join(r.metaDir(), fmt.Sprintf("%d.snapshot.json", r.snapshot.Signed.Version)))
		if err != nil {
			return false, err
		}
		return true, r.publishTimestamp(now, raw)
	}
	return false, nil
}

var fileName = regexp.MustCompile(`^(timestamp|[1-9][0-9]{0,17}\.(root|snapshot|targets))\.json$`)

// File returns a published metadata file by its name as devices ask for
// it: N.root.json, timestamp.json, N.snapshot.json, N.targets.json.
func (r *Repo) File(name string) ([]byte, error) {
	if !fileName.MatchString(name) {
		return nil, os.ErrNotExist
	}
	return os.ReadFile(filepath.Join(r.metaDir(), name))
}

// Target returns a target of the current targets metadata.
func (r *Repo) Target(path string) (*metadata.TargetFiles, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.targets == nil {
		return nil, false
	}
	t, ok := r.targets.Signed.Targets[path]
	return t, ok
}

// Offerable says whether a release may be offered to devices: always
// before the repository has a root (devices provisioned then check no
// metadata); afterwards only as a target with the release's length and
// SHA-256, since devices check every offer against the signed targets.
func (r *Repo) Offerable(hwClass, version string, length int64, sha256Hex string) bool {
	r.mu.Lock()
	init, stale := r.root != nil, r.stale
	r.mu.Unlock()
	if !init {
		return true
	}
	if stale {
		return false // devices would refuse targets the root no longer vouches for
	}
	t, ok := r.Target(TargetName(hwClass, version))
	return ok && t.Length == length && hex.EncodeToString(t.Hashes["sha256"]) == sha256Hex
}

// Status is what the repository holds.
type Status struct {
	Initialized bool                     `json:"initialized"`
	OnlineKeys  map[string]*metadata.Key `json:"online_keys"` // role -> this server's key
	Roles       map[string]RoleStatus    `json:"roles"`
	Keys        map[string]*metadata.Key `json:"keys,omitempty"` // the root's keys, for the CLI
	Targets     []string                 `json:"targets,omitempty"`
}

// RoleStatus is one role's current metadata.
type RoleStatus struct {
	Version   int64     `json:"version"`
	Expires   time.Time `json:"expires"`
	KeyIDs    []string  `json:"key_ids,omitempty"`
	Threshold int       `json:"threshold,omitempty"`
}

// Status reports versions, expiry, keys and thresholds, and the targets.
func (r *Repo) Status() (Status, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := Status{Initialized: r.root != nil, Roles: map[string]RoleStatus{}}
	online, err := r.OnlineKeys()
	if err != nil {
		return st, err
	}
	st.OnlineKeys = online
	if r.root == nil {
		return st, nil
	}
	st.Keys = r.root.Signed.Keys
	for name, rl := range r.root.Signed.Roles {
		rs := RoleStatus{KeyIDs: rl.KeyIDs, Threshold: rl.Threshold}
		switch name {
		case metadata.ROOT:
			rs.Version, rs.Expires = r.root.Signed.Version, r.root.Signed.Expires
		case metadata.TARGETS:
			if r.targets != nil {
				rs.Version, rs.Expires = r.targets.Signed.Version, r.targets.Signed.Expires
			}
		case metadata.SNAPSHOT:
			if r.snapshot != nil {
				rs.Version, rs.Expires = r.snapshot.Signed.Version, r.snapshot.Signed.Expires
			}
		case metadata.TIMESTAMP:
			if r.timestamp != nil {
				rs.Version, rs.Expires = r.timestamp.Signed.Version, r.timestamp.Signed.Expires
			}
		}
		st.Roles[name] = rs
	}
	if r.targets != nil {
		for p := range r.targets.Signed.Targets {
			st.Targets = append(st.Targets, p)
		}
		sort.Strings(st.Targets)
	}
	return st, nil
}

// Current returns the current root and targets metadata as published.
func (r *Repo) Current(role string) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case role == metadata.ROOT && r.rootRaw != nil:
		return r.rootRaw, nil
	case role == metadata.TARGETS && r.targetRaw != nil:
		return r.targetRaw, nil
	case r.root == nil:
		return nil, ErrNotInitialized
	}
	return nil, os.ErrNotExist
}

func (r *Repo) write(name string, data []byte) error {
	if strings.ContainsAny(name, "/\\") {
		return fmt.Errorf("bad metadata file name %q", name)
	}
	return atomicfile.Write(filepath.Join(r.metaDir(), name), data, 0o644)
}

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }
