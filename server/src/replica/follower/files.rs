//! File sync: the master's file journal replayed onto this node's storage, and a full
//! reconciliation when the journal was pruned past this replica.

use super::*;

impl Follower {
    /// Brings the files of database `name` in line with the master's (local storage): the
    /// master's file journal after the position kept in `_replica_state` (`files`), or its
    /// whole list when there is no position or the entries after it were pruned. Only for
    /// databases whose collections have file fields.
    pub(super) async fn sync_files(&self, state: &web::Data<AppState>, name: &str) -> Result<(), String> {
        use crate::collections::model::FieldType;
        if state.storage.s3.is_some() {
            // Every node reads the same bucket.
            return Ok(());
        }
        let Some(db) = state.dbs.get(name) else { return Ok(()) };
        let schema = state.schemas.get(&db).await.map_err(|e| e.to_string())?;
        let has_files = schema
            .all()
            .iter()
            .any(|c| c.live_fields().any(|f| f.kind == FieldType::File));
        if !has_files {
            return Ok(());
        }
        let saved: Option<i64> = db
            .read(|conn| Ok(state_value(conn, "files")?.and_then(|v| v.parse().ok())))
            .await
            .map_err(|e| e.to_string())?;
        let mut pos = match saved {
            Some(p) => p,
            None => self.reconcile_files(state, &db).await?,
        };
        let mut reconciled = saved.is_none();
        loop {
            let (status, body) = self
                .get_json(state, &format!("/api/replica/files?db={name}&since={pos}&limit=500"))
                .await?;
            if status == 410 && !reconciled {
                pos = self.reconcile_files(state, &db).await?;
                reconciled = true;
                continue;
            }
            if status != 200 {
                return Err(format!("master answered {status} to the file journal"));
            }
            let entries: Vec<crate::files::replica::Entry> =
                serde_json::from_value(body["entries"].clone()).map_err(|e| format!("file journal: {e}"))?;
            let Some(last) = entries.last().map(|e| e.id) else {
                break;
            };
            for e in &entries {
                self.apply_file(state, name, e).await?;
            }
            pos = last;
            save_files_position(&db, pos).await?;
        }
        if saved != Some(pos) {
            save_files_position(&db, pos).await?;
        }
        Ok(())
    }

    /// Downloads what is missing and deletes what the master no longer has; returns the
    /// master's journal head at the time of its list.
    pub(super) async fn reconcile_files(&self, state: &web::Data<AppState>, db: &Arc<Database>) -> Result<i64, String> {
        let (status, body) = self
            .get_json(state, &format!("/api/replica/files?db={}&list=1", db.name))
            .await?;
        if status != 200 {
            return Err(format!("master answered {status} to the file list"));
        }
        let wanted: Vec<crate::files::replica::Entry> =
            serde_json::from_value(body["files"].clone()).map_err(|e| format!("file list: {e}"))?;
        let root = state.storage.root.join(&db.name);
        let r2 = root.clone();
        let have: HashMap<String, u64> = tokio::task::spawn_blocking(move || local_files(&r2))
            .await
            .map_err(|e| e.to_string())?;
        let mut fetched = 0;
        for e in &wanted {
            if have.get(&e.path) != Some(&(e.size as u64)) {
                self.apply_file(state, &db.name, e).await?;
                fetched += 1;
            }
        }
        let keep: HashSet<&str> = wanted.iter().map(|e| e.path.as_str()).collect();
        let mut removed = 0;
        for path in have.keys().filter(|p| !keep.contains(p.as_str())) {
            let _ = std::fs::remove_file(root.join(path));
            removed += 1;
        }
        if fetched + removed > 0 {
            log::info!(
                "files of '{}' reconciled: {fetched} downloaded, {removed} deleted",
                db.name
            );
        }
        Ok(body["head"].as_i64().unwrap_or(0))
    }

    /// Applies one journal entry: downloads an added file (checking its size and sha256, then
    /// renaming it into place) or deletes a file or a record's directory.
    pub(super) async fn apply_file(
        &self,
        state: &web::Data<AppState>,
        db: &str,
        e: &crate::files::replica::Entry,
    ) -> Result<(), String> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        if !crate::files::replica::valid_path(&e.path) {
            return Err(format!("the master sent an invalid file path '{}'", e.path));
        }
        let target = state.storage.root.join(db).join(&e.path);
        if e.op == "delete" {
            let result = if e.path.ends_with('/') {
                tokio::fs::remove_dir_all(&target).await
            } else {
                tokio::fs::remove_file(&target).await
            };
            return match result {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.to_string()),
                _ => Ok(()),
            };
        }
        let resp = self
            .request(
                state,
                reqwest::Method::GET,
                &format!("/api/replica/files/{}?db={db}", e.path),
            )
            .map_err(|e| e.to_string())?
            .send()
            .await
            .map_err(|e| describe_transport(&e))?;
        if resp.status().as_u16() == 404 {
            // Deleted on the master since: its delete entry follows.
            return Ok(());
        }
        if !resp.status().is_success() {
            return Err(format!("master answered {} to file {}", resp.status().as_u16(), e.path));
        }
        let tmp_dir = state.storage.tmp_dir();
        tokio::fs::create_dir_all(&tmp_dir).await.map_err(|e| e.to_string())?;
        let tmp = tmp_dir.join(format!("sync-{}", random_id(20)));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| e.to_string())?;
        let mut hasher = sha2::Sha256::new();
        let mut size: u64 = 0;
        let mut stream = resp.bytes_stream();
        use futures_util::StreamExt;
        let written: Result<(), String> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| describe_transport(&e))?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            file.sync_all().await.map_err(|e| e.to_string())
        }
        .await;
        drop(file);
        let sha = crate::util::hex(&hasher.finalize());
        let checked = written.and_then(|()| {
            if size as i64 != e.size || (!e.sha256.is_empty() && sha != e.sha256) {
                Err(format!(
                    "file {} arrived with size {size} and sha256 {sha}, expected {} and {}",
                    e.path, e.size, e.sha256
                ))
            } else {
                Ok(())
            }
        });
        if let Err(err) = checked {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err);
        }
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(|e| e.to_string())?;
        }
        tokio::fs::rename(&tmp, &target).await.map_err(|e| e.to_string())
    }
}

pub(super) async fn save_files_position(db: &Arc<Database>, pos: i64) -> Result<(), String> {
    db.write(move |conn| {
        conn.execute_batch(STATE_DDL)?;
        set_state(conn, "files", &pos.to_string())?;
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())
}

/// The files under a database's storage directory: relative path → size.
pub(super) fn local_files(root: &Path) -> HashMap<String, u64> {
    crate::files::replica::walk(root)
        .into_iter()
        .filter_map(|(path, full)| Some((path, std::fs::metadata(full).ok()?.len())))
        .collect()
}
