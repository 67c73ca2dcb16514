//! `/health` and `/api/health`: liveness, and the node's replication mode.

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::http::resource;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)))
        .service(resource("/api/health").route(web::get().to(health)));
}

/// 200 while the node can serve. A replica that never got data from its master, or whose token
/// the master refuses (another `JWT_SECRET`, clock skew), answers 503 with the reason (load
/// balancers must not send it traffic); one that synced before keeps answering 200 when
/// the master goes away, and says how stale it is (`stale`, `lastError`, `secondsSinceLastSync`).
async fn health(state: web::Data<AppState>) -> HttpResponse {
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
    let status = if body["code"] == 503 {
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        actix_web::http::StatusCode::OK
    };
    HttpResponse::build(status).json(body)
}
