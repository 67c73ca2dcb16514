//! The replica side. This file holds the `Follower` (the replica's identity, its sync state per
//! database, positions and readiness, its requests to the master) and what `/health` shows; the
//! rest has a room of its own:
//! - `rounds`: sync rounds, page by page, and the background round loop;
//! - `stream`: stream mode's long-poll that wakes a database's sync when the master commits;
//! - `bootstrap`: snapshots downloaded, checked and restored;
//! - `files`: the master's file journal replayed onto this node's storage;
//! - `guard`: the request path on a replica (readiness, read-only, minimum positions).
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

mod bootstrap;
mod files;
mod guard;
mod rounds;
mod stream;

pub use guard::read_only_guard;
use rounds::Page;
pub use rounds::sync_loop;
pub use stream::stream_loop;

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
    /// `MASTER_URL`, as a list: the nodes that may be the master.
    masters: Vec<String>,
    /// The one of them this replica follows now: the last that answered as the master.
    master: std::sync::RwLock<String>,
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
            master: std::sync::RwLock::new(config.master_urls().first().cloned().unwrap_or_default()),
            masters: config.master_urls(),
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

    /// The master this replica follows now (one of `MASTER_URL`'s).
    pub fn master_url(&self) -> String {
        self.master.read().map(|m| m.clone()).unwrap_or_default()
    }

    fn request(&self, state: &AppState, method: reqwest::Method, path: &str) -> ApiResult<reqwest::RequestBuilder> {
        self.request_to(state, &self.master_url(), method, path)
    }

    fn request_to(
        &self,
        state: &AppState,
        base: &str,
        method: reqwest::Method,
        path: &str,
    ) -> ApiResult<reqwest::RequestBuilder> {
        let token = state
            .tokens
            .mint(&TokenKeys::claims(TokenType::Replica, &self.replica_id, 300))?;
        let mut rb = self
            .http
            .request(method, format!("{base}{path}"))
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
            .map_err(|e| format!("GET {}: {}", self.master_url(), transport_error(&e)))?;
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
    ///
    /// With several `MASTER_URL`s, when the one followed now is down or is no master, the others
    /// are asked in order, and the first that answers as the master is followed from then on.
    async fn get_status(&self, state: &AppState) -> Result<(u16, Value, Option<i64>), String> {
        let current = self.master_url();
        let first = self.status_of(state, &current).await;
        if first.is_ok() || self.masters.len() < 2 {
            return first;
        }
        let mut errors = vec![first.err().unwrap_or_default()];
        for url in self.masters.iter().filter(|u| **u != current) {
            match self.status_of(state, url).await {
                Ok(answer) => {
                    log::warn!("following the master at {url} (was {current}: {})", errors[0]);
                    if let Ok(mut m) = self.master.write() {
                        *m = url.clone();
                    }
                    return Ok(answer);
                }
                Err(e) => errors.push(e),
            }
        }
        Err(format!("no MASTER_URL answers as the master: {}", errors.join("; ")))
    }

    /// The status of `base`, when it answers as a vski master (see [`Follower::get_status`]).
    async fn status_of(&self, state: &AppState, base: &str) -> Result<(u16, Value, Option<i64>), String> {
        let resp = self
            .request_to(state, base, reqwest::Method::GET, "/api/replica/status?checksum=0")
            .map_err(|e| e.to_string())?
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| format!("GET {base}: {}", transport_error(&e)))?;
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
                    "MASTER_URL {base} reached a replica (REPLICA_ID {id}), not the master: point MASTER_URL at the master itself"
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
                    "MASTER_URL {base} answered {status} to /api/replica/status without X-Replica-Mode{server}: it is not a vski \
                     node (a proxy, which must not publish /api/replica/*?); point MASTER_URL at the master itself"
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
            .map_err(|e| format!("GET {}: {}", self.master_url(), transport_error(&e)))
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
        "masterUrl": f.master_url(),
        "syncInterval": f.interval,
        "syncMode": f.sync_mode(),
        "lastSuccessfulRound": last_ok,
        "lastError": last_error,
        "stale": stale,
        "streamBroken": stream_broken,
        "dbs": dbs,
    })
}

#[cfg(test)]
mod tests {
    use super::guard::allowed_on_replica;
    use super::rounds::chain_break;
    use super::{Entry, backoff};

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
