//! Files of `file` fields: multipart uploads streamed to disk, stored under
//! `DATA_DIR/storage/<db>/<collectionId>/<recordId>/<name>`, served under the record's viewRule.
//!
//! Architecture invariants:
//! - A stored name is generated here (`[a-z0-9_]` stem, a random suffix, a checked extension),
//!   and a file is served only when its name is a value of the record's file field, so no path a
//!   client sends ever reaches the filesystem.
//! - New files are in place before the write that names them commits, and replaced or removed
//!   files are deleted only after it committed: a crash leaves at most unreferenced files,
//!   never a record that names a missing one.
//! - An upload streams to disk in chunks, within `FILE_UPLOAD_LIMIT` for the request and each
//!   field's `maxSize` per file, so memory stays flat whatever the size.

pub mod fields;
pub mod handlers;
pub mod replica;
pub mod upload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::{ObjectStore, ObjectStoreExt};

use crate::collections::model::Collection;

pub use handlers::configure;

/// A file field's largest file when it sets no `maxSize` (PocketBase's default).
pub const DEFAULT_MAX_SIZE: u64 = 5 * 1024 * 1024;

/// Where files live: `DATA_DIR/storage` (local), or an S3-compatible bucket shared by every
/// node (`STORAGE=s3`), under the same keys `<db>/<collectionId>/<recordId>/<name>`.
#[derive(Debug, Clone)]
pub struct Storage {
    pub root: PathBuf,
    /// The largest total of files one request may upload.
    pub upload_limit: u64,
    /// The bucket, with `STORAGE=s3`.
    pub s3: Option<Arc<dyn ObjectStore>>,
}

/// Files at most this large go to S3 in one PUT; larger ones in parts of this size, read from
/// disk one part at a time.
const S3_PART: usize = 8 * 1024 * 1024;

fn s3_err(e: object_store::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Storage {
    pub fn new(data_dir: &Path, upload_limit: u64) -> Storage {
        Storage {
            root: data_dir.join("storage"),
            upload_limit,
            s3: None,
        }
    }

    /// Scratch space for uploads in flight (same filesystem, so placing one is a rename).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// The directory of one record's files (local storage).
    pub fn record_dir(&self, db: &str, c: &Collection, record_id: &str) -> PathBuf {
        self.root.join(db).join(&c.id).join(record_id)
    }

    /// The object key of a file (S3).
    pub fn key(db: &str, collection_id: &str, record_id: &str, name: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{db}/{collection_id}/{record_id}/{name}"))
    }

    /// Puts the uploads of a write in their place before the write runs; on error the caller
    /// removes what was placed.
    pub async fn place_all(
        &self,
        db: &str,
        c: &Collection,
        record_id: &str,
        files: &[fields::Pending],
    ) -> std::io::Result<()> {
        match &self.s3 {
            None => {
                let dir = self.record_dir(db, c, record_id);
                let moves: Vec<(PathBuf, PathBuf)> = files.iter().map(|f| (f.tmp.clone(), dir.join(&f.name))).collect();
                if moves.is_empty() {
                    return Ok(());
                }
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&dir)?;
                    for (from, to) in moves {
                        std::fs::rename(from, to)?;
                    }
                    Ok(())
                })
                .await
                .map_err(std::io::Error::other)?
            }
            Some(store) => {
                for f in files {
                    upload_s3(
                        store.as_ref(),
                        &Self::key(db, &c.id, record_id, &f.name),
                        &f.tmp,
                        f.size,
                    )
                    .await?;
                }
                Ok(())
            }
        }
    }

    /// Deletes stored files of one record (missing ones are fine).
    pub async fn remove(&self, db: &str, c: &Collection, record_id: &str, names: &[String]) {
        let names: Vec<String> = names.iter().filter(|n| is_stored_name(n)).cloned().collect();
        match &self.s3 {
            None => {
                let dir = self.record_dir(db, c, record_id);
                let _ = tokio::task::spawn_blocking(move || {
                    for n in names {
                        match std::fs::remove_file(dir.join(&n)) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => log::warn!("files: cannot delete {}: {e}", dir.join(n).display()),
                        }
                    }
                    let _ = std::fs::remove_dir(&dir);
                })
                .await;
            }
            Some(store) => {
                for n in names {
                    if let Err(e) = store.delete(&Self::key(db, &c.id, record_id, &n)).await {
                        if !matches!(e, object_store::Error::NotFound { .. }) {
                            log::warn!("files: cannot delete {db}/{}/{record_id}/{n}: {e}", c.id);
                        }
                    }
                }
            }
        }
    }

    /// Deletes every file of a deleted record.
    pub async fn remove_record(&self, db: &str, collection_id: &str, record_id: &str) {
        if !crate::records::store::is_valid_record_id(record_id) || !is_id(collection_id) {
            return;
        }
        match &self.s3 {
            None => {
                let dir = self.root.join(db).join(collection_id).join(record_id);
                let _ = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => log::warn!("files: cannot delete {}: {e}", dir.display()),
                })
                .await;
            }
            Some(store) => {
                let prefix = object_store::path::Path::from(format!("{db}/{collection_id}/{record_id}"));
                delete_prefix(store.as_ref(), &prefix).await;
            }
        }
    }

    /// Deletes a database's files.
    pub async fn remove_db(&self, db: &str) {
        if !crate::db::is_valid_db_name(db) {
            return;
        }
        match &self.s3 {
            None => {
                let _ = std::fs::remove_dir_all(self.root.join(db));
            }
            Some(store) => delete_prefix(store.as_ref(), &object_store::path::Path::from(db)).await,
        }
    }
}

async fn delete_prefix(store: &dyn ObjectStore, prefix: &object_store::path::Path) {
    use futures_util::StreamExt;
    let mut listed = store.list(Some(prefix));
    while let Some(meta) = listed.next().await {
        match meta {
            Ok(m) => {
                if let Err(e) = store.delete(&m.location).await {
                    log::warn!("files: cannot delete {}: {e}", m.location);
                }
            }
            Err(e) => {
                log::warn!("files: cannot list {prefix}: {e}");
                return;
            }
        }
    }
}

/// Uploads a file from disk: one PUT when small, parts read one at a time when large, so
/// memory stays within a couple of parts.
async fn upload_s3(
    store: &dyn ObjectStore,
    key: &object_store::path::Path,
    from: &Path,
    size: u64,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    if size as usize <= S3_PART {
        let bytes = tokio::fs::read(from).await?;
        store.put(key, bytes.into()).await.map_err(s3_err)?;
        return Ok(());
    }
    let upload = store.put_multipart(key).await.map_err(s3_err)?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, S3_PART);
    let mut file = tokio::fs::File::open(from).await?;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        writer.wait_for_capacity(2).await.map_err(s3_err)?;
        writer.write(&buf[..n]);
    }
    writer.finish().await.map_err(s3_err)?;
    Ok(())
}

fn is_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `name` has the shape of a name vski generates (anything else never touches disk).
pub fn is_stored_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 150
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
        && !name.contains("..")
}

/// A stored name for an uploaded file: PocketBase's shape, `<stem>_<random>.<ext>`, the stem
/// and extension reduced to `[a-z0-9_]`.
pub fn stored_name(original: &str) -> String {
    let base = original.rsplit(['/', '\\']).next().unwrap_or_default();
    let (stem, ext) = match base.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, e),
        _ => (base, ""),
    };
    let clean = |s: &str, max: usize| -> String {
        let mut out = String::new();
        for ch in s.chars().flat_map(char::to_lowercase) {
            if out.len() >= max {
                break;
            }
            if ch.is_ascii_alphanumeric() {
                out.push(ch);
            } else if !out.ends_with('_') {
                out.push('_');
            }
        }
        out.trim_matches('_').to_string()
    };
    let mut stem = clean(stem, 100);
    if stem.is_empty() {
        stem = "file".into();
    }
    let ext = clean(ext, 20).replace('_', "");
    let suffix = crate::util::random_id(10);
    if ext.is_empty() {
        format!("{stem}_{suffix}")
    } else {
        format!("{stem}_{suffix}.{ext}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_are_safe_whatever_was_sent() {
        for (sent, stem, ext) in [
            ("Photo 1.JPG", "photo_1_", ".jpg"),
            ("../../etc/passwd", "passwd_", ""),
            ("..\\..\\boot.ini", "boot_", ".ini"),
            (".htaccess", "htaccess_", ""),
            ("", "file_", ""),
            ("résumé final.pdf", "r_sum_final_", ".pdf"),
            ("a.tar.gz", "a_tar_", ".gz"),
            ("x.p/h p", "h_p_", ""),
        ] {
            let n = stored_name(sent);
            assert!(n.starts_with(stem) && n.ends_with(ext), "{sent:?} -> {n}");
            assert!(is_stored_name(&n), "{n}");
        }
        for bad in ["../x", "a/b", "", ".hidden", "A.txt", "x..y", "a\0b"] {
            assert!(!is_stored_name(bad), "{bad:?}");
        }
    }
}
