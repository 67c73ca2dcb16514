//! Assembles the HTTP application: extractor settings, middlewares and the route tables of every
//! module, and runs the server until SIGTERM/Ctrl-C. The shared state is `state.rs`.
//!
//! Middleware order (outermost first): access log → preflight status → CORS → HEAD as GET →
//! default response headers → `X-Db-Position` → replica read-only guard (replicas only) → routes. CORS sits
//! outside everything that can answer early, so refusals carry CORS headers too.

use std::net::TcpListener;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode, header};
use actix_web::middleware::DefaultHeaders;
use actix_web::middleware::Next;
use actix_web::{App, HttpResponse, HttpServer, web};

use crate::config::ServeConfig;
use crate::error::{ApiError, error_body};
use crate::http::requested_db_name;
use crate::state::AppState;

async fn not_found() -> HttpResponse {
    error_body(
        StatusCode::NOT_FOUND,
        "The requested resource wasn't found.",
        serde_json::json!({}),
    )
}

fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .content_type_required(false)
        .error_handler(move |err, _| {
            use actix_web::error::JsonPayloadError as E;
            match err {
                E::Overflow { .. } | E::OverflowKnownLength { .. } => ApiError::PayloadTooLarge(limit).into(),
                E::Deserialize(e) => ApiError::bad_request(format!("Malformed JSON body: {e}")).into(),
                other => ApiError::bad_request(format!("Could not read the JSON body: {other}")).into(),
            }
        })
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|err, _| ApiError::bad_request(format!("Invalid query parameters: {err}")).into())
}

/// Registers every route table: the master's replication endpoints on a master, the manual
/// sync on a replica.
pub fn configure(cfg: &mut web::ServiceConfig, replica: bool) {
    // Routes are tried in order, each dynamic one with a regex: the records API, most of the
    // traffic, first. No two tables' paths overlap, so the order changes nothing else.
    crate::records::configure(cfg);
    crate::health::configure(cfg);
    crate::databases::configure(cfg);
    crate::auth::configure(cfg);
    crate::collections::configure(cfg);
    crate::realtime::configure(cfg);
    crate::cron::configure(cfg);
    crate::webhooks::configure(cfg);
    crate::files::configure(cfg);
    if replica {
        crate::replica::follower::configure(cfg);
    } else {
        crate::replica::configure(cfg);
    }
}

/// Response headers scripts in a browser may read: the node's role and position.
const EXPOSED_HEADERS: [&str; 5] = [
    "X-Replica-Id",
    "X-Replica-Mode",
    "X-Master-Url",
    "X-Db-Position",
    "Retry-After",
];

/// CORS for `origins` (empty: any origin, answered with `*` as PocketBase does). Tokens travel
/// in the `Authorization` header, never in cookies, so credentials are not enabled.
fn cors(origins: &[String]) -> actix_cors::Cors {
    let base = actix_cors::Cors::default()
        .allowed_methods(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
        .allow_any_header()
        .expose_headers(EXPOSED_HEADERS)
        .max_age(86_400);
    if origins.is_empty() {
        return base.allow_any_origin().send_wildcard();
    }
    origins.iter().fold(base, |c, o| c.allowed_origin(o))
}

/// Answers a successful CORS preflight with 204 No Content (actix-cors answers 200).
async fn preflight_no_content(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = next.call(req).await?;
    if preflight && res.status() == StatusCode::OK {
        *res.response_mut().status_mut() = StatusCode::NO_CONTENT;
    }
    Ok(res)
}

/// Adds `X-Db-Position` to the successful answer of every API request that addressed a
/// replicated database, read after the handler ran, so a write's answer carries a position at or
/// past the write. Refusals and 404s carry none: a guest must not watch a database's write count
/// (or learn that it exists) through them.
async fn db_position(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let path = req.path();
    let uses_db = path.starts_with("/api/") && !path.starts_with("/api/replica/") && path != "/api/health";
    let name = uses_db.then(|| requested_db_name(req.request()));
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let write = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let mut res = next.call(req).await?;
    let served = res.status().is_success();
    let Some((name, state)) = name.filter(|_| served).zip(state) else {
        return Ok(res);
    };
    if let Some(token) = state.position_token(&name) {
        if let Ok(v) = header::HeaderValue::from_str(&token) {
            res.headers_mut()
                .insert(header::HeaderName::from_static("x-db-position"), v);
        }
        // The same position as a cookie, for clients that send nothing back themselves: the
        // replicas behind the same origin hold their next reads until they reached it.
        if write && state.settings.position_cookie && state.follower.is_none() {
            let cookie = actix_web::cookie::Cookie::build(crate::replica::position::cookie_name(&name), token)
                .path("/")
                .http_only(true)
                .same_site(actix_web::cookie::SameSite::Lax)
                .max_age(actix_web::cookie::time::Duration::seconds(
                    crate::replica::position::COOKIE_MAX_AGE_SECS,
                ))
                .finish();
            if let Ok(v) = header::HeaderValue::from_str(&cookie.to_string()) {
                res.headers_mut().append(header::SET_COOKIE, v);
            }
        }
    }
    Ok(res)
}

/// Adds `X-Master-Url` to a replica's answers: the master it follows now, which may change
/// when `MASTER_URL` lists several nodes. (A master names itself from `PUBLIC_URL`, a fixed
/// header.)
async fn replica_master_url(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let master = req
        .app_data::<web::Data<AppState>>()
        .and_then(|s| s.follower.as_ref().map(|f| f.master_url()));
    let mut res = next.call(req).await?;
    if let Some(v) = master.and_then(|m| header::HeaderValue::from_str(&m).ok()) {
        res.headers_mut()
            .insert(header::HeaderName::from_static("x-master-url"), v);
    }
    Ok(res)
}

/// Serves `HEAD` wherever `GET` is served: the request is routed as a GET, and the HTTP layer,
/// which remembers that the request was a HEAD, sends the headers without the body.
async fn head_as_get(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if req.method() == Method::HEAD {
        req.head_mut().method = Method::GET;
    }
    next.call(req).await
}

/// Resolves when SIGTERM or SIGINT (Ctrl-C) arrives; returns the signal's name.
async fn shutdown_signal() -> std::io::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT"),
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// Serves the API on `listener` until SIGTERM or Ctrl-C, then lets in-flight requests finish
/// and closes every database cleanly.
pub async fn run(config: ServeConfig, secret: String, listener: TcpListener) -> std::io::Result<()> {
    let state = AppState::open(&config, &secret)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot open the data directory: {e}")))?;
    let state = web::Data::new(state);
    let replica = config.is_replica();
    let mut headers = vec![("X-Replica-Mode", if replica { "replica" } else { "master" }.to_string())];
    if let (None, Some(url)) = (&state.follower, &config.public_url) {
        headers.push(("X-Master-Url", url.trim_end_matches('/').to_string()));
    }
    if let Some(f) = &state.follower {
        headers.push(("X-Replica-Id", f.replica_id.clone()));
        log::info!(
            "replica '{}' of {} ({}; rounds every {} s, 0 = manual)",
            f.replica_id,
            f.master_url(),
            f.sync_mode(),
            f.interval
        );
        f.load_positions(&state).await;
        actix_web::rt::spawn(crate::replica::follower::sync_loop(state.clone()));
        actix_web::rt::spawn(crate::replica::follower::stream_loop(state.clone()));
    } else {
        match state.has_admins().await {
            Ok(false) => match state.installer.open() {
                Ok(token) => {
                    let host = match config.host.as_str() {
                        "0.0.0.0" | "::" => "127.0.0.1",
                        h => h,
                    };
                    log::warn!(
                        "no admin exists yet. Create the first one (the installer token is also in {}, 0600, and stops working once an admin exists):\n  \
                         curl -X POST http://{host}:{}/api/admins/init -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{\"email\": \"you@example.com\", \"password\": \"a-long-password\"}}'\n  \
                         or, with the server stopped: vski admin create EMAIL --password-stdin --data-dir {}",
                        state.installer.path().display(),
                        listener.local_addr()?.port(),
                        config.data_dir.display()
                    );
                }
                Err(e) => log::error!(
                    "cannot write the installer token to {}: {e}; create the first admin with `vski admin create`",
                    state.installer.path().display()
                ),
            },
            Ok(true) => crate::auth::installer::remove(&config.data_dir),
            Err(e) => log::error!("cannot count admins: {e}"),
        }
        actix_web::rt::spawn(crate::replica::master::retention_loop(
            state.clone(),
            config.changelog_retention_hours,
            config.file_sync_retention_days,
        ));
    }
    if let Some(queue) = state.realtime_queue.lock().ok().and_then(|mut q| q.take()) {
        actix_web::rt::spawn(crate::realtime::dispatch::run(state.clone(), queue));
        actix_web::rt::spawn(crate::realtime::revoke::sweep(state.clone()));
    }
    if let Some(hooks) = state.webhooks.clone() {
        actix_web::rt::spawn(crate::webhooks::deliver(state.clone(), hooks));
    }
    if let Err(e) = crate::cron::Cron::start(&state).await {
        log::error!("cron: cannot start the scheduler: {e}");
    }
    let pruned = state.clone();
    actix_web::rt::spawn(async move {
        let mut every = tokio::time::interval(crate::auth::limit::PRUNE_EVERY);
        loop {
            every.tick().await;
            pruned.sign_in.prune();
        }
    });
    let limit = config.body_limit;
    let origins = config.cors_origin_list();
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .app_data(json_config(limit))
            .app_data(web::PayloadConfig::default().limit(limit))
            .app_data(query_config())
            .wrap(actix_web::middleware::Condition::new(
                replica,
                actix_web::middleware::from_fn(crate::replica::follower::read_only_guard),
            ))
            .wrap(actix_web::middleware::from_fn(db_position))
            .wrap(actix_web::middleware::from_fn(replica_master_url))
            .wrap(
                headers
                    .iter()
                    .fold(DefaultHeaders::new(), |h, (k, v)| h.add((*k, v.clone()))),
            )
            .wrap(actix_web::middleware::from_fn(head_as_get))
            .wrap(cors(&origins))
            .wrap(actix_web::middleware::from_fn(preflight_no_content))
            .wrap(actix_web::middleware::from_fn(access_log))
            .configure(|cfg| configure(cfg, replica))
            .default_service(web::to(not_found))
    })
    .shutdown_timeout(30);
    if let Some(w) = config.workers {
        server = server.workers(w.max(1));
    }
    log::info!("listening on http://{}", listener.local_addr()?);
    // actix stops gracefully on SIGTERM but forcibly on SIGINT; both must let in-flight
    // requests finish, so the signals are handled here.
    let server = server.disable_signals().listen(listener)?.run();
    let handle = server.handle();
    let stopping = state.clone();
    actix_web::rt::spawn(async move {
        match shutdown_signal().await {
            Ok(name) => log::info!("{name} received: finishing in-flight requests"),
            Err(e) => log::error!("cannot listen for shutdown signals: {e}"),
        }
        // Held long-polls of streaming replicas answer now instead of holding the stop.
        stopping.master.feed.stop();
        handle.stop(true).await;
    });
    server.await?;
    log::info!("server stopped; closing databases");
    let closing = state.clone();
    tokio::task::spawn_blocking(move || closing.dbs.close_all())
        .await
        .map_err(std::io::Error::other)?;
    log::info!("databases closed");
    Ok(())
}

/// Query parameters that carry a credential (`?token=` for files, `?auth=` for realtime):
/// never written to the access log.
const SECRET_PARAMS: [&str; 2] = ["token", "auth"];

/// The request line of the access log, with the values of [`SECRET_PARAMS`] replaced by
/// `[redacted]`.
/// The access log (target `vski::access`): the client (see `http::client_ip`), the request line
/// with secrets redacted, the status, the body size and the time to the answer's head. At info,
/// except health checks and replica traffic (`/health`, `/api/health`, `/api/replica/*`: load
/// balancers and replicas ask all the time), which go at debug.
async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let path = req.path();
    let quiet = path == "/health" || path == "/api/health" || path.starts_with("/api/replica/");
    let level = if quiet { log::Level::Debug } else { log::Level::Info };
    if !log::log_enabled!(target: "vski::access", level) {
        return next.call(req).await;
    }
    let started = std::time::Instant::now();
    let trusted = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.settings.trusted_proxies.as_slice())
        .unwrap_or(&[]);
    let client = crate::http::client_ip(req.request(), trusted).map_or_else(|| "-".to_string(), |ip| ip.to_string());
    let line = access_log_line(req.method(), req.uri(), req.version());
    let res = next.call(req).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let (status, bytes) = match &res {
        Ok(r) => (
            r.status().as_u16(),
            match r.response().body().size() {
                actix_web::body::BodySize::Sized(n) => n.to_string(),
                _ => "-".to_string(),
            },
        ),
        Err(e) => (e.as_response_error().status_code().as_u16(), "-".to_string()),
    };
    log::log!(target: "vski::access", level, "{client} \"{line}\" {status} {bytes} {ms:.3}ms");
    res
}

fn access_log_line(
    method: &actix_web::http::Method,
    uri: &actix_web::http::Uri,
    version: actix_web::http::Version,
) -> String {
    let path = uri.path();
    let query = uri.query().map(|q| {
        q.split('&')
            .map(|pair| {
                // Compared decoded, as the handlers read it (`tok%65n` is `token`).
                let key = form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .map(|(k, _)| k.into_owned());
                match (key, pair.split_once('=')) {
                    (Some(k), Some((raw, _))) if SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                        format!("{raw}=[redacted]")
                    }
                    _ => pair.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    match query {
        Some(q) => format!("{method} {path}?{q} {version:?}"),
        None => format!("{method} {path} {version:?}"),
    }
}
