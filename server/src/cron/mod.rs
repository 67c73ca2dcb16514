//! Cron: jobs on a schedule (tokio-cron-scheduler), of two kinds: SQL against one database
//! (through its writer, so the changes replicate), or an HTTP request.
//!
//! Definitions live in `default`'s `_cron_jobs`, which replicates; runs are logged in the
//! node's own `stats` (`cron_runs`). A master schedules every job and reschedules when the API
//! changes one. A replica reads the same definitions (checking every few seconds for changes
//! the master made) and schedules only SQL jobs against databases it does not replicate: HTTP
//! jobs never run there, and replicated databases change only through the follower.
//!
//! Architecture invariant: one run of a job at a time on a node; a run that is due while the
//! previous one still runs is skipped and logged as such.

pub mod handlers;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_cron_scheduler::{Job, JobScheduler};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use store::{JobDef, Run};

pub use handlers::configure;

/// How often a replica looks for job changes the master made.
pub const REPLICA_RELOAD: Duration = Duration::from_secs(5);

/// The longest an HTTP job waits for its answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

struct Scheduled {
    id: Uuid,
    def: JobDef,
}

/// The node's scheduler and the jobs it has scheduled.
pub struct Cron {
    inner: tokio::sync::Mutex<Inner>,
    /// Built on the first HTTP job: a TLS client costs a few MB of memory a node without
    /// HTTP jobs never needs.
    http: std::sync::OnceLock<reqwest::Client>,
}

#[derive(Default)]
struct Inner {
    scheduler: Option<JobScheduler>,
    jobs: HashMap<String, Scheduled>,
}

impl Default for Cron {
    fn default() -> Self {
        Cron {
            inner: tokio::sync::Mutex::new(Inner::default()),
            http: std::sync::OnceLock::new(),
        }
    }
}

impl Cron {
    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| crate::util::outbound_client(HTTP_TIMEOUT))
    }
}

/// Whether this node runs `def`: everything on a master; on a replica, SQL jobs against
/// databases it does not replicate.
pub fn runs_here(state: &AppState, def: &JobDef) -> bool {
    match &state.follower {
        None => true,
        Some(f) => def.kind == "sql" && !f.follows(def.database()),
    }
}

impl Cron {
    /// Schedules the stored jobs; on a replica, keeps following the master's definitions. The
    /// scheduler itself starts with the first job this node runs.
    pub async fn start(state: &actix_web::web::Data<AppState>) -> ApiResult<()> {
        reload(state).await?;
        if state.follower.is_some() {
            let st = state.clone();
            actix_web::rt::spawn(async move {
                let mut every = tokio::time::interval(REPLICA_RELOAD);
                loop {
                    every.tick().await;
                    if let Err(e) = reload(&st).await {
                        log::warn!("cron: cannot read the job definitions: {e}");
                    }
                }
            });
        }
        Ok(())
    }
}

/// Makes the scheduled jobs match the stored definitions.
pub async fn reload(state: &actix_web::web::Data<AppState>) -> ApiResult<()> {
    let Some(db) = state.dbs.get(crate::db::DEFAULT_DB) else {
        return Ok(());
    };
    let defs: Vec<JobDef> = db.read(|conn| Ok(store::list(conn)?)).await?;
    let wanted: HashMap<String, JobDef> = defs
        .into_iter()
        .filter(|d| runs_here(state, d))
        .map(|d| (d.name.clone(), d))
        .collect();
    let mut inner = state.cron.inner.lock().await;
    let Inner { scheduler, jobs } = &mut *inner;
    if scheduler.is_none() && !wanted.is_empty() {
        let sched = JobScheduler::new()
            .await
            .map_err(|e| ApiError::internal("cron", e.to_string()))?;
        sched
            .start()
            .await
            .map_err(|e| ApiError::internal("cron", e.to_string()))?;
        *scheduler = Some(sched);
    }
    let Some(sched) = scheduler.as_ref() else {
        return Ok(());
    };
    let stale: Vec<String> = jobs
        .iter()
        .filter(|(name, s)| wanted.get(*name) != Some(&s.def))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some(s) = jobs.remove(&name) {
            let _ = sched.remove(&s.id).await;
        }
    }
    for (name, def) in wanted {
        if jobs.contains_key(&name) {
            continue;
        }
        match schedule(state, sched, &def).await {
            Ok(id) => {
                log::info!("cron: '{name}' scheduled ({}, {})", def.schedule, def.kind);
                jobs.insert(name, Scheduled { id, def });
            }
            Err(e) => log::warn!("cron: cannot schedule '{name}': {e}"),
        }
    }
    Ok(())
}

async fn schedule(state: &actix_web::web::Data<AppState>, sched: &JobScheduler, def: &JobDef) -> ApiResult<Uuid> {
    let expr = store::normalize_schedule(&def.schedule).ok_or_else(|| ApiError::bad_request("invalid schedule"))?;
    let weak: Weak<AppState> = Arc::downgrade(&state.clone().into_inner());
    let running = Arc::new(AtomicBool::new(false));
    let def = def.clone();
    let job = Job::new_async(expr.as_str(), move |_, _| {
        let (weak, running, def) = (weak.clone(), running.clone(), def.clone());
        Box::pin(async move {
            let Some(state) = weak.upgrade() else { return };
            run_once(&state, &def, &running).await;
        })
    })
    .map_err(|e| ApiError::bad_request(format!("invalid schedule: {e}")))?;
    sched
        .add(job)
        .await
        .map_err(|e| ApiError::internal("cron", e.to_string()))
}

/// One run of `def`, logged in `stats`. A run due while the last one still runs is skipped.
pub async fn run_once(state: &AppState, def: &JobDef, running: &AtomicBool) {
    let started = crate::util::now_string();
    let clock = Instant::now();
    let (outcome, detail) = if running.swap(true, Ordering::AcqRel) {
        ("skipped".to_string(), "the previous run was still running".to_string())
    } else {
        let result = match def.kind.as_str() {
            "sql" => run_sql(state, def).await,
            _ => run_http(state, def).await,
        };
        running.store(false, Ordering::Release);
        match result {
            Ok(d) => ("ok".to_string(), d),
            Err(e) => {
                log::warn!("cron: '{}' failed: {e}", def.name);
                ("error".to_string(), e)
            }
        }
    };
    let run = Run {
        started,
        duration_ms: clock.elapsed().as_millis() as i64,
        outcome,
        detail: detail.chars().take(1000).collect(),
    };
    if let Some(stats) = state.dbs.get(crate::db::STATS_DB) {
        let name = def.name.clone();
        if let Err(e) = stats.write(move |conn| Ok(store::log_run(conn, &name, &run)?)).await {
            log::warn!("cron: cannot log a run of '{}': {e}", def.name);
        }
    }
}

async fn run_sql(state: &AppState, def: &JobDef) -> Result<String, String> {
    let db = state
        .dbs
        .get(def.database())
        .ok_or_else(|| format!("database '{}' does not exist", def.database()))?;
    let sql = def.sql.clone().unwrap_or_default();
    // Checked again before every run: the schema may have changed since the job was saved.
    let (path, check) = (db.path.clone(), sql.clone());
    tokio::task::spawn_blocking(move || store::check_sql(&path, &check))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let limit = state.settings.cron_sql_timeout;
    let changed = db
        .write_alone(move |conn| {
            // A job past its time is interrupted by a watchdog; SQLite then rolls its
            // transaction back (it runs alone, so nothing else with it). The watchdog is gone
            // before the writer commits: a late interrupt finds no statement to stop.
            let handle = conn.get_interrupt_handle();
            let (done, finished) = std::sync::mpsc::channel::<()>();
            let watchdog = std::thread::spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
                    handle.interrupt();
                }
            });
            let before = conn.total_changes();
            let result = conn.execute_batch(&sql);
            drop(done);
            let _ = watchdog.join();
            match result {
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::OperationInterrupted => {
                    Err(crate::error::ApiError::bad_request(format!(
                        "ran past CRON_SQL_TIMEOUT ({} s) and was stopped; its changes were rolled back",
                        limit.as_secs()
                    )))
                }
                other => {
                    other?;
                    Ok(conn.total_changes() - before)
                }
            }
        })
        .await
        .map_err(|e| match e {
            crate::error::ApiError::BadRequest { message, .. } => message,
            other => other.to_string(),
        })?;
    Ok(format!("{changed} rows changed"))
}

async fn run_http(state: &AppState, def: &JobDef) -> Result<String, String> {
    // Checked again at run time: the job may have been saved before the setting changed.
    if !state.settings.cron_http_allow_local && def.url.as_deref().is_some_and(store::is_local_url) {
        return Err("the URL is a loopback or link-local address and CRON_HTTP_ALLOW_LOCAL is off".into());
    }
    let method =
        reqwest::Method::from_bytes(def.method.as_deref().unwrap_or("GET").as_bytes()).map_err(|e| e.to_string())?;
    let mut rb = state
        .cron
        .http()
        .request(method, def.url.as_deref().unwrap_or_default());
    for (k, v) in def.headers.iter().flatten() {
        if let Some(v) = v.as_str() {
            rb = rb.header(k.as_str(), v);
        }
    }
    if let Some(body) = &def.body {
        rb = rb.body(body.clone());
    }
    let resp = rb
        .send()
        .await
        .map_err(|e| crate::replica::follower::describe_transport(&e))?;
    let status = resp.status();
    if status.is_success() {
        Ok(format!("HTTP {}", status.as_u16()))
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}
