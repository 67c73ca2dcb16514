//! Write forwarding (`REPLICA_WRITES=forward`): a replica proxies a write (or a read it could not
//! serve at the position asked for in time) to its master with the
//! client's own headers (its token included, so forwarding grants nothing new), streams the
//! body both ways, and answers only once it has applied the write's position, so the client
//! reads its write on the same replica at once. No request ever runs on both nodes: the
//! replica only relays.

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{HttpMessage, HttpResponse, web};
use futures_util::StreamExt;
use serde_json::json;

use crate::error::error_body;
use crate::http::requested_db_name;
use crate::state::AppState;

/// Headers that belong to one connection and never cross a proxy, and the ones the proxy
/// sets itself.
const NOT_RELAYED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "x-forwarded-proto",
];

/// The headers of the master's answer this replica replaces with its own.
fn own_header(name: &str) -> bool {
    name.starts_with("x-replica-") || name == "x-master-url" || name == "x-db-position"
}

/// Proxies `req` to the master and relays its answer; 502 when the master cannot be reached.
pub async fn forward(
    state: web::Data<AppState>,
    mut req: ServiceRequest,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(f) = state.follower.as_ref() else {
        return Ok(req.into_response(HttpResponse::InternalServerError().finish()));
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let method =
        reqwest::Method::from_bytes(req.method().as_str().as_bytes()).map_err(actix_web::error::ErrorBadRequest)?;
    let mut rb = f.http().request(method, format!("{}{path}", f.master_url()));
    for (k, v) in req.headers() {
        let name = k.as_str();
        if !NOT_RELAYED.contains(&name) && name != "x-forwarded-for" {
            rb = rb.header(name, v.as_bytes());
        }
    }
    let peer = req.peer_addr().map(|a| a.ip().to_string());
    let before = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let forwarded_for = match (before, peer) {
        (Some(b), Some(p)) => format!("{b}, {p}"),
        (Some(b), None) => b,
        (None, Some(p)) => p,
        (None, None) => String::new(),
    };
    if !forwarded_for.is_empty() {
        rb = rb.header("X-Forwarded-For", forwarded_for);
    }
    rb = rb.header("X-Forwarded-Proto", req.connection_info().scheme().to_string());
    // The client's body is read here as it arrives and handed to the master's request through a
    // channel (actix's payload cannot leave this thread).
    let mut payload = req.take_payload();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(8);
    actix_web::rt::spawn(async move {
        while let Some(chunk) = payload.next().await {
            let item = chunk.map_err(|e| std::io::Error::other(e.to_string()));
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let resp = match rb.body(reqwest::Body::wrap_stream(body)).send().await {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("the master cannot be reached: {}", super::follower::transport_error(&e));
            return Ok(req.into_response(error_body(StatusCode::BAD_GATEWAY, &msg, json!({}))));
        }
    };
    // The write is done on the master; wait (bounded) until it is applied here, so a read that
    // follows on this replica sees it.
    if let Some(position) = resp.headers().get("x-db-position").and_then(|v| v.to_str().ok()) {
        let name = requested_db_name(req.request());
        f.wait_for_position(&state, &name, position).await;
    }
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = HttpResponse::build(status);
    for (k, v) in resp.headers() {
        let name = k.as_str();
        if !NOT_RELAYED.contains(&name) && !own_header(name) {
            out.append_header((name, v.as_bytes()));
        }
    }
    Ok(req.into_response(out.streaming(resp.bytes_stream())))
}
