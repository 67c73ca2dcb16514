//! A small pool of read-only connections to one database file.
//!
//! Reads run on tokio's blocking threads with a connection checked out for the duration of
//! one closure, so no connection is ever held across an `.await`. A semaphore bounds how many
//! connections exist; idle ones are kept for reuse.
//!
//! Architecture invariant: a read never sees a state older than the database's generation at
//! its start. [`ReadPool::read_now`] (a record by key) keeps its connection's read transaction
//! open between reads while nothing committed: beginning and ending a WAL read transaction
//! takes two file locks and a process-wide mutex in SQLite, which were a sixth of a view's CPU.
//! The transaction is ended and begun again as soon as the generation moved, so a read that
//! starts after a write was acknowledged always sees it. Idle connections end their snapshots
//! before every checkpoint ([`ReadPool::release_snapshots`]), so they never keep the WAL from
//! being copied and started over.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;
use tokio::sync::Semaphore;

use crate::error::{ApiError, ApiResult};

/// An idle connection, with the generation its open read transaction began at (`None`: no
/// transaction is open).
struct Idle {
    conn: Connection,
    snapshot: Option<u64>,
}

pub struct ReadPool {
    path: PathBuf,
    /// Idle connections. A plain mutex: it is held to push or pop, and to end stale read
    /// transactions, never during a query.
    idle: Mutex<Vec<Idle>>,
    /// One permit per connection that may exist at once.
    permits: Semaphore,
    /// The database's generation (see `Database::generation`).
    generation: Arc<AtomicU64>,
}

impl ReadPool {
    pub fn new(path: PathBuf, size: u32, generation: Arc<AtomicU64>) -> Self {
        ReadPool {
            path,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size as usize),
            generation,
        }
    }

    /// Runs `f` with a read connection on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> ApiResult<T> + Send + 'static,
    {
        let (_permit, mut idle) = self.checkout().await?;
        // The closure starts in autocommit: it may open its own transaction.
        end_snapshot(&mut idle)?;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let r = f(&idle.conn);
            (idle.conn, r)
        })
        .await
        .map_err(|e| ApiError::internal("read task", e.to_string()))?;
        let mut idle = Idle { conn, snapshot: None };
        // A transaction the closure left open is no snapshot of a known generation.
        if end_snapshot(&mut idle).is_ok() {
            self.idle.lock().map_err(poisoned)?.push(idle);
        }
        result
    }

    /// Runs `f` with a read connection on the calling thread, without a hand-off to the
    /// blocking pool: for reads that take microseconds (a record by primary key), where moving
    /// to another thread and back costs more than the query. Never for scans.
    pub async fn read_now<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce(&Connection) -> ApiResult<T>,
    {
        let (_permit, mut idle) = self.checkout().await?;
        let now = self.generation.load(Ordering::Acquire);
        if idle.snapshot != Some(now) {
            end_snapshot(&mut idle)?;
            // Deferred: the snapshot is taken by the first read, after `now` was loaded, so it
            // is at least as new as `now`.
            idle.conn.execute_batch("BEGIN")?;
            idle.snapshot = Some(now);
        }
        let result = f(&idle.conn);
        if idle.conn.is_autocommit() {
            idle.snapshot = None;
        }
        self.idle.lock().map_err(poisoned)?.push(idle);
        result
    }

    /// Ends the read transactions of every idle connection, before a checkpoint. Stale ones
    /// would keep it from copying the WAL past them; current ones (taken after the last commit
    /// but before this checkpoint) would keep it from finishing, and an unfinished WAL never
    /// starts over: under steady writes and views it would grow without bound.
    pub fn release_snapshots(&self) {
        let Ok(mut idle) = self.idle.lock() else { return };
        // A connection whose transaction cannot end is dropped (closing ends it).
        idle.retain_mut(|i| end_snapshot(i).is_ok());
    }

    /// A permit and an idle connection (or a new one); the caller pushes the connection back
    /// to `idle` before dropping the permit.
    async fn checkout(&self) -> ApiResult<(tokio::sync::SemaphorePermit<'_>, Idle)> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ApiError::internal("read pool", "database is closed"))?;
        let idle = match self.idle.lock().map_err(poisoned)?.pop() {
            Some(i) => i,
            None => Idle {
                conn: super::open_connection(&self.path, true)?,
                snapshot: None,
            },
        };
        Ok((permit, idle))
    }

    /// Closes every idle connection and refuses new reads.
    pub fn close(&self) {
        self.permits.close();
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

/// Ends the connection's open read transaction, if any.
fn end_snapshot(idle: &mut Idle) -> rusqlite::Result<()> {
    idle.snapshot = None;
    if !idle.conn.is_autocommit() {
        idle.conn.execute_batch("COMMIT")?;
    }
    Ok(())
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> ApiError {
    ApiError::internal("read pool", "lock poisoned")
}

#[cfg(test)]
mod tests {
    use super::super::Database;

    fn value(conn: &rusqlite::Connection) -> crate::error::ApiResult<i64> {
        Ok(conn.query_row("SELECT v FROM t", [], |r| r.get(0))?)
    }

    #[tokio::test]
    async fn a_read_after_an_acknowledged_write_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open("a", dir.path().join("a.db"), 4, None).unwrap();
        db.write(|c| Ok(c.execute_batch("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (0);")?))
            .await
            .unwrap();
        for i in 1..=50 {
            // Twice at the same generation: the second read reuses the first one's snapshot.
            assert_eq!(db.read_now(value).await.unwrap(), i - 1);
            assert_eq!(db.read_now(value).await.unwrap(), i - 1);
            db.write(move |c| Ok(c.execute("UPDATE t SET v = ?1", [i]).map(|_| ())?))
                .await
                .unwrap();
            assert_eq!(db.read_now(value).await.unwrap(), i, "a read after write {i}");
            assert_eq!(db.read(value).await.unwrap(), i);
        }
        db.close();
    }

    /// A database with table `t (v BLOB)` holding one row, and the path of its file.
    async fn blob_table(dir: &tempfile::TempDir) -> (std::path::PathBuf, std::sync::Arc<Database>) {
        let path = dir.path().join("b.db");
        let db = Database::open("b", path.clone(), 4, None).unwrap();
        db.write(|c| Ok(c.execute_batch("CREATE TABLE t (v BLOB); INSERT INTO t VALUES (0);")?))
            .await
            .unwrap();
        (path, db)
    }

    /// Commits one 4 KB row: about three WAL frames.
    async fn add_blob(db: &Database) {
        db.write(|c| Ok(c.execute("INSERT INTO t VALUES (randomblob(4000))", []).map(|_| ())?))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_idle_snapshot_does_not_hold_back_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (path, db) = blob_table(&dir).await;
        // Leaves an idle connection with its read transaction open at this generation.
        db.read_now(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))?))
            .await
            .unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        for _ in 0..600 {
            add_blob(&db).await;
        }
        // No read since: only the checkpointer can end that transaction, or the WAL's pages
        // never reach the file. Three frames a commit (a new leaf, its parent, page 1 with the
        // file's size): the first 1,000 frames hold about 333 rows' pages.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::metadata(&path).unwrap().len() < before + 250 * 4096 {
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpoint never got past the idle snapshot"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        db.close();
    }

    #[tokio::test]
    async fn the_wal_stays_bounded_under_writes_and_views() {
        let dir = tempfile::tempdir().unwrap();
        let (path, db) = blob_table(&dir).await;
        let wal = std::path::PathBuf::from(format!("{}-wal", path.display()));
        let mut most = 0;
        // About 12,000 frames: three times the WAL's bound, with a view after every write.
        for _ in 0..4000 {
            add_blob(&db).await;
            db.read_now(|c| Ok(c.query_row("SELECT length(v) FROM t WHERE rowid = 1", [], |r| r.get::<_, i64>(0))?))
                .await
                .unwrap();
            most = most.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        db.close();
        let frames = most / (4096 + 24);
        let bound = super::super::checkpoint::INLINE_FRAMES as u64;
        assert!(frames <= bound + 10, "the WAL grew to {frames} frames");
    }
}
