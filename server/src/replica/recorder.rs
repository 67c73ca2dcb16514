//! Master-side recording: the changeset of every write transaction of a replicated database
//! (captured by [`RowLog`]), and the `_changelog` it is appended to before COMMIT.
//!
//! Architecture invariant: a change and its changelog entry commit together or not at all.
//! Versions are assigned inside the write transaction as `MAX(version) + 1`, on the database's
//! single writer, so they are gap-free and strictly increasing; a transaction that changes
//! nothing (all its jobs failed, or it only touched local tables) gets no entry.

use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::feed::CommitFeed;
use super::rowlog::RowLog;
use super::schema::{self, SchemaObject};
use crate::db::writer::{Recorder, TxRecording};
use crate::realtime::Hub;
use crate::webhooks::Emitter;

const CHANGELOG_DDL: &str = "CREATE TABLE IF NOT EXISTS _changelog (
    version INTEGER PRIMARY KEY NOT NULL,
    schema_hash TEXT NOT NULL,
    schema TEXT,
    changeset BLOB NOT NULL,
    created INTEGER NOT NULL,
    hash TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS _replica_origin (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);";

/// The random id of a database file, created with its changelog and carried by its snapshots.
/// A database deleted and created again under the same name gets a new one, so replicas can
/// tell the two histories apart.
pub fn database_uid(conn: &Connection) -> rusqlite::Result<String> {
    Ok(conn
        .query_row("SELECT value FROM _replica_origin WHERE key = 'uid'", [], |r| r.get(0))
        .optional()?
        .unwrap_or_default())
}

/// The largest changeset one transaction may record. A bigger one fails the transaction (413)
/// instead of becoming an entry that every replica must hold in memory at once.
pub const MAX_ENTRY_BYTES: usize = 32 * 1024 * 1024;

/// The message of the error that refuses a transaction over [`MAX_ENTRY_BYTES`].
pub const TOO_LARGE: &str = "the transaction's changes exceed the 32 MiB a changelog entry may hold";

/// One changelog entry: the net changes of one committed write transaction.
#[derive(Debug, Clone)]
pub struct Entry {
    pub version: i64,
    /// Hash of the replicated schema after this transaction.
    pub schema_hash: String,
    /// The whole replicated schema after this transaction, when the transaction changed it.
    /// A replica migrates to it before applying `changeset`.
    pub schema: Option<Vec<SchemaObject>>,
    /// A SQLite session changeset (may be empty for a schema-only transaction).
    pub changeset: Vec<u8>,
    /// Commit time, Unix milliseconds.
    pub created: i64,
    /// Chains the history: sha256 of `prev_hash`, the version, the schema and the changeset.
    /// Two copies at the same version with the same hash have the same history.
    pub hash: String,
    /// The hash of the entry before this one (`""` for the first entry of a database).
    pub prev_hash: String,
}

/// The hash of an entry, chained to the one before it.
pub fn entry_hash(prev_hash: &str, version: i64, schema_hash: &str, schema: Option<&str>, changeset: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\x1f");
    h.update(version.to_string().as_bytes());
    h.update(b"\x1f");
    h.update(schema_hash.as_bytes());
    h.update(b"\x1f");
    h.update(schema.unwrap_or("").as_bytes());
    h.update(b"\x1f");
    h.update(changeset);
    crate::util::hex(&h.finalize())
}

/// `(version, schema_hash, schema, changeset, hash)` of a changelog row.
type OldRow = (i64, String, Option<String>, Vec<u8>, String);

/// Gives the entries of a changelog written before entries were chained their hashes, in
/// version order. The first kept entry starts the chain.
fn chain_old_entries(conn: &Connection) -> rusqlite::Result<()> {
    let has_hash = conn
        .prepare("SELECT 1 FROM pragma_table_info('_changelog') WHERE name = 'hash'")?
        .exists([])?;
    if !has_hash {
        conn.execute_batch(
            "ALTER TABLE _changelog ADD COLUMN hash TEXT NOT NULL DEFAULT '';
             ALTER TABLE _changelog ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';",
        )?;
    }
    if !conn
        .prepare("SELECT 1 FROM _changelog WHERE hash = '' LIMIT 1")?
        .exists([])?
    {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let mut prev = String::new();
        let rows: Vec<OldRow> = conn
            .prepare("SELECT version, schema_hash, schema, changeset, hash FROM _changelog ORDER BY version")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (version, schema_hash, schema, changeset, hash) in rows {
            if hash.is_empty() {
                let h = entry_hash(&prev, version, &schema_hash, schema.as_deref(), &changeset);
                conn.execute(
                    "UPDATE _changelog SET hash = ?1, prev_hash = ?2 WHERE version = ?3",
                    params![h, prev, version],
                )?;
                prev = h;
            } else {
                prev = hash;
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// The hash of the history up to `version`: the hash of entry `version`, or the `prev_hash` of
/// entry `version + 1` when `version` itself was pruned. `None` when the log cannot tell
/// (version 0, or an entry written before entries were chained).
pub fn position_hash(conn: &Connection, version: i64) -> rusqlite::Result<Option<String>> {
    if version <= 0 {
        return Ok(None);
    }
    let at: Option<String> = conn
        .prepare_cached("SELECT hash FROM _changelog WHERE version = ?1")?
        .query_row([version], |r| r.get(0))
        .optional()?;
    let h = match at {
        Some(h) => Some(h),
        None => conn
            .prepare_cached("SELECT prev_hash FROM _changelog WHERE version = ?1")?
            .query_row([version + 1], |r| r.get(0))
            .optional()?,
    };
    Ok(h.filter(|h: &String| !h.is_empty()))
}

/// Records every write transaction of one database.
pub struct ChangeRecorder {
    /// Schema hash of the committed database; recomputed only when `PRAGMA schema_version`
    /// moved. A mutex because the trait is shared, though only the writer thread takes it.
    schema_hash: Arc<Mutex<String>>,
    /// The hash a transaction in flight changed the schema to; it becomes `schema_hash` only
    /// when that transaction commits.
    pending_hash: Arc<Mutex<Option<String>>>,
    /// The database's uid and newest committed version with its chained hash (its position);
    /// the entry of the transaction in flight becomes `head` only when it commits.
    uid: Mutex<String>,
    head: Mutex<(i64, String)>,
    pending_head: Arc<Mutex<Option<(i64, String)>>>,
    /// Where a commit is published for streaming replicas, with the database's name.
    feed: Option<(String, Arc<CommitFeed>)>,
    /// Where a commit's changeset goes for realtime clients, with the database's name, and
    /// the changeset of the transaction in flight.
    events: Option<(String, Arc<Hub>)>,
    pending_events: Arc<Mutex<Option<Vec<u8>>>>,
    /// Webhook deliveries are queued in the transaction of their change (master only).
    webhooks: Option<Arc<Emitter>>,
    queued: Arc<std::sync::atomic::AtomicBool>,
    /// The preupdate-hook capture set on the writer connection in `init`.
    rows: Arc<RowLog>,
}

impl ChangeRecorder {
    pub fn new() -> Arc<Self> {
        Self::build(None, None, None)
    }

    /// A recorder that publishes every commit of database `db` to `feed`, and its changes to
    /// the realtime `hub`.
    pub fn publishing(db: &str, feed: Arc<CommitFeed>, hub: Arc<Hub>, webhooks: Option<Arc<Emitter>>) -> Arc<Self> {
        Self::build(Some((db.to_string(), feed)), Some((db.to_string(), hub)), webhooks)
    }

    fn build(
        feed: Option<(String, Arc<CommitFeed>)>,
        events: Option<(String, Arc<Hub>)>,
        webhooks: Option<Arc<Emitter>>,
    ) -> Arc<Self> {
        Arc::new(ChangeRecorder {
            schema_hash: Arc::new(Mutex::new(String::new())),
            pending_hash: Arc::new(Mutex::new(None)),
            uid: Mutex::new(String::new()),
            head: Mutex::new((0, String::new())),
            pending_head: Arc::new(Mutex::new(None)),
            feed,
            events,
            pending_events: Arc::new(Mutex::new(None)),
            webhooks,
            queued: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            rows: Arc::new(RowLog::default()),
        })
    }
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA schema_version")?
        .query_row([], |r| r.get(0))
}

impl Recorder for ChangeRecorder {
    fn init(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        self.rows.install(conn)?;
        conn.execute_batch(CHANGELOG_DDL)?;
        chain_old_entries(conn)?;
        conn.execute(
            "INSERT OR IGNORE INTO _replica_origin (key, value) VALUES ('uid', ?1)",
            [crate::util::random_id(20)],
        )?;
        let h = schema::hash(&schema::objects(conn)?);
        if let Ok(mut cur) = self.schema_hash.lock() {
            *cur = h;
        }
        if let Ok(mut uid) = self.uid.lock() {
            *uid = database_uid(conn)?;
        }
        let head = bounds(conn)?.1;
        let hash = position_hash(conn, head)?.unwrap_or_default();
        if let Ok(mut h) = self.head.lock() {
            *h = (head, hash);
        }
        Ok(())
    }

    fn position(&self) -> Option<(String, i64, String)> {
        let uid = self.uid.lock().ok()?.clone();
        let (version, hash) = self.head.lock().ok()?.clone();
        Some((uid, version, hash))
    }

    fn begin<'c>(&self, conn: &'c Connection) -> rusqlite::Result<Box<dyn TxRecording + 'c>> {
        let version = schema_version(conn)?;
        if let Ok(mut p) = self.pending_hash.lock() {
            *p = None;
        }
        if let Ok(mut p) = self.pending_head.lock() {
            *p = None;
        }
        if let Ok(mut p) = self.pending_events.lock() {
            *p = None;
        }
        // Realtime clients get this transaction's changes only if they are connected now.
        let events = self
            .events
            .as_ref()
            .filter(|(db, hub)| hub.watching(db))
            .map(|_| self.pending_events.clone());
        self.queued.store(false, std::sync::atomic::Ordering::Relaxed);
        self.rows.start();
        Ok(Box::new(Recording {
            webhooks: self.webhooks.clone().map(|w| (w, self.queued.clone())),
            events,
            rows: self.rows.clone(),
            schema_version: version,
            schema_hash: self.schema_hash.clone(),
            pending_hash: self.pending_hash.clone(),
            pending_head: self.pending_head.clone(),
        }))
    }

    fn finished(&self, committed: bool) {
        self.rows.stop();
        let entry = self.pending_head.lock().ok().and_then(|mut p| p.take());
        let version = entry.as_ref().map_or(0, |e| e.0);
        if let (true, Some(entry)) = (committed, entry) {
            if let Ok(mut h) = self.head.lock() {
                *h = entry;
            }
        }
        let pending = self.pending_hash.lock().ok().and_then(|mut p| p.take());
        if let (true, Some(h)) = (committed, pending) {
            if let Ok(mut cur) = self.schema_hash.lock() {
                *cur = h;
            }
        }
        // Published last: a woken replica must find the new head and its entry.
        if let (true, Some((db, feed))) = (committed && version > 0, &self.feed) {
            feed.committed(db);
        }
        if committed && self.queued.swap(false, std::sync::atomic::Ordering::Relaxed) {
            if let Some(w) = &self.webhooks {
                w.hooks.queued(&w.db);
            }
        }
        let changes = self.pending_events.lock().ok().and_then(|mut p| p.take());
        if let (true, Some(cs), Some((db, hub))) = (committed, changes, &self.events) {
            hub.publish(db, cs);
        }
    }
}

struct Recording {
    rows: Arc<RowLog>,
    /// Where the changeset goes for realtime clients, when some are connected.
    events: Option<Arc<Mutex<Option<Vec<u8>>>>>,
    /// The webhook queue of this database, and the flag that this transaction queued some.
    webhooks: Option<(Arc<Emitter>, Arc<std::sync::atomic::AtomicBool>)>,
    schema_version: i64,
    schema_hash: Arc<Mutex<String>>,
    pending_hash: Arc<Mutex<Option<String>>>,
    pending_head: Arc<Mutex<Option<(i64, String)>>>,
}

impl TxRecording for Recording {
    fn before_commit(self: Box<Self>, conn: &Connection) -> rusqlite::Result<()> {
        let Recording {
            rows,
            webhooks,
            events,
            schema_version: before,
            schema_hash,
            pending_hash,
            pending_head,
        } = *self;
        let version_now = schema_version(conn)?;
        // Realtime events get every column of an updated row (see `RowLog::changesets`).
        let (changeset, for_events) = rows.changesets(conn, version_now, events.is_some())?;
        if changeset.len() > MAX_ENTRY_BYTES {
            log::warn!(
                "refused a transaction of {} MiB of changes",
                changeset.len() / (1024 * 1024)
            );
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_TOOBIG),
                Some(TOO_LARGE.into()),
            ));
        }
        let schema_changed = version_now != before;
        if let Some((emitter, queued)) = webhooks.filter(|(e, _)| !changeset.is_empty() && e.active()) {
            if emitter.enqueue(conn, &changeset)? > 0 {
                queued.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if changeset.is_empty() && !schema_changed {
            return Ok(());
        }
        let (hash, schema_json) = if schema_changed {
            let objects = schema::objects(conn)?;
            let h = schema::hash(&objects);
            *pending_hash.lock().map_err(|_| rusqlite::Error::InvalidQuery)? = Some(h.clone());
            // Serializing plain strings cannot fail.
            (h, Some(serde_json::to_string(&objects).unwrap_or_default()))
        } else {
            let h = schema_hash.lock().map_err(|_| rusqlite::Error::InvalidQuery)?.clone();
            (h, None)
        };
        let (version, prev): (i64, String) = conn
            .prepare_cached(
                "SELECT COALESCE(MAX(version), 0) + 1,
                        COALESCE((SELECT hash FROM _changelog ORDER BY version DESC LIMIT 1), '')
                 FROM _changelog",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let entry = entry_hash(&prev, version, &hash, schema_json.as_deref(), &changeset);
        conn.prepare_cached(
            "INSERT INTO _changelog (version, schema_hash, schema, changeset, created, hash, prev_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            version,
            hash,
            schema_json,
            changeset,
            crate::util::unix_millis(),
            entry,
            prev
        ])?;
        *pending_head.lock().map_err(|_| rusqlite::Error::InvalidQuery)? = Some((version, entry));
        if let Some(slot) = events {
            if let Ok(mut p) = slot.lock() {
                *p = Some(for_events.unwrap_or(changeset));
            }
        }
        Ok(())
    }
}

/// `(oldest kept version, newest version)`; `(0, 0)` for an empty log.
pub fn bounds(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(
        "SELECT COALESCE(MIN(version), 0), COALESCE(MAX(version), 0) FROM _changelog",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Whether a replica at `since` can continue from this log: every entry after `since` is kept.
pub fn can_resume(since: i64, min: i64, head: i64) -> bool {
    since >= 0 && since <= head && (head == 0 || since >= min - 1)
}

/// Entries with `version > since`, in order, at most `limit` of them and about `max_bytes` of
/// changesets (always at least one entry when there is one).
pub fn entries_since(conn: &Connection, since: i64, limit: usize, max_bytes: usize) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, schema_hash, schema, changeset, created, hash, prev_hash FROM _changelog
         WHERE version > ?1 ORDER BY version LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![since, limit as i64])?;
    let mut out = Vec::new();
    let mut bytes = 0;
    while let Some(r) = rows.next()? {
        let schema: Option<String> = r.get(2)?;
        let changeset: Vec<u8> = r.get(3)?;
        bytes += changeset.len();
        out.push(Entry {
            version: r.get(0)?,
            schema_hash: r.get(1)?,
            schema: schema.and_then(|s| serde_json::from_str(&s).ok()),
            changeset,
            created: r.get(4)?,
            hash: r.get(5)?,
            prev_hash: r.get(6)?,
        });
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// The version stored in a database file's own changelog (a snapshot's position).
pub fn head(conn: &Connection) -> rusqlite::Result<i64> {
    if !crate::db::table_exists(conn, "_changelog")? {
        return Ok(0);
    }
    Ok(bounds(conn)?.1)
}

/// Deletes entries committed before `cutoff_ms`, always keeping the newest (it carries the
/// head version). Runs on the writer; the session never records `_changelog`.
pub fn prune(conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM _changelog WHERE created < ?1 AND version < (SELECT MAX(version) FROM _changelog)",
        [cutoff_ms],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolled_back_schema_change_leaves_the_cached_hash_alone() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL)")
            .unwrap();
        let r = ChangeRecorder::new();
        r.init(&mut conn).unwrap();
        let committed = schema::hash(&schema::objects(&conn).unwrap());
        // A schema change whose COMMIT fails after before_commit ran.
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let tx = r.begin(&conn).unwrap();
        conn.execute_batch("CREATE TABLE b (id TEXT PRIMARY KEY NOT NULL)")
            .unwrap();
        tx.before_commit(&conn).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        r.finished(false);
        // The next transaction changes only data: its entry carries the committed schema's hash.
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let tx = r.begin(&conn).unwrap();
        conn.execute_batch("INSERT INTO a VALUES ('x')").unwrap();
        tx.before_commit(&conn).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        r.finished(true);
        let e = entries_since(&conn, 0, 10, 1 << 20).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].schema_hash, committed);
    }

    #[test]
    fn entries_chain_and_old_logs_get_their_hashes() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL)")
            .unwrap();
        // A log from before the chain: no hash columns, two entries.
        conn.execute_batch(
            "CREATE TABLE _changelog (version INTEGER PRIMARY KEY NOT NULL, schema_hash TEXT NOT NULL,
                 schema TEXT, changeset BLOB NOT NULL, created INTEGER NOT NULL);
             INSERT INTO _changelog VALUES (1, 'h', NULL, x'01', 0), (2, 'h', NULL, x'02', 0);",
        )
        .unwrap();
        let r = ChangeRecorder::new();
        r.init(&mut conn).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let tx = r.begin(&conn).unwrap();
        conn.execute_batch("INSERT INTO a VALUES ('x')").unwrap();
        tx.before_commit(&conn).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        let e = entries_since(&conn, 0, 10, 1 << 20).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].prev_hash, "");
        for w in e.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash, "version {}", w[1].version);
        }
        assert_eq!(e[0].hash, entry_hash("", 1, "h", None, &[1]));
        assert_eq!(position_hash(&conn, 3).unwrap().as_deref(), Some(e[2].hash.as_str()));
        conn.execute_batch("DELETE FROM _changelog WHERE version = 1").unwrap();
        assert_eq!(
            position_hash(&conn, 1).unwrap().as_deref(),
            Some(e[0].hash.as_str()),
            "from the next entry"
        );
        assert_eq!(position_hash(&conn, 0).unwrap(), None);
    }

    #[test]
    fn resume_rules() {
        use super::can_resume;
        assert!(can_resume(0, 0, 0), "empty log, fresh replica");
        assert!(can_resume(0, 1, 5));
        assert!(can_resume(4, 5, 9), "entry 5 is the next one and is kept");
        assert!(!can_resume(3, 5, 9), "entry 4 was pruned");
        assert!(!can_resume(10, 1, 9), "replica ahead of the master");
        assert!(can_resume(9, 9, 9));
    }
}
