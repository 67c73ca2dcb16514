//! The filter language and expression rules, against the real binary.

use vski_tests::*;

/// `people` (name, age, tags multi-select, active) and `posts` (title, author → people).
fn fixture() -> (Node, String) {
    let n = spawn_master();
    let t = n.admin_token();
    let open = |name: &str, fields: Value| json!({"name": name, "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "", "fields": fields});
    let (s, b) = n.post(
        "/api/collections",
        Some(&t),
        &open(
            "people",
            json!([{"name": "name", "type": "text"}, {"name": "age", "type": "number"},
                               {"name": "tags", "type": "select", "values": ["a", "b", "c"], "maxSelect": 3},
                               {"name": "active", "type": "bool"}, {"name": "born", "type": "date"}]),
        ),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = n.post("/api/collections", Some(&t), &open("posts", json!([{"name": "title", "type": "text"}, {"name": "author", "type": "relation", "collectionId": "people"}])));
    assert_eq!(s, 200, "{b}");
    let people = [
        ("Ada", 36, json!(["a", "b"]), true, "1815-12-10"),
        ("Bob's", 20, json!(["b"]), false, "2004-01-01"),
        ("Cy \"C\"", 51, json!([]), true, ""),
        ("d_100%", 0, json!(["c"]), false, "1990-06-15"),
    ];
    for (name, age, tags, active, born) in people {
        let (s, b) = n.post("/api/collections/people/records", None, &json!({"id": name.to_lowercase().replace(['\'', '"', ' ', '%'], "x"), "name": name, "age": age, "tags": tags, "active": active, "born": born}));
        assert_eq!(s, 200, "{b}");
    }
    for (title, author) in [("On engines", "ada"), ("Bits", "bobxs"), ("Orphan", "")] {
        assert_eq!(
            n.post(
                "/api/collections/posts/records",
                None,
                &json!({"title": title, "author": author})
            )
            .0,
            200
        );
    }
    (n, t)
}

fn names(n: &Node, coll: &str, key: &str, filter: &str, token: Option<&str>) -> (u16, Vec<String>, Value) {
    let q: String = filter
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let (s, b) = n.get(
        &format!("/api/collections/{coll}/records?perPage=100&sort={key}&filter={q}"),
        token,
    );
    let items = b["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r[key].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    (s, items, b)
}

#[test]
fn every_operator_and_operand_kind() {
    let (n, _) = fixture();
    let cases: &[(&str, &[&str])] = &[
        ("age = 36", &["Ada"]),
        ("age != 36", &["Bob's", "Cy \"C\"", "d_100%"]),
        ("age > 20", &["Ada", "Cy \"C\""]),
        ("age >= 20", &["Ada", "Bob's", "Cy \"C\""]),
        ("age < 20", &["d_100%"]),
        ("age <= 20", &["Bob's", "d_100%"]),
        ("name ~ 'a'", &["Ada"]),
        ("name !~ 'a'", &["Bob's", "Cy \"C\"", "d_100%"]),
        ("name ~ 'd%'", &["d_100%"]),
        ("name ~ '_'", &["d_100%"]),
        (r#"name = "Bob's""#, &["Bob's"]),
        (r#"name = 'Cy "C"'"#, &["Cy \"C\""]),
        (r#"name = 'Bob\'s'"#, &["Bob's"]),
        ("active = true", &["Ada", "Cy \"C\""]),
        ("active = false && age > 10", &["Bob's"]),
        ("(age > 40 || age < 10) && active = true", &["Cy \"C\""]),
        ("age > 40 || age < 10 && active = true", &["Cy \"C\""]),
        ("born = null", &["Cy \"C\""]),
        ("born != null && born < '1900-01-01'", &["Ada"]),
        // An empty date is "" and sorts before every date, as in PocketBase.
        ("born < @now", &["Ada", "Bob's", "Cy \"C\"", "d_100%"]),
        ("tags ?= 'b'", &["Ada", "Bob's"]),
        ("tags ?!= 'b'", &["Ada", "d_100%"]),
        ("tags = 'b'", &["Bob's"]),
        ("tags ?~ 'c'", &["d_100%"]),
        ("tags = null", &["Cy \"C\""]),
        ("age > 1.5e1 && age < 40", &["Ada", "Bob's"]),
        ("id = 'ada'", &["Ada"]),
        ("@request.auth.id = ''", &["Ada", "Bob's", "Cy \"C\"", "d_100%"]),
        ("@request.auth.id != ''", &[]),
    ];
    for (filter, want) in cases {
        let (s, got, b) = names(&n, "people", "name", filter, None);
        assert_eq!(s, 200, "{filter}: {b}");
        assert_eq!(got, *want, "{filter}");
    }
    let relation_cases: &[(&str, &[&str])] = &[
        ("author.name = 'Ada'", &["On engines"]),
        ("author.age < 30", &["Bits"]),
        ("author.tags ?= 'a'", &["On engines"]),
        ("author = null", &["Orphan"]),
    ];
    for (filter, want) in relation_cases {
        let (s, got, b) = names(&n, "posts", "title", filter, None);
        assert_eq!(s, 200, "{filter}: {b}");
        assert_eq!(got, *want, "{filter}");
    }
    // The total honours the filter.
    let (_, _, b) = names(&n, "people", "name", "age > 20", None);
    assert_eq!(b["totalItems"], 2);
}

#[test]
fn bad_filters_are_400_naming_the_problem_and_never_change_data() {
    let (n, _) = fixture();
    let cases = [
        ("nope = 1", "Unknown field 'nope'"),
        ("name = ", "at character 7"),
        ("name 'x'", "operator"),
        ("(name = 'x'", "')'"),
        ("name = 'x", "Unterminated"),
        ("name.x = 1", "not a relation"),
        ("name = @request.foo", "Unknown variable"),
    ];
    for (filter, needle) in cases {
        let (s, _, b) = names(&n, "people", "name", filter, None);
        assert_eq!(s, 400, "{filter}: {b}");
        let msg = b["data"]["filter"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{filter}: {msg}");
    }
    let long = format!("name = '{}'", "x".repeat(3600));
    assert_eq!(names(&n, "people", "name", &long, None).0, 400);
    let deep = format!("{}name = 1{}", "(".repeat(40), ")".repeat(40));
    assert_eq!(names(&n, "people", "name", &deep, None).0, 400);
    // An injection corpus: each is a 400 or exactly the answer the filter means, and every
    // table survives.
    let corpus: &[(&str, Option<&[&str]>)] = &[
        ("name = ''; DROP TABLE people; --'", None),
        ("name = 'x' OR 1=1", None),
        ("name = 'x' || 1 = 1", Some(&["Ada", "Bob's", "Cy \"C\"", "d_100%"])),
        ("name = \"\\\" OR \\\"1\\\"=\\\"1\"", Some(&[])),
        ("name = 'a' /* comment */", None),
        ("name ~ '%' && name = 'zzz'", Some(&[])),
        ("name = 'é😀\u{202e}'", Some(&[])),
        ("name = char(0)", None),
        ("name = ') OR (1=1'", Some(&[])),
        ("name = 'Ada' -- comment", None),
    ];
    for (filter, want) in corpus {
        let (s, got, b) = names(&n, "people", "name", filter, None);
        match want {
            None => assert_eq!(s, 400, "{filter}: {b}"),
            Some(want) => assert_eq!(
                (s, got.as_slice()),
                (200, &want.iter().map(|w| w.to_string()).collect::<Vec<_>>()[..]),
                "{filter}: {b}"
            ),
        }
    }
    let (_, all, _) = names(&n, "people", "name", "", None);
    assert_eq!(all.len(), 4, "no data changed");
    assert_eq!(names(&n, "posts", "title", "", None).1.len(), 3);
}

#[test]
fn rules_with_expressions_for_each_action() {
    let n = spawn_master();
    let t = n.admin_token();
    let (s, b) = n.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "notes", "fields": [{"name": "text", "type": "text"}, {"name": "owner", "type": "relation", "collectionId": "users"}],
                "listRule": "owner = @request.auth.id", "viewRule": "owner = @request.auth.id",
                "createRule": "@request.auth.id != '' && owner = @request.auth.id",
                "updateRule": "owner = @request.auth.id && @request.body.text != 'forbidden'",
                "deleteRule": "owner = @request.auth.id"}),
    );
    assert_eq!(s, 200, "{b}");
    let user = |email: &str| -> (String, String) {
        let (s, b) = n.post(
            "/api/auth/register",
            None,
            &json!({"email": email, "password": "userpass1", "passwordConfirm": "userpass1"}),
        );
        assert_eq!(s, 200, "{b}");
        (
            b["token"].as_str().unwrap().to_string(),
            b["record"]["id"].as_str().unwrap().to_string(),
        )
    };
    let (alice, alice_id) = user("alice@example.com");
    let (bob, bob_id) = user("bob@example.com");
    // create: only for yourself, and only when signed in.
    assert_eq!(
        n.post(
            "/api/collections/notes/records",
            None,
            &json!({"text": "x", "owner": alice_id})
        )
        .0,
        400
    );
    assert_eq!(
        n.post(
            "/api/collections/notes/records",
            Some(&bob),
            &json!({"text": "x", "owner": alice_id})
        )
        .0,
        400
    );
    let (s, note) = n.post(
        "/api/collections/notes/records",
        Some(&alice),
        &json!({"text": "mine", "owner": alice_id}),
    );
    assert_eq!(s, 200, "{note}");
    let id = note["id"].as_str().unwrap();
    let path = format!("/api/collections/notes/records/{id}");
    assert_eq!(
        n.get("/api/collections/notes/records", Some(&t)).1["totalItems"],
        1,
        "the failed creates left nothing"
    );
    // list filters, view/update/delete answer 404 to others.
    assert_eq!(n.get("/api/collections/notes/records", Some(&alice)).1["totalItems"], 1);
    assert_eq!(n.get("/api/collections/notes/records", Some(&bob)).1["totalItems"], 0);
    assert_eq!(n.get("/api/collections/notes/records", None).1["totalItems"], 0);
    assert_eq!(n.get(&path, Some(&bob)).0, 404);
    assert_eq!(n.get(&path, Some(&alice)).0, 200);
    assert_eq!(n.patch(&path, Some(&bob), &json!({"text": "hijacked"})).0, 404);
    assert_eq!(
        n.patch(&path, Some(&alice), &json!({"text": "forbidden"})).0,
        404,
        "@request.body is checked"
    );
    assert_eq!(
        n.patch(&path, Some(&alice), &json!({"text": "edited"})).1["text"],
        "edited"
    );
    assert_eq!(n.delete(&path, Some(&bob)).0, 404);
    assert_eq!(n.get(&path, Some(&t)).1["text"], "edited", "admins bypass rules");
    assert_eq!(n.delete(&path, Some(&alice)).0, 204);
    let _ = bob_id;
}

#[test]
fn expand_fields_and_sort_by_relation() {
    let (n, t) = fixture();
    // A related collection nobody but admins may view, and a relation to it.
    assert_eq!(
        n.post(
            "/api/collections",
            Some(&t),
            &json!({"name": "secrets", "fields": [{"name": "code", "type": "text"}]})
        )
        .0,
        200
    );
    let (_, secret) = n.post("/api/collections/secrets/records", Some(&t), &json!({"code": "s3cr3t"}));
    let (_, posts) = n.get("/api/collections/posts", Some(&t));
    let mut fields = posts["fields"].as_array().unwrap().clone();
    fields.push(json!({"name": "secret", "type": "relation", "collectionId": "secrets"}));
    fields.push(json!({"name": "readers", "type": "relation", "collectionId": "people", "maxSelect": 5}));
    fields.push(json!({"name": "meta", "type": "json"}));
    assert_eq!(
        n.patch("/api/collections/posts", Some(&t), &json!({"fields": fields}))
            .0,
        200
    );
    let (_, list) = n.get("/api/collections/posts/records?filter=title%3D'On%20engines'", None);
    let pid = list["items"][0]["id"].as_str().unwrap().to_string();
    let body = json!({"secret": secret["id"], "readers": ["bobxs", "ada"], "meta": {"k": ["x", "y"]}});
    assert_eq!(
        n.patch(&format!("/api/collections/posts/records/{pid}"), None, &body).0,
        200
    );
    // people has a self relation for nesting.
    let (_, people) = n.get("/api/collections/people", Some(&t));
    let mut pf = people["fields"].as_array().unwrap().clone();
    pf.push(json!({"name": "mentor", "type": "relation", "collectionId": "people"}));
    assert_eq!(
        n.patch("/api/collections/people", Some(&t), &json!({"fields": pf})).0,
        200
    );
    assert_eq!(
        n.patch("/api/collections/people/records/ada", None, &json!({"mentor": "bobxs"}))
            .0,
        200
    );

    let (s, v) = n.get(
        &format!("/api/collections/posts/records/{pid}?expand=author.mentor,readers,secret"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["expand"]["author"]["name"], "Ada");
    assert_eq!(
        v["expand"]["author"]["expand"]["mentor"]["name"], "Bob's",
        "nested expand"
    );
    let readers: Vec<&str> = v["expand"]["readers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        readers,
        vec!["bobxs", "ada"],
        "multi relations expand to a list, in order"
    );
    assert!(
        v["expand"].get("secret").is_none(),
        "a target the caller may not view is left out: {v}"
    );
    let (_, as_admin) = n.get(&format!("/api/collections/posts/records/{pid}?expand=secret"), Some(&t));
    assert_eq!(as_admin["expand"]["secret"]["code"], "s3cr3t");
    // fields with expand paths.
    let (_, f) = n.get(
        &format!("/api/collections/posts/records/{pid}?expand=author&fields=id,expand.author.name"),
        None,
    );
    assert_eq!(f, json!({"id": pid, "expand": {"author": {"name": "Ada"}}}));
    // expand on lists, and bad expands.
    let (s, l) = n.get("/api/collections/posts/records?expand=author&sort=title", None);
    assert_eq!(s, 200);
    assert_eq!(l["items"][0]["expand"]["author"]["name"], "Bob's");
    for bad in [
        "title",
        "nope",
        "author.name",
        "author.mentor.mentor.mentor.mentor.mentor.mentor",
    ] {
        assert_eq!(
            n.get(&format!("/api/collections/posts/records?expand={bad}"), None).0,
            400,
            "{bad}"
        );
    }
    // Sort by a relation path; multi paths cannot be sorted.
    let (s, sorted) = n.get("/api/collections/posts/records?sort=-author.age,title", None);
    assert_eq!(s, 200, "{sorted}");
    let titles: Vec<&str> = sorted["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, vec!["On engines", "Bits", "Orphan"]);
    assert_eq!(n.get("/api/collections/posts/records?sort=readers.name", None).0, 400);
    // Any-of on json arrays and multi relations.
    assert_eq!(
        names(&n, "posts", "title", "meta.k ?= 'x'", None).0,
        400,
        "json paths are not relations"
    );
    assert_eq!(
        names(&n, "posts", "title", "meta ?= 'x'", None).1.len(),
        0,
        "an object's values are not an array of 'x'"
    );
    assert_eq!(
        names(&n, "posts", "title", "readers ?= 'ada'", None).1,
        vec!["On engines"]
    );
    assert_eq!(
        names(&n, "posts", "title", "readers.name ?~ 'bob'", None).1,
        vec!["On engines"]
    );
}

#[test]
fn declared_indexes_are_used() {
    let (n, t) = fixture();
    let (s, b) = n.patch(
        "/api/collections/people",
        Some(&t),
        &json!({"indexes": ["CREATE INDEX idx_people_age ON people (age)"]}),
    );
    assert_eq!(s, 200, "{b}");
    let conn = vski::rusqlite::Connection::open_with_flags(
        n.data_dir.join("default.db"),
        vski::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let schema = vski::collections::store::load_schema(&conn).unwrap();
    let people = schema.get("people").unwrap();
    let e = vski::query::parse("age > 30").unwrap().unwrap();
    let ctx = vski::query::Context {
        schema: &schema,
        auth: None,
        body: None,
        now: String::new(),
        admin: true,
    };
    let cond = vski::query::compile(&e, &people, &ctx).unwrap();
    let sql = format!("EXPLAIN QUERY PLAN SELECT * FROM people _t WHERE {}", cond.sql);
    let plan: Vec<String> = conn
        .prepare(&sql)
        .unwrap()
        .query_map(vski::rusqlite::params_from_iter(cond.params.iter()), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(plan.iter().any(|p| p.contains("idx_people_age")), "{plan:?}");
}

#[test]
fn random_query_parameters_never_fail_the_server_or_change_data() {
    let (n, t) = fixture();
    let before = n.get("/api/collections/people/records?perPage=100&sort=id", Some(&t)).1;
    let pool = [
        "name",
        "age",
        "tags",
        "author",
        "author.name",
        "author.tags",
        "id",
        "-",
        "+",
        "@random",
        ",",
        ".",
        "=",
        "!=",
        "~",
        "?=",
        ">",
        "&&",
        "||",
        "(",
        ")",
        "'",
        "\"",
        "x",
        "1",
        "null",
        "true",
        "@now",
        "@request.auth.id",
        "*",
        "expand",
        ";",
        "--",
        "%",
        "\\",
        "é",
        " ",
        "DROP TABLE people",
    ];
    let mut seed = 0x1234_5678_9abc_def1_u64;
    let mut next = |m: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % m as u64) as usize
    };
    for i in 0..400 {
        let len = next(8);
        let text: String = (0..len)
            .map(|_| pool[next(pool.len())])
            .collect::<Vec<_>>()
            .join(if next(2) == 0 { " " } else { "" });
        let enc: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
        let param = ["filter", "sort", "expand", "fields"][i % 4];
        let coll = if i % 3 == 0 { "people" } else { "posts" };
        let (s, b) = n.get(&format!("/api/collections/{coll}/records?{param}={enc}"), None);
        assert!(s == 200 || s == 400, "{param}={text:?}: {s} {b}");
    }
    assert_eq!(
        n.get("/api/collections/people/records?perPage=100&sort=id", Some(&t)).1,
        before,
        "no data changed"
    );
}

#[test]
fn hidden_fields_cannot_be_probed_by_filter_or_sort() {
    let n = spawn_master();
    let t = n.admin_token();
    let (s, b) = n.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "vault", "listRule": "", "fields": [{"name": "label", "type": "text"}, {"name": "pin", "type": "text", "hidden": true}]}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        n.post(
            "/api/collections/vault/records",
            Some(&t),
            &json!({"label": "a", "pin": "1234"})
        )
        .0,
        200
    );
    for q in ["filter=pin%20~%20'1'", "sort=pin", "filter=pin%20%3D%20null"] {
        let (s, b) = n.get(&format!("/api/collections/vault/records?{q}"), None);
        assert_eq!(s, 400, "{q}: {b}");
        assert_eq!(
            n.get(&format!("/api/collections/vault/records?{q}"), Some(&t)).0,
            200,
            "admins may: {q}"
        );
    }
    // Filters cannot read through a relation into records the caller may not view, nor probe
    // emails (users' viewRule is null).
    assert_eq!(
        n.post(
            "/api/auth/register",
            None,
            &json!({"email": "ada@example.com", "password": "userpass1", "passwordConfirm": "userpass1"})
        )
        .0,
        200
    );
    let (_, v) = n.get("/api/collections/vault", Some(&t));
    let mut fields = v["fields"].as_array().unwrap().clone();
    fields.push(json!({"name": "owner", "type": "relation", "collectionId": "users"}));
    assert_eq!(
        n.patch("/api/collections/vault", Some(&t), &json!({"fields": fields}))
            .0,
        200
    );
    let (_, me) = n.post(
        "/api/auth/login",
        None,
        &json!({"identity": "ada@example.com", "password": "userpass1"}),
    );
    let user = me["token"].as_str().unwrap().to_string();
    for token in [None, Some(user.as_str())] {
        let (s, b) = n.get("/api/collections/vault/records?filter=owner.email%20~%20'ada'", token);
        assert_eq!(s, 400, "{b}");
        assert_eq!(n.get("/api/collections/vault/records?sort=owner.email", token).0, 400);
    }
    assert_eq!(
        n.get(
            "/api/collections/vault/records?filter=owner.email%20~%20'ada'",
            Some(&t)
        )
        .0,
        200
    );
    // A rule may use a hidden field: admins write rules.
    let (s, b) = n.patch("/api/collections/vault", Some(&t), &json!({"listRule": "pin != ''"}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(n.get("/api/collections/vault/records", None).1["totalItems"], 1);
}

#[test]
fn a_sort_of_thousands_of_terms_is_a_400_not_a_500() {
    let n = spawn_master();
    let admin = n.admin_token();
    let (s, b) = n.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "posts", "listRule": "", "fields": [{"name": "title", "type": "text"}]}),
    );
    assert_eq!(s, 200, "{b}");
    let many = vec!["title"; 2500].join(",");
    let (s, b) = n.get(&format!("/api/collections/posts/records?sort={many}"), None);
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["data"]["sort"]["code"], "validation_too_many_values", "{b}");
    let sixteen = vec!["-title"; 16].join(",");
    assert_eq!(
        n.get(&format!("/api/collections/posts/records?sort={sixteen}"), None).0,
        200
    );
}
