//! Security and API hygiene against the real binary: tenant isolation of tokens, bad input,
//! email changes, HTTP for browsers and load balancers, sign-in rate limits and guardrails
//! against operator mistakes.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use vski_tests::*;

const SECRET: &str = "security-secret-0123456789abcdef";
const VICTIM: &str = "victim000000001";
const PASSWORD: &str = "password1234";

fn master() -> Node {
    spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET))
}

fn in_db(n: &Node, method: &str, path: &str, token: Option<&str>, body: Option<&Value>, db: &str) -> (u16, Value) {
    n.request(method, path, token, body, &[("X-Dbname", db)])
}

fn ok(r: (u16, Value)) -> Value {
    assert!(r.0 == 200 || r.0 == 201, "expected success, got {}: {}", r.0, r.1);
    r.1
}

fn signup(n: &Node, db: &str, coll: &str, id: Option<&str>, email: &str) -> (u16, Value) {
    let mut body = json!({"email": email, "password": PASSWORD, "passwordConfirm": PASSWORD});
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    in_db(
        n,
        "POST",
        &format!("/api/collections/{coll}/records"),
        None,
        Some(&body),
        db,
    )
}

fn signin(n: &Node, db: &str, coll: &str, email: &str) -> String {
    let body = json!({"identity": email, "password": PASSWORD});
    let b = ok(in_db(
        n,
        "POST",
        &format!("/api/collections/{coll}/auth-with-password"),
        None,
        Some(&body),
        db,
    ));
    b["token"].as_str().expect("token").to_string()
}

/// `tenantb` with an auth collection `members` (victim inside), `notes` behind auth rules with
/// one note owned by the victim, and `comments` (public) pointing at that note.
/// Returns (admin token, note id).
fn tenant_b(n: &Node) -> (String, String) {
    let t = n.admin_token();
    ok(n.post("/api/databases", Some(&t), &json!({"name": "tenantb"})));
    let authed = "@request.auth.id != \"\"";
    let owner = "owner = @request.auth.id";
    for def in [
        json!({"name": "members", "type": "auth", "createRule": "", "viewRule": "id = @request.auth.id"}),
        json!({"name": "notes", "fields": [{"name": "owner", "type": "text"}, {"name": "title", "type": "text"}],
               "listRule": authed, "viewRule": authed, "createRule": authed, "updateRule": owner, "deleteRule": owner}),
    ] {
        ok(in_db(n, "POST", "/api/collections", Some(&t), Some(&def), "tenantb"));
    }
    let notes = ok(in_db(n, "GET", "/api/collections/notes", Some(&t), None, "tenantb"));
    let comments = json!({"name": "comments", "listRule": "", "viewRule": "",
        "fields": [{"name": "note", "type": "relation", "collectionId": notes["id"], "maxSelect": 1}]});
    ok(in_db(
        n,
        "POST",
        "/api/collections",
        Some(&t),
        Some(&comments),
        "tenantb",
    ));
    ok(signup(n, "tenantb", "members", Some(VICTIM), "victim@example.com"));
    let note = ok(in_db(
        n,
        "POST",
        "/api/collections/notes/records",
        Some(&t),
        Some(&json!({"owner": VICTIM, "title": "secret"})),
        "tenantb",
    ));
    let note_id = note["id"].as_str().unwrap().to_string();
    ok(in_db(
        n,
        "POST",
        "/api/collections/comments/records",
        Some(&t),
        Some(&json!({"note": note_id})),
        "tenantb",
    ));
    (t, note_id)
}

/// Everything a token of `default` must not do in `tenantb`, by header and by `?db=`.
fn assert_foreign_token_is_a_guest(n: &Node, token: &str, note: &str, writes: bool) {
    for by_query in [false, true] {
        let req = |method: &str, path: &str, body: Option<&Value>| {
            if by_query {
                let sep = if path.contains('?') { '&' } else { '?' };
                n.request(method, &format!("{path}{sep}db=tenantb"), Some(token), body, &[])
            } else {
                in_db(n, method, path, Some(token), body, "tenantb")
            }
        };
        let how = if by_query { "?db=" } else { "X-Dbname" };
        let (s, b) = req("GET", "/api/collections/notes/records", None);
        assert_eq!((s, b["totalItems"].as_i64()), (200, Some(0)), "{how} list: {b}");
        assert_eq!(
            req("GET", &format!("/api/collections/notes/records/{note}"), None).0,
            404,
            "{how} view"
        );
        let (s, b) = req("GET", "/api/collections/comments/records?expand=note", None);
        assert_eq!(s, 200, "{b}");
        assert!(
            b["items"][0].get("expand").is_none_or(|e| e.get("note").is_none()),
            "{how} expand: {b}"
        );
        let (s, b) = req("GET", "/api/auth/me", None);
        assert_eq!(s, 401, "{how} me: {b}");
        if writes {
            let body = json!({"owner": VICTIM, "title": "planted"});
            assert_eq!(
                req("POST", "/api/collections/notes/records", Some(&body)).0,
                400,
                "{how} create"
            );
            let body = json!({"title": "defaced"});
            assert_eq!(
                req("PATCH", &format!("/api/collections/notes/records/{note}"), Some(&body)).0,
                404,
                "{how} update"
            );
            assert_eq!(
                req("DELETE", &format!("/api/collections/notes/records/{note}"), None).0,
                404,
                "{how} delete"
            );
        }
    }
}

#[test]
fn a_user_token_is_valid_only_in_its_own_database() {
    let m = master();
    let (admin, note) = tenant_b(&m);
    // The attacker signs up in `default` with the victim's id, which nothing there forbids.
    ok(signup(&m, "default", "users", Some(VICTIM), "mallory@example.com"));
    let attacker = signin(&m, "default", "users", "mallory@example.com");
    assert_eq!(
        ok(m.get("/api/auth/me", Some(&attacker)))["id"],
        VICTIM,
        "valid at home"
    );
    assert_foreign_token_is_a_guest(&m, &attacker, &note, true);
    // A users collection of tenantb does not accept a refresh of default's token either.
    ok(in_db(
        &m,
        "POST",
        "/api/collections",
        Some(&admin),
        Some(&json!({"name": "users", "type": "auth"})),
        "tenantb",
    ));
    let (s, b) = in_db(
        &m,
        "POST",
        "/api/collections/users/auth-refresh",
        Some(&attacker),
        None,
        "tenantb",
    );
    assert_eq!(s, 401, "refresh: {b}");
    // Nothing changed in tenantb, and the victim's own token still works there.
    let victim = signin(&m, "tenantb", "members", "victim@example.com");
    let b = ok(in_db(
        &m,
        "GET",
        "/api/collections/notes/records",
        Some(&victim),
        None,
        "tenantb",
    ));
    assert_eq!(b["totalItems"], 1, "{b}");
    assert_eq!(b["items"][0]["title"], "secret");

    // The same on a replica, which accepts the master's tokens.
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    for db in ["default", "tenantb"] {
        assert_replica_equals_master(&m, &r, SECRET, db, Duration::from_secs(60));
    }
    let b = ok(in_db(
        &r,
        "GET",
        "/api/collections/notes/records",
        Some(&victim),
        None,
        "tenantb",
    ));
    assert_eq!(b["totalItems"], 1, "the replica has the data: {b}");
    assert_foreign_token_is_a_guest(&r, &attacker, &note, false);
    let (s, _) = in_db(
        &r,
        "POST",
        "/api/collections/users/auth-refresh",
        Some(&attacker),
        None,
        "tenantb",
    );
    assert_eq!(s, 401, "refresh on the replica");
}

#[test]
fn auth_records_of_one_database_never_share_an_id() {
    let m = master();
    let t = m.admin_token();
    ok(m.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "staff", "type": "auth", "createRule": ""}),
    ));
    ok(m.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "docs", "fields": [{"name": "owner", "type": "text"}, {"name": "body", "type": "text"}],
                "viewRule": "owner = @request.auth.id", "updateRule": "owner = @request.auth.id"}),
    ));
    ok(signup(
        &m,
        "default",
        "users",
        Some("alice0000000001"),
        "alice@example.com",
    ));
    let doc = ok(m.post(
        "/api/collections/docs/records",
        Some(&t),
        &json!({"owner": "alice0000000001", "body": "hers"}),
    ));
    let (s, b) = signup(&m, "default", "staff", Some("alice0000000001"), "eve@example.com");
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["data"]["id"]["code"], "validation_not_unique", "{b}");
    // And the other way round.
    ok(signup(
        &m,
        "default",
        "staff",
        Some("staff0000000001"),
        "sam@example.com",
    ));
    let (s, _) = signup(&m, "default", "users", Some("staff0000000001"), "eve2@example.com");
    assert_eq!(s, 400);
    // Eve, signed up in staff with her own id, cannot reach alice's document.
    ok(signup(&m, "default", "staff", None, "eve@example.com"));
    let eve = signin(&m, "default", "staff", "eve@example.com");
    let path = format!("/api/collections/docs/records/{}", doc["id"].as_str().unwrap());
    assert_eq!(m.patch(&path, Some(&eve), &json!({"body": "mine"})).0, 404);
    assert_eq!(ok(m.get(&path, Some(&t)))["body"], "hers");
}

#[test]
fn reserved_names_and_too_many_fields_are_400() {
    let m = master();
    let t = m.admin_token();
    for name in ["sqlite_x", "SQLITE_stat1", "Sqlite_master"] {
        let (s, b) = m.post("/api/collections", Some(&t), &json!({"name": name}));
        assert_eq!(s, 400, "{name}: {b}");
        assert!(b["data"]["name"].is_object(), "{b}");
    }
    let (s, b) = m.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "things", "fields": [{"name": "a", "type": "text"}],
                "indexes": ["CREATE INDEX sqlite_autoindex_x ON things (a)"]}),
    );
    assert_eq!(s, 400, "{b}");
    let many: Vec<Value> = (0..3000)
        .map(|i| json!({"name": format!("f{i}"), "type": "text"}))
        .collect();
    let (s, b) = m.post("/api/collections", Some(&t), &json!({"name": "wide", "fields": many}));
    assert_eq!(s, 400, "{b}");
    assert!(b["data"]["fields"]["message"].as_str().unwrap().contains("1000"), "{b}");
    // The maximum itself works, and one more through an update is refused.
    let max: Vec<Value> = (0..1000)
        .map(|i| json!({"name": format!("f{i}"), "type": "number"}))
        .collect();
    ok(m.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "wide", "fields": max.clone()}),
    ));
    let mut more = max;
    more.push(json!({"name": "f1000", "type": "number"}));
    let (s, b) = m.patch("/api/collections/wide", Some(&t), &json!({"fields": more}));
    assert_eq!(s, 400, "{b}");
    assert_eq!(m.get("/api/collections", Some(&t)).0, 200);
}

#[test]
fn numbers_must_stay_finite() {
    let m = master();
    let t = m.admin_token();
    ok(m.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "n", "fields": [{"name": "v", "type": "number"}],
                "listRule": "", "viewRule": "", "createRule": "", "updateRule": ""}),
    ));
    let rec = ok(m.post("/api/collections/n/records", None, &json!({"v": 1e308})));
    let path = format!("/api/collections/n/records/{}", rec["id"].as_str().unwrap());
    for body in [
        json!({"v+": 1e308}),
        json!({"v-": 1e308, "v": -1e308}),
        json!({"v+": "inf"}),
        json!({"v": "inf"}),
        json!({"v": "-Infinity"}),
        json!({"v": "NaN"}),
    ] {
        let (s, b) = m.patch(&path, None, &body);
        assert_eq!(s, 400, "{body}: {b}");
        assert!(
            b["data"]["v"]["message"].as_str().unwrap_or("").contains("finite"),
            "{body}: {b}"
        );
    }
    assert_eq!(ok(m.get(&path, None))["v"], json!(1e308), "unchanged");
    assert_eq!(
        m.post("/api/collections/n/records", None, &json!({"v": "1e999"})).0,
        400
    );
}

#[test]
fn only_admins_change_an_email_directly() {
    let m = master();
    let t = m.admin_token();
    let rec = ok(signup(&m, "default", "users", None, "ada@example.com"));
    let path = format!("/api/collections/users/records/{}", rec["id"].as_str().unwrap());
    ok(m.patch(
        "/api/collections/users",
        Some(&t),
        &json!({"updateRule": "id = @request.auth.id", "viewRule": "id = @request.auth.id"}),
    ));
    ok(m.patch(&path, Some(&t), &json!({"verified": true})));
    let ada = signin(&m, "default", "users", "ada@example.com");
    let (s, b) = m.patch(&path, Some(&ada), &json!({"email": "takeover@example.com"}));
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["data"]["email"]["code"], "validation_email_change", "{b}");
    let me = ok(m.get(&path, Some(&ada)));
    assert_eq!(
        (me["email"].as_str(), me["verified"].as_bool()),
        (Some("ada@example.com"), Some(true))
    );
    // The unchanged address echoed back by a client is fine, and so is an admin's change.
    ok(m.patch(
        &path,
        Some(&ada),
        &json!({"email": "ada@example.com", "emailVisibility": true}),
    ));
    let b = ok(m.patch(&path, Some(&t), &json!({"email": "ada@new.example.com"})));
    assert_eq!(b["email"], "ada@new.example.com");
}

fn raw(n: &Node, method: &str, path: &str, headers: &[(&str, &str)]) -> reqwest::blocking::Response {
    let mut rb = n.http.request(
        reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{}{path}", n.url),
    );
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().expect("request")
}

#[test]
fn head_cors_and_nbf_work_as_browsers_and_balancers_expect() {
    let m = master();
    let t = m.admin_token();
    for (path, want) in [
        ("/health", 200),
        ("/api/health", 200),
        ("/api/collections", 401),
        ("/nope", 404),
    ] {
        let get = raw(&m, "GET", path, &[]).status().as_u16();
        let head = raw(&m, "HEAD", path, &[]);
        assert_eq!((get, head.status().as_u16()), (want, want), "HEAD {path}");
        assert!(head.bytes().unwrap().is_empty(), "HEAD {path} has no body");
    }
    let pre = raw(
        &m,
        "OPTIONS",
        "/api/collections/users/records",
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "PATCH"),
            ("Access-Control-Request-Headers", "authorization,content-type,x-dbname"),
        ],
    );
    assert_eq!(pre.status().as_u16(), 204);
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("PATCH"));
    assert!(h["access-control-allow-headers"].to_str().unwrap().contains("x-dbname"));
    let res = raw(&m, "GET", "/health", &[("Origin", "https://app.example.com")]);
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    let exposed = res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for h in ["x-replica-id", "x-replica-mode", "x-master-url", "x-db-position"] {
        assert!(exposed.contains(h), "{h} exposed: {exposed}");
    }
    let refused = raw(&m, "GET", "/api/collections", &[("Origin", "https://app.example.com")]);
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(
        refused.headers()["access-control-allow-origin"],
        "*",
        "errors carry CORS too"
    );

    // nbf: an admin token that is not valid yet is no token. The claims are the real token's
    // (its `tk` fingerprint included), so only `nbf` differs.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let real: Value = {
        use base64::Engine;
        let part = t.split('.').nth(1).unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    };
    let with_tk = |nbf: u64| {
        let mut c: Value = real.clone();
        c["nbf"] = json!(nbf);
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &c, &key).unwrap()
    };
    assert_eq!(
        m.get("/api/admins/me", Some(&with_tk(now + 600))).0,
        401,
        "not valid yet"
    );
    assert_eq!(m.get("/api/admins/me", Some(&with_tk(now - 10))).0, 200, "valid since");
}

#[test]
fn cors_origins_can_be_restricted() {
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("CORS_ORIGINS", "https://app.example.com, http://localhost:5173"),
    );
    let res = raw(&m, "GET", "/health", &[("Origin", "http://localhost:5173")]);
    assert_eq!(res.headers()["access-control-allow-origin"], "http://localhost:5173");
    let res = raw(&m, "GET", "/health", &[("Origin", "https://evil.example.com")]);
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_cli(
        &["serve", "--port", "0", "--data-dir", dir.path().to_str().unwrap()],
        &[("CORS_ORIGINS", "app.example.com/")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("CORS_ORIGINS"), "{err}");
}

#[test]
fn password_sign_in_is_rate_limited_per_ip_and_identity() {
    let m = master();
    m.admin_token();
    ok(signup(&m, "default", "users", None, "ada@example.com"));
    let attempt = |identity: &str, pw: &str| {
        m.post(
            "/api/collections/users/auth-with-password",
            None,
            &json!({"identity": identity, "password": pw}),
        )
    };
    let mut statuses = Vec::new();
    let mut limited = None;
    let started = std::time::Instant::now();
    for _ in 0..60 {
        let resp = raw_post(
            &m,
            "/api/collections/users/auth-with-password",
            &json!({"identity": "ada@example.com", "password": "wrong-password"}),
        );
        statuses.push(resp.0);
        if resp.0 == 429 && limited.is_none() {
            limited = Some(resp);
        }
    }
    let passed = statuses.iter().filter(|s| **s == 400).count();
    // 20 a minute refill one every 3 s: a slow machine that took longer over the 60 attempts
    // earned one more for each 3 s it took, and no more.
    let refilled = (started.elapsed().as_secs_f64() / 3.0).ceil() as usize;
    assert!(
        passed >= 20 && passed <= 20 + refilled,
        "the default allows 20 attempts a minute (+{refilled} refilled over {:?}): {statuses:?}",
        started.elapsed()
    );
    assert!(
        statuses[..20].iter().all(|s| *s == 400),
        "the first 20 pass: {statuses:?}"
    );
    let (_, retry_after, body) = limited.expect("a 429");
    assert_eq!(body["status"], 429, "{body}");
    assert!(body["message"].is_string() && body["data"].is_object(), "{body}");
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    // Even the right password waits now; another identity does not.
    assert_eq!(attempt("ada@example.com", PASSWORD).0, 429);
    assert_eq!(attempt("bob@example.com", "wrong-password").0, 400);
    // Admin sign-in is limited the same way.
    let admin_statuses: Vec<u16> = (0..25)
        .map(|_| {
            m.post(
                "/api/admins/auth-with-password",
                None,
                &json!({"identity": ADMIN_EMAIL, "password": "wrong-password"}),
            )
            .0
        })
        .collect();
    assert!(admin_statuses.contains(&429), "{admin_statuses:?}");

    let off = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("AUTH_RATE_LIMIT", "0"),
    );
    let statuses: Vec<u16> = (0..40)
        .map(|_| {
            off.post(
                "/api/collections/users/auth-with-password",
                None,
                &json!({"identity": "x@example.com", "password": "wrong-password"}),
            )
            .0
        })
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 400),
        "AUTH_RATE_LIMIT=0 turns it off: {statuses:?}"
    );
}

/// A POST that also returns the Retry-After header.
fn raw_post(n: &Node, path: &str, body: &Value) -> (u16, Option<String>, Value) {
    let resp = n
        .http
        .post(format!("{}{path}", n.url))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .expect("POST");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, resp.json().unwrap_or(Value::Null))
}

#[test]
fn one_server_per_data_directory_and_admin_create_guards() {
    let m = master();
    let d = m.data_dir.to_str().unwrap().to_string();
    let (code, _, err) = run_cli(&["serve", "--port", "0", "--data-dir", &d], &[("JWT_SECRET", SECRET)]);
    assert_ne!(code, 0);
    assert_eq!(
        err.trim().lines().filter(|l| l.starts_with("vski:")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("is in use by another vski process"), "{err}");
    let (code, _, err) = run_cli(
        &["admin", "create", "ops@example.com", "opspassword1", "--data-dir", &d],
        &[],
    );
    assert_ne!(code, 0, "admin create refuses a directory in use");
    assert!(err.contains("in use"), "{err}");
    assert_eq!(m.get("/health", None).0, 200, "the running server is unharmed");

    // A replica's directory is refused even when its server is stopped.
    let mut r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "0"));
    let rd = r.data_dir.to_str().unwrap().to_string();
    r.terminate(Duration::from_secs(30));
    let (code, _, err) = run_cli(
        &["admin", "create", "ops@example.com", "opspassword1", "--data-dir", &rd],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("replica"), "{err}");

    // A directory that does not exist needs --create.
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("typo");
    let fs = fresh.to_str().unwrap();
    let (code, _, err) = run_cli(
        &["admin", "create", "ops@example.com", "opspassword1", "--data-dir", fs],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--create") && !fresh.exists(), "{err}");
    let (code, out, err) = run_cli(
        &[
            "admin",
            "create",
            "ops@example.com",
            "opspassword1",
            "--data-dir",
            fs,
            "--create",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn data_files_are_private() {
    let m = spawn_master(); // the secret is generated into the directory
    m.admin_token();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&m.data_dir), 0o700);
    let mut seen = 0;
    for e in std::fs::read_dir(&m.data_dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        seen += 1;
    }
    assert!(seen >= 5, "db files, secret, epoch: {seen}");
    for f in ["default.db", ".jwt_secret", ".epoch"] {
        assert!(m.data_dir.join(f).exists(), "{f}");
    }
}

#[test]
fn the_start_line_says_what_runs_and_typos_are_warned_about() {
    let m = master();
    let log = m.log();
    assert!(log.contains("starting: master, data directory"), "{log}");
    assert!(log.contains("secret from JWT_SECRET"), "{log}");
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "7")
            .env("REPLICA_OMIT_DB", "x"),
    );
    let log = r.log();
    assert!(
        log.contains(&format!("starting: replica of {}, sync every 7 s", m.url)),
        "{log}"
    );
    assert!(
        log.contains("REPLICA_OMIT_DB is not one vski reads (did you mean REPLICA_OMIT_DBS?)"),
        "{log}"
    );
    // The typo from the issue: a replica meant, a master started; now the log says why.
    let typo = spawn_master_with(NodeOptions::default().env("REPLICA_MOD", "replica"));
    let log = typo.log();
    assert!(log.contains("did you mean REPLICA_MODE?"), "{log}");
    assert!(log.contains("secret from DATA_DIR/.jwt_secret"), "{log}");
    // Any family: a name within a typo or two of one vski reads, in any case. Variables of the
    // machine (EDITOR, HOSTNAME, LANG) are left alone.
    let typos = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRT", "x")
            .env("CORS_ORIGIN", "https://app.example.com")
            .env("body_limit", "1")
            .env("EDITOR", "vim")
            .env("HOSTNAME", "box")
            .env("LANG", "C.UTF-8"),
    );
    let log = typos.log();
    for (typo, meant) in [
        ("JWT_SECRT", "JWT_SECRET"),
        ("CORS_ORIGIN", "CORS_ORIGINS"),
        ("body_limit", "BODY_LIMIT"),
    ] {
        assert!(
            log.contains(&format!("{typo} is not one vski reads (did you mean {meant}?)")),
            "{typo}: {log}"
        );
    }
    for other in ["EDITOR", "HOSTNAME", "LANG"] {
        assert!(!log.contains(&format!("variable {other} ")), "{other}: {log}");
    }
}

#[test]
fn the_rules_of_superusers_cannot_be_opened() {
    let m = spawn_master();
    let admin = m.admin_token();
    for rule in ["createRule", "listRule", "viewRule", "updateRule", "deleteRule"] {
        let (s, b) = m.patch("/api/collections/_superusers", Some(&admin), &json!({ rule: "" }));
        assert_eq!(s, 400, "{rule}: {b}");
        assert_eq!(b["data"]["createRule"]["code"], "validation_immutable", "{b}");
    }
    // Nothing changed: a guest still cannot sign up as an admin.
    let c = m.get("/api/collections/_superusers", Some(&admin)).1;
    assert!(c["createRule"].is_null() && c["listRule"].is_null(), "{c}");
    let (s, _) = m.post(
        "/api/collections/_superusers/records",
        None,
        &json!({"email": "mallory@example.com", "password": "mallorypass123", "passwordConfirm": "mallorypass123"}),
    );
    assert_eq!(s, 403);
    // Sending the rules as they are is not a change.
    let (s, b) = m.patch(
        "/api/collections/_superusers",
        Some(&admin),
        &json!({"createRule": null}),
    );
    assert_eq!(s, 200, "{b}");
}

#[test]
fn tokens_in_urls_never_reach_the_access_log() {
    let m = spawn_master_with(NodeOptions::default().env("RUST_LOG", "info"));
    let admin = m.admin_token();
    for (method, path) in [
        ("GET", format!("/api/files/posts/abc/x.txt?token={admin}")),
        // (a realtime stream is logged when it ends: a POST is answered at once)
        ("POST", format!("/api/realtime?auth={admin}&x=1")),
        ("GET", format!("/api/files/posts/abc/x.txt?thumb=1&TOKEN={admin}")),
        ("GET", format!("/api/files/posts/abc/x.txt?tok%65n={admin}")),
    ] {
        m.request(method, &path, None, None, &[]);
    }
    wait_for("the access log lines", std::time::Duration::from_secs(30), || {
        let log = m.log();
        (log.matches("GET /api/files/").count() == 3 && log.contains("POST /api/realtime")).then_some(())
    });
    let log = m.log();
    let signature = admin.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "a token in the access log:\n{log}");
    assert!(
        log.contains("token=[redacted]") && log.contains("auth=[redacted]&x=1"),
        "{log}"
    );
}

#[test]
fn the_sign_in_limit_counts_an_account_once_however_it_is_named() {
    let m = master();
    m.admin_token();
    let user = ok(signup(&m, "default", "users", None, "ada@example.com"));
    let id = user["id"].as_str().unwrap().to_string();
    let attempt = |identity: &str| {
        raw_post(
            &m,
            "/api/collections/users/auth-with-password",
            &json!({"identity": identity, "password": "wrong-password"}),
        )
        .0
    };
    // The allowance spent by email…
    let started = std::time::Instant::now();
    let by_email: Vec<u16> = (0..20).map(|_| attempt("ada@example.com")).collect();
    assert!(by_email.iter().all(|s| *s == 400), "{by_email:?}");
    // …is the record's: its id (or the email in other case) gets no fresh one. A slow machine
    // may have earned one attempt back for each 3 s the first 20 took.
    let refilled = (started.elapsed().as_secs_f64() / 3.0).ceil() as usize;
    let by_id: Vec<u16> = (0..refilled + 3).map(|_| attempt(&id)).collect();
    assert!(by_id.iter().filter(|s| **s == 400).count() <= refilled, "{by_id:?}");
    assert_eq!(by_id.last(), Some(&429), "{by_id:?}");
    assert_eq!(attempt("ADA@example.com"), 429);
    // Another account is not affected.
    ok(signup(&m, "default", "users", None, "bob@example.com"));
    assert_eq!(attempt("bob@example.com"), 400);
}

#[test]
fn positions_come_only_with_answers_that_served_data() {
    let m = master();
    let admin = m.admin_token();
    let (s, b) = m.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "secret", "fields": [{"name": "t", "type": "text"}]}),
    );
    assert_eq!(s, 200, "{b}");
    let position = |path: &str, token: Option<&str>| {
        let mut rb = m.http.get(format!("{}{path}", m.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let r = rb.send().unwrap();
        (r.status().as_u16(), r.headers().get("x-db-position").is_some())
    };
    // A guest refused or pointed at nothing learns nothing of the database's writes.
    assert_eq!(position("/api/collections/secret/records", None), (403, false));
    assert_eq!(position("/api/collections/nope/records", None), (404, false));
    assert_eq!(position("/api/nothing-here", None), (404, false));
    // An answer with data carries it.
    assert_eq!(position("/api/collections/secret/records", Some(&admin)), (200, true));
}

#[test]
fn health_details_are_for_admins_and_replicas_only() {
    let m = master();
    let admin = m.admin_token();
    ok(m.post("/api/databases", Some(&admin), &json!({"name": "acmecorp"})));
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_MODE", "stream"));
    wait_for("the replica to hold acmecorp", Duration::from_secs(60), || {
        r.health()["dbs"].get("acmecorp").map(|_| ())
    });
    let user = {
        ok(signup(&m, "default", "users", None, "someone@example.com"));
        signin(&m, "default", "users", "someone@example.com")
    };
    for (node, mode) in [(&m, "master"), (&r, "replica")] {
        // Guests, users and forged tokens: whether the node serves, and nothing about tenants,
        // versions, the master's address or errors.
        let forged = replica_token("not-the-secret-0123456789abcdef", "intruder");
        for token in [None, Some(user.as_str()), Some(forged.as_str())] {
            let (s, b) = node.get("/health", token);
            assert_eq!(s, 200, "{b}");
            assert_eq!(b["mode"], mode);
            let text = b.to_string();
            for secret in [
                "acmecorp",
                "dbs",
                "masterUrl",
                "replicaId",
                "lastError",
                "clients",
                "Version",
            ] {
                assert!(
                    !text.contains(secret),
                    "{mode} /health shows {secret} to {token:?}: {text}"
                );
            }
            if mode == "replica" {
                assert_eq!(b["ready"], true, "{b}");
                assert_eq!(b["stale"], false, "{b}");
                assert!(b["lagMs"].is_u64(), "{b}");
            }
        }
        // Admins and replica tokens see the details.
        let observer = replica_token(SECRET, "observer");
        for token in [admin.as_str(), observer.as_str()] {
            let (s, b) = node.get("/health", Some(token));
            assert_eq!(s, 200, "{b}");
            assert!(b["realtime"]["clients"].is_u64(), "{b}");
            if mode == "replica" {
                assert!(b["dbs"]["acmecorp"]["localVersion"].is_i64(), "{b}");
                assert_eq!(b["masterUrl"], m.url.as_str());
            }
        }
    }
}

/// A client whose requests leave from `ip` (any 127.0.0.0/8 address is this machine).
fn client_from(ip: [u8; 4]) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[test]
fn the_client_address_comes_from_x_forwarded_for_only_through_a_trusted_proxy() {
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("TRUSTED_PROXIES", "127.0.0.2/32")
            .env("RUST_LOG", "info"),
    );
    m.admin_token();
    ok(signup(&m, "default", "users", None, "ada@example.com"));
    let attempt = |client: &reqwest::blocking::Client, forwarded: &str| {
        client
            .post(format!("{}/api/collections/users/auth-with-password", m.url))
            .header("X-Forwarded-For", forwarded)
            .json(&json!({"identity": "ada@example.com", "password": "wrong-password"}))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // A client that is no trusted proxy names a new address each time: the limit counts its
    // own address all the same.
    let direct = client_from([127, 0, 0, 1]);
    let spoofed: Vec<u16> = (0..25).map(|i| attempt(&direct, &format!("198.51.100.{i}"))).collect();
    assert!(
        spoofed.contains(&429),
        "a spoofed X-Forwarded-For escaped the limit: {spoofed:?}"
    );
    // Through the trusted proxy, clients are told apart by the header.
    let proxy = client_from([127, 0, 0, 2]);
    let first: Vec<u16> = (0..25).map(|_| attempt(&proxy, "203.0.113.7")).collect();
    assert!(first.contains(&429), "{first:?}");
    assert_eq!(
        attempt(&proxy, "198.51.100.77, 203.0.113.8"),
        400,
        "another client behind the proxy"
    );
    // The access log names the client the same way.
    let log = m.log();
    assert!(
        log.contains("203.0.113.8 \"POST /api/collections/users/auth-with-password"),
        "{log}"
    );
    assert!(
        !log.contains("198.51.100.1 \""),
        "an untrusted header reached the log: {log}"
    );
    assert!(
        log.contains("127.0.0.1 \"POST /api/collections/users/auth-with-password"),
        "{log}"
    );
    // A malformed list stops the server at start with one line.
    let (code, _, err) = run_cli(
        &["serve", "--port", "0", "--data-dir", "/nonexistent-vski-dir"],
        &[("TRUSTED_PROXIES", "10.0.0.0/8,not-a-cidr")],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("TRUSTED_PROXIES: 'not-a-cidr' is not an address or a CIDR"),
        "{err}"
    );
}

#[test]
fn health_checks_log_at_debug_and_json_logs_are_json() {
    let m = spawn_master_with(NodeOptions::default().env("RUST_LOG", "info"));
    for _ in 0..3 {
        assert_eq!(m.get("/health", None).0, 200);
    }
    assert_eq!(m.get("/api/collections/users/records", None).0, 200);
    let log = m.log();
    assert!(log.contains("\"GET /api/collections/users/records"), "{log}");
    assert!(!log.contains("\"GET /health"), "health checks at info: {log}");
    let json = spawn_master_with(NodeOptions::default().env("RUST_LOG", "info").env("LOG_FORMAT", "json"));
    assert_eq!(json.get("/api/collections/users/records", None).0, 200);
    wait_for("the access line", Duration::from_secs(10), || {
        json.log().contains("GET /api/collections/users/records").then_some(())
    });
    let log = json.log();
    let mut access = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["time"].is_string(), "{entry}");
        if entry["target"] == "vski::access" {
            access += 1;
        }
    }
    assert!(access >= 1, "{log}");
}
