//! File replication, master side: the file journal of each database (`_replica_file_journal`,
//! a local table written in the transaction of the record change), the endpoints replicas pull
//! it and the bytes from, and its pruning. The replica side is `replica/follower.rs`
//! (`sync_files`).

use std::path::{Path, PathBuf};

use actix_web::{HttpRequest, HttpResponse, web};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub const JOURNAL_DDL: &str = "CREATE TABLE IF NOT EXISTS _replica_file_journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT '',
    created INTEGER NOT NULL
)";

/// One journal entry: `add` of a file, or `delete` of a file or (a path ending in `/`) of a
/// record's whole directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default)]
    pub id: i64,
    pub op: String,
    pub path: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub sha256: String,
}

impl Entry {
    pub fn add(collection_id: &str, record_id: &str, name: &str, size: u64, sha256: &str) -> Entry {
        Entry {
            id: 0,
            op: "add".into(),
            path: format!("{collection_id}/{record_id}/{name}"),
            size: size as i64,
            sha256: sha256.to_string(),
        }
    }

    pub fn delete(collection_id: &str, record_id: &str, name: Option<&str>) -> Entry {
        Entry {
            id: 0,
            op: "delete".into(),
            path: format!("{collection_id}/{record_id}/{}", name.unwrap_or_default()),
            size: 0,
            sha256: String::new(),
        }
    }
}

/// Appends `entries` to the journal, inside the caller's write transaction.
pub fn journal(conn: &Connection, entries: &[Entry]) -> rusqlite::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    conn.execute_batch(JOURNAL_DDL)?;
    let now = crate::util::unix_millis();
    let mut stmt = conn.prepare_cached(
        "INSERT INTO _replica_file_journal (op, path, size, sha256, created) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for e in entries {
        stmt.execute(params![e.op, e.path, e.size, e.sha256, now])?;
    }
    Ok(())
}

fn has_journal(conn: &Connection) -> rusqlite::Result<bool> {
    crate::db::table_exists(conn, "_replica_file_journal")
}

/// `(oldest kept id, newest id)`; `(0, 0)` without entries.
pub fn bounds(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    if !has_journal(conn)? {
        return Ok((0, 0));
    }
    let head: i64 = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = '_replica_file_journal'",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    let oldest: i64 = conn.query_row("SELECT COALESCE(MIN(id), 0) FROM _replica_file_journal", [], |r| {
        r.get(0)
    })?;
    Ok((if oldest == 0 { head + 1 } else { oldest }, head))
}

/// Deletes journal entries older than `cutoff_ms`.
pub fn prune(conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<usize> {
    if !has_journal(conn)? {
        return Ok(0);
    }
    conn.execute("DELETE FROM _replica_file_journal WHERE created < ?1", [cutoff_ms])
}

/// Deletes journal entries up to `id`, which every replica that syncs files acknowledged.
pub fn prune_acked(conn: &Connection, id: i64) -> rusqlite::Result<usize> {
    if !has_journal(conn)? {
        return Ok(0);
    }
    conn.execute("DELETE FROM _replica_file_journal WHERE id <= ?1", [id])
}

/// Whether `path` is `<collectionId>/<recordId>/<name>` (or `<collectionId>/<recordId>/`) of
/// names vski generates: nothing else is read or written by file replication.
pub fn valid_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let id = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    parts.len() == 3 && id(parts[0]) && id(parts[1]) && (parts[2].is_empty() || super::is_stored_name(parts[2]))
}

/// Every stored file under `root` (a database's storage): its path relative to `root`
/// (`<collectionId>/<recordId>/<name>`) and where it is.
pub fn walk(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let dirs = |p: &Path| std::fs::read_dir(p).into_iter().flatten().flatten();
    for c in dirs(root) {
        for r in dirs(&c.path()) {
            for f in dirs(&r.path()) {
                let path = format!(
                    "{}/{}/{}",
                    c.file_name().to_string_lossy(),
                    r.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                );
                if valid_path(&path) && !path.ends_with('/') {
                    out.push((path, f.path()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Every file under `root` with its size and sha256 (the master's answer to `list=1`).
pub fn list(root: &Path) -> std::io::Result<Vec<Entry>> {
    walk(root)
        .into_iter()
        .map(|(path, full)| {
            let (size, sha256) = crate::util::sha256_file(&full)?;
            Ok(Entry {
                id: 0,
                op: "add".into(),
                path,
                size: size as i64,
                sha256,
            })
        })
        .collect()
}

/// The storage directory of one database.
pub fn db_root(state: &AppState, db: &str) -> PathBuf {
    state.storage.root.join(db)
}

#[derive(Deserialize)]
pub struct JournalQuery {
    db: Option<String>,
    since: Option<i64>,
    limit: Option<i64>,
    list: Option<String>,
}

/// `GET /api/replica/files?db=&since=ID`: journal entries after `since` (410 when some were
/// pruned: reconcile by listing), or with `list=1` every file the master holds now and the
/// journal's head to continue from.
pub async fn entries(
    state: web::Data<AppState>,
    who: Identity,
    q: web::Query<JournalQuery>,
) -> ApiResult<HttpResponse> {
    crate::replica::master::authorize(&who, true)?;
    let db = crate::replica::master::replicated_db(&state, q.db.as_deref())?;
    if matches!(q.list.as_deref(), Some("1" | "true")) {
        // The head first: a file added while listing is then listed or journaled after it.
        let (_, head) = db.read(|conn| Ok(bounds(conn)?)).await?;
        let root = db_root(&state, &db.name);
        let files = web::block(move || list(&root))
            .await
            .map_err(|e| ApiError::internal("list files", e.to_string()))??;
        return Ok(HttpResponse::Ok().json(json!({"files": files, "head": head})));
    }
    let since = q.since.unwrap_or(0);
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let (oldest, head, entries) = db
        .read(move |conn| {
            let (oldest, head) = bounds(conn)?;
            if !has_journal(conn)? {
                return Ok((oldest, head, Vec::new()));
            }
            let mut stmt = conn.prepare(
                "SELECT id, op, path, size, sha256 FROM _replica_file_journal WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![since, limit], |r| {
                Ok(Entry {
                    id: r.get(0)?,
                    op: r.get(1)?,
                    path: r.get(2)?,
                    size: r.get(3)?,
                    sha256: r.get(4)?,
                })
            })?;
            Ok((oldest, head, rows.collect::<rusqlite::Result<Vec<_>>>()?))
        })
        .await?;
    if since < oldest - 1 || since > head {
        return Ok(HttpResponse::Gone().json(json!({
            "status": 410, "code": 410,
            "message": "file journal entries after this position were pruned: reconcile by listing",
            "oldest": oldest, "head": head,
        })));
    }
    Ok(HttpResponse::Ok().json(json!({"entries": entries, "head": head})))
}

/// `GET /api/replica/files/{path}?db=`: the bytes of one stored file.
pub async fn bytes(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
    q: web::Query<JournalQuery>,
) -> ApiResult<HttpResponse> {
    crate::replica::master::authorize(&who, true)?;
    let db = crate::replica::master::replicated_db(&state, q.db.as_deref())?;
    let path = path.into_inner();
    if !valid_path(&path) || path.ends_with('/') {
        return Err(ApiError::not_found("File not found."));
    }
    let full = db_root(&state, &db.name).join(&path);
    let file = web::block(move || actix_files::NamedFile::open(full))
        .await
        .map_err(|_| ApiError::not_found("File not found."))?
        .map_err(|_| ApiError::not_found("File not found."))?;
    Ok(file.into_response(&req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_paths() {
        assert!(valid_path("abc123/rec_1/photo_0123456789.png"));
        assert!(valid_path("abc123/rec_1/"));
        for bad in [
            "../x/y",
            "a/b/../c",
            "a/b",
            "a/b/c/d",
            "/a/b/c",
            "a/../c.txt",
            "a/b/.env",
            "a b/c/d.txt",
        ] {
            assert!(!valid_path(bad), "{bad}");
        }
    }

    #[test]
    fn bounds_survive_pruning_everything() {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(bounds(&conn).unwrap(), (0, 0));
        journal(
            &conn,
            &[Entry::add("c", "r", "a.txt", 1, "x"), Entry::delete("c", "r", None)],
        )
        .unwrap();
        assert_eq!(bounds(&conn).unwrap(), (1, 2));
        prune(&conn, i64::MAX).unwrap();
        // Nothing kept: a replica at 2 continues, one at 1 missed an entry.
        assert_eq!(bounds(&conn).unwrap(), (3, 2));
    }
}
