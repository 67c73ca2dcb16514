//! `GET /api/files/{collection}/{recordId}/{filename}`: a stored file, under the record's
//! viewRule, with its content type, ETag, Last-Modified and Range support (actix-files).

use actix_web::http::header::{ContentDisposition, DispositionParam, DispositionType};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::auth::identify_token;
use crate::error::{ApiError, ApiResult};
use crate::records::rules::{Action, auth_record, authorize, condition, matches};
use crate::records::store;
use crate::state::AppState;

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
    let download = matches!(q.download.as_deref(), Some("1" | "true"));
    if let Some(store) = &state.storage.s3 {
        let key = super::Storage::key(&db.name, &c.id, &record_id, &name);
        return serve_object(store.as_ref(), &key, &name, &req, download).await;
    }
    let file_path = state.storage.record_dir(&db.name, &c, &record_id).join(&name);
    let file = match web::block(move || actix_files::NamedFile::open(file_path)).await {
        Ok(Ok(f)) => f,
        // A replica that has the record but not yet its file: with forwarding on, the master
        // answers; otherwise 404 until the file has arrived.
        _ => match state.follower.as_ref().filter(|f| f.forward_writes) {
            Some(f) => return proxy(f, &req).await,
            None => return Err(not_found()),
        },
    };
    let file = file.set_content_disposition(ContentDisposition {
        disposition: if download || !shown_inline(&name) {
            DispositionType::Attachment
        } else {
            DispositionType::Inline
        },
        parameters: vec![DispositionParam::Filename(name.clone())],
    });
    let mut resp = file.into_response(&req);
    harden(&mut resp);
    Ok(resp)
}

/// Whether a stored file named `name` is shown in the browser (`inline`): images, video, audio
/// and PDF only. Anything else (HTML, SVG, scripts, text) is sent as an attachment, even where
/// the CSP sandbox would hold, so that no upload is ever rendered as a page of this origin.
pub fn shown_inline(name: &str) -> bool {
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    let essence = mime.essence_str();
    essence != "image/svg+xml"
        && (["image/", "video/", "audio/"].iter().any(|p| essence.starts_with(p)) || essence == "application/pdf")
}

/// Uploaded content is never a page of this origin: no scripts, no sniffing.
fn harden(resp: &mut HttpResponse) {
    let h = resp.headers_mut();
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
}

/// A single `bytes=` range of an object of `size` bytes: `Some(Ok(start..end))`, `Some(Err)`
/// when unsatisfiable, `None` without a (usable) Range header (the whole object is sent).
fn byte_range(header: Option<&str>, size: u64) -> Option<Result<std::ops::Range<u64>, ()>> {
    let spec = header?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let range = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            size.saturating_sub(n)..size
        }
        (a, "") => a.parse().ok()?..size,
        (a, b) => a.parse().ok()?..b.parse::<u64>().ok()?.saturating_add(1).min(size),
    };
    Some(if range.start < range.end && range.start < size {
        Ok(range)
    } else {
        Err(())
    })
}

/// Serves an object of the bucket: ETag and If-None-Match, a single Range, streamed.
async fn serve_object(
    store: &dyn object_store::ObjectStore,
    key: &object_store::path::Path,
    name: &str,
    req: &HttpRequest,
    download: bool,
) -> ApiResult<HttpResponse> {
    use actix_web::http::header;
    use object_store::ObjectStoreExt;
    let meta = match store.head(key).await {
        Ok(m) => m,
        Err(object_store::Error::NotFound { .. }) => return Err(ApiError::not_found("File not found.")),
        Err(e) => return Err(ApiError::internal("read a file from S3", e.to_string())),
    };
    let etag = meta
        .e_tag
        .clone()
        .map(|t| if t.starts_with('"') { t } else { format!("\"{t}\"") });
    let disposition = ContentDisposition {
        disposition: if download || !shown_inline(name) {
            DispositionType::Attachment
        } else {
            DispositionType::Inline
        },
        parameters: vec![DispositionParam::Filename(name.to_string())],
    };
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    let mut out = HttpResponse::Ok();
    out.insert_header((header::CONTENT_TYPE, mime.essence_str().to_string()))
        .insert_header((header::CONTENT_DISPOSITION, disposition))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((
            header::LAST_MODIFIED,
            meta.last_modified.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        ));
    if let Some(t) = &etag {
        out.insert_header((header::ETAG, t.clone()));
        let none_match = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
        if none_match.is_some_and(|v| v.split(',').any(|x| x.trim() == t || x.trim() == "*")) {
            let mut resp = out.status(actix_web::http::StatusCode::NOT_MODIFIED).finish();
            harden(&mut resp);
            return Ok(resp);
        }
    }
    let range = byte_range(
        req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()),
        meta.size,
    );
    let options = match &range {
        Some(Ok(r)) => object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(r.clone())),
            ..Default::default()
        },
        Some(Err(())) => {
            let mut resp = HttpResponse::RangeNotSatisfiable()
                .insert_header((header::CONTENT_RANGE, format!("bytes */{}", meta.size)))
                .finish();
            harden(&mut resp);
            return Ok(resp);
        }
        None => object_store::GetOptions::default(),
    };
    let got = store
        .get_opts(key, options)
        .await
        .map_err(|e| ApiError::internal("read a file from S3", e.to_string()))?;
    if let Some(Ok(r)) = &range {
        out.status(actix_web::http::StatusCode::PARTIAL_CONTENT).insert_header((
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", r.start, r.end - 1, meta.size),
        ));
    }
    let length = got.range.end - got.range.start;
    let mut resp = out.no_chunking(length).streaming(got.into_stream());
    harden(&mut resp);
    Ok(resp)
}

/// Streams the same GET from the master (a replica's file that has not arrived yet).
async fn proxy(follower: &crate::replica::follower::Follower, req: &HttpRequest) -> ApiResult<HttpResponse> {
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    // The follower's pooled client, as write forwarding uses.
    let mut rb = follower.http().get(format!("{}{path}", follower.master_url()));
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
