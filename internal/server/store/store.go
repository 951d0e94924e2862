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
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite" // the database/sql driver "sqlite"

	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/rollout"
)

// Store is an open database.
type Store struct {
	db      *sql.DB
	writeMu sync.Mutex // one write transaction at a time (see writeTx)
	// BeforeCommit, if set, runs before each write transaction commits; an
	// error aborts the transaction. Tests inject commit failures with it.
	BeforeCommit func() error
	// BeforeReportCommit, if set, runs before a report's transaction
	// commits, with the report's status; an error aborts it. Tests inject
	// failures on outcome reports with it.
	BeforeReportCommit func(status string) error

	checkins chan *checkinReq
	starts   chan *startReq
	quit     chan struct{}
	prepared sync.Map      // query text -> *sql.Stmt, for the device API's hot path
	gen      atomic.Uint64 // bumped by every committed write but the device path's and rollouts' own
	rollGen  atomic.Uint64 // bumped by writes that change rollouts only (writeRollouts)
	live     liveCache     // active and paused rollouts, for offers
	zones    rollout.Zones
	cacheMu  sync.Mutex
	cache    map[string]devState
	clears   uint64 // times the cache was cleared; guarded by cacheMu
	// afterLoad, in tests, runs between a device state's load and its
	// caching.
	afterLoad func(id string)
	seen      map[string]seenState // guarded by cacheMu

	// Offerable, if set, says whether a release may be started on devices
	// (the server allows only releases published in its TUF targets once
	// the repository has a root). Attempts already started go on.
	Offerable func(*Release) bool

	// Log, if set, hears about rollouts that cannot be read.
	Log *slog.Logger

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
	// Staged rollouts: a rollout is its spec (JSON, see package rollout)
	// and where it stands; an assignment becomes a one-phase rollout whose
	// gates never trip. Updates remember the phase they started in; devices
	// keep their health counters and the baseline of their current version.
	`CREATE TABLE rollouts_new (
		id               TEXT PRIMARY KEY,
		release_id       TEXT NOT NULL REFERENCES releases(id),
		spec             TEXT NOT NULL,
		state            TEXT NOT NULL CHECK (state IN ('created', 'active', 'paused', 'aborted')),
		phase            INTEGER NOT NULL DEFAULT 0,
		phase_started_at INTEGER NOT NULL DEFAULT 0,
		reason           TEXT NOT NULL DEFAULT '',
		baseline         TEXT NOT NULL DEFAULT '{}',
		created_at       INTEGER NOT NULL,
		started_at       INTEGER NOT NULL DEFAULT 0,
		updated_at       INTEGER NOT NULL DEFAULT 0
	);
	INSERT INTO rollouts_new (id, release_id, spec, state, phase, phase_started_at, created_at, started_at, updated_at)
		SELECT id, release_id, json_object('id', id, 'release', release_id,
			'target', CASE target_kind WHEN 'device' THEN json_object('devices', json_array(target)) ELSE json_object('groups', json_array(target)) END,
			'phases', json_array(json_object('percent', 100, 'soak', '0s', 'gates', json_object('max_failure_rate', 1, 'max_rollback_rate', 1, 'max_unhealthy_rate', 1))),
			'downgrade', json(CASE downgrade WHEN 0 THEN 'false' ELSE 'true' END)),
			CASE state WHEN 'active' THEN 'active' ELSE 'aborted' END, 0, created_at, created_at, created_at, created_at
		FROM rollouts;
	DROP TABLE rollout_phases;
	DROP TABLE rollouts;
	ALTER TABLE rollouts_new RENAME TO rollouts;
	CREATE INDEX rollouts_by_state ON rollouts(state);
	CREATE TABLE rollout_events (
		seq        INTEGER PRIMARY KEY AUTOINCREMENT,
		rollout_id TEXT NOT NULL REFERENCES rollouts(id),
		at         INTEGER NOT NULL,
		kind       TEXT NOT NULL,
		phase      INTEGER NOT NULL,
		detail     TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX rollout_events_by_rollout ON rollout_events(rollout_id, seq);
	ALTER TABLE updates ADD COLUMN phase INTEGER NOT NULL DEFAULT 0;
	CREATE INDEX updates_by_rollout ON updates(rollout_id, phase, status);
	CREATE INDEX updates_by_rollout_time ON updates(rollout_id, created_at);
	CREATE UNIQUE INDEX updates_one_live ON updates(device_id, release_id) WHERE retired = 0;
	ALTER TABLE devices ADD COLUMN health_resets INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN health_crashes INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN base_at INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN base_resets INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN base_crashes INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN prev_reset_rate REAL NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN prev_crash_rate REAL NOT NULL DEFAULT 0;`,
	// 6: the downloads in progress of a rollout (its max_downloads limit,
	// counted at every start) without reading its finished attempts.
	`CREATE INDEX updates_live_by_rollout ON updates(rollout_id, status, updated_at) WHERE retired = 0;`,
	// 7: each device's pre-shared key for CoAP over DTLS, issued at
	// enrollment and renewal.
	`CREATE TABLE device_psks (
		device_id TEXT PRIMARY KEY REFERENCES devices(id),
		psk       TEXT NOT NULL,
		issued_at INTEGER NOT NULL
	);`,
}

// Open opens (creating if needed) the database at path and applies pending
// migrations.
func Open(ctx context.Context, path string) (*Store, error) {
	// Every transaction here writes: BEGIN IMMEDIATE takes the write lock
	// first (waiting on the busy timeout), so one that reads before it
	// writes never fails with a stale snapshot when another committed.
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)&_txlock=immediate"
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
	s.startBatchers()
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

// devState is what the device API needs about a device on every request:
// does it exist, is it revoked, what it last said about itself, its groups
// and tags (for rollout targets) and its live update attempts.
type devState struct {
	gen uint64
	// epoch moves on at every change to the device's own entry on the
	// device path; stale marks an entry dropped (forget) that keeps its
	// epoch, so a load that began before the change is not stored.
	epoch           uint64
	stale           bool
	exists, revoked bool
	hwClass         string // pinned by the device's first check-in
	version         string
	securityCounter uint32
	timeZone        string
	attributes      map[string]string
	groups, tags    []string
	updates         []liveUpdate // not retired
}

// liveUpdate is a device's current attempt at a release.
type liveUpdate struct {
	id, rollout, release, status string
}

// maxCachedDevices bounds the device-state cache; past it, it starts over.
const maxCachedDevices = 200_000

// deviceState answers from a cache. A committed write that may change what
// it holds for many devices (write) bumps the generation and so
// invalidates every entry; a write about one device (a revocation, an
// enrollment, a group change, a retry) drops that device's entry, and
// writes that change no device's state (rollouts created, controlled,
// advanced or tripped; releases, tokens, the audit log) keep every entry. The device
// path drops only the device's own entry (forget) when it starts an update
// or stores a report, and refreshes its facts in place after a check-in. So
// a change is seen at the device's next request, an idle fleet's
// check-ins cost no query, and a rollout's start does not send the whole
// fleet back to the database.
func (s *Store) deviceState(ctx context.Context, id string) (devState, error) {
	gen := s.gen.Load()
	s.cacheMu.Lock()
	st, ok := s.cache[id]
	epoch, clears := st.epoch, s.clears
	s.cacheMu.Unlock()
	if ok && !st.stale && st.gen == gen {
		return st, nil
	}
	st, err := s.loadDeviceState(ctx, id)
	if err != nil {
		return devState{}, err
	}
	if s.afterLoad != nil {
		s.afterLoad(id)
	}
	st.gen, st.epoch = gen, epoch
	s.cacheMu.Lock()
	// Kept only when nothing changed this device's entry while it loaded
	// (nor cleared the cache: that forgets epochs).
	if s.cache[id].epoch == epoch && s.clears == clears {
		if len(s.cache) >= maxCachedDevices {
			clear(s.cache)
			s.clears++
		}
		s.cache[id] = st
	}
	s.cacheMu.Unlock()
	return st, nil
}

func (s *Store) loadDeviceState(ctx context.Context, id string) (devState, error) {
	var st devState
	var revoked int64
	var attrs string
	err := s.queryRow(ctx, `SELECT revoked_at, hw_class, version, security_counter, time_zone, attributes FROM devices WHERE id = ?`, id).
		Scan(&revoked, &st.hwClass, &st.version, &st.securityCounter, &st.timeZone, &attrs)
	if errors.Is(err, sql.ErrNoRows) {
		return devState{}, nil
	}
	if err != nil {
		return devState{}, err
	}
	st.exists, st.revoked = true, revoked != 0
	json.Unmarshal([]byte(attrs), &st.attributes)
	for _, l := range []struct {
		q   string
		dst *[]string
	}{{`SELECT grp FROM device_groups WHERE device_id = ?`, &st.groups}, {`SELECT tag FROM device_tags WHERE device_id = ?`, &st.tags}} {
		if err := s.queryRows(ctx, l.q, []any{id}, func(r *sql.Rows) error {
			var v string
			err := r.Scan(&v)
			*l.dst = append(*l.dst, v)
			return err
		}); err != nil {
			return devState{}, err
		}
	}
	err = s.queryRows(ctx, `SELECT id, rollout_id, release_id, status FROM updates WHERE device_id = ? AND retired = 0`, []any{id}, func(r *sql.Rows) error {
		var u liveUpdate
		err := r.Scan(&u.id, &u.rollout, &u.release, &u.status)
		st.updates = append(st.updates, u)
		return err
	})
	return st, err
}

// queryRows runs a prepared query and calls f for each row.
func (s *Store) queryRows(ctx context.Context, q string, args []any, f func(*sql.Rows) error) error {
	st, err := s.stmt(ctx, q)
	if err != nil {
		return err
	}
	rows, err := st.QueryContext(ctx, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := f(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}

// forget drops one device's cached state (after the device path changed
// its updates).
func (s *Store) forget(id string) {
	s.cacheMu.Lock()
	s.cache[id] = devState{stale: true, epoch: s.cache[id].epoch + 1}
	s.cacheMu.Unlock()
}

// Revoke refuses a device from now on (a stolen or decommissioned one).
func (s *Store) Revoke(ctx context.Context, id string) error {
	return s.writeDevice(ctx, id, func(tx *sql.Tx) error {
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

// SetClock sets the clock the store dates records and judges rollouts by
// (a simulation runs it faster than real time). Call it before use.
func (s *Store) SetClock(now func() time.Time) { s.now = now }

// Ping checks that the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

// Close closes the database.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		if s.quit != nil {
			close(s.quit)
		}
	})
	s.prepared.Range(func(_, v any) bool { v.(*sql.Stmt).Close(); return true })
	return s.db.Close()
}

// SchemaVersion is the number of migrations applied.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	return v, err
}

func (s *Store) migrate(ctx context.Context) error { return s.migrateTo(ctx, len(migrations)) }

// migrateTo applies migrations up to n. They run as SQLite asks for schema
// changes that rebuild a table: on one connection with foreign keys off,
// each in a transaction that checks every foreign key before it commits.
func (s *Store) migrateTo(ctx context.Context, n int) error {
	conn, err := s.db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return err
	}
	var v int
	err = conn.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		if _, err := conn.ExecContext(ctx, `INSERT INTO schema_version (version) VALUES (0)`); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	if v > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this server's %d", v, len(migrations))
	}
	if v >= n {
		return nil
	}
	if _, err := conn.ExecContext(ctx, `PRAGMA foreign_keys = OFF`); err != nil {
		return err
	}
	defer conn.ExecContext(context.Background(), `PRAGMA foreign_keys = ON`)
	for i := v; i < n; i++ {
		if err := migrateOne(ctx, conn, i); err != nil {
			return fmt.Errorf("migration %d: %w", i+1, err)
		}
	}
	return nil
}

func migrateOne(ctx context.Context, conn *sql.Conn, i int) error {
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
		return err
	}
	rows, err := tx.QueryContext(ctx, `PRAGMA foreign_key_check`)
	if err != nil {
		return err
	}
	bad := rows.Next()
	rows.Close()
	if bad {
		return errors.New("it would leave rows whose references are broken")
	}
	if _, err := tx.ExecContext(ctx, `UPDATE schema_version SET version = ?`, i+1); err != nil {
		return err
	}
	return tx.Commit()
}

// write runs f in a transaction and commits it (after BeforeCommit), and
// invalidates every device's cached state: for a write that changes many
// devices' state at once (none at present: each write below says what it
// changes).
func (s *Store) write(ctx context.Context, f func(tx *sql.Tx) error) error {
	err := s.writeTx(ctx, f)
	s.gen.Add(1) // also after a failure: a commit may have happened anyway
	return err
}

// writeDevice is write for a change to one device's own records (its row,
// groups, tags, enrollment, or its updates): it drops that device's cached
// state only, once the change is committed.
func (s *Store) writeDevice(ctx context.Context, id string, f func(tx *sql.Tx) error) error {
	ran := false // f succeeded, so a commit was tried (and may have happened even if it failed)
	err := s.writeTx(ctx, func(tx *sql.Tx) error {
		if err := f(tx); err != nil {
			return err
		}
		ran = true
		return nil
	})
	if ran {
		s.forget(id)
	}
	return err
}

// writeRollouts is write for a change to rollouts alone (their rows and
// events): it invalidates the cached list of live rollouts, not the
// devices' cached state.
func (s *Store) writeRollouts(ctx context.Context, f func(tx *sql.Tx) error) error {
	err := s.writeTx(ctx, f)
	s.rollGen.Add(1) // also after a failure: a commit may have happened anyway
	return err
}

// writeTx is write without invalidating the device-state cache: for the
// device path (check-ins, offers, reports), which changes nothing the cache
// holds. Were it to invalidate, one device inside a rollout checking in
// would send every other device back to the database.
//
// Writers take turns here, in process: SQLite has one writer at a time,
// and connections that race for its lock wait in its busy handler, which
// sleeps (up to 100 ms a turn) while the lock may already be free. Under
// a fleet's load that sleeping, not the work, was what requests waited on.
func (s *Store) writeTx(ctx context.Context, f func(tx *sql.Tx) error) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
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
	return s.writeDevice(ctx, id, func(tx *sql.Tx) error {
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
	err, serr := submit(ctx, s.quit, s.checkins, req, req.done)
	if serr != nil {
		return serr
	}
	return err
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

// startBatchers starts the goroutines that commit check-ins and starts in
// groups (batch.go).
func (s *Store) startBatchers() {
	s.checkins = make(chan *checkinReq, 1024)
	s.starts = make(chan *startReq, 1024)
	s.quit = make(chan struct{})
	go batchLoop(s.quit, s.checkins, s.commitCheckins)
	go batchLoop(s.quit, s.starts, s.commitStarts)
}

// Health baselines. A device's version starts a baseline (base_at, and
// the counters then); the counters it reports later, minus the baseline,
// are what it did on that version. A version change without counters
// leaves the baseline unknown (unknownBase) until the first check-in that
// carries them, so the reboots of the update itself are not charged to
// the new version. Counters that go down (the device's counter store was
// wiped) keep what was counted so far: the baseline moves down with them.
const (
	unknownBase = -(1 << 62)
	newVersion  = `(version <> ?1 OR base_at = 0)`
)

// baseSQL is the new baseline of one counter: col is health_resets or
// health_crashes, base its baseline column, arg the check-in's value.
func baseSQL(col, base, arg string) string {
	return `CASE WHEN ` + newVersion + ` THEN coalesce(` + arg + `, ` + strconv.Itoa(unknownBase) + `)
		WHEN ` + base + ` = ` + strconv.Itoa(unknownBase) + ` THEN coalesce(` + arg + `, ` + strconv.Itoa(unknownBase) + `)
		WHEN ` + arg + ` IS NOT NULL AND ` + arg + ` < ` + col + ` THEN ` + arg + ` - (` + col + ` - ` + base + `)
		ELSE ` + base + ` END`
}

// rateSQL is the per-hour rate of a counter over the version that ends,
// when it ran for at least minRatePeriod: a version that only ran briefly
// (a trial rolled back) does not replace the rate of the one before, so a
// retry of a bad version is not judged against its own bad rate.
func rateSQL(col, base, prev string) string {
	return `CASE WHEN version <> ?1 AND version <> '' AND base_at > 0 AND ` + base + ` <> ` + strconv.Itoa(unknownBase) + `
		AND ?9 - base_at >= ` + strconv.Itoa(int(minRatePeriod.Seconds())) + `
		THEN max(` + col + ` - ` + base + `, 0) * 3600.0 / (?9 - base_at) ELSE ` + prev + ` END`
}

// minRatePeriod is how long a version must have run for its rate of
// resets and crashes to become a device's "old rate".
const minRatePeriod = time.Hour

func (s *Store) commitCheckins(batch []*checkinReq) {
	errs := make([]error, len(batch))
	err := s.writeTx(context.Background(), func(tx *sql.Tx) error {
		// A new version starts a new health baseline, and the rate of
		// watchdog resets and crashes on the old one is kept (per hour; the
		// soak gate compares against it). SQLite's UPDATE reads every
		// column's old value, whatever the order of the assignments.
		stmt, err := tx.Prepare(`UPDATE devices SET
			prev_reset_rate = ` + rateSQL("health_resets", "base_resets", "prev_reset_rate") + `,
			prev_crash_rate = ` + rateSQL("health_crashes", "base_crashes", "prev_crash_rate") + `,
			base_at = CASE WHEN ` + newVersion + ` THEN ?9 ELSE base_at END,
			base_resets = ` + baseSQL("health_resets", "base_resets", "?11") + `,
			base_crashes = ` + baseSQL("health_crashes", "base_crashes", "?12") + `,
			health_resets = coalesce(?11, health_resets), health_crashes = coalesce(?12, health_crashes),
			version = ?1, slot = ?2, hw_class = CASE WHEN hw_class = '' THEN ?3 ELSE hw_class END, security_counter = ?4, key_epoch = ?5,
			time_zone = ?6, attributes = ?7, phase = ?8, last_seen = ?9 WHERE id = ?10`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for i, r := range batch {
			c := r.c
			attrs, _ := json.Marshal(c.Attributes)
			var resets, crashes any // NULL: this check-in carries no counters, keep the last
			if h := c.Health; h != nil {
				resets, crashes = int64(h.WatchdogResets), int64(h.Crashes)
			}
			res, err := stmt.Exec(c.Version, c.Slot, c.HWClass, c.SecurityCounter, c.KeyEpoch, c.TimeZone, string(attrs), c.Phase, r.at, r.id,
				resets, crashes)
			if err != nil {
				return err
			}
			if n, _ := res.RowsAffected(); n == 0 {
				errs[i] = fmt.Errorf("device %s: %w", r.id, ErrNotFound)
			}
		}
		return nil
	})
	if err == nil {
		// What the device said is now its cached state too; a loader that
		// read the row before this commit must not store its older copy.
		s.cacheMu.Lock()
		for i, r := range batch {
			if errs[i] != nil {
				continue
			}
			st, ok := s.cache[r.id]
			if !ok || st.stale {
				st = devState{stale: true, epoch: st.epoch}
			} else {
				if st.hwClass == "" {
					st.hwClass = r.c.HWClass // the first report pins it
				}
				st.version, st.timeZone, st.attributes, st.securityCounter = r.c.Version, r.c.TimeZone, r.c.Attributes, r.c.SecurityCounter
			}
			st.epoch++
			s.cache[r.id] = st
		}
		s.cacheMu.Unlock()
	}
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
	return s.writeRollouts(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO releases (id, version, hw_class, security_counter, key_epoch, sha256, length, created_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?)`, r.ID, r.Version, r.HWClass, r.SecurityCounter, r.KeyEpoch, r.SHA256, r.Length, s.now().Unix())
		if err != nil && strings.Contains(err.Error(), "UNIQUE") {
			return fmt.Errorf("release %s exists already", r.ID)
		}
		return err
	})
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
	if stored {
		s.forget(deviceID)
	}
	return stored, err
}

// Updates lists a device's update attempts, newest first.
func (s *Store) Updates(ctx context.Context, deviceID string) ([]Update, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, device_id, rollout_id, release_id, status, progress, reason, log_tail, updated_at
		FROM updates WHERE device_id = ? ORDER BY created_at DESC, rowid DESC`, deviceID)
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
	return s.writeDevice(ctx, deviceID, func(tx *sql.Tx) error {
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
	return s.writeTx(ctx, func(tx *sql.Tx) error {
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
	return s.writeDevice(ctx, deviceID, func(tx *sql.Tx) error {
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
	err := s.writeDevice(ctx, deviceID, func(tx *sql.Tx) error {
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
	return s.writeDevice(ctx, deviceID, func(tx *sql.Tx) error {
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
