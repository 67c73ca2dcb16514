//! Realtime over WebSocket and PocketBase's Server-Sent Events, on a master and on replicas:
//! events from committed changes, rules per subscriber, bounded buffers. Real processes on
//! loopback; the WebSocket client is tungstenite.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::Message;
use vski_tests::*;

const SECRET: &str = "realtime-shared-secret-0123456789";
const WAIT: Duration = Duration::from_secs(10);

/// An SSE client reading on its own thread: `(event, data, arrival)` arrive on `events`.
struct Sse {
    id: String,
    events: mpsc::Receiver<SseEvent>,
}

fn sse(node: &Node, db: &str) -> Sse {
    let (id, events) = sse_stream(&format!("{}/api/realtime?db={db}", node.url));
    Sse { id, events }
}

impl Sse {
    fn subscribe(&self, node: &Node, token: Option<&str>, topics: &[&str]) -> (u16, Value) {
        node.post(
            "/api/realtime",
            token,
            &json!({"clientId": self.id, "subscriptions": topics}),
        )
    }

    /// The next event other than a ping, or `None` after `within`.
    fn next(&self, within: Duration) -> Option<(String, Value)> {
        self.events
            .recv_timeout(within)
            .ok()
            .map(|(event, data, _)| (event, data))
    }

    /// Nothing arrives for a while.
    fn quiet(&self) {
        if let Some(e) = self.next(Duration::from_millis(700)) {
            panic!("unexpected event {e:?}");
        }
    }
}

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

fn websocket(node: &Node, query: &str) -> Ws {
    let url = format!("ws://127.0.0.1:{}/api/realtime?{query}", node.port());
    let (ws, _) = tungstenite::connect(url).expect("websocket handshake");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    }
    ws
}

/// The next JSON text message, or `None` after `within`.
fn ws_next(ws: &mut Ws, within: Duration) -> Option<Value> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("JSON message")),
            Ok(Message::Close(frame)) => {
                return Some(json!({"closed": frame.map(|f| f.reason.to_string()).unwrap_or_default()}));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Some(json!({"closed": e.to_string()})),
        }
    }
    None
}

fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).expect("send");
}

/// A master with `notes` (owner-only list and view rules) and two users.
struct Fixture {
    node: Node,
    admin: String,
    alice: (String, String),
    bob: (String, String),
}

fn user(node: &Node, email: &str) -> (String, String) {
    let (s, b) = node.post(
        "/api/collections/users/records",
        None,
        &json!({"email": email, "password": "password123", "passwordConfirm": "password123"}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = node.post(
        "/api/collections/users/auth-with-password",
        None,
        &json!({"identity": email, "password": "password123"}),
    );
    assert_eq!(s, 200, "{b}");
    (
        b["record"]["id"].as_str().unwrap().to_string(),
        b["token"].as_str().unwrap().to_string(),
    )
}

fn notes_schema() -> Value {
    json!({"name": "notes", "listRule": "owner = @request.auth.id", "viewRule": "owner = @request.auth.id",
           "createRule": "", "updateRule": "owner = @request.auth.id", "deleteRule": "owner = @request.auth.id",
           "fields": [{"name": "title", "type": "text"},
                      {"name": "owner", "type": "relation", "collectionId": "_pb_users_auth_"}]})
}

fn fixture(opts: NodeOptions) -> Fixture {
    let node = spawn_master_with(opts.env("JWT_SECRET", SECRET));
    let admin = node.admin_token();
    let (s, users) = node.get("/api/collections/users", Some(&admin));
    assert_eq!(s, 200);
    let mut schema = notes_schema();
    schema["fields"][1]["collectionId"] = users["id"].clone();
    let (s, b) = node.post("/api/collections", Some(&admin), &schema);
    assert_eq!(s, 200, "{b}");
    let alice = user(&node, "alice@example.com");
    let bob = user(&node, "bob@example.com");
    Fixture {
        node,
        admin,
        alice,
        bob,
    }
}

fn note(node: &Node, token: &str, owner: &str, title: &str) -> String {
    let (s, b) = node.post(
        "/api/collections/notes/records",
        Some(token),
        &json!({"title": title, "owner": owner}),
    );
    assert_eq!(s, 200, "{b}");
    b["id"].as_str().unwrap().to_string()
}

#[test]
fn sse_and_websocket_clients_get_the_events_their_rules_allow() {
    let f = fixture(NodeOptions::default());
    let n = &f.node;
    let alice = sse(n, "default");
    assert_eq!(alice.subscribe(n, Some(&f.alice.1), &["notes/*"]).0, 204);
    let guest = sse(n, "default");
    assert_eq!(guest.subscribe(n, None, &["notes/*"]).0, 204);
    let mut bob = websocket(n, &format!("auth={}", f.bob.1));
    ws_send(&mut bob, json!({"type": "SUBSCRIBE", "collection": "notes"}));
    assert_eq!(ws_next(&mut bob, WAIT).unwrap()["type"], "SUBSCRIBED");

    let a1 = note(n, &f.alice.1, &f.alice.0, "alice's");
    let b1 = note(n, &f.bob.1, &f.bob.0, "bob's");
    let (event, data) = alice.next(WAIT).expect("alice's create");
    assert_eq!(event, "notes/*");
    assert_eq!(data["action"], "create");
    assert_eq!(data["record"]["id"], a1.as_str());
    assert_eq!(data["record"]["title"], "alice's");
    let m = ws_next(&mut bob, WAIT).expect("bob's create");
    assert_eq!(m["collection"], "notes");
    assert_eq!(m["events"].as_array().unwrap().len(), 1, "{m}");
    assert_eq!(m["events"][0]["id"], b1.as_str());
    assert_eq!(m["events"][0]["data"]["action"], "create");

    // Update and delete: each reaches the owner only, and a delete is checked against the
    // record as it was.
    let (s, _) = n.patch(
        &format!("/api/collections/notes/records/{a1}"),
        Some(&f.alice.1),
        &json!({"title": "edited"}),
    );
    assert_eq!(s, 200);
    let (_, data) = alice.next(WAIT).expect("alice's update");
    assert_eq!(
        (data["action"].as_str(), data["record"]["title"].as_str()),
        (Some("update"), Some("edited"))
    );
    assert_eq!(
        n.delete(&format!("/api/collections/notes/records/{b1}"), Some(&f.bob.1))
            .0,
        204
    );
    let m = ws_next(&mut bob, WAIT).expect("bob's delete");
    assert_eq!(m["events"][0]["data"]["action"], "delete");
    assert_eq!(m["events"][0]["data"]["record"]["title"], "bob's");
    alice.quiet();
    guest.quiet();
    assert_eq!(ws_next(&mut bob, Duration::from_millis(500)), None);

    // A signed-in connection keeps its identity; a guest may sign in.
    let (s, b) = alice.subscribe(n, Some(&f.bob.1), &["notes/*"]);
    assert_eq!(s, 403, "{b}");
    let (s, _) = alice.subscribe(n, None, &["notes/*"]);
    assert_eq!(s, 403, "a signed-in connection cannot fall back to a guest");
    // Topic options: a filter, and a one-record topic under the viewRule.
    let topic = format!(
        "notes/*?options={}",
        urlencode(&json!({"query": {"filter": "title ~ 'keep'", "fields": "id,title"}}).to_string())
    );
    assert_eq!(
        alice
            .subscribe(n, Some(&f.alice.1), &[&topic, &format!("notes/{a1}")])
            .0,
        204
    );
    let kept = note(n, &f.alice.1, &f.alice.0, "keep me");
    let (event, data) = alice.next(WAIT).expect("filtered create");
    assert_eq!(event, topic);
    assert_eq!(data["record"], json!({"id": kept, "title": "keep me"}));
    note(n, &f.alice.1, &f.alice.0, "drop me");
    alice.quiet();
    n.patch(
        &format!("/api/collections/notes/records/{a1}"),
        Some(&f.alice.1),
        &json!({"title": "again"}),
    );
    let (event, data) = alice.next(WAIT).expect("record topic");
    assert_eq!(event, format!("notes/{a1}"));
    assert_eq!(data["record"]["title"], "again");

    // Bad requests change nothing.
    let (s, b) = alice.subscribe(
        n,
        Some(&f.alice.1),
        &["notes/*?options={\"query\":{\"filter\":\"nope ==\"}}"],
    );
    assert_eq!(s, 400, "{b}");
    for bad in ["notes", "../x/*", "notes/a b"] {
        assert_eq!(alice.subscribe(n, Some(&f.alice.1), &[bad]).0, 400, "{bad}");
    }
    let (s, _) = n.post("/api/realtime", None, &json!({"clientId": "nope", "subscriptions": []}));
    assert_eq!(s, 404);
    n.patch(
        &format!("/api/collections/notes/records/{a1}"),
        Some(&f.alice.1),
        &json!({"title": "still"}),
    );
    assert_eq!(alice.next(WAIT).expect("still subscribed").0, format!("notes/{a1}"));
}

#[test]
fn a_token_of_another_database_subscribes_as_a_guest() {
    let f = fixture(NodeOptions::default());
    let n = &f.node;
    let (s, b) = n.post("/api/databases", Some(&f.admin), &json!({"name": "other"}));
    assert_eq!(s, 201, "{b}");
    let mut schema = notes_schema();
    schema["listRule"] = json!("");
    schema["fields"] = json!([{"name": "title", "type": "text"}, {"name": "owner", "type": "text"}]);
    let (s, b) = n.request(
        "POST",
        "/api/collections",
        Some(&f.admin),
        Some(&schema),
        &[("X-Dbname", "other")],
    );
    assert_eq!(s, 200, "{b}");
    // Alice's token is from `default`: in `other` she is a guest, and the guest sees what
    // listRule "" shows, with no @request.auth.
    let mut ws = websocket(n, &format!("db=other&auth={}", f.alice.1));
    ws_send(
        &mut ws,
        json!({"type": "SUBSCRIBE", "collection": "notes", "filter": "owner = @request.auth.id"}),
    );
    assert_eq!(ws_next(&mut ws, WAIT).unwrap()["type"], "SUBSCRIBED");
    let (s, b) = n.request(
        "POST",
        "/api/collections/notes/records",
        Some(&f.admin),
        Some(&json!({"title": "x", "owner": f.alice.0})),
        &[("X-Dbname", "other")],
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        ws_next(&mut ws, Duration::from_millis(800)),
        None,
        "the token must not fill @request.auth"
    );
    // A commit in `default` never reaches a client of `other`.
    note(n, &f.alice.1, &f.alice.0, "default's");
    assert_eq!(ws_next(&mut ws, Duration::from_millis(500)), None);
}

#[test]
fn websocket_commands_errors_pings_and_idle_timeout() {
    let f = fixture(NodeOptions::default().env("REALTIME_PING_SECS", "1"));
    let n = &f.node;
    let mut ws = websocket(n, &format!("auth={}", f.alice.1));
    for (cmd, want) in [
        (json!({"type": "SUBSCRIBE", "collection": "nope"}), "ERROR"),
        (
            json!({"type": "SUBSCRIBE", "collection": "notes", "filter": "title ==="}),
            "ERROR",
        ),
        (
            json!({"type": "SUBSCRIBE", "collection": "notes", "expand": "title"}),
            "ERROR",
        ),
        (
            json!({"type": "SUBSCRIBE", "collection": "notes", "id": "../../x"}),
            "ERROR",
        ),
        (json!({"type": "DANCE"}), "ERROR"),
        (json!({"type": "SUBSCRIBE", "collection": "notes"}), "SUBSCRIBED"),
    ] {
        ws_send(&mut ws, cmd.clone());
        assert_eq!(ws_next(&mut ws, WAIT).unwrap()["type"], want, "{cmd}");
    }
    ws.send(Message::text("not json")).unwrap();
    assert_eq!(ws_next(&mut ws, WAIT).unwrap()["type"], "ERROR");
    note(n, &f.alice.1, &f.alice.0, "one");
    assert_eq!(ws_next(&mut ws, WAIT).unwrap()["events"][0]["data"]["action"], "create");
    ws_send(&mut ws, json!({"type": "UNSUBSCRIBE", "collection": "notes"}));
    assert_eq!(ws_next(&mut ws, WAIT).unwrap()["type"], "UNSUBSCRIBED");
    note(n, &f.alice.1, &f.alice.0, "two");
    assert_eq!(ws_next(&mut ws, Duration::from_millis(700)), None);
    // The server pings every second; a client that keeps reading answers them and stays.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert_eq!(ws_next(&mut ws, Duration::from_millis(300)), None);
    }
    // One that stops reading (and so answering) is closed as idle.
    std::thread::sleep(Duration::from_secs(5));
    // Reading answers the queued pings first, which may fail on the closed socket before the
    // close frame is read; the server's log names the reason either way.
    let closed = ws_next(&mut ws, WAIT).expect("closed");
    assert!(closed.get("closed").is_some(), "{closed}");
    assert!(n.log().contains("disconnected: idle"), "{}", n.log());
    wait_for("the client to be forgotten", WAIT, || {
        (n.health()["realtime"]["clients"] == 0).then_some(())
    });
}

/// Opens an SSE stream on a raw socket that is then never read; returns it and its client id.
fn stalled_sse(node: &Node) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", node.port())).unwrap();
    // The head must come within the deadline; a server that never answers fails the test.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /api/realtime HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
        let text = String::from_utf8_lossy(&head);
        if let Some(i) = text.find("clientId\":\"") {
            if let Some(end) = text[i + 11..].find('"') {
                return (s, text[i + 11..i + 11 + end].to_string());
            }
        }
    }
}

#[test]
fn a_slow_client_is_cut_off_while_a_fast_one_keeps_receiving() {
    let node = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("REALTIME_CLIENT_BUFFER", "8"),
    );
    let admin = node.admin_token();
    let (s, _) = node.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "big", "listRule": "", "viewRule": "", "createRule": "", "fields": [{"name": "body", "type": "text", "max": 100000}]}),
    );
    assert_eq!(s, 200);
    let (mut slow, slow_id) = stalled_sse(&node);
    let (s, _) = node.post(
        "/api/realtime",
        None,
        &json!({"clientId": slow_id, "subscriptions": ["big/*"]}),
    );
    assert_eq!(s, 204);
    let fast = sse(&node, "default");
    assert_eq!(fast.subscribe(&node, None, &["big/*"]).0, 204);
    assert_eq!(node.health()["realtime"]["clients"], 2);
    // 300 events of 64 KiB: far more than the stalled socket and its 8 buffered messages hold.
    let body = "x".repeat(64 * 1024);
    let writer = {
        let url = node.url.clone();
        std::thread::spawn(move || {
            let c = reqwest::blocking::Client::new();
            for _ in 0..300 {
                let r = c
                    .post(format!("{url}/api/collections/big/records"))
                    .json(&json!({"body": body}))
                    .send()
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };
    let mut got = 0;
    while got < 300 {
        let (event, data) = fast
            .next(Duration::from_secs(20))
            .expect("the fast client kept receiving");
        assert_eq!(event, "big/*");
        assert_eq!(data["record"]["body"].as_str().map(str::len), Some(64 * 1024));
        got += 1;
    }
    writer.join().unwrap();
    wait_for("the slow client to be dropped", WAIT, || {
        (node.health()["realtime"]["clients"] == 1).then_some(())
    });
    // Reading the stalled stream now ends with the reason.
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("event:disconnect") && text.contains("too slow"),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
}

#[test]
fn replicas_refuse_realtime_by_default_and_serve_it_with_replica_realtime_on() {
    let f = fixture(NodeOptions::default());
    let m = &f.node;
    let off = spawn_replica(m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    let on = spawn_replica(
        m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "60")
            .env("REPLICA_REALTIME", "on"),
    );
    wait_for("both replicas ready", Duration::from_secs(30), || {
        (off.get("/health", None).0 == 200 && on.get("/health", None).0 == 200).then_some(())
    });
    let (s, b) = off.get("/api/realtime", None);
    assert_eq!(s, 503, "{b}");
    assert!(b["message"].as_str().unwrap().contains("REPLICA_REALTIME"));
    let url = format!("ws://127.0.0.1:{}/api/realtime", off.port());
    match tungstenite::connect(url) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected a 503 upgrade, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(
        off.post("/api/realtime", None, &json!({"clientId": "x", "subscriptions": []}))
            .0,
        503
    );

    // With REPLICA_REALTIME=on, subscriptions on the replica receive master writes, under the
    // replica's copy of the rules: the subscription POST passes the read-only guard.
    let alice = sse(&on, "default");
    assert_eq!(alice.subscribe(&on, Some(&f.alice.1), &["notes/*", "resync"]).0, 204);
    let mut bob = websocket(&on, &format!("auth={}", f.bob.1));
    ws_send(&mut bob, json!({"type": "SUBSCRIBE", "collection": "notes"}));
    assert_eq!(ws_next(&mut bob, WAIT).unwrap()["type"], "SUBSCRIBED");
    let a1 = note(m, &f.alice.1, &f.alice.0, "from the master");
    let (event, data) = alice.next(WAIT).expect("a master write, seen on the replica");
    assert_eq!((event.as_str(), data["action"].as_str()), ("notes/*", Some("create")));
    assert_eq!(data["record"]["id"], a1.as_str());
    assert_eq!(
        ws_next(&mut bob, Duration::from_millis(700)),
        None,
        "bob must not see alice's note"
    );
    let b1 = note(m, &f.bob.1, &f.bob.0, "bob's");
    assert_eq!(ws_next(&mut bob, WAIT).unwrap()["events"][0]["id"], b1.as_str());
    alice.quiet();
    assert_eq!(
        m.delete(&format!("/api/collections/notes/records/{a1}"), Some(&f.alice.1))
            .0,
        204
    );
    assert_eq!(alice.next(WAIT).expect("delete").1["action"], "delete");
    // Writes on the replica stay refused.
    let (s, _) = on.post(
        "/api/collections/notes/records",
        Some(&f.alice.1),
        &json!({"title": "x"}),
    );
    assert_eq!(s, 403);
}

#[test]
fn a_rebootstrapped_replica_sends_resync_instead_of_a_flood() {
    let f = fixture(NodeOptions::default());
    let mut m = f.node;
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "1")
            .env("REPLICA_REALTIME", "on"),
    );
    wait_for("replica ready", Duration::from_secs(30), || {
        (r.get("/health", None).0 == 200).then_some(())
    });
    let watcher = sse(&r, "default");
    assert_eq!(watcher.subscribe(&r, Some(&f.admin), &["notes/*", "resync"]).0, 204);
    // Another master behind the same URL: the replica downloads a new snapshot.
    let port = m.port();
    m.kill();
    let m2 = spawn_master_with(NodeOptions {
        port: Some(port),
        ..NodeOptions::default().env("JWT_SECRET", SECRET)
    });
    let t = m2.admin_token();
    let (s, _) = m2.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "notes", "listRule": "", "fields": [{"name": "title", "type": "text"}]}),
    );
    assert_eq!(s, 200);
    for i in 0..20 {
        assert_eq!(
            m2.post(
                "/api/collections/notes/records",
                Some(&t),
                &json!({"title": format!("n{i}")})
            )
            .0,
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Some((event, _)) = watcher.next(Duration::from_millis(500)) {
            seen.push(event.clone());
            if event == "resync" {
                break;
            }
        }
    }
    assert!(seen.contains(&"resync".to_string()), "events: {seen:?}\n{}", r.log());
    assert!(seen.len() <= 2, "a resync, not a flood of events: {seen:?}");
}

#[test]
fn events_carry_expand_and_fields_as_lists_do() {
    let f = fixture(NodeOptions::default());
    let n = &f.node;
    let mut ws = websocket(n, &format!("auth={}", f.admin));
    ws_send(
        &mut ws,
        json!({"type": "SUBSCRIBE", "collection": "notes", "expand": "owner", "fields": "id,expand.owner.email"}),
    );
    assert_eq!(ws_next(&mut ws, WAIT).unwrap()["type"], "SUBSCRIBED");
    let id = note(n, &f.alice.1, &f.alice.0, "expanded");
    let m = ws_next(&mut ws, WAIT).expect("event");
    assert_eq!(
        m["events"][0]["data"]["record"],
        json!({"id": id, "expand": {"owner": {"email": "alice@example.com"}}}),
        "{m}"
    );
    // The same list request gives the same shape.
    let (_, list) = n.get(
        "/api/collections/notes/records?expand=owner&fields=id,expand.owner.email",
        Some(&f.admin),
    );
    assert_eq!(list["items"][0], m["events"][0]["data"]["record"]);
}

/// A WebSocket of `token` subscribed to `notes`, its subscription confirmed.
fn subscribed(n: &Node, token: &str) -> Ws {
    let mut ws = websocket(n, &format!("auth={token}"));
    ws_send(&mut ws, json!({"type": "SUBSCRIBE", "collection": "notes"}));
    assert_eq!(ws_next(&mut ws, WAIT).unwrap()["type"], "SUBSCRIBED");
    ws
}

/// Reads until the server closes `ws` (skipping events), and returns the close reason.
fn closed_reason(ws: &mut Ws) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(m) = ws_next(ws, Duration::from_millis(500)) {
            if let Some(r) = m.get("closed") {
                return r.as_str().unwrap_or_default().to_string();
            }
        }
    }
    panic!("the connection stayed open");
}

#[test]
fn a_revoked_identity_loses_its_realtime_connection() {
    let f = fixture(NodeOptions::default());
    let n = &f.node;
    // A password change (new token key) and a deleted user.
    let mut alice = subscribed(n, &f.alice.1);
    let mut bob = subscribed(n, &f.bob.1);
    let (s, b) = n.patch(
        &format!("/api/collections/users/records/{}", f.alice.0),
        Some(&f.admin),
        &json!({"password": "changed12345", "passwordConfirm": "changed12345"}),
    );
    assert_eq!(s, 200, "{b}");
    assert!(closed_reason(&mut alice).contains("revoked"));
    assert_eq!(
        n.delete(&format!("/api/collections/users/records/{}", f.bob.0), Some(&f.admin))
            .0,
        204
    );
    assert!(closed_reason(&mut bob).contains("revoked"));
    // A deleted admin, connected to another database than the one that holds admins.
    let (s, b) = n.post("/api/databases", Some(&f.admin), &json!({"name": "other"}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = n.post(
        "/api/collections/_superusers/records",
        Some(&f.admin),
        &json!({"email": "temp@example.com", "password": "temppass1234", "passwordConfirm": "temppass1234"}),
    );
    assert_eq!(s, 200, "{b}");
    let temp_id = b["id"].as_str().unwrap().to_string();
    let (s, b) = n.post(
        "/api/admins/auth-with-password",
        None,
        &json!({"identity": "temp@example.com", "password": "temppass1234"}),
    );
    assert_eq!(s, 200, "{b}");
    let temp = b["token"].as_str().unwrap().to_string();
    let mut ws = websocket(n, &format!("auth={temp}&db=other"));
    ws_send(&mut ws, json!({"type": "SUBSCRIBE", "collection": "nothing"}));
    let _ = ws_next(&mut ws, WAIT);
    assert_eq!(
        n.delete(
            &format!("/api/collections/_superusers/records/{temp_id}"),
            Some(&f.admin)
        )
        .0,
        204
    );
    assert!(closed_reason(&mut ws).contains("revoked"));
}

#[test]
fn an_expired_token_loses_its_realtime_connection() {
    let f = fixture(NodeOptions::default().env("AUTH_TOKEN_TTL", "2"));
    let n = &f.node;
    let (id, token) = user(n, "carol@example.com");
    let mut ws = subscribed(n, &token);
    // Past the token's life (and the 5 s leeway), the connection is closed, whether or not
    // anything commits.
    let reason = closed_reason(&mut ws);
    assert!(reason.contains("expired"), "{reason}");
    // Nothing of carol's arrived after that: the connection is gone.
    note(n, &f.admin, &id, "late");
}

#[test]
fn one_address_cannot_take_every_realtime_slot() {
    // Pings every second: the server notices a connection that went away when it next writes.
    let n = spawn_master_with(
        NodeOptions::default()
            .env("REALTIME_MAX_PER_IP", "3")
            .env("REALTIME_PING_SECS", "1"),
    );
    let from = |ip: [u8; 4]| {
        reqwest::blocking::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .timeout(None)
            .build()
            .unwrap()
    };
    let open = |client: &reqwest::blocking::Client| {
        client
            .get(format!("{}/api/realtime", n.url))
            .header("Accept", "text/event-stream")
            .send()
            .unwrap()
    };
    let greedy = from([127, 0, 0, 1]);
    let held: Vec<_> = (0..3).map(|_| open(&greedy)).collect();
    assert!(held.iter().all(|r| r.status() == 200));
    let refused = open(&greedy);
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("REALTIME_MAX_PER_IP"),
        "{body}"
    );
    // Another address still gets a connection.
    let other = from([127, 0, 0, 2]);
    assert_eq!(open(&other).status(), 200);
    // A slot is given back when its connection ends.
    drop(held);
    wait_for("a freed slot", Duration::from_secs(30), || {
        (open(&greedy).status() == 200).then_some(())
    });
}

/// Every event a guest's WebSocket received before the next `marks` event, as
/// `(collection, id, action)`.
fn events_until_mark(ws: &mut Ws) -> Vec<(String, String, String)> {
    let mut got = Vec::new();
    loop {
        let m = ws_next(ws, WAIT).expect("the mark's event");
        assert!(m.get("closed").is_none(), "{m}");
        let collection = m["collection"].as_str().unwrap_or_default().to_string();
        if collection == "marks" {
            return got;
        }
        for e in m["events"].as_array().into_iter().flatten() {
            got.push((
                collection.clone(),
                e["id"].as_str().unwrap().to_string(),
                e["data"]["action"].as_str().unwrap().to_string(),
            ));
        }
    }
}

#[test]
fn realtime_rules_read_the_real_tables_as_rest_does() {
    let n = spawn_master();
    let admin = n.admin_token();
    let self_related = |name: &str, rule: &str| {
        let (s, b) = n.post(
            "/api/collections",
            Some(&admin),
            &json!({"name": name, "fields": [{"name": "locked", "type": "bool"}, {"name": "note", "type": "text"}]}),
        );
        assert_eq!(s, 200, "{b}");
        let id = b["id"].clone();
        let (s, b) = n.patch(
            &format!("/api/collections/{name}"),
            Some(&admin),
            &json!({"listRule": rule, "viewRule": rule,
                    "fields": [{"name": "locked", "type": "bool"}, {"name": "note", "type": "text"},
                               {"name": "parent", "type": "relation", "collectionId": id}]}),
        );
        assert_eq!(s, 200, "{b}");
    };
    // A self-relation, a back-relation onto the same collection, and an @collection join.
    self_related("folders", "parent.locked != true");
    self_related("boxes", "boxes_via_parent.locked ?= true");
    self_related("items", "@collection.items.locked != true");
    let (s, b) = n.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "marks", "listRule": "", "viewRule": "", "fields": [{"name": "n", "type": "number"}]}),
    );
    assert_eq!(s, 200, "{b}");
    let mut guest = websocket(&n, "");
    for c in ["folders", "boxes", "items", "marks"] {
        ws_send(&mut guest, json!({"type": "SUBSCRIBE", "collection": c}));
        assert_eq!(ws_next(&mut guest, WAIT).unwrap()["type"], "SUBSCRIBED");
    }
    let seen_by_guest = |c: &str, id: &str| n.get(&format!("/api/collections/{c}/records/{id}"), None).0 == 200;
    let mut marks = 0;
    // One write by the admin; the guest gets its event exactly when REST shows the guest the
    // record (after a create or update, before a delete).
    let mut step = |c: &str, action: &str, id: Option<&str>, body: Value| -> String {
        let (id, visible) = match (action, id) {
            ("create", None) => {
                let (s, b) = n.post(&format!("/api/collections/{c}/records"), Some(&admin), &body);
                assert_eq!(s, 200, "{b}");
                let id = b["id"].as_str().unwrap().to_string();
                let visible = seen_by_guest(c, &id);
                (id, visible)
            }
            ("update", Some(id)) => {
                let (s, b) = n.patch(&format!("/api/collections/{c}/records/{id}"), Some(&admin), &body);
                assert_eq!(s, 200, "{b}");
                (id.to_string(), seen_by_guest(c, id))
            }
            ("delete", Some(id)) => {
                let visible = seen_by_guest(c, id);
                let (s, _) = n.delete(&format!("/api/collections/{c}/records/{id}"), Some(&admin));
                assert_eq!(s, 204);
                (id.to_string(), visible)
            }
            _ => unreachable!(),
        };
        marks += 1;
        let (s, _) = n.post("/api/collections/marks/records", Some(&admin), &json!({"n": marks}));
        assert_eq!(s, 200);
        let got = events_until_mark(&mut guest);
        let expected: Vec<(String, String, String)> = if visible {
            vec![(c.to_string(), id.clone(), action.to_string())]
        } else {
            vec![]
        };
        assert_eq!(
            got, expected,
            "{action} of {c}/{id}: REST shows it to the guest: {visible}"
        );
        id
    };
    // folders: a child of a locked folder is hidden, one of an open folder shown.
    let locked = step("folders", "create", None, json!({"locked": true}));
    let hidden = step("folders", "create", None, json!({"parent": locked}));
    step("folders", "update", Some(&hidden), json!({"note": "still hidden"}));
    let open = step("folders", "create", None, json!({}));
    step("folders", "create", None, json!({"parent": open}));
    step("folders", "delete", Some(&hidden), json!({}));
    // boxes: shown once a locked box points at them.
    let parent = step("boxes", "create", None, json!({}));
    step("boxes", "create", None, json!({"parent": parent, "locked": true}));
    step("boxes", "update", Some(&parent), json!({"note": "now shown"}));
    // items: shown only while no item is locked.
    let l = step("items", "create", None, json!({"locked": true}));
    let x = step("items", "create", None, json!({}));
    step("items", "update", Some(&x), json!({"note": "hidden by l"}));
    step("items", "update", Some(&l), json!({"locked": false}));
    step("items", "update", Some(&x), json!({"note": "shown"}));
}

#[test]
fn a_database_with_costly_subscribers_does_not_delay_another_databases_events() {
    let n = spawn_master();
    let admin = n.admin_token();
    let (s, b) = n.post("/api/databases", Some(&admin), &json!({"name": "quiet"}));
    assert_eq!(s, 201, "{b}");
    for db in ["default", "quiet"] {
        let (s, b) = n.post(
            &format!("/api/collections?db={db}"),
            Some(&admin),
            &json!({"name": "posts", "listRule": "", "viewRule": "", "fields": [{"name": "title", "type": "text"}]}),
        );
        assert_eq!(s, 200, "{b}");
    }
    let rows = 20;
    let ids: Vec<String> = (0..rows)
        .map(|i| {
            let (s, b) = n.post(
                "/api/collections/posts/records",
                Some(&admin),
                &json!({"title": i.to_string()}),
            );
            assert_eq!(s, 200, "{b}");
            b["id"].as_str().unwrap().to_string()
        })
        .collect();
    // Ten guests of `default`, each with 1,000 subscriptions whose filters differ (no two share
    // a rule check) and match nothing; the first also holds one that matches everything.
    let noisy: Vec<Sse> = (0..10)
        .map(|c| {
            let client = sse(&n, "default");
            let mut topics: Vec<String> = (0..1000 - usize::from(c == 0))
                .map(|k| {
                    let options = json!({"query": {"filter": format!("title = 'never-{c}-{k}'")}}).to_string();
                    format!("posts/*?options={}", urlencode(&options))
                })
                .collect();
            if c == 0 {
                topics.push("posts/*".into());
            }
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            let (s, b) = client.subscribe(&n, None, &topics);
            assert_eq!(s, 204, "{b}");
            client
        })
        .collect();
    let quiet = sse(&n, "quiet");
    assert_eq!(quiet.subscribe(&n, None, &["posts/*"]).0, 204);
    // One commit of 20 updates costs `default` 200,000 rule checks; `quiet`'s one event must
    // not wait for them.
    let (s, b) = n.patch(
        "/api/collections/posts/records/bulk",
        Some(&admin),
        &json!({"ids": ids, "data": {"title": "edited"}}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = n.post(
        "/api/collections/posts/records?db=quiet",
        Some(&admin),
        &json!({"title": "quiet"}),
    );
    assert_eq!(s, 200, "{b}");
    let (event, data) = quiet.next(Duration::from_secs(60)).expect("quiet's event");
    assert_eq!((event.as_str(), &data["record"]["title"]), ("posts/*", &json!("quiet")));
    assert!(
        noisy[0].events.try_recv().is_err(),
        "default's events were all rendered before quiet's event: quiet waited for them"
    );
    // default's events still arrive, all of them, to the one subscription that matches.
    for _ in 0..rows {
        let (event, data) = noisy[0].next(Duration::from_secs(300)).expect("default's event");
        assert_eq!((event.as_str(), &data["action"]), ("posts/*", &json!("update")));
    }
    for other in &noisy[1..] {
        if let Ok(e) = other.events.try_recv() {
            panic!("an event for a subscription that matches nothing: {e:?}");
        }
    }
}

#[test]
fn a_clients_subscriptions_are_bounded_in_number_and_bytes() {
    let f = fixture(NodeOptions::default());
    let n = &f.node;
    let client = sse(n, "default");
    assert_eq!(client.subscribe(n, Some(&f.alice.1), &["notes/*"]).0, 204);
    // More than 1,000 topics, or more than 128 KiB of them: a 400 that leaves the set as it was.
    let many: Vec<String> = (0..1001).map(|i| format!("notes/id{i:013}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (s, b) = client.subscribe(n, Some(&f.alice.1), &many);
    assert_eq!(s, 400, "{b}");
    assert!(b["message"].as_str().unwrap().contains("1000 subscriptions"), "{b}");
    let long_filter = format!("title != '{}'", "x".repeat(1000));
    let options = urlencode(&json!({"query": {"filter": long_filter}}).to_string());
    let big: Vec<String> = (0..200).map(|i| format!("notes/id{i:013}?options={options}")).collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    let (s, b) = client.subscribe(n, Some(&f.alice.1), &big);
    assert_eq!(s, 400, "{b}");
    assert!(b["message"].as_str().unwrap().contains("128 KiB"), "{b}");
    // A topic named many times is one subscription.
    let same = vec!["notes/*"; 5000];
    assert_eq!(client.subscribe(n, Some(&f.alice.1), &same).0, 204);
    note(n, &f.alice.1, &f.alice.0, "once");
    let (event, data) = client.next(WAIT).expect("event");
    assert_eq!((event.as_str(), &data["record"]["title"]), ("notes/*", &json!("once")));
    client.quiet();
    // Over WebSocket, the same bound: the subscription that would pass it is refused.
    let mut ws = websocket(n, &format!("auth={}", f.alice.1));
    let mut refused = None;
    for i in 0..200 {
        ws_send(
            &mut ws,
            json!({"type": "SUBSCRIBE", "collection": "notes", "id": format!("id{i:013}"), "filter": long_filter}),
        );
        let m = ws_next(&mut ws, WAIT).unwrap();
        if m["type"] == "ERROR" {
            refused = Some((i, m));
            break;
        }
        assert_eq!(m["type"], "SUBSCRIBED", "{m}");
    }
    let (i, m) = refused.expect("a refusal");
    assert!(m["message"].as_str().unwrap().contains("128 KiB"), "{m}");
    assert!((100..=130).contains(&i), "refused at subscription {i}");
}
