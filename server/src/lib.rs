//! vski: a self-hosted Backend-as-a-Service over SQLite.
//!
//! `main.rs` parses the configuration and calls [`serve`] (or [`admin_create`]); everything else
//! lives here. See ARCHITECTURE.md for the code map and the invariants.

#[cfg(test)]
mod alloc_count;
pub mod app;
pub mod auth;
pub mod collections;
pub mod config;
pub mod crash;
pub mod cron;
pub mod databases;
pub mod datadir;
pub mod db;
pub mod error;
pub mod files;
pub mod health;
pub mod http;
pub mod import;
pub mod query;
pub mod realtime;
pub mod records;
pub mod replica;
pub mod state;
pub mod util;
pub mod webhooks;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;

use config::ServeConfig;

/// Re-exported so tests and tools can open vski's database files with the same SQLite build.
pub use rusqlite;

/// Starts the server on an already-bound listener (tests bind `127.0.0.1:0`).
pub async fn run(config: ServeConfig, listener: TcpListener) -> std::io::Result<()> {
    config.validate().map_err(std::io::Error::other)?;
    let lock = open_data_dir(&config)?;
    run_locked(config, listener, lock).await
}

/// Takes the data directory, binds `HOST:PORT` and runs the server.
pub async fn serve(config: ServeConfig) -> std::io::Result<()> {
    config.validate().map_err(std::io::Error::other)?;
    // The directory first: a second server on a directory in use must say so, whatever its port.
    let lock = open_data_dir(&config)?;
    let addr = format!("{}:{}", config.host, config.port);
    let listener =
        TcpListener::bind(&addr).map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    run_locked(config, listener, lock).await
}

/// Creates (0700) and locks the data directory, and records this server's role in it.
fn open_data_dir(config: &ServeConfig) -> std::io::Result<datadir::DirLock> {
    datadir::private_umask();
    datadir::ensure(&config.data_dir, true)?;
    let lock = datadir::lock(&config.data_dir)?;
    let role = datadir::Role::of(config.is_replica());
    if let Some(aside) = datadir::claim_role(&config.data_dir, role, config.allow_role_change)? {
        log::warn!(
            "ALLOW_ROLE_CHANGE: the data of the previous role was moved to {}; this {role} starts empty",
            aside.display()
        );
    }
    Ok(lock)
}

async fn run_locked(config: ServeConfig, listener: TcpListener, lock: datadir::DirLock) -> std::io::Result<()> {
    let (secret, source) = resolve_secret(&config)?;
    let role = match (&config.master_url, config.is_replica()) {
        (Some(url), true) if config.sync_interval == 0 => format!("replica of {url}, manual sync"),
        (Some(url), true) => format!("replica of {url}, sync every {} s", config.sync_interval),
        _ => "master".to_string(),
    };
    log::info!(
        "vski {} starting: {role}, data directory {}, secret from {source}",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display()
    );
    let result = app::run(config, secret, listener).await;
    drop(lock);
    result
}

/// Where the signing secret came from, for the start-up line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    /// The `JWT_SECRET` variable (or `--jwt-secret`).
    Env,
    /// `DATA_DIR/.jwt_secret`, read or just generated.
    File,
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecretSource::Env => "JWT_SECRET",
            SecretSource::File => "DATA_DIR/.jwt_secret",
        })
    }
}

/// The signing secret: `JWT_SECRET`, else the one kept in `DATA_DIR/.jwt_secret`, else a new
/// one written there with mode 0600.
pub fn resolve_secret(config: &ServeConfig) -> std::io::Result<(String, SecretSource)> {
    if let Some(s) = config.jwt_secret.as_deref().filter(|s| !s.is_empty()) {
        if s.len() < 16 {
            log::warn!("JWT_SECRET is shorter than 16 characters; use a long random value");
        }
        return Ok((s.to_string(), SecretSource::Env));
    }
    secret_file(&config.data_dir).map(|s| (s, SecretSource::File))
}

fn secret_file(data_dir: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot create data directory {}: {e}", data_dir.display()),
        )
    })?;
    let path = data_dir.join(".jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    let secret = util::random_secret();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    log::info!("generated a JWT secret and stored it in {} (mode 0600)", path.display());
    Ok(secret)
}

/// `vski admin create`: creates the admin or sets its password, without a running server.
///
/// Refuses a directory that does not exist (unless `create`), one a server is using, and a
/// replica's (an admin written there would make the replica differ from its master). Input is
/// checked before anything touches the disk, and a directory this call created is removed
/// again when it fails: a failed command leaves nothing behind.
pub async fn admin_create(
    data_dir: &Path,
    email: String,
    password: String,
    create: bool,
) -> Result<String, error::ApiError> {
    auth::handlers::check_admin_input(&email, &password)?;
    let id = with_admins(data_dir, create, move |db, c| async move {
        auth::handlers::upsert_admin(&db, c, email, password, false).await
    })
    .await?
    .id()
    .to_string();
    auth::installer::remove(data_dir);
    Ok(id)
}

/// `vski admin list`: `(id, email, created)` of every admin, oldest first.
pub async fn admin_list(data_dir: &Path) -> Result<Vec<(String, String, String)>, error::ApiError> {
    with_admins(data_dir, false, |db, c| async move {
        db.read(move |conn| {
            let sql = format!(
                "SELECT id, email, created FROM {} ORDER BY created, id",
                util::quote_ident(&c.name)
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    })
    .await
}

/// `vski admin delete`: deletes the admin `email`; its id, or a 400 when there is none.
pub async fn admin_delete(data_dir: &Path, email: &str) -> Result<String, error::ApiError> {
    let email = email.to_string();
    with_admins(data_dir, false, move |db, c| async move {
        db.write(move |conn| {
            let found = records::store::find_auth(conn, &c, &email)?
                .filter(|a| {
                    a.data
                        .get("email")
                        .and_then(|e| e.as_str())
                        .is_some_and(|e| e.eq_ignore_ascii_case(&email))
                })
                .ok_or_else(|| error::ApiError::bad_request(format!("There is no admin {email}.")))?;
            let schema = collections::store::Schema::from_collections(vec![(*c).clone()]);
            records::store::delete(conn, &schema, &c, found.id())?;
            Ok(found.id().to_string())
        })
        .await
    })
    .await
}

/// Runs `f` on the `default` database and its `_superusers` collection of `data_dir`, as the
/// server would (locked, with the changelog recorder, so what it writes replicates), and closes
/// it. A directory created here (`create`) is removed again when `f` fails.
async fn with_admins<T, F, Fut>(data_dir: &Path, create: bool, f: F) -> Result<T, error::ApiError>
where
    F: FnOnce(std::sync::Arc<db::Database>, std::sync::Arc<collections::model::Collection>) -> Fut,
    Fut: std::future::Future<Output = Result<T, error::ApiError>>,
{
    datadir::private_umask();
    let existed = data_dir.exists();
    datadir::ensure(data_dir, create)?;
    let result = async {
        let _lock = datadir::lock(data_dir).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{e}: stop the server first, or use the admin API (POST /api/admins/init for the first admin)"),
            )
        })?;
        if datadir::is_replica_dir(data_dir) {
            return Err(error::ApiError::bad_request(format!(
                "{} belongs to a replica: manage admins on the master, and they replicate.",
                data_dir.display()
            )));
        }
        // The same recorder as the server's, so an admin created offline replicates too.
        let recorder: std::sync::Arc<dyn db::writer::Recorder> = replica::recorder::ChangeRecorder::new();
        let db = db::Database::open(db::DEFAULT_DB, data_dir.join("default.db"), 1, Some(recorder))?;
        let result = async {
            db.write(|conn| collections::store::bootstrap(conn, db::DEFAULT_DB))
                .await?;
            let c = db
                .read(|conn| collections::store::find_live(conn, collections::store::SUPERUSERS))
                .await?
                .ok_or_else(|| error::ApiError::internal("admin", "_superusers missing"))?;
            f(db.clone(), std::sync::Arc::new(c)).await
        }
        .await;
        let db2 = db.clone();
        let _ = tokio::task::spawn_blocking(move || db2.close()).await;
        result
    }
    .await;
    if result.is_err() && !existed {
        let _ = std::fs::remove_dir_all(data_dir);
    }
    result
}

/// `vski healthcheck`: whether the server at `host:port` answers `GET /health` with 200. A
/// replica that holds no data yet answers 503, so a container is healthy only once it can serve.
pub fn healthcheck(host: &str, port: u16) -> Result<(), String> {
    let url = format!("http://{host}:{port}/health");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let status = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        client.get(&url).send().await.map(|r| r.status().as_u16()).map_err(|e| {
            let why = replica::follower::transport_error(&e);
            format!("{url}: {}", why.replace(" (is the master running at MASTER_URL?)", ""))
        })
    })?;
    match status {
        200 => Ok(()),
        s => Err(format!("{url} answered {s}")),
    }
}
