//! Cached list results are never stale: a read that starts after a write was acknowledged sees
//! it, on the master and on a replica, and callers with different rules never share rows.

use std::time::Duration;

use vski_tests::*;

const SECRET: &str = "cache-shared-secret-0123456789";

fn posts(m: &Node, t: &str) {
    let (s, b) = m.post(
        "/api/collections",
        Some(t),
        &json!({"name": "posts", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "title", "type": "text"}, {"name": "views", "type": "number"}]}),
    );
    assert_eq!(s, 200, "{b}");
}

fn titles(n: &Node, query: &str, headers: &[(&str, &str)]) -> Vec<String> {
    let (s, b) = n.request(
        "GET",
        &format!("/api/collections/posts/records?{query}"),
        None,
        None,
        headers,
    );
    assert_eq!(s, 200, "{b}");
    b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["title"].as_str().unwrap().to_string())
        .collect()
}

const QUERIES: [&str; 4] = [
    "perPage=5&sort=-views",
    "perPage=5&sort=-views&skipTotal=1",
    "perPage=5&sort=-title&filter=views%3E%3D0",
    "perPage=5",
];

#[test]
fn every_write_is_seen_by_the_next_read_on_the_master() {
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let t = m.admin_token();
    posts(&m, &t);
    for i in 0..20 {
        // Warm the cache for every query shape, then change what each would return.
        for q in QUERIES {
            titles(&m, q, &[]);
            titles(&m, q, &[]);
        }
        let title = format!("t{i:03}");
        let (s, b) = m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": title, "views": 1000 + i}),
        );
        assert_eq!(s, 200, "{b}");
        let id = b["id"].as_str().unwrap().to_string();
        assert_eq!(titles(&m, QUERIES[0], &[])[0], title, "create, sorted");
        assert_eq!(titles(&m, QUERIES[1], &[])[0], title, "create, skipTotal");
        let (_, page) = m.get("/api/collections/posts/records?perPage=5&sort=-views", None);
        assert_eq!(page["totalItems"], i + 1, "the total moves too");
        // An update that moves the record to the end of the order.
        let (s, _) = m.patch(
            &format!("/api/collections/posts/records/{id}"),
            None,
            &json!({"views": -1}),
        );
        assert_eq!(s, 200);
        assert!(!titles(&m, QUERIES[0], &[]).contains(&title) || i < 5, "update");
        // A delete.
        assert_eq!(m.delete(&format!("/api/collections/posts/records/{id}"), None).0, 204);
        for q in QUERIES {
            assert!(!titles(&m, q, &[]).contains(&title), "delete: {q}");
        }
        // Put it back for the next round.
        let (s, _) = m.post(
            "/api/collections/posts/records",
            None,
            &json!({"title": title, "views": i}),
        );
        assert_eq!(s, 200);
    }
    // A rule change is a write too: the cached rows of the old rule are not served.
    titles(&m, QUERIES[0], &[]);
    let (s, b) = m.patch("/api/collections/posts", Some(&t), &json!({"listRule": "views >= 15"}));
    assert_eq!(s, 200, "{b}");
    let after = titles(&m, "perPage=100&sort=-views", &[]);
    assert_eq!(after.len(), 5, "{after:?}");
}

#[test]
fn callers_with_different_rules_never_share_cached_rows() {
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let t = m.admin_token();
    let (s, b) = m.post(
        "/api/collections",
        Some(&t),
        &json!({"name": "notes", "listRule": "owner = @request.auth.id", "createRule": "@request.auth.id != ''",
                "fields": [{"name": "body", "type": "text"}, {"name": "owner", "type": "text"}]}),
    );
    assert_eq!(s, 200, "{b}");
    let mut tokens = Vec::new();
    for who in ["ann", "bob"] {
        let email = format!("{who}@example.com");
        let (s, b) = m.post(
            "/api/collections/users/records",
            None,
            &json!({"email": email, "password": "password123", "passwordConfirm": "password123"}),
        );
        assert_eq!(s, 200, "{b}");
        let id = b["id"].as_str().unwrap().to_string();
        let (_, a) = m.post(
            "/api/collections/users/auth-with-password",
            None,
            &json!({"identity": email, "password": "password123"}),
        );
        let tok = a["token"].as_str().unwrap().to_string();
        let (s, _) = m.post(
            "/api/collections/notes/records",
            Some(&tok),
            &json!({"body": format!("{who}'s"), "owner": id}),
        );
        assert_eq!(s, 200);
        tokens.push(tok);
    }
    for _ in 0..3 {
        for (tok, mine) in tokens.iter().zip(["ann's", "bob's"]) {
            let (s, b) = m.get("/api/collections/notes/records?sort=-created", Some(tok));
            assert_eq!(s, 200);
            let bodies: Vec<&str> = b["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["body"].as_str().unwrap())
                .collect();
            assert_eq!(bodies, [mine]);
        }
        let (_, b) = m.get("/api/collections/notes/records?sort=-created", None);
        assert_eq!(b["items"].as_array().unwrap().len(), 0, "a guest sees none");
    }
}

#[test]
fn every_applied_change_is_seen_by_the_next_read_on_a_replica() {
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let t = m.admin_token();
    posts(&m, &t);
    // A polling replica: it applies a write only when a read asks for its position.
    let r = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "60")
            .env("SYNC_MODE", "poll"),
    );
    wait_converged(&m, &r, SECRET, "default", Duration::from_secs(30));
    for i in 0..20 {
        for q in QUERIES {
            titles(&r, q, &[]);
            titles(&r, q, &[]);
        }
        let title = format!("r{i:03}");
        let resp = m
            .http
            .post(format!("{}/api/collections/posts/records", m.url))
            .json(&json!({"title": title, "views": 1000 + i}))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let position = resp.headers()["x-db-position"].to_str().unwrap().to_string();
        for q in QUERIES[..3].iter() {
            let got = titles(&r, q, &[("X-Min-Db-Position", &position)]);
            assert!(got.contains(&title), "{q}: {got:?}");
        }
    }
}
