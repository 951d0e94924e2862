package repo

import (
	"crypto"
	"crypto/ecdsa"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// What the operator's side does with the offline keys: make and sign root
// and targets metadata. The server only ever checks it.

// Signer turns a private key (Ed25519 or ECDSA P-256) into a TUF signer.
func Signer(k crypto.Signer) (signature.Signer, error) {
	h := crypto.Hash(0)
	if _, ok := k.(*ecdsa.PrivateKey); ok {
		h = crypto.SHA256
	}
	return signature.LoadSigner(k, h)
}

// KeyID is the TUF key ID of a public key.
func KeyID(pub crypto.PublicKey) (string, error) {
	k, err := metadata.KeyFromPublicKey(pub)
	if err != nil {
		return "", err
	}
	return k.ID()
}

// RootKeys says who signs for each role in a root.
type RootKeys struct {
	Root, Targets                   []crypto.PublicKey
	RootThreshold, TargetsThreshold int
	Online                          map[string]*metadata.Key // snapshot, timestamp: the server's
}

// NewRoot makes root metadata (version 1, consistent snapshots) naming
// keys. Next roots start from an existing one: see Rekey.
func NewRoot(k RootKeys, expires time.Time) (*metadata.Metadata[metadata.RootType], error) {
	md := metadata.Root(expires.UTC().Round(time.Second))
	if err := Rekey(md, k); err != nil {
		return nil, err
	}
	return md, nil
}

// Rekey replaces the keys of every role in root metadata with k's (the
// version and expiry are the caller's to set).
func Rekey(md *metadata.Metadata[metadata.RootType], k RootKeys) error {
	if k.RootThreshold < 1 || k.RootThreshold > len(k.Root) || k.TargetsThreshold < 1 || k.TargetsThreshold > len(k.Targets) {
		return errors.New("each threshold must be at least 1 and at most the number of keys")
	}
	if k.Online[metadata.SNAPSHOT] == nil || k.Online[metadata.TIMESTAMP] == nil {
		return errors.New("the server's online keys are needed")
	}
	md.Signed.Keys = map[string]*metadata.Key{}
	for _, role := range metadata.TOP_LEVEL_ROLE_NAMES {
		md.Signed.Roles[role] = &metadata.Role{KeyIDs: []string{}, Threshold: 1}
	}
	add := func(role string, pubs []crypto.PublicKey) error {
		for _, p := range pubs {
			key, err := metadata.KeyFromPublicKey(p)
			if err != nil {
				return err
			}
			if err := md.Signed.AddKey(key, role); err != nil {
				return err
			}
		}
		return nil
	}
	if err := add(metadata.ROOT, k.Root); err != nil {
		return err
	}
	if err := add(metadata.TARGETS, k.Targets); err != nil {
		return err
	}
	for _, role := range []string{metadata.SNAPSHOT, metadata.TIMESTAMP} {
		if err := md.Signed.AddKey(k.Online[role], role); err != nil {
			return err
		}
	}
	md.Signed.Roles[metadata.ROOT].Threshold = k.RootThreshold
	md.Signed.Roles[metadata.TARGETS].Threshold = k.TargetsThreshold
	md.Signed.ConsistentSnapshot = true
	return nil
}

// Sign signs metadata with each key (after clearing older signatures) and
// returns it as published.
func Sign[T metadata.Roles](md *metadata.Metadata[T], keys ...crypto.Signer) ([]byte, error) {
	md.ClearSignatures()
	for _, k := range keys {
		s, err := Signer(k)
		if err != nil {
			return nil, err
		}
		if _, err := md.Sign(s); err != nil {
			return nil, err
		}
	}
	return md.ToBytes(true)
}

// SetTarget puts a release into targets metadata, under its target name.
func SetTarget(md *metadata.Metadata[metadata.TargetsType], length int64, sha256 []byte, c proto.TargetCustom) (string, error) {
	if len(sha256) != 32 || length <= 0 {
		return "", errors.New("a target needs its length and SHA-256")
	}
	c.Format = "mcuboot"
	raw, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	msg := json.RawMessage(raw)
	name := TargetName(c.HWClass, c.Version)
	md.Signed.Targets[name] = &metadata.TargetFiles{Length: length, Hashes: metadata.Hashes{"sha256": sha256}, Custom: &msg, Path: name}
	return name, nil
}

// Bump sets the next version and a new expiry, as every re-signing must.
func Bump[T metadata.Roles](md *metadata.Metadata[T], expires time.Time) error {
	e := expires.UTC().Round(time.Second)
	switch m := any(md).(type) {
	case *metadata.Metadata[metadata.RootType]:
		m.Signed.Version++
		m.Signed.Expires = e
	case *metadata.Metadata[metadata.TargetsType]:
		m.Signed.Version++
		m.Signed.Expires = e
	default:
		return fmt.Errorf("%T is signed online", md)
	}
	return nil
}
