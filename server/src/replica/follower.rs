//! The replica side: sync rounds that bootstrap databases from snapshots and follow the
//! master's changelog, the read-only guard, and the sync state shown in `/health`.
//!
//! Architecture invariant: a replicated database on a replica is written only by this module,
//! through the database's writer: each page of changelog entries is applied in one
//! transaction together with the new local version (`_replica_state`), and a snapshot is
//! restored into the live file with the backup API in one step. A crash at any point leaves
//! the database at a clean version, and the next round continues from there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use base64::Engine;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::apply::{Conflicts, apply_entries};
use super::position::Position;
use super::recorder::Entry;
use super::{is_replicated_db, schema};
use crate::auth::Identity;
use crate::auth::token::{TokenKeys, TokenType};
use crate::config::ServeConfig;
use crate::db::Database;
use crate::error::{ApiError, ApiResult, error_body};
use crate::http::resource;
use crate::state::AppState;
use crate::util::{now_string, random_id};

const STATE_DDL: &str =
    "CREATE TABLE IF NOT EXISTS _replica_state (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)";

/// Where a replica's copy of a database stands, kept inside that database.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalState {
    pub version: i64,
    pub epoch: String,
    pub uid: String,
    /// The master's history hash at `version` (`""` when unknown: a copy made before entries
    /// were chained).
    pub hash: String,
}

/// Reads the replica state of a database file; `None` if it was never bootstrapped.
pub fn local_state(conn: &Connection) -> rusqlite::Result<Option<LocalState>> {
    if !crate::db::table_exists(conn, "_replica_state")? {
        return Ok(None);
    }
    let get = |k: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT value FROM _replica_state WHERE key = ?1", [k], |r| r.get(0))
            .optional()
    };
    let hash = get("hash")?.unwrap_or_default();
    match (get("version")?, get("epoch")?, get("uid")?) {
        (Some(v), Some(epoch), Some(uid)) => Ok(v.parse().ok().map(|version| LocalState {
            version,
            epoch,
            uid,
            hash,
        })),
        _ => Ok(None),
    }
}

/// One value of `_replica_state`, if the table and the key exist.
fn state_value(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    if !crate::db::table_exists(conn, "_replica_state")? {
        return Ok(None);
    }
    conn.query_row("SELECT value FROM _replica_state WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

async fn save_files_position(db: &Arc<Database>, pos: i64) -> Result<(), String> {
    db.write(move |conn| {
        conn.execute_batch(STATE_DDL)?;
        set_state(conn, "files", &pos.to_string())?;
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())
}

/// The files under a database's storage directory: relative path → size.
fn local_files(root: &Path) -> HashMap<String, u64> {
    crate::files::replica::walk(root)
        .into_iter()
        .filter_map(|(path, full)| Some((path, std::fs::metadata(full).ok()?.len())))
        .collect()
}

fn set_state(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO _replica_state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// Sync state of one database, for `/health`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DbSync {
    pub local_version: i64,
    /// The last file sync of this database failed: the next sync retries it.
    #[serde(skip)]
    files_behind: bool,
    pub master_version: i64,
    /// Time of the last round that brought this database up to the master's version.
    pub last_sync: Option<String>,
    /// Versions behind the master's last known version.
    pub lag: i64,
    /// Milliseconds since this copy knows it is behind the master (0 when it is not): how
    /// stale a read here may be.
    pub lag_ms: u64,
    #[serde(skip)]
    behind_since: Option<Instant>,
    pub last_error: Option<String>,
    /// Snapshots downloaded for this database since start.
    pub bootstraps: u64,
    /// Drift seen since start: changes that did not fit the local rows (each also logged as a
    /// warning). Always 0 on a healthy replica.
    pub conflicts: u64,
    /// Drift seen since start: times the schema had to be repaired from `/schema-sync` after
    /// the entries were applied. Always 0 on a healthy replica.
    pub schema_repairs: u64,
    /// Whether the last comparison of logical checksums at equal versions differed.
    pub checksum_mismatch: bool,
    /// The version at which the checksums were last compared.
    pub verified_version: Option<i64>,
    #[serde(skip)]
    verified_at: Option<Instant>,
    /// Failed rounds in a row for this database, and when the next may start: each database
    /// backs off on its own, so one failing database delays no other.
    /// The master's epoch and the database's uid that `local_version` belongs to.
    #[serde(skip)]
    origin: Option<(String, String)>,
    /// The history's hash prefix at the versions this copy applied lately, oldest first: a
    /// position token is reached only on its own history (see `replica/position.rs`).
    #[serde(skip)]
    recent: std::collections::VecDeque<(i64, String)>,
    #[serde(skip)]
    failures: u32,
    #[serde(skip)]
    retry_at: Option<Instant>,
    /// Whether this copy was at the master's version since start or its last snapshot (the
    /// log says so once each time).
    #[serde(skip)]
    caught_up: bool,
    /// Set when the master's version was just reached, for `Follower::note` to log.
    #[serde(skip)]
    announce: bool,
}

/// Versions whose hashes a replica keeps per database to judge position tokens.
const RECENT_HASHES: usize = 4096;

impl DbSync {
    /// Notes that this copy holds `version`, whose chained hash is `hash`, of the history it
    /// held before. Versions at or past it that were noted are of another history and go.
    fn applied(&mut self, version: i64, hash: &str) {
        while self.recent.back().is_some_and(|(v, _)| *v >= version) {
            self.recent.pop_back();
        }
        if self.recent.len() == RECENT_HASHES {
            self.recent.pop_front();
        }
        self.recent.push_back((version, super::position::prefix(hash)));
    }

    /// Notes a copy that starts a history anew at `version` (a snapshot, a restart).
    fn restarted(&mut self, version: i64, hash: &str) {
        self.recent.clear();
        self.applied(version, hash);
        self.caught_up = false;
    }

    /// The hash prefix of this copy's history at `version`, when it is still known.
    fn hash_at(&self, version: i64) -> Option<&str> {
        let i = self.recent.binary_search_by_key(&version, |(v, _)| *v).ok()?;
        Some(self.recent[i].1.as_str())
    }

    /// Whether `want` is reached on this copy: the same origin, at least its version, and,
    /// when both sides know the hash at that version, the same one. `None`: another history.
    fn reaches(&self, want: &Position) -> Option<bool> {
        let (epoch, uid) = self.origin.as_ref()?;
        if *epoch != want.epoch || *uid != want.uid {
            return None;
        }
        if want.version > self.local_version {
            return Some(false);
        }
        match self.hash_at(want.version) {
            Some(h) if !h.is_empty() && !want.hash.is_empty() && h != want.hash => None,
            _ => Some(true),
        }
    }

    /// Sets both versions, and when this copy started to be behind.
    fn set_versions(&mut self, local: i64, master: i64) {
        self.local_version = local;
        self.master_version = master;
        self.lag = (master - local).max(0);
        if self.lag == 0 {
            self.behind_since = None;
            self.announce |= !self.caught_up;
            self.caught_up = true;
        } else if self.behind_since.is_none() {
            self.behind_since = Some(Instant::now());
        }
    }
}

/// The wait after `failures` failed attempts: 2, 4, 8 … seconds, at least `interval`, at most
/// 8 intervals or 5 minutes, plus up to 20% random jitter so replicas do not retry in step.
pub fn backoff(failures: u32, interval: u64) -> Duration {
    let cap = (interval.max(1) * 8).min(300);
    let base = (1u64 << failures.min(9)).max(interval).min(cap);
    let mut b = [0u8; 2];
    crate::util::random_bytes(&mut b);
    let jitter = u64::from(u16::from_le_bytes(b)) * base * 200 / u64::from(u16::MAX);
    Duration::from_millis(base * 1000 + jitter)
}

/// Databases a replica syncs at once (and so about the most connections it opens to the
/// master besides its one long-poll).
const SYNC_SLOTS: usize = 4;

/// Pages a stream's sync of one database applies before it gives its slot to the next.
const QUICK_PAGES: usize = 8;

/// Least time between two comparisons of a database's logical checksum with the master's
/// (each reads the whole database on both sides).
const VERIFY_EVERY: Duration = Duration::from_secs(300);

/// A replica's configuration and sync state.
pub struct Follower {
    pub master_url: String,
    pub replica_id: String,
    pub public_url: Option<String>,
    pub interval: u64,
    /// `SYNC_MODE=stream` with `SYNC_INTERVAL` > 0: a long-poll wakes the sync of each database
    /// that committed on the master; rounds are only the safety net.
    pub streaming: bool,
    omit: HashSet<String>,
    http: reqwest::Client,
    /// One round at a time: the scheduled loop and `POST /api/replica/sync` share it.
    round_lock: tokio::sync::Mutex<()>,
    /// One sync of a database at a time (a round's and a stream's never interleave their pages),
    /// by database name.
    db_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Databases synced at once, so that a replica of 1,000 databases opens a handful of
    /// connections to the master, not 1,000.
    slots: tokio::sync::Semaphore,
    /// Databases the stream woke whose sync is running, with the newer position it must reach
    /// when it is done (`Some`), by name.
    kicked: Mutex<HashMap<String, Option<(String, Value)>>>,
    /// Woken whenever the copy moves (a page applied, a snapshot restored, a round ended), for
    /// reads waiting for a position.
    moved: tokio::sync::Notify,
    /// `REPLICA_READ_WAIT_MS`.
    pub read_wait: Duration,
    /// `REPLICA_WRITES=forward`: writes are proxied to the master instead of refused.
    pub forward_writes: bool,
    /// Per-database state for `/health`. Held only to read or update.
    pub dbs: Mutex<BTreeMap<String, DbSync>>,
    /// Time of the last round that completed without error, and the last error.
    pub last_round: Mutex<(Option<String>, Option<String>)>,
    /// When the last round completed without error.
    last_ok_at: Mutex<Option<Instant>>,
    started: Instant,
    /// Whether this replica holds data to serve: some database was bootstrapped, now or by an
    /// earlier run. Until then `/health` and every data request answer 503, so that load
    /// balancers do not send traffic to an empty node.
    ready: std::sync::atomic::AtomicBool,
    /// Whether the last round got the master's status: the loop backs off as a whole only when
    /// the master itself cannot be reached; failing databases back off one by one.
    master_reachable: std::sync::atomic::AtomicBool,
    /// Why the master refuses this replica's token (another `JWT_SECRET`, or clocks too far
    /// apart), from its last answer: while set the replica is not ready, since it would serve
    /// every signed-in user as a guest.
    refused: Mutex<Option<String>>,
    /// Whether `refused` holds a reason: read on every request, so an atomic.
    refused_now: std::sync::atomic::AtomicBool,
    /// Streaming: when the master last answered the long-poll (it answers at least every
    /// [`STREAM_HOLD`]), and whether the stream is broken off now. A broken stream makes the
    /// replica stale, and its lag grow from the last contact.
    contact: Mutex<(Instant, Option<String>)>,
}

/// How long the master holds an idle stream request before it answers: the longest silence of
/// a working stream.
pub const STREAM_HOLD: Duration = Duration::from_secs(2);

/// How long a stream request may go unanswered before the link counts as broken: a frozen
/// link or a partition is noticed within this long, whatever the TCP timeouts.
pub const STREAM_SILENCE: Duration = Duration::from_millis(4500);

/// The replica id: `REPLICA_ID`, else the one kept in `DATA_DIR/.replica_id`, else a new one.
pub fn replica_id(config: &ServeConfig) -> std::io::Result<String> {
    if let Some(id) = &config.replica_id {
        return Ok(id.clone());
    }
    let path = config.data_dir.join(".replica_id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_string());
        }
    }
    let id = format!("replica-{}", random_id(8));
    std::fs::write(&path, &id)?;
    Ok(id)
}

impl Follower {
    pub fn new(config: &ServeConfig) -> std::io::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(SYNC_SLOTS + 1)
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Follower {
            master_url: config
                .master_url
                .clone()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string(),
            replica_id: replica_id(config)?,
            public_url: config.public_url.clone(),
            interval: config.sync_interval,
            streaming: config.sync_mode == "stream" && config.sync_interval > 0,
            omit: config.omitted_dbs().into_iter().collect(),
            http,
            round_lock: tokio::sync::Mutex::new(()),
            db_locks: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(SYNC_SLOTS),
            kicked: Mutex::new(HashMap::new()),
            moved: tokio::sync::Notify::new(),
            read_wait: Duration::from_millis(config.replica_read_wait_ms),
            forward_writes: config.replica_writes == "forward",
            dbs: Mutex::new(BTreeMap::new()),
            last_round: Mutex::new((None, None)),
            last_ok_at: Mutex::new(None),
            started: Instant::now(),
            ready: std::sync::atomic::AtomicBool::new(false),
            master_reachable: std::sync::atomic::AtomicBool::new(false),
            refused: Mutex::new(None),
            refused_now: std::sync::atomic::AtomicBool::new(false),
            contact: Mutex::new((Instant::now(), None)),
        })
    }

    /// The position this replica has applied of database `name`.
    pub fn position(&self, name: &str) -> Option<Position> {
        let m = self.dbs.lock().ok()?;
        let s = m.get(name)?;
        let (epoch, uid) = s.origin.as_ref()?;
        Some(Position::new(
            epoch,
            uid,
            s.local_version,
            s.hash_at(s.local_version).unwrap_or(""),
        ))
    }

    /// Whether this replica has reached `want` of database `name` (see [`DbSync::reaches`]).
    fn reaches(&self, name: &str, want: &Position) -> Option<bool> {
        self.dbs.lock().ok()?.get(name)?.reaches(want)
    }

    /// Holds a read until this replica has applied `token` (an `X-Db-Position` of database
    /// `name`), fetching from the master at once when it has not, for at most `read_wait`.
    /// `Ok(false)` when the wait ran out: the position is ahead of the master's reach in time,
    /// or of another history that no re-bootstrap brought here.
    pub async fn wait_for_position(&self, state: &web::Data<AppState>, name: &str, token: &str) -> bool {
        // A position the master has not reached yet (or of another history) is asked for again
        // at most this often while the read waits, not in a tight loop of rounds.
        const RETRY: Duration = Duration::from_millis(200);
        let deadline = tokio::time::Instant::now() + self.read_wait;
        let Some(want) = Position::parse(token) else {
            return false;
        };
        let mut next_fetch = tokio::time::Instant::now();
        loop {
            let moved = self.moved.notified();
            let reached = self.reaches(name, &want);
            if reached == Some(true) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            // A position further along the history this copy follows: fetch that database now.
            // Another history (a restored master, a re-created database, a master that lost its
            // last commits): a round, which re-bootstraps.
            if now >= next_fetch && reached == Some(false) {
                next_fetch = now + RETRY;
                self.kick(
                    state,
                    &want.epoch,
                    name,
                    json!({"name": name, "uid": want.uid, "version": want.version, "hash": want.hash}),
                );
            } else if now >= next_fetch && self.round_lock.try_lock().is_ok() {
                // Start a round now unless one is running; it wakes us as it applies pages.
                next_fetch = now + RETRY;
                let st = state.clone();
                actix_web::rt::spawn(async move {
                    if let Some(f) = st.follower.as_ref() {
                        let _ = f.round(&st, true).await;
                    }
                });
            }
            let _ = tokio::time::timeout_at(deadline.min(next_fetch.max(now + RETRY / 4)), moved).await;
        }
    }

    /// The HTTP client for the master (write forwarding uses it too).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Whether the replica serves requests: it holds data (see the `ready` field) and the
    /// master accepts its token.
    pub fn is_ready(&self) -> bool {
        self.unready_reason().is_none()
    }

    /// Why the replica does not serve requests now, in words for `/health` and the 503s.
    pub fn unready_reason(&self) -> Option<String> {
        let ready = self.ready.load(std::sync::atomic::Ordering::Acquire);
        if ready && !self.refused_now.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        if let Some(refused) = self.refused.lock().ok().and_then(|r| r.clone()) {
            return Some(format!("replica is not ready: {refused}"));
        }
        (!ready).then(|| "replica is not ready: it has no data from the master yet".into())
    }

    /// Notes the master's answer to a request: a 401 refuses this replica (see `refused`),
    /// anything else from the master accepts it again.
    fn note_answer(&self, status: u16, refusal: &str) {
        if let Ok(mut r) = self.refused.lock() {
            *r = (status == 401).then(|| refusal.to_string());
            self.refused_now
                .store(r.is_some(), std::sync::atomic::Ordering::Release);
        }
    }

    fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Marks the replica ready when a database on disk was synced by an earlier run (it then
    /// serves reads even if the master is down), and shows the local positions in `/health`.
    ///
    /// A copy restored from a snapshot of an older vski still holds the master's changelog
    /// entries (pre-images of deleted and updated rows); they are dropped here, keeping only the
    /// position.
    pub async fn load_positions(&self, state: &AppState) {
        for db in state.dbs.list().into_iter().filter(|d| self.follows(&d.name)) {
            if let Ok(Some(l)) = db.read(|conn| Ok(local_state(conn)?)).await {
                self.set_ready();
                self.note(&db.name, |s| {
                    s.local_version = l.version;
                    s.origin = Some((l.epoch.clone(), l.uid.clone()));
                    s.restarted(l.version, &l.hash);
                });
                let dropped = db
                    .write(|conn| {
                        Ok(conn.execute(
                            "DELETE FROM _changelog WHERE version < (SELECT MAX(version) FROM _changelog)",
                            [],
                        )? + conn
                            .execute("UPDATE _changelog SET changeset = x'' WHERE length(changeset) > 0", [])?)
                    })
                    .await;
                if let Some(n) = dropped.ok().filter(|n| *n > 0) {
                    log::info!("dropped {n} changelog entries of the master kept in '{}'", db.name);
                }
            }
        }
    }

    /// `stream`, `poll` or `manual`, as shown in `/health` and told to the master.
    pub fn sync_mode(&self) -> &'static str {
        match (self.interval, self.streaming) {
            (0, _) => "manual",
            (_, true) => "stream",
            _ => "poll",
        }
    }

    /// Whether database `name` is replicated to this node.
    pub fn follows(&self, name: &str) -> bool {
        is_replicated_db(name) && !self.omit.contains(name)
    }

    fn request(&self, state: &AppState, method: reqwest::Method, path: &str) -> ApiResult<reqwest::RequestBuilder> {
        let token = state
            .tokens
            .mint(&TokenKeys::claims(TokenType::Replica, &self.replica_id, 300))?;
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.master_url))
            .bearer_auth(token)
            .header("X-Replica-Id", &self.replica_id)
            .header("X-Replica-Sync-Mode", self.sync_mode());
        if let Some(url) = &self.public_url {
            rb = rb.header("X-Replica-Public-Url", url);
        }
        Ok(rb)
    }

    /// A page of changesets: `Ok` with the entries decoded from the streamed body on 200, else
    /// `Err` with the (small) error body.
    async fn get_page(&self, state: &AppState, path: &str) -> Result<(u16, Result<Page, Value>), String> {
        use futures_util::TryStreamExt;
        let resp = self
            .request(state, reqwest::Method::GET, path)
            .map_err(|e| e.to_string())?
            .send()
            .await
            .map_err(|e| format!("GET {}: {}", self.master_url, transport_error(&e)))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Ok((status, Err(resp.json::<Value>().await.unwrap_or(Value::Null))));
        }
        let stream = resp.bytes_stream().map_err(std::io::Error::other);
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        let page =
            tokio::task::spawn_blocking(move || serde_json::from_reader::<_, Page>(std::io::BufReader::new(reader)))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading a page of changesets: {e}"))?;
        Ok((status, Ok(page)))
    }

    /// The master's status without checksums, with how far the master's clock is ahead of this
    /// one (from its `Date` header), to tell clock skew from a wrong secret on a 401.
    async fn get_status(&self, state: &AppState) -> Result<(u16, Value, Option<i64>), String> {
        let resp = self
            .send_get(state, "/api/replica/status?checksum=0", Some(Duration::from_secs(60)))
            .await?;
        let status = resp.status().as_u16();
        // Every vski answer says which role sent it: anything else is not the master.
        let mode = resp.headers().get("x-replica-mode").and_then(|v| v.to_str().ok());
        match mode {
            Some("master") => {}
            Some("replica") => {
                let id = resp
                    .headers()
                    .get("x-replica-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?");
                return Err(format!(
                    "MASTER_URL {} reached a replica (REPLICA_ID {id}), not the master: point MASTER_URL at the master itself",
                    self.master_url
                ));
            }
            _ => {
                let server = resp
                    .headers()
                    .get(reqwest::header::SERVER)
                    .and_then(|v| v.to_str().ok())
                    .map(|s| format!(", Server: {s}"))
                    .unwrap_or_default();
                return Err(format!(
                    "MASTER_URL {} answered {status} to /api/replica/status without X-Replica-Mode{server}: it is not a vski \
                     node (a proxy, which must not publish /api/replica/*?); point MASTER_URL at the master itself",
                    self.master_url
                ));
            }
        }
        let skew = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .map(|t| {
                let master = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                master - crate::util::unix_now() as i64
            });
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body, skew))
    }

    /// A small request: it must complete within a minute.
    async fn get_json(&self, state: &AppState, path: &str) -> Result<(u16, Value), String> {
        self.get_json_within(state, path, Some(Duration::from_secs(60))).await
    }

    /// A request with an overall deadline, or with none (a page of changesets, whose size
    /// varies: there only the client's idle timeout applies, so a slow link that keeps sending
    /// finishes the page instead of retrying it forever).
    async fn get_json_within(
        &self,
        state: &AppState,
        path: &str,
        total: Option<Duration>,
    ) -> Result<(u16, Value), String> {
        let resp = self.send_get(state, path, total).await?;
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Sends a GET of `path` to the master, with an overall deadline when `total` is given.
    async fn send_get(
        &self,
        state: &AppState,
        path: &str,
        total: Option<Duration>,
    ) -> Result<reqwest::Response, String> {
        let mut rb = self
            .request(state, reqwest::Method::GET, path)
            .map_err(|e| e.to_string())?;
        if let Some(t) = total {
            rb = rb.timeout(t);
        }
        rb.send()
            .await
            .map_err(|e| format!("GET {}: {}", self.master_url, transport_error(&e)))
    }

    /// Changes the sync state of `db`; logs when the change brought the copy to the master's
    /// version for the first time since start or its last snapshot.
    fn note<F: FnOnce(&mut DbSync)>(&self, db: &str, f: F) {
        if let Ok(mut m) = self.dbs.lock() {
            let s = m.entry(db.to_string()).or_default();
            f(s);
            if std::mem::take(&mut s.announce) {
                log::info!("'{db}' caught up with the master at version {}", s.local_version);
            }
        }
    }

    /// One sync round: every followed database of the master is brought up to date, all of
    /// them at once, each on its own (a busy database does not hold up a quiet one). A
    /// database still backing off from failures is skipped unless `force` (a manual sync).
    pub async fn round(&self, state: &web::Data<AppState>, force: bool) -> Result<(), String> {
        let _one_at_a_time = self.round_lock.lock().await;
        let result = self.round_inner(state, force).await;
        self.moved.notify_waiters();
        if let Ok(mut last) = self.last_round.lock() {
            match &result {
                Ok(()) => {
                    *last = (Some(now_string()), None);
                    if let Ok(mut at) = self.last_ok_at.lock() {
                        *at = Some(Instant::now());
                    }
                }
                Err(e) => last.1 = Some(e.clone()),
            }
        }
        result
    }

    async fn round_inner(&self, state: &web::Data<AppState>, force: bool) -> Result<(), String> {
        self.master_reachable.store(false, std::sync::atomic::Ordering::Release);
        let (status, body, skew) = self.get_status(state).await?;
        if status != 200 {
            let e = status_error(status, "/api/replica/status", &body, skew);
            self.note_answer(status, &e);
            return Err(e);
        }
        self.note_answer(status, "");
        self.master_reachable.store(true, std::sync::atomic::Ordering::Release);
        let epoch = body["epoch"].as_str().unwrap_or_default().to_string();
        let Some(master_dbs) = body["dbs"].as_array().cloned() else {
            return Err("the master's status has no database list".into());
        };
        self.drop_deleted(state, &master_dbs).await;
        let now = Instant::now();
        let due: Vec<(String, Value)> = master_dbs
            .into_iter()
            .filter_map(|d| Some((d["name"].as_str()?.to_string(), d)))
            .filter(|(name, _)| self.follows(name) && crate::db::is_valid_db_name(name))
            .filter(|(name, _)| force || self.retry_at(name).is_none_or(|at| at <= now))
            .collect();
        let epoch = epoch.as_str();
        let results =
            futures_util::future::join_all(due.iter().map(|(name, d)| async move {
                (name, self.sync_tracked(state, epoch, name, d, false).await.map(|_| ()))
            }))
            .await;
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}")))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Removes the copies of databases the master no longer has: first from the registry (so
    /// they are not served), then closed, then their files deleted. System databases stay.
    async fn drop_deleted(&self, state: &web::Data<AppState>, master_dbs: &[Value]) {
        let on_master: HashSet<&str> = master_dbs.iter().filter_map(|d| d["name"].as_str()).collect();
        for db in state.dbs.list() {
            let name = db.name.clone();
            if !self.follows(&name)
                || crate::db::SYSTEM_DBS.contains(&name.as_str())
                || on_master.contains(name.as_str())
            {
                continue;
            }
            drop(db);
            let st = state.clone();
            let n = name.clone();
            match tokio::task::spawn_blocking(move || st.dbs.delete(&n)).await {
                Ok(Ok(())) => {
                    state.schemas.forget(&name);
                    if let Ok(mut m) = self.dbs.lock() {
                        m.remove(&name);
                    }
                    log::info!("database '{name}' was deleted on the master; its copy is removed");
                }
                Ok(Err(e)) => log::warn!("cannot remove '{name}', deleted on the master: {e}"),
                Err(e) => log::warn!("cannot remove '{name}', deleted on the master: {e}"),
            }
        }
    }

    /// Starts a quick sync of `name` up to the master's position `master` (`{name, uid,
    /// version}`), unless one is running: that one then goes on to this position when it is
    /// done. So a database under a stream of commits has one sync at a time, never a queue.
    /// A database backing off from failures is synced when its wait is over.
    fn kick(&self, state: &web::Data<AppState>, epoch: &str, name: &str, master: Value) {
        {
            let mut k = self.kicked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(next) = k.get_mut(name) {
                *next = Some((epoch.to_string(), master));
                return;
            }
            k.insert(name.to_string(), None);
        }
        let st = state.clone();
        let (mut epoch, mut master, name) = (epoch.to_string(), master, name.to_string());
        actix_web::rt::spawn(async move {
            let Some(f) = st.follower.as_ref() else { return };
            loop {
                // A database backing off from failures is tried again when its wait is over,
                // whether or not another commit comes.
                if let Some(at) = f.retry_at(&name).filter(|at| *at > Instant::now()) {
                    tokio::time::sleep_until(at.into()).await;
                }
                // A failed sync is not caught up: it is tried again when the database's backoff
                // (2, 4, 8 s) is over, not at the next safety round.
                let result = f.sync_tracked(&st, &epoch, &name, &master, true).await;
                let caught_up = matches!(result, Ok(true));
                // A database the master deleted (a round removed it here) is not retried.
                let gone = result.is_err() && f.dbs.lock().is_ok_and(|m| !m.contains_key(&name));
                let mut k = f.kicked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match k.get_mut(&name).and_then(Option::take) {
                    Some((e, m)) => (epoch, master) = (e, m),
                    // Out of turns but not caught up: another turn, behind the databases
                    // waiting for a slot.
                    None if !caught_up && !gone => {}
                    None => {
                        k.remove(&name);
                        break;
                    }
                }
            }
        });
    }

    /// When database `name` may be synced again after failures (`None`: now).
    fn retry_at(&self, name: &str) -> Option<Instant> {
        self.dbs.lock().ok().and_then(|m| m.get(name).and_then(|s| s.retry_at))
    }

    /// The lock that keeps syncs of database `name` one at a time.
    fn db_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.db_locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(name.to_string()).or_default().clone()
    }

    /// Syncs database `name` to the master's position `master` (an entry of the master's
    /// status or stream answer), one sync of it at a time and at most [`SYNC_SLOTS`] databases
    /// at once, and keeps its failure count and backoff. `quick` (a stream wake-up) only
    /// fetches and applies entries; a round also checks the schema and checksum and acks.
    async fn sync_tracked(
        &self,
        state: &web::Data<AppState>,
        epoch: &str,
        name: &str,
        master: &Value,
        quick: bool,
    ) -> Result<bool, String> {
        let lock = self.db_lock(name);
        let _one_at_a_time = lock.lock().await;
        let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
        let before = self.position(name).map(|p| p.version);
        let mut result = self.sync_db(state, epoch, name, master, quick).await;
        // Files follow the records: after the database, the files its records name. Every
        // journal entry is written with a record change, so a stream wake-up that applied
        // nothing has no file to fetch (unless the last file sync failed).
        let files_behind = self.dbs.lock().ok().and_then(|m| m.get(name).map(|s| s.files_behind));
        let unchanged = quick && before.is_some() && before == self.position(name).map(|p| p.version);
        if result.is_ok() && !(unchanged && files_behind == Some(false)) {
            let synced = self.sync_files(state, name).await;
            self.note(name, |s| s.files_behind = synced.is_err());
            if let Err(e) = synced {
                result = Err(format!("file sync: {e}"));
            }
        }
        match &result {
            Ok(_) => self.note(name, |s| {
                s.failures = 0;
                s.retry_at = None;
            }),
            Err(e) => {
                log::warn!("sync of '{name}' failed: {e}");
                // Streaming, the next try comes within seconds (a master restart is routine);
                // polling, not before the next round.
                let interval = if self.streaming { 1 } else { self.interval };
                self.note(name, |s| {
                    s.last_error = Some(e.clone());
                    s.failures = s.failures.saturating_add(1);
                    s.retry_at = Some(Instant::now() + backoff(s.failures, interval));
                });
            }
        }
        result
    }

    /// Brings the files of database `name` in line with the master's (local storage): the
    /// master's file journal after the position kept in `_replica_state` (`files`), or its
    /// whole list when there is no position or the entries after it were pruned. Only for
    /// databases whose collections have file fields.
    async fn sync_files(&self, state: &web::Data<AppState>, name: &str) -> Result<(), String> {
        use crate::collections::model::FieldType;
        if state.storage.s3.is_some() {
            // Every node reads the same bucket.
            return Ok(());
        }
        let Some(db) = state.dbs.get(name) else { return Ok(()) };
        let schema = state.schemas.get(&db).await.map_err(|e| e.to_string())?;
        let has_files = schema
            .all()
            .iter()
            .any(|c| c.live_fields().any(|f| f.kind == FieldType::File));
        if !has_files {
            return Ok(());
        }
        let saved: Option<i64> = db
            .read(|conn| Ok(state_value(conn, "files")?.and_then(|v| v.parse().ok())))
            .await
            .map_err(|e| e.to_string())?;
        let mut pos = match saved {
            Some(p) => p,
            None => self.reconcile_files(state, &db).await?,
        };
        let mut reconciled = saved.is_none();
        loop {
            let (status, body) = self
                .get_json(state, &format!("/api/replica/files?db={name}&since={pos}&limit=500"))
                .await?;
            if status == 410 && !reconciled {
                pos = self.reconcile_files(state, &db).await?;
                reconciled = true;
                continue;
            }
            if status != 200 {
                return Err(format!("master answered {status} to the file journal"));
            }
            let entries: Vec<crate::files::replica::Entry> =
                serde_json::from_value(body["entries"].clone()).map_err(|e| format!("file journal: {e}"))?;
            let Some(last) = entries.last().map(|e| e.id) else {
                break;
            };
            for e in &entries {
                self.apply_file(state, name, e).await?;
            }
            pos = last;
            save_files_position(&db, pos).await?;
        }
        if saved != Some(pos) {
            save_files_position(&db, pos).await?;
        }
        Ok(())
    }

    /// Downloads what is missing and deletes what the master no longer has; returns the
    /// master's journal head at the time of its list.
    async fn reconcile_files(&self, state: &web::Data<AppState>, db: &Arc<Database>) -> Result<i64, String> {
        let (status, body) = self
            .get_json(state, &format!("/api/replica/files?db={}&list=1", db.name))
            .await?;
        if status != 200 {
            return Err(format!("master answered {status} to the file list"));
        }
        let wanted: Vec<crate::files::replica::Entry> =
            serde_json::from_value(body["files"].clone()).map_err(|e| format!("file list: {e}"))?;
        let root = state.storage.root.join(&db.name);
        let r2 = root.clone();
        let have: HashMap<String, u64> = tokio::task::spawn_blocking(move || local_files(&r2))
            .await
            .map_err(|e| e.to_string())?;
        let mut fetched = 0;
        for e in &wanted {
            if have.get(&e.path) != Some(&(e.size as u64)) {
                self.apply_file(state, &db.name, e).await?;
                fetched += 1;
            }
        }
        let keep: HashSet<&str> = wanted.iter().map(|e| e.path.as_str()).collect();
        let mut removed = 0;
        for path in have.keys().filter(|p| !keep.contains(p.as_str())) {
            let _ = std::fs::remove_file(root.join(path));
            removed += 1;
        }
        if fetched + removed > 0 {
            log::info!(
                "files of '{}' reconciled: {fetched} downloaded, {removed} deleted",
                db.name
            );
        }
        Ok(body["head"].as_i64().unwrap_or(0))
    }

    /// Applies one journal entry: downloads an added file (checking its size and sha256, then
    /// renaming it into place) or deletes a file or a record's directory.
    async fn apply_file(
        &self,
        state: &web::Data<AppState>,
        db: &str,
        e: &crate::files::replica::Entry,
    ) -> Result<(), String> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        if !crate::files::replica::valid_path(&e.path) {
            return Err(format!("the master sent an invalid file path '{}'", e.path));
        }
        let target = state.storage.root.join(db).join(&e.path);
        if e.op == "delete" {
            let result = if e.path.ends_with('/') {
                tokio::fs::remove_dir_all(&target).await
            } else {
                tokio::fs::remove_file(&target).await
            };
            return match result {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.to_string()),
                _ => Ok(()),
            };
        }
        let resp = self
            .request(
                state,
                reqwest::Method::GET,
                &format!("/api/replica/files/{}?db={db}", e.path),
            )
            .map_err(|e| e.to_string())?
            .send()
            .await
            .map_err(|e| describe_transport(&e))?;
        if resp.status().as_u16() == 404 {
            // Deleted on the master since: its delete entry follows.
            return Ok(());
        }
        if !resp.status().is_success() {
            return Err(format!("master answered {} to file {}", resp.status().as_u16(), e.path));
        }
        let tmp_dir = state.storage.tmp_dir();
        tokio::fs::create_dir_all(&tmp_dir).await.map_err(|e| e.to_string())?;
        let tmp = tmp_dir.join(format!("sync-{}", random_id(20)));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| e.to_string())?;
        let mut hasher = sha2::Sha256::new();
        let mut size: u64 = 0;
        let mut stream = resp.bytes_stream();
        use futures_util::StreamExt;
        let written: Result<(), String> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| describe_transport(&e))?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            file.sync_all().await.map_err(|e| e.to_string())
        }
        .await;
        drop(file);
        let sha = crate::util::hex(&hasher.finalize());
        let checked = written.and_then(|()| {
            if size as i64 != e.size || (!e.sha256.is_empty() && sha != e.sha256) {
                Err(format!(
                    "file {} arrived with size {size} and sha256 {sha}, expected {} and {}",
                    e.path, e.size, e.sha256
                ))
            } else {
                Ok(())
            }
        });
        if let Err(err) = checked {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err);
        }
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(|e| e.to_string())?;
        }
        tokio::fs::rename(&tmp, &target).await.map_err(|e| e.to_string())
    }

    /// Returns whether the copy caught up (a stream's sync that ran out of turns did not).
    async fn sync_db(
        &self,
        state: &web::Data<AppState>,
        epoch: &str,
        name: &str,
        master: &Value,
        quick: bool,
    ) -> Result<bool, String> {
        let master_version = master["version"].as_i64().unwrap_or(0);
        let master_uid = master["uid"].as_str().unwrap_or_default().to_string();
        let mut db = match state.dbs.get(name) {
            Some(db) => db,
            None => state.dbs.create(name).map_err(|e| e.to_string())?,
        };
        let local = db
            .read(|conn| Ok(local_state(conn)?))
            .await
            .map_err(|e| e.to_string())?;
        // What the master has is known now, whether or not the rest of the round works.
        let local_version = local.as_ref().map_or(0, |l| l.version);
        if !quick {
            self.note(name, |s| s.set_versions(local_version, master_version));
        }
        let (mut version, mut hash) = match local {
            // A version past the master's is not judged by `master_version`, which may be older
            // than what a stream's sync applied meanwhile: the master answers a pull from a
            // version it does not have with 410, and then the copy starts over.
            Some(l) if l.epoch == epoch && l.uid == master_uid => (l.version, l.hash),
            other => {
                let why = match other {
                    None => "no local copy".to_string(),
                    Some(l) if l.epoch != epoch => "the master's epoch changed".to_string(),
                    Some(_) => "the database was re-created on the master".to_string(),
                };
                self.bootstrap(state, &mut db, &why).await?
            }
        };
        let origin = (epoch.to_string(), master_uid.clone());
        self.note(name, |s| {
            s.local_version = version;
            s.origin = Some(origin);
            if s.hash_at(version).is_none_or(|h| h != super::position::prefix(&hash)) {
                s.restarted(version, &hash);
            }
        });
        // A bootstrap is followed by entries after the snapshot; a master that keeps answering
        // 410 (or forking) after that is broken, and the round gives up instead of looping.
        let mut snapshots_this_round = 0;
        // The master's head as its pages tell (a wake-up's target may come from a client's
        // token, which proves nothing).
        let mut master_head = None;
        // A stream wake-up for a position this copy already has needs no request.
        let mut pages = 0;
        // A master at or behind this copy's version on another history (restored, or it lost
        // its last commits) is not caught up with: the pull gets 410 and a snapshot.
        let master_hash = master["hash"].as_str().unwrap_or_default();
        let same_history = self.dbs.lock().is_ok_and(|m| {
            m.get(name)
                .and_then(|s| s.hash_at(master_version))
                .is_none_or(|h| h.is_empty() || master_hash.is_empty() || h == master_hash)
        });
        let mut caught_up = quick && version >= master_version && same_history;
        while !caught_up {
            if quick && pages == QUICK_PAGES {
                // Enough for one turn: the slot goes to the next database, this one comes again.
                break;
            }
            pages += 1;
            let path = format!("/api/replica/changesets?db={name}&since={version}&hash={hash}&limit=1000");
            let (status, page) = self.get_page(state, &path).await?;
            let (body, page) = match page {
                Ok(p) => (Value::Null, p),
                Err(body) => (body, Page::default()),
            };
            if status == 410 {
                snapshots_this_round += 1;
                if snapshots_this_round > MAX_SNAPSHOTS_PER_ROUND {
                    return Err(format!(
                        "the master answered 410 again after {MAX_SNAPSHOTS_PER_ROUND} snapshots in this round: {}",
                        body["message"]
                    ));
                }
                let why = if body["data"]["historyMismatch"] == json!(true) {
                    "the master's history differs from this copy's (restored or replaced master)"
                } else {
                    "the master pruned the versions this copy needs"
                };
                (version, hash) = self.bootstrap(state, &mut db, why).await?;
                continue;
            }
            if status != 200 {
                return Err(status_error(status, "changesets", &body, None));
            }
            if page.epoch != epoch || page.uid != master_uid {
                return Err("the master changed during the round; the next round starts over".into());
            }
            master_head = Some(page.version);
            let entries = page.entries;
            let Some(last) = entries.last().map(|e| e.version) else {
                // An empty page: this copy has all the master had, and the master knows it (a
                // pull from a version says that version is applied).
                caught_up = true;
                break;
            };
            if entries[0].version != version + 1 {
                return Err(format!(
                    "expected version {} next, got {}",
                    version + 1,
                    entries[0].version
                ));
            }
            if let Some(broken) = chain_break(&hash, &entries) {
                return Err(format!("entry {broken} does not chain to the history before it"));
            }
            let last_hash = entries.last().map(|e| e.hash.clone()).unwrap_or_default();
            let hashes: Vec<(i64, String)> = entries.iter().map(|e| (e.version, e.hash.clone())).collect();
            let (first, count, db_name) = (entries[0].version, entries.len(), name.to_string());
            log::debug!("applying {count} entries to '{db_name}' (versions {first}..={last})");
            let stored_hash = last_hash.clone();
            // Realtime subscribers on this replica get the page's changes once it commits.
            let events: Vec<Vec<u8>> = if state.realtime.enabled && state.realtime.watching(name) {
                entries.iter().map(|e| e.changeset.clone()).collect()
            } else {
                Vec::new()
            };
            let conflicts;
            let expected = version;
            (version, conflicts) = db
                .write(move |conn| {
                    // Only the sync that read this position may continue it: entries are never
                    // applied twice.
                    let at = local_state(conn)?.map_or(0, |l| l.version);
                    if at != expected {
                        return Err(ApiError::internal(
                            "sync",
                            format!("the copy moved from version {expected} to {at} during the sync"),
                        ));
                    }
                    let conflicts = apply_entries(conn, &entries, Conflicts::Converge)?;
                    conn.execute_batch(STATE_DDL)?;
                    set_state(conn, "version", &last.to_string())?;
                    set_state(conn, "hash", &stored_hash)?;
                    crate::crash::point("apply:before_commit");
                    Ok((last, conflicts))
                })
                .await
                .map_err(|e| e.to_string())?;
            if conflicts > 0 {
                self.note(name, |s| s.conflicts += conflicts);
            }
            hash = last_hash;
            // Collections may have changed: the API must know them before the new version is
            // reported (readers then find what the version promises).
            state.schemas.reload(&db).await.map_err(|e| e.to_string())?;
            for changeset in events {
                state.realtime.publish(name, changeset);
            }
            log::debug!("applied entries to '{name}', now at version {version}");
            self.note(name, |s| {
                for (v, h) in &hashes {
                    s.applied(*v, h);
                }
                s.set_versions(version, s.master_version.max(version));
            });
            self.moved.notify_waiters();
            // What the master had at the round's start is enough for this round: a database
            // under sustained writes must not keep the round, and the manual sync, forever. A
            // stream's sync pulls until an empty page (at most QUICK_PAGES), so that the master
            // hears the version it ends at.
            if !quick && version >= master_version {
                break;
            }
        }
        if quick {
            let now = now_string();
            let head = master_head.unwrap_or(master_version).max(version);
            self.note(name, |s| {
                s.set_versions(version, head);
                s.last_sync = Some(now);
                s.last_error = None;
            });
            return Ok(caught_up);
        }
        // A safety net: once caught up, the schemas must agree; if not, migrate to the master's.
        let local_hash = db
            .read(|conn| Ok(schema::hash(&schema::objects(conn)?)))
            .await
            .map_err(|e| e.to_string())?;
        if version == master_version && Some(local_hash.as_str()) != master["schemaHash"].as_str() {
            log::warn!("drift: schema of '{name}' differs from the master's; repairing it via schema-sync");
            self.note(name, |s| s.schema_repairs += 1);
            let (status, body) = self
                .get_json(state, &format!("/api/replica/schema-sync?db={name}"))
                .await?;
            if status != 200 {
                return Err(format!("master answered {status} to schema-sync"));
            }
            let objects: Vec<schema::SchemaObject> =
                serde_json::from_value(body["objects"].clone()).map_err(|e| format!("schema-sync: {e}"))?;
            db.write(move |conn| Ok(schema::migrate(conn, &objects)?))
                .await
                .map_err(|e| e.to_string())?;
            state.schemas.reload(&db).await.map_err(|e| e.to_string())?;
        }
        if version == master_version {
            self.verify(state, &db, version).await;
        }
        let now = now_string();
        self.note(name, |s| {
            s.set_versions(version, master_version.max(version));
            s.last_sync = Some(now);
            s.last_error = None;
        });
        let files: Option<i64> = db
            .read(|conn| Ok(state_value(conn, "files")?.and_then(|v| v.parse().ok())))
            .await
            .unwrap_or(None);
        let ack = self
            .request(state, reqwest::Method::POST, "/api/replica/ack")
            .map_err(|e| e.to_string())?
            .timeout(Duration::from_secs(30))
            .json(&json!({"db": name, "version": version, "files": files}))
            .send()
            .await;
        if let Err(e) = ack {
            log::warn!("ack of '{name}' failed: {e}");
        }
        Ok(true)
    }

    /// Compares the logical checksum of the copy at `version` with the master's, at most every
    /// [`VERIFY_EVERY`] per database. A difference is drift that applying entries did not show:
    /// it is logged and shown in `/health` (`checksumMismatch`), never repaired silently.
    async fn verify(&self, state: &AppState, db: &Arc<Database>, version: i64) {
        let due = self
            .dbs
            .lock()
            .ok()
            .and_then(|m| m.get(&db.name).map(|s| (s.verified_version, s.verified_at)))
            .is_none_or(|(v, at)| v != Some(version) && at.is_none_or(|t| t.elapsed() >= VERIFY_EVERY));
        if !due {
            return;
        }
        let path = format!("/api/replica/status?db={}", db.name);
        let theirs = match self.get_json(state, &path).await {
            Ok((200, body)) => body["dbs"]
                .as_array()
                .and_then(|a| a.first().cloned())
                .filter(|d| d["version"].as_i64() == Some(version))
                .and_then(|d| d["sha256"].as_str().map(str::to_string)),
            _ => None,
        };
        // The master moved on meanwhile (or did not answer): compare another time.
        let Some(theirs) = theirs else { return };
        let ours = db
            .read(|conn| {
                conn.execute_batch("BEGIN")?;
                let sum = super::checksum::logical_checksum(conn);
                conn.execute_batch("COMMIT")?;
                Ok(sum?)
            })
            .await;
        let Ok(ours) = ours else { return };
        let mismatch = ours != theirs;
        if mismatch {
            log::warn!(
                "drift: '{}' at version {version} has another content than the master's (checksum {} here, {} there)",
                db.name,
                &ours[..12.min(ours.len())],
                &theirs[..12.min(theirs.len())]
            );
        }
        self.note(&db.name, |s| {
            s.checksum_mismatch = mismatch;
            s.verified_version = Some(version);
            s.verified_at = Some(Instant::now());
        });
    }

    /// Downloads a snapshot, checks it, and restores it into the live database in one step.
    /// Returns the version the database is at afterwards, and its history hash.
    async fn bootstrap(
        &self,
        state: &web::Data<AppState>,
        db: &mut Arc<Database>,
        why: &str,
    ) -> Result<(i64, String), String> {
        log::info!("downloading a snapshot of '{}': {why}", db.name);
        let dir = super::snapshot_dir(state.dbs.data_dir());
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!("download-{}-{}.db", db.name, random_id(8)));
        let result = self.bootstrap_into(state, db, &tmp).await;
        let _ = std::fs::remove_file(&tmp);
        let (version, hash) = result?;
        self.set_ready();
        self.moved.notify_waiters();
        state.schemas.reload(db).await.map_err(|e| e.to_string())?;
        self.note(&db.name, |s| {
            s.bootstraps += 1;
            s.local_version = version;
            s.restarted(version, &hash);
            // The copy is the master's snapshot at `version` byte for byte (its sha256 was
            // checked), so comparing logical checksums now would read both databases whole to
            // learn nothing. The next comparison comes with the next version.
            s.verified_version = Some(version);
        });
        log::info!("restored '{}' from a snapshot at version {version}", db.name);
        // Realtime subscribers get one `resync` instead of an event per changed record.
        state.realtime.resync(&db.name);
        Ok((version, hash))
    }

    async fn bootstrap_into(
        &self,
        state: &web::Data<AppState>,
        db: &mut Arc<Database>,
        tmp: &Path,
    ) -> Result<(i64, String), String> {
        let path = format!("/api/replica/download?db={}&digest=trailer", db.name);
        let mut resp = self
            .request(state, reqwest::Method::GET, &path)
            .map_err(|e| e.to_string())?
            .send()
            .await
            .map_err(|e| format!("GET {path}: {}", transport_error(&e)))?;
        if resp.status().as_u16() != 200 {
            return Err(status_error(resp.status().as_u16(), &path, &Value::Null, None));
        }
        let header = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (version, sha, epoch, uid) = (
            header("x-replica-version"),
            header("x-replica-sha256"),
            header("x-replica-epoch"),
            header("x-replica-db-uid"),
        );
        let version: i64 = version
            .parse()
            .map_err(|_| "snapshot without a version header".to_string())?;
        // With `digest=trailer` the body ends with the raw sha256 of what came before it
        // (a master that predates it sends the hex digest in the header instead): the last
        // bytes seen are held back until more arrive.
        let trailer = sha == "trailer";
        let hold = if trailer {
            super::master::TRAILER_LEN as usize
        } else {
            0
        };
        // The bytes are hashed and written on a blocking thread of their own while the next
        // ones arrive.
        let file = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel::<actix_web::web::Bytes>(16);
        let writer = tokio::task::spawn_blocking(move || write_hashed(file, rx));
        let mut tail: Vec<u8> = Vec::with_capacity(hold);
        let received = async {
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("downloading the snapshot: {e}"))?
            {
                let mut out = Vec::with_capacity(2);
                if chunk.len() >= hold {
                    if !tail.is_empty() {
                        out.push(actix_web::web::Bytes::from(std::mem::take(&mut tail)));
                    }
                    out.push(chunk.slice(..chunk.len() - hold));
                    tail.extend_from_slice(&chunk[chunk.len() - hold..]);
                } else {
                    tail.extend_from_slice(&chunk);
                    let cut = tail.len().saturating_sub(hold);
                    out.push(actix_web::web::Bytes::from(tail.drain(..cut).collect::<Vec<u8>>()));
                }
                for b in out {
                    // A closed channel means the writer failed: its error is reported below.
                    if tx.send(b).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok::<(), String>(())
        }
        .await;
        drop(tx);
        let (file, digest) = writer
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing the snapshot: {e}"))?;
        received?;
        let got = crate::util::hex(&digest);
        let want = if trailer { crate::util::hex(&tail) } else { sha };
        if tail.len() != hold || got != want {
            return Err("the snapshot's sha256 does not match the one the master sent".into());
        }
        // The copy reaches the disk while it is checked: `quick_check` reads it from the page
        // cache. Both must succeed before it replaces anything.
        let prepared: PathBuf = tmp.to_path_buf();
        let (e2, u2) = (epoch.clone(), uid.clone());
        let synced = tokio::task::spawn_blocking(move || file.sync_all());
        let checked = tokio::task::spawn_blocking(move || prepare_snapshot(&prepared, version, &e2, &u2));
        let (synced, checked) = futures_util::future::join(synced, checked).await;
        synced
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("syncing the snapshot: {e}"))?;
        let hash = checked.map_err(|e| e.to_string())??;
        let src = tmp.to_path_buf();
        let served = db
            .read(|conn| Ok(local_state(conn)?.is_some()))
            .await
            .map_err(|e| e.to_string())?;
        if served {
            // Readers may be on this copy: the new content goes in through the writer, in one
            // step of the backup API, and they see the old content or the new, never a mix.
            db.write_exclusive(move |conn| restore(conn, &src))
                .await
                .map_err(|e| e.to_string())?;
        } else {
            // Never bootstrapped, so nothing is served from it: the downloaded file simply
            // takes its place (close, rename, reopen), without writing it all again.
            let name = db.name.clone();
            let st = state.clone();
            *db = tokio::task::spawn_blocking(move || st.dbs.replace_with_file(&name, &src))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok((version, hash))
    }
}

/// A transport failure in words an operator acts on: "connection refused", "timed out".
pub fn describe_transport(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    let lower = text.to_lowercase();
    if e.is_timeout() || lower.contains("timed out") {
        "timed out".to_string()
    } else if lower.contains("connection refused") {
        "connection refused".to_string()
    } else if lower.contains("dns") || lower.contains("failed to lookup") {
        format!("cannot resolve the host name ({text})")
    } else {
        text
    }
}

/// [`describe_transport`] for a request to the master, with the setting to check.
pub fn transport_error(e: &reqwest::Error) -> String {
    match describe_transport(e) {
        s if s == "connection refused" => "connection refused (is the master running at MASTER_URL?)".into(),
        s if s.starts_with("cannot resolve the host name") => s.replacen("the host name", "the master's host name", 1),
        s => s,
    }
}

/// Clocks further apart than this make the master refuse replica tokens (its leeway for them).
const SKEW_LIMIT: i64 = crate::auth::token::REPLICA_LEEWAY as i64;

/// A refusal from the master in words. A 401 means another `JWT_SECRET`, or, when the master's
/// clock (`skew`: seconds it is ahead of this one) is further off than the token leeway, clock
/// skew.
fn status_error(status: u16, what: &str, body: &Value, skew: Option<i64>) -> String {
    match status {
        401 if skew.is_some_and(|s| s.abs() > SKEW_LIMIT) => {
            let skew = skew.unwrap_or(0);
            let now = crate::util::unix_now() as i64;
            format!(
                "401 from the master on {what}: clock skew: the master's clock says {} and this replica's {} \
                 ({} s apart, more than the {SKEW_LIMIT} s replica tokens allow); sync the clocks (NTP)",
                httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs((now + skew).max(0) as u64)),
                httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(now.max(0) as u64)),
                skew.abs()
            )
        }
        401 => format!("401 from the master on {what}: wrong JWT_SECRET? (it must be the master's)"),
        403 => format!("403 from the master on {what}: the token is not a replica token"),
        _ => format!(
            "master answered {status} to {what}: {}",
            body["message"].as_str().unwrap_or("(no message)")
        ),
    }
}

/// Snapshots one database may download in one round before the round gives up.
const MAX_SNAPSHOTS_PER_ROUND: usize = 2;

/// The first entry of a page that does not chain to the history before it (`hash`, then each
/// entry's own). Unknown hashes (`""`, from logs written before the chain) are not checked.
fn chain_break(hash: &str, entries: &[Entry]) -> Option<i64> {
    let mut cur = hash;
    for e in entries {
        if !cur.is_empty() && !e.prev_hash.is_empty() && e.prev_hash != cur {
            return Some(e.version);
        }
        cur = &e.hash;
    }
    None
}

/// Writes the chunks `rx` brings to `file`, hashing them on the way; returns the file (not yet
/// synced) and the sha256 of everything written.
fn write_hashed(
    mut file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<actix_web::web::Bytes>,
) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    use sha2::Digest;
    use std::io::Write;
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
    }
    Ok((file, hasher.finalize().to_vec()))
}

/// Checks a downloaded snapshot and records in it where it stands, so the restore carries its
/// own replica state: the data and the version switch together. Returns the history hash at
/// the snapshot's version.
fn prepare_snapshot(path: &Path, version: i64, epoch: &str, uid: &str) -> Result<String, String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if check != "ok" {
        return Err(format!("the snapshot failed quick_check: {check}"));
    }
    let inner = super::recorder::head(&conn).map_err(|e| e.to_string())?;
    if inner != version {
        return Err(format!("the snapshot holds version {inner}, its header says {version}"));
    }
    let hash = super::recorder::position_hash(&conn, version)
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    conn.execute_batch(STATE_DDL).map_err(|e| e.to_string())?;
    for (k, v) in [
        ("version", version.to_string()),
        ("epoch", epoch.to_string()),
        ("uid", uid.to_string()),
        ("hash", hash.clone()),
    ] {
        set_state(&conn, k, &v).map_err(|e| e.to_string())?;
    }
    Ok(hash)
}

/// Replaces the content of the live database with the file at `src`, in one step of the backup
/// API on the writer connection: readers see the old content until it commits, then the new.
fn restore(conn: &mut Connection, src: &Path) -> ApiResult<()> {
    let from = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    if crate::crash::is_armed("restore:mid") {
        // Copy part of the snapshot into the live database, then crash (tests only).
        let backup = rusqlite::backup::Backup::new(&from, conn)?;
        backup.step(1)?;
        crate::crash::point("restore:mid");
    }
    super::master::backup_all(&from, conn)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    Ok(())
}

/// A page of `changesets` as it arrives: entries are decoded one by one while the body streams
/// in, so neither the JSON text nor a JSON tree of the page is ever held whole.
#[derive(Debug, Default, Deserialize)]
struct Page {
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    uid: String,
    /// The master's head when it answered.
    #[serde(default)]
    version: i64,
    #[serde(default, deserialize_with = "wire_entries")]
    entries: Vec<Entry>,
}

/// One entry on the wire: the changeset in base64.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    version: i64,
    #[serde(default)]
    schema_hash: String,
    #[serde(default)]
    schema: Option<Vec<schema::SchemaObject>>,
    changeset: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    hash: String,
    #[serde(default)]
    prev_hash: String,
}

fn wire_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<Entry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of changelog entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Entry>, A::Error> {
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut out = Vec::new();
            // Each entry's base64 text lives only until it is decoded.
            while let Some(w) = seq.next_element::<WireEntry>()? {
                let changeset = b64.decode(&w.changeset).map_err(serde::de::Error::custom)?;
                out.push(Entry {
                    version: w.version,
                    schema_hash: w.schema_hash,
                    schema: w.schema,
                    changeset,
                    created: w.created,
                    hash: w.hash,
                    prev_hash: w.prev_hash,
                });
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Entries)
}

/// Runs a round now and then every `SYNC_INTERVAL` seconds (never when it is 0, apart from the
/// first round at start). A failed round is retried with exponential backoff, at most 5 minutes.
pub async fn sync_loop(state: web::Data<AppState>) {
    let Some(f) = state.follower.as_ref() else { return };
    // Failed rounds in a row that back off the whole loop: the master could not be reached (or,
    // in manual mode, anything failed: there is no next scheduled round to wait for).
    let mut failures: u32 = 0;
    loop {
        let result = f.round(&state, false).await;
        let reachable = f.master_reachable.load(std::sync::atomic::Ordering::Acquire);
        match &result {
            Ok(()) => {
                if failures > 0 {
                    log::info!("sync with {} works again", f.master_url);
                }
                failures = 0;
            }
            Err(e) => {
                if !reachable || f.interval == 0 {
                    failures = failures.saturating_add(1);
                }
                log::warn!("sync round with {} failed: {e}", f.master_url);
            }
        }
        let wait = match (&result, failures) {
            (Ok(()), _) if f.interval == 0 => return,
            (Err(_), n) if n > 0 => backoff(n, f.interval),
            _ => Duration::from_secs(f.interval),
        };
        tokio::time::sleep(wait).await;
    }
}

/// With `SYNC_MODE=stream`: holds one long-poll to the master for all databases, and syncs each
/// database the master reports moved the moment it answers. The rounds of [`sync_loop`] go on
/// every `SYNC_INTERVAL` as the safety net (schemas, new and deleted databases, acks).
pub async fn stream_loop(state: web::Data<AppState>) {
    let Some(f) = state.follower.as_ref().filter(|f| f.streaming) else {
        return;
    };
    let mut cursor = String::new();
    let mut failures: u32 = 0;
    loop {
        // The master answers an idle request after STREAM_HOLD: a request unanswered for
        // STREAM_SILENCE means the link is down, even when TCP says nothing (a partition).
        let path = format!("/api/replica/stream?since={cursor}&wait={}", STREAM_HOLD.as_secs());
        let answer = f.get_json_within(&state, &path, Some(STREAM_SILENCE)).await;
        let body = match answer {
            Ok((200, body)) => {
                if let Ok(mut c) = f.contact.lock() {
                    *c = (Instant::now(), None);
                }
                body
            }
            other => {
                failures = failures.saturating_add(1);
                let why = match other {
                    Ok((status, body)) => status_error(status, "/api/replica/stream", &body, None),
                    Err(e) if e.contains("timed out") || e.contains("timeout") => format!(
                        "no answer from the master within {:.1} s (a partition or a frozen master?)",
                        STREAM_SILENCE.as_secs_f64()
                    ),
                    Err(e) => e,
                };
                if failures == 1 {
                    log::warn!("stream from {} broke off ({why}); retrying", f.master_url);
                }
                if let Ok(mut c) = f.contact.lock() {
                    c.1 = Some(format!("stream: {why}"));
                }
                // Soon at first (a master restarting), then at most every 5 s.
                tokio::time::sleep(Duration::from_millis((100u64 << failures.min(6)).min(5000))).await;
                continue;
            }
        };
        if failures > 0 {
            log::info!("stream from {} works again", f.master_url);
            failures = 0;
            // Back after a break: a full round now, not at the next interval (databases created
            // or deleted meanwhile, the schema check, and the health it reports).
            let st = state.clone();
            actix_web::rt::spawn(async move {
                if let Some(f) = st.follower.as_ref() {
                    let _ = f.round(&st, true).await;
                }
            });
        }
        cursor = body["next"].as_str().unwrap_or_default().to_string();
        let epoch = body["epoch"].as_str().unwrap_or_default();
        for d in body["dbs"].as_array().into_iter().flatten() {
            let (Some(name), Some(uid), Some(version)) = (d["name"].as_str(), d["uid"].as_str(), d["version"].as_i64())
            else {
                continue;
            };
            if !f.follows(name) || !crate::db::is_valid_db_name(name) {
                continue;
            }
            let hash = d["hash"].as_str().unwrap_or_default();
            let same_history = match f.reaches(name, &Position::new(epoch, uid, version, hash)) {
                // This copy has that position of the same history: nothing to do.
                Some(true) => continue,
                Some(false) => true,
                // Another history at a version this copy has passed: the sync starts over.
                None => false,
            };
            if same_history {
                f.note(name, |s| s.set_versions(s.local_version, version.max(s.master_version)));
            }
            f.kick(&state, epoch, name, d.clone());
        }
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/replica/sync").route(web::post().to(sync_now)));
}

/// `POST /api/replica/sync` (admin): runs a round now and answers when it is done.
async fn sync_now(state: web::Data<AppState>, who: Identity) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let f = state
        .follower
        .as_ref()
        .ok_or_else(|| ApiError::not_found("This node is not a replica."))?;
    match f.round(&state, true).await {
        Ok(()) => Ok(HttpResponse::Ok().json(json!({"synced": true, "dbs": health(f)["dbs"].clone()}))),
        Err(e) => Ok(error_body(
            StatusCode::BAD_GATEWAY,
            &format!("Sync failed: {e}"),
            json!({}),
        )),
    }
}

/// The replica part of `/health`.
pub fn health(f: &Follower) -> Value {
    let mut dbs = f.dbs.lock().map(|m| m.clone()).unwrap_or_default();
    // A broken stream: every copy may be behind by as long as the master has been out of
    // reach, whatever the versions known from the last contact say.
    let (contact, stream_error) = f.contact.lock().map(|c| c.clone()).unwrap_or((f.started, None));
    let silent_ms = match &stream_error {
        Some(_) if f.streaming => contact.elapsed().as_millis() as u64,
        _ => 0,
    };
    for s in dbs.values_mut() {
        s.lag_ms = s
            .behind_since
            .map_or(0, |t| t.elapsed().as_millis() as u64)
            .max(silent_ms);
    }
    let (last_ok, last_error) = f.last_round.lock().map(|l| l.clone()).unwrap_or_default();
    let stream_broken = f.streaming && stream_error.is_some();
    let last_error = last_error.or(stream_error.filter(|_| f.streaming));
    // Seconds since the last successful round (since start when there was none yet).
    let last_ok_at = f.last_ok_at.lock().ok().and_then(|t| *t);
    let since_ok = last_ok_at.unwrap_or(f.started).elapsed().as_secs_f64();
    // Stale: the last round failed and no round succeeded since start, or, in scheduled mode,
    // for 3 intervals.
    // Streaming, a broken stream is stale at once.
    let stale = stream_broken
        || last_error.is_some() && (f.interval == 0 || last_ok_at.is_none() || since_ok > (f.interval * 3) as f64);
    json!({
        "ready": f.is_ready(),
        "secondsSinceLastSync": (since_ok * 10.0).round() / 10.0,
        "replicaId": f.replica_id,
        "masterUrl": f.master_url,
        "syncInterval": f.interval,
        "syncMode": f.sync_mode(),
        "lastSuccessfulRound": last_ok,
        "lastError": last_error,
        "stale": stale,
        "streamBroken": stream_broken,
        "dbs": dbs,
    })
}

/// Methods that write.
fn is_write(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// Writes a replica still accepts: sign-in and token refresh (they write nothing), and the
/// manual sync.
fn allowed_on_replica(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    let parts: Vec<&str> = p.split('/').collect();
    matches!(
        p,
        "/api/admins/auth-with-password" | "/api/auth/login" | "/api/replica/sync" | "/api/realtime"
    ) || (parts.len() == 5
        && parts[1] == "api"
        && parts[2] == "collections"
        && matches!(parts[4], "auth-with-password" | "auth-refresh"))
}

/// On a replica, before any handler runs: 503 until it has data, 403 `replica is read-only` for
/// writes, and a read with `X-Min-Db-Position` held until that position is applied (504
/// `replica is behind` after `REPLICA_READ_WAIT_MS`).
pub async fn read_only_guard(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let unready = req
        .app_data::<web::Data<AppState>>()
        .and_then(|s| s.follower.as_ref().and_then(Follower::unready_reason));
    if let Some(why) = unready.filter(|_| !matches!(req.path(), "/health" | "/api/health" | "/api/replica/sync")) {
        let resp = error_body(StatusCode::SERVICE_UNAVAILABLE, &why, json!({}));
        return Ok(req.into_response(resp));
    }
    if is_write(req.method()) && !allowed_on_replica(req.path()) {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        if let Some(st) = state.filter(|s| s.follower.as_ref().is_some_and(|f| f.forward_writes)) {
            return super::forward::forward(st, req).await;
        }
        let resp = error_body(StatusCode::FORBIDDEN, "replica is read-only", json!({}));
        return Ok(req.into_response(resp));
    }
    // The header, else the position cookie of the database (`POSITION_COOKIE`), which counts
    // only when it holds a position: a browser cannot easily drop a stale HttpOnly cookie.
    let min_position = match req.headers().get("x-min-db-position") {
        Some(h) => Some(h.to_str().unwrap_or("").to_string()),
        None => {
            let name = crate::replica::position::cookie_name(&crate::http::requested_db_name(req.request()));
            req.request()
                .cookie(&name)
                .map(|c| c.value().to_string())
                .filter(|v| Position::parse(v).is_some())
        }
    };
    if let Some(token) = min_position {
        if Position::parse(&token).is_none() {
            let resp = error_body(
                StatusCode::BAD_REQUEST,
                "X-Min-Db-Position is not a position: send back an X-Db-Position token unchanged",
                json!({}),
            );
            return Ok(req.into_response(resp));
        }
        let name = crate::http::requested_db_name(req.request());
        let state = req.app_data::<web::Data<AppState>>().cloned();
        if let Some(st) = state.filter(|_| crate::replica::is_replicated_db(&name)) {
            let reached = match st.follower.as_ref() {
                Some(f) => f.wait_for_position(&st, &name, &token).await,
                None => true,
            };
            if !reached {
                // With forwarding on, the master answers the read instead.
                if st.follower.as_ref().is_some_and(|f| f.forward_writes) {
                    return super::forward::forward(st, req).await;
                }
                let resp = error_body(StatusCode::GATEWAY_TIMEOUT, "replica is behind", json!({}));
                return Ok(req.into_response(resp));
            }
        }
    }
    next.call(req).await
}

#[cfg(test)]
mod tests {
    use super::{Entry, allowed_on_replica, backoff, chain_break};

    fn entry(version: i64, prev: &str, hash: &str) -> Entry {
        Entry {
            version,
            schema_hash: String::new(),
            schema: None,
            changeset: Vec::new(),
            created: 0,
            hash: hash.into(),
            prev_hash: prev.into(),
        }
    }

    #[test]
    fn a_page_must_chain_to_the_position_and_within_itself() {
        let page = [entry(5, "h4", "h5"), entry(6, "h5", "h6")];
        assert_eq!(chain_break("h4", &page), None);
        assert_eq!(chain_break("other", &page), Some(5), "another history at the position");
        assert_eq!(
            chain_break("", &page),
            None,
            "a position from before the chain is not checked"
        );
        let forked = [entry(5, "h4", "h5"), entry(6, "x", "h6")];
        assert_eq!(chain_break("h4", &forked), Some(6));
        let old_log = [entry(5, "", ""), entry(6, "", "")];
        assert_eq!(chain_break("h4", &old_log), None, "entries from before the chain");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_bounded_jitter() {
        for (failures, interval, base) in [(1, 1, 2), (2, 1, 4), (3, 1, 8), (9, 1, 8), (1, 60, 60), (9, 60, 300)] {
            for _ in 0..20 {
                let d = backoff(failures, interval).as_millis() as u64;
                assert!(
                    (base * 1000..=base * 1200).contains(&d),
                    "failures {failures}, interval {interval}: {d} ms, base {base} s"
                );
            }
        }
    }

    #[test]
    fn only_sign_in_refresh_and_sync_write_on_a_replica() {
        for ok in [
            "/api/admins/auth-with-password",
            "/api/collections/users/auth-with-password",
            "/api/collections/_superusers/auth-with-password",
            "/api/collections/users/auth-refresh",
            "/api/auth/login",
            "/api/replica/sync",
        ] {
            assert!(allowed_on_replica(ok), "{ok}");
        }
        for no in [
            "/api/collections/users/records",
            "/api/collections",
            "/api/auth/register",
            "/api/admins/init",
            "/api/databases",
            "/api/collections/users/records/x/auth-refresh",
            "/api/replica/ack",
        ] {
            assert!(!allowed_on_replica(no), "{no}");
        }
    }
}
