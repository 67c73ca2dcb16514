//! Stream mode: one long-poll to the master that wakes the sync of each database as soon as
//! it commits.

use super::*;

/// With `SYNC_MODE=stream`: holds one long-poll to the master for all databases, and syncs each
/// database the master reports moved the moment it answers. The rounds of [`sync_loop`] go on
/// every `SYNC_INTERVAL` as the safety net (schemas, new and deleted databases, acks).
pub async fn stream_loop(state: web::Data<AppState>) {
    let Some(f) = state.follower.as_ref().filter(|f| f.streaming) else {
        return;
    };
    let mut cursor = String::new();
    let mut failures: u32 = 0;
    loop {
        // The master answers an idle request after STREAM_HOLD: a request unanswered for
        // STREAM_SILENCE means the link is down, even when TCP says nothing (a partition).
        let path = format!("/api/replica/stream?since={cursor}&wait={}", STREAM_HOLD.as_secs());
        let answer = f.get_json_within(&state, &path, Some(STREAM_SILENCE)).await;
        let body = match answer {
            Ok((200, body)) => {
                if let Ok(mut c) = f.contact.lock() {
                    *c = (Instant::now(), None);
                }
                body
            }
            other => {
                failures = failures.saturating_add(1);
                let why = match other {
                    Ok((status, body)) => status_error(status, "/api/replica/stream", &body, None),
                    Err(e) if e.contains("timed out") || e.contains("timeout") => format!(
                        "no answer from the master within {:.1} s (a partition or a frozen master?)",
                        STREAM_SILENCE.as_secs_f64()
                    ),
                    Err(e) => e,
                };
                if failures == 1 {
                    log::warn!("stream from {} broke off ({why}); retrying", f.master_url());
                }
                if let Ok(mut c) = f.contact.lock() {
                    c.1 = Some(format!("stream: {why}"));
                }
                // Soon at first (a master restarting), then at most every 5 s.
                tokio::time::sleep(Duration::from_millis((100u64 << failures.min(6)).min(5000))).await;
                continue;
            }
        };
        if failures > 0 {
            log::info!("stream from {} works again", f.master_url());
            failures = 0;
            // Back after a break: a full round now, not at the next interval (databases created
            // or deleted meanwhile, the schema check, and the health it reports).
            let st = state.clone();
            actix_web::rt::spawn(async move {
                if let Some(f) = st.follower.as_ref() {
                    let _ = f.round(&st, true).await;
                }
            });
        }
        cursor = body["next"].as_str().unwrap_or_default().to_string();
        let epoch = body["epoch"].as_str().unwrap_or_default();
        for d in body["dbs"].as_array().into_iter().flatten() {
            let (Some(name), Some(uid), Some(version)) = (d["name"].as_str(), d["uid"].as_str(), d["version"].as_i64())
            else {
                continue;
            };
            if !f.follows(name) || !crate::db::is_valid_db_name(name) {
                continue;
            }
            let hash = d["hash"].as_str().unwrap_or_default();
            let same_history = match f.reaches(name, &Position::new(epoch, uid, version, hash)) {
                // This copy has that position of the same history: nothing to do.
                Some(true) => continue,
                Some(false) => true,
                // Another history at a version this copy has passed: the sync starts over.
                None => false,
            };
            if same_history {
                f.note(name, |s| s.set_versions(s.local_version, version.max(s.master_version)));
            }
            f.kick(&state, epoch, name, d.clone());
        }
    }
}
