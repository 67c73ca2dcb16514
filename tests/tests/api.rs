//! End-to-end tests of the HTTP API against the real `vski` binary.

use std::time::Duration;

use vski_tests::*;

const SECRET: &str = "test-secret-0123456789abcdef";

fn master() -> Node {
    spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET))
}

/// Creates `posts` with a field of every scalar type and returns the admin token.
fn with_posts(n: &Node) -> String {
    let t = n.admin_token();
    let (s, b) = n.post(
        "/api/collections",
        Some(&t),
        &json!({
            "name": "posts",
            "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
            "fields": [
                {"name": "title", "type": "text", "required": true, "max": 50},
                {"name": "views", "type": "number", "options": {"min": 0}},
                {"name": "done", "type": "bool"},
                {"name": "contact", "type": "email"},
                {"name": "site", "type": "url"},
                {"name": "body", "type": "editor"},
                {"name": "when", "type": "date"},
                {"name": "status", "type": "select", "values": ["draft", "live"]},
                {"name": "tags", "type": "select", "values": ["a", "b", "c"], "maxSelect": 3},
                {"name": "meta", "type": "json"},
                {"name": "slug", "type": "text", "unique": true},
            ]
        }),
    );
    assert_eq!(s, 200, "create posts: {b}");
    t
}

fn assert_error_shape(status: u16, body: &Value) {
    assert_eq!(body["status"], json!(status), "{body}");
    assert_eq!(body["code"], json!(status), "{body}");
    assert!(body["message"].is_string() && body["error"].is_string(), "{body}");
    assert!(body["data"].is_object(), "{body}");
}

#[test]
fn health_and_headers() {
    let n = master();
    for path in ["/health", "/api/health"] {
        let (s, b) = n.get(path, None);
        assert_eq!(s, 200);
        assert_eq!(b["status"], "ok");
        assert_eq!(b["mode"], "master");
    }
    assert_eq!(n.headers("/health")["x-replica-mode"], "master");
}

#[test]
fn generated_secret_is_private_and_kept_across_restarts() {
    let n = spawn_master();
    let path = n.data_dir.join(".jwt_secret");
    let meta = std::fs::metadata(&path).expect(".jwt_secret exists");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(n.log().contains("generated a JWT secret"), "{}", n.log());
    assert!(n.log().contains("vski admin create"), "the first-admin hint is printed");
    let t = n.admin_token();
    let n = n.restart();
    assert_eq!(
        n.get("/api/admins/me", Some(&t)).0,
        200,
        "token minted before restart still valid"
    );
    assert!(!n.log().contains("generated a JWT secret"));
}

#[test]
fn bad_configuration_exits_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    /// (arguments, environment, text the error must contain)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["serve", "--port", "notaport", "--data-dir", d], &[], "notaport"),
        (&["serve", "--data-dir", d], &[("PORT", "99999")], "99999"),
        (&["serve", "--data-dir", d], &[("READ_POOL_SIZE", "0")], "0"),
        (
            &["serve", "--data-dir", "/proc/vski-cannot-exist"],
            &[("PORT", "0")],
            "vski-cannot-exist",
        ),
        (&["bogus"], &[], "bogus"),
    ];
    for (args, env, needle) in cases {
        let (code, _, err) = run_cli(args, env);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn admin_lifecycle() {
    let n = master();
    assert_eq!(n.get("/api/admins/has-admins", None).1, json!({"hasAdmins": false}));
    // Whoever reaches the port first does not become the admin: init needs the installer token,
    // which only the data directory and the start-up log hold.
    let install = n.install_token();
    assert!(install.len() >= 32, "{install:?}");
    assert!(
        n.log().contains(&format!("Authorization: Bearer {install}")),
        "{}",
        n.log()
    );
    let first = json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD});
    for token in [None, Some("not-the-token"), Some(&install[1..])] {
        let (s, b) = n.post("/api/admins/init", token, &first);
        assert_eq!(s, 401, "{token:?}: {b}");
        assert!(b["message"].as_str().unwrap().contains(".install_token"), "{b}");
    }
    assert_eq!(n.get("/api/admins/has-admins", None).1, json!({"hasAdmins": false}));
    for bad in [
        json!({"email": "x", "password": "longenough"}),
        json!({"email": "a@b.co", "password": "short"}),
        json!({}),
    ] {
        let (s, b) = n.post("/api/admins/init", Some(&install), &bad);
        assert_eq!(s, 400, "{bad}: {b}");
    }
    let (s, b) = n.post("/api/admins/init", Some(&install), &first);
    assert_eq!(s, 200, "{b}");
    assert!(!n.data_dir.join(".install_token").exists(), "the token is used up");
    assert_eq!(
        n.post(
            "/api/admins/init",
            Some(&install),
            &json!({"email": "again@example.com", "password": "password123"})
        )
        .0,
        400
    );
    assert!(b["token"].is_string() && b["admin"]["email"] == ADMIN_EMAIL);
    assert!(b["admin"].get("password").is_none() && b["admin"].get("tokenKey").is_none());
    assert_eq!(n.get("/api/admins/has-admins", None).1, json!({"hasAdmins": true}));
    let (s, _) = n.post(
        "/api/admins/init",
        None,
        &json!({"email": "other@example.com", "password": "password123"}),
    );
    assert_eq!(s, 400, "init only works once");

    let t = n.admin_login();
    let (s, me) = n.get("/api/admins/me", Some(&t));
    assert_eq!((s, me["email"].as_str()), (200, Some(ADMIN_EMAIL)));

    let (s, b) = n.post(
        "/api/collections/_superusers/auth-with-password",
        None,
        &json!({"identity": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    );
    assert_eq!(s, 200);
    assert!(b["token"].is_string() && b["record"]["email"] == ADMIN_EMAIL, "{b}");

    let (s1, wrong_pw) = n.post(
        "/api/admins/auth-with-password",
        None,
        &json!({"identity": ADMIN_EMAIL, "password": "wrongwrong"}),
    );
    let (s2, unknown) = n.post(
        "/api/admins/auth-with-password",
        None,
        &json!({"identity": "nobody@example.com", "password": "wrongwrong"}),
    );
    assert_eq!((s1, s2), (400, 400));
    assert_eq!(
        wrong_pw, unknown,
        "unknown identity and wrong password are indistinguishable"
    );
    assert_error_shape(400, &wrong_pw);
}

#[test]
fn admin_create_works_offline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    let (code, out, err) = run_cli(
        &[
            "admin",
            "create",
            "ops@example.com",
            "opspassword1",
            "--data-dir",
            ds,
            "--create",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out} {err}");
    let (code, _, err) = run_cli(&["admin", "create", "ops@example.com", "short", "--data-dir", ds], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("password"), "{err}");
    // Running it again changes the password.
    let (code, _, _) = run_cli(
        &["admin", "create", "ops@example.com", "newpassword2", "--data-dir", ds],
        &[],
    );
    assert_eq!(code, 0);
    let n = Node::start(d, NodeOptions::default(), None);
    let login = |pw: &str| {
        n.post(
            "/api/admins/auth-with-password",
            None,
            &json!({"identity": "ops@example.com", "password": pw}),
        )
        .0
    };
    assert_eq!(login("newpassword2"), 200);
    assert_eq!(login("opspassword1"), 400);
}

#[test]
fn admin_commands_read_the_password_from_stdin_list_delete_and_leave_nothing_when_they_fail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let ds = d.to_str().unwrap();
    let create = |email: &str, input: &str| {
        run_cli_with_input(
            &[
                "admin",
                "create",
                email,
                "--password-stdin",
                "--data-dir",
                ds,
                "--create",
            ],
            &[],
            input,
        )
    };
    // A failure (a weak password, a bad email) leaves no directory behind.
    for (email, input) in [("ops@example.com", "short\n"), ("not-an-email", "longenough1\n")] {
        let (code, _, err) = create(email, input);
        assert_ne!(code, 0);
        assert!(err.contains("password") || err.contains("email"), "{err}");
        assert!(!d.exists(), "a failed create left {ds} behind");
    }
    // A password and --password-stdin together, or neither: a usage error.
    let (code, _, _) = run_cli(
        &["admin", "create", "a@example.com", "pw12345678", "--password-stdin"],
        &[],
    );
    assert_ne!(code, 0);
    let (code, _, _) = run_cli(&["admin", "create", "a@example.com", "--data-dir", ds], &[]);
    assert_ne!(code, 0);
    for email in ["ops@example.com", "dev@example.com"] {
        let (code, out, err) = create(email, "from stdin 123\n");
        assert_eq!(code, 0, "{out} {err}");
    }
    let (code, out, err) = run_cli(&["admin", "list", "--data-dir", ds], &[]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("ops@example.com") && lines[1].contains("dev@example.com"),
        "{out}"
    );
    let (code, _, err) = run_cli(&["admin", "delete", "nobody@example.com", "--data-dir", ds], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("no admin nobody@example.com"), "{err}");
    let (code, _, err) = run_cli(&["admin", "delete", "DEV@example.com", "--data-dir", ds], &[]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run_cli(&["admin", "list", "--data-dir", ds], &[]);
    assert_eq!(out.lines().count(), 1, "{out}");
    // The password came from stdin, whole (spaces included), without its newline.
    let n = Node::start(d, NodeOptions::default(), None);
    let (s, b) = n.post(
        "/api/admins/auth-with-password",
        None,
        &json!({"identity": "ops@example.com", "password": "from stdin 123"}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        n.post(
            "/api/admins/auth-with-password",
            None,
            &json!({"identity": "dev@example.com", "password": "from stdin 123"})
        )
        .0,
        400
    );
}

fn forge(claims: Value, secret: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn tokens_of_the_wrong_kind_or_forged_are_refused() {
    let n = master();
    let admin = n.admin_token();
    let (_, me) = n.get("/api/admins/me", Some(&admin));
    let admin_id = me["id"].as_str().unwrap().to_string();
    let (s, reg) = n.post(
        "/api/auth/register",
        None,
        &json!({"email": "u@example.com", "password": "userpass1", "passwordConfirm": "userpass1"}),
    );
    assert_eq!(s, 200, "{reg}");
    let user = reg["token"].as_str().unwrap().to_string();

    // A valid admin token, re-signed in other ways.
    let parts: Vec<&str> = admin.split('.').collect();
    let alg_none = format!("{}.{}.", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", parts[1]);
    let foreign = forge(
        json!({"sub": admin_id, "type": "admin", "iat": now(), "exp": now() + 600}),
        "another-secret-entirely",
    );
    let expired = forge(
        json!({"sub": admin_id, "type": "admin", "iat": now() - 7200, "exp": now() - 3600}),
        SECRET,
    );
    let no_tk = forge(
        json!({"sub": admin_id, "type": "admin", "iat": now(), "exp": now() + 600}),
        SECRET,
    );
    let replica = forge(
        json!({"sub": "replica-1", "type": "replica", "iat": now(), "exp": now() + 600}),
        SECRET,
    );
    let tampered = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..parts[2].len() - 2]);

    let cases: Vec<(&str, Option<&str>, u16)> = vec![
        ("no token", None, 401),
        ("garbage", Some("not.a.token"), 401),
        ("alg none", Some(&alg_none), 401),
        ("foreign secret", Some(&foreign), 401),
        ("expired", Some(&expired), 401),
        ("missing token key", Some(&no_tk), 401),
        ("tampered signature", Some(&tampered), 401),
        ("user token", Some(&user), 403),
        ("replica token", Some(&replica), 403),
        ("admin token", Some(&admin), 200),
    ];
    for (name, token, want) in cases {
        for path in ["/api/collections", "/api/databases", "/api/admins/me"] {
            let (s, b) = n.get(path, token);
            assert_eq!(s, want, "{name} on {path}: {b}");
            if want != 200 {
                assert_error_shape(want, &b);
            }
        }
    }
    // A user token is not an admin token even on the _superusers refresh, and vice versa.
    assert_eq!(
        n.post("/api/collections/users/auth-refresh", Some(&admin), &json!({}))
            .0,
        403
    );
    assert_eq!(
        n.post("/api/collections/users/auth-refresh", Some(&user), &json!({})).0,
        200
    );
    assert_eq!(n.get("/api/auth/me", Some(&replica)).0, 403);
}

#[test]
fn user_auth_flow_and_password_rotation() {
    let n = master();
    let admin = n.admin_token();
    let bad_signups = [
        json!({"email": "bad", "password": "userpass1", "passwordConfirm": "userpass1"}),
        json!({"email": "u@example.com", "password": "short", "passwordConfirm": "short"}),
        json!({"email": "u@example.com", "password": "userpass1", "passwordConfirm": "different"}),
        json!({"password": "userpass1", "passwordConfirm": "userpass1"}),
    ];
    for b in &bad_signups {
        let (s, body) = n.post("/api/collections/users/records", None, b);
        assert_eq!(s, 400, "{b}: {body}");
    }
    let (s, rec) = n.post(
        "/api/collections/users/records",
        None,
        &json!({"email": "U@Example.com", "password": "userpass1", "passwordConfirm": "userpass1", "verified": true}),
    );
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["verified"], false, "guests cannot verify themselves");
    assert!(rec.get("password").is_none() && rec.get("tokenKey").is_none(), "{rec}");
    let id = rec["id"].as_str().unwrap().to_string();
    let (s, _) = n.post(
        "/api/collections/users/records",
        None,
        &json!({"email": "u@example.com", "password": "userpass1", "passwordConfirm": "userpass1"}),
    );
    assert_eq!(s, 400, "email is unique, case-insensitively");

    let (s, login) = n.post(
        "/api/collections/users/auth-with-password",
        None,
        &json!({"identity": "u@example.com", "password": "userpass1"}),
    );
    assert_eq!(s, 200, "{login}");
    assert_eq!(login["record"]["email"], "u@example.com", "owner sees own email");
    let t1 = login["token"].as_str().unwrap().to_string();
    let (s, alias) = n.post(
        "/api/auth/login",
        None,
        &json!({"identity": "u@example.com", "password": "userpass1"}),
    );
    assert_eq!(s, 200, "{alias}");
    assert_eq!(n.get("/api/auth/me", Some(&t1)).1["id"], json!(id));
    let (s, refreshed) = n.post("/api/collections/users/auth-refresh", Some(&t1), &json!({}));
    assert_eq!(s, 200);
    assert!(refreshed["token"].is_string());

    let (s1, a) = n.post(
        "/api/auth/login",
        None,
        &json!({"identity": "u@example.com", "password": "wrongpass1"}),
    );
    let (s2, b) = n.post(
        "/api/auth/login",
        None,
        &json!({"identity": "x@example.com", "password": "wrongpass1"}),
    );
    assert_eq!((s1, s2), (400, 400));
    assert_eq!(a, b);

    // The admin changes the password: earlier tokens stop working.
    let (s, b) = n.patch(
        &format!("/api/collections/users/records/{id}"),
        Some(&admin),
        &json!({"password": "newpass123", "passwordConfirm": "newpass123"}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        n.get("/api/auth/me", Some(&t1)).0,
        401,
        "old token revoked by tokenKey rotation"
    );
    assert_eq!(
        n.post(
            "/api/auth/login",
            None,
            &json!({"identity": "u@example.com", "password": "newpass123"})
        )
        .0,
        200
    );
}

#[test]
fn databases_api() {
    let n = master();
    let t = n.admin_token();
    let (s, list) = n.get("/api/databases", Some(&t));
    assert_eq!(s, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    for want in ["default", "stats", "workflows"] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert_eq!(
        n.post("/api/databases", Some(&t), &json!({"name": "tenant-1"})),
        (201, json!({"name": "tenant-1"}))
    );
    for bad in ["x; DROP TABLE posts", "../etc", "UPPER", "", "tenant-1"] {
        let (s, b) = n.post("/api/databases", Some(&t), &json!({"name": bad}));
        assert_eq!(s, 400, "{bad:?}: {b}");
    }
    assert!(!n.data_dir.join("..").join("etc.db").exists());
    // Collections are per database, selected by header or query.
    let (s, b) = n.request(
        "POST",
        "/api/collections",
        Some(&t),
        Some(&json!({"name": "notes", "fields": [{"name": "x", "type": "text"}]})),
        &[("X-Dbname", "tenant-1")],
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(n.get("/api/collections/notes", Some(&t)).0, 404, "not in default");
    assert_eq!(n.get("/api/collections/notes?db=tenant-1", Some(&t)).0, 200);
    assert_eq!(n.get("/api/collections/notes/records?db=nope", Some(&t)).0, 404);
    assert_eq!(n.get("/api/collections?db=..%2Fx", Some(&t)).0, 404);
    for sys in ["default", "stats", "workflows"] {
        assert_eq!(n.delete(&format!("/api/databases/{sys}"), Some(&t)).0, 400);
    }
    assert_eq!(n.delete("/api/databases/tenant-1", Some(&t)).0, 204);
    assert!(!n.data_dir.join("tenant-1.db").exists());
    assert_eq!(n.delete("/api/databases/tenant-1", Some(&t)).0, 404);
    assert_eq!(n.post("/api/databases", None, &json!({"name": "x"})).0, 401);
}

#[test]
fn collections_api() {
    let n = master();
    let t = with_posts(&n);
    let bad: Vec<(&str, Value)> = vec![
        ("hostile name", json!({"name": "x; DROP TABLE posts"})),
        ("underscore", json!({"name": "_secret"})),
        ("missing name", json!({"fields": []})),
        ("taken", json!({"name": "posts"})),
        ("taken, other case", json!({"name": "POSTS"})),
        (
            "unknown type",
            json!({"name": "a1", "fields": [{"name": "x", "type": "blob"}]}),
        ),
        (
            "hostile field",
            json!({"name": "a2", "fields": [{"name": "x\"; DROP TABLE posts; --", "type": "text"}]}),
        ),
        (
            "reserved field",
            json!({"name": "a3", "fields": [{"name": "created", "type": "text"}]}),
        ),
        (
            "duplicate field",
            json!({"name": "a4", "fields": [{"name": "x", "type": "text"}, {"name": "X", "type": "text"}]}),
        ),
        (
            "select without values",
            json!({"name": "a5", "fields": [{"name": "s", "type": "select"}]}),
        ),
        (
            "relation to nowhere",
            json!({"name": "a6", "fields": [{"name": "r", "type": "relation", "collectionId": "nope"}]}),
        ),
        (
            "bad index",
            json!({"name": "a7", "fields": [{"name": "x", "type": "text"}], "indexes": ["CREATE INDEX i ON a7 (x); DROP TABLE posts"]}),
        ),
        (
            "index on unknown column",
            json!({"name": "a8", "indexes": ["CREATE INDEX i8 ON a8 (nope)"]}),
        ),
        (
            "rule naming an unknown field",
            json!({"name": "a9", "listRule": "nope = 1"}),
        ),
        ("rule that does not parse", json!({"name": "a12", "listRule": "id = "})),
        ("bad type", json!({"name": "a10", "type": "view"})),
        ("fields not a list", json!({"name": "a11", "fields": "x"})),
    ];
    for (what, body) in bad {
        let (s, b) = n.post("/api/collections", Some(&t), &body);
        assert_eq!(s, 400, "{what}: {b}");
        assert_error_shape(400, &b);
    }
    let (_, list) = n.get("/api/collections?perPage=100", Some(&t));
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"posts") && names.contains(&"users"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with('a') && n.len() <= 3),
        "no failed collection was created: {names:?}"
    );
    assert_eq!(
        n.post("/api/collections/posts/records", None, &json!({"title": "still here"}))
            .0,
        200,
        "posts table intact"
    );

    let (s, posts) = n.get("/api/collections/posts", Some(&t));
    assert_eq!(s, 200);
    assert_eq!(posts["fields"].as_array().unwrap().len(), 11);
    assert_eq!(posts["fields"][8]["maxSelect"], 3, "options at the top level");
    let id = posts["id"].as_str().unwrap();
    assert_eq!(n.get(&format!("/api/collections/{id}"), Some(&t)).1["name"], "posts");

    // Append-only updates: add a field and an index; type changes and renames are refused.
    let mut fields = posts["fields"].as_array().unwrap().clone();
    fields.push(json!({"name": "score", "type": "number"}));
    let (s, b) = n.patch(
        "/api/collections/posts",
        Some(&t),
        &json!({"fields": fields, "indexes": ["CREATE INDEX idx_score ON posts (score DESC)"]}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["indexes"][0],
        "CREATE INDEX \"idx_score\" ON \"posts\" (\"score\" DESC)"
    );
    let (s, rec) = n.post(
        "/api/collections/posts/records",
        None,
        &json!({"title": "scored", "score": 5}),
    );
    assert_eq!((s, rec["score"].clone()), (200, json!(5)));
    let mut changed = fields.clone();
    changed[0]["type"] = json!("number");
    assert_eq!(
        n.patch("/api/collections/posts", Some(&t), &json!({"fields": changed}))
            .0,
        400
    );
    assert_eq!(
        n.patch("/api/collections/posts", Some(&t), &json!({"name": "renamed"}))
            .0,
        400
    );

    // Dropping a field from the list soft-deletes it; sending it again revives it with its data.
    let without: Vec<Value> = fields.iter().filter(|f| f["name"] != "score").cloned().collect();
    assert_eq!(
        n.patch("/api/collections/posts", Some(&t), &json!({"fields": without}))
            .0,
        200
    );
    let (_, got) = n.get(
        &format!("/api/collections/posts/records/{}", rec["id"].as_str().unwrap()),
        None,
    );
    assert!(got.get("score").is_none(), "{got}");
    assert_eq!(
        n.patch("/api/collections/posts", Some(&t), &json!({"fields": fields}))
            .0,
        200
    );
    let (_, got) = n.get(
        &format!("/api/collections/posts/records/{}", rec["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(got["score"], 5, "the column and its data were kept");

    // Soft delete: gone from the API, name stays reserved, data stays in the file.
    let (s, _) = n.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "tmp", "listRule": "", "createRule": "", "fields": [{"name": "x", "type": "text"}]}),
    );
    assert_eq!(s, 200);
    assert_eq!(
        n.post("/api/collections/tmp/records", None, &json!({"x": "kept"})).0,
        200
    );
    assert_eq!(n.delete("/api/collections/tmp", Some(&t)).0, 204);
    assert_eq!(n.get("/api/collections/tmp", Some(&t)).0, 404);
    assert_eq!(n.get("/api/collections/tmp/records", None).0, 404);
    assert_eq!(n.post("/api/collections", Some(&t), &json!({"name": "tmp"})).0, 400);
    assert_eq!(
        n.delete("/api/collections/users", Some(&t)).0 / 100,
        2,
        "users is deletable (not system)"
    );
    assert_eq!(n.delete("/api/collections/_superusers", Some(&t)).0, 400);
    assert_eq!(n.get("/api/collections", None).0, 401);
}

#[test]
fn record_values_are_validated_per_type() {
    let n = master();
    let _t = with_posts(&n);
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "title"),
        (json!({"title": ""}), "title"),
        (json!({"title": "x".repeat(51)}), "title"),
        (json!({"title": "ok", "views": "many"}), "views"),
        (json!({"title": "ok", "views": -1}), "views"),
        (json!({"title": "ok", "done": "maybe"}), "done"),
        (json!({"title": "ok", "contact": "not-an-email"}), "contact"),
        (json!({"title": "ok", "site": "javascript:alert(1)"}), "site"),
        (json!({"title": "ok", "when": "yesterday"}), "when"),
        (json!({"title": "ok", "status": "archived"}), "status"),
        (json!({"title": "ok", "tags": ["a", "z"]}), "tags"),
        (json!({"title": "ok", "tags": [1]}), "tags"),
        (json!({"title": ["array"]}), "title"),
        (json!({"title": "ok", "id": "bad id!"}), "id"),
    ];
    for (body, field) in cases {
        let (s, b) = n.post("/api/collections/posts/records", None, &body);
        assert_eq!(s, 400, "{body}: {b}");
        assert!(b["data"].get(field).is_some(), "{body}: error should name {field}: {b}");
    }
    let (_, list) = n.get("/api/collections/posts/records", None);
    assert_eq!(list["totalItems"], 0, "no invalid record was stored");

    let (s, r) = n.post(
        "/api/collections/posts/records",
        None,
        &json!({"title": "all", "views": "3", "done": true, "contact": "a@b.co", "site": "https://x.y",
                "body": "<p>x</p>", "when": "2024-05-06T07:08:09Z", "status": "live", "tags": ["a", "b", "a"],
                "meta": {"k": [1, 2]}, "slug": "all", "unknownKey": 1}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["views"], 3);
    assert_eq!(r["when"], "2024-05-06 07:08:09.000Z");
    assert_eq!(r["tags"], json!(["a", "b"]));
    assert_eq!(r["meta"], json!({"k": [1, 2]}));
    assert!(r.get("unknownKey").is_none());
    assert_eq!(r["collectionName"], "posts");
    assert_eq!(r["id"].as_str().unwrap().len(), 15);
    let (s, b) = n.post(
        "/api/collections/posts/records",
        None,
        &json!({"title": "dup", "slug": "all"}),
    );
    assert_eq!(s, 400);
    assert_eq!(b["data"]["slug"]["code"], "validation_not_unique", "{b}");
    let (s, b) = n.post(
        "/api/collections/posts/records",
        None,
        &json!({"title": "dup id", "id": r["id"]}),
    );
    assert_eq!(
        (s, b["data"]["id"]["code"].clone()),
        (400, json!("validation_not_unique")),
        "{b}"
    );
}

#[test]
fn records_crud_modifiers_bulk_and_paging() {
    let n = master();
    let t = with_posts(&n);
    let (s, r) = n.post(
        "/api/collections/posts/records",
        None,
        &json!({"id": "custom_id-1", "title": "first", "views": 10, "tags": ["a"]}),
    );
    assert_eq!(s, 200, "{r}");
    let id = "custom_id-1";
    let path = format!("/api/collections/posts/records/{id}");
    assert_eq!(n.get(&path, None).1["title"], "first");
    let (s, u) = n.patch(&path, None, &json!({"views+": 5, "tags+": "b"}));
    assert_eq!(s, 200, "{u}");
    assert_eq!(
        (u["views"].clone(), u["tags"].clone(), u["title"].clone()),
        (json!(15), json!(["a", "b"]), json!("first"))
    );
    let (s, b) = n.patch(&path, None, &json!({"views-": 20}));
    assert_eq!(s, 400, "the min of 0 holds for modifiers too: {b}");
    let (_, u) = n.patch(&path, None, &json!({"views-": 15, "tags-": ["a"]}));
    assert_eq!((u["views"].clone(), u["tags"].clone()), (json!(0), json!(["b"])));
    assert_eq!(
        n.patch(&path, None, &json!({"title": ""})).0,
        400,
        "required holds on update"
    );
    assert_eq!(n.get(&path, None).1["title"], "first");
    assert_eq!(
        n.patch("/api/collections/posts/records/missing", None, &json!({"title": "x"}))
            .0,
        404
    );

    for i in 0..25 {
        assert_eq!(
            n.post(
                "/api/collections/posts/records",
                None,
                &json!({"title": format!("t{i:02}"), "views": i})
            )
            .0,
            200
        );
    }
    let (_, p1) = n.get("/api/collections/posts/records?perPage=10&sort=-views,title", None);
    assert_eq!(
        (
            p1["page"].clone(),
            p1["perPage"].clone(),
            p1["totalItems"].clone(),
            p1["totalPages"].clone()
        ),
        (json!(1), json!(10), json!(26), json!(3))
    );
    assert_eq!(p1["items"][0]["views"], 24);
    let (_, p3) = n.get("/api/collections/posts/records?perPage=10&page=3&sort=views", None);
    assert_eq!(p3["items"].as_array().unwrap().len(), 6);
    let (_, skip) = n.get("/api/collections/posts/records?perPage=5&skipTotal=1", None);
    assert_eq!(
        (skip["totalItems"].clone(), skip["totalPages"].clone()),
        (json!(-1), json!(-1))
    );
    assert_eq!(skip["items"].as_array().unwrap().len(), 5);
    let (_, big) = n.get("/api/collections/posts/records?perPage=5000", None);
    assert_eq!(big["perPage"], 1000, "perPage is capped");
    let (_, f) = n.get("/api/collections/posts/records?perPage=1&fields=id,title", None);
    assert_eq!(f["items"][0].as_object().unwrap().len(), 2, "{f}");
    for bad in [
        "sort=nope",
        "sort=-x%3BDROP",
        "page=abc",
        "filter=nope%3D1",
        "filter=title%20%3D",
        "expand=author",
    ] {
        let (s, b) = n.get(&format!("/api/collections/posts/records?{bad}"), None);
        assert_eq!(s, 400, "{bad}: {b}");
    }

    let (_, all) = n.get("/api/collections/posts/records?perPage=3&sort=-views", None);
    let ids: Vec<Value> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|r| r["id"].clone())
        .collect();
    let (s, b) = n.patch(
        "/api/collections/posts/records/bulk",
        Some(&t),
        &json!({"ids": ids, "data": {"done": true}}),
    );
    assert_eq!((s, b["updated"].clone()), (200, json!(ids)));
    let mut with_missing = ids.clone();
    with_missing.push(json!("missing"));
    assert_eq!(
        n.patch(
            "/api/collections/posts/records/bulk",
            None,
            &json!({"ids": with_missing, "data": {"views": 99}})
        )
        .0,
        404
    );
    let (_, r0) = n.get(
        &format!("/api/collections/posts/records/{}", ids[1].as_str().unwrap()),
        None,
    );
    assert_ne!(r0["views"], 99, "a failed bulk update changes nothing");
    assert_eq!(r0["done"], true);
    assert_eq!(
        n.request(
            "DELETE",
            "/api/collections/posts/records/bulk",
            None,
            Some(&json!({"ids": with_missing})),
            &[]
        )
        .0,
        404
    );
    let (s, b) = n.request(
        "DELETE",
        "/api/collections/posts/records/bulk",
        None,
        Some(&json!({"ids": ids})),
        &[],
    );
    assert_eq!((s, b["deleted"].clone()), (200, json!(ids)));
    assert_eq!(n.get("/api/collections/posts/records", None).1["totalItems"], 23);
    assert_eq!(n.delete(&path, None).0, 204);
    assert_eq!(n.get(&path, None).0, 404);
    assert_eq!(n.delete(&path, None).0, 404);
}

#[test]
fn rules_null_means_admins_only() {
    let n = master();
    let t = n.admin_token();
    let (s, _) = n.post("/api/collections", Some(&t), &json!({"name": "secret", "viewRule": "", "fields": [{"name": "x", "type": "text"}, {"name": "h", "type": "text", "hidden": true}]}));
    assert_eq!(s, 200);
    let (s, r) = n.post(
        "/api/collections/secret/records",
        Some(&t),
        &json!({"x": "1", "h": "hidden"}),
    );
    assert_eq!(s, 200);
    assert_eq!(r["h"], "hidden", "admins see hidden fields");
    let id = r["id"].as_str().unwrap();
    let (_, reg) = n.post(
        "/api/auth/register",
        None,
        &json!({"email": "u@example.com", "password": "userpass1", "passwordConfirm": "userpass1"}),
    );
    let user = reg["token"].as_str().unwrap().to_string();
    for token in [None, Some(user.as_str())] {
        assert_eq!(n.get("/api/collections/secret/records", token).0, 403);
        assert_eq!(
            n.post("/api/collections/secret/records", token, &json!({"x": "2"})).0,
            403
        );
        assert_eq!(
            n.patch(
                &format!("/api/collections/secret/records/{id}"),
                token,
                &json!({"x": "2"})
            )
            .0,
            403
        );
        assert_eq!(n.delete(&format!("/api/collections/secret/records/{id}"), token).0, 403);
        let (s, v) = n.get(&format!("/api/collections/secret/records/{id}"), token);
        assert_eq!(s, 200, "an empty viewRule is open");
        assert!(v.get("h").is_none(), "hidden field not shown: {v}");
    }
    assert_eq!(n.get("/api/collections/secret/records", Some(&t)).1["totalItems"], 1);
    // users: guests can sign up, and list nobody (the rule is `id = @request.auth.id`).
    let (s, list) = n.get("/api/collections/users/records", None);
    assert_eq!((s, list["totalItems"].clone()), (200, json!(0)), "{list}");
}

#[test]
fn relations_check_targets_and_cascade() {
    let n = master();
    let t = n.admin_token();
    let open = json!({"listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": ""});
    let mut a = open.clone();
    a["name"] = json!("authors");
    a["fields"] = json!([{"name": "name", "type": "text"}]);
    assert_eq!(n.post("/api/collections", Some(&t), &a).0, 200);
    let mut b = open.clone();
    b["name"] = json!("books");
    b["fields"] = json!([
        {"name": "author", "type": "relation", "collectionId": "authors", "cascadeDelete": true},
        {"name": "fans", "type": "relation", "collectionId": "authors", "maxSelect": 5},
    ]);
    let (s, body) = n.post("/api/collections", Some(&t), &b);
    assert_eq!(s, 200, "{body}");
    let mk = |name: &str| {
        n.post("/api/collections/authors/records", None, &json!({"name": name}))
            .1["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (x, y) = (mk("x"), mk("y"));
    let (s, e) = n.post("/api/collections/books/records", None, &json!({"author": "missing"}));
    assert_eq!(s, 400, "{e}");
    let (s, book) = n.post(
        "/api/collections/books/records",
        None,
        &json!({"author": x, "fans": [x, y]}),
    );
    assert_eq!(s, 200, "{book}");
    let bid = book["id"].as_str().unwrap().to_string();
    // Deleting y removes it from the multi relation; deleting x cascades to the book.
    assert_eq!(n.delete(&format!("/api/collections/authors/records/{y}"), None).0, 204);
    assert_eq!(
        n.get(&format!("/api/collections/books/records/{bid}"), None).1["fans"],
        json!([x])
    );
    assert_eq!(
        n.delete("/api/collections/authors", Some(&t)).0,
        400,
        "referenced collection cannot be deleted"
    );
    assert_eq!(n.delete(&format!("/api/collections/authors/records/{x}"), None).0, 204);
    assert_eq!(n.get(&format!("/api/collections/books/records/{bid}"), None).0, 404);
}

#[test]
fn errors_are_json_and_bodies_are_bounded() {
    let n = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            .env("BODY_LIMIT", "2048"),
    );
    let t = with_posts(&n);
    let (s, b) = n.raw(
        "POST",
        "/api/collections/posts/records",
        None,
        br#"{"title": "#.to_vec(),
    );
    assert_eq!(s, 400);
    assert_error_shape(400, &b);
    let (s, b) = n.raw("POST", "/api/collections/posts/records", None, b"[1,2]".to_vec());
    assert_eq!(s, 400, "{b}");
    let big = json!({"title": "x", "body": "y".repeat(4096)});
    let (s, b) = n.post("/api/collections/posts/records", None, &big);
    assert_eq!(s, 413, "{b}");
    assert_error_shape(413, &b);
    let (s, b) = n.get("/api/no/such/route", None);
    assert_eq!(s, 404);
    assert_error_shape(404, &b);
    let (s, b) = n.request("PUT", "/api/collections", Some(&t), Some(&json!({})), &[]);
    assert_eq!(s, 405);
    assert_error_shape(405, &b);
    let (s, b) = n.get("/api/collections/nope/records", None);
    assert_eq!(s, 404);
    assert_error_shape(404, &b);
    assert_eq!(
        n.get("/api/collections/posts/records", None).1["totalItems"],
        0,
        "nothing was written"
    );
}

#[test]
fn restart_keeps_data() {
    let n = master();
    let _t = with_posts(&n);
    let (_, r) = n.post("/api/collections/posts/records", None, &json!({"title": "durable"}));
    let n = n.restart();
    let (s, got) = n.get(
        &format!("/api/collections/posts/records/{}", r["id"].as_str().unwrap()),
        None,
    );
    assert_eq!((s, got["title"].clone()), (200, json!("durable")));
}

fn stored_ids(n: &Node) -> std::collections::HashSet<String> {
    let mut stored = std::collections::HashSet::new();
    for page in 1.. {
        let (_, list) = n.get(
            &format!("/api/collections/posts/records?perPage=1000&skipTotal=1&page={page}"),
            None,
        );
        let items = list["items"].as_array().unwrap();
        stored.extend(items.iter().map(|r| r["id"].as_str().unwrap().to_string()));
        if items.len() < 1000 {
            break;
        }
    }
    stored
}

fn burst_then(stop: impl FnOnce(&mut Node)) {
    let mut n = master();
    let _t = with_posts(&n);
    let url = n.url.clone();
    let burst = write_burst(&url, 6, Duration::from_secs(30));
    // Counted as the writers see them: a write committed but not yet answered when the server
    // dies is not acknowledged.
    wait_for("200 acknowledged writes", Duration::from_secs(30), || {
        (burst.acked() >= 200).then_some(())
    });
    burst.expect_stop();
    stop(&mut n);
    let acked = join_acked(burst);
    assert!(acked.len() >= 200, "burst acknowledged only {}", acked.len());
    let n = n.restart();
    let stored = stored_ids(&n);
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn sigterm_during_a_write_burst_loses_no_acknowledged_write() {
    burst_then(|n| {
        let code = n.terminate(Duration::from_secs(40));
        assert_eq!(code, Some(0), "clean exit on SIGTERM: {}", n.log());
        assert!(n.log().contains("databases closed"), "{}", n.log());
    });
}

#[test]
fn ctrl_c_during_a_write_burst_is_graceful_too() {
    burst_then(|n| {
        let code = n.signal(libc::SIGINT, Duration::from_secs(40));
        assert_eq!(code, Some(0), "clean exit on SIGINT: {}", n.log());
        assert!(n.log().contains("SIGINT received"), "{}", n.log());
        assert!(n.log().contains("databases closed"), "{}", n.log());
    });
}

#[test]
fn kill_9_during_a_write_burst_loses_no_acknowledged_write() {
    burst_then(Node::kill);
}

#[test]
fn the_default_users_collection_lets_a_user_read_edit_and_delete_only_itself() {
    let n = master();
    let signup = |email: &str| {
        let (s, b) = n.post(
            "/api/collections/users/records",
            None,
            &json!({"email": email, "password": "userpass1", "passwordConfirm": "userpass1"}),
        );
        assert_eq!(s, 200, "{b}");
        let (s, login) = n.post(
            "/api/collections/users/auth-with-password",
            None,
            &json!({"identity": email, "password": "userpass1"}),
        );
        assert_eq!(s, 200, "{login}");
        (
            b["id"].as_str().unwrap().to_string(),
            login["token"].as_str().unwrap().to_string(),
        )
    };
    let (me, token) = signup("me@example.com");
    let (other, _) = signup("other@example.com");
    let mine = format!("/api/collections/users/records/{me}");
    let theirs = format!("/api/collections/users/records/{other}");
    // Reads: itself only; a guest nothing.
    assert_eq!(n.get(&mine, Some(&token)).0, 200);
    assert_eq!(n.get(&theirs, Some(&token)).0, 404);
    let (s, list) = n.get("/api/collections/users/records", Some(&token));
    assert_eq!((s, list["totalItems"].clone()), (200, json!(1)), "{list}");
    assert_eq!(n.get("/api/collections/users/records", None).1["totalItems"], 0);
    // The password change Authentication.md describes, by the user.
    let (s, b) = n.patch(
        &mine,
        Some(&token),
        &json!({"oldPassword": "userpass1", "password": "changed123", "passwordConfirm": "changed123"}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, login) = n.post(
        "/api/collections/users/auth-with-password",
        None,
        &json!({"identity": "me@example.com", "password": "changed123"}),
    );
    assert_eq!(s, 200, "{login}");
    let token = login["token"].as_str().unwrap().to_string();
    assert_eq!(n.patch(&theirs, Some(&token), &json!({"name": "x"})).0, 404);
    assert_eq!(n.delete(&theirs, Some(&token)).0, 404);
    assert_eq!(n.delete(&mine, Some(&token)).0, 204);
    assert_eq!(n.get(&theirs, Some(&n.admin_token())).0, 200);
}

/// The claims of a JWT, unverified.
fn payload(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

#[test]
fn a_pocketbase_style_superuser_token_is_an_admin_token_and_no_other_token_is() {
    let n = master();
    n.admin_token();
    let (s, b) = n.post("/api/databases", Some(&n.admin_token()), &json!({"name": "other"}));
    assert_eq!(s, 201, "{b}");
    // PocketBase's SDK calls a session a superuser's when the token's type is `auth` and the
    // record's collectionName is `_superusers`.
    let (s, auth) = n.post(
        "/api/collections/_superusers/auth-with-password",
        None,
        &json!({"identity": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    );
    assert_eq!(s, 200, "{auth}");
    let token = auth["token"].as_str().unwrap().to_string();
    let claims = payload(&token);
    assert_eq!(claims["type"], "auth", "{claims}");
    assert_eq!(auth["record"]["collectionName"], "_superusers", "{auth}");
    assert_eq!(claims["collectionId"], auth["record"]["collectionId"]);
    // It is an admin's token, in every database, and refreshes as one.
    for db in ["default", "other"] {
        let (s, b) = n.request("GET", "/api/collections", Some(&token), None, &[("X-Dbname", db)]);
        assert_eq!(s, 200, "{db}: {b}");
    }
    let (s, b) = n.post("/api/collections/_superusers/auth-refresh", Some(&token), &json!({}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(payload(b["token"].as_str().unwrap())["type"], "auth");
    assert_eq!(n.get("/api/admins/me", Some(&token)).0, 200);
    // The same claims naming another database, or signed with another secret, are nobody's;
    // a user's `auth` token stays a user's.
    let mut elsewhere = claims.clone();
    elsewhere["db"] = json!("other");
    let mut foreign = claims.clone();
    foreign["exp"] = json!(now() + 600);
    let (_, reg) = n.post(
        "/api/auth/register",
        None,
        &json!({"email": "u@example.com", "password": "userpass1", "passwordConfirm": "userpass1"}),
    );
    let user = reg["token"].as_str().unwrap().to_string();
    let mut user_as_superuser = payload(&user);
    user_as_superuser["collectionId"] = claims["collectionId"].clone();
    for (name, t, want) in [
        ("another database", forge(elsewhere, SECRET), 401),
        ("another secret", forge(foreign, "another-secret-entirely"), 401),
        ("a user's token", user.clone(), 403),
        ("a user's id under _superusers", forge(user_as_superuser, SECRET), 401),
    ] {
        let (s, b) = n.get("/api/collections", Some(&t));
        assert_eq!(s, want, "{name}: {b}");
    }
}

#[test]
fn help_lists_the_commands_and_every_flag_of_serve() {
    let (code, out, _) = run_cli(&["--help"], &[]);
    assert_eq!(code, 0);
    for command in ["serve", "admin", "healthcheck"] {
        assert!(out.contains(command), "{out}");
    }
    let (code, out, _) = run_cli(&["serve", "--help"], &[]);
    assert_eq!(code, 0);
    // Every variable vski reads for `serve` is named beside its flag.
    let wiki = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../wiki/Configuration.md")).unwrap();
    let documented: Vec<&str> = wiki
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .filter_map(|l| l.split('`').nth(3))
        .collect();
    assert!(documented.len() > 30, "{documented:?}");
    for var in documented {
        assert!(out.contains(&format!("[env: {var}")), "{var} missing from serve --help");
    }
    let (code, out, _) = run_cli(&["admin", "--help"], &[]);
    assert_eq!(code, 0);
    for command in ["create", "list", "delete"] {
        assert!(out.contains(command), "{out}");
    }
}
