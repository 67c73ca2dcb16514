//! `/api/cron` (admins only).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::store::{self, JobDef};
use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/cron")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(web::resource("/api/cron/{name}").route(web::delete().to(delete)))
    .service(web::resource("/api/cron/{name}/runs").route(web::get().to(runs)));
}

fn default_db(state: &AppState) -> ApiResult<std::sync::Arc<crate::db::Database>> {
    state
        .dbs
        .get(crate::db::DEFAULT_DB)
        .ok_or_else(|| ApiError::internal("cron", "default database missing"))
}

/// The jobs, each with `active`: whether this node runs it.
async fn list(state: web::Data<AppState>, who: Identity) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let defs = default_db(&state)?.read(|conn| Ok(store::list(conn)?)).await?;
    let items: Vec<serde_json::Value> = defs
        .iter()
        .map(|d| {
            let mut v = serde_json::to_value(d).unwrap_or_default();
            v["active"] = json!(super::runs_here(&state, d));
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(items))
}

/// Creates a job, or replaces the job of the same name.
async fn create(state: web::Data<AppState>, who: Identity, body: web::Json<JobDef>) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let mut def = body.into_inner();
    def.name = def.name.trim().to_string();
    // Every problem at once: the static checks, then the SQL against its database.
    let mut errors = store::check(&mut def);
    if def.kind == "http"
        && !state.settings.cron_http_allow_local
        && def.url.as_deref().is_some_and(store::is_local_url)
    {
        crate::error::field_error(
            &mut errors,
            "url",
            "validation_local_url",
            "A loopback or link-local address: set CRON_HTTP_ALLOW_LOCAL=true to let jobs call this host.",
        );
    }
    if def.kind == "sql" && !errors.contains_key("sql") && !errors.contains_key("database") {
        match state.dbs.get(def.database()) {
            None => crate::error::field_error(
                &mut errors,
                "database",
                "validation_invalid_database",
                format!("Database '{}' not found.", def.database()),
            ),
            Some(db) => {
                let (path, sql) = (db.path.clone(), def.sql.clone().unwrap_or_default());
                let checked = tokio::task::spawn_blocking(move || store::check_sql(&path, &sql))
                    .await
                    .map_err(|e| ApiError::internal("cron", e.to_string()))?;
                if let Err(ApiError::BadRequest { data, .. }) = checked {
                    errors.extend(data);
                } else {
                    checked?;
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let saved = def.clone();
    default_db(&state)?
        .write(move |conn| Ok(store::save(conn, &saved)?))
        .await?;
    super::reload(&state).await?;
    Ok(HttpResponse::Ok().json(def))
}

async fn delete(state: web::Data<AppState>, who: Identity, name: web::Path<String>) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let name = name.into_inner();
    let found = default_db(&state)?
        .write(move |conn| Ok(store::delete(conn, &name)?))
        .await?;
    if !found {
        return Err(ApiError::not_found("Cron job not found."));
    }
    super::reload(&state).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// This node's newest runs of a job, newest first.
async fn runs(state: web::Data<AppState>, who: Identity, name: web::Path<String>) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let stats = state
        .dbs
        .get(crate::db::STATS_DB)
        .ok_or_else(|| ApiError::internal("cron", "stats database missing"))?;
    let name = name.into_inner();
    let runs = stats.read(move |conn| Ok(store::runs(conn, &name)?)).await?;
    Ok(HttpResponse::Ok().json(runs))
}
