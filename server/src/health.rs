//! `/health` and `/api/health`: liveness, and the node's replication mode.

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::app::resource;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)))
        .service(resource("/api/health").route(web::get().to(health)));
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "code": 200, "message": "API is healthy.", "mode": "master"}))
}
