//! Cron jobs: SQL and HTTP jobs on seconds schedules, persisted across restarts, logged per
//! node, and never run on a replica unless they only touch its own databases. Real processes;
//! the HTTP target is a small server of the test's own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vski_tests::*;

const SECRET: &str = "cron-shared-secret-0123456789";

fn counter(node: &Node, token: &str) -> String {
    let (s, b) = node.post(
        "/api/collections",
        Some(token),
        &json!({"name": "counters", "listRule": "", "viewRule": "", "fields": [{"name": "n", "type": "number"}]}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = node.post("/api/collections/counters/records", Some(token), &json!({"n": 0}));
    assert_eq!(s, 200, "{b}");
    b["id"].as_str().unwrap().to_string()
}

fn n(node: &Node, id: &str) -> i64 {
    node.get(&format!("/api/collections/counters/records/{id}"), None).1["n"]
        .as_i64()
        .unwrap_or(-1)
}

fn runs(node: &Node, token: &str, job: &str) -> Vec<Value> {
    let (s, b) = node.get(&format!("/api/cron/{job}/runs"), Some(token));
    assert_eq!(s, 200, "{b}");
    b.as_array().unwrap().clone()
}

#[test]
fn an_sql_job_runs_survives_a_restart_and_stays_off_replicas() {
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let admin = m.admin_token();
    let id = counter(&m, &admin);
    let job = json!({"name": "tick", "schedule": "* * * * * *", "type": "sql", "sql": "UPDATE counters SET n = n + 1"});
    let (s, b) = m.post("/api/cron", Some(&admin), &job);
    assert_eq!(s, 200, "{b}");
    wait_for("two runs", Duration::from_secs(10), || (n(&m, &id) >= 2).then_some(()));
    let logged = runs(&m, &admin, "tick");
    assert!(logged.len() >= 2, "{logged:?}");
    assert_eq!(logged[0]["outcome"], "ok", "{logged:?}");
    assert_eq!(logged[0]["detail"], "1 rows changed");

    // A replica knows the job but does not run it: the counter moves there only through
    // replication, and the replica logs no run.
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    wait_for("the replica to follow", Duration::from_secs(30), || {
        (n(&r, &id) >= 3).then_some(())
    });
    let (s, jobs) = r.get("/api/cron", Some(&admin));
    assert_eq!(s, 200, "{jobs}");
    assert_eq!(jobs[0]["name"], "tick");
    assert_eq!(jobs[0]["active"], false);
    // A job on a database the replica does not replicate runs on the replica too.
    let local = json!({"name": "local", "schedule": "* * * * * *", "type": "sql", "database": "stats",
                       "sql": "DELETE FROM cron_runs WHERE name = 'nothing'"});
    assert_eq!(m.post("/api/cron", Some(&admin), &local).0, 200);
    wait_for("the local job to run on the replica", Duration::from_secs(20), || {
        (!runs(&r, &admin, "local").is_empty()).then_some(())
    });
    let at = n(&r, &id);
    wait_for("replication to move the counter", Duration::from_secs(10), || {
        (n(&r, &id) > at + 1).then_some(())
    });
    assert!(
        runs(&r, &admin, "tick").is_empty(),
        "the replica ran a job on a replicated database"
    );
    drop(r);

    // Restart: the job is still there and runs again.
    let m = m.restart();
    let (s, jobs) = m.get("/api/cron", Some(&admin));
    assert_eq!(s, 200);
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");
    let before = n(&m, &id);
    wait_for("runs after the restart", Duration::from_secs(10), || {
        (n(&m, &id) >= before + 2).then_some(())
    });

    // Deleting stops it.
    assert_eq!(m.delete("/api/cron/tick", Some(&admin)).0, 204);
    std::thread::sleep(Duration::from_millis(1200));
    let stopped = n(&m, &id);
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(n(&m, &id), stopped, "a deleted job still ran");
    assert_eq!(m.delete("/api/cron/tick", Some(&admin)).0, 404);
}

#[test]
fn bad_jobs_are_refused_and_change_nothing() {
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let admin = m.admin_token();
    counter(&m, &admin);
    let (s, b) = m.post(
        "/api/collections/users/records",
        None,
        &json!({"email": "u@example.com", "password": "password123", "passwordConfirm": "password123"}),
    );
    assert_eq!(s, 200, "{b}");
    let (_, b) = m.post(
        "/api/collections/users/auth-with-password",
        None,
        &json!({"identity": "u@example.com", "password": "password123"}),
    );
    let user = b["token"].as_str().unwrap().to_string();
    let ok = json!({"name": "x", "schedule": "*/5 * * * *", "type": "sql", "sql": "UPDATE counters SET n = 1"});
    assert_eq!(m.post("/api/cron", None, &ok).0, 401);
    assert_eq!(m.post("/api/cron", Some(&user), &ok).0, 403);
    assert_eq!(m.get("/api/cron", Some(&user)).0, 403);
    for (bad, field) in [
        (
            json!({"name": "x", "schedule": "every minute", "type": "sql", "sql": "SELECT 1"}),
            "schedule",
        ),
        (
            json!({"name": "x", "schedule": "61 * * * *", "type": "sql", "sql": "SELECT 1"}),
            "schedule",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "sql", "sql": "UPDATE nope SET n = 1"}),
            "sql",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "sql", "sql": "SELEC 1"}),
            "sql",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "sql", "sql": "DROP TABLE counters"}),
            "sql",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "sql", "sql": "DELETE FROM _changelog"}),
            "sql",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "sql", "sql": "UPDATE counters SET n = 1; PRAGMA journal_mode = delete"}),
            "sql",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "sql", "sql": "SELECT 1", "database": "nope"}),
            "database",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "http", "url": "file:///etc/passwd"}),
            "url",
        ),
        (
            json!({"name": "x", "schedule": "* * * * *", "type": "http", "url": "http://127.0.0.1:9/", "method": "BREW"}),
            "method",
        ),
        (json!({"name": "x", "schedule": "* * * * *", "type": "shell"}), "type"),
        (
            json!({"name": "../x", "schedule": "* * * * *", "type": "sql", "sql": "SELECT 1"}),
            "name",
        ),
    ] {
        let (s, b) = m.post("/api/cron", Some(&admin), &bad);
        assert_eq!(s, 400, "{bad}: {b}");
        assert!(b["data"][field].is_object(), "{bad}: {b}");
    }
    let (s, jobs) = m.get("/api/cron", Some(&admin));
    assert_eq!((s, jobs), (200, json!([])));
}

/// Requests a test server saw: method, `X-Token` header, body.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A local HTTP server that records each request's method, one header and body.
fn target() -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            // A client that stops sending ends this thread instead of holding it forever.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let method = line.split(' ').next().unwrap_or("").to_string();
            let (mut token, mut length) = (String::new(), 0usize);
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((h, ""));
                match k.to_ascii_lowercase().as_str() {
                    "x-token" => token = v.trim().to_string(),
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            log.lock()
                .unwrap()
                .push((method, token, String::from_utf8_lossy(&body).into_owned()));
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

#[test]
fn an_http_job_calls_from_the_master_and_never_from_a_replica() {
    // The test's endpoint is on loopback: the operator's opt-in.
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("CRON_HTTP_ALLOW_LOCAL", "true"),
    );
    let admin = m.admin_token();
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    wait_for("replica ready", Duration::from_secs(30), || {
        (r.get("/health", None).0 == 200).then_some(())
    });
    let (url, seen) = target();
    let job = json!({"name": "ping", "schedule": "* * * * * *", "type": "http", "url": url, "method": "POST",
                     "headers": {"X-Token": "abc"}, "body": "hello"});
    let (s, b) = m.post("/api/cron", Some(&admin), &job);
    assert_eq!(s, 200, "{b}");
    wait_for("the replica to know the job", Duration::from_secs(20), || {
        (r.get("/api/cron", Some(&admin)).1[0]["name"] == "ping").then_some(())
    });
    wait_for("four calls", Duration::from_secs(15), || {
        (seen.lock().unwrap().len() >= 4).then_some(())
    });
    assert_eq!(m.delete("/api/cron/ping", Some(&admin)).0, 204);
    // Every call came from the master: as many as the master logged (a run is logged once its
    // call returned), none logged by the replica.
    wait_for("the last run to be logged", Duration::from_secs(10), || {
        (runs(&m, &admin, "ping").len() == seen.lock().unwrap().len()).then_some(())
    });
    let calls = seen.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .all(|c| *c == ("POST".to_string(), "abc".to_string(), "hello".to_string())),
        "{calls:?}"
    );
    let logged = runs(&m, &admin, "ping");
    assert!(
        logged.iter().all(|r| r["outcome"] == "ok" && r["detail"] == "HTTP 200"),
        "{logged:?}"
    );
    assert_eq!(calls.len(), logged.len(), "calls {calls:?} vs runs {logged:?}");
    assert!(runs(&r, &admin, "ping").is_empty());
    wait_for("the delete to reach the replica", Duration::from_secs(10), || {
        (r.get("/api/cron", Some(&admin)).1 == json!([])).then_some(())
    });
    // A failing endpoint is logged as an error.
    let dead = json!({"name": "dead", "schedule": "* * * * * *", "type": "http", "url": format!("http://127.0.0.1:{}/", free_port())});
    assert_eq!(m.post("/api/cron", Some(&admin), &dead).0, 200);
    wait_for("a failed run", Duration::from_secs(10), || {
        runs(&m, &admin, "dead")
            .first()
            .filter(|r| r["outcome"] == "error")
            .cloned()
    });
}

#[test]
fn cron_sql_cannot_vacuum_load_extensions_or_run_forever() {
    let m = spawn_master_with(NodeOptions::default().env("CRON_SQL_TIMEOUT", "1"));
    let admin = m.admin_token();
    let id = counter(&m, &admin);
    // Refused when saved, not when run.
    for sql in [
        "VACUUM",
        "-- tidy\nVACUUM INTO '/tmp/copy.db'",
        "SELECT load_extension('/tmp/evil.so')",
    ] {
        let job = json!({"name": "bad", "schedule": "* * * * * *", "type": "sql", "sql": sql});
        let (s, b) = m.post("/api/cron", Some(&admin), &job);
        assert_eq!(s, 400, "{sql}: {b}");
        assert_eq!(b["data"]["sql"]["code"], "validation_invalid_sql", "{sql}: {b}");
    }
    assert_eq!(m.get("/api/cron", Some(&admin)).1.as_array().unwrap().len(), 0);
    // A job that never ends is stopped at CRON_SQL_TIMEOUT, its change rolled back, and logged.
    let forever = "UPDATE counters SET n = (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                   SELECT max(x) FROM c)";
    let job = json!({"name": "forever", "schedule": "* * * * * *", "type": "sql", "sql": forever});
    let (s, b) = m.post("/api/cron", Some(&admin), &job);
    assert_eq!(s, 200, "{b}");
    let run = wait_for("a stopped run", Duration::from_secs(60), || {
        runs(&m, &admin, "forever")
            .into_iter()
            .find(|r| r["outcome"] == "error")
    });
    assert!(run["detail"].as_str().unwrap().contains("CRON_SQL_TIMEOUT"), "{run}");
    assert_eq!(n(&m, &id), 0, "the stopped job's change was rolled back");
    // The writer is free again: writes go through.
    assert_eq!(m.delete("/api/cron/forever", Some(&admin)).0, 204);
    let (s, b) = m.patch(
        &format!("/api/collections/counters/records/{id}"),
        Some(&admin),
        &json!({"n": 5}),
    );
    assert_eq!(s, 200, "{b}");
}

#[test]
fn an_http_job_to_this_host_needs_the_operators_opt_in() {
    let m = spawn_master();
    let admin = m.admin_token();
    for url in [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
    ] {
        let job = json!({"name": "local", "schedule": "* * * * * *", "type": "http", "url": url});
        let (s, b) = m.post("/api/cron", Some(&admin), &job);
        assert_eq!(s, 400, "{url}: {b}");
        assert_eq!(b["data"]["url"]["code"], "validation_local_url", "{url}: {b}");
    }
    let job = json!({"name": "remote", "schedule": "0 0 1 1 *", "type": "http", "url": "https://example.com/hook"});
    assert_eq!(m.post("/api/cron", Some(&admin), &job).0, 200);
}
