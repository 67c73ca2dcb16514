//! The master half of replication against the real binary: the changelog, its endpoints, their
//! authorization, retention, and rebuilding databases from snapshots and changesets.

use std::collections::HashSet;
use std::time::Duration;

use vski::replica::apply::Conflicts;
use vski_tests::*;

const SECRET: &str = "replication-secret-0123456789";

fn master() -> Node {
    spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET))
}

fn setup(n: &Node) -> (String, String) {
    let admin = n.admin_token();
    let (s, b) = n.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "posts", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "title", "type": "text", "required": true}, {"name": "slug", "type": "text", "unique": true},
                           {"name": "n", "type": "number"}]}),
    );
    assert_eq!(s, 200, "{b}");
    (admin, replica_token(SECRET, "r-test"))
}

fn status_of(n: &Node, token: &str, db: &str) -> Value {
    let (s, b) = n.get("/api/replica/status", Some(token));
    assert_eq!(s, 200, "{b}");
    b["dbs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == db)
        .cloned()
        .unwrap_or_else(|| panic!("{db} in {b}"))
}

fn version(n: &Node, token: &str) -> i64 {
    status_of(n, token, "default")["version"].as_i64().unwrap()
}

#[test]
fn status_lists_replicated_databases_only() {
    let n = master();
    let (admin, rt) = setup(&n);
    assert_eq!(
        n.post("/api/databases", Some(&admin), &json!({"name": "tenant"})).0,
        201
    );
    for token in [&rt, &admin] {
        let (s, b) = n.get("/api/replica/status", Some(token));
        assert_eq!(s, 200, "{b}");
        let names: Vec<&str> = b["dbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["default", "tenant"], "stats and workflows are never listed");
        assert_eq!(b["epoch"].as_str().unwrap().len(), 20);
        let d = &b["dbs"][0];
        for key in [
            "uid",
            "size",
            "sha256",
            "schemaVersion",
            "schemaHash",
            "version",
            "minVersion",
        ] {
            assert!(!d[key].is_null(), "{key} in {d}");
        }
        assert!(
            d["version"].as_i64().unwrap() >= 2,
            "bootstrap and the collection are logged: {d}"
        );
    }
    // A database deleted and created again is another history: another uid.
    let uid = status_of(&n, &rt, "tenant")["uid"].as_str().unwrap().to_string();
    assert_eq!(uid.len(), 20);
    assert_eq!(n.delete("/api/databases/tenant", Some(&admin)).0, 204);
    assert_eq!(
        n.post("/api/databases", Some(&admin), &json!({"name": "tenant"})).0,
        201
    );
    let again = status_of(&n, &rt, "tenant");
    assert_ne!(again["uid"].as_str().unwrap(), uid);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("t.db");
    download(&n, &rt, "tenant", &snap);
    let conn = vski::rusqlite::Connection::open(&snap).unwrap();
    assert_eq!(
        vski::replica::recorder::database_uid(&conn).unwrap(),
        again["uid"].as_str().unwrap(),
        "snapshots carry the uid"
    );
    assert_eq!(checksum_of(&snap), again["sha256"].as_str().unwrap());
    // With `digest=trailer` the sha256 follows the bytes instead of preceding them.
    let resp = n
        .http
        .get(format!("{}/api/replica/download?db=tenant&digest=trailer", n.url))
        .header("Authorization", format!("Bearer {rt}"))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-replica-sha256"], "trailer");
    let declared = resp.content_length().unwrap();
    let bytes = resp.bytes().unwrap();
    assert_eq!(bytes.len() as u64, declared);
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    assert_eq!(
        vski::util::sha256_hex(body),
        vski::util::hex(digest),
        "the trailer is the body's sha256"
    );
    let trailed = dir.path().join("trailed.db");
    std::fs::write(&trailed, body).unwrap();
    assert_eq!(
        checksum_of(&trailed),
        again["sha256"].as_str().unwrap(),
        "the same content"
    );
    let (s, b) = n.get("/api/replica/download?db=tenant&digest=md5", Some(&rt));
    assert_eq!(s, 400, "{b}");
    for db in ["stats", "workflows", "nope"] {
        assert_eq!(
            n.get(&format!("/api/replica/changesets?db={db}&since=0"), Some(&rt)).0,
            404,
            "{db}"
        );
        assert_eq!(
            n.get(&format!("/api/replica/download?db={db}"), Some(&rt)).0,
            404,
            "{db}"
        );
    }
    // The epoch belongs to the data directory: same after a restart, different elsewhere.
    let epoch = n.get("/api/replica/status", Some(&rt)).1["epoch"].clone();
    let n = n.restart();
    assert_eq!(n.get("/api/replica/status", Some(&rt)).1["epoch"], epoch);
    let other = master();
    assert_ne!(other.get("/api/replica/status", Some(&rt)).1["epoch"], epoch);
}

#[test]
fn replica_endpoints_check_the_token_kind() {
    let n = master();
    let (admin, rt) = setup(&n);
    let (_, reg) = n.post(
        "/api/auth/register",
        None,
        &json!({"email": "u@example.com", "password": "userpass1", "passwordConfirm": "userpass1"}),
    );
    let user = reg["token"].as_str().unwrap().to_string();
    let foreign = replica_token("some-other-secret-entirely", "r1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "r1", "type": "replica", "iat": now - 7200, "exp": now - 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let gets = [
        "/api/replica/status",
        "/api/replica/schema-sync?db=default",
        "/api/replica/changesets?db=default&since=0",
        "/api/replica/download?db=default",
        "/api/replica/replicas",
    ];
    for path in gets {
        let admin_ok = path.contains("/status") || path.contains("/replicas");
        let replica_ok = !path.contains("/replicas");
        let cases: Vec<(&str, Option<&str>, u16)> = vec![
            ("no token", None, 401),
            ("foreign secret", Some(&foreign), 401),
            ("expired", Some(&expired), 401),
            ("user", Some(&user), 403),
            ("admin", Some(&admin), if admin_ok { 200 } else { 403 }),
            ("replica", Some(&rt), if replica_ok { 200 } else { 403 }),
        ];
        for (who, token, want) in cases {
            assert_eq!(n.get(path, token).0, want, "{who} on {path}");
        }
    }
    let ack = json!({"db": "default", "version": 1});
    assert_eq!(n.post("/api/replica/ack", None, &ack).0, 401);
    assert_eq!(n.post("/api/replica/ack", Some(&user), &ack).0, 403);
    assert_eq!(n.post("/api/replica/ack", Some(&admin), &ack).0, 403);
    assert_eq!(n.post("/api/replica/ack", Some(&rt), &ack).0, 200);
    // A replica token grants nothing outside /api/replica/*.
    assert_eq!(n.get("/api/collections", Some(&rt)).0, 403);
    assert_eq!(n.get("/api/admins/me", Some(&rt)).0, 403);
    assert_eq!(n.get("/api/databases", Some(&rt)).0, 403);
    // A replica token reads no more of the records than a guest: none of `users`.
    let (s, list) = n.get("/api/collections/users/records", Some(&rt));
    assert_eq!((s, list["totalItems"].clone()), (200, json!(0)), "{list}");
    assert_eq!(
        n.post("/api/collections/users/auth-refresh", Some(&rt), &json!({})).0,
        403
    );
}

#[test]
fn bad_replication_requests_get_400() {
    let n = master();
    let (_, rt) = setup(&n);
    for q in [
        "db=default&since=-1",
        "db=default&since=x",
        "db=default&since=0&limit=x",
        "since=0",
    ] {
        assert_eq!(n.get(&format!("/api/replica/changesets?{q}"), Some(&rt)).0, 400, "{q}");
    }
    assert_eq!(n.post("/api/replica/ack", Some(&rt), &json!({"db": "default"})).0, 400);
    assert_eq!(
        n.post("/api/replica/ack", Some(&rt), &json!({"db": "default", "version": -3}))
            .0,
        400
    );
    assert_eq!(
        n.post("/api/replica/ack", Some(&rt), &json!({"db": "stats", "version": 1}))
            .0,
        404
    );
}

#[test]
fn acks_are_remembered_for_monitoring() {
    let n = master();
    let (admin, rt) = setup(&n);
    let (s, b) = n.request(
        "POST",
        "/api/replica/ack",
        Some(&rt),
        Some(&json!({"db": "default", "version": 3})),
        &[
            ("X-Replica-Id", "r001"),
            ("X-Replica-Public-Url", "https://r001.example.com"),
        ],
    );
    assert_eq!(s, 200, "{b}");
    let (s, list) = n.get("/api/replica/replicas", Some(&admin));
    assert_eq!(s, 200);
    let r = &list[0];
    assert_eq!(
        (
            r["id"].clone(),
            r["publicUrl"].clone(),
            r["positions"]["default"].clone()
        ),
        (json!("r001"), json!("https://r001.example.com"), json!(3))
    );
    assert!(r["lastSeen"].as_str().unwrap().len() == 24, "{r}");
    let n = n.restart();
    assert_eq!(
        n.get("/api/replica/replicas", Some(&admin)).1[0]["positions"]["default"],
        3,
        "kept across restarts"
    );
}

#[test]
fn rolled_back_writes_leave_no_entry() {
    let n = master();
    let (admin, rt) = setup(&n);
    assert_eq!(
        n.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": "a", "slug": "taken"})
        )
        .0,
        200
    );
    let v = version(&n, &rt);
    // Each of these fails inside the write transaction (after validation passed).
    assert_eq!(
        n.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": "dup", "slug": "taken"})
        )
        .0,
        400
    );
    let ids: Vec<Value> = n.get("/api/collections/posts/records", None).1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    let mut with_missing = ids.clone();
    with_missing.push(json!("missing"));
    assert_eq!(
        n.patch(
            "/api/collections/posts/records/bulk",
            None,
            &json!({"ids": with_missing, "data": {"n": 5}})
        )
        .0,
        404
    );
    assert_eq!(
        n.post("/api/collections", Some(&admin), &json!({"name": "posts"})).0,
        400
    );
    assert_eq!(version(&n, &rt), v, "no entry for rolled-back transactions");
    assert_eq!(
        n.post("/api/collections/posts/records", None, &json!({"title": "b"})).0,
        200
    );
    assert_eq!(version(&n, &rt), v + 1);
    let entries = changelog(&n, &rt, "default", v);
    assert_eq!(entries.len(), 1);
    assert!(entries[0].schema.is_none(), "a data-only entry carries no schema");
}

fn ids_in(path: &std::path::Path) -> HashSet<String> {
    let conn = vski::rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT id FROM posts").unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn versions_are_gap_free_under_concurrent_writers() {
    let n = master();
    let (_, rt) = setup(&n);
    let acked = join_acked(write_burst(&n.url, 8, Duration::from_millis(1500)));
    assert!(acked.len() > 100, "only {} writes", acked.len());
    let entries = changelog(&n, &rt, "default", 0);
    let versions: Vec<i64> = entries.iter().map(|e| e.version).collect();
    assert_eq!(
        versions,
        (1..=versions.len() as i64).collect::<Vec<_>>(),
        "gap-free from 1"
    );
    assert_eq!(*versions.last().unwrap(), version(&n, &rt));
    // Replaying the whole log from nothing gives the master's content, row for row.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    apply_all(&copy, &entries, Conflicts::Strict);
    assert_eq!(
        checksum_of(&copy),
        status_of(&n, &rt, "default")["sha256"].as_str().unwrap()
    );
    let stored = ids_in(&copy);
    assert!(acked.iter().all(|id| stored.contains(id)));
}

#[test]
fn kill_9_during_a_write_burst_keeps_every_acknowledged_write_in_data_and_changelog() {
    let mut n = master();
    let (_, rt) = setup(&n);
    let handles = write_burst(&n.url, 6, Duration::from_secs(30));
    wait_for("300 writes", Duration::from_secs(30), || {
        (version(&n, &rt) > 300).then_some(())
    });
    handles.expect_stop();
    n.kill();
    let acked = join_acked(handles);
    let n = n.restart();
    let entries = changelog(&n, &rt, "default", 0);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    apply_all(&copy, &entries, Conflicts::Strict);
    let from_log = ids_in(&copy);
    let missing: Vec<&String> = acked.iter().filter(|id| !from_log.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes missing from the changelog",
        missing.len(),
        acked.len()
    );
    assert_eq!(
        checksum_of(&copy),
        status_of(&n, &rt, "default")["sha256"].as_str().unwrap(),
        "changelog replay equals the data"
    );
}

#[test]
fn snapshot_under_writes_plus_later_changesets_reproduce_the_master() {
    let n = master();
    let (admin, rt) = setup(&n);
    let handles = write_burst(&n.url, 4, Duration::from_secs(3));
    wait_for("some writes", Duration::from_secs(10), || {
        (version(&n, &rt) > 50).then_some(())
    });
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap.db");
    let (at, _) = download(&n, &rt, "default", &snap);
    assert!(at > 50);
    // Schema changes interleaved with the writes still running.
    let (_, posts) = n.get("/api/collections/posts", Some(&admin));
    let mut fields = posts["fields"].as_array().unwrap().clone();
    fields.push(json!({"name": "extra", "type": "text"}));
    let (s, b) = n.patch(
        "/api/collections/posts",
        Some(&admin),
        &json!({"fields": fields, "indexes": ["CREATE INDEX idx_posts_n ON posts (n)"]}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, _) = n.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "later", "createRule": "", "fields": [{"name": "x", "type": "number"}]}),
    );
    assert_eq!(s, 200);
    for i in 0..20 {
        assert_eq!(n.post("/api/collections/later/records", None, &json!({"x": i})).0, 200);
        assert_eq!(
            n.post(
                "/api/collections/posts/records",
                None,
                &json!({"title": "with extra", "extra": format!("e{i}")})
            )
            .0,
            200
        );
    }
    let acked = join_acked(handles);
    let entries = changelog(&n, &rt, "default", at);
    assert_eq!(
        entries.first().map(|e| e.version),
        Some(at + 1),
        "the log continues right after the snapshot"
    );
    // Strict: a snapshot holding any change after its advertised version would conflict here.
    apply_all(&snap, &entries, Conflicts::Strict);
    let st = status_of(&n, &rt, "default");
    assert_eq!(checksum_of(&snap), st["sha256"].as_str().unwrap());
    let conn = vski::rusqlite::Connection::open(&snap).unwrap();
    let objects = vski::replica::schema::objects(&conn).unwrap();
    assert_eq!(
        vski::replica::schema::hash(&objects),
        st["schemaHash"].as_str().unwrap()
    );
    assert!(objects.iter().any(|o| o.name == "idx_posts_n"));
    let stored = ids_in(&snap);
    assert!(acked.iter().all(|id| stored.contains(id)));
    // schema-sync describes the same schema.
    let (_, sync) = n.get("/api/replica/schema-sync?db=default", Some(&rt));
    assert_eq!(sync["schemaHash"], st["schemaHash"]);
    assert_eq!(sync["objects"].as_array().unwrap().len(), objects.len());
}

#[test]
fn pruned_versions_answer_410() {
    let n = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("CHANGELOG_RETENTION_HOURS", "0.0003"),
    );
    let (_, rt) = setup(&n);
    for i in 0..5 {
        assert_eq!(
            n.post(
                "/api/collections/posts/records",
                None,
                &json!({"title": format!("t{i}")})
            )
            .0,
            200
        );
    }
    let head = version(&n, &rt);
    wait_for("pruning", Duration::from_secs(20), || {
        (status_of(&n, &rt, "default")["minVersion"].as_i64()? == head).then_some(())
    });
    let (s, b) = n.get("/api/replica/changesets?db=default&since=0", Some(&rt));
    assert_eq!(s, 410, "{b}");
    assert_eq!(b["code"], 410);
    assert_eq!(b["data"]["minVersion"], head);
    assert_eq!(
        n.get(
            &format!("/api/replica/changesets?db=default&since={}", head - 1),
            Some(&rt)
        )
        .0,
        200,
        "the newest entry is kept"
    );
    assert_eq!(
        n.get(
            &format!("/api/replica/changesets?db=default&since={}", head + 5),
            Some(&rt)
        )
        .0,
        410,
        "ahead of the master"
    );
    // A snapshot is the way back in.
    let dir = tempfile::tempdir().unwrap();
    let (at, _) = download(&n, &rt, "default", &dir.path().join("s.db"));
    assert_eq!(at, head);
}

/// Builds `tests/fault/fault.c` (a pread fault injector for LD_PRELOAD) into `dir`.
fn fault_injector(dir: &std::path::Path) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fault/fault.c");
    let out = dir.join("fault.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed to build the fault injector");
    out
}

/// An I/O error under a batch of concurrent writes, injected into the real binary: the writes
/// that failed are not visible, and the changelog replays to exactly the data. (The writer's
/// unit tests force the rollback inside a job deterministically.)
#[test]
fn an_io_error_mid_batch_never_splits_a_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let shim = fault_injector(tmp.path());
    let trigger = tmp.path().join("fail-next-read");
    let n = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("LD_PRELOAD", shim.to_str().unwrap())
            .env("VSKI_FAULT_FILE", trigger.to_str().unwrap())
            // The writer's read: the checkpointer's WAL reads would take the fault away.
            .env("VSKI_FAULT_THREAD", "writer-default"),
    );
    let (_, rt) = setup(&n);
    // More data than the writer's page cache (16 MB), so updates of old records read the disk.
    let pad = "p".repeat(8000);
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|w| {
                let (n, pad) = (&n, &pad);
                s.spawn(move || {
                    (0..700)
                        .map(|i| {
                            let (st, b) = n.post(
                                "/api/collections/posts/records",
                                None,
                                &json!({"title": format!("{w}-{i}-{pad}")}),
                            );
                            assert_eq!(st, 200, "{b}");
                            b["id"].as_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let n = n.restart(); // a cold cache: the next updates read pages from the file
    // One write first, so the writer has loaded the schema and the fault hits a data page.
    let (st, _) = n.patch(
        &format!("/api/collections/posts/records/{}", ids[0]),
        None,
        &json!({"n": 1}),
    );
    assert_eq!(st, 200);
    // Concurrent updates of distinct old records, batched together by the writer; one read
    // fails in the middle of them.
    std::fs::write(&trigger, b"").unwrap();
    let outcomes: Vec<(String, String, u16)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|w| {
                let (n, ids) = (&n, &ids);
                s.spawn(move || {
                    (0..40)
                        .map(|i| {
                            let id = ids[(w * 97 + i * 13) % ids.len()].clone();
                            let title = format!("updated-{w}-{i}");
                            let (st, _) = n.patch(
                                &format!("/api/collections/posts/records/{id}"),
                                None,
                                &json!({"title": title}),
                            );
                            (id, title, st)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(!trigger.exists(), "the injected read error happened");
    let failed: Vec<&(String, String, u16)> = outcomes.iter().filter(|o| o.2 != 200).collect();
    assert!(!failed.is_empty(), "some writes failed with the read");
    assert!(failed.iter().all(|o| o.2 == 500), "{failed:?}");
    // No failed write is visible, and the changelog replays to exactly the data.
    for (id, title, _) in &failed {
        let (_, rec) = n.get(&format!("/api/collections/posts/records/{id}"), None);
        assert_ne!(
            rec["title"].as_str(),
            Some(title.as_str()),
            "a failed write of {id} was committed"
        );
    }
    let entries = changelog(&n, &rt, "default", 0);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    apply_all(&copy, &entries, Conflicts::Strict);
    assert_eq!(
        checksum_of(&copy),
        status_of(&n, &rt, "default")["sha256"].as_str().unwrap(),
        "every committed change has its changelog entry"
    );
    // Where the fault lands depends on which page is cold: in a job (SQLite then rolls the whole
    // transaction back under the batch) or in COMMIT. Either way the whole batch failed.
    let log = n.log();
    assert!(
        log.contains("the write transaction was rolled back") || log.contains("commit write transaction"),
        "{log}"
    );
}

#[test]
fn a_page_of_changesets_holds_at_most_8_mib_plus_one_entry() {
    use base64::Engine;
    let m = master();
    let (_, token) = setup(&m);
    // 60 MB of writes, one record of 1.5 MB per transaction (text does not compress in a
    // changeset).
    let mut seed = 0x2545_f491_u64;
    for i in 0..40 {
        let title: String = (0..1_500_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'a' + (seed % 26) as u8)
            })
            .collect();
        let (s, b) = m.post("/api/collections/posts/records", None, &json!({"title": title, "n": i}));
        assert_eq!(s, 200, "{}", b["message"]);
    }
    let head = status_of(&m, &token, "default")["version"].as_i64().unwrap();
    let (s, b) = m.get("/api/replica/changesets?db=default&since=0&limit=1000", Some(&token));
    assert_eq!(s, 200);
    let sizes: Vec<usize> = b["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            base64::engine::general_purpose::STANDARD
                .decode(e["changeset"].as_str().unwrap())
                .unwrap()
                .len()
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let largest = *sizes.iter().max().unwrap();
    assert!(sizes.len() < head as usize, "one page carried all {head} entries");
    assert!(
        total <= 8 * 1024 * 1024 + largest,
        "a page of {} entries holds {total} bytes of changesets (largest {largest})",
        sizes.len()
    );
    // The rest follows page by page from where this one ended.
    assert_eq!(changelog(&m, &token, "default", 0).len() as i64, head);
}
