// Package store is the update server's database: devices, releases,
// rollouts (an assignment is a rollout with one phase), each device's update
// attempts, and the reports devices send. The embedded default is a SQLite
// file (modernc.org/sqlite, no cgo) in WAL mode with synchronous=FULL, so
// a transaction that returned is on disk; schema changes are numbered
// migrations applied at open.
//
// Everything a device reports is acknowledged only after the transaction
// that stores it commits (RecordReport returns only then), and reports are
// idempotent: the same report ID is stored once.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite" // the database/sql driver "sqlite"

	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// Store is an open database.
type Store struct {
	db *sql.DB
	// BeforeCommit, if set, runs before each write transaction commits; an
	// error aborts the transaction. Tests inject commit failures with it.
	BeforeCommit func() error
	// BeforeReportCommit, if set, runs before a report's transaction
	// commits, with the report's status; an error aborts it. Tests inject
	// failures on outcome reports with it.
	BeforeReportCommit func(status string) error

	checkins chan *checkinReq
	quit     chan struct{}
	prepared sync.Map      // query text -> *sql.Stmt, for the device API's hot path
	gen      atomic.Uint64 // bumped by every committed write but check-ins
	cacheMu  sync.Mutex
	cache    map[string]devState
	seen     map[string]seenState // guarded by cacheMu

	// LastSeenResolution: a check-in that repeats what the device last
	// reported, less than this after its last stored check-in, is not
	// written (last_seen is that coarse); 0 writes every check-in.
	LastSeenResolution time.Duration
	closeOnce          sync.Once
	now                func() time.Time
}

// migrations, in order; each runs once, in a transaction, and bumps
// schema_version.
var migrations = []string{
	`CREATE TABLE devices (
		id               TEXT PRIMARY KEY,
		hw_class         TEXT NOT NULL DEFAULT '',
		version          TEXT NOT NULL DEFAULT '',
		slot             TEXT NOT NULL DEFAULT '',
		security_counter INTEGER NOT NULL DEFAULT 0,
		key_epoch        INTEGER NOT NULL DEFAULT 0,
		time_zone        TEXT NOT NULL DEFAULT '',
		attributes       TEXT NOT NULL DEFAULT '{}',
		phase            TEXT NOT NULL DEFAULT '',
		created_at       INTEGER NOT NULL,
		last_seen        INTEGER NOT NULL DEFAULT 0
	);
	CREATE TABLE device_groups (
		device_id TEXT NOT NULL REFERENCES devices(id),
		grp       TEXT NOT NULL,
		PRIMARY KEY (device_id, grp)
	);
	CREATE INDEX device_groups_by_group ON device_groups(grp);
	CREATE TABLE releases (
		id               TEXT PRIMARY KEY,
		version          TEXT NOT NULL,
		hw_class         TEXT NOT NULL,
		security_counter INTEGER NOT NULL,
		key_epoch        INTEGER NOT NULL DEFAULT 0,
		sha256           TEXT NOT NULL,
		length           INTEGER NOT NULL,
		created_at       INTEGER NOT NULL
	);
	CREATE TABLE rollouts (
		id          TEXT PRIMARY KEY,
		release_id  TEXT NOT NULL REFERENCES releases(id),
		target_kind TEXT NOT NULL CHECK (target_kind IN ('device', 'group')),
		target      TEXT NOT NULL,
		downgrade   INTEGER NOT NULL DEFAULT 0,
		state       TEXT NOT NULL DEFAULT 'active',
		created_at  INTEGER NOT NULL
	);
	CREATE INDEX rollouts_by_target ON rollouts(target_kind, target, state);
	CREATE TABLE rollout_phases (
		rollout_id TEXT NOT NULL REFERENCES rollouts(id),
		idx        INTEGER NOT NULL,
		percent    INTEGER NOT NULL CHECK (percent BETWEEN 0 AND 100),
		PRIMARY KEY (rollout_id, idx)
	);
	CREATE TABLE updates (
		id         TEXT PRIMARY KEY,
		device_id  TEXT NOT NULL REFERENCES devices(id),
		rollout_id TEXT NOT NULL REFERENCES rollouts(id),
		release_id TEXT NOT NULL REFERENCES releases(id),
		status     TEXT NOT NULL,
		progress   REAL NOT NULL DEFAULT 0,
		reason     TEXT NOT NULL DEFAULT '',
		log_tail   TEXT NOT NULL DEFAULT '',
		retired    INTEGER NOT NULL DEFAULT 0,
		created_at INTEGER NOT NULL,
		updated_at INTEGER NOT NULL
	);
	CREATE INDEX updates_by_device ON updates(device_id, release_id);
	CREATE TABLE reports (
		device_id   TEXT NOT NULL REFERENCES devices(id),
		report_id   TEXT NOT NULL,
		update_id   TEXT NOT NULL,
		status      TEXT NOT NULL,
		body        TEXT NOT NULL,
		received_at INTEGER NOT NULL,
		PRIMARY KEY (device_id, report_id)
	);`,
	`ALTER TABLE devices ADD COLUMN revoked_at INTEGER NOT NULL DEFAULT 0;`,
	`CREATE TABLE enrollment_tokens (
		hash       TEXT PRIMARY KEY,
		grp        TEXT NOT NULL DEFAULT '',
		expires_at INTEGER NOT NULL,
		uses_left  INTEGER NOT NULL,
		created_at INTEGER NOT NULL
	);
	CREATE TABLE enrollments (
		device_id  TEXT PRIMARY KEY,
		public_key TEXT NOT NULL,
		state      TEXT NOT NULL CHECK (state IN ('pending', 'approved')),
		created_at INTEGER NOT NULL
	);`,
	`CREATE TABLE api_tokens (
		name       TEXT PRIMARY KEY,
		hash       TEXT NOT NULL UNIQUE,
		role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
		created_at INTEGER NOT NULL,
		revoked_at INTEGER NOT NULL DEFAULT 0
	);
	CREATE TABLE audit_log (
		seq    INTEGER PRIMARY KEY AUTOINCREMENT,
		at     INTEGER NOT NULL,
		actor  TEXT NOT NULL,
		role   TEXT NOT NULL,
		action TEXT NOT NULL,
		target TEXT NOT NULL,
		status INTEGER NOT NULL,
		detail TEXT NOT NULL
	);
	CREATE TABLE device_tags (
		device_id TEXT NOT NULL REFERENCES devices(id),
		tag       TEXT NOT NULL,
		PRIMARY KEY (device_id, tag)
	);`,
}

// Open opens (creating if needed) the database at path and applies pending
// migrations.
func Open(ctx context.Context, path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(4)
	s := &Store{db: db, now: time.Now, cache: map[string]devState{}, seen: map[string]seenState{}}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s.startBatcher()
	return s, nil
}

// stmt returns the query prepared once: parsing SQL costs more than running
// these small queries, and the device API runs them on every request.
func (s *Store) stmt(ctx context.Context, q string) (*sql.Stmt, error) {
	if v, ok := s.prepared.Load(q); ok {
		return v.(*sql.Stmt), nil
	}
	st, err := s.db.PrepareContext(ctx, q)
	if err != nil {
		return nil, err
	}
	if v, loaded := s.prepared.LoadOrStore(q, st); loaded {
		st.Close()
		return v.(*sql.Stmt), nil
	}
	return st, nil
}

// queryRow runs a prepared single-row query.
func (s *Store) queryRow(ctx context.Context, q string, args ...any) *sql.Row {
	st, err := s.stmt(ctx, q)
	if err != nil {
		return s.db.QueryRowContext(ctx, q, args...) // reports the same error
	}
	return st.QueryRowContext(ctx, args...)
}

// ErrRevoked is returned for a device an operator revoked.
var ErrRevoked = errors.New("device revoked")

// Active says whether a device may use the device API: it exists and is
// not revoked. One primary-key lookup, on every device request, so a
// revocation takes effect at the device's next request.
func (s *Store) Active(ctx context.Context, id string) error {
	st, err := s.deviceState(ctx, id)
	switch {
	case err != nil:
		return err
	case !st.exists:
		return fmt.Errorf("device %s: %w", id, ErrNotFound)
	case st.revoked:
		return fmt.Errorf("device %s: %w", id, ErrRevoked)
	}
	return nil
}

// devState is what the device API asks about a device on every request:
// does it exist, is it revoked, is any active rollout aimed at it.
type devState struct {
	gen                         uint64
	exists, revoked, hasRollout bool
}

// maxCachedDevices bounds the device-state cache; past it, it starts over.
const maxCachedDevices = 200_000

// deviceState answers from a cache that any committed write other than a
// check-in invalidates (by bumping the generation), so a revocation, a new
// rollout or a group change is seen at the device's next request, and an
// idle fleet's check-ins cost no query here.
func (s *Store) deviceState(ctx context.Context, id string) (devState, error) {
	gen := s.gen.Load()
	s.cacheMu.Lock()
	st, ok := s.cache[id]
	s.cacheMu.Unlock()
	if ok && st.gen == gen {
		return st, nil
	}
	var revoked int64
	var has bool
	err := s.queryRow(ctx, `SELECT d.revoked_at, EXISTS (SELECT 1 FROM rollouts r WHERE r.state = 'active' AND (
			(r.target_kind = 'device' AND r.target = d.id) OR
			(r.target_kind = 'group' AND r.target IN (SELECT grp FROM device_groups WHERE device_id = d.id))))
		FROM devices d WHERE d.id = ?`, id).Scan(&revoked, &has)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		st = devState{gen: gen}
	case err != nil:
		return devState{}, err
	default:
		st = devState{gen: gen, exists: true, revoked: revoked != 0, hasRollout: has}
	}
	s.cacheMu.Lock()
	if len(s.cache) >= maxCachedDevices {
		clear(s.cache)
	}
	s.cache[id] = st
	s.cacheMu.Unlock()
	return st, nil
}

// Revoke refuses a device from now on (a stolen or decommissioned one).
func (s *Store) Revoke(ctx context.Context, id string) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at = 0`, s.now().Unix(), id)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("device %s (or already revoked): %w", id, ErrNotFound)
		}
		return nil
	})
}

// Ping checks that the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

// Close closes the database.
func (s *Store) Close() error {
	s.closeOnce.Do(func() { close(s.quit) })
	s.prepared.Range(func(_, v any) bool { v.(*sql.Stmt).Close(); return true })
	return s.db.Close()
}

// SchemaVersion is the number of migrations applied.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	return v, err
}

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return err
	}
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		if _, err := s.db.ExecContext(ctx, `INSERT INTO schema_version (version) VALUES (0)`); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	if v > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this server's %d", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE schema_version SET version = ?`, i+1); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
	}
	return nil
}

// write runs f in a transaction and commits it (after BeforeCommit).
func (s *Store) write(ctx context.Context, f func(tx *sql.Tx) error) error {
	err := s.writeTx(ctx, f)
	s.gen.Add(1) // also after a failure: a commit may have happened anyway
	return err
}

// writeTx is write without invalidating the device-state cache: for the
// device path (check-ins, offers, reports), which changes nothing the cache
// holds. Were it to invalidate, one device inside a rollout checking in
// would send every other device back to the database.
func (s *Store) writeTx(ctx context.Context, f func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := f(tx); err != nil {
		tx.Rollback()
		return err
	}
	if s.BeforeCommit != nil {
		if err := s.BeforeCommit(); err != nil {
			tx.Rollback()
			return err
		}
	}
	return tx.Commit()
}

// ErrNotFound is returned for an unknown record.
var ErrNotFound = errors.New("not found")

// Device is a device as the server knows it.
type Device struct {
	ID              string            `json:"id"`
	HWClass         string            `json:"hw_class"`
	Version         string            `json:"version"`
	Slot            string            `json:"slot"`
	SecurityCounter uint32            `json:"security_counter"`
	KeyEpoch        uint32            `json:"key_epoch"`
	TimeZone        string            `json:"time_zone,omitempty"`
	Attributes      map[string]string `json:"attributes,omitempty"`
	Phase           string            `json:"phase,omitempty"`
	Groups          []string          `json:"groups,omitempty"`
	Tags            []string          `json:"tags,omitempty"`
	LastSeen        time.Time         `json:"last_seen"`
	Revoked         bool              `json:"revoked,omitempty"`
}

// AddDevice registers a device (at provisioning), in the given groups.
func (s *Store) AddDevice(ctx context.Context, id string, groups []string) error {
	if err := proto.ValidID("device id", id); err != nil {
		return err
	}
	for _, g := range groups {
		if err := proto.ValidID("group", g); err != nil {
			return err
		}
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO devices (id, created_at) VALUES (?, ?) ON CONFLICT(id) DO NOTHING`, id, s.now().Unix()); err != nil {
			return err
		}
		for _, g := range groups {
			if _, err := tx.ExecContext(ctx, `INSERT INTO device_groups (device_id, grp) VALUES (?, ?) ON CONFLICT DO NOTHING`, id, g); err != nil {
				return err
			}
		}
		return nil
	})
}

// CheckIn records what a device says about itself. The device must exist.
func (s *Store) CheckIn(ctx context.Context, id string, c proto.CheckIn) error {
	key, _ := json.Marshal(c)
	now := s.now()
	if res := s.LastSeenResolution; res > 0 {
		s.cacheMu.Lock()
		last, ok := s.seen[id]
		s.cacheMu.Unlock()
		if ok && last.key == string(key) && now.Sub(time.Unix(last.at, 0)) < res {
			return nil // nothing new, and last_seen is recent enough
		}
	}
	req := &checkinReq{id: id, c: c, key: string(key), at: now.Unix(), done: make(chan error, 1)}
	select {
	case <-s.quit:
		return errors.New("the store is closed")
	default:
	}
	select {
	case s.checkins <- req:
	case <-s.quit:
		return errors.New("the store is closed")
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-req.done:
		return err
	case <-s.quit: // closed before the batcher took it
		return errors.New("the store is closed")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// checkinReq is one check-in waiting for the batcher.
type checkinReq struct {
	id   string
	c    proto.CheckIn
	key  string // the check-in as JSON, to recognise a repeat
	at   int64
	done chan error
}

// seenState is a device's last stored check-in.
type seenState struct {
	key string
	at  int64
}

// startBatcher starts the goroutine that commits check-ins in groups:
// while one transaction commits, the check-ins that arrive meanwhile queue
// up and go into the next one, so under load one fsync carries many
// check-ins and an idle server adds no delay. Each caller still returns
// only once its check-in is committed.
func (s *Store) startBatcher() {
	s.checkins = make(chan *checkinReq, 1024)
	s.quit = make(chan struct{})
	go func() {
		batch := make([]*checkinReq, 0, maxCheckinBatch)
		for {
			select {
			case <-s.quit:
				return
			case first := <-s.checkins:
				batch = append(batch[:0], first)
			}
		drain:
			for len(batch) < maxCheckinBatch {
				select {
				case r := <-s.checkins:
					batch = append(batch, r)
				default:
					break drain
				}
			}
			s.commitCheckins(batch)
		}
	}()
}

const maxCheckinBatch = 256

func (s *Store) commitCheckins(batch []*checkinReq) {
	errs := make([]error, len(batch))
	err := s.writeTx(context.Background(), func(tx *sql.Tx) error {
		stmt, err := tx.Prepare(`UPDATE devices SET hw_class = ?, version = ?, slot = ?, security_counter = ?, key_epoch = ?,
			time_zone = ?, attributes = ?, phase = ?, last_seen = ? WHERE id = ?`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for i, r := range batch {
			c := r.c
			attrs, _ := json.Marshal(c.Attributes)
			res, err := stmt.Exec(c.HWClass, c.Version, c.Slot, c.SecurityCounter, c.KeyEpoch, c.TimeZone, string(attrs), c.Phase, r.at, r.id)
			if err != nil {
				return err
			}
			if n, _ := res.RowsAffected(); n == 0 {
				errs[i] = fmt.Errorf("device %s: %w", r.id, ErrNotFound)
			}
		}
		return nil
	})
	if err == nil && s.LastSeenResolution > 0 {
		s.cacheMu.Lock()
		if len(s.seen) >= maxCachedDevices {
			clear(s.seen)
		}
		for i, r := range batch {
			if errs[i] == nil {
				s.seen[r.id] = seenState{key: r.key, at: r.at}
			}
		}
		s.cacheMu.Unlock()
	}
	for i, r := range batch {
		if err != nil {
			r.done <- err
		} else {
			r.done <- errs[i]
		}
	}
}

// GetDevice reads one device.
func (s *Store) GetDevice(ctx context.Context, id string) (*Device, error) {
	var d Device
	var attrs string
	var seen, revoked int64
	err := s.db.QueryRowContext(ctx, `SELECT id, hw_class, version, slot, security_counter, key_epoch, time_zone, attributes, phase, last_seen, revoked_at
		FROM devices WHERE id = ?`, id).Scan(&d.ID, &d.HWClass, &d.Version, &d.Slot, &d.SecurityCounter, &d.KeyEpoch, &d.TimeZone, &attrs, &d.Phase, &seen, &revoked)
	d.Revoked = revoked != 0
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("device %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	json.Unmarshal([]byte(attrs), &d.Attributes)
	if seen > 0 {
		d.LastSeen = time.Unix(seen, 0)
	}
	rows, err := s.db.QueryContext(ctx, `SELECT grp FROM device_groups WHERE device_id = ? ORDER BY grp`, id)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var g string
		rows.Scan(&g)
		d.Groups = append(d.Groups, g)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rows.Close()
	trows, err := s.db.QueryContext(ctx, `SELECT tag FROM device_tags WHERE device_id = ? ORDER BY tag`, id)
	if err != nil {
		return nil, err
	}
	defer trows.Close()
	for trows.Next() {
		var t string
		trows.Scan(&t)
		d.Tags = append(d.Tags, t)
	}
	return &d, trows.Err()
}

// ListDevices lists the devices that match every set field of f, by ID.
func (s *Store) ListDevices(ctx context.Context, f DeviceFilter) ([]Device, error) {
	q := `SELECT id FROM devices WHERE 1=1`
	var args []any
	if f.Group != "" {
		q += ` AND id IN (SELECT device_id FROM device_groups WHERE grp = ?)`
		args = append(args, f.Group)
	}
	if f.Tag != "" {
		q += ` AND id IN (SELECT device_id FROM device_tags WHERE tag = ?)`
		args = append(args, f.Tag)
	}
	for _, c := range []struct{ col, v string }{{"hw_class", f.HWClass}, {"version", f.Version}, {"phase", f.Phase}} {
		if c.v != "" {
			q += ` AND ` + c.col + ` = ?`
			args = append(args, c.v)
		}
	}
	rows, err := s.db.QueryContext(ctx, q+` ORDER BY id`, args...)
	if err != nil {
		return nil, err
	}
	var ids []string
	for rows.Next() {
		var id string
		rows.Scan(&id)
		ids = append(ids, id)
	}
	rows.Close()
	var out []Device
	for _, id := range ids {
		d, err := s.GetDevice(ctx, id)
		if err != nil {
			return nil, err
		}
		out = append(out, *d)
	}
	return out, nil
}

// Release is an uploaded, verified image.
type Release struct {
	ID              string    `json:"id"`
	Version         string    `json:"version"`
	HWClass         string    `json:"hw_class"`
	SecurityCounter uint32    `json:"security_counter"`
	KeyEpoch        uint32    `json:"key_epoch,omitempty"`
	SHA256          string    `json:"sha256"`
	Length          int64     `json:"length"`
	CreatedAt       time.Time `json:"created_at"`
}

// AddRelease records a release whose image is in the blob store.
func (s *Store) AddRelease(ctx context.Context, r Release) error {
	if err := proto.ValidID("release id", r.ID); err != nil {
		return err
	}
	if err := proto.ValidSHA256(r.SHA256); err != nil {
		return err
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO releases (id, version, hw_class, security_counter, key_epoch, sha256, length, created_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?)`, r.ID, r.Version, r.HWClass, r.SecurityCounter, r.KeyEpoch, r.SHA256, r.Length, s.now().Unix())
		if err != nil && strings.Contains(err.Error(), "UNIQUE") {
			return fmt.Errorf("release %s exists already", r.ID)
		}
		return err
	})
}

// Assign offers a release to a device or to a group: a rollout with one
// phase at 100 percent. The rollouts layer adds phases to the same tables.
func (s *Store) Assign(ctx context.Context, rolloutID, releaseID, targetKind, target string, downgrade bool) error {
	if targetKind != "device" && targetKind != "group" {
		return fmt.Errorf("target kind %q: want device or group", targetKind)
	}
	for _, id := range []string{rolloutID, releaseID, target} {
		if err := proto.ValidID("id", id); err != nil {
			return err
		}
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM releases WHERE id = ?`, releaseID).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("release %s: %w", releaseID, ErrNotFound)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO rollouts (id, release_id, target_kind, target, downgrade, created_at) VALUES (?, ?, ?, ?, ?, ?)`,
			rolloutID, releaseID, targetKind, target, downgrade, s.now().Unix()); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO rollout_phases (rollout_id, idx, percent) VALUES (?, 0, 100)`, rolloutID)
		return err
	})
}

// Update is one device's attempt at one release.
type Update struct {
	ID        string    `json:"id"`
	DeviceID  string    `json:"device_id"`
	RolloutID string    `json:"rollout_id"`
	ReleaseID string    `json:"release_id"`
	Status    string    `json:"status"` // offered, then the device's report statuses
	Progress  float64   `json:"progress"`
	Reason    string    `json:"reason,omitempty"`
	LogTail   string    `json:"log_tail,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
}

// StatusOffered is an update offered and not yet reported on.
const StatusOffered = "offered"

// Offer finds what to offer a device: the newest active rollout that
// targets it or one of its groups, for its hardware class and another
// version, that it has not already finished (committed, failed or rolled
// back). An update in progress is offered again with the same ID. It uses
// indexed lookups only: its cost does not grow with the fleet.
func (s *Store) Offer(ctx context.Context, deviceID string, newID func() string) (*Update, *Release, bool, error) {
	var up *Update
	var rel *Release
	var downgrade bool
	// Most check-ins have nothing to be offered: find that out without a
	// write transaction (usually without a query).
	st, err := s.deviceState(ctx, deviceID)
	switch {
	case err != nil:
		return nil, nil, false, err
	case !st.exists:
		return nil, nil, false, fmt.Errorf("device %s: %w", deviceID, ErrNotFound)
	case !st.hasRollout:
		return nil, nil, false, nil
	}
	err = s.writeTx(ctx, func(tx *sql.Tx) error { // updates only: the cache holds none
		var hw, version string
		if err := tx.QueryRowContext(ctx, `SELECT hw_class, version FROM devices WHERE id = ?`, deviceID).Scan(&hw, &version); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("device %s: %w", deviceID, ErrNotFound)
			}
			return err
		}
		rows, err := tx.QueryContext(ctx, `
			SELECT r.id, r.release_id, r.downgrade FROM rollouts r
			WHERE r.state = 'active' AND (
				(r.target_kind = 'device' AND r.target = ?) OR
				(r.target_kind = 'group' AND r.target IN (SELECT grp FROM device_groups WHERE device_id = ?)))
			ORDER BY r.created_at DESC, r.id DESC`, deviceID, deviceID)
		if err != nil {
			return err
		}
		type cand struct {
			rollout, release string
			down             bool
		}
		var cands []cand
		for rows.Next() {
			var c cand
			if err := rows.Scan(&c.rollout, &c.release, &c.down); err != nil {
				rows.Close()
				return err
			}
			cands = append(cands, c)
		}
		rows.Close()
		for _, c := range cands {
			var r Release
			var created int64
			if err := tx.QueryRowContext(ctx, `SELECT id, version, hw_class, security_counter, key_epoch, sha256, length, created_at FROM releases WHERE id = ?`,
				c.release).Scan(&r.ID, &r.Version, &r.HWClass, &r.SecurityCounter, &r.KeyEpoch, &r.SHA256, &r.Length, &created); err != nil {
				return err
			}
			if r.HWClass != hw || r.Version == version {
				continue
			}
			var u Update
			var updated int64
			err := tx.QueryRowContext(ctx, `SELECT id, device_id, rollout_id, release_id, status, progress, reason, updated_at FROM updates
				WHERE device_id = ? AND release_id = ? AND retired = 0 ORDER BY created_at DESC LIMIT 1`, deviceID, r.ID).
				Scan(&u.ID, &u.DeviceID, &u.RolloutID, &u.ReleaseID, &u.Status, &u.Progress, &u.Reason, &updated)
			switch {
			case err == nil && proto.Final(u.Status):
				continue // finished: not offered again unless an operator retries it
			case err == nil:
				up, rel, downgrade = &u, &r, c.down
				return nil
			case !errors.Is(err, sql.ErrNoRows):
				return err
			}
			u = Update{ID: newID(), DeviceID: deviceID, RolloutID: c.rollout, ReleaseID: r.ID, Status: StatusOffered}
			now := s.now().Unix()
			if _, err := tx.ExecContext(ctx, `INSERT INTO updates (id, device_id, rollout_id, release_id, status, created_at, updated_at)
				VALUES (?, ?, ?, ?, ?, ?, ?)`, u.ID, deviceID, c.rollout, r.ID, u.Status, now, now); err != nil {
				return err
			}
			up, rel, downgrade = &u, &r, c.down
			return nil
		}
		return nil
	})
	return up, rel, downgrade, err
}

// RecordReport stores a device's report and applies it to its update, in
// one transaction; it returns only once that transaction committed. The
// same report ID from the same device is stored once: a retry returns
// stored=false and nil. A device can report only on its own updates.
func (s *Store) RecordReport(ctx context.Context, deviceID string, r proto.Report) (stored bool, err error) {
	body, _ := json.Marshal(r)
	err = s.writeTx(ctx, func(tx *sql.Tx) error { // updates and reports only: the cache holds none
		var owner string
		if err := tx.QueryRowContext(ctx, `SELECT device_id FROM updates WHERE id = ?`, r.UpdateID).Scan(&owner); err != nil {
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("update %s: %w", r.UpdateID, ErrNotFound)
			}
			return err
		}
		if owner != deviceID {
			return fmt.Errorf("update %s: %w", r.UpdateID, ErrNotFound) // not revealed to other devices
		}
		res, err := tx.ExecContext(ctx, `INSERT INTO reports (device_id, report_id, update_id, status, body, received_at) VALUES (?, ?, ?, ?, ?, ?)
			ON CONFLICT (device_id, report_id) DO NOTHING`, deviceID, r.ReportID, r.UpdateID, r.Status, string(body), s.now().Unix())
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil // a retry of a stored report
		}
		stored = true
		_, err = tx.ExecContext(ctx, `UPDATE updates SET status = ?, progress = ?, reason = ?, log_tail = ?, updated_at = ?
			WHERE id = ? AND status NOT IN ('committed', 'failed', 'rolled_back')`,
			r.Status, r.Progress, r.Reason, r.LogTail, s.now().Unix(), r.UpdateID)
		if err == nil && s.BeforeReportCommit != nil {
			err = s.BeforeReportCommit(r.Status)
		}
		return err
	})
	return stored, err
}

// Updates lists a device's update attempts, newest first.
func (s *Store) Updates(ctx context.Context, deviceID string) ([]Update, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, device_id, rollout_id, release_id, status, progress, reason, log_tail, updated_at
		FROM updates WHERE device_id = ? ORDER BY created_at DESC, id DESC`, deviceID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Update
	for rows.Next() {
		var u Update
		var updated int64
		if err := rows.Scan(&u.ID, &u.DeviceID, &u.RolloutID, &u.ReleaseID, &u.Status, &u.Progress, &u.Reason, &u.LogTail, &updated); err != nil {
			return nil, err
		}
		u.UpdatedAt = time.Unix(updated, 0)
		out = append(out, u)
	}
	return out, rows.Err()
}

// Retry lets a device be offered a release again after it failed or rolled
// it back (an operator's decision).
func (s *Store) Retry(ctx context.Context, deviceID, releaseID string) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE updates SET retired = 1 WHERE device_id = ? AND release_id = ? AND status IN ('failed', 'rolled_back')`, deviceID, releaseID)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("no failed or rolled back update of %s on %s: %w", releaseID, deviceID, ErrNotFound)
		}
		return nil
	})
}

// DeviceMayRead says whether a blob is the image of a release the device
// has been offered: devices download only what they were offered.
func (s *Store) DeviceMayRead(ctx context.Context, deviceID, sha256 string) (bool, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM updates u JOIN releases r ON r.id = u.release_id
		WHERE u.device_id = ? AND r.sha256 = ?`, deviceID, sha256).Scan(&n)
	return n > 0, err
}

// ReleaseUses says whether a release's image is the blob with this SHA-256.
func (s *Store) ReleaseUses(ctx context.Context, sha256 string) (bool, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM releases WHERE sha256 = ?`, sha256).Scan(&n)
	return n > 0, err
}

// ErrConflict is returned when a record exists with other contents.
var ErrConflict = errors.New("conflict")

// AddEnrollmentToken records a fleet enrollment token by its hash.
func (s *Store) AddEnrollmentToken(ctx context.Context, hash, group string, expires time.Time, uses int) error {
	if group != "" {
		if err := proto.ValidID("group", group); err != nil {
			return err
		}
	}
	if uses < 1 {
		return fmt.Errorf("a token needs at least one use")
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO enrollment_tokens (hash, grp, expires_at, uses_left, created_at) VALUES (?, ?, ?, ?, ?)`,
			hash, group, expires.Unix(), uses, s.now().Unix())
		return err
	})
}

// EnrollWithToken registers a device with a valid token (spending one use)
// in the token's group. The caller then certifies the device's key.
func (s *Store) EnrollWithToken(ctx context.Context, hash, deviceID string) error {
	if err := proto.ValidID("device id", deviceID); err != nil {
		return err
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		var grp string
		var expires, uses int64
		err := tx.QueryRowContext(ctx, `SELECT grp, expires_at, uses_left FROM enrollment_tokens WHERE hash = ?`, hash).Scan(&grp, &expires, &uses)
		if errors.Is(err, sql.ErrNoRows) || err == nil && (uses < 1 || s.now().Unix() > expires) {
			return fmt.Errorf("enrollment token: %w (unknown, used up or expired)", ErrNotFound)
		}
		if err != nil {
			return err
		}
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM devices WHERE id = ?`, deviceID).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("device %s is already enrolled: %w", deviceID, ErrConflict)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE hash = ?`, hash); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO devices (id, created_at) VALUES (?, ?)`, deviceID, s.now().Unix()); err != nil {
			return err
		}
		if grp != "" {
			_, err = tx.ExecContext(ctx, `INSERT INTO device_groups (device_id, grp) VALUES (?, ?)`, deviceID, grp)
		}
		return err
	})
}

// MaxPending bounds the pending enrollments anyone may create.
const MaxPending = 10000

// RequestEnrollment records (or finds) a device waiting for approval with
// its public key. It returns the state: "pending" or "approved". Another key
// for the same device ID is a conflict.
func (s *Store) RequestEnrollment(ctx context.Context, deviceID, publicKeyPEM string) (string, error) {
	if err := proto.ValidID("device id", deviceID); err != nil {
		return "", err
	}
	var state string
	err := s.write(ctx, func(tx *sql.Tx) error {
		var key string
		err := tx.QueryRowContext(ctx, `SELECT public_key, state FROM enrollments WHERE device_id = ?`, deviceID).Scan(&key, &state)
		switch {
		case err == nil && key != publicKeyPEM:
			return fmt.Errorf("device %s is waiting with another key: %w", deviceID, ErrConflict)
		case err == nil:
			return nil
		case !errors.Is(err, sql.ErrNoRows):
			return err
		}
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM enrollments WHERE state = 'pending'`).Scan(&n); err != nil {
			return err
		}
		if n >= MaxPending {
			return fmt.Errorf("too many pending enrollments")
		}
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM devices WHERE id = ?`, deviceID).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("device %s is already enrolled: %w", deviceID, ErrConflict)
		}
		state = "pending"
		_, err = tx.ExecContext(ctx, `INSERT INTO enrollments (device_id, public_key, state, created_at) VALUES (?, ?, 'pending', ?)`, deviceID, publicKeyPEM, s.now().Unix())
		return err
	})
	return state, err
}

// Approve lets a pending device in, in the given groups.
func (s *Store) Approve(ctx context.Context, deviceID string, groups []string) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE enrollments SET state = 'approved' WHERE device_id = ? AND state = 'pending'`, deviceID)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("pending enrollment %s: %w", deviceID, ErrNotFound)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO devices (id, created_at) VALUES (?, ?) ON CONFLICT(id) DO NOTHING`, deviceID, s.now().Unix()); err != nil {
			return err
		}
		for _, g := range groups {
			if err := proto.ValidID("group", g); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO device_groups (device_id, grp) VALUES (?, ?) ON CONFLICT DO NOTHING`, deviceID, g); err != nil {
				return err
			}
		}
		return nil
	})
}

// Pending lists the devices waiting for approval.
func (s *Store) Pending(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT device_id FROM enrollments WHERE state = 'pending' ORDER BY created_at, device_id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		rows.Scan(&id)
		out = append(out, id)
	}
	return out, rows.Err()
}
