//! The replica half of replication, with real master and replica processes on loopback.

use std::time::Duration;

use vski_tests::*;

const SECRET: &str = "your-shared-secret-0123456789";
const READ_ONLY: &str = "replica is read-only";

fn master() -> Node {
    spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET))
}

fn replica(m: &Node, interval: &str) -> Node {
    spawn_replica(m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", interval))
}

/// Creates an open `posts` collection with one record; returns the admin token.
fn seed(m: &Node) -> String {
    let t = m.admin_token();
    let (s, b) = m.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "posts", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"}]}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": "first", "n": 1})
        )
        .0,
        200
    );
    t
}

/// Titles in `posts` of `default` on `n`, sorted; none when the node does not answer 200.
fn titles(n: &Node) -> Vec<String> {
    titles_of(n, "default").unwrap_or_default()
}

/// Titles in `posts` of database `db` on `n`, sorted; `None` unless the node answers 200.
fn titles_of(n: &Node, db: &str) -> Option<Vec<String>> {
    let (s, b) = n.request(
        "GET",
        "/api/collections/posts/records?perPage=1000&sort=title",
        None,
        None,
        &[("X-Dbname", db)],
    );
    (s == 200).then_some(())?;
    Some(
        b["items"]
            .as_array()?
            .iter()
            .map(|r| r["title"].as_str().unwrap().to_string())
            .collect(),
    )
}

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn quick_start_as_written() {
    // Master: JWT_SECRET=your-shared-secret DATA_DIR=./data vski serve --port 3001
    let m = master();
    seed(&m);
    // Replica: REPLICA_MODE=replica MASTER_URL=… JWT_SECRET=… DATA_DIR=… SYNC_INTERVAL=5 vski serve
    let r = replica(&m, "5");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(titles(&r), vec!["first"]);
    let (s, b) = r.post("/api/collections/posts/records", None, &json!({"title": "New Post"}));
    assert_eq!(s, 403);
    assert_eq!(b["error"], READ_ONLY);
    assert_eq!(b["code"], 403);
    let h = r.headers("/health");
    assert_eq!(h["x-replica-mode"], "replica");
    assert_eq!(h["x-master-url"], m.url.as_str());
    assert!(h["x-replica-id"].to_str().unwrap().starts_with("replica-"));
    let health = r.health();
    assert_eq!(
        (health["mode"].clone(), health["masterUrl"].clone()),
        (json!("replica"), json!(m.url))
    );
    assert_eq!(health["dbs"]["default"]["lag"], 0);
    assert!(health["dbs"]["default"]["lastSync"].is_string());
    assert!(health["dbs"].get("stats").is_none() && health["dbs"].get("workflows").is_none());
    assert_eq!(m.headers("/health")["x-replica-mode"], "master");
}

#[test]
fn data_and_schema_changes_arrive() {
    let m = master();
    let t = seed(&m);
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // New field, new index, new collection, update, delete, new database.
    let (_, posts) = m.get("/api/collections/posts", Some(&t));
    let mut fields = posts["fields"].as_array().unwrap().clone();
    fields.push(json!({"name": "extra", "type": "text"}));
    let (s, b) = m.patch(
        "/api/collections/posts",
        Some(&t),
        &json!({"fields": fields, "indexes": ["CREATE INDEX idx_n ON posts (n)"]}),
    );
    assert_eq!(s, 200, "{b}");
    let (_, rec) = m.post(
        "/api/collections/posts/records",
        None,
        &json!({"title": "second", "extra": "x"}),
    );
    let (_, gone) = m.post("/api/collections/posts/records", None, &json!({"title": "doomed"}));
    let id = rec["id"].as_str().unwrap();
    assert_eq!(
        m.patch(
            &format!("/api/collections/posts/records/{id}"),
            None,
            &json!({"title": "second (edited)"})
        )
        .0,
        200
    );
    assert_eq!(
        m.delete(
            &format!("/api/collections/posts/records/{}", gone["id"].as_str().unwrap()),
            None
        )
        .0,
        204
    );
    assert_eq!(
        m.post(
            "/api/collections",
            Some(&t),
            &json!({"name": "notes", "listRule": "", "fields": [{"name": "body", "type": "text"}]})
        )
        .0,
        200
    );
    assert_eq!(m.post("/api/databases", Some(&t), &json!({"name": "tenant"})).0, 201);
    let (s, _) = m.request(
        "POST",
        "/api/collections",
        Some(&t),
        Some(&json!({"name": "t1", "listRule": "", "fields": [{"name": "x", "type": "number"}]})),
        &[("X-Dbname", "tenant")],
    );
    assert_eq!(s, 200);
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_replica_equals_master(&m, &r, SECRET, "tenant", TIMEOUT);
    assert_eq!(titles(&r), vec!["first", "second (edited)"]);
    let (_, got) = r.get(&format!("/api/collections/posts/records/{id}"), None);
    assert_eq!(got["extra"], "x", "the new field arrived with its data");
    assert_eq!(r.get("/api/collections/notes/records", None).0, 200);
    assert_eq!(r.get("/api/collections/t1/records?db=tenant", None).0, 200);
    let conn = vski::rusqlite::Connection::open_with_flags(
        r.data_dir.join("default.db"),
        vski::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let objects = vski::replica::schema::objects(&conn).unwrap();
    assert!(objects.iter().any(|o| o.name == "idx_n"), "the index arrived");
    assert_eq!(
        vski::replica::schema::hash(&objects),
        master_db_status(&m, SECRET, "default")["schemaHash"].as_str().unwrap()
    );
}

#[test]
fn writes_are_refused_and_sign_in_works() {
    let m = master();
    let t = seed(&m);
    let (_, reg) = m.post(
        "/api/auth/register",
        None,
        &json!({"email": "u@example.com", "password": "userpass1", "passwordConfirm": "userpass1"}),
    );
    let user_on_master = reg["token"].as_str().unwrap().to_string();
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let id = r.get("/api/collections/posts/records", None).1["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = json!({"status": 403, "code": 403, "message": READ_ONLY, "error": READ_ONLY, "data": {}});
    let writes: Vec<(&str, String)> = vec![
        ("POST", "/api/collections/posts/records".into()),
        ("PATCH", format!("/api/collections/posts/records/{id}")),
        ("DELETE", format!("/api/collections/posts/records/{id}")),
        ("PUT", format!("/api/collections/posts/records/{id}")),
        ("PATCH", "/api/collections/posts/records/bulk".into()),
        ("DELETE", "/api/collections/posts/records/bulk".into()),
        ("POST", "/api/collections".into()),
        ("PATCH", "/api/collections/posts".into()),
        ("DELETE", "/api/collections/posts".into()),
        ("POST", "/api/databases".into()),
        ("DELETE", "/api/databases/default".into()),
        ("POST", "/api/admins/init".into()),
        ("POST", "/api/auth/register".into()),
        ("POST", "/api/collections/users/records".into()),
        ("POST", "/api/no/such/route".into()),
    ];
    for (method, path) in &writes {
        for token in [None, Some(t.as_str())] {
            let (s, b) = r.request(method, path, token, Some(&json!({"title": "x"})), &[]);
            assert_eq!((s, &b), (403, &body), "{method} {path}");
        }
    }
    assert_eq!(titles(&r), vec!["first"], "nothing changed");
    // Sign-in and refresh work on the replica, and tokens cross between nodes.
    let (s, a) = r.post(
        "/api/admins/auth-with-password",
        None,
        &json!({"identity": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    );
    assert_eq!(s, 200, "{a}");
    let admin_on_replica = a["token"].as_str().unwrap().to_string();
    assert_eq!(
        m.get("/api/admins/me", Some(&admin_on_replica)).0,
        200,
        "replica token works on the master"
    );
    assert_eq!(
        r.get("/api/admins/me", Some(&t)).0,
        200,
        "master token works on the replica"
    );
    let (s, u) = r.post(
        "/api/collections/users/auth-with-password",
        None,
        &json!({"identity": "u@example.com", "password": "userpass1"}),
    );
    assert_eq!(s, 200, "{u}");
    assert_eq!(
        r.post(
            "/api/auth/login",
            None,
            &json!({"identity": "u@example.com", "password": "userpass1"})
        )
        .0,
        200
    );
    assert_eq!(r.get("/api/auth/me", Some(&user_on_master)).0, 200);
    let (s, refreshed) = r.post("/api/collections/users/auth-refresh", Some(&user_on_master), &json!({}));
    assert_eq!(s, 200);
    assert_eq!(m.get("/api/auth/me", Some(refreshed["token"].as_str().unwrap())).0, 200);
    // The master's replication endpoints are not served by a replica.
    assert_eq!(r.get("/api/replica/status", Some(&replica_token(SECRET, "x"))).0, 404);
}

#[test]
fn omitted_databases_stay_away() {
    let m = master();
    let t = seed(&m);
    for name in ["tenant", "cache"] {
        assert_eq!(m.post("/api/databases", Some(&t), &json!({"name": name})).0, 201);
    }
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "1")
            .env("REPLICA_OMIT_DBS", "cache, tenant"),
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let health = r.health();
    assert!(
        health["dbs"].get("tenant").is_none() && health["dbs"].get("cache").is_none(),
        "{health}"
    );
    assert!(!r.data_dir.join("tenant.db").exists());
    assert_eq!(r.get("/api/collections?db=tenant", Some(&t)).0, 404);
}

#[test]
fn manual_mode_syncs_only_when_asked() {
    let m = master();
    let t = seed(&m);
    let r = replica(&m, "0");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(
        m.post("/api/collections/posts/records", None, &json!({"title": "later"}))
            .0,
        200
    );
    std::thread::sleep(Duration::from_millis(1500)); // nothing may arrive on its own
    assert_eq!(titles(&r), vec!["first"]);
    assert_eq!(r.post("/api/replica/sync", None, &json!({})).0, 401);
    let (s, b) = r.post("/api/replica/sync", Some(&t), &json!({}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(titles(&r), vec!["first", "later"], "visible when the sync call returns");
    assert_eq!(
        m.post("/api/replica/sync", Some(&t), &json!({})).0,
        404,
        "a master has nothing to sync"
    );
}

#[test]
fn two_replicas_at_different_positions_and_the_master_knows_them() {
    let m = master();
    let t = seed(&m);
    let a = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "0")
            .env("REPLICA_ID", "r001")
            .env("PUBLIC_URL", "https://r001.example.com"),
    );
    let b = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "1")
            .env("REPLICA_ID", "r002"),
    );
    assert_replica_equals_master(&m, &a, SECRET, "default", TIMEOUT);
    for i in 0..5 {
        assert_eq!(
            m.post(
                "/api/collections/posts/records",
                None,
                &json!({"title": format!("more {i}")})
            )
            .0,
            200
        );
    }
    assert_replica_equals_master(&m, &b, SECRET, "default", TIMEOUT);
    assert_eq!(titles(&a).len(), 1);
    assert_eq!(titles(&b).len(), 6);
    assert_eq!(a.headers("/health")["x-replica-id"], "r001");
    let (_, list) = m.get("/api/replica/replicas", Some(&t));
    let find = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} in {list}"))
    };
    let (ra, rb) = (find("r001"), find("r002"));
    assert_eq!(ra["publicUrl"], "https://r001.example.com");
    assert!(
        ra["positions"]["default"].as_i64().unwrap() < rb["positions"]["default"].as_i64().unwrap(),
        "{list}"
    );
    // Per database: versions behind and the age of the oldest commit not applied.
    assert_eq!(ra["dbs"]["default"]["behind"], 5, "{list}");
    assert!(ra["dbs"]["default"]["lagMs"].as_i64().unwrap() > 0, "{list}");
    assert_eq!(
        (
            rb["dbs"]["default"]["behind"].clone(),
            rb["dbs"]["default"]["lagMs"].clone()
        ),
        (json!(0), json!(0)),
        "{list}"
    );
    // The figures move as the lagging replica catches up.
    assert_eq!(a.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
    let (_, list) = m.get("/api/replica/replicas", Some(&t));
    let ra = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "r001")
        .cloned()
        .unwrap();
    assert_eq!(
        (
            ra["dbs"]["default"]["behind"].clone(),
            ra["dbs"]["default"]["lagMs"].clone()
        ),
        (json!(0), json!(0)),
        "{list}"
    );
}

#[test]
fn master_restart_resumes_without_a_new_download() {
    let m = master();
    seed(&m);
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let m = m.restart();
    assert_eq!(
        m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": "after restart"})
        )
        .0,
        200
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(r.health()["dbs"]["default"]["bootstraps"], 1, "no second download");
    // A replica restart resumes too.
    let r = r.restart();
    assert_eq!(
        m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": "after replica restart"})
        )
        .0,
        200
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(
        r.health()["dbs"]["default"]["bootstraps"],
        0,
        "resumed from its own version"
    );
    assert_eq!(titles(&r).len(), 3);
}

#[test]
fn a_replaced_master_data_dir_means_a_new_bootstrap() {
    let mut m = master();
    seed(&m);
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let port = m.port();
    m.kill();
    // Another data directory behind the same URL: another epoch, other content.
    let m2 = spawn_master_with(NodeOptions {
        port: Some(port),
        ..NodeOptions::default().env("JWT_SECRET", SECRET)
    });
    let t = m2.admin_token();
    assert_eq!(
        m2.post(
            "/api/collections",
            Some(&t),
            &json!({"name": "posts", "listRule": "", "createRule": "", "fields": [{"name": "title", "type": "text"}]})
        )
        .0,
        200
    );
    for title in ["from the new master", "another"] {
        assert_eq!(
            m2.post("/api/collections/posts/records", None, &json!({"title": title}))
                .0,
            200
        );
    }
    assert_replica_equals_master(&m2, &r, SECRET, "default", TIMEOUT);
    assert_eq!(titles(&r), vec!["another", "from the new master"]);
    assert_eq!(r.health()["dbs"]["default"]["bootstraps"], 2);
}

#[test]
fn a_pruned_log_means_a_new_bootstrap() {
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("CHANGELOG_RETENTION_HOURS", "0.0003"),
    );
    let t = seed(&m);
    let r = replica(&m, "0");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    for i in 0..5 {
        assert_eq!(
            m.post(
                "/api/collections/posts/records",
                None,
                &json!({"title": format!("p{i}")})
            )
            .0,
            200
        );
    }
    let head = master_db_status(&m, SECRET, "default")["version"].as_i64().unwrap();
    wait_for("pruning", TIMEOUT, || {
        (master_db_status(&m, SECRET, "default")["minVersion"].as_i64()? == head).then_some(())
    });
    let (s, b) = r.post("/api/replica/sync", Some(&t), &json!({}));
    assert_eq!(s, 200, "{b}");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(
        r.health()["dbs"]["default"]["bootstraps"],
        2,
        "410 led to a second download"
    );
    assert_eq!(titles(&r).len(), 6);
}

#[test]
fn an_unreachable_master_leaves_reads_served_and_staleness_reported() {
    let mut m = master();
    seed(&m);
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let (port, dir) = (m.port(), m.data_dir.clone());
    m.kill();
    wait_for("staleness to show", TIMEOUT, || {
        let h = r.health();
        (h["stale"] == true && h["lastError"].is_string()).then_some(())
    });
    assert_eq!(titles(&r), vec!["first"], "reads are still served");
    let m = Node::start(
        dir,
        NodeOptions {
            port: Some(port),
            ..NodeOptions::default().env("JWT_SECRET", SECRET)
        },
        None,
    );
    assert_eq!(
        m.post("/api/collections/posts/records", None, &json!({"title": "back"}))
            .0,
        200
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", Duration::from_secs(40));
    // The stream may bring the data before the next round (backed off while the master was
    // down) succeeds; `stale` and `lastError` describe rounds, so they clear with that round.
    wait_for("the next round to clear staleness", Duration::from_secs(40), || {
        let h = r.health();
        (h["stale"] == json!(false) && h["lastError"] == Value::Null).then_some(())
    });
    assert_eq!(titles(&r), vec!["back", "first"]);
}

#[test]
fn replica_configuration_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("REPLICA_MODE", "replica"), ("JWT_SECRET", SECRET)], "MASTER_URL"),
        (
            vec![("REPLICA_MODE", "replica"), ("MASTER_URL", "http://127.0.0.1:9")],
            "JWT_SECRET",
        ),
        (
            vec![
                ("REPLICA_MODE", "replica"),
                ("MASTER_URL", "ftp://x"),
                ("JWT_SECRET", SECRET),
            ],
            "MASTER_URL",
        ),
        (vec![("REPLICA_MODE", "primary")], "primary"),
        (vec![("SYNC_INTERVAL", "soon")], "soon"),
        (vec![("REPLICA_ID", "bad id!")], "REPLICA_ID"),
    ];
    for (env, needle) in cases {
        let mut env = env;
        env.push(("PORT", "0"));
        let (code, _, err) = run_cli(&["serve", "--data-dir", d], &env);
        assert_ne!(code, 0, "{env:?}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{env:?}: {err}");
    }
}

#[test]
fn a_generated_replica_id_is_kept() {
    let m = master();
    seed(&m);
    let r = replica(&m, "0");
    let id = r.headers("/health")["x-replica-id"].to_str().unwrap().to_string();
    let r = r.restart();
    assert_eq!(r.headers("/health")["x-replica-id"].to_str().unwrap(), id);
}

/// Writes, updates and deletes on the master from one thread until `stop` is set.
fn churn(url: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let c = reqwest::blocking::Client::new();
        let mut ids: Vec<String> = Vec::new();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let r: Value = c
                .post(format!("{url}/api/collections/posts/records"))
                .json(&json!({"title": format!("c{n}"), "n": n}))
                .send()
                .unwrap()
                .json()
                .unwrap();
            ids.push(r["id"].as_str().unwrap().to_string());
            if n % 3 == 0 {
                let id = &ids[n % ids.len()];
                c.patch(format!("{url}/api/collections/posts/records/{id}"))
                    .json(&json!({"n+": 1}))
                    .send()
                    .unwrap();
            }
            if n % 7 == 0 {
                let id = ids.remove(0);
                c.delete(format!("{url}/api/collections/posts/records/{id}"))
                    .send()
                    .unwrap();
            }
        }
        n
    })
}

#[test]
fn a_replica_killed_at_random_moments_converges() {
    // A short retention makes most restarts find their version pruned (410), so kills land in
    // snapshot downloads as well as in changeset applies.
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("CHANGELOG_RETENTION_HOURS", "0.0002"),
    );
    seed(&m);
    // Enough rows that a snapshot download takes a moment.
    let url = m.url.clone();
    let fill: Vec<_> = (0..4)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let c = reqwest::blocking::Client::new();
                for i in 0..1500 {
                    let title = format!("fill {w}-{i} {}", "x".repeat(200));
                    c.post(format!("{url}/api/collections/posts/records"))
                        .json(&json!({"title": title}))
                        .send()
                        .unwrap();
                }
            })
        })
        .collect();
    fill.into_iter().for_each(|h| h.join().unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = churn(m.url.clone(), stop.clone());
    let tmp = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path().join("data");
    let opts = NodeOptions::default()
        .env("REPLICA_MODE", "replica")
        .env("MASTER_URL", &m.url)
        .env("JWT_SECRET", SECRET)
        .env("SYNC_INTERVAL", "1")
        .env("RUST_LOG", "info,vski::access=warn,vski::replica::follower=debug");
    // A cheap deterministic spread of kill delays (0–600 ms after the replica listens).
    let mut seed = 0x9e37_79b9_u64;
    let (mut kills, mut in_download, mut in_apply) = (0, 0, 0);
    for i in 0..30 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Aim a third of the kills at a download, a third at an apply, a third anywhere.
        let aim = match i % 3 {
            0 => Some("downloading a snapshot"),
            1 => Some("applying "),
            _ => None,
        };
        if aim == Some("downloading a snapshot") {
            // Stay away longer than the retention, so the next start needs a snapshot.
            std::thread::sleep(Duration::from_millis(1200));
        }
        let mut r = Node::start(dir.clone(), opts.clone(), Some(tmp.clone()));
        match aim {
            Some(marker) => {
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                while !r.log().contains(marker) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(seed % 15));
            }
            None => std::thread::sleep(Duration::from_millis(seed % 400)),
        }
        r.kill();
        kills += 1;
        let log = r.log();
        let last = |needle: &str| log.rfind(needle);
        if last("downloading a snapshot") > last("restored '") {
            in_download += 1;
        }
        if last("applying ") > last("applied entries") {
            in_apply += 1;
        }
    }
    eprintln!("{kills} kills: {in_download} during a download or restore, {in_apply} during an apply");
    assert!(
        in_download >= 4 && in_apply >= 4,
        "kills must hit both paths: {in_download} downloads, {in_apply} applies"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 20, "the master took writes during the kills: {writes}");
    let r = Node::start(dir, opts, Some(tmp));
    assert_replica_equals_master(&m, &r, SECRET, "default", Duration::from_secs(60));
    let (_, on_master) = m.get("/api/collections/posts/records?perPage=1", None);
    let (_, on_replica) = r.get("/api/collections/posts/records?perPage=1", None);
    assert_eq!(
        on_master["totalItems"], on_replica["totalItems"],
        "no lost or duplicated row"
    );
}

fn add_titles(m: &Node, prefix: &str, n: usize) {
    add_titles_in(m, "default", prefix, n);
}

/// Puts `from` in place of the master's `default.db` while it is stopped.
fn replace_default_db(m: &Node, from: &std::path::Path) {
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(m.data_dir.join(format!("default.db{suffix}")));
    }
    std::fs::copy(from, m.data_dir.join("default.db")).expect("restore the copy");
}

#[test]
fn a_master_restored_from_an_older_copy_makes_replicas_start_over() {
    // (records written after the copy and then lost, records written after the restore): more
    // new ones than lost ones, and as many (same version numbers, other history).
    for (lost, new) in [(5, 7), (5, 5)] {
        let mut m = master();
        let t = seed(&m);
        let r = replica(&m, "0");
        assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
        // `cp` of the file while the master is stopped: the operator's backup.
        m.terminate(TIMEOUT);
        let backup = m.data_dir.with_file_name("backup.db");
        assert!(!m.data_dir.join("default.db-wal").exists(), "a clean stop checkpoints");
        std::fs::copy(m.data_dir.join("default.db"), &backup).unwrap();
        let mut m = m.restart();
        add_titles(&m, "lost", lost);
        assert_eq!(r.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
        assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
        assert!(titles(&r).contains(&"lost-0".to_string()));
        // The master is restored from the copy and goes on with other writes.
        m.terminate(TIMEOUT);
        replace_default_db(&m, &backup);
        let m = m.restart();
        add_titles(&m, "new", new);
        let (s, b) = r.post("/api/replica/sync", Some(&t), &json!({}));
        assert_eq!(s, 200, "({lost}, {new}): {b}");
        assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
        let have = titles(&r);
        assert_eq!(have, titles(&m), "({lost}, {new})");
        assert!(!have.iter().any(|t| t.starts_with("lost")), "({lost}, {new}): {have:?}");
        assert_eq!(r.health()["dbs"]["default"]["bootstraps"], 2, "({lost}, {new})");
        assert!(r.log().contains("history differs"), "the reason is logged: {}", r.log());
    }
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_error(r: &Node, needle: &str) -> Value {
    wait_for(&format!("lastError with {needle:?}"), TIMEOUT, || {
        let h = r.health();
        h["lastError"].as_str()?.contains(needle).then_some(h)
    })
}

#[test]
fn health_tells_the_truth() {
    let m = master();
    seed(&m);
    // Never synced, master unreachable: not ready, and nothing is served.
    let lost = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("MASTER_URL", &format!("http://127.0.0.1:{}", dead_port()))
            .env("SYNC_INTERVAL", "1")
            .unready(),
    );
    let h = wait_error(&lost, "connection refused");
    assert_eq!(lost.get("/health", None).0, 503, "{h}");
    assert_eq!(h["ready"], false, "{h}");
    let (s, b) = lost.get("/api/collections/posts/records", None);
    assert_eq!(
        (s, b["message"].as_str()),
        (503, Some("replica is not ready: it has no data from the master yet"))
    );
    assert_eq!(lost.get("/api/health", None).0, 503);
    // Never synced, wrong secret: the error says so.
    let wrong = spawn_replica(
        &m,
        "not-the-masters-secret-0123456789",
        NodeOptions::default().env("SYNC_INTERVAL", "1").unready(),
    );
    wait_error(&wrong, "wrong JWT_SECRET?");
    assert_eq!(wrong.get("/health", None).0, 503);
    // Synced once, then the master goes away, and the replica restarts: reads go on, and
    // health is 200 with the staleness shown.
    let mut m = m;
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let version = r.replica_version("default");
    m.kill();
    let r = r.restart();
    let h = wait_error(&r, "connection refused");
    assert_eq!(r.get("/health", None).0, 200, "{h}");
    assert_eq!(
        (h["ready"].clone(), h["stale"].clone()),
        (json!(true), json!(true)),
        "{h}"
    );
    assert_eq!(h["dbs"]["default"]["localVersion"], version, "{h}");
    assert_eq!(titles(&r), vec!["first"], "reads are served from what it has");
}

#[test]
fn a_database_deleted_on_the_master_leaves_the_replicas() {
    let m = master();
    let t = seed(&m);
    assert_eq!(m.post("/api/databases", Some(&t), &json!({"name": "gone"})).0, 201);
    let posts = json!({"name": "posts", "listRule": "", "fields": [{"name": "title", "type": "text"}]});
    assert_eq!(
        m.request(
            "POST",
            "/api/collections",
            Some(&t),
            Some(&posts),
            &[("X-Dbname", "gone")]
        )
        .0,
        200
    );
    let r = replica(&m, "0");
    assert_replica_equals_master(&m, &r, SECRET, "gone", TIMEOUT);
    let file = r.data_dir.join("gone.db");
    assert!(file.exists());
    assert_eq!(
        r.request(
            "GET",
            "/api/collections/posts/records",
            None,
            None,
            &[("X-Dbname", "gone")]
        )
        .0,
        200
    );
    assert_eq!(m.delete("/api/databases/gone", Some(&t)).0, 204);
    assert_eq!(r.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
    assert!(!file.exists(), "the copy's file is deleted");
    let (s, b) = r.request(
        "GET",
        "/api/collections/posts/records",
        None,
        None,
        &[("X-Dbname", "gone")],
    );
    assert_eq!(s, 404, "{b}");
    assert!(r.health()["dbs"].get("gone").is_none(), "{}", r.health());
    assert!(r.log().contains("'gone' was deleted on the master"), "{}", r.log());
    // The other databases are untouched.
    assert_eq!(titles(&r), vec!["first"]);
}

#[test]
fn drift_is_counted_and_shown_not_silently_repaired() {
    let m = master();
    let t = seed(&m);
    assert_eq!(
        m.post("/api/collections/posts/records", None, &json!({"title": "second"}))
            .0,
        200
    );
    let r = replica(&m, "0");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // Someone edits the replica's file behind its back: one row deleted, one changed.
    let mut r = r;
    r.terminate(TIMEOUT);
    {
        let conn = vski::rusqlite::Connection::open(r.data_dir.join("default.db")).unwrap();
        conn.execute("DELETE FROM posts WHERE title = 'first'", []).unwrap();
        conn.execute("UPDATE posts SET title = 'tampered' WHERE title = 'second'", [])
            .unwrap();
    }
    let r = r.restart();
    let first = m.get("/api/collections/posts/records?filter=title='first'", None).1["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = m.patch(
        &format!("/api/collections/posts/records/{first}"),
        None,
        &json!({"n": 2}),
    );
    assert_eq!(s, 200);
    assert_eq!(r.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
    let h = r.health();
    let d = &h["dbs"]["default"];
    assert_eq!(d["conflicts"], 1, "the update of the deleted row: {h}");
    assert_eq!(d["checksumMismatch"], true, "{h}");
    assert!(r.log().contains("drift: conflict"), "{}", r.log());
    assert!(r.log().contains("has another content than the master's"), "{}", r.log());
}

/// Whether `needle` occurs in any file of `dir` whose name starts with `prefix`.
fn files_contain(dir: &std::path::Path, prefix: &str, needle: &[u8]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let name = p.file_name()?.to_str()?.to_string();
            let bytes = std::fs::read(&p).ok()?;
            (name.starts_with(prefix) && bytes.windows(needle.len()).any(|w| w == needle)).then_some(name)
        })
        .collect()
}

#[test]
fn snapshots_and_replica_copies_hold_no_deleted_data() {
    const MARKER: &str = "deleted-secret-7f3a9c1e";
    let m = master();
    let t = seed(&m);
    let r = replica(&m, "0");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let (s, rec) = m.post("/api/collections/posts/records", None, &json!({"title": MARKER}));
    assert_eq!(s, 200);
    assert_eq!(r.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
    assert!(titles(&r).contains(&MARKER.to_string()), "the replica had it");
    let id = rec["id"].as_str().unwrap();
    assert_eq!(m.delete(&format!("/api/collections/posts/records/{id}"), None).0, 204);
    assert_eq!(r.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // The master's own log keeps the pre-image for lagging replicas; a snapshot must not.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap.db");
    let (version, _) = download(&m, &replica_token(SECRET, "scanner"), "default", &snap);
    let bytes = std::fs::read(&snap).unwrap();
    assert!(
        !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the snapshot holds the deleted record"
    );
    let conn = vski::rusqlite::Connection::open(&snap).unwrap();
    let kept: (i64, i64) = conn
        .query_row("SELECT COUNT(*), MAX(version) FROM _changelog", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(kept, (1, version), "only the position is kept");
    // The replica's copy, once closed: the delete was applied over the data, not beside it.
    let mut r = r;
    r.terminate(TIMEOUT);
    let found = files_contain(&r.data_dir, "default.db", MARKER.as_bytes());
    assert!(
        found.is_empty(),
        "the replica's files hold the deleted record: {found:?}"
    );
}

/// Ids of every page of `posts` under `sort`, 40 per page.
fn pages(n: &Node, sort: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for page in 1.. {
        let (s, b) = n.get(
            &format!("/api/collections/posts/records?perPage=40&page={page}&sort={sort}&fields=id"),
            None,
        );
        assert_eq!(s, 200, "{b}");
        let ids: Vec<String> = b["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        if ids.is_empty() {
            break;
        }
        out.push(ids);
    }
    out
}

fn same_pages(m: &Node, r: &Node, sort: &str, when: &str) {
    let (a, b) = (pages(m, sort), pages(r, sort));
    assert_eq!(a.len(), b.len(), "{when}, sort={sort:?}: page counts");
    if let Some(i) = (0..a.len()).find(|i| a[*i] != b[*i]) {
        panic!(
            "{when}, sort={sort:?}: page {} differs between master and replica",
            i + 1
        );
    }
}

#[test]
fn pages_are_the_same_on_master_and_replica_and_after_a_rebootstrap() {
    let m = master();
    seed(&m);
    let r = replica(&m, "1");
    // Concurrent writers: the master commits them in batches, whose changesets the replica
    // applies in its own order.
    let acked = join_acked(write_burst(&m.url, 6, Duration::from_millis(1500)));
    assert!(acked.len() > 100, "{}", acked.len());
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // `n` repeats across writers, so the tie-breaker decides much of this order.
    for sort in ["", "n", "-n", "title"] {
        same_pages(&m, &r, sort, "after a concurrent load");
    }
    let unsorted = pages(&m, "");
    assert_eq!(unsorted.iter().map(Vec::len).sum::<usize>(), acked.len() + 1);
    // The same replica after a fresh bootstrap.
    let mut r = r;
    r.terminate(TIMEOUT);
    for f in ["default.db", "default.db-wal", "default.db-shm"] {
        let _ = std::fs::remove_file(r.data_dir.join(f));
    }
    let r = r.restart();
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    for sort in ["", "n", "-n"] {
        same_pages(&m, &r, sort, "after a re-bootstrap");
    }
}

/// Creates databases `dbs` on the master, each with an open `posts` collection.
fn posts_in(m: &Node, t: &str, dbs: &[&str]) {
    let posts = json!({"name": "posts", "listRule": "", "createRule": "",
                       "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"}]});
    for db in dbs {
        assert_eq!(m.post("/api/databases", Some(t), &json!({"name": db})).0, 201);
        let (s, b) = m.request("POST", "/api/collections", Some(t), Some(&posts), &[("X-Dbname", db)]);
        assert_eq!(s, 200, "{b}");
    }
}

/// Writes `n` records titled `prefix-i`, one after the other, into `posts` of database `quiet`
/// on the master and
/// returns the longest time one took to show on the replica.
fn quiet_write_latency(m: &Node, r: &Node, prefix: &str, n: usize) -> Duration {
    let mut worst = Duration::ZERO;
    for i in 0..n {
        let title = format!("{prefix}-{i}");
        let body = json!({"title": title});
        let (s, b) = m.request(
            "POST",
            "/api/collections/posts/records",
            None,
            Some(&body),
            &[("X-Dbname", "quiet")],
        );
        assert_eq!(s, 200, "{b}");
        let written = std::time::Instant::now();
        wait_for(&format!("{title} on the replica"), TIMEOUT, || {
            let path = format!("/api/collections/posts/records?filter=title='{title}'");
            let (_, b) = r.request("GET", &path, None, None, &[("X-Dbname", "quiet")]);
            (b["totalItems"] == 1).then_some(())
        });
        worst = worst.max(written.elapsed());
    }
    worst
}

#[test]
fn a_busy_database_does_not_hold_up_a_quiet_one() {
    let m = master();
    let t = seed(&m);
    posts_in(&m, &t, &["aaa", "quiet"]);
    let r = replica(&m, "1");
    for db in ["aaa", "quiet"] {
        assert_replica_equals_master(&m, &r, SECRET, db, TIMEOUT);
    }
    // `aaa` (synced first by name) takes sustained writes; `quiet` gets one record at a time.
    let burst = Duration::from_secs(12);
    let started = std::time::Instant::now();
    let busy = write_burst_in(&m.url, "aaa", 6, burst);
    let worst = quiet_write_latency(&m, &r, "quiet", 3);
    let quiet_done = started.elapsed();
    let acked = join_acked(busy);
    assert!(acked.len() > 500, "the busy database was busy: {}", acked.len());
    // A quiet write stuck behind the busy database's pages would wait for the burst to end.
    // Measured against the burst itself, not a clock: the quiet writes all arrived while the
    // busy database was still being written.
    assert!(
        quiet_done < burst,
        "quiet writes done after {quiet_done:?}, the burst lasted {burst:?} (worst {worst:?})"
    );
    for db in ["aaa", "quiet", "default"] {
        assert_replica_equals_master(&m, &r, SECRET, db, TIMEOUT);
    }
}

#[test]
fn a_failing_database_does_not_back_off_the_others() {
    let m = master();
    let t = seed(&m);
    posts_in(&m, &t, &["broken", "quiet"]);
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "broken", TIMEOUT);
    // Break the replica's copy of `broken` so every apply there fails.
    let mut r = r;
    r.terminate(TIMEOUT);
    {
        let conn = vski::rusqlite::Connection::open(r.data_dir.join("broken.db")).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER no_inserts BEFORE INSERT ON posts BEGIN SELECT RAISE(ABORT, 'broken copy'); END",
        )
        .unwrap();
    }
    let r = r.restart();
    // How long a quiet write takes to arrive here with nothing failing: the yardstick.
    let baseline = quiet_write_latency(&m, &r, "before", 3);
    let body = json!({"title": "x", "n": 1});
    assert_eq!(
        m.request(
            "POST",
            "/api/collections/posts/records",
            None,
            Some(&body),
            &[("X-Dbname", "broken")]
        )
        .0,
        200
    );
    let mut last = Value::Null;
    let failed = (0..1500).any(|_| {
        last = r.health();
        std::thread::sleep(Duration::from_millis(20));
        last["dbs"]["broken"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("aborted"))
    });
    assert!(failed, "the broken database does not fail: {last}\n{}", r.log());
    std::thread::sleep(Duration::from_secs(3)); // let the failures pile up (a backoff would now be 8 s)
    let worst = quiet_write_latency(&m, &r, "after", 3);
    // Backed off with the broken database, a write would wait 8 s and more; measured against the
    // same replica's own latency before the failures, not a clock.
    let bound = (baseline * 3).max(baseline + Duration::from_secs(2));
    assert!(
        worst < bound,
        "a write to a healthy database took {worst:?} to arrive (before the failures: {baseline:?})"
    );
    assert_replica_equals_master(&m, &r, SECRET, "quiet", TIMEOUT);
}

/// Peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

#[test]
fn a_60_mb_transaction_is_refused_and_memory_stays_bounded() {
    let m = master();
    let t = m.admin_token();
    let def = json!({"name": "blobs", "fields": [{"name": "body", "type": "text"}]});
    assert_eq!(m.post("/api/collections", Some(&t), &def).0, 200);
    let r = replica(&m, "1");
    // 1,000 records of 60 KB: 60 MB in all.
    let body = "x".repeat(60 * 1024);
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..250)
                        .map(|_| {
                            let (st, b) = m.post("/api/collections/blobs/records", Some(&t), &json!({"body": body}));
                            assert_eq!(st, 200, "{b}");
                            b["id"].as_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_replica_equals_master(&m, &r, SECRET, "default", Duration::from_secs(60));
    println!(
        "after the creates: master {} MiB, replica {} MiB",
        peak_rss_mib(m.pid()),
        peak_rss_mib(r.pid())
    );
    let count = |n: &Node| n.get("/api/collections/blobs/records?perPage=1", Some(&t)).1["totalItems"].clone();
    // All at once: one 60 MB transaction is refused, and nothing changes.
    let (s, b) = m.request(
        "DELETE",
        "/api/collections/blobs/records/bulk",
        Some(&t),
        Some(&json!({"ids": ids})),
        &[],
    );
    assert_eq!(s, 413, "{b}");
    assert!(b["message"].as_str().unwrap().contains("Send fewer ids"), "{b}");
    assert_eq!(count(&m), 1000);
    println!(
        "after the refusal: master {} MiB, replica {} MiB",
        peak_rss_mib(m.pid()),
        peak_rss_mib(r.pid())
    );
    // In requests of 100 (6 MB each) it works, and the replica follows.
    for chunk in ids.chunks(100) {
        let (s, b) = m.request(
            "DELETE",
            "/api/collections/blobs/records/bulk",
            Some(&t),
            Some(&json!({"ids": chunk})),
            &[],
        );
        assert_eq!(s, 200, "{b}");
    }
    assert_eq!(count(&m), 0);
    assert_replica_equals_master(&m, &r, SECRET, "default", Duration::from_secs(60));
    assert_eq!(count(&r), 0);
    let (mm, rm) = (peak_rss_mib(m.pid()), peak_rss_mib(r.pid()));
    println!("peak RSS: master {mm} MiB, replica {rm} MiB");
    assert!(mm < 300 && rm < 300, "peak RSS: master {mm} MiB, replica {rm} MiB");
}

/// The version a replica's copy of `default` records (read from the stopped node's file).
fn stored_version(dir: &std::path::Path) -> i64 {
    let conn = vski::rusqlite::Connection::open(dir.join("default.db")).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    vski::replica::follower::local_state(&conn)
        .unwrap()
        .expect("a position")
        .version
}

/// Runs a replica on `dir` with `VSKI_CRASH_AT=point` until it aborts there.
fn crash_replica_at(m: &Node, dir: &std::path::Path, point: &str) {
    let (code, _, err) = run_cli(
        &[
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            dir.to_str().unwrap(),
        ],
        &[
            ("REPLICA_MODE", "replica"),
            ("MASTER_URL", &m.url),
            ("JWT_SECRET", SECRET),
            ("SYNC_INTERVAL", "0"),
            ("VSKI_CRASH_AT", point),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains(&format!("crash point {point} reached")), "{err}");
}

#[test]
fn a_crash_inside_a_page_or_a_restore_leaves_the_copy_where_it_was() {
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("CHANGELOG_RETENTION_HOURS", "0.0002"),
    );
    seed(&m);
    let tmp = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path().join("data");
    let opts = NodeOptions::default()
        .env("REPLICA_MODE", "replica")
        .env("MASTER_URL", &m.url)
        .env("JWT_SECRET", SECRET)
        .env("SYNC_INTERVAL", "0");
    let mut r = Node::start(dir.clone(), opts.clone(), Some(tmp.clone()));
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    r.terminate(TIMEOUT);
    let before = stored_version(&dir);

    // A page applied and its version set, not committed: the crash leaves the version before it.
    add_titles(&m, "page", 3);
    crash_replica_at(&m, &dir, "apply:before_commit");
    assert_eq!(stored_version(&dir), before, "the interrupted page left nothing");
    let mut r = Node::start(dir.clone(), opts.clone(), Some(tmp.clone()));
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    r.terminate(TIMEOUT);
    let synced = stored_version(&dir);
    let content = checksum_of(&dir.join("default.db"));

    // Away longer than the retention: the next start restores a snapshot, and crashes halfway.
    add_titles(&m, "later", 3);
    wait_for("the master to prune", TIMEOUT, || {
        (master_db_status(&m, SECRET, "default")["minVersion"].as_i64()? > synced + 1).then_some(())
    });
    crash_replica_at(&m, &dir, "restore:mid");
    assert_eq!(
        stored_version(&dir),
        synced,
        "the interrupted restore left the old copy"
    );
    assert_eq!(checksum_of(&dir.join("default.db")), content, "with its old content");
    let r = Node::start(dir.clone(), opts, Some(tmp.clone()));
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(r.health()["dbs"]["default"]["bootstraps"], 1);
}

#[test]
fn a_crash_while_a_first_copy_takes_its_place_leaves_a_replica_that_starts_over() {
    let m = master();
    seed(&m);
    let tmp = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path().join("data");
    // The first copy of `default` replaces the empty file: crash between closing it and the
    // rename. The old file (no position) stays, and the next start downloads again.
    crash_replica_at(&m, &dir, "swap:before_rename");
    let conn = vski::rusqlite::Connection::open(dir.join("default.db")).unwrap();
    assert_eq!(vski::replica::follower::local_state(&conn).unwrap(), None);
    drop(conn);
    let opts = NodeOptions::default()
        .env("REPLICA_MODE", "replica")
        .env("MASTER_URL", &m.url)
        .env("JWT_SECRET", SECRET)
        .env("SYNC_INTERVAL", "0");
    let r = Node::start(dir.clone(), opts, Some(tmp.clone()));
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(titles(&r), vec!["first"]);
}

#[test]
fn reads_on_a_replica_never_go_back_in_time_through_churn_and_kills() {
    let m = master();
    seed(&m);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = churn(m.url.clone(), stop.clone());
    let mut r = replica(&m, "1");
    // A reader polls the replica's position; connection errors (the replica is down) are skipped.
    let url = r.url.clone();
    let observer = replica_token(SECRET, "reader");
    let reading = stop.clone();
    let reader = std::thread::spawn(move || {
        let c = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut seen = Vec::new();
        while !reading.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(resp) = c.get(format!("{url}/health")).bearer_auth(&observer).send() {
                if let Ok(h) = resp.json::<Value>() {
                    if let Some(v) = h["dbs"]["default"]["localVersion"].as_i64() {
                        seen.push(v);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    });
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(700 + 150 * i));
        r.kill();
        r = r.restart(); // the same port: the reader goes on
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.join().unwrap();
    assert!(writer.join().unwrap() > 20);
    assert!(seen.len() > 50, "the reader saw {} positions", seen.len());
    let back = seen.windows(2).find(|w| w[1] < w[0]);
    assert!(back.is_none(), "the replica's version went back: {back:?}");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
}

#[test]
fn a_master_restarted_with_writes_in_flight_is_followed_without_loss() {
    let mut m = master();
    seed(&m);
    let r = replica(&m, "1");
    for graceful in [true, false] {
        let burst = write_burst(&m.url, 4, Duration::from_secs(30));
        let start = master_db_status(&m, SECRET, "default")["version"].as_i64().unwrap();
        wait_for("writes in flight", TIMEOUT, || {
            (master_db_status(&m, SECRET, "default")["version"].as_i64()? > start + 100).then_some(())
        });
        burst.expect_stop();
        if graceful {
            m.terminate(TIMEOUT);
        } else {
            m.kill();
        }
        let acked = join_acked(burst);
        m = m.restart();
        add_titles(&m, if graceful { "after-term" } else { "after-kill" }, 3);
        assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
        let have: std::collections::HashSet<String> = pages(&r, "").into_iter().flatten().collect();
        let missing = acked.iter().filter(|id| !have.contains(*id)).count();
        assert_eq!(
            missing,
            0,
            "graceful={graceful}: {missing} of {} acknowledged writes missing on the replica",
            acked.len()
        );
    }
    assert_eq!(
        r.health()["dbs"]["default"]["bootstraps"],
        1,
        "followed across restarts without a new download"
    );
}

/// The position `by` versions past token `p`, on the same history as far as anyone can tell
/// (the hash of a version nobody has is unknown, so it is left out).
fn ahead_of(p: &str, by: i64) -> String {
    let parts: Vec<&str> = p.split('.').collect();
    format!("{}.{}.{}", parts[0], parts[1], parts[2].parse::<i64>().unwrap() + by)
}

fn position_of(resp: &reqwest::blocking::Response) -> Option<String> {
    resp.headers()
        .get("x-db-position")
        .map(|v| v.to_str().unwrap().to_string())
}

#[test]
fn answers_carry_the_position_of_their_database() {
    let m = master();
    let t = seed(&m);
    let r = replica(&m, "0");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let status = master_db_status(&m, SECRET, "default");
    let epoch = m.get("/api/replica/status", Some(&replica_token(SECRET, "observer"))).1["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let token = |v: i64| format!("{epoch}.{}.{v}", status["uid"].as_str().unwrap());
    // The fourth part names the history: the chained hash of the entry at that version.
    let hashes: std::collections::HashMap<i64, String> =
        changelog(&m, &replica_token(SECRET, "observer"), "default", 0)
            .into_iter()
            .map(|e| (e.version, e.hash[..16].to_string()))
            .collect();
    let token = |v: i64| format!("{}.{}", token(v), hashes.get(&v).cloned().unwrap_or_default());
    let v0 = status["version"].as_i64().unwrap();
    let list = "/api/collections/posts/records";
    // The replica names what it applied; the master its head.
    assert_eq!(
        position_of(&r.http.get(format!("{}{list}", r.url)).send().unwrap()),
        Some(token(v0))
    );
    assert_eq!(
        position_of(&m.http.get(format!("{}{list}", m.url)).send().unwrap()),
        Some(token(v0))
    );
    // A write's answer names the version it committed.
    let resp = m
        .http
        .post(format!("{}{list}", m.url))
        .json(&json!({"title": "new"}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let new_hash = changelog(&m, &replica_token(SECRET, "observer"), "default", v0)[0].hash[..16].to_string();
    let token1 = format!("{epoch}.{}.{}.{new_hash}", status["uid"].as_str().unwrap(), v0 + 1);
    assert_eq!(position_of(&resp), Some(token1.clone()));
    // The replica still names the older version until it syncs, then the same.
    assert_eq!(
        position_of(&r.http.get(format!("{}{list}", r.url)).send().unwrap()),
        Some(token(v0))
    );
    assert_eq!(r.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
    assert_eq!(
        position_of(&r.http.get(format!("{}{list}", r.url)).send().unwrap()),
        Some(token1)
    );
    // Local databases have no position, and neither do endpoints that use none.
    let local = m
        .http
        .get(format!("{}{list}", m.url))
        .header("X-Dbname", "stats")
        .send()
        .unwrap();
    assert_eq!(position_of(&local), None);
    assert_eq!(
        position_of(&m.http.get(format!("{}/health", m.url)).send().unwrap()),
        None
    );
}

#[test]
fn reads_with_a_minimum_position_see_their_write_or_get_504() {
    let m = master();
    seed(&m);
    // A polling replica that would otherwise see writes only every minute.
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "60")
            .env("SYNC_MODE", "poll")
            .env("REPLICA_READ_WAIT_MS", "2000"),
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let list = "/api/collections/posts/records";
    let mut seen = 0;
    for i in 0..100 {
        let resp = m
            .http
            .post(format!("{}{list}", m.url))
            .json(&json!({"title": format!("ryw-{i}")}))
            .send()
            .unwrap();
        let position = position_of(&resp).expect("a position");
        let id = resp.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
        let (s, b) = r.request(
            "GET",
            &format!("{list}/{id}"),
            None,
            None,
            &[("X-Min-Db-Position", &position)],
        );
        if s == 200 && b["title"] == format!("ryw-{i}") {
            seen += 1;
        }
    }
    assert_eq!(seen, 100, "reads that saw their write");
    // A position the master will not reach in time: 504 within the bound, never a hang.
    let ahead = {
        let p = position_of(&m.http.get(format!("{}{list}", m.url)).send().unwrap()).unwrap();
        ahead_of(&p, 1000)
    };
    let other_history = format!("{}.someotheruid.1", ahead.split('.').next().unwrap());
    for token in [ahead.as_str(), other_history.as_str()] {
        let start = std::time::Instant::now();
        let (s, b) = r.request("GET", list, None, None, &[("X-Min-Db-Position", token)]);
        assert_eq!((s, b["message"].as_str()), (504, Some("replica is behind")), "{token}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
            "{token}: {took:?}"
        );
    }
    let (s, _) = r.request("GET", list, None, None, &[("X-Min-Db-Position", "not a position")]);
    assert_eq!(s, 400);
    // The master ignores the header.
    assert_eq!(
        m.request("GET", list, None, None, &[("X-Min-Db-Position", ahead.as_str())])
            .0,
        200
    );
}

#[test]
fn a_forwarding_replica_relays_writes_and_reads_them_back_at_once() {
    let mut m = master();
    let t = seed(&m);
    let def = json!({"name": "notes", "listRule": "", "viewRule": "", "createRule": "@request.auth.id != ''",
                     "fields": [{"name": "body", "type": "text"}]});
    assert_eq!(m.post("/api/collections", Some(&t), &def).0, 200);
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "60")
            .env("REPLICA_WRITES", "forward"),
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // A create through the replica: the master's answer, readable on the replica at once.
    let resp = r
        .http
        .post(format!("{}/api/collections/posts/records", r.url))
        .json(&json!({"title": "forwarded"}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-replica-mode"], "replica");
    let created: Value = resp.json().unwrap();
    let (s, b) = r.get(
        &format!("/api/collections/posts/records/{}", created["id"].as_str().unwrap()),
        None,
    );
    assert_eq!((s, b["title"].as_str()), (200, Some("forwarded")));
    // The master's refusals come back verbatim.
    for (method, path, token, body) in [
        ("POST", "/api/collections/notes/records", None, json!({"body": "guest"})),
        ("POST", "/api/collections/nope/records", None, json!({})),
        (
            "DELETE",
            "/api/collections/posts/records/missing000000",
            None,
            json!({}),
        ),
        ("POST", "/api/collections", None, json!({"name": "x"})),
        (
            "POST",
            "/api/collections",
            Some(t.as_str()),
            json!({"name": "sqlite_x"}),
        ),
    ] {
        let direct = m.request(method, path, token, Some(&body), &[]);
        let relayed = r.request(method, path, token, Some(&body), &[]);
        assert_eq!(relayed, direct, "{method} {path}");
        assert!(direct.0 >= 400, "{method} {path}: {direct:?}");
    }
    // A 9 MB body goes through.
    let big = "b".repeat(9 * 1024 * 1024);
    let (s, b) = r.post("/api/collections/posts/records", None, &json!({"title": big}));
    assert_eq!(s, 200, "{}", b["message"]);
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // A read at a position the replica will not reach in time is answered by the master.
    let ahead = {
        let p = position_of(
            &m.http
                .get(format!("{}/api/collections/posts/records", m.url))
                .send()
                .unwrap(),
        )
        .unwrap();
        ahead_of(&p, 1000)
    };
    let (s, b) = r.request(
        "GET",
        "/api/collections/posts/records?perPage=1",
        None,
        None,
        &[("X-Min-Db-Position", ahead.as_str())],
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["totalItems"],
        m.get("/api/collections/posts/records?perPage=1", None).1["totalItems"]
    );
    // The master down: 502 with the error shape, and reads go on.
    m.kill();
    let (s, b) = r.post("/api/collections/posts/records", None, &json!({"title": "lost"}));
    assert_eq!(s, 502, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("the master cannot be reached"),
        "{b}"
    );
    assert_eq!(r.get("/api/collections/posts/records?perPage=1", None).0, 200);
    // Sign-in stays local.
    let (s, _) = r.post(
        "/api/admins/auth-with-password",
        None,
        &json!({"identity": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    );
    assert_eq!(s, 200);
}

/// A TCP proxy to `upstream` that passes everything through, except that in every response
/// carrying a snapshot (`application/vnd.sqlite3`) it flips one byte, `skip` bytes after the
/// content type. Returns its port.
fn corrupting_proxy(upstream: std::net::SocketAddr, skip: usize) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = std::net::TcpStream::connect(upstream) else {
                return;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let marker = b"application/vnd.sqlite3";
                let mut window: Vec<u8> = Vec::new();
                let mut countdown: Option<usize> = None;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    for b in chunk.iter_mut() {
                        if let Some(left) = countdown {
                            if left == 0 {
                                *b ^= 0x5a;
                                countdown = None;
                            } else {
                                countdown = Some(left - 1);
                            }
                        }
                        window.push(*b);
                        if window.len() > marker.len() {
                            window.remove(0);
                        }
                        if window == marker {
                            countdown = Some(skip);
                        }
                    }
                    if client.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn a_snapshot_damaged_on_the_way_is_refused() {
    let m = master();
    seed(&m);
    let upstream: std::net::SocketAddr = m.url.trim_start_matches("http://").parse().unwrap();
    let port = corrupting_proxy(upstream, 20_000);
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("MASTER_URL", &format!("http://127.0.0.1:{port}"))
            .env("SYNC_INTERVAL", "1")
            .unready(),
    );
    // Every download through the proxy is damaged: the replica refuses each one and never
    // serves the damaged copy.
    let h = wait_error(&r, "sha256 does not match");
    assert_eq!(r.get("/health", None).0, 503, "{h}");
    assert_eq!(r.get("/api/collections/posts/records", None).0, 503);
    // A download a crash interrupted stays behind in `.snapshots`, as large as the database
    // can be; the next start clears it.
    let mut r = r;
    r.kill();
    let leftover = r.data_dir.join(".snapshots").join("download-default-interrupted.db");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, vec![7u8; 1 << 20]).unwrap();
    // Restarted without the proxy: the copy is whole, and the leftover is gone.
    let r = r.restart_with(|o| o.env("MASTER_URL", &m.url));
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert!(!leftover.exists(), "the interrupted download was removed at start");
}

#[test]
fn a_master_directory_started_as_a_replica_is_refused_and_keeps_its_data() {
    // A master with 3 records, stopped; a replica's settings (another master) deployed on its
    // host by mistake.
    let other = master();
    seed(&other);
    let mut m = master();
    seed(&m);
    add_titles(&m, "mine", 2);
    let want = titles(&m);
    assert_eq!(want.len(), 3);
    m.terminate(TIMEOUT);
    let dir = m.data_dir.to_str().unwrap().to_string();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", &dir];
        args.extend_from_slice(extra);
        run_cli(
            &args,
            &[
                ("REPLICA_MODE", "replica"),
                ("MASTER_URL", &other.url),
                ("JWT_SECRET", SECRET),
                ("SYNC_INTERVAL", "1"),
            ],
        )
    };
    let (code, _, err) = serve(&[]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("was last run as a master and holds 3 databases (default, stats, workflows;"),
        "the refusal names the role and what the directory holds: {err}"
    );
    assert!(err.contains("ALLOW_ROLE_CHANGE"), "{err}");
    assert!(!err.contains("no local copy"), "{err}");
    // Nothing was touched: the master starts again with its 3 records.
    let mut m = m.restart();
    assert_eq!(titles(&m), want);
    m.terminate(TIMEOUT);

    // With the override the replica starts from the other master, and the old data is moved
    // aside, whole.
    let r = Node::start(
        m.data_dir.clone(),
        NodeOptions::default()
            .env("REPLICA_MODE", "replica")
            .env("MASTER_URL", &other.url)
            .env("JWT_SECRET", SECRET)
            .env("SYNC_INTERVAL", "1")
            .env("ALLOW_ROLE_CHANGE", "true"),
        None,
    );
    assert_replica_equals_master(&other, &r, SECRET, "default", TIMEOUT);
    assert_eq!(titles(&r), vec!["first"]);
    assert!(r.log().contains("was moved to"), "{}", r.log());
    let aside: Vec<_> = std::fs::read_dir(m.data_dir.join(".role-change"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].file_name().unwrap().to_str().unwrap().starts_with("master-"));
    let conn = vski::rusqlite::Connection::open(aside[0].join("default.db")).unwrap();
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM posts", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 3, "the master's records are kept aside");
}

#[test]
fn a_replica_the_master_refuses_is_not_ready_and_says_why() {
    let m = master();
    let t = seed(&m);
    // A private collection, so a guest and a signed-in admin see different things.
    let (s, b) = m.patch("/api/collections/posts", Some(&t), &json!({"listRule": null}));
    assert_eq!(s, 200, "{b}");
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // Restarted with another secret: it holds data, but the master refuses its token.
    let r = r.restart_with(|o| o.env("JWT_SECRET", "another-secret-0123456789abc").unready());
    let h = wait_for("the replica to stop serving", TIMEOUT, || {
        let (s, h) = r.get("/health", None);
        (s == 503).then_some(h)
    });
    assert!(h["message"].as_str().unwrap().contains("wrong JWT_SECRET"), "{h}");
    assert_eq!(h["ready"], false, "{h}");
    let (s, b) = r.get("/api/collections/posts/records", None);
    assert_eq!(s, 503, "no request is served as if its user were a guest: {b}");
    assert!(b["message"].as_str().unwrap().contains("wrong JWT_SECRET"), "{b}");
    // The right secret again: ready.
    let r = r.restart_with(|o| o.env("JWT_SECRET", SECRET));
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(r.get("/health", None).0, 200);
}

/// `LD_PRELOAD` of Debian's libfaketime, which shifts the wall clock of a process.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_replica_minutes_off_the_masters_clock_syncs_and_one_further_off_says_clock_skew() {
    assert!(
        std::path::Path::new(FAKETIME).exists(),
        "libfaketime (scripts/install-deps installs it)"
    );
    let m = master();
    seed(&m);
    let skewed = |offset: &str| {
        NodeOptions::default()
            .env("SYNC_INTERVAL", "1")
            .env("LD_PRELOAD", FAKETIME)
            .env("FAKETIME", offset)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    };
    // 400 s behind: within the leeway of replica tokens.
    let r = spawn_replica(&m, SECRET, skewed("-400"));
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(r.get("/health", None).0, 200);
    // 15 minutes behind: refused, and the replica says it is the clocks, with both.
    let r = spawn_replica(&m, SECRET, skewed("-900").unready());
    let h = wait_for("the skewed replica to say why", TIMEOUT, || {
        let (s, h) = r.get("/health", None);
        (s == 503 && h["message"].as_str()?.contains("clock skew")).then_some(h)
    });
    let msg = h["message"].as_str().unwrap();
    assert!(
        msg.contains("the master's clock says") && msg.contains("this replica's"),
        "{h}"
    );
    assert!(!msg.contains("JWT_SECRET"), "{h}");
}

/// Creates a record in `posts` on `n`; returns the answer's `X-Db-Position`.
fn create_with_position(n: &Node, title: &str) -> String {
    let resp = n
        .http
        .post(format!("{}/api/collections/posts/records", n.url))
        .json(&json!({"title": title}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    position_of(&resp).expect("X-Db-Position")
}

#[test]
fn a_position_of_a_restored_masters_new_history_is_not_served_from_the_lost_one() {
    let mut m = master();
    let t = seed(&m);
    // Polling with no round for minutes: only the reads' own positions move this replica.
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "300")
            .env("SYNC_MODE", "poll")
            .env("REPLICA_READ_WAIT_MS", "60000"),
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    m.terminate(TIMEOUT);
    let backup = m.data_dir.with_file_name("backup.db");
    std::fs::copy(m.data_dir.join("default.db"), &backup).unwrap();
    let mut m = m.restart();
    add_titles(&m, "lost", 5);
    assert_eq!(r.post("/api/replica/sync", Some(&t), &json!({})).0, 200);
    assert!(titles(&r).contains(&"lost-4".to_string()));
    // Restored from the copy, the master writes under the version numbers of the lost ones.
    m.terminate(TIMEOUT);
    replace_default_db(&m, &backup);
    let m = m.restart();
    let token = create_with_position(&m, "new-0");
    let lost_version = r.replica_version("default");
    let new_version: i64 = token.split('.').nth(2).unwrap().parse().unwrap();
    assert!(new_version < lost_version, "{token} vs {lost_version}");
    // The read waits for the new history (a re-bootstrap) instead of answering from the lost one.
    let resp = r
        .http
        .get(format!("{}/api/collections/posts/records?perPage=100", r.url))
        .header("X-Min-Db-Position", &token)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().unwrap();
    assert_eq!(status, 200, "{body}");
    let got: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["title"].as_str().unwrap())
        .collect();
    assert!(got.contains(&"new-0"), "the read sees the write of its token: {got:?}");
    assert!(
        !got.iter().any(|t| t.starts_with("lost")),
        "nothing of the lost history: {got:?}"
    );
    assert_eq!(r.health()["dbs"]["default"]["bootstraps"], 2);
}

#[test]
fn a_write_forwarded_by_a_polling_replica_is_read_back_there_at_once_in_any_database() {
    let m = master();
    let t = seed(&m);
    posts_in(&m, &t, &["other"]);
    // Polling, with no round for minutes: only the wait for the write's position can bring the
    // write here before the read.
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_MODE", "poll")
            .env("SYNC_INTERVAL", "300")
            .env("REPLICA_READ_WAIT_MS", "30000")
            .env("REPLICA_WRITES", "forward"),
    );
    for db in ["default", "other"] {
        assert_replica_equals_master(&m, &r, SECRET, db, TIMEOUT);
    }
    // The first round may still be finishing (files, the other database) when the versions
    // already agree: wait for its end before taking it as the last one.
    let round = wait_for("the first round to end", TIMEOUT, || {
        let v = r.health()["lastSuccessfulRound"].clone();
        (!v.is_null()).then_some(v)
    });
    for (db, title) in [("default", "fwd-default"), ("other", "fwd-other")] {
        let (s, b) = r.request(
            "POST",
            "/api/collections/posts/records",
            None,
            Some(&json!({"title": title})),
            &[("X-Dbname", db)],
        );
        assert_eq!(s, 200, "{db}: {b}");
        let path = format!("/api/collections/posts/records?filter=title='{title}'");
        let (s, b) = r.request("GET", &path, None, None, &[("X-Dbname", db)]);
        assert_eq!((s, b["totalItems"].as_i64()), (200, Some(1)), "{db}: {b}");
        // Not in the other database.
        let elsewhere = if db == "default" { "other" } else { "default" };
        let (_, b) = r.request("GET", &path, None, None, &[("X-Dbname", elsewhere)]);
        assert_eq!(b["totalItems"].as_i64(), Some(0), "{elsewhere}: {b}");
    }
    assert_eq!(
        r.health()["lastSuccessfulRound"],
        round,
        "a round ran: the position wait was not what brought the writes"
    );
}

fn add_titles_in(m: &Node, db: &str, prefix: &str, n: usize) {
    for i in 0..n {
        let body = json!({"title": format!("{prefix}-{i}")});
        let (s, b) = m.request(
            "POST",
            "/api/collections/posts/records",
            None,
            Some(&body),
            &[("X-Dbname", db)],
        );
        assert_eq!(s, 200, "{b}");
    }
}

#[test]
fn a_database_recreated_under_its_name_while_a_replica_was_stopped_is_bootstrapped_anew() {
    let m = master();
    let t = seed(&m);
    posts_in(&m, &t, &["reborn"]);
    // More writes in the old database than the new one will get: versions alone would say the
    // replica is ahead.
    add_titles_in(&m, "reborn", "old", 6);
    let mut r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "reborn", TIMEOUT);
    assert_eq!(titles_of(&r, "reborn").unwrap().len(), 6);
    r.terminate(TIMEOUT);
    assert_eq!(m.delete("/api/databases/reborn", Some(&t)).0, 204);
    posts_in(&m, &t, &["reborn"]);
    add_titles_in(&m, "reborn", "new", 2);
    let r = r.restart();
    assert_replica_equals_master(&m, &r, SECRET, "reborn", TIMEOUT);
    assert_eq!(
        titles_of(&r, "reborn").unwrap(),
        vec!["new-0", "new-1"],
        "only the new database's data"
    );
    assert_eq!(r.health()["dbs"]["reborn"]["bootstraps"], 1, "{}", r.health());
    assert!(r.log().contains("re-created on the master"), "{}", r.log());
}

#[test]
fn a_replica_says_when_it_caught_up_after_a_bootstrap_and_after_a_restart() {
    let m = master();
    seed(&m);
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let version = r.replica_version("default");
    let line = format!("'default' caught up with the master at version {version}");
    wait_for("the caught-up line", TIMEOUT, || r.log().contains(&line).then_some(()));
    // Said once, not each time it catches up with a new write.
    let (s, b) = m.post("/api/collections/posts/records", None, &json!({"title": "later"}));
    assert_eq!(s, 200, "{b}");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert!(r.replica_version("default") > version);
    assert_eq!(r.log().matches("'default' caught up").count(), 1, "{}", r.log());
    // A restart (a new log) says it again.
    let r = r.restart();
    wait_for("the caught-up line after a restart", TIMEOUT, || {
        r.log()
            .contains("'default' caught up with the master at version")
            .then_some(())
    });
}

/// An HTTP server that is not vski: it answers every request with `status` and an nginx-like
/// `Server` header, as a proxy that refuses `/api/replica/*` does.
fn not_vski(status: u16) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let body = "<html>forbidden</html>";
            let answer = format!(
                "HTTP/1.1 {status} Nope\r\nServer: nginx/1.22.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut conn, answer.as_bytes());
        }
    });
    port
}

#[test]
fn a_replica_pointed_at_a_proxy_or_a_replica_says_what_it_reached() {
    let m = master();
    seed(&m);
    let r1 = replica(&m, "1");
    assert_replica_equals_master(&m, &r1, SECRET, "default", TIMEOUT);
    let at_replica = spawn_replica_of(
        &r1.url,
        SECRET,
        NodeOptions::default().env("SYNC_INTERVAL", "1").unready(),
    );
    let h = wait_error(&at_replica, "reached a replica");
    assert!(
        h["lastError"]
            .as_str()
            .unwrap()
            .contains(&format!("MASTER_URL {} reached a replica", r1.url)),
        "{h}"
    );
    let proxy = format!("http://127.0.0.1:{}", not_vski(403));
    let at_proxy = spawn_replica_of(
        &proxy,
        SECRET,
        NodeOptions::default().env("SYNC_INTERVAL", "1").unready(),
    );
    let h = wait_error(&at_proxy, "it is not a vski node");
    let e = h["lastError"].as_str().unwrap();
    assert!(e.contains("answered 403") && e.contains("Server: nginx/1.22.1"), "{h}");
    assert_eq!(at_proxy.get("/health", None).0, 503);
}

#[test]
fn a_position_cookie_gives_read_your_writes_to_clients_that_send_nothing_back() {
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("POSITION_COOKIE", "on"),
    );
    seed(&m);
    // Polls once a minute: without a position, a read right after a write misses it.
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_MODE", "poll")
            .env("SYNC_INTERVAL", "60"),
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let write = |title: &str| {
        let resp = m
            .http
            .post(format!("{}/api/collections/posts/records", m.url))
            .json(&json!({"title": title}))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let position = resp.headers()["x-db-position"].to_str().unwrap().to_string();
        let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
        let id = resp.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
        (id, position, cookie)
    };
    let read = |id: &str, headers: &[(&str, String)]| {
        let mut rb = r.http.get(format!("{}/api/collections/posts/records/{id}", r.url));
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        rb.send().unwrap().status().as_u16()
    };
    let (id1, p1, cookie) = write("first");
    for part in [
        "vski_position_default=",
        "HttpOnly",
        "SameSite=Lax",
        "Path=/",
        "Max-Age=300",
    ] {
        assert!(cookie.contains(part), "{part} missing from {cookie}");
    }
    assert!(cookie.contains(&p1), "{cookie} holds {p1}");
    let cookie_of = |set: &str| set.split(';').next().unwrap().to_string();
    assert_eq!(read(&id1, &[]), 404, "the replica polls once a minute");
    // The cookie, sent back as a browser would, is a minimum position.
    assert_eq!(read(&id1, &[("Cookie", cookie_of(&cookie))]), 200);
    // The header wins over the cookie.
    let (id2, _, cookie2) = write("second");
    assert_eq!(
        read(
            &id2,
            &[("X-Min-Db-Position", p1.clone()), ("Cookie", cookie_of(&cookie2))]
        ),
        404
    );
    assert_eq!(read(&id2, &[("Cookie", cookie_of(&cookie2))]), 200);
    // A cookie that holds no position is no position (a header would be a 400).
    assert_eq!(read(&id2, &[("Cookie", "vski_position_default=garbage".into())]), 200);
    // Reads set no cookie, and without POSITION_COOKIE writes set none.
    let resp = m
        .http
        .get(format!("{}/api/collections/posts/records", m.url))
        .send()
        .unwrap();
    assert!(resp.headers().get("set-cookie").is_none());
    let plain = master();
    seed(&plain);
    let resp = plain
        .http
        .post(format!("{}/api/collections/posts/records", plain.url))
        .json(&json!({"title": "x"}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers().get("set-cookie").is_none());
}

#[test]
fn role_checks_answer_200_only_on_the_master_or_on_a_ready_replica() {
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("PUBLIC_URL", "https://master.example.com"),
    );
    seed(&m);
    let r = replica(&m, "1");
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let unready = spawn_replica_of(
        &format!("http://127.0.0.1:{}", dead_port()),
        SECRET,
        NodeOptions::default().unready(),
    );
    for (node, name, master, replica) in [
        (&m, "master", 200, 503),
        (&r, "replica", 503, 200),
        (&unready, "unsynced replica", 503, 503),
    ] {
        let (s, b) = node.get("/health/master", None);
        assert_eq!(s, master, "{name} /health/master: {b}");
        let (s, b) = node.get("/health/replica", None);
        assert_eq!(s, replica, "{name} /health/replica: {b}");
    }
    // Every answer names the master as the node knows it.
    assert_eq!(
        m.headers("/api/collections/posts/records")["x-master-url"],
        "https://master.example.com"
    );
    assert_eq!(
        r.headers("/api/collections/posts/records")["x-master-url"],
        m.url.as_str()
    );
}

#[test]
fn a_replica_follows_whichever_listed_url_answers_as_the_master() {
    let m = master();
    seed(&m);
    let r1 = replica(&m, "1");
    assert_replica_equals_master(&m, &r1, SECRET, "default", TIMEOUT);
    // MASTER_URL lists a node that is down, a replica, then the master.
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let list = format!("{dead}, {}, {}", r1.url, m.url);
    let r2 = spawn_replica_of(&list, SECRET, NodeOptions::default().env("SYNC_MODE", "stream"));
    assert_replica_equals_master(&m, &r2, SECRET, "default", TIMEOUT);
    let h = r2.health();
    assert_eq!(h["masterUrl"], m.url.as_str(), "{h}");
    assert_eq!(
        r2.headers("/api/collections/posts/records")["x-master-url"],
        m.url.as_str()
    );
    assert!(
        r2.log().contains(&format!("following the master at {}", m.url)),
        "{}",
        r2.log()
    );
    // And it keeps following it.
    let (s, b) = m.post("/api/collections/posts/records", None, &json!({"title": "after"}));
    assert_eq!(s, 200, "{b}");
    assert_replica_equals_master(&m, &r2, SECRET, "default", TIMEOUT);
    // A list with a malformed entry stops the start.
    let (code, _, err) = run_cli(
        &["serve", "--port", "0", "--data-dir", "/nonexistent-vski"],
        &[
            ("REPLICA_MODE", "replica"),
            ("JWT_SECRET", SECRET),
            ("MASTER_URL", "http://a:1,ftp://b"),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("MASTER_URL") && err.contains("ftp://b"), "{err}");
}
