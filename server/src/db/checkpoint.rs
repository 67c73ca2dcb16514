//! Checkpoints off the writer's path.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past 1,000 frames:
//! that commit copies the frames into the database file and fsyncs both files before the
//! writer can answer its callers or start the next transaction. Here the writer connection's
//! WAL hook wakes a thread of the database's own instead, which runs the same PASSIVE
//! checkpoint on its own connection while the writer goes on committing.
//!
//! Architecture invariants:
//! - The checkpointer's connection never writes a row. It only copies committed WAL frames into
//!   the database file, as any SQLite connection may; the recorder still sees every change.
//! - The WAL stays bounded. A PASSIVE checkpoint waits for no one, so under constant writes
//!   the background one may never catch up; once the WAL holds [`INLINE_FRAMES`], the writer
//!   checkpoints at its own commits, as SQLite's automatic checkpoint does, after waiting for
//!   a background checkpoint that is running. Idle read snapshots end before every checkpoint
//!   (see `pool.rs`). A slow, failing or stopped checkpointer costs speed, never an unbounded
//!   WAL.
//! - SQLite starts the WAL over only at a write that finds every frame copied, which a
//!   background checkpoint never leaves behind while commits keep coming: the writer appends
//!   during the copy. So past [`RESTART_FRAMES`] the thread chases the writer, and once it is
//!   within [`CLOSE_FRAMES`] the writer copies those last frames itself (if no background
//!   checkpoint is running), and the next commit starts the WAL over. The writer's share of
//!   the copying stays small instead of being everything since the thread's last wake-up.
//! - A commit is never reported failed because of a checkpoint: the hook swallows checkpoint
//!   errors (SQLite would otherwise fail the statement of a transaction that did commit).

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, ErrorCode};

use super::pool::ReadPool;

/// WAL frames after which the background thread checkpoints (SQLite's automatic default).
pub const BACKGROUND_FRAMES: c_int = 1000;
/// WAL frames after which the writer checkpoints at its own commits.
pub const INLINE_FRAMES: c_int = 4 * BACKGROUND_FRAMES;
/// WAL frames after which the thread chases the writer and the writer finishes its copy.
pub const RESTART_FRAMES: c_int = 2 * BACKGROUND_FRAMES;
/// Frames the background copy may lag behind for the writer to finish it.
pub const CLOSE_FRAMES: c_int = 256;

/// The background checkpointer of one database, started at its first full WAL.
pub struct Checkpointer {
    name: String,
    path: PathBuf,
    /// Frames of the WAL the last background checkpoint had copied. Smaller than the WAL's
    /// frame count: the copy is that far behind. Larger: the WAL has since started over.
    copied: Arc<AtomicI32>,
    /// The thread's wake-up and handle, once started.
    thread: Mutex<Option<(SyncSender<()>, JoinHandle<()>)>>,
    closed: AtomicBool,
    /// The database's read connections, whose idle snapshots end before a checkpoint.
    readers: Arc<ReadPool>,
    /// Held for every checkpoint: the writer's own waits for the thread's to finish instead of
    /// failing with SQLITE_BUSY while the WAL keeps growing.
    gate: Arc<Mutex<()>>,
    /// The WAL's frames at the writer's last checkpoint: a WAL that did not start over after
    /// it (a reader was in the way) is not finished again before another [`BACKGROUND_FRAMES`].
    finished_at: AtomicI32,
}

impl Checkpointer {
    pub fn new(name: &str, path: PathBuf, readers: Arc<ReadPool>) -> Arc<Self> {
        Arc::new(Checkpointer {
            name: name.to_string(),
            path,
            copied: Arc::new(AtomicI32::new(0)),
            thread: Mutex::new(None),
            closed: AtomicBool::new(false),
            readers,
            gate: Arc::new(Mutex::new(())),
            finished_at: AtomicI32::new(0),
        })
    }

    /// Replaces SQLite's automatic checkpoint on the writer connection `conn` with this one.
    pub fn install(self: &Arc<Self>, conn: &mut Connection) -> rusqlite::Result<()> {
        let me = self.clone();
        conn.wal_hook(Some(move |wal: &mut Wal, frames: c_int| {
            me.committed(wal, frames);
            Ok(())
        }))
    }

    /// Called by the writer after each commit, with the frames now in the WAL.
    fn committed(&self, wal: &mut Wal, frames: c_int) {
        if frames >= INLINE_FRAMES {
            // Waits for a checkpoint of the thread's that is running (at most one).
            let gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            self.checkpoint_here(wal, frames, gate);
            return;
        }
        // A count larger than the WAL is that of a WAL that has since started over: none of
        // this one is copied.
        let copied = self.copied.load(Ordering::Relaxed);
        let behind = if copied > frames { frames } else { frames - copied };
        let finished_at = self.finished_at.load(Ordering::Relaxed);
        let again = finished_at > frames || frames - finished_at >= BACKGROUND_FRAMES;
        if frames >= RESTART_FRAMES && behind <= CLOSE_FRAMES && again {
            // A running background checkpoint is not waited for: it is the one catching up.
            if let Ok(gate) = self.gate.try_lock() {
                self.checkpoint_here(wal, frames, gate);
                return;
            }
        }
        let every = if frames >= RESTART_FRAMES {
            CLOSE_FRAMES
        } else {
            BACKGROUND_FRAMES
        };
        if frames >= BACKGROUND_FRAMES && behind >= every {
            self.wake();
        }
    }

    /// The writer's own checkpoint, under the gate.
    fn checkpoint_here(&self, wal: &mut Wal, frames: c_int, _gate: std::sync::MutexGuard<'_, ()>) {
        self.finished_at.store(frames, Ordering::Relaxed);
        self.readers.release_snapshots();
        // SQLITE_BUSY only when another process checkpoints: the next commit tries again.
        if let Err(e) = wal.checkpoint() {
            if e.sqlite_error_code() != Some(ErrorCode::DatabaseBusy) {
                log::warn!("checkpoint of '{}' at commit: {e}", self.name);
            }
        }
    }

    fn wake(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut thread) = self.thread.lock() else { return };
        if thread.is_none() {
            let (tx, rx) = sync_channel(1);
            let (name, path, copied) = (self.name.clone(), self.path.clone(), self.copied.clone());
            let (readers, gate) = (self.readers.clone(), self.gate.clone());
            match std::thread::Builder::new()
                .name(format!("ckpt-{}", self.name))
                .spawn(move || run(&name, path, rx, &copied, &readers, &gate))
            {
                Ok(handle) => *thread = Some((tx, handle)),
                Err(e) => log::warn!("starting the checkpointer of '{}': {e}", self.name),
            }
        }
        if let Some((tx, _)) = thread.as_ref() {
            // Full: a wake-up is already pending, and one is enough.
            let _ = tx.try_send(());
        }
    }

    /// Stops the thread after the checkpoint it is running, and closes its connection. From
    /// then on only the writer checkpoints (at [`INLINE_FRAMES`]).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some((tx, handle)) = thread {
            drop(tx);
            if handle.join().is_err() {
                log::error!("checkpointer of '{}' panicked", self.name);
            }
        }
    }
}

/// The checkpointer thread: a PASSIVE checkpoint per wake-up, on a connection of its own.
fn run(name: &str, path: PathBuf, rx: Receiver<()>, copied: &AtomicI32, readers: &ReadPool, gate: &Mutex<()>) {
    let mut conn: Option<Connection> = None;
    while rx.recv().is_ok() {
        if conn.is_none() {
            match super::open_connection(&path, false) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    log::warn!("opening '{name}' to checkpoint it: {e}");
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let _gate = gate.lock().unwrap_or_else(|e| e.into_inner());
        readers.release_snapshots();
        match c.wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::PASSIVE) {
            Ok((_, done)) => copied.store(done, Ordering::Relaxed),
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => {}
            Err(e) => log::warn!("checkpoint of '{name}': {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer connection to a new database with table `t`, and its checkpointer.
    fn writer(dir: &tempfile::TempDir) -> (PathBuf, Connection, Arc<Checkpointer>) {
        let path = dir.path().join("a.db");
        let mut conn = super::super::open_connection(&path, false).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(())).unwrap();
        conn.execute_batch("CREATE TABLE t (v BLOB)").unwrap();
        let readers = Arc::new(ReadPool::new(
            path.clone(),
            4,
            Arc::new(std::sync::atomic::AtomicU64::new(1)),
        ));
        let ckpt = Checkpointer::new("a", path.clone(), readers);
        ckpt.install(&mut conn).unwrap();
        (path, conn, ckpt)
    }

    /// Commits `n` transactions of one 4 KiB row each (a few WAL frames apiece).
    fn commit(conn: &Connection, n: usize) {
        for _ in 0..n {
            conn.execute("INSERT INTO t (v) VALUES (randomblob(4000))", []).unwrap();
        }
    }

    fn wal_frames(path: &std::path::Path) -> u64 {
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        std::fs::metadata(wal)
            .map(|m| m.len().saturating_sub(32) / (4096 + 24))
            .unwrap_or(0)
    }

    #[test]
    fn a_full_wal_is_copied_by_the_background_thread_without_another_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn, ckpt) = writer(&dir);
        let before = std::fs::metadata(&path).unwrap().len();
        // Past BACKGROUND_FRAMES and well under INLINE_FRAMES: only the thread may copy.
        commit(&conn, 600);
        assert!(wal_frames(&path) >= BACKGROUND_FRAMES as u64);
        assert!(wal_frames(&path) < INLINE_FRAMES as u64);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        // Three frames a commit (a new leaf, its parent, page 1 with the file's size): the
        // first 1,000 frames hold about 333 rows' pages.
        while std::fs::metadata(&path).unwrap().len() < before + 250 * 4096 {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file never received the WAL's pages"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        ckpt.close();
        let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 600);
    }

    #[test]
    fn without_the_thread_the_writer_keeps_the_wal_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn, ckpt) = writer(&dir);
        // Closed before the first wake-up: the thread never starts.
        ckpt.close();
        let mut most = 0;
        for _ in 0..20 {
            commit(&conn, 500);
            most = most.max(wal_frames(&path));
        }
        assert!(ckpt.thread.lock().unwrap().is_none());
        // Frames are reused after the WAL starts over, so the file is as large as it ever was.
        assert!(most <= INLINE_FRAMES as u64 + 10, "the WAL grew to {most} frames");
        let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 10_000);
    }

    #[test]
    fn the_writer_finishes_a_nearly_done_copy_so_the_wal_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn, ckpt) = writer(&dir);
        // No thread: this test copies the WAL the way it would.
        ckpt.close();
        commit(&conn, (RESTART_FRAMES / 3) as usize + 10);
        // The copy runs while the writer is in a transaction, as it does under constant writes:
        // the writer's next commit does not find the WAL fully copied, so SQLite does not start
        // it over by itself.
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        conn.execute("INSERT INTO t (v) VALUES (randomblob(4000))", []).unwrap();
        let other = super::super::open_connection(&path, false).unwrap();
        let (log, done) = other
            .wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::PASSIVE)
            .unwrap();
        assert_eq!(log, done, "the copy took every committed frame");
        assert!(done >= RESTART_FRAMES, "{done} frames");
        ckpt.copied.store(done, Ordering::Relaxed);
        // A few frames behind: this commit's checkpoint copies them, and the next one starts
        // the WAL over, so 600 more commits (1,800 frames) reuse its start.
        conn.execute_batch("COMMIT").unwrap();
        commit(&conn, 600);
        let most = wal_frames(&path);
        assert!(
            most <= done as u64 + 10,
            "the WAL grew to {most} frames after a copy of {done}"
        );
        let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, (RESTART_FRAMES / 3) as i64 + 10 + 1 + 600);
    }

    #[test]
    fn a_commit_never_fails_because_of_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn, ckpt) = writer(&dir);
        ckpt.close();
        // Another connection checkpoints without pause: the writer's own checkpoints, past
        // INLINE_FRAMES, keep finding SQLITE_BUSY.
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::spawn(move || {
                let other = super::super::open_connection(&path, false).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let _ = other.wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::PASSIVE);
                }
            })
        };
        for _ in 0..6000 {
            conn.execute("INSERT INTO t (v) VALUES (randomblob(4000))", [])
                .expect("a committed transaction reports success");
        }
        stop.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 6000);
    }
}
