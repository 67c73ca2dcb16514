//! Webhooks: collection triggers delivered over HTTP after COMMIT, on the master only.
//!
//! The writer turns a commit's changeset into queue rows (`_webhook_queue`, a local table of the
//! same database) in the same transaction, so a committed change has its deliveries and a
//! rolled-back one has none. The worker (`deliver`) sends due rows, deletes each after a 2xx
//! answer or its last attempt, and otherwise reschedules it with exponential backoff and jitter,
//! each outcome in its own commit before the record's next delivery is sent. A restart resumes
//! the queue: delivery is at least once (a crash repeats only the deliveries in flight), and
//! every request carries its row's `Idempotency-Key`, the same on every attempt.
//!
//! Architecture invariant: a delivery is queued in the transaction of its change, and removed
//! only after its outcome is final; replicas never queue or send.

pub mod handlers;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, params};
use serde_json::json;
use tokio::sync::Notify;

use crate::collections::store::SchemaCache;
use crate::realtime::dispatch::{Kind, decode};
use crate::records::handlers::record_json;
use crate::records::store;

pub use handlers::configure;

pub const QUEUE_DDL: &str = "CREATE TABLE IF NOT EXISTS _webhook_queue (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    collection TEXT NOT NULL,
    action TEXT NOT NULL,
    record_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    created TEXT NOT NULL
)";

pub const LOGS_DDL: &str = "CREATE TABLE IF NOT EXISTS webhook_logs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    db TEXT NOT NULL,
    collection TEXT NOT NULL,
    action TEXT NOT NULL,
    record_id TEXT NOT NULL,
    url TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT NOT NULL,
    created TEXT NOT NULL
)";

/// Delivery log rows kept (the oldest are pruned).
pub const LOGS_KEPT: i64 = 10_000;

/// Rows one pass takes from a database's queue, and deliveries in flight at once.
const BATCH: usize = 32;

/// The longest wait before a retry.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The master's webhook state: which databases have queued deliveries, and the worker's wake-up.
pub struct Webhooks {
    pending: Mutex<HashSet<String>>,
    wake: Notify,
    /// The first retry's delay; each further one doubles it (`WEBHOOK_RETRY_BASE_MS`).
    pub base: Duration,
    /// Built on the first delivery: a TLS client costs a few MB of memory a master without
    /// webhooks never needs.
    http: std::sync::OnceLock<reqwest::Client>,
}

impl Webhooks {
    pub fn new(base: Duration) -> Arc<Self> {
        Arc::new(Webhooks {
            pending: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            base,
            http: std::sync::OnceLock::new(),
        })
    }

    fn http(&self) -> &reqwest::Client {
        self.http
            .get_or_init(|| crate::util::outbound_client(Duration::from_secs(10)))
    }

    /// Called after a commit that queued deliveries for `db`.
    pub fn queued(&self, db: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(db.to_string());
        }
        self.wake.notify_one();
    }
}

/// Queues the deliveries one database's commits owe, on its writer (used by its recorder).
pub struct Emitter {
    pub db: String,
    pub schemas: Arc<SchemaCache>,
    pub hooks: Arc<Webhooks>,
}

impl Emitter {
    /// Whether a transaction of this database needs its changes for webhooks.
    pub fn active(&self) -> bool {
        self.schemas.peek(&self.db).is_some_and(|s| s.has_triggers())
    }

    /// Inserts the deliveries `changeset` calls for into `_webhook_queue`, inside the caller's
    /// transaction; returns how many.
    pub fn enqueue(&self, conn: &Connection, changeset: &[u8]) -> rusqlite::Result<usize> {
        let Some(schema) = self.schemas.peek(&self.db).filter(|s| s.has_triggers()) else {
            return Ok(0);
        };
        if changeset.is_empty() {
            return Ok(0);
        }
        let now = crate::util::now_string();
        let due = crate::util::unix_millis();
        let mut queued = 0;
        for change in decode(changeset)? {
            let Some(c) = schema.get(&change.table).filter(|c| c.name == change.table) else {
                continue;
            };
            let action = change.kind.as_str();
            let triggers: Vec<_> = c.triggers.iter().filter(|t| t.enabled && t.action == action).collect();
            if triggers.is_empty() {
                continue;
            }
            let stored = if change.kind == Kind::Delete {
                let columns = store::table_columns(conn, &c.name)?;
                let values: Vec<_> = change
                    .values
                    .iter()
                    .map(|v| v.clone().unwrap_or(rusqlite::types::Value::Null))
                    .collect();
                store::get_image(conn, &c, &columns, &values, None).ok().flatten()
            } else {
                store::get(conn, &c, &change.id).ok().flatten()
            };
            let Some(stored) = stored else { continue };
            let record = record_json(&c, &stored, true, false);
            if queued == 0 {
                conn.execute_batch(QUEUE_DDL)?;
            }
            for trigger in triggers {
                let key = crate::util::random_id(24);
                let payload = json!({
                    "id": key,
                    "event": action,
                    "db": self.db,
                    "collection": c.name,
                    "collectionId": c.id,
                    "record": record,
                    "created": now,
                });
                conn.prepare_cached(
                    "INSERT INTO _webhook_queue (key, collection, action, record_id, trigger, payload, next_at, created)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    key,
                    c.name,
                    action,
                    change.id,
                    serde_json::to_string(trigger).unwrap_or_default(),
                    payload.to_string(),
                    due,
                    now
                ])?;
                queued += 1;
            }
        }
        Ok(queued)
    }
}

/// The delay before retry `attempt` (1 = the first retry): `base · 2^(attempt-1)`, at most an
/// hour, with "equal jitter" (half fixed, half random) so that failed deliveries spread out.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let d = exp.min(MAX_BACKOFF);
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    let frac = (u64::from_le_bytes(r) % 1_000_000) as f64 / 1_000_000.0;
    d / 2 + d.mul_f64(frac / 2.0)
}

/// One queued delivery.
struct Queued {
    id: i64,
    key: String,
    collection: String,
    action: String,
    record_id: String,
    trigger: crate::collections::model::Trigger,
    payload: String,
    attempts: u32,
}

/// The worker: runs until the process stops. Wakes when a commit queued deliveries, and at
/// least every second for retries that came due.
pub async fn deliver(state: actix_web::web::Data<crate::state::AppState>, hooks: Arc<Webhooks>) {
    // Queues left by an earlier run of the process.
    for db in state.dbs.list() {
        let has = db
            .read(|conn| {
                Ok(conn
                    .prepare("SELECT 1 FROM sqlite_master WHERE name = '_webhook_queue'")?
                    .exists([])?
                    && conn.prepare("SELECT 1 FROM _webhook_queue LIMIT 1")?.exists([])?)
            })
            .await
            .unwrap_or(false);
        if has {
            hooks.queued(&db.name);
        }
    }
    loop {
        let dbs: Vec<String> = hooks
            .pending
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default();
        for name in dbs {
            match pass(&state, &hooks, &name).await {
                Ok(true) => {}
                Ok(false) => {
                    if let Ok(mut p) = hooks.pending.lock() {
                        p.remove(&name);
                    }
                }
                Err(e) => log::warn!("webhooks: delivering for '{name}': {e}"),
            }
        }
        tokio::select! {
            _ = hooks.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Sends the due deliveries of one database; whether its queue still holds any.
async fn pass(state: &crate::state::AppState, hooks: &Arc<Webhooks>, name: &str) -> crate::error::ApiResult<bool> {
    let Some(db) = state.dbs.get(name) else {
        return Ok(false);
    };
    let now = crate::util::unix_millis();
    let (due, left): (Vec<Queued>, bool) = db
        .read(move |conn| {
            if !conn
                .prepare("SELECT 1 FROM sqlite_master WHERE name = '_webhook_queue'")?
                .exists([])?
            {
                return Ok((Vec::new(), false));
            }
            let left = conn.prepare("SELECT 1 FROM _webhook_queue LIMIT 1")?.exists([])?;
            let mut stmt = conn.prepare(
                "SELECT id, key, collection, action, record_id, trigger, payload, attempts FROM _webhook_queue
                 WHERE next_at <= ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now, BATCH as i64], |r| {
                let trigger: String = r.get(5)?;
                Ok(Queued {
                    id: r.get(0)?,
                    key: r.get(1)?,
                    collection: r.get(2)?,
                    action: r.get(3)?,
                    record_id: r.get(4)?,
                    trigger: serde_json::from_str(&trigger).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
                    })?,
                    payload: r.get(6)?,
                    attempts: r.get(7)?,
                })
            })?;
            let due = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((due, left))
        })
        .await?;
    if due.is_empty() {
        return Ok(left);
    }
    // Deliveries of one record go one after another, in commit order; records in parallel.
    let mut groups: Vec<Vec<Queued>> = Vec::new();
    for q in due {
        match groups
            .iter_mut()
            .find(|g| g[0].collection == q.collection && g[0].record_id == q.record_id)
        {
            Some(g) => g.push(q),
            None => groups.push(vec![q]),
        }
    }
    // Each outcome is committed before the next delivery of its record is sent: a crash
    // repeats at most the deliveries in flight, never ones already answered.
    let base = hooks.base;
    let sends = groups.into_iter().map(|group| {
        let hooks = hooks.clone();
        let db = db.clone();
        async move {
            let mut logs = Vec::with_capacity(group.len());
            for q in group {
                let result = send(&hooks, &q).await;
                let (log, next) = outcome(base, q, result);
                let (id, attempt) = (log.0.id, log.1);
                db.write(move |conn| {
                    match next {
                        None => conn.execute("DELETE FROM _webhook_queue WHERE id = ?1", [id])?,
                        Some(at) => conn.execute(
                            "UPDATE _webhook_queue SET attempts = ?2, next_at = ?3 WHERE id = ?1",
                            params![id, attempt, at],
                        )?,
                    };
                    Ok(())
                })
                .await?;
                logs.push(log);
            }
            Ok::<_, crate::error::ApiError>(logs)
        }
    });
    let mut logs = Vec::new();
    let mut failed = None;
    for r in futures_util::future::join_all(sends).await {
        match r {
            Ok(l) => logs.extend(l),
            Err(e) => failed = Some(e),
        }
    }
    let db_name = name.to_string();
    if let Some(stats) = state.dbs.get(crate::db::STATS_DB) {
        let now = crate::util::now_string();
        stats
            .write(move |conn| {
                conn.execute_batch(LOGS_DDL)?;
                for (q, attempt, status, outcome, error) in &logs {
                    conn.execute(
                        "INSERT INTO webhook_logs (key, db, collection, action, record_id, url, attempt, status, outcome, error, created)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                        params![q.key, db_name, q.collection, q.action, q.record_id, q.trigger.url, attempt, status, outcome, error, now],
                    )?;
                }
                conn.execute(
                    "DELETE FROM webhook_logs WHERE id <= (SELECT MAX(id) FROM webhook_logs) - ?1",
                    [LOGS_KEPT],
                )?;
                Ok(())
            })
            .await?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(true),
    }
}

/// A delivery's log line (the delivery, attempt, status, outcome and error) and, when it is to
/// be retried, when.
fn outcome(
    base: Duration,
    q: Queued,
    result: Result<u16, (u16, String)>,
) -> ((Queued, u32, u16, String, String), Option<i64>) {
    let attempt = q.attempts + 1;
    let (status, error) = match &result {
        Ok(s) => (*s, String::new()),
        Err((s, e)) => (*s, e.clone()),
    };
    let ok = result.is_ok();
    let last = !ok && attempt > q.trigger.retry_limit;
    let outcome = if ok {
        "delivered"
    } else if last {
        "failed"
    } else {
        "retrying"
    };
    if last {
        log::warn!(
            "webhooks: gave up on {} {} of '{}' to {} after {attempt} attempts: {error}",
            q.action,
            q.record_id,
            q.collection,
            q.trigger.url
        );
    }
    let next = (!ok && !last).then(|| crate::util::unix_millis() + backoff(base, attempt).as_millis() as i64);
    ((q, attempt, status, outcome.to_string(), error), next)
}

/// One HTTP attempt: the answer's status, or the status (0 without one) and what went wrong.
async fn send(hooks: &Webhooks, q: &Queued) -> Result<u16, (u16, String)> {
    let method = reqwest::Method::from_bytes(q.trigger.method.as_bytes()).map_err(|e| (0, e.to_string()))?;
    let mut rb = hooks
        .http()
        .request(method, &q.trigger.url)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", &q.key)
        .header("X-Vski-Event", format!("{}.{}", q.collection, q.action))
        .header("X-Vski-Attempt", (q.attempts + 1).to_string());
    for (k, v) in &q.trigger.headers {
        if let Some(v) = v.as_str() {
            rb = rb.header(k.as_str(), v);
        }
    }
    if let Some(secret) = &q.trigger.secret {
        rb = rb.header(
            "X-Vski-Signature",
            format!("sha256={}", sign(secret, q.payload.as_bytes())),
        );
    }
    match rb.body(q.payload.clone()).send().await {
        Ok(resp) if resp.status().is_success() => Ok(resp.status().as_u16()),
        Ok(resp) => Err((resp.status().as_u16(), format!("HTTP {}", resp.status().as_u16()))),
        Err(e) => Err((0, crate::replica::follower::describe_transport(&e))),
    }
}

/// Hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    crate::util::hex(&mac.finalize().into_bytes())
}

/// The body a receiver checks a signature against is the raw request body.
pub fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    header.strip_prefix("sha256=") == Some(sign(secret, body).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_an_hour() {
        let base = Duration::from_secs(1);
        for attempt in 1..=5u32 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let d = backoff(base, attempt);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
        assert!(backoff(base, 40) <= MAX_BACKOFF);
        assert!(backoff(base, 40) >= MAX_BACKOFF / 2);
    }

    #[test]
    fn signatures_are_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify(
            "Jefe",
            b"what do ya want for nothing?",
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        ));
        assert!(!verify(
            "other",
            b"what do ya want for nothing?",
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        ));
    }
}
