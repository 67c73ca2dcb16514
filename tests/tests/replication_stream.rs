//! Stream mode: a replica holds one long-poll to the master for all its databases and applies a
//! write the moment it commits. Real master and replica processes on loopback.

use std::time::{Duration, Instant};

use vski_tests::*;

const SECRET: &str = "stream-shared-secret-0123456789";
const TIMEOUT: Duration = Duration::from_secs(30);

/// [`assert_replica_equals_master`], printing both logs when it fails.
fn converged(m: &Node, r: &Node) {
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_replica_equals_master(m, r, SECRET, "default", Duration::from_secs(60))
    }));
    if let Err(e) = ok {
        eprintln!("--- master log\n{}\n--- replica log\n{}", m.log(), r.log());
        std::panic::resume_unwind(e);
    }
}

fn master() -> Node {
    spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET))
}

/// A streaming replica whose safety round comes only every minute: anything it sees sooner
/// came through the stream.
fn streaming_replica(m: &Node) -> Node {
    spawn_replica(
        m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "60")
            .env("SYNC_MODE", "stream"),
    )
}

fn create_posts(m: &Node, token: &str, db: &str) {
    let (s, b) = m.request(
        "POST",
        "/api/collections",
        Some(token),
        Some(
            &json!({"name": "posts", "listRule": "", "viewRule": "", "createRule": "",
                     "fields": [{"name": "title", "type": "text"}]}),
        ),
        &[("X-Dbname", db)],
    );
    assert_eq!(s, 200, "{b}");
}

/// The master's entry for replica `id` in `/api/replica/replicas`.
fn replica_entry(m: &Node, admin: &str, id: &str) -> Value {
    let (s, b) = m.get("/api/replica/replicas", Some(admin));
    assert_eq!(s, 200, "{b}");
    b.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_streaming_replica_shows_writes_within_milliseconds() {
    let m = master();
    let admin = m.admin_token();
    create_posts(&m, &admin, "default");
    let r = streaming_replica(&m);
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(r.health()["syncMode"], "stream");
    let id = r.health()["replicaId"].as_str().unwrap().to_string();
    wait_for("the master to see the held stream", TIMEOUT, || {
        let e = replica_entry(&m, &admin, &id);
        (e["heldStreams"] == 1 && e["syncMode"] == "stream").then_some(())
    });

    // Writes a few ms apart, each looked for on the replica until it is there. No safety
    // round may run meanwhile (the first one ran at start, the next is a minute away), so
    // whatever arrives came through the stream.
    let round = r.health()["lastSuccessfulRound"].clone();
    assert!(round.is_string(), "{}", r.health());
    let mut lag = Vec::new();
    for i in 0..100 {
        let (s, b) = m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": format!("s{i}")}),
        );
        assert_eq!(s, 200, "{b}");
        let acked = Instant::now();
        let path = format!("/api/collections/posts/records/{}", b["id"].as_str().unwrap());
        wait_for("the write on the replica", TIMEOUT, || {
            (r.get(&path, None).0 == 200).then_some(())
        });
        lag.push(acked.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    lag.sort();
    let (p50, max) = (lag[lag.len() / 2], lag[lag.len() - 1]);
    // No time bound here (a loaded machine could miss any): the speed figures come from
    // `tests/bench --suite replica`. What the test proves is the path: no round ran.
    eprintln!("stream lag over 100 writes: p50 {p50:?}, max {max:?}");
    assert_eq!(
        r.health()["lastSuccessfulRound"],
        round,
        "a round ran: the test proves nothing"
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(r.health()["dbs"]["default"]["lagMs"], 0);
}

#[test]
fn the_stream_endpoint_is_for_replicas_only() {
    let m = master();
    let admin = m.admin_token();
    let (s, _) = m.get("/api/replica/stream", None);
    assert_eq!(s, 401);
    let (s, _) = m.get("/api/replica/stream", Some(&admin));
    assert_eq!(s, 403);
    let (s, b) = m.post(
        "/api/collections/users/records",
        None,
        &json!({"email": "u@example.com", "password": "password123", "passwordConfirm": "password123"}),
    );
    assert_eq!(s, 200, "{b}");
    let (_, a) = m.post(
        "/api/collections/users/auth-with-password",
        None,
        &json!({"identity": "u@example.com", "password": "password123"}),
    );
    let (s, _) = m.get("/api/replica/stream", a["token"].as_str());
    assert_eq!(s, 403, "a user token");
    // A replica token: no cursor means "everything", answered at once.
    let token = replica_token(SECRET, "probe");
    let (s, b) = m.get("/api/replica/stream", Some(&token));
    assert_eq!(s, 200, "{b}");
    assert!(
        b["dbs"].as_array().unwrap().iter().any(|d| d["name"] == "default"),
        "{b}"
    );
    // With the cursor it got, nothing has moved: held until the wait runs out.
    let next = b["next"].as_str().unwrap().to_string();
    let start = Instant::now();
    let (s, b) = m.get(&format!("/api/replica/stream?since={next}&wait=1"), Some(&token));
    assert_eq!((s, b["dbs"].as_array().map(Vec::len)), (200, Some(0)), "{b}");
    assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
    let (s, _) = m.get("/api/replica/stream?wait=soon", Some(&token));
    assert_eq!(s, 400);
    // A commit answers a held request at once, naming the database that moved.
    let url = format!("{}/api/replica/stream?since={next}", m.url);
    let held = std::thread::spawn(move || {
        let start = Instant::now();
        let b: Value = reqwest::blocking::Client::new()
            .get(url)
            .bearer_auth(token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        (b, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    create_posts(&m, &admin, "default");
    let (b, took) = held.join().unwrap();
    // The commit answered it, not the 25 s hold running out (that answer names no database).
    eprintln!("a held stream request answered {took:?} after it was sent");
    let names: Vec<&str> = b["dbs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default"], "{b}");
}

#[test]
fn a_replica_of_fifty_databases_holds_one_stream_and_few_connections() {
    let m = master();
    let admin = m.admin_token();
    let names: Vec<String> = (0..50).map(|i| format!("tenant{i:02}")).collect();
    for n in &names {
        let (s, b) = m.post("/api/databases", Some(&admin), &json!({"name": n}));
        assert!(s == 200 || s == 201, "{s} {b}");
        create_posts(&m, &admin, n);
    }
    let r = streaming_replica(&m);
    wait_for("50 databases on the replica", Duration::from_secs(60), || {
        let h = r.health();
        names
            .iter()
            .all(|n| h["dbs"][n]["lastSync"].is_string() && h["dbs"][n]["lag"] == 0)
            .then_some(())
    });
    let id = r.health()["replicaId"].as_str().unwrap().to_string();
    // A write to every database, three times over, arrives through the one stream.
    for round in 0..3 {
        let mut ids = Vec::new();
        for n in &names {
            let (s, b) = m.request(
                "POST",
                "/api/collections/posts/records",
                None,
                Some(&json!({"title": format!("{n}-{round}")})),
                &[("X-Dbname", n)],
            );
            assert_eq!(s, 200, "{b}");
            ids.push((n.clone(), b["id"].as_str().unwrap().to_string()));
        }
        for (n, rid) in &ids {
            wait_for("the write on the replica", TIMEOUT, || {
                let (s, _) = r.request(
                    "GET",
                    &format!("/api/collections/posts/records/{rid}"),
                    None,
                    None,
                    &[("X-Dbname", n)],
                );
                (s == 200).then_some(())
            });
        }
    }
    let entry = replica_entry(&m, &admin, &id);
    assert_eq!(entry["heldStreams"], 1, "{entry}");
    // The stream, plus at most a few pooled connections for fetching pages (4 databases are
    // synced at once), never one per database.
    let conns = connections_to(r.pid(), m.port());
    assert!(
        (1..=6).contains(&conns),
        "{conns} connections from the replica to the master"
    );
    for n in &names {
        wait_converged(&m, &r, SECRET, n, TIMEOUT);
    }
}

/// Every record id in `posts` of `default` on `n`, sorted (all pages).
fn all_ids(n: &Node) -> Vec<String> {
    let mut ids = Vec::new();
    for page in 1.. {
        let (s, b) = n.get(
            &format!("/api/collections/posts/records?perPage=500&page={page}&sort=id"),
            None,
        );
        assert_eq!(s, 200, "{b}");
        let items = b["items"].as_array().unwrap();
        ids.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_string()));
        if items.len() < 500 {
            break;
        }
    }
    ids
}

#[test]
fn streaming_survives_kills_of_master_and_replica_without_loss_or_duplicates() {
    let mut m = master();
    let admin = m.admin_token();
    create_posts(&m, &admin, "default");
    let mut r = streaming_replica(&m);
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    // Every write acknowledged in any round, the rounds that kill the master included.
    let mut acked: Vec<String> = Vec::new();
    for round in 0..4 {
        let burst = write_burst(&m.url, 4, Duration::from_millis(800));
        std::thread::sleep(Duration::from_millis(300));
        if round % 2 == 0 {
            r.kill();
            r = r.restart();
            acked.extend(join_acked(burst));
        } else {
            // kill -9 of the master mid-stream, then the same data directory again.
            burst.expect_stop();
            m.kill();
            acked.extend(join_acked(burst));
            m = m.restart();
        }
        converged(&m, &r);
        // Every acknowledged write so far is on both, exactly once, and nothing else is.
        let (on_master, on_replica) = (all_ids(&m), all_ids(&r));
        assert_eq!(
            on_replica, on_master,
            "round {round}: the replica differs from the master"
        );
        let missing: Vec<&String> = acked.iter().filter(|id| !on_master.contains(*id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged writes lost: {missing:?}"
        );
        let unique: std::collections::BTreeSet<&String> = acked.iter().collect();
        assert_eq!(unique.len(), acked.len(), "round {round}: an id acknowledged twice");
    }
    // After the kills the replica streams again: a new write arrives long before a round.
    let (s, b) = m.post("/api/collections/posts/records", None, &json!({"title": "after"}));
    assert_eq!(s, 200);
    let path = format!("/api/collections/posts/records/{}", b["id"].as_str().unwrap());
    wait_for("a write after the kills", Duration::from_secs(10), || {
        (r.get(&path, None).0 == 200).then_some(())
    });
    // A master stops cleanly with a replica's request held open.
    assert_eq!(m.terminate(TIMEOUT), Some(0));
}

#[test]
fn polling_stays_available_and_holds_no_stream() {
    let m = master();
    let admin = m.admin_token();
    create_posts(&m, &admin, "default");
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "1")
            .env("SYNC_MODE", "poll"),
    );
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    assert_eq!(r.health()["syncMode"], "poll");
    let (s, b) = m.post("/api/collections/posts/records", None, &json!({"title": "polled"}));
    assert_eq!(s, 200);
    assert_replica_equals_master(&m, &r, SECRET, "default", TIMEOUT);
    let path = format!("/api/collections/posts/records/{}", b["id"].as_str().unwrap());
    assert_eq!(r.get(&path, None).0, 200);
    let id = r.health()["replicaId"].as_str().unwrap().to_string();
    let e = replica_entry(&m, &admin, &id);
    assert_eq!(
        (e["heldStreams"].as_u64(), e["syncMode"].as_str()),
        (Some(0), Some("poll")),
        "{e}"
    );
}

/// A master with `posts`, a proxy in front of it, and a streaming replica behind the proxy
/// that has caught up (see [`replica_behind`]).
fn master_proxy_replica() -> (Node, FaultProxy, Node) {
    let m = master();
    let t = m.admin_token();
    create_posts(&m, &t, "default");
    let proxy = FaultProxy::start(&m.url);
    let r = replica_behind(&proxy);
    converged(&m, &r);
    (m, proxy, r)
}

/// A streaming replica of `m` that reaches it through `proxy`, with its safety round only every
/// 5 minutes: whatever it gets sooner came through the stream or its retries.
fn replica_behind(proxy: &FaultProxy) -> Node {
    spawn_replica_of(
        &proxy.url(),
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "300")
            .env("SYNC_MODE", "stream"),
    )
}

fn add_post(m: &Node, title: &str) -> String {
    let (s, b) = m.post("/api/collections/posts/records", None, &json!({"title": title}));
    assert_eq!(s, 200, "{b}");
    b["id"].as_str().unwrap().to_string()
}

#[test]
fn a_failed_stream_sync_is_retried_on_the_backoff_not_at_the_next_round() {
    let (m, proxy, r) = master_proxy_replica();
    // The sync this write wakes gets one 503; the next safety round is minutes away.
    proxy.fail_next("/api/replica/changesets", 503, 1);
    let id = add_post(&m, "after a 503");
    wait_for("the injected 503", TIMEOUT, || (proxy.injected() == 1).then_some(()));
    wait_for("the write to arrive on the retry", TIMEOUT, || {
        (r.get(&format!("/api/collections/posts/records/{id}"), None).0 == 200).then_some(())
    });
    assert!(r.log().contains("sync of 'default' failed"), "{}", r.log());
}

#[test]
fn a_frozen_link_makes_a_streaming_replica_stale_within_seconds() {
    let (m, proxy, r) = master_proxy_replica();
    let h = r.health();
    assert_eq!(
        (h["stale"].clone(), h["streamBroken"].clone()),
        (json!(false), json!(false)),
        "{h}"
    );

    proxy.freeze();
    let frozen_at = Instant::now();
    for i in 0..20 {
        add_post(&m, &format!("unseen {i}"));
    }
    // Noticed within STREAM_SILENCE (4.5 s) of the last answer, which came at most STREAM_HOLD
    // (2 s) before the freeze; the deadline only keeps a broken build from hanging.
    let h = wait_for("the replica to report the silent stream", TIMEOUT, || {
        let h = r.health();
        (h["stale"] == true).then_some(h)
    });
    let noticed = frozen_at.elapsed();
    assert_eq!(h["streamBroken"], true, "{h}");
    assert!(
        h["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("no answer from the master"),
        "{h}"
    );
    // From then on the lag in time grows with the silence.
    let lag1 = h["dbs"]["default"]["lagMs"].as_u64().unwrap();
    assert!(lag1 > 0, "{h}");
    let h2 = wait_for("lagMs to grow", TIMEOUT, || {
        let h2 = r.health();
        (h2["dbs"]["default"]["lagMs"].as_u64()? > lag1 + 500).then_some(h2)
    });
    assert_eq!(h2["stale"], true, "{h2}");
    eprintln!("frozen link noticed after {noticed:?}");

    proxy.thaw();
    converged(&m, &r);
    let h = wait_for("the stream to work again", TIMEOUT, || {
        let h = r.health();
        (h["stale"] == false && h["streamBroken"] == false).then_some(h)
    });
    assert_eq!(h["dbs"]["default"]["lagMs"], 0, "{h}");
}
