//! The storage engine: one SQLite file per database in `DATA_DIR`, each with exactly one
//! writer thread and a pool of read connections.
//!
//! Architecture invariant: every write to a database goes through [`Database::write`], which
//! runs on that database's writer thread. Nothing else writes a row while the server runs, so a
//! [`writer::Recorder`] sees every change; the only other read-write connection is the
//! [`checkpoint`] thread's, which copies committed WAL frames into the file.

pub mod checkpoint;
pub mod pool;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use crate::error::{ApiError, ApiResult};
use checkpoint::Checkpointer;
use pool::ReadPool;
use writer::{Job, Recorder};

/// Chooses the recorder of each database by name (`None`: not recorded).
pub type RecorderFactory = Arc<dyn Fn(&str) -> Option<Arc<dyn Recorder>> + Send + Sync>;

/// Databases that always exist.
pub const DEFAULT_DB: &str = "default";
/// Request log and metrics of this node; never replicated.
pub const STATS_DB: &str = "stats";
/// Local workflow state of this node; never replicated.
pub const WORKFLOWS_DB: &str = "workflows";
pub const SYSTEM_DBS: [&str; 3] = [DEFAULT_DB, STATS_DB, WORKFLOWS_DB];

/// Whether `name` is a valid database name: `[a-z0-9_-]{1,64}`.
pub fn is_valid_db_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Whether table `name` exists in the main database of `conn`.
pub fn table_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?
        .exists([name])
}

/// Opens a connection with the settings every vski connection uses.
pub fn open_connection(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // NORMAL in WAL mode: a commit survives a crash of the process (the tested guarantee);
    // only an OS crash or power loss can lose the last transactions, as in PocketBase.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;
         PRAGMA cache_size = -16000;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA temp_store = MEMORY;",
    )?;
    if read_only {
        conn.execute_batch("PRAGMA query_only = ON;")?;
    } else {
        // Deleted content is overwritten with zeros, not left in free space: a deleted record
        // (or a pruned changelog entry with its pre-images) must not live on in the file, in
        // snapshots made from it, or in a replica's copy.
        conn.execute_batch("PRAGMA secure_delete = ON;")?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// One open database: its writer thread and its read pool.
pub struct Database {
    pub name: String,
    pub path: PathBuf,
    /// Queue of the writer thread. `None` once the database is closed.
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    /// Copies the WAL into the database file beside the writer (see [`checkpoint`]).
    checkpointer: Arc<Checkpointer>,
    readers: Arc<ReadPool>,
    /// The recorder of a master's replicated database, which knows its position.
    recorder: Option<Arc<dyn Recorder>>,
    /// Moves after every commit (and restore), before the writer answers anyone.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// Query results by query, each with the generation it was read at (see `cached`).
    list_cache: Mutex<HashMap<String, (u64, CachedValue)>>,
    /// Most entries `list_cache` holds (`LIST_CACHE_ENTRIES`; 0 turns caching off).
    cache_entries: std::sync::atomic::AtomicUsize,
}

/// A cached result of any type (the caller names the type it stored).
type CachedValue = Arc<dyn std::any::Any + Send + Sync>;

/// Entries the result cache of one database holds before it starts over, unless configured.
pub const CACHE_ENTRIES: usize = 256;

impl Database {
    /// Opens (creating if needed) the database file at `path` and starts its writer.
    pub fn open(
        name: &str,
        path: PathBuf,
        read_pool_size: u32,
        recorder: Option<Arc<dyn Recorder>>,
    ) -> ApiResult<Arc<Self>> {
        let mut conn = open_connection(&path, false)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ApiError::internal(
                "open database",
                format!("journal_mode is {mode}, not wal"),
            ));
        }
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let readers = Arc::new(ReadPool::new(path.clone(), read_pool_size, generation.clone()));
        let checkpointer = Checkpointer::new(name, path.clone(), readers.clone());
        checkpointer.install(&mut conn)?;
        if let Some(r) = &recorder {
            r.init(&mut conn)?;
        }
        let (tx, rx) = mpsc::channel(4096);
        let for_writer = recorder.clone();
        let gen_writer = generation.clone();
        let thread = std::thread::Builder::new()
            .name(format!("writer-{name}"))
            .spawn(move || writer::run(conn, rx, for_writer, gen_writer))?;
        Ok(Arc::new(Database {
            name: name.to_string(),
            readers,
            path,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            checkpointer,
            recorder,
            generation,
            list_cache: Mutex::new(HashMap::new()),
            cache_entries: std::sync::atomic::AtomicUsize::new(CACHE_ENTRIES),
        }))
    }

    /// On a master, this database's uid, newest committed version and its chained hash (`None`
    /// when changes are not recorded).
    pub fn position(&self) -> Option<(String, i64, String)> {
        self.recorder.as_ref().and_then(|r| r.position())
    }

    /// Runs `f` in a write transaction on the writer thread and returns once it is committed.
    /// If `f` fails, its changes are rolled back and the error is returned.
    pub async fn write<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> ApiResult<T> + Send + 'static,
    {
        let tx = self.queue()?;
        writer::submit(&tx, 0, f).await
    }

    /// [`Database::write`] for a job that writes about `weight` bytes (its request body): the
    /// writer gathers at most [`writer::MAX_BATCH_WEIGHT`] of them into one transaction.
    pub async fn write_weighted<T, F>(&self, weight: usize, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> ApiResult<T> + Send + 'static,
    {
        let tx = self.queue()?;
        writer::submit(&tx, weight, f).await
    }

    /// [`Database::write`] in a transaction of its own: for bulk operations and schema changes,
    /// whose size is not known up front and must not fail other callers' writes.
    pub async fn write_alone<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> ApiResult<T> + Send + 'static,
    {
        let tx = self.queue()?;
        writer::submit(&tx, writer::ALONE, f).await
    }

    /// The writer's queue; a 404 once the database is closed (deleted).
    fn queue(&self) -> ApiResult<mpsc::Sender<Job>> {
        self.writer
            .lock()
            .map_err(|_| ApiError::internal("writer", "lock poisoned"))?
            .clone()
            .ok_or_else(|| ApiError::not_found(format!("Database '{}' is closed.", self.name)))
    }

    /// Runs `f` on the writer thread alone, outside any transaction and without the recorder.
    /// Only for operations SQLite refuses inside a transaction (restoring a snapshot).
    pub async fn write_exclusive<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> ApiResult<T> + Send + 'static,
    {
        let tx = self.queue()?;
        writer::submit_exclusive(&tx, f).await
    }

    /// Runs `f` with a read-only connection on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> ApiResult<T> + Send + 'static,
    {
        self.readers.read(f).await
    }

    /// Runs `f` with a read-only connection on the calling thread: only for reads bounded to a
    /// few rows by a primary key (see `ReadPool::read_now`).
    pub async fn read_now<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce(&Connection) -> ApiResult<T>,
    {
        self.readers.read_now(f).await
    }

    /// The database's generation: it moves after every commit, before the write is
    /// acknowledged. A result read after loading generation `g` is at least as new as `g`.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A result cached under `key` at the current generation, if any.
    ///
    /// Architecture invariant: a cached result is never stale. It is stored under the
    /// generation loaded *before* its read began, and looked up only at the generation of now;
    /// the writer moves the generation after COMMIT and before answering the writer's caller, so
    /// a read that starts after a write was acknowledged never finds a result from before it.
    pub fn cached<T: Send + Sync + 'static>(&self, key: &str) -> Option<Arc<T>> {
        let now = self.generation();
        let m = self.list_cache.lock().ok()?;
        let (g, v) = m.get(key)?;
        if *g != now {
            return None;
        }
        v.clone().downcast::<T>().ok()
    }

    /// Keeps `value`, read at generation `at` (loaded before the read began), under `key`.
    pub fn cache<T: Send + Sync + 'static>(&self, key: String, at: u64, value: Arc<T>) {
        let capacity = self.cache_entries.load(std::sync::atomic::Ordering::Relaxed);
        if capacity == 0 {
            return;
        }
        if let Ok(mut m) = self.list_cache.lock() {
            let now = self.generation();
            if at != now {
                // A write committed meanwhile: the result may already be old.
                return;
            }
            if m.len() >= capacity {
                m.retain(|_, (g, _)| *g == now);
                if m.len() >= capacity {
                    m.clear();
                }
            }
            m.insert(key, (at, value));
        }
    }

    /// Size of the database file in bytes (without the WAL).
    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Stops the writer after the queued jobs ran, and closes every connection. Blocking.
    pub fn close(&self) {
        self.readers.close();
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        let handle = self.writer_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                log::error!("writer thread of '{}' panicked", self.name);
            }
        }
        // Last: the writer's final commits may still have woken it.
        self.checkpointer.close();
    }
}

/// All open databases of this node, by name.
pub struct Registry {
    data_dir: PathBuf,
    read_pool_size: u32,
    recorders: Option<RecorderFactory>,
    /// `LIST_CACHE_ENTRIES` of every database opened here.
    cache_entries: usize,
    /// Sorted for stable listings. Held only to look up, insert or remove.
    dbs: RwLock<BTreeMap<String, Arc<Database>>>,
}

impl Registry {
    /// Opens every `*.db` file in `data_dir` whose name is a valid database name, and creates
    /// the system databases that are missing.
    pub fn open(
        data_dir: &Path,
        read_pool_size: u32,
        recorders: Option<RecorderFactory>,
        cache_entries: usize,
    ) -> ApiResult<Self> {
        std::fs::create_dir_all(data_dir)?;
        let reg = Registry {
            data_dir: data_dir.to_path_buf(),
            read_pool_size,
            recorders,
            cache_entries,
            dbs: RwLock::new(BTreeMap::new()),
        };
        let mut names: Vec<String> = SYSTEM_DBS.iter().map(|s| s.to_string()).collect();
        for entry in std::fs::read_dir(data_dir)? {
            let file_name = entry?.file_name();
            let file_name = file_name.to_string_lossy();
            if let Some(name) = file_name.strip_suffix(".db") {
                if is_valid_db_name(name) && !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
        for name in names {
            reg.open_db(&name)?;
        }
        Ok(reg)
    }

    fn open_db(&self, name: &str) -> ApiResult<Arc<Database>> {
        let path = self.data_dir.join(format!("{name}.db"));
        let db = Database::open(name, path, self.read_pool_size, self.recorder_for(name))?;
        db.cache_entries
            .store(self.cache_entries, std::sync::atomic::Ordering::Relaxed);
        self.dbs.write().map_err(poisoned)?.insert(name.to_string(), db.clone());
        Ok(db)
    }

    fn recorder_for(&self, name: &str) -> Option<Arc<dyn Recorder>> {
        self.recorders.as_ref().and_then(|f| f(name))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn get(&self, name: &str) -> Option<Arc<Database>> {
        self.dbs.read().ok()?.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Database>> {
        self.dbs
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates a new, empty database. Fails if the name is invalid or taken.
    pub fn create(&self, name: &str) -> ApiResult<Arc<Database>> {
        if !is_valid_db_name(name) {
            return Err(ApiError::invalid_field(
                "name",
                "validation_invalid_name",
                "Use 1-64 characters of a-z, 0-9, _ and -.",
            ));
        }
        // Hold the write lock while checking and opening, so two creates cannot race.
        let mut dbs = self.dbs.write().map_err(poisoned)?;
        if dbs.contains_key(name) {
            return Err(ApiError::invalid_field(
                "name",
                "validation_not_unique",
                "A database with this name already exists.",
            ));
        }
        let path = self.data_dir.join(format!("{name}.db"));
        let db = Database::open(name, path, self.read_pool_size, self.recorder_for(name))?;
        db.cache_entries
            .store(self.cache_entries, std::sync::atomic::Ordering::Relaxed);
        dbs.insert(name.to_string(), db.clone());
        Ok(db)
    }

    /// Puts the SQLite file at `src` in place of database `name`: closes it, removes its WAL,
    /// renames `src` over its file and opens it again. Blocking. Only for a database nobody
    /// relies on yet (a replica's copy that was never bootstrapped): a request holding the old
    /// handle finds it closed. A crash at any point leaves either the old file or the new one.
    pub fn replace_with_file(&self, name: &str, src: &Path) -> ApiResult<Arc<Database>> {
        let mut dbs = self.dbs.write().map_err(poisoned)?;
        let old = dbs
            .remove(name)
            .ok_or_else(|| ApiError::not_found(format!("Database '{name}' not found.")))?;
        old.close();
        // An old WAL next to the new file would be replayed into it.
        for suffix in ["-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", old.path.display()));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        crate::crash::point("swap:before_rename");
        std::fs::rename(src, &old.path)?;
        std::fs::File::open(&self.data_dir)?.sync_all()?;
        let db = Database::open(name, old.path.clone(), self.read_pool_size, self.recorder_for(name))?;
        db.cache_entries
            .store(self.cache_entries, std::sync::atomic::Ordering::Relaxed);
        dbs.insert(name.to_string(), db.clone());
        Ok(db)
    }

    /// Closes a database and deletes its files. Blocking. System databases cannot be deleted.
    pub fn delete(&self, name: &str) -> ApiResult<()> {
        if SYSTEM_DBS.contains(&name) {
            return Err(ApiError::bad_request(format!(
                "The system database '{name}' cannot be deleted."
            )));
        }
        let db = self
            .dbs
            .write()
            .map_err(poisoned)?
            .remove(name)
            .ok_or_else(|| ApiError::not_found(format!("Database '{name}' not found.")))?;
        db.close();
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", db.path.display()));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Closes every database (graceful shutdown). Blocking.
    pub fn close_all(&self) {
        let dbs: Vec<_> = self
            .dbs
            .write()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
            .into_values()
            .collect();
        for db in dbs {
            db.close();
        }
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> ApiError {
    ApiError::internal("database registry", "lock poisoned")
}
