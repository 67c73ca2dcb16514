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
    let file = match web::block(move || actix_files::NamedFile::open(file_path)).await {
        Ok(Ok(f)) => f,
        // A replica that has the record but not yet its file: with forwarding on, the master
        // answers; otherwise 404 until the file has arrived.
        _ => match state.follower.as_ref().filter(|f| f.forward_writes) {
            Some(f) => return proxy(&f.master_url, &req).await,
            None => return Err(not_found()),
        },
    };
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

/// Streams the same GET from the master (a replica's file that has not arrived yet).
async fn proxy(master: &str, req: &HttpRequest) -> ApiResult<HttpResponse> {
    let url = format!(
        "{master}{}",
        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    let mut rb = reqwest::Client::new().get(url);
    for h in ["authorization", "range", "if-none-match", "x-dbname"] {
        if let Some(v) = req.headers().get(h).and_then(|v| v.to_str().ok()) {
            rb = rb.header(h, v);
        }
    }
    let resp = rb
        .send()
        .await
        .map_err(|e| ApiError::internal("proxy a file from the master", e.to_string()))?;
    let status = actix_web::http::StatusCode::from_u16(resp.status().as_u16())
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let mut out = HttpResponse::build(status);
    for (k, v) in resp.headers() {
        let keep = matches!(
            k.as_str(),
            "content-type"
                | "content-range"
                | "content-disposition"
                | "etag"
                | "last-modified"
                | "accept-ranges"
                | "content-security-policy"
                | "x-content-type-options"
        );
        if keep {
            if let Ok(v) = actix_web::http::header::HeaderValue::from_bytes(v.as_bytes()) {
                out.insert_header((k.as_str(), v));
            }
        }
    }
    Ok(out.streaming(resp.bytes_stream()))
}
