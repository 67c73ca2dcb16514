//! `/health` and `/api/health`: liveness, and the node's replication mode.
//!
//! Anyone learns whether the node serves, its mode, and on a replica whether it is ready and
//! how stale it is (what a load balancer or a client choosing a node needs). The details name
//! databases, versions, the master's address and errors: they are for admins and for holders
//! of a replica token (other nodes and operators' tooling) only.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Map, Value, json};

use crate::auth::Identity;

use crate::http::resource;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)))
        .service(resource("/api/health").route(web::get().to(health)))
        .service(resource("/health/master").route(web::get().to(is_master)))
        .service(resource("/health/replica").route(web::get().to(is_ready_replica)));
}

/// 200 only on the master (Patroni's `/primary`): a proxy that checks it sends writes to
/// whichever node answers 200.
async fn is_master(state: web::Data<AppState>) -> HttpResponse {
    role_check(state.follower.is_none(), "master")
}

/// 200 only on a replica that holds data and whose master accepts it (Patroni's `/replica`).
async fn is_ready_replica(state: web::Data<AppState>) -> HttpResponse {
    let ready = state.follower.as_ref().is_some_and(|f| f.unready_reason().is_none());
    role_check(ready, "ready replica")
}

fn role_check(yes: bool, what: &str) -> HttpResponse {
    if yes {
        HttpResponse::Ok().json(json!({"status": "ok", "code": 200, "message": format!("this node is the {what}")}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "unavailable", "code": 503,
            "message": format!("this node is not the {what}")}))
    }
}

/// 200 while the node can serve. A replica that never got data from its master, or whose token
/// the master refuses (another `JWT_SECRET`, clock skew), answers 503 with the reason (load
/// balancers must not send it traffic); one that synced before keeps answering 200 when
/// the master goes away, and says how stale it is (`stale`, `lastError`, `secondsSinceLastSync`).
async fn health(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let mut body = json!({"status": "ok", "code": 200, "message": "API is healthy."});
    if let Some(why) = state.follower.as_ref().and_then(|f| f.unready_reason()) {
        body = json!({"status": "unavailable", "code": 503, "message": why});
    }
    match &state.follower {
        Some(f) => {
            body["mode"] = json!("replica");
            if let (Some(obj), serde_json::Value::Object(extra)) =
                (body.as_object_mut(), crate::replica::follower::health(f))
            {
                obj.extend(extra);
            }
        }
        None => body["mode"] = json!("master"),
    }
    body["realtime"] = json!({"enabled": state.realtime.enabled, "clients": state.realtime.count()});
    let details = matches!(
        crate::auth::identify(&req, &state).await,
        Ok(Identity::Admin(_) | Identity::Replica(_))
    );
    if !details {
        body = public(body);
    }
    let status = if body["code"] == 503 {
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        actix_web::http::StatusCode::OK
    };
    HttpResponse::build(status).json(body)
}

/// What everyone may read of a full `/health` answer: no database names, versions, addresses,
/// ids or errors; on a replica the largest `lagMs` of its databases stands for them all.
fn public(full: Value) -> Value {
    const SHOWN: [&str; 9] = [
        "status",
        "code",
        "message",
        "mode",
        "ready",
        "stale",
        "streamBroken",
        "syncMode",
        "secondsSinceLastSync",
    ];
    let mut out = Map::new();
    for key in SHOWN {
        if let Some(v) = full.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(dbs) = full.get("dbs").and_then(Value::as_object) {
        let lag = dbs.values().filter_map(|d| d["lagMs"].as_u64()).max().unwrap_or(0);
        out.insert("lagMs".into(), json!(lag));
    }
    out.insert("realtime".into(), json!({"enabled": full["realtime"]["enabled"]}));
    Value::Object(out)
}
