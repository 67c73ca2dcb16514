//! `/api/collections`: list, create, view, update and (soft) delete collections. Admins only.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};

use super::model::CollectionInput;
use super::store;
use crate::auth::Identity;
use crate::error::{ApiError, ApiResult, FieldErrors};
use crate::http::resource;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/api/collections")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(
        resource("/api/collections/{c}")
            .route(web::get().to(view))
            .route(web::patch().to(update))
            .route(web::delete().to(delete)),
    );
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    page: Option<u64>,
    per_page: Option<u64>,
}

async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    q: web::Query<ListQuery>,
) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let db = state.db(&req)?;
    let all = state.schemas.get(&db).await?.all();
    let page = q.page.unwrap_or(1).max(1);
    let per_page = q.per_page.unwrap_or(30).clamp(1, 1000);
    let total = all.len() as u64;
    let items: Vec<Value> = all
        .iter()
        .skip(((page - 1).saturating_mul(per_page)).min(total) as usize)
        .take(per_page as usize)
        .map(|c| c.to_json())
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "page": page, "perPage": per_page, "totalItems": total, "totalPages": total.div_ceil(per_page), "items": items,
    })))
}

fn parse_input(body: &Value) -> ApiResult<CollectionInput> {
    let mut errors = FieldErrors::new();
    let input = CollectionInput::parse(body, &mut errors);
    if errors.is_empty() {
        Ok(input)
    } else {
        Err(ApiError::validation(errors))
    }
}

async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    body: web::Json<Value>,
) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let db = state.db(&req)?;
    let input = parse_input(&body)?;
    let c = db.write_alone(move |conn| store::create(conn, input)).await?;
    state.schemas.reload(&db).await?;
    Ok(HttpResponse::Ok().json(c.to_json()))
}

async fn view(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let db = state.db(&req)?;
    Ok(HttpResponse::Ok().json(state.collection(&db, &path).await?.to_json()))
}

async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let db = state.db(&req)?;
    let input = parse_input(&body)?;
    let name = path.into_inner();
    let c = db.write_alone(move |conn| store::update(conn, &name, input)).await?;
    state.schemas.reload(&db).await?;
    Ok(HttpResponse::Ok().json(c.to_json()))
}

async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    who.require_admin()?;
    let db = state.db(&req)?;
    let name = path.into_inner();
    db.write_alone(move |conn| store::delete(conn, &name)).await?;
    state.schemas.reload(&db).await?;
    Ok(HttpResponse::NoContent().finish())
}
