package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Roles of API tokens, from least to most trusted. A viewer reads; an
// operator also uploads, assigns and manages devices; an admin also manages
// API tokens and reads the audit log.
const (
	RoleViewer   = "viewer"
	RoleOperator = "operator"
	RoleAdmin    = "admin"
)

// RoleRank orders roles; 0 means not a role.
func RoleRank(role string) int {
	switch role {
	case RoleViewer:
		return 1
	case RoleOperator:
		return 2
	case RoleAdmin:
		return 3
	}
	return 0
}

// APIToken is a named management token; the server keeps only its hash.
type APIToken struct {
	Name    string    `json:"name"`
	Role    string    `json:"role"`
	Created time.Time `json:"created"`
	Revoked time.Time `json:"revoked,omitzero"`
}

// AddAPIToken records a token's hash under a unique name.
func (s *Store) AddAPIToken(ctx context.Context, name, hash, role string) error {
	if err := proto.ValidID("token name", name); err != nil {
		return err
	}
	if RoleRank(role) == 0 {
		return fmt.Errorf("role %q: want viewer, operator or admin", role)
	}
	return s.writeTx(ctx, func(tx *sql.Tx) error {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM api_tokens WHERE name = ?`, name).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("token %q: %w (names are never reused)", name, ErrConflict)
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO api_tokens (name, hash, role, created_at) VALUES (?, ?, ?, ?)`,
			name, hash, role, s.now().Unix())
		return err
	})
}

// LookupAPIToken returns the live token with this hash.
func (s *Store) LookupAPIToken(ctx context.Context, hash string) (*APIToken, error) {
	var t APIToken
	var created int64
	err := s.db.QueryRowContext(ctx, `SELECT name, role, created_at FROM api_tokens WHERE hash = ? AND revoked_at = 0`, hash).
		Scan(&t.Name, &t.Role, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("api token: %w", ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	t.Created = time.Unix(created, 0).UTC()
	return &t, nil
}

// RevokeAPIToken stops a token from working; it stays listed.
func (s *Store) RevokeAPIToken(ctx context.Context, name string) error {
	return s.writeTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at = 0`, s.now().Unix(), name)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("token %q: %w (or already revoked)", name, ErrNotFound)
		}
		return nil
	})
}

// APITokens lists the tokens, oldest first.
func (s *Store) APITokens(ctx context.Context) ([]APIToken, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at, name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []APIToken{}
	for rows.Next() {
		var t APIToken
		var created, revoked int64
		if err := rows.Scan(&t.Name, &t.Role, &created, &revoked); err != nil {
			return nil, err
		}
		t.Created = time.Unix(created, 0).UTC()
		if revoked != 0 {
			t.Revoked = time.Unix(revoked, 0).UTC()
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// AuditEntry is one change an operator asked for, refused or not.
type AuditEntry struct {
	Seq    int64     `json:"seq"`
	At     time.Time `json:"at"`
	Actor  string    `json:"actor"`
	Role   string    `json:"role"`
	Action string    `json:"action"` // e.g. "POST /api/mgmt/v1/assignments"
	Target string    `json:"target"`
	Status int       `json:"status"` // the HTTP status answered
	Detail string    `json:"detail"`
}

// Audit appends an entry to the audit log.
func (s *Store) Audit(ctx context.Context, e AuditEntry) error {
	return s.writeTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO audit_log (at, actor, role, action, target, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?)`,
			s.now().UnixMilli(), e.Actor, e.Role, e.Action, e.Target, e.Status, e.Detail)
		return err
	})
}

// AuditLog returns up to limit entries with seq above after, oldest first.
func (s *Store) AuditLog(ctx context.Context, after int64, limit int) ([]AuditEntry, error) {
	if limit <= 0 || limit > 10000 {
		limit = 10000
	}
	rows, err := s.db.QueryContext(ctx, `SELECT seq, at, actor, role, action, target, status, detail FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?`, after, limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []AuditEntry{}
	for rows.Next() {
		var e AuditEntry
		var at int64
		if err := rows.Scan(&e.Seq, &at, &e.Actor, &e.Role, &e.Action, &e.Target, &e.Status, &e.Detail); err != nil {
			return nil, err
		}
		e.At = time.UnixMilli(at).UTC()
		out = append(out, e)
	}
	return out, rows.Err()
}

// DeviceFilter selects devices; empty fields match everything.
type DeviceFilter struct {
	Group, Tag, HWClass, Version, Phase string
}

// DeviceEdit changes a device's groups and tags.
type DeviceEdit struct {
	AddGroups    []string `json:"add_groups,omitempty"`
	RemoveGroups []string `json:"remove_groups,omitempty"`
	AddTags      []string `json:"add_tags,omitempty"`
	RemoveTags   []string `json:"remove_tags,omitempty"`
}

// EditDevice applies e to a device in one transaction; an invalid name
// changes nothing.
func (s *Store) EditDevice(ctx context.Context, id string, e DeviceEdit) error {
	for _, l := range []struct {
		what  string
		names []string
	}{{"group", e.AddGroups}, {"group", e.RemoveGroups}, {"tag", e.AddTags}, {"tag", e.RemoveTags}} {
		for _, n := range l.names {
			if err := proto.ValidID(l.what, n); err != nil {
				return err
			}
		}
	}
	if len(e.AddGroups)+len(e.RemoveGroups)+len(e.AddTags)+len(e.RemoveTags) == 0 {
		return fmt.Errorf("nothing to change: give add_groups, remove_groups, add_tags or remove_tags")
	}
	return s.writeDevice(ctx, id, func(tx *sql.Tx) error {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM devices WHERE id = ?`, id).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("device %s: %w", id, ErrNotFound)
		}
		for _, op := range []struct {
			q     string
			names []string
		}{
			{`DELETE FROM device_groups WHERE device_id = ? AND grp = ?`, e.RemoveGroups},
			{`INSERT INTO device_groups (device_id, grp) VALUES (?, ?) ON CONFLICT DO NOTHING`, e.AddGroups},
			{`DELETE FROM device_tags WHERE device_id = ? AND tag = ?`, e.RemoveTags},
			{`INSERT INTO device_tags (device_id, tag) VALUES (?, ?) ON CONFLICT DO NOTHING`, e.AddTags},
		} {
			for _, name := range op.names {
				if _, err := tx.ExecContext(ctx, op.q, id, name); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// ListReleases lists the releases, newest first; hwClass, if set, filters.
func (s *Store) ListReleases(ctx context.Context, hwClass string) ([]Release, error) {
	q := `SELECT id, version, hw_class, security_counter, key_epoch, sha256, length, created_at FROM releases`
	var args []any
	if hwClass != "" {
		q += ` WHERE hw_class = ?`
		args = append(args, hwClass)
	}
	rows, err := s.db.QueryContext(ctx, q+` ORDER BY created_at DESC, id`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []Release{}
	for rows.Next() {
		var r Release
		var created int64
		if err := rows.Scan(&r.ID, &r.Version, &r.HWClass, &r.SecurityCounter, &r.KeyEpoch, &r.SHA256, &r.Length, &created); err != nil {
			return nil, err
		}
		r.CreatedAt = time.Unix(created, 0).UTC()
		out = append(out, r)
	}
	return out, rows.Err()
}

// SetDevicePSK records a device's new pre-shared key (CoAP over DTLS),
// replacing the one before.
func (s *Store) SetDevicePSK(ctx context.Context, deviceID, psk string) error {
	if psk == "" {
		return errors.New("empty pre-shared key")
	}
	return s.writeTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO device_psks (device_id, psk, issued_at) VALUES (?, ?, ?)
			ON CONFLICT (device_id) DO UPDATE SET psk = excluded.psk, issued_at = excluded.issued_at`, deviceID, psk, s.now().Unix())
		return err
	})
}

// DevicePSK is an active device's pre-shared key; ErrNotFound for a device
// without one, ErrRevoked for a revoked device.
func (s *Store) DevicePSK(ctx context.Context, deviceID string) (string, error) {
	if err := s.Active(ctx, deviceID); err != nil {
		return "", err
	}
	var psk string
	err := s.db.QueryRowContext(ctx, `SELECT psk FROM device_psks WHERE device_id = ?`, deviceID).Scan(&psk)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("device %s has no pre-shared key: %w", deviceID, ErrNotFound)
	}
	return psk, err
}
