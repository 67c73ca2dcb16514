//! The master's replication endpoints (`/api/replica/*`), the registry of replicas it has seen,
//! its epoch, and changelog retention.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::checksum::logical_checksum;
use super::feed::{Changes, CommitFeed};
use super::recorder::{self, bounds, can_resume, entries_since};
use super::{is_replicated_db, schema};
use crate::auth::Identity;
use crate::db::{Database, STATS_DB};
use crate::error::{ApiError, ApiResult};
use crate::http::resource;
use crate::state::AppState;
use crate::util::{now_string, random_id};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/replica/status").route(web::get().to(status)))
        .service(resource("/api/replica/schema-sync").route(web::get().to(schema_sync)))
        .service(resource("/api/replica/changesets").route(web::get().to(changesets)))
        .service(resource("/api/replica/stream").route(web::get().to(stream)))
        .service(resource("/api/replica/download").route(web::get().to(download)))
        .service(resource("/api/replica/ack").route(web::post().to(ack)))
        .service(resource("/api/replica/files").route(web::get().to(crate::files::replica::entries)))
        .service(resource("/api/replica/files/{path:.*}").route(web::get().to(crate::files::replica::bytes)))
        .service(resource("/api/replica/replicas").route(web::get().to(replicas)));
}

/// What the master remembers of one replica, for monitoring.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    pub id: String,
    pub public_url: String,
    /// Last acknowledged version per database.
    pub positions: BTreeMap<String, i64>,
    pub last_seen: String,
    /// How the replica follows: `stream`, `poll` or `manual` (header `X-Replica-Sync-Mode`).
    #[serde(default)]
    pub sync_mode: String,
    /// Last acknowledged file journal position per database (kept in memory: after a master
    /// restart, journal entries are pruned by age until replicas ack again).
    #[serde(default)]
    pub file_positions: BTreeMap<String, i64>,
}

/// Replication state of a master.
pub struct MasterState {
    /// Random id of this data directory; replicas re-bootstrap when it changes.
    pub epoch: String,
    /// Replicas seen, by id. A std mutex held only to read or update the map.
    pub replicas: Mutex<BTreeMap<String, ReplicaInfo>>,
    /// Logical checksum per database, with the version it was computed at.
    pub checksums: Arc<Mutex<HashMap<String, (i64, String)>>>,
    /// Commits of this process, for the long-polls of streaming replicas.
    pub feed: Arc<CommitFeed>,
    /// Long-polls held now, per replica id.
    pub held: Mutex<HashMap<String, usize>>,
}

/// The epoch of `data_dir`: read from `.epoch`, created on first use.
pub fn epoch(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(".epoch");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            // Written to a temporary file, fsynced, then renamed and the directory fsynced: a
            // crash leaves either no epoch or the whole one, never a torn or empty file.
            let e = random_id(20);
            let tmp = data_dir.join(".epoch.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, e.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(data_dir)?.sync_all()?;
            Ok(e)
        }
    }
}

const REPLICAS_DDL: &str = "CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY NOT NULL,
    public_url TEXT NOT NULL DEFAULT '',
    positions TEXT NOT NULL DEFAULT '{}',
    last_seen TEXT NOT NULL
)";

impl MasterState {
    /// Loads the epoch and the replicas remembered in `stats`.
    pub async fn open(data_dir: &Path, stats: &Database, feed: Arc<CommitFeed>) -> ApiResult<Self> {
        stats.write(|conn| Ok(conn.execute_batch(REPLICAS_DDL)?)).await?;
        let known = stats
            .read(|conn| {
                let mut stmt = conn.prepare("SELECT id, public_url, positions, last_seen FROM replicas")?;
                let rows = stmt.query_map([], |r| {
                    let positions: String = r.get(2)?;
                    Ok(ReplicaInfo {
                        id: r.get(0)?,
                        public_url: r.get(1)?,
                        positions: serde_json::from_str(&positions).unwrap_or_default(),
                        last_seen: r.get(3)?,
                        sync_mode: String::new(),
                        file_positions: BTreeMap::new(),
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?;
        Ok(MasterState {
            epoch: epoch(data_dir)?,
            replicas: Mutex::new(known.into_iter().map(|r| (r.id.clone(), r)).collect()),
            checksums: Arc::new(Mutex::new(HashMap::new())),
            feed,
            held: Mutex::new(HashMap::new()),
        })
    }
}

/// Replica endpoints take replica tokens; `admin_ok` also lets admins in (status, replicas).
pub(crate) fn authorize(who: &Identity, admin_ok: bool) -> ApiResult<()> {
    match who {
        Identity::Replica(_) => Ok(()),
        Identity::Admin(_) if admin_ok => Ok(()),
        Identity::Guest => Err(ApiError::Unauthorized(
            "The request requires a valid replica token.".into(),
        )),
        Identity::Admin(_) | Identity::User { .. } => {
            Err(ApiError::Forbidden("Only replicas can use this endpoint.".into()))
        }
    }
}

/// Notes that a replica called, with its id and public URL (headers, else the token subject).
fn touch(state: &AppState, req: &HttpRequest, who: &Identity, position: Option<(&str, i64)>) -> Option<ReplicaInfo> {
    let Identity::Replica(sub) = who else { return None };
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let id = header("x-replica-id")
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .unwrap_or_else(|| sub.clone());
    let mut map = state.master.replicas.lock().ok()?;
    let entry = map.entry(id.clone()).or_insert_with(|| ReplicaInfo {
        id,
        public_url: String::new(),
        positions: BTreeMap::new(),
        last_seen: String::new(),
        sync_mode: String::new(),
        file_positions: BTreeMap::new(),
    });
    if let Some(mode) = header("x-replica-sync-mode").filter(|m| matches!(m.as_str(), "stream" | "poll" | "manual")) {
        entry.sync_mode = mode;
    }
    if let Some(url) = header("x-replica-public-url").filter(|s| s.len() <= 2048) {
        entry.public_url = url;
    }
    entry.last_seen = now_string();
    if let Some((db, v)) = position {
        entry.positions.insert(db.to_string(), v);
    }
    Some(entry.clone())
}

/// A replicated database named by `?db=`.
pub(crate) fn replicated_db(state: &AppState, name: Option<&str>) -> ApiResult<Arc<Database>> {
    let name = name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::invalid_field("db", "validation_required", "Missing db."))?;
    if !is_replicated_db(name) {
        return Err(ApiError::not_found(format!("Database '{name}' is not replicated.")));
    }
    state
        .dbs
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("Database '{name}' not found.")))
}

/// The common start of a replica's pull: check the token, note the call, find the database.
fn pull_request(state: &AppState, req: &HttpRequest, who: &Identity, db: Option<&str>) -> ApiResult<Arc<Database>> {
    authorize(who, false)?;
    touch(state, req, who, None);
    replicated_db(state, db)
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    /// `0`: do not compute checksums (sync rounds do not need them); `sha256` is then the cached
    /// value if it is still current, else null.
    checksum: Option<String>,
    /// Only this database.
    db: Option<String>,
}

async fn status(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    q: web::Query<StatusQuery>,
) -> ApiResult<HttpResponse> {
    authorize(&who, true)?;
    touch(&state, &req, &who, None);
    let compute = q.checksum.as_deref() != Some("0");
    let mut dbs = Vec::new();
    let only = q.db.clone();
    for db in state
        .dbs
        .list()
        .into_iter()
        .filter(|d| is_replicated_db(&d.name) && only.as_ref().is_none_or(|o| *o == d.name))
    {
        let cache = state.master.checksums.clone();
        let name = db.name.clone();
        let size = db.size();
        let info = db
            .read(move |conn| {
                // One read transaction, so version and checksum describe the same state.
                conn.execute_batch("BEGIN")?;
                let result = (|| -> ApiResult<Value> {
                    let (min, head) = bounds(conn)?;
                    let uid = recorder::database_uid(conn)?;
                    let schema_version: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
                    let schema_hash = schema::hash(&schema::objects(conn)?);
                    let cached = cache
                        .lock()
                        .ok()
                        .and_then(|c| c.get(&name).filter(|(v, _)| *v == head).cloned());
                    let sha = match cached {
                        Some((_, sha)) => Some(sha),
                        None if compute => {
                            let sha = logical_checksum(conn)?;
                            if let Ok(mut c) = cache.lock() {
                                c.insert(name.clone(), (head, sha.clone()));
                            }
                            Some(sha)
                        }
                        None => None,
                    };
                    Ok(
                        json!({"name": name, "uid": uid, "size": size, "sha256": sha, "schemaVersion": schema_version,
                              "schemaHash": schema_hash, "version": head, "minVersion": min}),
                    )
                })();
                conn.execute_batch("COMMIT")?;
                result
            })
            .await?;
        dbs.push(info);
    }
    Ok(HttpResponse::Ok().json(json!({"epoch": state.master.epoch, "dbs": dbs})))
}

#[derive(Debug, Deserialize)]
struct DbQuery {
    db: Option<String>,
}

async fn schema_sync(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    q: web::Query<DbQuery>,
) -> ApiResult<HttpResponse> {
    let db = pull_request(&state, &req, &who, q.db.as_deref())?;
    let objects = db.read(|conn| Ok(schema::objects(conn)?)).await?;
    Ok(HttpResponse::Ok().json(json!({"db": db.name, "schemaHash": schema::hash(&objects), "objects": objects})))
}

#[derive(Debug, Deserialize)]
struct ChangesetsQuery {
    db: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    /// The hash of the replica's history at `since` (see `recorder::position_hash`).
    hash: Option<String>,
}

/// Most entries one `changesets` response carries, and about how many changeset bytes.
const MAX_ENTRIES: usize = 1000;
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

async fn changesets(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    q: web::Query<ChangesetsQuery>,
) -> ApiResult<HttpResponse> {
    authorize(&who, false)?;
    let db = replicated_db(&state, q.db.as_deref())?;
    let since: i64 = q
        .since
        .as_deref()
        .unwrap_or("0")
        .parse()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| {
            ApiError::invalid_field("since", "validation_invalid_number", "Must be a version (integer ≥ 0).")
        })?;
    let limit: usize = match q.limit.as_deref() {
        None | Some("") => 100,
        Some(s) => s.parse::<usize>().map_err(|_| {
            ApiError::invalid_field("limit", "validation_invalid_number", "Must be a positive integer.")
        })?,
    }
    .clamp(1, MAX_ENTRIES);
    let their_hash = q.hash.clone().filter(|h| !h.is_empty());
    // A pull from `since` says the replica has applied `since`: fresher than its last ack.
    touch(&state, &req, &who, Some((&db.name, since)));
    let (min, head, uid, ours, entries) = db
        .read(move |conn| {
            conn.execute_batch("BEGIN")?;
            let r = (|| -> rusqlite::Result<_> {
                let (min, head) = bounds(conn)?;
                let resumable = can_resume(since, min, head);
                let ours = if resumable {
                    recorder::position_hash(conn, since)?
                } else {
                    None
                };
                let entries = if resumable {
                    entries_since(conn, since, limit, MAX_RESPONSE_BYTES)?
                } else {
                    Vec::new()
                };
                let uid = recorder::database_uid(conn)?;
                Ok((min, head, uid, ours, entries))
            })();
            conn.execute_batch("COMMIT")?;
            Ok(r?)
        })
        .await?;
    if !can_resume(since, min, head) {
        return Ok(crate::error::error_body(
            actix_web::http::StatusCode::GONE,
            &format!("Version {since} is not available (kept: {min}..{head}); download a snapshot."),
            json!({"minVersion": min, "version": head}),
        ));
    }
    // A replica whose history up to `since` is not this log's (the master was restored from a
    // backup, or its file replaced by an older copy) must start over, not continue by number.
    if let (Some(theirs), Some(ours)) = (&their_hash, &ours) {
        if theirs != ours {
            return Ok(crate::error::error_body(
                actix_web::http::StatusCode::GONE,
                &format!("The history at version {since} differs from the master's; download a snapshot."),
                json!({"minVersion": min, "version": head, "historyMismatch": true}),
            ));
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({"version": e.version, "schemaHash": e.schema_hash, "schema": e.schema,
                   "changeset": b64.encode(&e.changeset), "created": e.created,
                   "hash": e.hash, "prevHash": e.prev_hash})
        })
        .collect();
    Ok(HttpResponse::Ok().json(
        json!({"db": db.name, "uid": uid, "epoch": state.master.epoch, "version": head, "minVersion": min, "entries": entries}),
    ))
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    /// The cursor of the previous answer (`next`); none at first.
    since: Option<String>,
    /// Longest hold in seconds, at most [`MAX_HOLD`] (the default).
    wait: Option<String>,
}

/// Longest a stream request is held when nothing commits.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(25);

/// Counts a replica's held long-poll while it lives (the request may end by a disconnect).
struct Held<'a>(&'a MasterState, String);

impl<'a> Held<'a> {
    fn new(m: &'a MasterState, id: String) -> Self {
        if let Ok(mut h) = m.held.lock() {
            *h.entry(id.clone()).or_default() += 1;
        }
        Held(m, id)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut h) = self.0.held.lock() {
            if let Some(n) = h.get_mut(&self.1) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    h.remove(&self.1);
                }
            }
        }
    }
}

/// `GET /api/replica/stream?since=CURSOR`: one long-poll for all databases. Answers at once
/// when a replicated database committed after the cursor (all of them for a missing cursor or
/// one of an earlier process), else holds the request until one commits, at most 25 s. The
/// answer names the databases that moved with their position, and the cursor to send next.
async fn stream(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    q: web::Query<StreamQuery>,
) -> ApiResult<HttpResponse> {
    authorize(&who, false)?;
    let id = touch(&state, &req, &who, None).map_or_else(String::new, |r| r.id);
    let hold = match q.wait.as_deref() {
        None | Some("") => MAX_HOLD,
        Some(s) => s
            .parse::<u64>()
            .map(|s| std::time::Duration::from_secs(s).min(MAX_HOLD))
            .map_err(|_| {
                ApiError::invalid_field("wait", "validation_invalid_number", "Must be seconds (an integer).")
            })?,
    };
    let feed = &state.master.feed;
    let deadline = tokio::time::Instant::now() + hold;
    let _held = Held::new(&state.master, id);
    let cursor = q.since.clone().unwrap_or_default();
    let mut held_out = false;
    let (next, names) = loop {
        let mut woken = feed.subscribe();
        let (next, changes) = feed.since(&cursor);
        let names: Vec<String> = match changes {
            Changes::All => state
                .dbs
                .list()
                .into_iter()
                .filter(|d| is_replicated_db(&d.name))
                .map(|d| d.name.clone())
                .collect(),
            Changes::Since(names) => names,
        };
        if !names.is_empty() || feed.is_stopping() || held_out {
            break (next, names);
        }
        // Held to the end: one more look (a commit may have raced the deadline), then the
        // answer carries the cursor of that look.
        held_out = tokio::time::timeout_at(deadline, woken.changed()).await.is_err();
    };
    let dbs: Vec<Value> = names
        .iter()
        .filter_map(|n| state.dbs.get(n))
        .filter_map(|db| {
            let (uid, version, hash) = db.position()?;
            Some(json!({"name": db.name, "uid": uid, "version": version, "hash": super::position::prefix(&hash)}))
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"epoch": state.master.epoch, "next": next, "dbs": dbs})))
}

/// Deletes a copy's changelog but its position: the newest entry is kept for its version and
/// hash (with its changeset emptied). Run with `secure_delete` on, the freed pages are zeroed.
fn drop_history(conn: &rusqlite::Connection) -> ApiResult<()> {
    if crate::db::table_exists(conn, "_changelog")? {
        conn.execute_batch(
            "DELETE FROM _changelog WHERE version < (SELECT MAX(version) FROM _changelog);
             UPDATE _changelog SET changeset = x'', schema = NULL;",
        )?;
    }
    // The master's pending webhook deliveries are its own: a replica never sends them.
    if crate::db::table_exists(conn, "_webhook_queue")? {
        conn.execute_batch("DELETE FROM _webhook_queue")?;
    }
    // A replica bootstrapping from this snapshot lists the master's files instead.
    if crate::db::table_exists(conn, "_replica_file_journal")? {
        conn.execute_batch("DELETE FROM _replica_file_journal")?;
    }
    Ok(())
}

/// Copies all of `src` into `dst` with the backup API in one step, and checks that the step
/// finished: `Busy` or `Locked` would leave `dst` partial (or empty), which must never pass for
/// a snapshot or a restore.
pub fn backup_all(src: &rusqlite::Connection, dst: &mut rusqlite::Connection) -> ApiResult<()> {
    use rusqlite::backup::{Backup, StepResult};
    match Backup::new(src, dst)?.step(-1)? {
        StepResult::Done => Ok(()),
        other => Err(ApiError::internal(
            "backup",
            format!("the backup step did not finish: {other:?}"),
        )),
    }
}

/// A snapshot ready to send: the open copy, its size, its version (read from its own
/// changelog), the sha256 of its bytes when asked for, and the database's uid.
type Snapshot = (std::fs::File, u64, i64, Option<String>, String);

/// A consistent copy of `db`, made with `VACUUM INTO` from a read-only connection in one read
/// transaction (writers go on, the copy is one committed state, without free pages), with the
/// history dropped. Never the live file. `hash`: also read the copy once more for its sha256
/// (a replica that takes the digest after the bytes does not need that pass).
pub fn snapshot(db: &Database, dir: &Path, hash: bool) -> ApiResult<Snapshot> {
    use rusqlite::{Connection, OpenFlags};
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}-{}.db", db.name, random_id(12)));
    let result = (|| -> ApiResult<_> {
        let src = Connection::open_with_flags(&db.path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        src.busy_timeout(std::time::Duration::from_secs(10))?;
        // `VACUUM INTO` syncs its output at the source connection's level. The copy is a private
        // temporary file (thrown away on any failure, and checked by sha256 on the replica), so
        // fsyncing it would only make the master wait on the disk: about 40% of the copy's time.
        src.execute_batch("PRAGMA synchronous = OFF")?;
        // One read transaction writes a compact copy: no free pages, so nothing deleted on the
        // master (in free space) comes along, in one pass over the file.
        let target = path
            .to_str()
            .ok_or_else(|| ApiError::internal("snapshot", "path is not UTF-8"))?;
        src.execute("VACUUM INTO ?1", [target])?;
        let dst = Connection::open(&path)?;
        // The copy is a private temporary file: if anything fails it is thrown away, so it needs
        // neither a journal nor fsyncs while it is changed. The history it drops is zeroed where
        // it lay (secure_delete), so no pre-image survives in the pages it frees.
        dst.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA secure_delete = ON;")?;
        drop_history(&dst)?;
        // A snapshot is a plain single file; the replica sets WAL mode when it opens it.
        dst.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))?;
        let version = recorder::head(&dst)?;
        let uid = recorder::database_uid(&dst)?;
        drop(dst);
        drop(src);
        let (len, sha) = if hash {
            let (len, sha) = crate::util::sha256_file(&path)?;
            (len, Some(sha))
        } else {
            (std::fs::metadata(&path)?.len(), None)
        };
        let file = std::fs::File::open(&path)?;
        Ok((file, len, version, sha, uid))
    })();
    // The open file handle keeps the data readable; the name is not needed any more.
    let _ = std::fs::remove_file(&path);
    result
}

#[derive(Debug, Deserialize)]
struct DownloadQuery {
    db: Option<String>,
    /// `trailer`: send the sha256 as the last 32 bytes of the body, computed while the bytes
    /// go out, instead of in a header that needs a whole pass over the copy first.
    digest: Option<String>,
}

/// The length of the raw sha256 digest a `digest=trailer` download ends with.
pub const TRAILER_LEN: u64 = 32;

async fn download(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    q: web::Query<DownloadQuery>,
) -> ApiResult<HttpResponse> {
    let db = pull_request(&state, &req, &who, q.db.as_deref())?;
    let trailer = match q.digest.as_deref() {
        None => false,
        Some("trailer") => true,
        Some(_) => return Err(ApiError::bad_request("digest must be 'trailer' or absent")),
    };
    let dir = super::snapshot_dir(state.dbs.data_dir());
    let (file, len, version, sha, uid) = tokio::task::spawn_blocking(move || snapshot(&db, &dir, !trailer))
        .await
        .map_err(|e| ApiError::internal("snapshot task", e.to_string()))??;
    let mut resp = HttpResponse::Ok();
    resp.content_type("application/vnd.sqlite3")
        .insert_header(("X-Replica-Version", version.to_string()))
        .insert_header(("X-Replica-Epoch", state.master.epoch.clone()))
        .insert_header(("X-Replica-Db-Uid", uid));
    let (body_len, digest) = match sha {
        Some(sha) => {
            resp.insert_header(("X-Replica-Sha256", sha));
            (len, None)
        }
        None => {
            resp.insert_header(("X-Replica-Sha256", "trailer"));
            (len + TRAILER_LEN, Some(<sha2::Sha256 as sha2::Digest>::new()))
        }
    };
    Ok(resp.body(actix_web::body::SizedStream::new(body_len, send_file(file, digest))))
}

/// Bytes of the copy read per chunk of a download.
const SEND_CHUNK: usize = 1 << 20;

/// The content of `file` as a body, read (and hashed, with `digest`: the raw sha256 follows
/// the bytes as the body's last 32) on a blocking thread of its own. The thread reads ahead of
/// the socket by a few chunks and stops when the client goes away.
fn send_file(
    mut file: std::fs::File,
    mut digest: Option<sha2::Sha256>,
) -> impl futures_util::Stream<Item = std::io::Result<actix_web::web::Bytes>> {
    use actix_web::web::Bytes;
    use sha2::Digest;
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        loop {
            // Read into spare capacity: no chunk is zeroed first.
            let mut buf = Vec::with_capacity(SEND_CHUNK);
            match (&mut file).take(SEND_CHUNK as u64).read_to_end(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
            if let Some(h) = digest.as_mut() {
                h.update(&buf);
            }
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return;
            }
        }
        if let Some(h) = digest {
            let _ = tx.blocking_send(Ok(Bytes::copy_from_slice(&h.finalize())));
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

#[derive(Debug, Deserialize)]
struct AckBody {
    db: String,
    version: i64,
    /// The replica's file journal position for `db`, when it syncs files.
    #[serde(default)]
    files: Option<i64>,
}

async fn ack(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    body: web::Json<AckBody>,
) -> ApiResult<HttpResponse> {
    authorize(&who, false)?;
    if body.version < 0 {
        return Err(ApiError::invalid_field(
            "version",
            "validation_invalid_number",
            "Must be ≥ 0.",
        ));
    }
    replicated_db(&state, Some(&body.db))?;
    let mut info = touch(&state, &req, &who, Some((&body.db, body.version)))
        .ok_or_else(|| ApiError::internal("ack", "no replica identity"))?;
    if let Some(files) = body.files.filter(|f| *f >= 0) {
        if let Ok(mut map) = state.master.replicas.lock() {
            if let Some(entry) = map.get_mut(&info.id) {
                entry.file_positions.insert(body.db.clone(), files);
                info = entry.clone();
            }
        }
    }
    let stats = state
        .dbs
        .get(STATS_DB)
        .ok_or_else(|| ApiError::internal("ack", "stats database missing"))?;
    let row = info.clone();
    stats
        .write(move |conn| {
            conn.execute(
                "INSERT INTO replicas (id, public_url, positions, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET public_url = excluded.public_url, positions = excluded.positions, last_seen = excluded.last_seen",
                rusqlite::params![row.id, row.public_url, serde_json::to_string(&row.positions).unwrap_or_default(), row.last_seen],
            )?;
            Ok(())
        })
        .await?;
    Ok(HttpResponse::Ok().json(info))
}

async fn replicas(state: web::Data<AppState>, who: Identity) -> ApiResult<HttpResponse> {
    match &who {
        Identity::Admin(_) => {}
        other => authorize(other, false).and(Err(ApiError::Forbidden("Only admins can list replicas.".into())))?,
    }
    // Replicas not seen for a week (the default retention, after which they need a snapshot
    // anyway) age out of the list.
    let cutoff = (chrono::Utc::now() - chrono::Duration::days(7))
        .format("%Y-%m-%d %H:%M:%S%.3fZ")
        .to_string();
    let list: Vec<ReplicaInfo> = state
        .master
        .replicas
        .lock()
        .map(|mut m| {
            m.retain(|_, r| r.last_seen >= cutoff);
            m.values().cloned().collect()
        })
        .unwrap_or_default();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut out = Vec::new();
    for r in list {
        let mut dbs = serde_json::Map::new();
        for (name, &applied) in &r.positions {
            let Some(db) = state.dbs.get(name) else { continue };
            let head = db.position().map_or(applied, |(_, v, _)| v);
            let behind = (head - applied).max(0);
            // Like pg_stat_replication's replay_lag: the age of the oldest commit not applied.
            let oldest: Option<i64> = if behind > 0 {
                use rusqlite::OptionalExtension;
                db.read(move |conn| {
                    Ok(conn
                        .query_row(
                            "SELECT created FROM _changelog WHERE version = ?1",
                            [applied + 1],
                            |r| r.get(0),
                        )
                        .optional()?)
                })
                .await?
            } else {
                None
            };
            let lag_ms = oldest.map_or(0, |c| (now_ms - c).max(0));
            dbs.insert(
                name.clone(),
                json!({"version": applied, "behind": behind, "lagMs": lag_ms}),
            );
        }
        let mut v = serde_json::to_value(&r).map_err(|e| ApiError::internal("replicas", e))?;
        v["dbs"] = Value::Object(dbs);
        // Long-polls the replica holds open now: 1 for a streaming replica, whatever the
        // number of databases it follows.
        v["heldStreams"] = json!(
            state
                .master
                .held
                .lock()
                .ok()
                .and_then(|h| h.get(&r.id).copied())
                .unwrap_or(0)
        );
        out.push(v);
    }
    Ok(HttpResponse::Ok().json(out))
}

/// Deletes changelog entries older than `retention_hours` on every replicated database, every
/// `interval`, until the process ends.
pub async fn retention_loop(state: web::Data<AppState>, retention_hours: f64, file_retention_days: f64) {
    let file_retention_ms = (file_retention_days * 86_400_000.0) as i64;
    let retention_ms = (retention_hours * 3_600_000.0) as i64;
    let interval = std::time::Duration::from_millis((retention_ms / 4).clamp(500, 300_000) as u64);
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let cutoff = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
            - retention_ms;
        for db in state.dbs.list().into_iter().filter(|d| is_replicated_db(&d.name)) {
            match db.write(move |conn| Ok(recorder::prune(conn, cutoff)?)).await {
                Ok(0) => {}
                Ok(n) => log::info!("pruned {n} changelog entries of '{}'", db.name),
                Err(e) => log::warn!("pruning the changelog of '{}': {e}", db.name),
            }
            let file_cutoff = cutoff + retention_ms - file_retention_ms;
            // Entries every replica that syncs this database's files has acknowledged.
            let acked = state
                .master
                .replicas
                .lock()
                .ok()
                .and_then(|m| m.values().filter_map(|r| r.file_positions.get(&db.name).copied()).min());
            match db
                .write(move |conn| {
                    let mut n = crate::files::replica::prune(conn, file_cutoff)?;
                    if let Some(upto) = acked {
                        n += crate::files::replica::prune_acked(conn, upto)?;
                    }
                    Ok(n)
                })
                .await
            {
                Ok(0) => {}
                Ok(n) => log::info!("pruned {n} file journal entries of '{}'", db.name),
                Err(e) => log::warn!("pruning the file journal of '{}': {e}", db.name),
            }
        }
    }
}
