//! Webhooks: collection triggers delivered to a local HTTP server of the test's own, with
//! retries, a restart in the middle, signatures and idempotency keys, and silence on replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vski_tests::*;

const SECRET: &str = "webhooks-shared-secret-0123456789";

/// One request the test server received.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    headers: BTreeMap<String, String>,
    body: String,
    answered: u16,
}

/// A local endpoint: answers 500 while `failures` is above 0 (counting down; -1 = always),
/// then 200, and records every request.
struct Endpoint {
    url: String,
    failures: Arc<AtomicI64>,
    hits: Arc<Mutex<Vec<Hit>>>,
    /// A request whose body contains this text is recorded (answered 0) and then held
    /// unanswered until the text changes.
    hold: Arc<Mutex<Option<String>>>,
}

impl Endpoint {
    fn start() -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let failures = Arc::new(AtomicI64::new(0));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let hold: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let (f, h, hd) = (failures.clone(), hits.clone(), hold.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                // A client that stops sending ends this thread instead of holding it forever.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                let (f, h, hd) = (f.clone(), h.clone(), hd.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut headers = BTreeMap::new();
                        loop {
                            let mut l = String::new();
                            reader.read_line(&mut l).unwrap();
                            let l = l.trim_end();
                            if l.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = l.split_once(':') {
                                headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
                            }
                        }
                        let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).unwrap();
                        let body_text = String::from_utf8_lossy(&body).into_owned();
                        let held = |hd: &Mutex<Option<String>>| {
                            hd.lock()
                                .unwrap()
                                .as_ref()
                                .is_some_and(|n| body_text.contains(n.as_str()))
                        };
                        // A held request is recorded at once; its answer, if it comes, is
                        // written into the same hit.
                        let mut held_at = None;
                        if held(&hd) {
                            let mut hits = h.lock().unwrap();
                            hits.push(Hit {
                                at: Instant::now(),
                                headers: headers.clone(),
                                body: body_text.clone(),
                                answered: 0,
                            });
                            held_at = Some(hits.len() - 1);
                            drop(hits);
                            while held(&hd) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                        let left = f.load(Ordering::SeqCst);
                        let answered = if left != 0 {
                            if left > 0 {
                                f.fetch_sub(1, Ordering::SeqCst);
                            }
                            500
                        } else {
                            200
                        };
                        match held_at {
                            Some(i) => h.lock().unwrap()[i].answered = answered,
                            None => h.lock().unwrap().push(Hit {
                                at: Instant::now(),
                                headers,
                                body: body_text,
                                answered,
                            }),
                        }
                        let reply = format!("HTTP/1.1 {answered} X\r\nContent-Length: 0\r\n\r\n");
                        if stream.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Endpoint {
            url,
            failures,
            hits,
            hold,
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Keys of the deliveries answered 200.
    fn delivered(&self) -> Vec<String> {
        self.hits()
            .iter()
            .filter(|h| h.answered == 200)
            .map(|h| h.headers["idempotency-key"].clone())
            .collect()
    }
}

fn posts_with_triggers(node: &Node, token: &str, triggers: Value) {
    let (s, b) = node.post(
        "/api/collections",
        Some(token),
        &json!({"name": "posts", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "title", "type": "text", "max": 20}], "triggers": triggers}),
    );
    assert_eq!(s, 200, "{b}");
}

fn logs(node: &Node, token: &str) -> Vec<Value> {
    let (s, b) = node.get("/api/webhooks/logs?limit=1000", Some(token));
    assert_eq!(s, 200, "{b}");
    b.as_array().unwrap().clone()
}

#[test]
fn triggers_deliver_signed_events_with_idempotency_keys() {
    let hook = Endpoint::start();
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let admin = m.admin_token();
    posts_with_triggers(
        &m,
        &admin,
        json!([
            {"action": "create", "url": hook.url, "secret": "s3cret", "headers": {"X-Custom": "yes"}},
            {"action": "update", "url": hook.url, "method": "PUT"},
            {"action": "delete", "url": hook.url},
            {"action": "delete", "url": hook.url, "enabled": false}
        ]),
    );
    let (s, col) = m.get("/api/collections/posts", Some(&admin));
    assert_eq!(s, 200);
    assert_eq!(col["triggers"].as_array().unwrap().len(), 4, "{col}");
    let (_, rec) = m.post("/api/collections/posts/records", None, &json!({"title": "hello"}));
    let id = rec["id"].as_str().unwrap().to_string();
    // A write that fails validation commits nothing and sends nothing.
    let (s, _) = m.post(
        "/api/collections/posts/records",
        None,
        &json!({"title": "x".repeat(50)}),
    );
    assert_eq!(s, 400);
    m.patch(
        &format!("/api/collections/posts/records/{id}"),
        None,
        &json!({"title": "edited"}),
    );
    assert_eq!(m.delete(&format!("/api/collections/posts/records/{id}"), None).0, 204);
    wait_for("three deliveries", Duration::from_secs(10), || {
        (hook.hits().len() >= 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let hits = hook.hits();
    assert_eq!(hits.len(), 3, "{hits:#?}");
    let bodies: Vec<Value> = hits.iter().map(|h| serde_json::from_str(&h.body).unwrap()).collect();
    let events: Vec<(&str, &str)> = bodies
        .iter()
        .map(|b| (b["event"].as_str().unwrap(), b["record"]["title"].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [("create", "hello"), ("update", "edited"), ("delete", "edited")]
    );
    for (h, b) in hits.iter().zip(&bodies) {
        assert_eq!(b["record"]["id"], id.as_str());
        assert_eq!(b["collection"], "posts");
        assert_eq!(h.headers["idempotency-key"], b["id"].as_str().unwrap());
        assert_eq!(h.headers["content-type"], "application/json");
    }
    assert_eq!(hits[0].headers["x-vski-event"], "posts.create");
    assert_eq!(hits[0].headers["x-custom"], "yes");
    let signature = &hits[0].headers["x-vski-signature"];
    assert!(
        vski::webhooks::verify("s3cret", hits[0].body.as_bytes(), signature),
        "{signature}"
    );
    assert!(!vski::webhooks::verify("other", hits[0].body.as_bytes(), signature));
    assert!(!hits[1].headers.contains_key("x-vski-signature"));
    let keys: BTreeSet<&String> = hits.iter().map(|h| &h.headers["idempotency-key"]).collect();
    assert_eq!(keys.len(), 3);
    let log = logs(&m, &admin);
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.iter().all(|l| l["outcome"] == "delivered" && l["status"] == 200));
    assert_eq!(logs(&m, &admin)[0]["action"], "delete");

    // Bad triggers are refused with 400 and change nothing.
    for bad in [
        json!([{"action": "explode", "url": hook.url}]),
        json!([{"action": "create", "url": "ftp://x"}]),
        json!([{"action": "create", "url": hook.url, "retryLimit": 1000}]),
        json!([{"action": "create", "url": hook.url, "method": "BREW"}]),
        json!([{"action": "create", "url": hook.url, "surprise": 1}]),
        json!("nope"),
    ] {
        let (s, b) = m.patch("/api/collections/posts", Some(&admin), &json!({"triggers": bad}));
        assert_eq!(s, 400, "{bad}: {b}");
    }
    assert_eq!(
        m.get("/api/collections/posts", Some(&admin)).1["triggers"],
        col["triggers"]
    );
    assert_eq!(m.get("/api/webhooks/logs", None).0, 401);
}

#[test]
fn a_failing_endpoint_is_retried_with_backoff_and_a_restart_loses_no_delivery() {
    let hook = Endpoint::start();
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("WEBHOOK_RETRY_BASE_MS", "200"),
    );
    let admin = m.admin_token();
    posts_with_triggers(
        &m,
        &admin,
        json!([{"action": "create", "url": hook.url, "retryLimit": 10}]),
    );

    // Three failures, then success: four attempts, with growing gaps.
    hook.failures.store(3, Ordering::SeqCst);
    m.post("/api/collections/posts/records", None, &json!({"title": "retried"}));
    wait_for("the fourth attempt", Duration::from_secs(15), || {
        (hook.delivered().len() == 1).then_some(())
    });
    let hits = hook.hits();
    assert_eq!(hits.len(), 4, "{hits:#?}");
    assert!(
        hits.iter()
            .all(|h| h.headers["idempotency-key"] == hits[0].headers["idempotency-key"])
    );
    let attempts: Vec<&str> = hits.iter().map(|h| h.headers["x-vski-attempt"].as_str()).collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    // Retry n waits between half and all of 200 ms · 2^(n-1).
    for (n, pair) in hits.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        let full = Duration::from_millis(200 << n);
        assert!(gap >= full / 2, "retry {}: {gap:?} < {:?}", n + 1, full / 2);
    }
    let outcomes: Vec<String> = logs(&m, &admin)
        .iter()
        .rev()
        .map(|l| l["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["retrying", "retrying", "retrying", "delivered"]);

    // The endpoint is down; five creates queue up, the master is killed and restarted, and
    // once the endpoint is back every delivery arrives exactly once.
    hook.failures.store(-1, Ordering::SeqCst);
    let mut ids = BTreeSet::new();
    for i in 0..5 {
        let (s, b) = m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": format!("queued {i}")}),
        );
        assert_eq!(s, 200);
        ids.insert(b["id"].as_str().unwrap().to_string());
    }
    wait_for("first attempts", Duration::from_secs(10), || {
        (hook.hits().len() >= 4 + 5).then_some(())
    });
    let mut m = m;
    m.kill();
    let m = m.restart();
    hook.failures.store(0, Ordering::SeqCst);
    wait_for("all five delivered", Duration::from_secs(30), || {
        (hook.delivered().len() == 6).then_some(())
    });
    std::thread::sleep(Duration::from_millis(800));
    let delivered = hook.delivered();
    assert_eq!(delivered.len(), 6, "a delivery was repeated after success");
    let records: BTreeSet<String> = hook
        .hits()
        .iter()
        .filter(|h| h.answered == 200)
        .map(|h| {
            serde_json::from_str::<Value>(&h.body).unwrap()["record"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        ids.is_subset(&records),
        "lost: {:?}",
        ids.difference(&records).collect::<Vec<_>>()
    );

    // A trigger with retryLimit 1 gives up after two attempts.
    let (s, b) = m.patch(
        "/api/collections/posts",
        Some(&admin),
        &json!({"triggers": [{"action": "create", "url": hook.url, "retryLimit": 1}]}),
    );
    assert_eq!(s, 200, "{b}");
    hook.failures.store(-1, Ordering::SeqCst);
    let before = hook.hits().len();
    m.post("/api/collections/posts/records", None, &json!({"title": "doomed"}));
    wait_for("a failed delivery", Duration::from_secs(10), || {
        logs(&m, &admin).first().filter(|l| l["outcome"] == "failed").cloned()
    });
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(hook.hits().len(), before + 2, "retryLimit 1 means two attempts");
}

#[test]
fn a_replica_sends_no_webhooks() {
    let hook = Endpoint::start();
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let admin = m.admin_token();
    posts_with_triggers(&m, &admin, json!([{"action": "create", "url": hook.url}]));
    // Pending deliveries on the master when the replica bootstraps: they stay the master's.
    hook.failures.store(-1, Ordering::SeqCst);
    for i in 0..3 {
        m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": format!("p{i}")}),
        );
    }
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    wait_converged(&m, &r, SECRET, "default", Duration::from_secs(30));
    hook.failures.store(0, Ordering::SeqCst);
    for i in 0..3 {
        m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": format!("q{i}")}),
        );
    }
    wait_converged(&m, &r, SECRET, "default", Duration::from_secs(30));
    wait_for("six deliveries", Duration::from_secs(30), || {
        (hook.delivered().len() == 6).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    // Exactly one delivery per record, all from the master: it logged every attempt, the
    // replica none.
    assert_eq!(hook.delivered().len(), 6);
    assert_eq!(hook.hits().len(), logs(&m, &admin).len());
    assert!(logs(&r, &admin).is_empty());
}

/// The record title in a delivery's body.
fn title_of(hit: &Hit) -> String {
    serde_json::from_str::<Value>(&hit.body).unwrap()["record"]["title"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_kill_while_the_endpoint_holds_its_answer_repeats_only_that_delivery_with_its_key() {
    let hook = Endpoint::start();
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let admin = m.admin_token();
    posts_with_triggers(&m, &admin, json!([{"action": "update", "url": hook.url}]));
    let (s, b) = m.post("/api/collections/posts/records", None, &json!({"title": "t0"}));
    assert_eq!(s, 200, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let update = |title: &str| {
        let (s, b) = m.patch(
            &format!("/api/collections/posts/records/{id}"),
            None,
            &json!({"title": title}),
        );
        assert_eq!(s, 200, "{b}");
    };
    // The first delivery is held while three more updates of the record queue up; the next pass
    // then sends those three one after another, and the endpoint holds the last of them.
    *hook.hold.lock().unwrap() = Some("\"t1\"".into());
    update("t1");
    wait_for("the first delivery to arrive", Duration::from_secs(30), || {
        (hook.hits().len() == 1).then_some(())
    });
    for t in ["t2", "t3", "t4"] {
        update(t);
    }
    *hook.hold.lock().unwrap() = Some("\"t4\"".into());
    wait_for("the last delivery to be held", Duration::from_secs(30), || {
        hook.hits()
            .iter()
            .any(|h| title_of(h) == "t4" && h.answered == 0)
            .then_some(())
    });
    // The master dies while the endpoint holds its answer: t2 and t3 were answered 200 already.
    let mut m = m;
    m.kill();
    *hook.hold.lock().unwrap() = None;
    let m = m.restart();
    wait_for("t4 to be delivered again", Duration::from_secs(30), || {
        (hook.hits().iter().filter(|h| title_of(h) == "t4").count() >= 2).then_some(())
    });
    let hits = hook.hits();
    let by_title = |t: &str| hits.iter().filter(|h| title_of(h) == t).collect::<Vec<_>>();
    // At least once: the delivery in flight at the kill comes again, with the same key, and is
    // the only one that does.
    let t4 = by_title("t4");
    assert!(
        t4.iter()
            .all(|h| h.headers["idempotency-key"] == t4[0].headers["idempotency-key"]),
        "{t4:#?}"
    );
    for t in ["t1", "t2", "t3"] {
        assert_eq!(
            by_title(t).len(),
            1,
            "{t} was delivered once, before the kill: {hits:#?}"
        );
    }
    drop(m);
}
