//! `GET /api/files/{collection}/{recordId}/{filename}`: a stored file, under the record's
//! viewRule, with its content type, ETag, Last-Modified and Range support (actix-files).

use actix_web::http::header::{ContentDisposition, DispositionParam, DispositionType};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::app::AppState;
use crate::auth::identify_token;
use crate::error::{ApiError, ApiResult};
use crate::records::rules::{Action, auth_record, authorize, condition, matches};
use crate::records::store;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/api/files/{collection}/{record}/{name}").route(web::get().to(serve)));
}

#[derive(Deserialize)]
struct FileQuery {
    download: Option<String>,
    /// A token for clients that cannot send a header (`<img src>`).
    token: Option<String>,
}

async fn serve(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    q: web::Query<FileQuery>,
) -> ApiResult<HttpResponse> {
    let (coll, record_id, name) = path.into_inner();
    let not_found = || ApiError::not_found("File not found.");
    if !store::is_valid_record_id(&record_id) || !super::is_stored_name(&name) {
        return Err(not_found());
    }
    let db = state.db(&req)?;
    let c = state.collection(&db, &coll).await.map_err(|_| not_found())?;
    let token = q.token.as_deref().or_else(|| crate::auth::bearer_token(&req));
    let who = identify_token(&state, token, &db.name).await?;
    let Ok(access) = authorize(&c, Action::View, &who) else {
        return Err(not_found());
    };
    let schema = state.schemas.get(&db).await?;
    let auth = auth_record(&who);
    let cond = condition(&access, &c, &schema, auth.as_ref(), None)?;
    let (c2, id2) = (c.clone(), record_id.clone());
    let rec = db
        .read(move |conn| match store::get(conn, &c2, &id2)? {
            Some(r) if matches(conn, &c2, &id2, cond.as_ref())? => Ok(Some(r)),
            _ => Ok(None),
        })
        .await?
        .ok_or_else(not_found)?;
    // Only a name the record holds reaches the filesystem.
    if !super::fields::stored_names(&c, &rec.data).contains(&name) {
        return Err(not_found());
    }
    let file_path = state.storage.record_dir(&db.name, &c, &record_id).join(&name);
    let file = web::block(move || actix_files::NamedFile::open(file_path))
        .await
        .map_err(|_| not_found())?
        .map_err(|_| not_found())?;
    let download = matches!(q.download.as_deref(), Some("1" | "true"));
    let file = file.set_content_disposition(ContentDisposition {
        disposition: if download {
            DispositionType::Attachment
        } else {
            DispositionType::Inline
        },
        parameters: vec![DispositionParam::Filename(name.clone())],
    });
    let mut resp = file.into_response(&req);
    let h = resp.headers_mut();
    // Uploaded content is never a page of this origin: no scripts, no sniffing.
    h.insert(
        actix_web::http::header::CONTENT_SECURITY_POLICY,
        actix_web::http::header::HeaderValue::from_static(
            "default-src 'none'; media-src 'self'; style-src 'unsafe-inline'; sandbox",
        ),
    );
    h.insert(
        actix_web::http::header::X_CONTENT_TYPE_OPTIONS,
        actix_web::http::header::HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}
