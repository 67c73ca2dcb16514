//! Bootstrap: a database's snapshot downloaded, checked (sha256, `quick_check`) and restored
//! into the live file in one step.

use super::*;

impl Follower {
    /// Downloads a snapshot, checks it, and restores it into the live database in one step.
    /// Returns the version the database is at afterwards, and its history hash.
    pub(super) async fn bootstrap(
        &self,
        state: &web::Data<AppState>,
        db: &mut Arc<Database>,
        why: &str,
    ) -> Result<(i64, String), String> {
        log::info!("downloading a snapshot of '{}': {why}", db.name);
        let dir = crate::replica::snapshot_dir(state.dbs.data_dir());
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!("download-{}-{}.db", db.name, random_id(8)));
        let result = self.bootstrap_into(state, db, &tmp).await;
        let _ = std::fs::remove_file(&tmp);
        let (version, hash) = result?;
        self.set_ready();
        self.moved.notify_waiters();
        state.schemas.reload(db).await.map_err(|e| e.to_string())?;
        self.note(&db.name, |s| {
            s.bootstraps += 1;
            s.local_version = version;
            s.restarted(version, &hash);
            // The copy is the master's snapshot at `version` byte for byte (its sha256 was
            // checked), so comparing logical checksums now would read both databases whole to
            // learn nothing. The next comparison comes with the next version.
            s.verified_version = Some(version);
        });
        log::info!("restored '{}' from a snapshot at version {version}", db.name);
        // Realtime subscribers get one `resync` instead of an event per changed record.
        state.realtime.resync(&db.name);
        Ok((version, hash))
    }

    pub(super) async fn bootstrap_into(
        &self,
        state: &web::Data<AppState>,
        db: &mut Arc<Database>,
        tmp: &Path,
    ) -> Result<(i64, String), String> {
        let path = format!("/api/replica/download?db={}&digest=trailer", db.name);
        let mut resp = self
            .request(state, reqwest::Method::GET, &path)
            .map_err(|e| e.to_string())?
            .send()
            .await
            .map_err(|e| format!("GET {path}: {}", transport_error(&e)))?;
        if resp.status().as_u16() != 200 {
            return Err(status_error(resp.status().as_u16(), &path, &Value::Null, None));
        }
        let header = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (version, sha, epoch, uid) = (
            header("x-replica-version"),
            header("x-replica-sha256"),
            header("x-replica-epoch"),
            header("x-replica-db-uid"),
        );
        let version: i64 = version
            .parse()
            .map_err(|_| "snapshot without a version header".to_string())?;
        // With `digest=trailer` the body ends with the raw sha256 of what came before it
        // (a master that predates it sends the hex digest in the header instead): the last
        // bytes seen are held back until more arrive.
        let trailer = sha == "trailer";
        let hold = if trailer {
            crate::replica::master::TRAILER_LEN as usize
        } else {
            0
        };
        // The bytes are hashed and written on a blocking thread of their own while the next
        // ones arrive.
        let file = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel::<actix_web::web::Bytes>(16);
        let writer = tokio::task::spawn_blocking(move || write_hashed(file, rx));
        let mut tail: Vec<u8> = Vec::with_capacity(hold);
        let received = async {
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("downloading the snapshot: {e}"))?
            {
                let mut out = Vec::with_capacity(2);
                if chunk.len() >= hold {
                    if !tail.is_empty() {
                        out.push(actix_web::web::Bytes::from(std::mem::take(&mut tail)));
                    }
                    out.push(chunk.slice(..chunk.len() - hold));
                    tail.extend_from_slice(&chunk[chunk.len() - hold..]);
                } else {
                    tail.extend_from_slice(&chunk);
                    let cut = tail.len().saturating_sub(hold);
                    out.push(actix_web::web::Bytes::from(tail.drain(..cut).collect::<Vec<u8>>()));
                }
                for b in out {
                    // A closed channel means the writer failed: its error is reported below.
                    if tx.send(b).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok::<(), String>(())
        }
        .await;
        drop(tx);
        let (file, digest) = writer
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing the snapshot: {e}"))?;
        received?;
        let got = crate::util::hex(&digest);
        let want = if trailer { crate::util::hex(&tail) } else { sha };
        if tail.len() != hold || got != want {
            return Err("the snapshot's sha256 does not match the one the master sent".into());
        }
        // The copy reaches the disk while it is checked: `quick_check` reads it from the page
        // cache. Both must succeed before it replaces anything.
        let prepared: PathBuf = tmp.to_path_buf();
        let (e2, u2) = (epoch.clone(), uid.clone());
        let synced = tokio::task::spawn_blocking(move || file.sync_all());
        let checked = tokio::task::spawn_blocking(move || prepare_snapshot(&prepared, version, &e2, &u2));
        let (synced, checked) = futures_util::future::join(synced, checked).await;
        synced
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("syncing the snapshot: {e}"))?;
        let hash = checked.map_err(|e| e.to_string())??;
        let src = tmp.to_path_buf();
        let served = db
            .read(|conn| Ok(local_state(conn)?.is_some()))
            .await
            .map_err(|e| e.to_string())?;
        if served {
            // Readers may be on this copy: the new content goes in through the writer, in one
            // step of the backup API, and they see the old content or the new, never a mix.
            db.write_exclusive(move |conn| restore(conn, &src))
                .await
                .map_err(|e| e.to_string())?;
        } else {
            // Never bootstrapped, so nothing is served from it: the downloaded file simply
            // takes its place (close, rename, reopen), without writing it all again.
            let name = db.name.clone();
            let st = state.clone();
            *db = tokio::task::spawn_blocking(move || st.dbs.replace_with_file(&name, &src))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok((version, hash))
    }
}

/// Writes the chunks `rx` brings to `file`, hashing them on the way; returns the file (not yet
/// synced) and the sha256 of everything written.
pub(super) fn write_hashed(
    mut file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<actix_web::web::Bytes>,
) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    use sha2::Digest;
    use std::io::Write;
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
    }
    Ok((file, hasher.finalize().to_vec()))
}

/// Checks a downloaded snapshot and records in it where it stands, so the restore carries its
/// own replica state: the data and the version switch together. Returns the history hash at
/// the snapshot's version.
pub(super) fn prepare_snapshot(path: &Path, version: i64, epoch: &str, uid: &str) -> Result<String, String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if check != "ok" {
        return Err(format!("the snapshot failed quick_check: {check}"));
    }
    let inner = crate::replica::recorder::head(&conn).map_err(|e| e.to_string())?;
    if inner != version {
        return Err(format!("the snapshot holds version {inner}, its header says {version}"));
    }
    let hash = crate::replica::recorder::position_hash(&conn, version)
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    conn.execute_batch(STATE_DDL).map_err(|e| e.to_string())?;
    for (k, v) in [
        ("version", version.to_string()),
        ("epoch", epoch.to_string()),
        ("uid", uid.to_string()),
        ("hash", hash.clone()),
    ] {
        set_state(&conn, k, &v).map_err(|e| e.to_string())?;
    }
    Ok(hash)
}

/// Replaces the content of the live database with the file at `src`, in one step of the backup
/// API on the writer connection: readers see the old content until it commits, then the new.
pub(super) fn restore(conn: &mut Connection, src: &Path) -> ApiResult<()> {
    let from = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    if crate::crash::is_armed("restore:mid") {
        // Copy part of the snapshot into the live database, then crash (tests only).
        let backup = rusqlite::backup::Backup::new(&from, conn)?;
        backup.step(1)?;
        crate::crash::point("restore:mid");
    }
    crate::replica::master::backup_all(&from, conn)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    Ok(())
}
