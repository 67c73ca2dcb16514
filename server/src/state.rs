//! The state every handler shares: the database registry, the schema cache, token keys,
//! settings, and the handles of replication (master or follower), realtime, cron, webhooks and
//! file storage. It imports no route table: handlers depend on it, never the reverse.

use std::sync::Arc;

use actix_web::HttpRequest;

use crate::auth::token::TokenKeys;
use crate::collections::model::Collection;
use crate::collections::store::{SUPERUSERS, SchemaCache, bootstrap};
use crate::config::ServeConfig;
use crate::db::{DEFAULT_DB, Database, Registry, is_valid_db_name};
use crate::error::{ApiError, ApiResult};
use crate::http::requested_db_name;
use crate::replica::is_replicated_db;
use crate::replica::master::MasterState;
use crate::replica::recorder::ChangeRecorder;

/// Settings handlers need, copied from the configuration once.
#[derive(Debug, Clone)]
pub struct Settings {
    pub auth_token_ttl: u64,
    pub admin_token_ttl: u64,
    pub body_limit: usize,
    /// `CRON_SQL_TIMEOUT`.
    pub cron_sql_timeout: std::time::Duration,
    /// `CRON_HTTP_ALLOW_LOCAL`.
    pub cron_http_allow_local: bool,
    /// `TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `POSITION_COOKIE=on`: writes set the position cookie of their database.
    pub position_cookie: bool,
}

/// State shared by every worker thread.
pub struct AppState {
    pub dbs: Registry,
    pub schemas: Arc<SchemaCache>,
    pub tokens: TokenKeys,
    pub settings: Settings,
    /// Replication state of this master: epoch, known replicas, cached checksums.
    pub master: MasterState,
    /// The sync engine and its state, on a replica; `None` on a master.
    pub follower: Option<crate::replica::follower::Follower>,
    /// Password sign-in attempts per client IP and identity (`AUTH_RATE_LIMIT`).
    pub sign_in: crate::auth::limit::SignInLimiter,
    /// Realtime clients and the commits waiting to become their events.
    pub realtime: Arc<crate::realtime::Hub>,
    /// Webhook delivery state (a master's; `None` on a replica, which never sends them).
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// Where uploaded files are stored.
    pub storage: crate::files::Storage,
    /// The cron scheduler and the jobs it runs on this node.
    pub cron: crate::cron::Cron,
    /// The hub's queue, taken by the dispatcher when the server starts.
    pub realtime_queue: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<crate::realtime::Committed>>>,
    /// The one-time token that `POST /api/admins/init` needs while no admin exists.
    pub installer: crate::auth::installer::Installer,
}

impl AppState {
    /// Opens the data directory and bootstraps every database in it.
    pub async fn open(config: &ServeConfig, secret: &str) -> ApiResult<Self> {
        // Replicas record nothing: their replicated databases change only by applying the master's log.
        // Every commit of a replicated database is published to `feed`, which wakes the
        // long-polls of streaming replicas.
        let feed = Arc::new(crate::replica::feed::CommitFeed::new());
        let (realtime, realtime_queue) = crate::realtime::Hub::new(
            !config.is_replica() || config.replica_realtime == "on",
            config.realtime_client_buffer as usize,
            std::time::Duration::from_secs(config.realtime_ping_secs),
            config.realtime_max_clients,
            config.realtime_max_per_ip,
        );
        // Realtime events come from committed changes: the changelog's changeset where one is
        // recorded, otherwise a session attached while clients are connected. A replica's
        // replicated databases publish what the follower applies.
        let schemas = Arc::new(SchemaCache::default());
        let webhooks = (!config.is_replica())
            .then(|| crate::webhooks::Webhooks::new(std::time::Duration::from_millis(config.webhook_retry_base_ms)));
        let recorders: crate::db::RecorderFactory = {
            let (feed, hub) = (feed.clone(), realtime.clone());
            let (hooks, cache) = (webhooks.clone(), schemas.clone());
            let record = config.changelog == "on" && !config.is_replica();
            let follows = config.is_replica();
            let omitted = config.omitted_dbs();
            Arc::new(move |name: &str| {
                let emitter = hooks.as_ref().map(|h| {
                    Arc::new(crate::webhooks::Emitter {
                        db: name.to_string(),
                        schemas: cache.clone(),
                        hooks: h.clone(),
                    })
                });
                let r: Arc<dyn crate::db::writer::Recorder> = if record && is_replicated_db(name) {
                    ChangeRecorder::publishing(name, feed.clone(), hub.clone(), emitter)
                } else if follows && is_replicated_db(name) && !omitted.iter().any(|o| o == name) {
                    return None;
                } else {
                    crate::realtime::capture::Capture::new(name, hub.clone(), emitter)
                };
                Some(r)
            })
        };
        // Snapshots a crash interrupted, on a master (being written) or a replica (being
        // downloaded): nothing uses them any more, and each can be as large as its database.
        let _ = std::fs::remove_dir_all(crate::replica::snapshot_dir(&config.data_dir));
        let dbs = Registry::open(
            &config.data_dir,
            config.read_pool_size,
            Some(recorders),
            config.list_cache_entries,
        )?;
        let stats = dbs
            .get(crate::db::STATS_DB)
            .ok_or_else(|| ApiError::internal("open", "stats database missing"))?;
        let master = MasterState::open(&config.data_dir, &stats, feed).await?;
        let follower = if config.is_replica() {
            Some(crate::replica::follower::Follower::new(config)?)
        } else {
            None
        };
        let state = AppState {
            master,
            follower,
            dbs,
            schemas,
            webhooks,
            tokens: TokenKeys::new(secret),
            sign_in: crate::auth::limit::SignInLimiter::new(config.auth_rate_limit),
            realtime,
            realtime_queue: std::sync::Mutex::new(Some(realtime_queue)),
            installer: crate::auth::installer::Installer::new(&config.data_dir),
            cron: crate::cron::Cron::default(),
            storage: {
                let mut storage = crate::files::Storage::new(&config.data_dir, config.file_upload_limit);
                storage.s3 = config.s3_store().map_err(|e| ApiError::internal("storage", e))?;
                // Uploads a crash interrupted: no record names them.
                let _ = std::fs::remove_dir_all(storage.tmp_dir());
                storage
            },
            settings: Settings {
                auth_token_ttl: config.auth_token_ttl,
                admin_token_ttl: config.admin_token_ttl,
                body_limit: config.body_limit,
                cron_sql_timeout: std::time::Duration::from_secs(config.cron_sql_timeout),
                cron_http_allow_local: config.cron_http_allow_local,
                trusted_proxies: config.trusted_proxy_list().map_err(ApiError::bad_request)?,
                position_cookie: config.position_cookie == "on",
            },
        };
        for db in state.dbs.list() {
            // A replica's replicated databases get their tables from the master's snapshot.
            if state.follower.as_ref().is_some_and(|f| f.follows(&db.name)) {
                state.schemas.reload(&db).await?;
            } else {
                state.bootstrap(&db).await?;
            }
        }
        Ok(state)
    }

    /// Creates the system tables of `db` and loads its schema.
    pub async fn bootstrap(&self, db: &Database) -> ApiResult<()> {
        let name = db.name.clone();
        db.write(move |conn| bootstrap(conn, &name)).await?;
        self.schemas.reload(db).await?;
        Ok(())
    }

    /// The database a request addresses: header `X-Dbname`, else query `db`, else `default`.
    pub fn db(&self, req: &HttpRequest) -> ApiResult<Arc<Database>> {
        let name = requested_db_name(req);
        if !is_valid_db_name(&name) {
            return Err(ApiError::not_found(format!("Database '{name}' not found.")));
        }
        self.dbs
            .get(&name)
            .ok_or_else(|| ApiError::not_found(format!("Database '{name}' not found.")))
    }

    /// A live collection of `db` by id or name.
    pub async fn collection(&self, db: &Database, id_or_name: &str) -> ApiResult<Arc<Collection>> {
        let schema = self.schemas.get(db).await?;
        schema
            .get(id_or_name)
            .ok_or_else(|| ApiError::not_found(format!("Collection '{id_or_name}' not found.")))
    }

    /// The `X-Db-Position` token of database `name` on this node (see `replica/position.rs`),
    /// naming the history and the version (on a master its newest commit, on a replica what it
    /// has applied). `None` for databases that do not replicate.
    pub fn position_token(&self, name: &str) -> Option<String> {
        if !is_replicated_db(name) {
            return None;
        }
        let position = match &self.follower {
            Some(f) => f.position(name)?,
            None => {
                let (uid, version, hash) = self.dbs.get(name)?.position()?;
                crate::replica::position::Position::new(&self.master.epoch, &uid, version, &hash)
            }
        };
        Some(position.token())
    }

    /// Whether at least one admin exists.
    pub async fn has_admins(&self) -> ApiResult<bool> {
        let db = self
            .dbs
            .get(DEFAULT_DB)
            .ok_or_else(|| ApiError::internal("admins", "default database missing"))?;
        let c = self.collection(&db, SUPERUSERS).await?;
        db.read(move |conn| {
            let n: i64 = conn.query_row(
                &format!("SELECT COUNT(*) FROM {}", crate::util::quote_ident(&c.name)),
                [],
                |r| r.get(0),
            )?;
            Ok(n > 0)
        })
        .await
    }
}
