//! `/api/databases`: list, create and delete databases. Admins only.

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};
use crate::http::resource;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/api/databases")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(resource("/api/databases/{name}").route(web::delete().to(delete)));
}

async fn list(state: web::Data<AppState>, who: Identity) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let dbs: Vec<Value> = state
        .dbs
        .list()
        .iter()
        .map(|d| json!({"name": d.name, "size": d.size()}))
        .collect();
    Ok(HttpResponse::Ok().json(dbs))
}

async fn create(state: web::Data<AppState>, who: Identity, body: web::Json<Value>) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_field("name", "validation_required", "Missing required value."))?
        .to_string();
    let db = state.dbs.create(&name)?;
    state.bootstrap(&db).await?;
    Ok(HttpResponse::Created().json(json!({"name": name})))
}

async fn delete(state: web::Data<AppState>, who: Identity, path: web::Path<String>) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let name = path.into_inner();
    let st = state.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || st.dbs.delete(&n))
        .await
        .map_err(|e| ApiError::internal("delete database", e.to_string()))??;
    state.schemas.forget(&name);
    state.storage.remove_db(&name).await;
    if let Ok(mut c) = state.master.checksums.lock() {
        c.remove(&name);
    }
    Ok(HttpResponse::NoContent().finish())
}
