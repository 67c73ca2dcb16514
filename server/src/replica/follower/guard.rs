//! The request path on a replica: 503 until it holds data, `replica is read-only` for writes
//! (or forwarding), and reads held until a client's minimum position is applied.

use super::*;

/// Methods that write.
pub(super) fn is_write(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// Writes a replica still accepts: sign-in and token refresh (they write nothing), and the
/// manual sync.
pub(super) fn allowed_on_replica(path: &str) -> bool {
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
            return crate::replica::forward::forward(st, req).await;
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
                    return crate::replica::forward::forward(st, req).await;
                }
                let resp = error_body(StatusCode::GATEWAY_TIMEOUT, "replica is behind", json!({}));
                return Ok(req.into_response(resp));
            }
        }
    }
    next.call(req).await
}
