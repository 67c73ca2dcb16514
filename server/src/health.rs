//! `/health` and `/api/health`: liveness, and the node's replication mode.

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::app::{AppState, resource};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)))
        .service(resource("/api/health").route(web::get().to(health)));
}

/// Always 200 while the process serves: a replica that cannot reach its master keeps serving
/// reads and says how stale it is (`stale`, `lastError`, `secondsSinceLastSync`).
async fn health(state: web::Data<AppState>) -> HttpResponse {
    let mut body = json!({"status": "ok", "code": 200, "message": "API is healthy."});
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
    HttpResponse::Ok().json(body)
}
