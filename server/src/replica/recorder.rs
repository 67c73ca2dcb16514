//! Master-side recording: a SQLite session on every write transaction of a replicated
//! database, and the `_changelog` its changesets are appended to before COMMIT.
//!
//! Architecture invariant: a change and its changelog entry commit together or not at all.
//! Versions are assigned inside the write transaction as `MAX(version) + 1`, on the database's
//! single writer, so they are gap-free and strictly increasing; a transaction that changes
//! nothing (all its jobs failed, or it only touched local tables) gets no entry.

use std::sync::{Arc, Mutex};

use rusqlite::session::Session;
use rusqlite::{Connection, OptionalExtension, params};

use super::is_local_table;
use super::schema::{self, SchemaObject};
use crate::db::writer::{Recorder, TxRecording};

const CHANGELOG_DDL: &str = "CREATE TABLE IF NOT EXISTS _changelog (
    version INTEGER PRIMARY KEY NOT NULL,
    schema_hash TEXT NOT NULL,
    schema TEXT,
    changeset BLOB NOT NULL,
    created INTEGER NOT NULL
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
}

/// Records every write transaction of one database.
pub struct ChangeRecorder {
    /// Schema hash of the committed database; recomputed only when `PRAGMA schema_version`
    /// moved. A mutex because the trait is shared, though only the writer thread takes it.
    schema_hash: Arc<Mutex<String>>,
    /// The hash a transaction in flight changed the schema to; it becomes `schema_hash` only
    /// when that transaction commits.
    pending_hash: Arc<Mutex<Option<String>>>,
}

impl ChangeRecorder {
    pub fn new() -> Arc<Self> {
        Arc::new(ChangeRecorder {
            schema_hash: Arc::new(Mutex::new(String::new())),
            pending_hash: Arc::new(Mutex::new(None)),
        })
    }
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA schema_version")?
        .query_row([], |r| r.get(0))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Recorder for ChangeRecorder {
    fn init(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(CHANGELOG_DDL)?;
        conn.execute(
            "INSERT OR IGNORE INTO _replica_origin (key, value) VALUES ('uid', ?1)",
            [crate::util::random_id(20)],
        )?;
        let h = schema::hash(&schema::objects(conn)?);
        if let Ok(mut cur) = self.schema_hash.lock() {
            *cur = h;
        }
        Ok(())
    }

    fn begin<'c>(&self, conn: &'c Connection) -> rusqlite::Result<Box<dyn TxRecording + 'c>> {
        let version = schema_version(conn)?;
        let mut session = Session::new(conn)?;
        session.table_filter(Some(|t: &str| !is_local_table(t)));
        session.attach(None::<&str>)?;
        if let Ok(mut p) = self.pending_hash.lock() {
            *p = None;
        }
        Ok(Box::new(Recording {
            session,
            schema_version: version,
            schema_hash: self.schema_hash.clone(),
            pending_hash: self.pending_hash.clone(),
        }))
    }

    fn finished(&self, committed: bool) {
        let pending = self.pending_hash.lock().ok().and_then(|mut p| p.take());
        if let (true, Some(h)) = (committed, pending) {
            if let Ok(mut cur) = self.schema_hash.lock() {
                *cur = h;
            }
        }
    }
}

struct Recording<'c> {
    session: Session<'c>,
    schema_version: i64,
    schema_hash: Arc<Mutex<String>>,
    pending_hash: Arc<Mutex<Option<String>>>,
}

impl TxRecording for Recording<'_> {
    fn before_commit(self: Box<Self>, conn: &Connection) -> rusqlite::Result<()> {
        let Recording {
            mut session,
            schema_version: before,
            schema_hash,
            pending_hash,
        } = *self;
        let mut changeset = Vec::new();
        session.changeset_strm(&mut changeset)?;
        drop(session);
        let schema_changed = schema_version(conn)? != before;
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
        conn.prepare_cached(
            "INSERT INTO _changelog (version, schema_hash, schema, changeset, created)
             VALUES ((SELECT COALESCE(MAX(version), 0) + 1 FROM _changelog), ?1, ?2, ?3, ?4)",
        )?
        .execute(params![hash, schema_json, changeset, now_ms()])?;
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
        "SELECT version, schema_hash, schema, changeset, created FROM _changelog
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
        });
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// The version stored in a database file's own changelog (a snapshot's position).
pub fn head(conn: &Connection) -> rusqlite::Result<i64> {
    let has = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_changelog'",
            [],
            |_| Ok(()),
        )
        .optional()?;
    if has.is_none() {
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
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL)")
            .unwrap();
        let r = ChangeRecorder::new();
        r.init(&conn).unwrap();
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
