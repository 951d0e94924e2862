package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"
	"github.com/theupdateframework/go-tuf/v2/metadata/trustedmetadata"

	"github.com/fieldpatch/fieldpatch/internal/atomicfile"
	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
	"github.com/fieldpatch/fieldpatch/internal/server/repo"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
	"github.com/fieldpatch/fieldpatch/internal/trust"
)

// The offline keys live in one directory (--keys): root-N.pem and
// targets-N.pem with their .pub.pem, mode 0600; keys rotated out move to
// retired/. Which role a key signs for is read from the current root, by
// key ID, so the file names are only for people.

type offlineKeys struct {
	dir  string
	keys map[string]crypto.Signer // key ID -> private key
}

func keysFlag(fs *flag.FlagSet) *string {
	return fs.String("keys", envOr("FIELDPATCH_KEYS", "fieldpatch-keys"), "directory of the offline TUF keys (root-*.pem, targets-*.pem); keep it off the server")
}

func loadOfflineKeys(dir string) (*offlineKeys, error) {
	files, _ := filepath.Glob(filepath.Join(dir, "*.pem"))
	k := &offlineKeys{dir: dir, keys: map[string]crypto.Signer{}}
	for _, f := range files {
		if strings.HasSuffix(f, ".pub.pem") {
			continue
		}
		s, err := trust.LoadPrivateKey(f)
		if err != nil {
			return nil, cli.Failed(err)
		}
		id, err := repo.KeyID(s.Public())
		if err != nil {
			return nil, cli.Failed(err)
		}
		k.keys[id] = s
	}
	return k, nil
}

// forRole returns the keys held here that the root names for role.
func (k *offlineKeys) forRole(root *metadata.Metadata[metadata.RootType], role string) []crypto.Signer {
	var out []crypto.Signer
	for _, id := range root.Signed.Roles[role].KeyIDs {
		if s, ok := k.keys[id]; ok {
			out = append(out, s)
		}
	}
	return out
}

// signersFor returns the keys held here for role, refusing when they are
// fewer than the root's threshold for it.
func (k *offlineKeys) signersFor(root *metadata.Metadata[metadata.RootType], role string) ([]crypto.Signer, error) {
	s := k.forRole(root, role)
	if need := root.Signed.Roles[role].Threshold; len(s) < need {
		return nil, cli.Refused(fmt.Errorf("%s holds %d of the %d %s keys needed", k.dir, len(s), need, role))
	}
	return s, nil
}

// generate makes n new keys named prefix-N.pem (N after the highest in
// use, retired ones included).
func (k *offlineKeys) generate(prefix string, n int) ([]crypto.Signer, []crypto.PublicKey, error) {
	if err := os.MkdirAll(k.dir, 0o700); err != nil {
		return nil, nil, cli.Failed(err)
	}
	next := 1
	for {
		a, _ := filepath.Glob(filepath.Join(k.dir, fmt.Sprintf("%s-%d.pem", prefix, next)))
		b, _ := filepath.Glob(filepath.Join(k.dir, "retired", fmt.Sprintf("%s-%d.pem", prefix, next)))
		if len(a)+len(b) == 0 {
			break
		}
		next++
	}
	var signers []crypto.Signer
	var pubs []crypto.PublicKey
	for i := range n {
		s, err := trust.GenerateKey(trust.KeyEd25519)
		if err != nil {
			return nil, nil, cli.Failed(err)
		}
		if _, _, err := trust.WriteKeyPair(filepath.Join(k.dir, fmt.Sprintf("%s-%d", prefix, next+i)), s); err != nil {
			return nil, nil, cli.Failed(err)
		}
		id, _ := repo.KeyID(s.Public())
		k.keys[id] = s
		signers, pubs = append(signers, s), append(pubs, s.Public())
	}
	return signers, pubs, nil
}

// retire moves the key files of keys no role of root names any more.
func (k *offlineKeys) retire(root *metadata.Metadata[metadata.RootType]) ([]string, error) {
	used := map[string]bool{}
	for _, r := range root.Signed.Roles {
		for _, id := range r.KeyIDs {
			used[id] = true
		}
	}
	files, _ := filepath.Glob(filepath.Join(k.dir, "*.pem"))
	var moved []string
	for _, f := range files {
		if strings.HasSuffix(f, ".pub.pem") {
			continue
		}
		s, err := trust.LoadPrivateKey(f)
		if err != nil {
			continue
		}
		id, _ := repo.KeyID(s.Public())
		if used[id] {
			continue
		}
		if err := os.MkdirAll(filepath.Join(k.dir, "retired"), 0o700); err != nil {
			return moved, err
		}
		base := strings.TrimSuffix(filepath.Base(f), ".pem")
		for _, ext := range []string{".pem", ".pub.pem"} {
			if err := os.Rename(filepath.Join(k.dir, base+ext), filepath.Join(k.dir, "retired", base+ext)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return moved, err
			}
		}
		delete(k.keys, id)
		moved = append(moved, base)
	}
	return moved, nil
}

// keysOf is who signs for each role in root, as it stands (with the given
// online keys): the start of the next root, before one role is changed.
func keysOf(root *metadata.Metadata[metadata.RootType], online map[string]*metadata.Key) (repo.RootKeys, error) {
	rootPubs, err := rolePubs(root, metadata.ROOT)
	if err != nil {
		return repo.RootKeys{}, err
	}
	targetPubs, err := rolePubs(root, metadata.TARGETS)
	if err != nil {
		return repo.RootKeys{}, err
	}
	return repo.RootKeys{Root: rootPubs, RootThreshold: root.Signed.Roles[metadata.ROOT].Threshold,
		Targets: targetPubs, TargetsThreshold: root.Signed.Roles[metadata.TARGETS].Threshold, Online: online}, nil
}

// rolePubs are the public keys a root names for a role (whoever holds
// the private ones).
func rolePubs(root *metadata.Metadata[metadata.RootType], role string) ([]crypto.PublicKey, error) {
	var out []crypto.PublicKey
	for _, id := range root.Signed.Roles[role].KeyIDs {
		pub, err := root.Signed.Keys[id].ToPublicKey()
		if err != nil {
			return nil, cli.Failed(err)
		}
		out = append(out, pub)
	}
	return out, nil
}

// tufRemote is the server's TUF side as the CLI uses it. The server is
// not trusted: the root it returns is checked against the root pinned in
// the keys directory (root.json, the last one signed or checked here),
// walking the chain of roots from it, and targets are checked against
// that root, so the offline keys never sign anything the server slipped
// in. A keys directory without a pin trusts the server's root once, and
// says so.
type tufRemote struct {
	r    *remote
	pins string // the keys directory
	warn io.Writer
}

func (t tufRemote) status(ctx context.Context) (repo.Status, error) {
	var st repo.Status
	err := t.r.do(ctx, "GET", mgmtapi.PathTUF, nil, &st)
	return st, err
}

func (t tufRemote) fetch(ctx context.Context, path string) ([]byte, error) {
	var raw bytes.Buffer
	err := t.r.doRaw(ctx, "GET", path, nil, &raw)
	return raw.Bytes(), err
}

func (t tufRemote) pin(role string, raw []byte) error {
	if err := os.MkdirAll(t.pins, 0o700); err != nil {
		return cli.Failed(err)
	}
	if err := atomicfile.Write(filepath.Join(t.pins, role+".json"), raw, 0o600); err != nil {
		return cli.Failed(err)
	}
	return nil
}

func sameSigned[T metadata.Roles](a, b *metadata.Metadata[T]) bool {
	x, _ := json.Marshal(a.Signed)
	y, _ := json.Marshal(b.Signed)
	return bytes.Equal(x, y)
}

// root returns the server's current root once it checks out against the
// pinned one, and pins it.
func (t tufRemote) root(ctx context.Context) (*metadata.Metadata[metadata.RootType], error) {
	raw, err := t.fetch(ctx, mgmtapi.PathTUF+"/root")
	if err != nil {
		return nil, err
	}
	md, err := metadata.Root().FromBytes(raw)
	if err != nil {
		return nil, cli.Refused(fmt.Errorf("the server's root: %w", err))
	}
	pinned, err := os.ReadFile(filepath.Join(t.pins, "root.json"))
	if errors.Is(err, os.ErrNotExist) {
		if t.warn != nil {
			fmt.Fprintf(t.warn, "warning: %s holds no pinned root; trusting the server's root v%d from now on\n", t.pins, md.Signed.Version)
		}
		return md, t.pin(metadata.ROOT, raw)
	}
	if err != nil {
		return nil, cli.Failed(err)
	}
	trusted, err := trustedmetadata.New(pinned)
	if err != nil {
		return nil, cli.Failed(fmt.Errorf("the pinned root %s: %w", filepath.Join(t.pins, "root.json"), err))
	}
	pv := trusted.Root.Signed.Version
	if md.Signed.Version < pv {
		return nil, cli.Refused(fmt.Errorf("the server's root v%d is older than the one pinned here (v%d): refusing to sign on it", md.Signed.Version, pv))
	}
	for v := pv + 1; v <= md.Signed.Version; v++ {
		b, err := t.fetch(ctx, fmt.Sprintf("%s/root?version=%d", mgmtapi.PathTUF, v))
		if err != nil {
			return nil, err
		}
		if _, err := trusted.UpdateRoot(b); err != nil {
			return nil, cli.Refused(fmt.Errorf("the server's root v%d does not follow from the pinned v%d: %w", v, v-1, err))
		}
	}
	if !sameSigned(trusted.Root, md) {
		return nil, cli.Refused(fmt.Errorf("the server's root v%d is not the one the chain from the pinned root leads to: refusing to sign on it", md.Signed.Version))
	}
	return md, t.pin(metadata.ROOT, raw)
}

// targets returns the server's current targets once they check out: signed
// by a threshold of the targets keys root names, not older than the
// pinned targets.
func (t tufRemote) targets(ctx context.Context, root *metadata.Metadata[metadata.RootType]) (*metadata.Metadata[metadata.TargetsType], error) {
	raw, err := t.fetch(ctx, mgmtapi.PathTUF+"/targets")
	if err != nil {
		return nil, err
	}
	md, err := metadata.Targets().FromBytes(raw)
	if err != nil {
		return nil, cli.Refused(fmt.Errorf("the server's targets: %w", err))
	}
	if err := root.VerifyDelegate(metadata.TARGETS, md); err != nil {
		return nil, cli.Refused(fmt.Errorf("the server's targets v%d are not signed by the targets keys: refusing to sign on them: %w", md.Signed.Version, err))
	}
	if pinned, err := os.ReadFile(filepath.Join(t.pins, "targets.json")); err == nil {
		if old, err := metadata.Targets().FromBytes(pinned); err == nil && old.Signed.Version > md.Signed.Version {
			return nil, cli.Refused(fmt.Errorf("the server's targets v%d are older than those pinned here (v%d)", md.Signed.Version, old.Signed.Version))
		}
	}
	return md, nil
}

// signing returns the server's root, checked against the pin, the offline
// keys held in the keys directory, and those of them that sign for role
// (at least its threshold).
func (t tufRemote) signing(ctx context.Context, role string) (*metadata.Metadata[metadata.RootType], *offlineKeys, []crypto.Signer, error) {
	root, err := t.root(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	k, err := loadOfflineKeys(t.pins)
	if err != nil {
		return nil, nil, nil, err
	}
	signers, err := k.signersFor(root, role)
	if err != nil {
		return nil, nil, nil, err
	}
	return root, k, signers, nil
}

// editTargets changes the current targets with the offline targets keys:
// edit, next version, new expiry, signed, published.
func (t tufRemote) editTargets(ctx context.Context, expires time.Duration, edit func(*metadata.Metadata[metadata.TargetsType]) error) (int64, error) {
	root, _, signers, err := t.signing(ctx, metadata.TARGETS)
	if err != nil {
		return 0, err
	}
	targets, err := t.targets(ctx, root)
	if err != nil {
		return 0, err
	}
	if err := edit(targets); err != nil {
		return 0, err
	}
	repo.Bump(targets, time.Now().Add(expires))
	raw, err := repo.Sign(targets, signers...)
	if err != nil {
		return 0, cli.Failed(err)
	}
	return t.put(ctx, metadata.TARGETS, raw)
}

// put publishes metadata signed here, and pins it.
func (t tufRemote) put(ctx context.Context, role string, raw []byte) (int64, error) {
	var p mgmtapi.Published
	if err := t.r.do(ctx, "PUT", mgmtapi.PathTUF+"/"+role, bytes.NewReader(raw), &p); err != nil {
		return 0, err
	}
	return p.Version, t.pin(role, raw)
}

func runTrustInit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "trust init", "[--keys DIR] [--root-keys N --root-threshold M] [--targets-keys N --targets-threshold M] [server flags]",
		`Sets up the server's TUF repository: makes the offline root and targets keys
in --keys (keep that directory off the server, on an offline machine or
hardware you control), a first root naming them and the server's online
snapshot and timestamp keys, and empty targets, and publishes both. Devices
provisioned from now on carry this root and check every offer against the
signed targets; "fieldpatch trust publish" puts releases there.`)
	kdir := keysFlag(fs)
	rootN := fs.Int("root-keys", 3, "number of root keys")
	rootT := fs.Int("root-threshold", 2, "root signatures required")
	targN := fs.Int("targets-keys", 1, "number of targets keys")
	targT := fs.Int("targets-threshold", 1, "targets signatures required")
	rootExp := fs.Duration("root-expires", 365*24*time.Hour, "root validity")
	targExp := fs.Duration("targets-expires", 90*24*time.Hour, "targets validity (re-sign before; publish does)")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	if *rootT < 1 || *rootT > *rootN || *targT < 1 || *targT > *targN {
		return cli.Usagef("each threshold must be at least 1 and at most the number of keys")
	}
	t := tufRemote{r: r, pins: *kdir, warn: stderr}
	st, err := t.status(ctx)
	if err != nil {
		return err
	}
	if st.Initialized {
		return cli.Refused(errors.New("the server's TUF repository has a root already: rotate keys with trust rotate-root or rotate-targets"))
	}
	if existing, _ := filepath.Glob(filepath.Join(*kdir, "*.pem")); len(existing) > 0 {
		return cli.Refused(fmt.Errorf("%s holds keys already: give an empty --keys directory", *kdir))
	}
	k := &offlineKeys{dir: *kdir, keys: map[string]crypto.Signer{}}
	rootKeys, rootPubs, err := k.generate("root", *rootN)
	if err != nil {
		return err
	}
	targKeys, targPubs, err := k.generate("targets", *targN)
	if err != nil {
		return err
	}
	root, err := repo.NewRoot(repo.RootKeys{Root: rootPubs, RootThreshold: *rootT, Targets: targPubs, TargetsThreshold: *targT, Online: st.OnlineKeys}, time.Now().Add(*rootExp))
	if err != nil {
		return cli.Failed(err)
	}
	raw, err := repo.Sign(root, rootKeys...)
	if err != nil {
		return cli.Failed(err)
	}
	if _, err := t.put(ctx, metadata.ROOT, raw); err != nil {
		return err
	}
	targets := metadata.Targets(time.Now().Add(*targExp).UTC().Round(time.Second))
	if raw, err = repo.Sign(targets, targKeys...); err != nil {
		return cli.Failed(err)
	}
	if _, err := t.put(ctx, metadata.TARGETS, raw); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "TUF repository set up: root v1 (%d of %d root keys), targets v1 (%d of %d targets keys); offline keys in %s\n",
		*rootT, *rootN, *targT, *targN, *kdir)
	return nil
}

func runTrustStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "trust status", "[--json] [server flags]",
		"Shows the TUF repository: each role's version, expiry, keys and threshold, and the targets.")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	st, err := tufRemote{r: r}.status(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, st)
	}
	if !st.Initialized {
		fmt.Fprintln(stdout, "no root yet: run fieldpatch trust init")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROLE\tVERSION\tEXPIRES\tTHRESHOLD\tKEYS")
	for _, role := range metadata.TOP_LEVEL_ROLE_NAMES {
		rs := st.Roles[role]
		var ids []string
		for _, id := range rs.KeyIDs {
			ids = append(ids, id[:12])
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d of %d\t%s\n", role, rs.Version, rs.Expires.UTC().Format(time.RFC3339), rs.Threshold, len(rs.KeyIDs), strings.Join(ids, " "))
	}
	tw.Flush()
	fmt.Fprintf(stdout, "targets: %d (%s)\n", len(st.Targets), strings.Join(st.Targets, ", "))
	return nil
}

func runTrustPublish(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "trust publish", "RELEASE [--downgrade] [--keys DIR] [server flags]",
		`Signs a release into the TUF targets with the offline targets keys: its
length, SHA-256 and custom fields (hardware class, version, security counter,
format, key epoch, downgrade mark), as the server holds it. Once the server
has a TUF root, only published releases are offered to devices.`)
	kdir := keysFlag(fs)
	down := fs.Bool("downgrade", false, "mark it a deliberate downgrade (devices then accept a lower version)")
	keyEpoch := fs.Uint("key-epoch", 0, "the key epoch devices raise theirs to when they commit it (image-key revocation)")
	targExp := fs.Duration("targets-expires", 90*24*time.Hour, "validity of the new targets metadata")
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one release ID")
	if err != nil {
		return err
	}
	var rels []store.Release
	if err := r.do(ctx, "GET", mgmtapi.PathReleases, nil, &rels); err != nil {
		return err
	}
	var rel *store.Release
	for i := range rels {
		if rels[i].ID == pos[0] {
			rel = &rels[i]
		}
	}
	if rel == nil {
		return cli.Refused(fmt.Errorf("release %s: not found", pos[0]))
	}
	sum, err := hex.DecodeString(rel.SHA256)
	if err != nil {
		return cli.Failed(err)
	}
	var name string
	v, err := tufRemote{r: r, pins: *kdir, warn: stderr}.editTargets(ctx, *targExp, func(targets *metadata.Metadata[metadata.TargetsType]) error {
		var err error
		name, err = repo.SetTarget(targets, rel.Length, sum, proto.TargetCustom{Version: rel.Version, HWClass: rel.HWClass,
			SecurityCounter: rel.SecurityCounter, KeyEpoch: max(rel.KeyEpoch, uint32(*keyEpoch)), Downgrade: *down})
		if err != nil {
			return cli.Failed(err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "published %s as %s in targets v%d\n", rel.ID, name, v)
	return nil
}

func runTrustRotate(role string) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs := cli.NewFlags(stdout, "fieldpatch", "trust rotate-"+role, "[--count N --threshold M] [--keys DIR] [server flags]", map[string]string{
			metadata.ROOT: `Replaces the root keys: makes new ones, publishes the next root naming them,
signed by a threshold of the current root keys and of the new ones, and
retires the old key files. Devices walk from their root to this one on
their next check-in.`,
			metadata.TARGETS: `Replaces the targets keys (after a leak, or on schedule): makes new ones,
publishes the next root naming them (signed by the root keys), then re-signs
the current targets with the new keys, and retires the old key files. From
then on devices refuse targets metadata signed by the old keys.`,
		}[role])
		kdir := keysFlag(fs)
		n := fs.Int("count", 0, "number of new keys (default: as many as now)")
		thr := fs.Int("threshold", 0, "signatures required (default: as now)")
		exp := fs.Duration("expires", 0, "validity of the new metadata (default 1 year for root, 90 days for targets)")
		conn := remoteFlags(fs)
		r, _, err := connect(fs, conn, args, 0, "takes no arguments")
		if err != nil {
			return err
		}
		t := tufRemote{r: r, pins: *kdir, warn: stderr}
		st, err := t.status(ctx)
		if err != nil {
			return err
		}
		root, k, oldRootKeys, err := t.signing(ctx, metadata.ROOT)
		if err != nil {
			return err
		}
		var targets *metadata.Metadata[metadata.TargetsType]
		if role == metadata.TARGETS {
			// Checked against the root that signs them now, before it changes.
			if targets, err = t.targets(ctx, root); err != nil {
				return err
			}
		}
		cur := root.Signed.Roles[role]
		if *n == 0 {
			*n = len(cur.KeyIDs)
		}
		if *thr == 0 {
			*thr = cur.Threshold
		}
		if *thr < 1 || *thr > *n {
			return cli.Usagef("the threshold must be at least 1 and at most the number of keys")
		}
		newKeys, newPubs, err := k.generate(role, *n)
		if err != nil {
			return err
		}
		rk, err := keysOf(root, st.OnlineKeys)
		if err != nil {
			return err
		}
		signers := oldRootKeys
		switch role {
		case metadata.ROOT:
			rk.Root, rk.RootThreshold = newPubs, *thr
			signers = append(signers, newKeys...)
			if *exp == 0 {
				*exp = 365 * 24 * time.Hour
			}
		case metadata.TARGETS:
			rk.Targets, rk.TargetsThreshold = newPubs, *thr
		}
		rootExp := 365 * 24 * time.Hour
		if role == metadata.ROOT {
			rootExp = *exp
		}
		repo.Bump(root, time.Now().Add(rootExp))
		if err := repo.Rekey(root, rk); err != nil {
			return cli.Failed(err)
		}
		raw, err := repo.Sign(root, signers...)
		if err != nil {
			return cli.Failed(err)
		}
		v, err := t.put(ctx, metadata.ROOT, raw)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "published root v%d with %d new %s keys (%d of %d)\n", v, *n, role, *thr, *n)
		if role == metadata.TARGETS {
			if *exp == 0 {
				*exp = 90 * 24 * time.Hour
			}
			repo.Bump(targets, time.Now().Add(*exp))
			raw, err := repo.Sign(targets, newKeys...)
			if err != nil {
				return cli.Failed(err)
			}
			tv, err := t.put(ctx, metadata.TARGETS, raw)
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "re-signed targets v%d with the new keys\n", tv)
		}
		moved, err := k.retire(root)
		if err != nil {
			return cli.Failed(err)
		}
		sort.Strings(moved)
		if len(moved) > 0 {
			fmt.Fprintf(stdout, "retired key files: %s (in %s)\n", strings.Join(moved, ", "), filepath.Join(*kdir, "retired"))
		}
		return nil
	}
}

func runTrustRotateOnline(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "trust rotate-online", "[--keys DIR] [server flags]",
		`Replaces the server's online keys (snapshot and timestamp), after a leak or
on schedule: the server makes new ones, and the next root, signed here with
the root keys, names them; from then on only they sign. Devices that were
fed metadata signed with a stolen online key (a fast-forward attack) set it
aside when they see the new root, and recover.`)
	kdir := keysFlag(fs)
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	t := tufRemote{r: r, pins: *kdir, warn: stderr}
	root, _, rootKeys, err := t.signing(ctx, metadata.ROOT)
	if err != nil {
		return err
	}
	var online map[string]*metadata.Key
	if err := r.do(ctx, "POST", mgmtapi.PathTUF+"/online-keys", nil, &online); err != nil {
		return err
	}
	rk, err := keysOf(root, online)
	if err != nil {
		return err
	}
	repo.Bump(root, time.Now().Add(365*24*time.Hour))
	if err := repo.Rekey(root, rk); err != nil {
		return cli.Failed(err)
	}
	raw, err := repo.Sign(root, rootKeys...)
	if err != nil {
		return cli.Failed(err)
	}
	v, err := t.put(ctx, metadata.ROOT, raw)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "published root v%d naming the server's new online keys\n", v)
	return nil
}

func runTrustImageKeys(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "trust image-keys", "[--add KEY.pub.pem]... [--revoke KEY.pub.pem]... [--at-epoch N] [--keys DIR] [server flags]",
		`Tells devices, through the signed targets, which image-signing keys to trust
besides the ones they were built with, and from which key epoch each is
revoked. Rotating a leaked image key:

  1. fieldpatch trust image-keys --add new.pub.pem --revoke old.pub.pem --at-epoch 1
  2. build the next release signed by both keys; publish it with --key-epoch 1
  3. devices that commit it raise their key epoch to 1: from then on neither the
     agent nor the boot selector accepts an image signed only by the old key.`)
	kdir := keysFlag(fs)
	var add, revoke cli.Strings
	fs.Var(&add, "add", "a public key file to trust (repeatable)")
	fs.Var(&revoke, "revoke", "a public key file to revoke at --at-epoch (repeatable)")
	epoch := fs.Uint("at-epoch", 0, "the key epoch at which --revoke keys stop being trusted")
	targExp := fs.Duration("targets-expires", 90*24*time.Hour, "validity of the new targets metadata")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	if len(add)+len(revoke) == 0 {
		return cli.Usagef("give --add or --revoke")
	}
	if len(revoke) > 0 && *epoch == 0 {
		return cli.Usagef("--revoke needs --at-epoch N (N >= 1)")
	}
	pemOf := func(path string) (string, error) {
		pub, err := trust.LoadPublicKey(path)
		if err != nil {
			return "", cli.Usagef("%v", err)
		}
		der, _ := x509.MarshalPKIXPublicKey(pub)
		return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
	}
	var keys []proto.ImageKey
	v, err := tufRemote{r: r, pins: *kdir, warn: stderr}.editTargets(ctx, *targExp, func(targets *metadata.Metadata[metadata.TargetsType]) error {
		if cur := targets.Signed.Targets[proto.ImageKeysTarget]; cur != nil && cur.Custom != nil {
			var c proto.TargetCustom
			if err := json.Unmarshal(*cur.Custom, &c); err != nil {
				return cli.Refused(fmt.Errorf("the published image keys: %w", err))
			}
			keys = c.ImageKeys
		}
		find := func(p string) int {
			for i, k := range keys {
				if k.PEM == p {
					return i
				}
			}
			keys = append(keys, proto.ImageKey{PEM: p})
			return len(keys) - 1
		}
		for _, f := range add {
			p, err := pemOf(f)
			if err != nil {
				return err
			}
			find(p)
		}
		for _, f := range revoke {
			p, err := pemOf(f)
			if err != nil {
				return err
			}
			keys[find(p)].RevokedAtEpoch = uint32(*epoch)
		}
		return repo.SetImageKeys(targets, keys)
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "published %d image keys in targets v%d\n", len(keys), v)
	return nil
}

func runTrustRevoke(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "trust revoke", "KEYID [--keys DIR] [server flags]",
		`Removes one key from whatever roles the root gives it (a lost or leaked root
or targets key, when enough others remain): publishes the next root without
it, signed by a threshold of the current root keys (and of the remaining
ones). Each role must keep at least its threshold of keys; to replace keys
instead, use rotate-root or rotate-targets. KEYID is the key's TUF ID (from
"fieldpatch trust status --json"; a unique prefix will do).`)
	kdir := keysFlag(fs)
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one key ID")
	if err != nil {
		return err
	}
	t := tufRemote{r: r, pins: *kdir, warn: stderr}
	root, k, oldRootKeys, err := t.signing(ctx, metadata.ROOT)
	if err != nil {
		return err
	}
	var id string
	for kid := range root.Signed.Keys {
		if strings.HasPrefix(kid, pos[0]) {
			if id != "" {
				return cli.Usagef("key ID prefix %s is not unique", pos[0])
			}
			id = kid
		}
	}
	if id == "" || len(pos[0]) < 8 {
		return cli.Refused(fmt.Errorf("the root names no key %s (give at least 8 characters)", pos[0]))
	}
	repo.Bump(root, time.Now().Add(365*24*time.Hour))
	var roles []string
	for _, role := range []string{metadata.ROOT, metadata.TARGETS} {
		rl := root.Signed.Roles[role]
		if !slices.Contains(rl.KeyIDs, id) {
			continue
		}
		if len(rl.KeyIDs)-1 < rl.Threshold {
			return cli.Refused(fmt.Errorf("%s would keep %d keys, below its threshold %d: use rotate-%s", role, len(rl.KeyIDs)-1, rl.Threshold, role))
		}
		if err := root.Signed.RevokeKey(id, role); err != nil {
			return cli.Failed(err)
		}
		roles = append(roles, role)
	}
	if len(roles) == 0 {
		return cli.Refused(fmt.Errorf("key %s signs for no offline role (online keys: rotate-online)", id))
	}
	// Signed by the old root's keys; the remaining root keys are among them.
	raw, err := repo.Sign(root, oldRootKeys...)
	if err != nil {
		return cli.Failed(err)
	}
	v, err := t.put(ctx, metadata.ROOT, raw)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "published root v%d without key %s (%s)\n", v, id[:12], strings.Join(roles, ", "))
	if moved, err := k.retire(root); err == nil && len(moved) > 0 {
		fmt.Fprintf(stdout, "retired key files: %s\n", strings.Join(moved, ", "))
	}
	return nil
}
