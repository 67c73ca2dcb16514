//! The single writer of one database: a thread that owns the only read-write connection.
//!
//! Jobs arrive on a channel. The thread takes every job that is waiting (up to
//! [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE` transaction with a savepoint around
//! each, and commits once. A job that fails rolls back to its own savepoint and does not
//! affect the others; a failed COMMIT fails every job of the batch. Callers hear back only
//! after COMMIT returned, so an acknowledged write is a committed write.
//!
//! Grouping jobs is what makes the writer fast under concurrency (one commit for many
//! requests); running them on one thread is what makes versions of the replication log
//! gap-free and lets a [`Recorder`] see every change.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error::{ApiError, ApiResult};

/// Most jobs committed in one transaction. Bounds the memory a recorder's session holds.
pub const MAX_BATCH: usize = 256;
/// Most bytes of request data (the jobs' weights) gathered into one transaction: a batch of
/// large writes stays well under [`MAX_CHANGES_BYTES`] of changes.
pub const MAX_BATCH_WEIGHT: usize = 8 * 1024 * 1024;
/// The weight of a job that must run in a transaction of its own (bulk operations, schema
/// changes): it closes the batch before it and fills its own.
pub const ALONE: usize = usize::MAX;

type Output = Box<dyn Any + Send>;
type Run = Box<dyn FnOnce(&Connection) -> ApiResult<Output> + Send>;
type RunExclusive = Box<dyn FnOnce(&mut Connection) -> ApiResult<Output> + Send>;
type Reply = oneshot::Sender<ApiResult<Output>>;

/// What a job does: run inside the shared write transaction, or alone, outside any
/// transaction, with the connection to itself (a replica restoring a snapshot into the live
/// database with the backup API).
enum Work {
    InTransaction(Run),
    Exclusive(RunExclusive),
}

/// One unit of work for the writer: a closure and where to send its result.
pub struct Job {
    work: Work,
    reply: Reply,
    /// About how many bytes of data the job writes (its request body); [`ALONE`] for a job
    /// that gets a transaction of its own.
    weight: usize,
}

/// Observes every write transaction on the writer connection. The replication recorder
/// implements it to attach a SQLite session and append a changelog entry before COMMIT.
pub trait Recorder: Send + Sync + 'static {
    /// Called once on the writer connection when the database opens (create tables, warm
    /// caches, set hooks).
    fn init(&self, conn: &mut Connection) -> rusqlite::Result<()>;
    /// Called right after BEGIN, before the first job of the transaction.
    fn begin<'c>(&self, conn: &'c Connection) -> rusqlite::Result<Box<dyn TxRecording + 'c>>;
    /// Called once the transaction ended: `committed` after a successful COMMIT, otherwise
    /// after its rollback. State that describes the committed database (a cached schema hash)
    /// changes only here.
    fn finished(&self, committed: bool) {
        let _ = committed;
    }
    /// The database's position as of the last commit: its uid, its newest version and that
    /// version's chained hash.
    fn position(&self) -> Option<(String, i64, String)> {
        None
    }
}

/// The recorder's state for one transaction.
pub trait TxRecording {
    /// Called after the last job and before COMMIT, inside the same transaction. An error
    /// rolls the whole transaction back.
    fn before_commit(self: Box<Self>, conn: &Connection) -> rusqlite::Result<()>;
}

/// Sends `f` to the writer and waits for its committed result.
pub async fn submit<T, F>(tx: &mpsc::Sender<Job>, weight: usize, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> ApiResult<T> + Send + 'static,
{
    let run: Run = Box::new(move |conn| f(conn).map(|v| Box::new(v) as Output));
    send(tx, Work::InTransaction(run), weight).await
}

/// Sends `f` to the writer to run alone, outside any transaction and without the recorder.
pub async fn submit_exclusive<T, F>(tx: &mpsc::Sender<Job>, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> ApiResult<T> + Send + 'static,
{
    let run: RunExclusive = Box::new(move |conn| f(conn).map(|v| Box::new(v) as Output));
    send(tx, Work::Exclusive(run), ALONE).await
}

async fn send<T: 'static>(tx: &mpsc::Sender<Job>, work: Work, weight: usize) -> ApiResult<T> {
    let (reply, rx) = oneshot::channel();
    tx.send(Job { work, reply, weight })
        .await
        .map_err(|_| ApiError::internal("writer", "database is closed"))?;
    let out = rx
        .await
        .map_err(|_| ApiError::internal("writer", "writer thread stopped"))??;
    // The submitting function boxed a `T`, so the downcast cannot fail.
    Ok(*out.downcast::<T>().expect("writer output has the submitted type"))
}

/// The writer loop. Returns when every sender is dropped and the queue is drained.
/// `generation` is bumped after every COMMIT and every exclusive job, before any caller is
/// answered: a read that loads it afterwards sees the change (see `Database::generation`).
pub fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    recorder: Option<Arc<dyn Recorder>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
) {
    // An exclusive job that arrived while a batch was gathered; it runs right after the batch.
    let mut pending: Option<Job> = None;
    while let Some(first) = pending.take().or_else(|| rx.blocking_recv()) {
        let first_weight = first.weight;
        let first = match first.work {
            Work::Exclusive(run) => {
                let result = match catch_unwind(AssertUnwindSafe(|| run(&mut conn))) {
                    Ok(r) => r,
                    Err(_) => Err(ApiError::internal("writer", "exclusive job panicked")),
                };
                // It may have replaced the whole content (a snapshot restore).
                generation.fetch_add(1, std::sync::atomic::Ordering::Release);
                let _ = first.reply.send(result);
                continue;
            }
            Work::InTransaction(run) => (run, first.reply),
        };
        let mut batch = vec![first];
        let mut weight = first_weight;
        while batch.len() < MAX_BATCH && weight < MAX_BATCH_WEIGHT {
            match rx.try_recv() {
                Ok(Job {
                    work: Work::InTransaction(run),
                    reply,
                    weight: w,
                }) if w < MAX_BATCH_WEIGHT.saturating_sub(weight) => {
                    weight += w;
                    batch.push((run, reply));
                }
                // An exclusive job, a job that runs alone or one too heavy for this batch: it
                // starts the next one.
                Ok(job) => {
                    pending = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        run_batch(&conn, recorder.as_deref(), batch, &generation);
    }
    if let Err((_, e)) = conn.close() {
        log::warn!("closing writer connection: {e}");
    }
}

fn run_batch(
    conn: &Connection,
    recorder: Option<&dyn Recorder>,
    batch: Vec<(Run, Reply)>,
    generation: &std::sync::atomic::AtomicU64,
) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = e.to_string();
        for (_, reply) in batch {
            let _ = reply.send(Err(ApiError::internal("begin write transaction", msg.clone())));
        }
        return;
    }
    // A panicking recorder fails this batch, not the writer thread.
    let recording = match catch_unwind(AssertUnwindSafe(|| recorder.map(|r| r.begin(conn)).transpose())) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return abort(
                conn,
                batch.into_iter().map(|(_, reply)| reply).collect(),
                &format!("at the start of recording: {e}"),
            );
        }
        Err(_) => {
            return abort(
                conn,
                batch.into_iter().map(|(_, reply)| reply).collect(),
                "the recorder panicked at BEGIN",
            );
        }
    };

    let mut results = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let mut jobs = batch.into_iter();
    for (run, reply) in jobs.by_ref() {
        replies.push(reply);
        let (result, contained) = run_job(conn, run);
        results.push(result);
        if conn.is_autocommit() || !contained {
            // SQLite rolled the whole transaction back (I/O error, disk full, out of memory, or
            // a job that ended it): every job so far lost its changes, and a job run now would
            // commit on its own, without its changelog entry. Or a failed job's changes could
            // not be undone alone (its ROLLBACK TO failed): committing would publish half of a
            // job whose caller got an error. Fail the whole batch.
            let rolled_back = if conn.is_autocommit() {
                "the write transaction was rolled back"
            } else {
                "a failed job's changes could not be undone on their own"
            };
            let cause = match results.last() {
                Some(Err(e)) => format!("{rolled_back}: {e}"),
                _ => rolled_back.to_string(),
            };
            log::error!("{cause}; failing the {} jobs of the batch", replies.len() + jobs.len());
            drop(recording);
            if let Some(r) = recorder {
                r.finished(false);
            }
            replies.extend(jobs.map(|(_, reply)| reply));
            return abort(conn, replies, &cause);
        }
    }

    let finished = match recording {
        Some(r) => match catch_unwind(AssertUnwindSafe(|| r.before_commit(conn))) {
            Ok(Err(rusqlite::Error::SqliteFailure(e, Some(msg)))) if e.code == rusqlite::ErrorCode::TooBig => {
                let n = replies.len();
                if let Some(r) = recorder {
                    r.finished(false);
                }
                return fail_all(conn, replies, || {
                    ApiError::TransactionTooLarge(if n > 1 {
                        format!("{msg} (with {n} writes committed together; try again)")
                    } else {
                        format!("{msg}; change fewer or smaller records at once")
                    })
                });
            }
            Ok(result) => result.map_err(|e| format!("recording the changes: {e}")),
            Err(_) => Err("the recorder panicked before COMMIT".to_string()),
        },
        None => Ok(()),
    };
    let committed = finished.and_then(|()| conn.execute_batch("COMMIT").map_err(|e| e.to_string()));
    if let Some(r) = recorder {
        r.finished(committed.is_ok());
    }
    if let Err(e) = committed {
        return abort(conn, replies, &e);
    }
    generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    for (reply, result) in replies.into_iter().zip(results) {
        // The caller may have gone away (client disconnected); the write is committed anyway.
        let _ = reply.send(result);
    }
}

/// Runs one job inside its own savepoint, so its failure undoes only its own changes. When the
/// transaction itself is gone afterwards, the caller sees `conn.is_autocommit()`.
///
/// The flag says whether the job's outcome is contained: `false` when the savepoint could not
/// be set, undone or released, so that the transaction may hold part of a failed job (or a
/// savepoint that swallows the next jobs) and must not commit.
fn run_job(conn: &Connection, run: Run) -> (ApiResult<Output>, bool) {
    if let Err(e) = conn.execute_batch("SAVEPOINT job") {
        return (Err(e.into()), false);
    }
    let result = match catch_unwind(AssertUnwindSafe(|| run(conn))) {
        Ok(r) => r,
        Err(_) => Err(ApiError::internal("writer", "write job panicked")),
    };
    if conn.is_autocommit() {
        let err = result.and(Err(ApiError::internal(
            "writer",
            "the write transaction was rolled back",
        )));
        return (err, true);
    }
    if result.is_err() {
        if let Err(e) = conn.execute_batch("ROLLBACK TO job") {
            log::error!("ROLLBACK TO a failed job's savepoint failed: {e}");
            return (result, false);
        }
    }
    if let Err(e) = conn.execute_batch("RELEASE job") {
        log::error!("RELEASE of a job's savepoint failed: {e}");
        return (result.and(Err(e.into())), false);
    }
    (result, true)
}

/// Rolls back what is left of the transaction and fails every job: none of them committed.
fn abort(conn: &Connection, replies: Vec<Reply>, cause: &str) {
    fail_all(conn, replies, || {
        ApiError::internal("commit write transaction", cause.to_string())
    })
}

/// Rolls back what is left of the transaction and answers every job with `error()`.
fn fail_all(conn: &Connection, replies: Vec<Reply>, error: impl Fn() -> ApiError) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            log::error!("rollback after failed write transaction: {e}");
        }
    }
    for reply in replies {
        let _ = reply.send(Err(error()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `jobs` as one batch on a fresh database with table `t`; returns each job's outcome
    /// and the values committed.
    fn batch_of(jobs: Vec<Run>, recorder: Option<&dyn Recorder>) -> (Vec<bool>, Vec<i64>) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER)").unwrap();
        let mut rxs = Vec::new();
        let batch = jobs
            .into_iter()
            .map(|run| {
                let (reply, rx) = oneshot::channel();
                rxs.push(rx);
                (run, reply)
            })
            .collect();
        run_batch(&conn, recorder, batch, &std::sync::atomic::AtomicU64::new(0));
        let ok = rxs
            .into_iter()
            .map(|mut rx| matches!(rx.try_recv(), Ok(Ok(_))))
            .collect();
        let mut stmt = conn.prepare("SELECT v FROM t ORDER BY v").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        (ok, rows)
    }

    fn insert(v: i64) -> Run {
        Box::new(move |conn| {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
            Ok(Box::new(()) as Output)
        })
    }

    #[test]
    fn a_failing_job_undoes_only_itself() {
        let fail: Run = Box::new(|conn| {
            conn.execute("INSERT INTO t (v) VALUES (99)", [])?;
            Err(ApiError::bad_request("no"))
        });
        let (ok, rows) = batch_of(vec![insert(1), fail, insert(2)], None);
        assert_eq!((ok, rows), (vec![true, false, true], vec![1, 2]));
    }

    #[test]
    fn a_transaction_rolled_back_under_the_batch_fails_every_job_and_commits_nothing() {
        // What SQLite does on an I/O error, a full disk or out of memory: the whole transaction
        // is gone. The jobs after it must not run in autocommit, outside the changelog.
        let lost: Run = Box::new(|conn| {
            conn.execute_batch("ROLLBACK")?;
            Err(ApiError::internal("job", "disk I/O error"))
        });
        let (ok, rows) = batch_of(vec![insert(1), insert(2), lost, insert(3), insert(4)], None);
        assert_eq!(ok, vec![false; 5], "no job may report success");
        assert!(rows.is_empty(), "nothing committed: {rows:?}");
    }

    #[test]
    fn a_failed_job_that_cannot_be_undone_alone_fails_the_batch_and_commits_nothing() {
        // The job's savepoint is gone when it fails (here the job released it itself), so
        // `ROLLBACK TO job` fails with the transaction still open: its insert must not commit.
        let half: Run = Box::new(|conn| {
            conn.execute("INSERT INTO t (v) VALUES (99)", [])?;
            conn.execute_batch("RELEASE job")?;
            Err(ApiError::bad_request("no"))
        });
        let (ok, rows) = batch_of(vec![insert(1), half, insert(2)], None);
        assert_eq!(ok, vec![false; 3], "no job may report success");
        assert!(rows.is_empty(), "nothing committed: {rows:?}");
    }

    struct Panicky {
        at_begin: bool,
    }
    struct PanickyTx;
    impl TxRecording for PanickyTx {
        fn before_commit(self: Box<Self>, _: &Connection) -> rusqlite::Result<()> {
            panic!("recorder bug before commit")
        }
    }
    impl Recorder for Panicky {
        fn init(&self, _: &mut Connection) -> rusqlite::Result<()> {
            Ok(())
        }
        fn begin<'c>(&self, _: &'c Connection) -> rusqlite::Result<Box<dyn TxRecording + 'c>> {
            if self.at_begin {
                panic!("recorder bug at begin")
            }
            Ok(Box::new(PanickyTx))
        }
    }

    #[test]
    fn a_panicking_recorder_fails_the_batch_not_the_writer() {
        for at_begin in [true, false] {
            let (ok, rows) = batch_of(vec![insert(1), insert(2)], Some(&Panicky { at_begin }));
            assert_eq!(ok, vec![false, false], "at_begin={at_begin}");
            assert!(rows.is_empty(), "at_begin={at_begin}: {rows:?}");
        }
    }
}
