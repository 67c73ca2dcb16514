//! A multipart record body (actix-multipart): text parts and `@jsonPayload` become the JSON body,
//! file parts are streamed to temporary files.

use std::path::PathBuf;

use actix_web::HttpRequest;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use super::Storage;
use crate::error::{ApiError, ApiResult};

/// One uploaded file, in a temporary file until it is placed.
#[derive(Debug)]
pub struct Upload {
    /// The part's name: a field, or `field+` (append).
    pub key: String,
    pub original: String,
    pub content_type: String,
    pub size: u64,
    pub tmp: PathBuf,
    /// Hex sha256 of the content (replicas verify their copy against it).
    pub sha256: String,
}

/// Temporary files of a request, deleted when dropped unless placed (renamed away).
#[derive(Debug, Default)]
pub struct Uploads(pub Vec<Upload>);

impl Drop for Uploads {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = std::fs::remove_file(&u.tmp);
        }
    }
}

/// Bytes of a file read to recognise its type.
const SNIFF_BYTES: usize = 8192;

/// The type a file part really has: the one its bytes show (magic numbers, the `infer` crate)
/// when they show one, whatever the part declared. Bytes that show none keep a declared type
/// only if it is one whose files always show themselves (`image/png` must look like a PNG), so
/// text, JSON or CSV keep theirs and a script declared as an image becomes
/// `application/octet-stream`.
pub fn real_type(declared: &str, head: &[u8]) -> String {
    if let Some(kind) = infer::get(head) {
        return kind.mime_type().to_string();
    }
    let declared = declared.to_ascii_lowercase();
    let recognisable = (["image/", "video/", "audio/", "font/"]
        .iter()
        .any(|p| declared.starts_with(p))
        && declared != "image/svg+xml")
        || matches!(
            declared.as_str(),
            "application/pdf" | "application/zip" | "application/gzip" | "application/x-tar" | "application/wasm"
        );
    if recognisable {
        "application/octet-stream".to_string()
    } else {
        declared
    }
}

/// The most parts one multipart body may have: each file part costs a temporary file, so a
/// body of thousands of empty parts is refused at the 101st instead of costing disk work.
pub const MAX_PARTS: usize = 100;

pub fn is_multipart(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// Reads a multipart body: the JSON body (`@jsonPayload` merged with the text parts; a key sent
/// twice becomes a list, as PocketBase) and the uploaded files. `max_file` caps each file part
/// (by its field's `maxSize`), the storage's limit caps the request's files, `text_limit`
/// (`BODY_LIMIT`) its text parts together (text is held in memory, files are not), and
/// [`MAX_PARTS`] the number of parts.
pub async fn read(
    req: &HttpRequest,
    payload: actix_web::web::Payload,
    storage: &Storage,
    text_limit: usize,
    max_file: impl Fn(&str) -> Option<u64>,
) -> ApiResult<(Map<String, Value>, Uploads)> {
    let mut parts = actix_multipart::Multipart::new(req.headers(), payload.into_inner());
    let mut body = Map::new();
    let mut uploads = Uploads::default();
    let mut total: u64 = 0;
    let mut text_total: usize = 0;
    let tmp_dir = storage.tmp_dir();
    tokio::fs::create_dir_all(&tmp_dir).await?;
    let mut count = 0;
    while let Some(part) = parts.next().await {
        let mut part = part.map_err(|e| ApiError::bad_request(format!("Invalid multipart body: {e}")))?;
        count += 1;
        if count > MAX_PARTS {
            return Err(ApiError::bad_request(format!(
                "A multipart body may have at most {MAX_PARTS} parts."
            )));
        }
        let (name, filename) = match part.content_disposition() {
            Some(cd) => (
                cd.get_name().unwrap_or_default().to_string(),
                cd.get_filename().map(str::to_string),
            ),
            None => (String::new(), None),
        };
        if name.is_empty() {
            return Err(ApiError::bad_request("Every multipart part needs a name."));
        }
        match filename {
            Some(original) => {
                let field = name.trim_end_matches('+');
                let Some(limit) = max_file(field) else {
                    return Err(ApiError::invalid_field(
                        field,
                        "validation_invalid_file",
                        format!("'{field}' is not a file field."),
                    ));
                };
                let content_type = part
                    .content_type()
                    .map(|m| m.essence_str().to_string())
                    .unwrap_or_else(|| "application/octet-stream".into());
                let tmp = tmp_dir.join(format!("upload-{}", crate::util::random_id(20)));
                let mut file = tokio::fs::File::create(&tmp).await?;
                // Registered before the first byte, so a failure below removes the file.
                uploads.0.push(Upload {
                    key: name.clone(),
                    original,
                    content_type,
                    size: 0,
                    tmp: tmp.clone(),
                    sha256: String::new(),
                });
                let mut size: u64 = 0;
                let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
                // The first bytes, to tell the content's real type from the declared one.
                let mut head: Vec<u8> = Vec::new();
                while let Some(chunk) = part.next().await {
                    let chunk = chunk.map_err(|e| ApiError::bad_request(format!("Invalid multipart body: {e}")))?;
                    size += chunk.len() as u64;
                    total += chunk.len() as u64;
                    if size > limit {
                        return Err(ApiError::invalid_field(
                            field,
                            "validation_file_size_limit",
                            format!("Each file of '{field}' is at most {limit} bytes."),
                        ));
                    }
                    if total > storage.upload_limit {
                        return Err(ApiError::PayloadTooLarge(storage.upload_limit as usize));
                    }
                    sha2::Digest::update(&mut hasher, &chunk);
                    if head.len() < SNIFF_BYTES {
                        head.extend_from_slice(&chunk[..chunk.len().min(SNIFF_BYTES - head.len())]);
                    }
                    file.write_all(&chunk).await?;
                }
                file.flush().await?;
                file.sync_all().await?;
                if let Some(u) = uploads.0.last_mut() {
                    u.content_type = real_type(&u.content_type, &head);
                    u.size = size;
                    u.sha256 = crate::util::hex(&sha2::Digest::finalize(hasher));
                }
            }
            None => {
                let mut text = Vec::new();
                while let Some(chunk) = part.next().await {
                    let chunk = chunk.map_err(|e| ApiError::bad_request(format!("Invalid multipart body: {e}")))?;
                    text_total += chunk.len();
                    if text_total > text_limit {
                        return Err(ApiError::PayloadTooLarge(text_limit));
                    }
                    text.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(text)
                    .map_err(|_| ApiError::bad_request(format!("Part '{name}' is not UTF-8 text.")))?;
                if name == "@jsonPayload" {
                    match serde_json::from_str::<Value>(&text) {
                        Ok(Value::Object(m)) => {
                            for (k, v) in m {
                                body.insert(k, v);
                            }
                        }
                        _ => return Err(ApiError::bad_request("@jsonPayload must be a JSON object.")),
                    }
                } else {
                    let value = Value::String(text);
                    match body.get_mut(&name) {
                        Some(Value::Array(list)) => list.push(value),
                        Some(existing) => {
                            let first = existing.take();
                            *existing = Value::Array(vec![first, value]);
                        }
                        None => {
                            body.insert(name, value);
                        }
                    }
                }
            }
        }
    }
    Ok((body, uploads))
}

#[cfg(test)]
mod tests {
    use super::real_type;

    #[test]
    fn the_content_decides_the_type_where_it_can() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(real_type("text/plain", png), "image/png");
        assert_eq!(real_type("image/png", b"<script>"), "text/html");
        assert_eq!(real_type("image/png", b"not an image"), "application/octet-stream");
        assert_eq!(real_type("application/pdf", b"hello"), "application/octet-stream");
        assert_eq!(real_type("text/csv", b"a,b\n1,2"), "text/csv");
        assert_eq!(real_type("Application/JSON", b"{}"), "application/json");
        assert_eq!(real_type("image/svg+xml", b"<svg/>"), "image/svg+xml");
    }
}
