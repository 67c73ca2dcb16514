//! `GET /api/webhooks/logs` (admins only): this node's delivery attempts, newest first.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/webhooks/logs").route(web::get().to(logs)));
}

#[derive(Deserialize)]
struct LogQuery {
    db: Option<String>,
    collection: Option<String>,
    limit: Option<u32>,
}

async fn logs(state: web::Data<AppState>, who: Identity, q: web::Query<LogQuery>) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let stats = state
        .dbs
        .get(crate::db::STATS_DB)
        .ok_or_else(|| ApiError::internal("webhooks", "stats database missing"))?;
    let q = q.into_inner();
    let limit = i64::from(q.limit.unwrap_or(100).clamp(1, 1000));
    let items = stats
        .read(move |conn| {
            if !conn
                .prepare("SELECT 1 FROM sqlite_master WHERE name = 'webhook_logs'")?
                .exists([])?
            {
                return Ok(Vec::new());
            }
            let mut stmt = conn.prepare(
                "SELECT key, db, collection, action, record_id, url, attempt, status, outcome, error, created
                 FROM webhook_logs WHERE (?1 IS NULL OR db = ?1) AND (?2 IS NULL OR collection = ?2)
                 ORDER BY id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(rusqlite::params![q.db, q.collection, limit], |r| {
                Ok(json!({
                    "key": r.get::<_, String>(0)?,
                    "db": r.get::<_, String>(1)?,
                    "collection": r.get::<_, String>(2)?,
                    "action": r.get::<_, String>(3)?,
                    "recordId": r.get::<_, String>(4)?,
                    "url": r.get::<_, String>(5)?,
                    "attempt": r.get::<_, i64>(6)?,
                    "status": r.get::<_, i64>(7)?,
                    "outcome": r.get::<_, String>(8)?,
                    "error": r.get::<_, String>(9)?,
                    "created": r.get::<_, String>(10)?,
                }))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await?;
    Ok(HttpResponse::Ok().json(items))
}
