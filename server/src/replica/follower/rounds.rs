//! Sync rounds: the master's status, each followed database brought up to its version page by
//! page (chained and checked), drift verification, and the background round loop.

use super::*;

impl Follower {
    /// One sync round: every followed database of the master is brought up to date, all of
    /// them at once, each on its own (a busy database does not hold up a quiet one). A
    /// database still backing off from failures is skipped unless `force` (a manual sync).
    pub async fn round(&self, state: &web::Data<AppState>, force: bool) -> Result<(), String> {
        let _one_at_a_time = self.round_lock.lock().await;
        let result = self.round_inner(state, force).await;
        self.moved.notify_waiters();
        if let Ok(mut last) = self.last_round.lock() {
            match &result {
                Ok(()) => {
                    *last = (Some(now_string()), None);
                    if let Ok(mut at) = self.last_ok_at.lock() {
                        *at = Some(Instant::now());
                    }
                }
                Err(e) => last.1 = Some(e.clone()),
            }
        }
        result
    }

    pub(super) async fn round_inner(&self, state: &web::Data<AppState>, force: bool) -> Result<(), String> {
        self.master_reachable.store(false, std::sync::atomic::Ordering::Release);
        let (status, body, skew) = self.get_status(state).await?;
        if status != 200 {
            let e = status_error(status, "/api/replica/status", &body, skew);
            self.note_answer(status, &e);
            return Err(e);
        }
        self.note_answer(status, "");
        self.master_reachable.store(true, std::sync::atomic::Ordering::Release);
        let epoch = body["epoch"].as_str().unwrap_or_default().to_string();
        let Some(master_dbs) = body["dbs"].as_array().cloned() else {
            return Err("the master's status has no database list".into());
        };
        self.drop_deleted(state, &master_dbs).await;
        let now = Instant::now();
        let due: Vec<(String, Value)> = master_dbs
            .into_iter()
            .filter_map(|d| Some((d["name"].as_str()?.to_string(), d)))
            .filter(|(name, _)| self.follows(name) && crate::db::is_valid_db_name(name))
            .filter(|(name, _)| force || self.retry_at(name).is_none_or(|at| at <= now))
            .collect();
        let epoch = epoch.as_str();
        let results =
            futures_util::future::join_all(due.iter().map(|(name, d)| async move {
                (name, self.sync_tracked(state, epoch, name, d, false).await.map(|_| ()))
            }))
            .await;
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}")))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Removes the copies of databases the master no longer has: first from the registry (so
    /// they are not served), then closed, then their files deleted. System databases stay.
    pub(super) async fn drop_deleted(&self, state: &web::Data<AppState>, master_dbs: &[Value]) {
        let on_master: HashSet<&str> = master_dbs.iter().filter_map(|d| d["name"].as_str()).collect();
        for db in state.dbs.list() {
            let name = db.name.clone();
            if !self.follows(&name)
                || crate::db::SYSTEM_DBS.contains(&name.as_str())
                || on_master.contains(name.as_str())
            {
                continue;
            }
            drop(db);
            let st = state.clone();
            let n = name.clone();
            match tokio::task::spawn_blocking(move || st.dbs.delete(&n)).await {
                Ok(Ok(())) => {
                    state.schemas.forget(&name);
                    if let Ok(mut m) = self.dbs.lock() {
                        m.remove(&name);
                    }
                    log::info!("database '{name}' was deleted on the master; its copy is removed");
                }
                Ok(Err(e)) => log::warn!("cannot remove '{name}', deleted on the master: {e}"),
                Err(e) => log::warn!("cannot remove '{name}', deleted on the master: {e}"),
            }
        }
    }

    /// Starts a quick sync of `name` up to the master's position `master` (`{name, uid,
    /// version}`), unless one is running: that one then goes on to this position when it is
    /// done. So a database under a stream of commits has one sync at a time, never a queue.
    /// A database backing off from failures is synced when its wait is over.
    pub(super) fn kick(&self, state: &web::Data<AppState>, epoch: &str, name: &str, master: Value) {
        {
            let mut k = self.kicked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(next) = k.get_mut(name) {
                *next = Some((epoch.to_string(), master));
                return;
            }
            k.insert(name.to_string(), None);
        }
        let st = state.clone();
        let (mut epoch, mut master, name) = (epoch.to_string(), master, name.to_string());
        actix_web::rt::spawn(async move {
            let Some(f) = st.follower.as_ref() else { return };
            loop {
                // A database backing off from failures is tried again when its wait is over,
                // whether or not another commit comes.
                if let Some(at) = f.retry_at(&name).filter(|at| *at > Instant::now()) {
                    tokio::time::sleep_until(at.into()).await;
                }
                // A failed sync is not caught up: it is tried again when the database's backoff
                // (2, 4, 8 s) is over, not at the next safety round.
                let result = f.sync_tracked(&st, &epoch, &name, &master, true).await;
                let caught_up = matches!(result, Ok(true));
                // A database the master deleted (a round removed it here) is not retried.
                let gone = result.is_err() && f.dbs.lock().is_ok_and(|m| !m.contains_key(&name));
                let mut k = f.kicked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match k.get_mut(&name).and_then(Option::take) {
                    Some((e, m)) => (epoch, master) = (e, m),
                    // Out of turns but not caught up: another turn, behind the databases
                    // waiting for a slot.
                    None if !caught_up && !gone => {}
                    None => {
                        k.remove(&name);
                        break;
                    }
                }
            }
        });
    }

    /// When database `name` may be synced again after failures (`None`: now).
    pub(super) fn retry_at(&self, name: &str) -> Option<Instant> {
        self.dbs.lock().ok().and_then(|m| m.get(name).and_then(|s| s.retry_at))
    }

    /// The lock that keeps syncs of database `name` one at a time.
    pub(super) fn db_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.db_locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(name.to_string()).or_default().clone()
    }

    /// Syncs database `name` to the master's position `master` (an entry of the master's
    /// status or stream answer), one sync of it at a time and at most [`SYNC_SLOTS`] databases
    /// at once, and keeps its failure count and backoff. `quick` (a stream wake-up) only
    /// fetches and applies entries; a round also checks the schema and checksum and acks.
    pub(super) async fn sync_tracked(
        &self,
        state: &web::Data<AppState>,
        epoch: &str,
        name: &str,
        master: &Value,
        quick: bool,
    ) -> Result<bool, String> {
        let lock = self.db_lock(name);
        let _one_at_a_time = lock.lock().await;
        let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
        let before = self.position(name).map(|p| p.version);
        let mut result = self.sync_db(state, epoch, name, master, quick).await;
        // Files follow the records: after the database, the files its records name. Every
        // journal entry is written with a record change, so a stream wake-up that applied
        // nothing has no file to fetch (unless the last file sync failed).
        let files_behind = self.dbs.lock().ok().and_then(|m| m.get(name).map(|s| s.files_behind));
        let unchanged = quick && before.is_some() && before == self.position(name).map(|p| p.version);
        if result.is_ok() && !(unchanged && files_behind == Some(false)) {
            let synced = self.sync_files(state, name).await;
            self.note(name, |s| s.files_behind = synced.is_err());
            if let Err(e) = synced {
                result = Err(format!("file sync: {e}"));
            }
        }
        match &result {
            Ok(_) => self.note(name, |s| {
                s.failures = 0;
                s.retry_at = None;
            }),
            Err(e) => {
                log::warn!("sync of '{name}' failed: {e}");
                // Streaming, the next try comes within seconds (a master restart is routine);
                // polling, not before the next round.
                let interval = if self.streaming { 1 } else { self.interval };
                self.note(name, |s| {
                    s.last_error = Some(e.clone());
                    s.failures = s.failures.saturating_add(1);
                    s.retry_at = Some(Instant::now() + backoff(s.failures, interval));
                });
            }
        }
        result
    }

    /// Returns whether the copy caught up (a stream's sync that ran out of turns did not).
    pub(super) async fn sync_db(
        &self,
        state: &web::Data<AppState>,
        epoch: &str,
        name: &str,
        master: &Value,
        quick: bool,
    ) -> Result<bool, String> {
        let master_version = master["version"].as_i64().unwrap_or(0);
        let master_uid = master["uid"].as_str().unwrap_or_default().to_string();
        let mut db = match state.dbs.get(name) {
            Some(db) => db,
            None => state.dbs.create(name).map_err(|e| e.to_string())?,
        };
        let local = db
            .read(|conn| Ok(local_state(conn)?))
            .await
            .map_err(|e| e.to_string())?;
        // What the master has is known now, whether or not the rest of the round works.
        let local_version = local.as_ref().map_or(0, |l| l.version);
        if !quick {
            self.note(name, |s| s.set_versions(local_version, master_version));
        }
        let (mut version, mut hash) = match local {
            // A version past the master's is not judged by `master_version`, which may be older
            // than what a stream's sync applied meanwhile: the master answers a pull from a
            // version it does not have with 410, and then the copy starts over.
            Some(l) if l.epoch == epoch && l.uid == master_uid => (l.version, l.hash),
            other => {
                let why = match other {
                    None => "no local copy".to_string(),
                    Some(l) if l.epoch != epoch => "the master's epoch changed".to_string(),
                    Some(_) => "the database was re-created on the master".to_string(),
                };
                self.bootstrap(state, &mut db, &why).await?
            }
        };
        let origin = (epoch.to_string(), master_uid.clone());
        self.note(name, |s| {
            s.local_version = version;
            s.origin = Some(origin);
            if s.hash_at(version)
                .is_none_or(|h| h != crate::replica::position::prefix(&hash))
            {
                s.restarted(version, &hash);
            }
        });
        // A bootstrap is followed by entries after the snapshot; a master that keeps answering
        // 410 (or forking) after that is broken, and the round gives up instead of looping.
        let mut snapshots_this_round = 0;
        // The master's head as its pages tell (a wake-up's target may come from a client's
        // token, which proves nothing).
        let mut master_head = None;
        // A stream wake-up for a position this copy already has needs no request.
        let mut pages = 0;
        // A master at or behind this copy's version on another history (restored, or it lost
        // its last commits) is not caught up with: the pull gets 410 and a snapshot.
        let master_hash = master["hash"].as_str().unwrap_or_default();
        let same_history = self.dbs.lock().is_ok_and(|m| {
            m.get(name)
                .and_then(|s| s.hash_at(master_version))
                .is_none_or(|h| h.is_empty() || master_hash.is_empty() || h == master_hash)
        });
        let mut caught_up = quick && version >= master_version && same_history;
        while !caught_up {
            if quick && pages == QUICK_PAGES {
                // Enough for one turn: the slot goes to the next database, this one comes again.
                break;
            }
            pages += 1;
            let path = format!("/api/replica/changesets?db={name}&since={version}&hash={hash}&limit=1000");
            let (status, page) = self.get_page(state, &path).await?;
            let (body, page) = match page {
                Ok(p) => (Value::Null, p),
                Err(body) => (body, Page::default()),
            };
            if status == 410 {
                snapshots_this_round += 1;
                if snapshots_this_round > MAX_SNAPSHOTS_PER_ROUND {
                    return Err(format!(
                        "the master answered 410 again after {MAX_SNAPSHOTS_PER_ROUND} snapshots in this round: {}",
                        body["message"]
                    ));
                }
                let why = if body["data"]["historyMismatch"] == json!(true) {
                    "the master's history differs from this copy's (restored or replaced master)"
                } else {
                    "the master pruned the versions this copy needs"
                };
                (version, hash) = self.bootstrap(state, &mut db, why).await?;
                continue;
            }
            if status != 200 {
                return Err(status_error(status, "changesets", &body, None));
            }
            if page.epoch != epoch || page.uid != master_uid {
                return Err("the master changed during the round; the next round starts over".into());
            }
            master_head = Some(page.version);
            let entries = page.entries;
            let Some(last) = entries.last().map(|e| e.version) else {
                // An empty page: this copy has all the master had, and the master knows it (a
                // pull from a version says that version is applied).
                caught_up = true;
                break;
            };
            if entries[0].version != version + 1 {
                return Err(format!(
                    "expected version {} next, got {}",
                    version + 1,
                    entries[0].version
                ));
            }
            if let Some(broken) = chain_break(&hash, &entries) {
                return Err(format!("entry {broken} does not chain to the history before it"));
            }
            let last_hash = entries.last().map(|e| e.hash.clone()).unwrap_or_default();
            let hashes: Vec<(i64, String)> = entries.iter().map(|e| (e.version, e.hash.clone())).collect();
            let (first, count, db_name) = (entries[0].version, entries.len(), name.to_string());
            log::debug!("applying {count} entries to '{db_name}' (versions {first}..={last})");
            let stored_hash = last_hash.clone();
            // Realtime subscribers on this replica get the page's changes once it commits.
            let events: Vec<Vec<u8>> = if state.realtime.enabled && state.realtime.watching(name) {
                entries.iter().map(|e| e.changeset.clone()).collect()
            } else {
                Vec::new()
            };
            let conflicts;
            let expected = version;
            (version, conflicts) = db
                .write(move |conn| {
                    // Only the sync that read this position may continue it: entries are never
                    // applied twice.
                    let at = local_state(conn)?.map_or(0, |l| l.version);
                    if at != expected {
                        return Err(ApiError::internal(
                            "sync",
                            format!("the copy moved from version {expected} to {at} during the sync"),
                        ));
                    }
                    let conflicts = apply_entries(conn, &entries, Conflicts::Converge)?;
                    conn.execute_batch(STATE_DDL)?;
                    set_state(conn, "version", &last.to_string())?;
                    set_state(conn, "hash", &stored_hash)?;
                    crate::crash::point("apply:before_commit");
                    Ok((last, conflicts))
                })
                .await
                .map_err(|e| e.to_string())?;
            if conflicts > 0 {
                self.note(name, |s| s.conflicts += conflicts);
            }
            hash = last_hash;
            // Collections may have changed: the API must know them before the new version is
            // reported (readers then find what the version promises).
            state.schemas.reload(&db).await.map_err(|e| e.to_string())?;
            for changeset in events {
                state.realtime.publish(name, changeset);
            }
            log::debug!("applied entries to '{name}', now at version {version}");
            self.note(name, |s| {
                for (v, h) in &hashes {
                    s.applied(*v, h);
                }
                s.set_versions(version, s.master_version.max(version));
            });
            self.moved.notify_waiters();
            // What the master had at the round's start is enough for this round: a database
            // under sustained writes must not keep the round, and the manual sync, forever. A
            // stream's sync pulls until an empty page (at most QUICK_PAGES), so that the master
            // hears the version it ends at.
            if !quick && version >= master_version {
                break;
            }
        }
        if quick {
            let now = now_string();
            let head = master_head.unwrap_or(master_version).max(version);
            self.note(name, |s| {
                s.set_versions(version, head);
                s.last_sync = Some(now);
                s.last_error = None;
            });
            return Ok(caught_up);
        }
        // A safety net: once caught up, the schemas must agree; if not, migrate to the master's.
        let local_hash = db
            .read(|conn| Ok(schema::hash(&schema::objects(conn)?)))
            .await
            .map_err(|e| e.to_string())?;
        if version == master_version && Some(local_hash.as_str()) != master["schemaHash"].as_str() {
            log::warn!("drift: schema of '{name}' differs from the master's; repairing it via schema-sync");
            self.note(name, |s| s.schema_repairs += 1);
            let (status, body) = self
                .get_json(state, &format!("/api/replica/schema-sync?db={name}"))
                .await?;
            if status != 200 {
                return Err(format!("master answered {status} to schema-sync"));
            }
            let objects: Vec<schema::SchemaObject> =
                serde_json::from_value(body["objects"].clone()).map_err(|e| format!("schema-sync: {e}"))?;
            db.write(move |conn| Ok(schema::migrate(conn, &objects)?))
                .await
                .map_err(|e| e.to_string())?;
            state.schemas.reload(&db).await.map_err(|e| e.to_string())?;
        }
        if version == master_version {
            self.verify(state, &db, version).await;
        }
        let now = now_string();
        self.note(name, |s| {
            s.set_versions(version, master_version.max(version));
            s.last_sync = Some(now);
            s.last_error = None;
        });
        let files: Option<i64> = db
            .read(|conn| Ok(state_value(conn, "files")?.and_then(|v| v.parse().ok())))
            .await
            .unwrap_or(None);
        let ack = self
            .request(state, reqwest::Method::POST, "/api/replica/ack")
            .map_err(|e| e.to_string())?
            .timeout(Duration::from_secs(30))
            .json(&json!({"db": name, "version": version, "files": files}))
            .send()
            .await;
        if let Err(e) = ack {
            log::warn!("ack of '{name}' failed: {e}");
        }
        Ok(true)
    }

    /// Compares the logical checksum of the copy at `version` with the master's, at most every
    /// [`VERIFY_EVERY`] per database. A difference is drift that applying entries did not show:
    /// it is logged and shown in `/health` (`checksumMismatch`), never repaired silently.
    pub(super) async fn verify(&self, state: &AppState, db: &Arc<Database>, version: i64) {
        let due = self
            .dbs
            .lock()
            .ok()
            .and_then(|m| m.get(&db.name).map(|s| (s.verified_version, s.verified_at)))
            .is_none_or(|(v, at)| v != Some(version) && at.is_none_or(|t| t.elapsed() >= VERIFY_EVERY));
        if !due {
            return;
        }
        let path = format!("/api/replica/status?db={}", db.name);
        let theirs = match self.get_json(state, &path).await {
            Ok((200, body)) => body["dbs"]
                .as_array()
                .and_then(|a| a.first().cloned())
                .filter(|d| d["version"].as_i64() == Some(version))
                .and_then(|d| d["sha256"].as_str().map(str::to_string)),
            _ => None,
        };
        // The master moved on meanwhile (or did not answer): compare another time.
        let Some(theirs) = theirs else { return };
        let ours = db
            .read(|conn| {
                conn.execute_batch("BEGIN")?;
                let sum = crate::replica::checksum::logical_checksum(conn);
                conn.execute_batch("COMMIT")?;
                Ok(sum?)
            })
            .await;
        let Ok(ours) = ours else { return };
        let mismatch = ours != theirs;
        if mismatch {
            log::warn!(
                "drift: '{}' at version {version} has another content than the master's (checksum {} here, {} there)",
                db.name,
                &ours[..12.min(ours.len())],
                &theirs[..12.min(theirs.len())]
            );
        }
        self.note(&db.name, |s| {
            s.checksum_mismatch = mismatch;
            s.verified_version = Some(version);
            s.verified_at = Some(Instant::now());
        });
    }
}

/// Snapshots one database may download in one round before the round gives up.
pub(super) const MAX_SNAPSHOTS_PER_ROUND: usize = 2;

/// The first entry of a page that does not chain to the history before it (`hash`, then each
/// entry's own). Unknown hashes (`""`, from logs written before the chain) are not checked.
pub(super) fn chain_break(hash: &str, entries: &[Entry]) -> Option<i64> {
    let mut cur = hash;
    for e in entries {
        if !cur.is_empty() && !e.prev_hash.is_empty() && e.prev_hash != cur {
            return Some(e.version);
        }
        cur = &e.hash;
    }
    None
}

/// A page of `changesets` as it arrives: entries are decoded one by one while the body streams
/// in, so neither the JSON text nor a JSON tree of the page is ever held whole.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Page {
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    uid: String,
    /// The master's head when it answered.
    #[serde(default)]
    version: i64,
    #[serde(default, deserialize_with = "wire_entries")]
    entries: Vec<Entry>,
}

/// One entry on the wire: the changeset in base64.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WireEntry {
    version: i64,
    #[serde(default)]
    schema_hash: String,
    #[serde(default)]
    schema: Option<Vec<schema::SchemaObject>>,
    changeset: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    hash: String,
    #[serde(default)]
    prev_hash: String,
}

pub(super) fn wire_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<Entry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of changelog entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Entry>, A::Error> {
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut out = Vec::new();
            // Each entry's base64 text lives only until it is decoded.
            while let Some(w) = seq.next_element::<WireEntry>()? {
                let changeset = b64.decode(&w.changeset).map_err(serde::de::Error::custom)?;
                out.push(Entry {
                    version: w.version,
                    schema_hash: w.schema_hash,
                    schema: w.schema,
                    changeset,
                    created: w.created,
                    hash: w.hash,
                    prev_hash: w.prev_hash,
                });
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Entries)
}

/// Runs a round now and then every `SYNC_INTERVAL` seconds (never when it is 0, apart from the
/// first round at start). A failed round is retried with exponential backoff, at most 5 minutes.
pub async fn sync_loop(state: web::Data<AppState>) {
    let Some(f) = state.follower.as_ref() else { return };
    // Failed rounds in a row that back off the whole loop: the master could not be reached (or,
    // in manual mode, anything failed: there is no next scheduled round to wait for).
    let mut failures: u32 = 0;
    loop {
        let result = f.round(&state, false).await;
        let reachable = f.master_reachable.load(std::sync::atomic::Ordering::Acquire);
        match &result {
            Ok(()) => {
                if failures > 0 {
                    log::info!("sync with {} works again", f.master_url());
                }
                failures = 0;
            }
            Err(e) => {
                if !reachable || f.interval == 0 {
                    failures = failures.saturating_add(1);
                }
                log::warn!("sync round with {} failed: {e}", f.master_url());
            }
        }
        let wait = match (&result, failures) {
            (Ok(()), _) if f.interval == 0 => return,
            (Err(_), n) if n > 0 => backoff(n, f.interval),
            _ => Duration::from_secs(f.interval),
        };
        tokio::time::sleep(wait).await;
    }
}
