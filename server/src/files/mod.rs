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

use crate::collections::model::Collection;

pub use handlers::configure;

/// A file field's largest file when it sets no `maxSize` (PocketBase's default).
pub const DEFAULT_MAX_SIZE: u64 = 5 * 1024 * 1024;

/// Where files live: `DATA_DIR/storage`.
#[derive(Debug, Clone)]
pub struct Storage {
    pub root: PathBuf,
    /// The largest total of files one request may upload.
    pub upload_limit: u64,
}

impl Storage {
    pub fn new(data_dir: &Path, upload_limit: u64) -> Storage {
        Storage {
            root: data_dir.join("storage"),
            upload_limit,
        }
    }

    /// Scratch space for uploads in flight (same filesystem, so placing one is a rename).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// The directory of one record's files.
    pub fn record_dir(&self, db: &str, c: &Collection, record_id: &str) -> PathBuf {
        self.root.join(db).join(&c.id).join(record_id)
    }

    /// Moves an uploaded file to its place; on error the caller removes what was placed.
    pub fn place(&self, db: &str, c: &Collection, record_id: &str, tmp: &Path, name: &str) -> std::io::Result<PathBuf> {
        let dir = self.record_dir(db, c, record_id);
        std::fs::create_dir_all(&dir)?;
        let to = dir.join(name);
        std::fs::rename(tmp, &to)?;
        Ok(to)
    }

    /// Deletes stored files of one record (missing ones are fine).
    pub fn remove(&self, db: &str, c: &Collection, record_id: &str, names: &[String]) {
        let dir = self.record_dir(db, c, record_id);
        for n in names.iter().filter(|n| is_stored_name(n)) {
            match std::fs::remove_file(dir.join(n)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("files: cannot delete {}: {e}", dir.join(n).display()),
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }

    /// Deletes every file of a deleted record.
    pub fn remove_record(&self, db: &str, collection_id: &str, record_id: &str) {
        if !crate::records::store::is_valid_record_id(record_id) || !is_id(collection_id) {
            return;
        }
        let dir = self.root.join(db).join(collection_id).join(record_id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("files: cannot delete {}: {e}", dir.display()),
        }
    }

    /// Deletes a database's files.
    pub fn remove_db(&self, db: &str) {
        if crate::db::is_valid_db_name(db) {
            let _ = std::fs::remove_dir_all(self.root.join(db));
        }
    }
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
