//! Files of `file` fields on local storage: multipart uploads, serving with ETag and Range
//! under the viewRule, replace/append/remove, cleanup on delete, traversal attempts, limits,
//! and a 200 MB upload that streams to disk. Real processes on loopback.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::blocking::multipart::{Form, Part};
use vski_tests::*;

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn docs(node: &Node, token: &str, extra: Value) -> Value {
    let mut def = json!({"name": "docs", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
    "fields": [
        {"name": "title", "type": "text"},
        {"name": "n", "type": "number"},
        {"name": "files", "type": "file", "maxSelect": 3, "maxSize": 100000},
        {"name": "avatar", "type": "file", "mimeTypes": ["image/png", "text/plain"]}
    ]});
    if let (Some(d), Some(e)) = (def.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
    let (s, b) = node.post("/api/collections", Some(token), &def);
    assert_eq!(s, 200, "{b}");
    b
}

fn part(bytes: &[u8], name: &str, mime: &str) -> Part {
    Part::bytes(bytes.to_vec())
        .file_name(name.to_string())
        .mime_str(mime)
        .unwrap()
}

fn send(node: &Node, method: &str, path: &str, token: Option<&str>, form: Form) -> (u16, Value) {
    let mut rb = client()
        .request(method.parse().unwrap(), format!("{}{path}", node.url))
        .multipart(form);
    if let Some(t) = token {
        rb = rb.header("Authorization", t);
    }
    let r = rb.send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn fetch(node: &Node, path: &str, headers: &[(&str, &str)]) -> reqwest::blocking::Response {
    let mut rb = client().get(format!("{}{path}", node.url));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().unwrap()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn stored(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = files_under(&node.data_dir.join("storage"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn names(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        Value::String(s) if !s.is_empty() => vec![s.clone()],
        _ => vec![],
    }
}

#[test]
fn upload_serve_replace_append_remove_and_delete() {
    let n = spawn_master();
    let admin = n.admin_token();
    let c = docs(&n, &admin, json!({}));
    let form = Form::new()
        .text("title", "first")
        .part("files", part(b"hello world", "Hello World.txt", "text/plain"))
        .part(
            "files",
            part(&[7u8; 5000], "../../data.bin", "application/octet-stream"),
        )
        .part("avatar", part(b"\x89PNG fake", "me.png", "image/png"));
    let (s, rec) = send(&n, "POST", "/api/collections/docs/records", None, form);
    assert_eq!(s, 200, "{rec}");
    let id = rec["id"].as_str().unwrap().to_string();
    let files = names(&rec["files"]);
    assert_eq!(files.len(), 2);
    assert!(
        files[0].starts_with("hello_world_") && files[0].ends_with(".txt"),
        "{files:?}"
    );
    assert!(files[1].starts_with("data_") && files[1].ends_with(".bin"), "{files:?}");
    let dir = n
        .data_dir
        .join("storage/default")
        .join(c["id"].as_str().unwrap())
        .join(&id);
    assert!(dir.join(&files[0]).exists(), "{}", dir.display());

    // Serving: bytes, type, ETag/304, Range/206, download.
    let url = format!("/api/files/docs/{id}/{}", files[0]);
    let r = fetch(&n, &url, &[]);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    // Only images, video, audio and PDF are shown inline; text comes as an attachment.
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("sandbox")
    );
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(r.text().unwrap(), "hello world");
    assert_eq!(fetch(&n, &url, &[("If-None-Match", &etag)]).status(), 304);
    let r = fetch(&n, &url, &[("Range", "bytes=6-10")]);
    assert_eq!(r.status(), 206);
    assert_eq!(r.text().unwrap(), "world");
    let r = fetch(&n, &format!("{url}?download=1"), &[]);
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    let bin = fetch(&n, &format!("/api/files/docs/{id}/{}", files[1]), &[])
        .bytes()
        .unwrap();
    assert_eq!(&bin[..], &[7u8; 5000][..]);

    // Append with `files+`, remove with `files-`.
    let form = Form::new()
        .part("files+", part(b"third", "three.txt", "text/plain"))
        .text("files-", files[1].clone());
    let (s, up) = send(&n, "PATCH", &format!("/api/collections/docs/records/{id}"), None, form);
    assert_eq!(s, 200, "{up}");
    let now = names(&up["files"]);
    assert_eq!(now.len(), 2);
    assert_eq!(now[0], files[0]);
    assert!(now[1].starts_with("three_"));
    wait_for("the removed file to go", Duration::from_secs(5), || {
        (!dir.join(&files[1]).exists()).then_some(())
    });
    // Too many files: 400, and nothing changes on disk or in the record.
    let before = stored(&n);
    let form = Form::new()
        .part("files+", part(b"4", "4.txt", "text/plain"))
        .part("files+", part(b"5", "5.txt", "text/plain"));
    let (s, b) = send(&n, "PATCH", &format!("/api/collections/docs/records/{id}"), None, form);
    assert_eq!(s, 400, "{b}");
    assert!(b["data"]["files"].is_object(), "{b}");
    assert_eq!(stored(&n), before);
    assert_eq!(
        names(&n.get(&format!("/api/collections/docs/records/{id}"), None).1["files"]),
        now
    );

    // A new avatar replaces the old one, whose file goes.
    let old_avatar = rec["avatar"].as_str().unwrap().to_string();
    let form = Form::new().part("avatar", part(b"plain", "me.txt", "text/plain"));
    let (s, up) = send(&n, "PATCH", &format!("/api/collections/docs/records/{id}"), None, form);
    assert_eq!(s, 200, "{up}");
    assert!(up["avatar"].as_str().unwrap().starts_with("me_"));
    wait_for("the old avatar to go", Duration::from_secs(5), || {
        (!dir.join(&old_avatar).exists()).then_some(())
    });
    // JSON: keep a subset (the others are deleted); a name the record does not hold is refused.
    let (s, up) = n.patch(
        &format!("/api/collections/docs/records/{id}"),
        None,
        &json!({"files": [now[1]]}),
    );
    assert_eq!(s, 200, "{up}");
    assert_eq!(names(&up["files"]), vec![now[1].clone()]);
    wait_for("the dropped file to go", Duration::from_secs(5), || {
        (!dir.join(&now[0]).exists()).then_some(())
    });
    let (s, _) = n.patch(
        &format!("/api/collections/docs/records/{id}"),
        None,
        &json!({"files": [now[1], "other_0123456789.txt"]}),
    );
    assert_eq!(s, 400);
    assert_eq!(
        fetch(&n, &format!("/api/files/docs/{id}/{}", now[0]), &[]).status(),
        404
    );

    // Deleting the record deletes its files.
    assert_eq!(n.delete(&format!("/api/collections/docs/records/{id}"), None).0, 204);
    wait_for("the record's files to go", Duration::from_secs(5), || {
        (!dir.exists()).then_some(())
    });
    assert!(files_under(&n.data_dir.join("storage")).is_empty(), "{:?}", stored(&n));
}

#[test]
fn invalid_uploads_are_refused_and_store_nothing() {
    let n = spawn_master();
    let admin = n.admin_token();
    docs(&n, &admin, json!({}));
    for (form, field) in [
        (
            Form::new().part(
                "files",
                part(&vec![1u8; 100_001], "big.bin", "application/octet-stream"),
            ),
            "files",
        ),
        (
            Form::new().part("avatar", part(b"<svg/>", "x.svg", "image/svg+xml")),
            "avatar",
        ),
        (Form::new().part("title", part(b"x", "x.txt", "text/plain")), "title"),
        (
            Form::new()
                .part("avatar", part(b"a", "a.txt", "text/plain"))
                .part("avatar", part(b"b", "b.txt", "text/plain")),
            "avatar",
        ),
        (Form::new().text("files", "made_up_0123456789.txt"), "files"),
        (
            Form::new()
                .text("n", "many")
                .part("files", part(b"ok", "ok.txt", "text/plain")),
            "n",
        ),
    ] {
        let (s, b) = send(&n, "POST", "/api/collections/docs/records", None, form);
        assert_eq!(s, 400, "{field}: {b}");
        assert!(b["data"][field].is_object(), "{field}: {b}");
    }
    assert!(files_under(&n.data_dir.join("storage")).is_empty(), "{:?}", stored(&n));
    assert_eq!(n.get("/api/collections/docs/records", None).1["totalItems"], 0);
    // @jsonPayload and text parts together.
    let form = Form::new()
        .text("@jsonPayload", json!({"title": "from json", "n": 5}).to_string())
        .part("files", part(b"ok", "ok.txt", "text/plain"));
    let (s, b) = send(&n, "POST", "/api/collections/docs/records", None, form);
    assert_eq!(s, 200, "{b}");
    assert_eq!((b["title"].as_str(), b["n"].as_f64()), (Some("from json"), Some(5.0)));
}

#[test]
fn files_follow_the_view_rule() {
    let n = spawn_master();
    let admin = n.admin_token();
    let (_, users) = n.get("/api/collections/users", Some(&admin));
    docs(
        &n,
        &admin,
        json!({"viewRule": "owner = @request.auth.id", "listRule": "owner = @request.auth.id",
               "fields": [{"name": "owner", "type": "relation", "collectionId": users["id"]},
                          {"name": "files", "type": "file", "maxSelect": 2}]}),
    );
    let mut tokens = Vec::new();
    for email in ["owner@example.com", "other@example.com"] {
        let (s, b) = n.post(
            "/api/collections/users/records",
            None,
            &json!({"email": email, "password": "password123", "passwordConfirm": "password123"}),
        );
        assert_eq!(s, 200, "{b}");
        let (_, b) = n.post(
            "/api/collections/users/auth-with-password",
            None,
            &json!({"identity": email, "password": "password123"}),
        );
        tokens.push((
            b["record"]["id"].as_str().unwrap().to_string(),
            b["token"].as_str().unwrap().to_string(),
        ));
    }
    let (owner, token) = &tokens[0];
    let form = Form::new()
        .text("owner", owner.clone())
        .part("files", part(b"secret", "secret.txt", "text/plain"));
    let (s, rec) = send(&n, "POST", "/api/collections/docs/records", Some(token), form);
    assert_eq!(s, 200, "{rec}");
    let url = format!(
        "/api/files/docs/{}/{}",
        rec["id"].as_str().unwrap(),
        rec["files"][0].as_str().unwrap()
    );
    assert_eq!(fetch(&n, &url, &[]).status(), 404, "a guest");
    assert_eq!(
        fetch(&n, &url, &[("Authorization", &tokens[1].1)]).status(),
        404,
        "another user"
    );
    assert_eq!(fetch(&n, &url, &[("Authorization", token)]).text().unwrap(), "secret");
    assert_eq!(
        fetch(&n, &format!("{url}?token={token}"), &[]).status(),
        200,
        "a token in the URL"
    );
    assert_eq!(fetch(&n, &url, &[("Authorization", &admin)]).status(), 200, "an admin");
}

#[test]
fn traversal_attempts_never_leave_storage() {
    let n = spawn_master();
    let admin = n.admin_token();
    docs(&n, &admin, json!({}));
    let form = Form::new().part("files", part(b"inside", "in.txt", "text/plain"));
    let (_, rec) = send(&n, "POST", "/api/collections/docs/records", None, form);
    let id = rec["id"].as_str().unwrap();
    let good = rec["files"][0].as_str().unwrap();
    std::fs::write(n.data_dir.join("canary.txt"), "CANARY-OUTSIDE").unwrap();
    std::fs::write(n.data_dir.join("storage/canary.txt"), "CANARY-STORAGE").unwrap();
    for path in [
        format!("/api/files/docs/{id}/..%2F..%2F..%2Fcanary.txt"),
        format!("/api/files/docs/{id}/../../../canary.txt"),
        format!("/api/files/docs/{id}/%2e%2e%2f%2e%2e%2fcanary.txt"),
        format!("/api/files/docs/{id}/....//....//canary.txt"),
        format!("/api/files/docs/..%2F..%2F/{good}"),
        format!("/api/files/docs/{id}%2F..%2F..%2F..%2F/canary.txt"),
        format!("/api/files/..%2Fdocs/{id}/{good}"),
        format!("/api/files/docs/{id}/%2Fetc%2Fpasswd"),
        format!("/api/files/docs/{id}/canary.txt"),
        format!("/api/files/docs/{id}/{good}%00.txt"),
        "/api/files/docs/../../canary.txt".to_string(),
        format!("/api/files/docs/{id}/default.db"),
    ] {
        let r = fetch(&n, &path, &[]);
        let status = r.status().as_u16();
        let body = r.text().unwrap_or_default();
        assert!(matches!(status, 400 | 404), "{path}: {status}");
        assert!(!body.contains("CANARY") && !body.contains("root:"), "{path}: {body}");
    }
    assert_eq!(
        fetch(&n, &format!("/api/files/docs/{id}/{good}"), &[]).text().unwrap(),
        "inside"
    );
}

/// A reader of `left` bytes of a repeating pattern, made as it is read.
struct Pattern {
    left: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[test]
fn a_200_mb_upload_streams_to_disk_with_flat_memory() {
    let n = spawn_master_with(NodeOptions::default().env("FILE_UPLOAD_LIMIT", "300000000"));
    let admin = n.admin_token();
    docs(
        &n,
        &admin,
        json!({"fields": [{"name": "files", "type": "file", "maxSelect": 1, "maxSize": 250000000}]}),
    );
    let before = proc_status_kb(n.pid(), "VmRSS:");
    let size: u64 = 200 * 1024 * 1024;
    let body = Part::reader_with_length(Pattern { left: size }, size)
        .file_name("big.bin")
        .mime_str("application/octet-stream")
        .unwrap();
    let (s, rec) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        None,
        Form::new().part("files", body),
    );
    assert_eq!(s, 200, "{rec}");
    let peak = proc_status_kb(n.pid(), "VmHWM:");
    eprintln!(
        "200 MiB upload: server RSS {} MiB before, peak {} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(peak < before + 64 * 1024, "peak RSS {peak} kB (before {before} kB)");
    let path = format!(
        "/api/files/docs/{}/{}",
        rec["id"].as_str().unwrap(),
        rec["files"].as_str().unwrap()
    );
    let r = fetch(&n, &path, &[]);
    assert_eq!(r.headers()["content-length"], size.to_string().as_str());
    // Over the request limit: 413, nothing stored.
    let n2 = spawn_master_with(NodeOptions::default().env("FILE_UPLOAD_LIMIT", "1000000"));
    let admin2 = n2.admin_token();
    docs(
        &n2,
        &admin2,
        json!({"fields": [{"name": "files", "type": "file", "maxSize": 5000000}]}),
    );
    let (s, _) = send(
        &n2,
        "POST",
        "/api/collections/docs/records",
        None,
        Form::new().part(
            "files",
            part(&vec![0u8; 2_000_000], "x.bin", "application/octet-stream"),
        ),
    );
    assert_eq!(s, 413);
    assert!(files_under(&n2.data_dir.join("storage")).is_empty());
}

#[test]
fn a_caller_the_rules_refuse_cannot_upload_first() {
    let n = spawn_master();
    let admin = n.admin_token();
    docs(&n, &admin, json!({"createRule": null, "updateRule": null}));
    // Larger than the field's maxSize: read first, it would be a 400 about the size.
    let big = vec![0u8; 200_000];
    let (s, b) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        None,
        Form::new().part("files", part(&big, "big.bin", "application/octet-stream")),
    );
    assert_eq!(s, 403, "{b}");
    let (s, rec) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        Some(&admin),
        Form::new().part("files", part(b"ok", "ok.txt", "text/plain")),
    );
    assert_eq!(s, 200, "{rec}");
    let (s, b) = send(
        &n,
        "PATCH",
        &format!("/api/collections/docs/records/{}", rec["id"].as_str().unwrap()),
        None,
        Form::new().part("files+", part(&big, "big.bin", "application/octet-stream")),
    );
    assert_eq!(s, 403, "{b}");
    assert_eq!(stored(&n).len(), 1);
}

#[test]
fn text_parts_are_bounded_in_total_not_only_each() {
    let n = spawn_master();
    let admin = n.admin_token();
    docs(&n, &admin, json!({}));
    // Twelve parts of 1 MiB: each is small, together they are more than a record's 10 MiB of
    // text; the server must refuse instead of holding them all in memory.
    let mut form = Form::new();
    for i in 0..12 {
        form = form.text(format!("junk{i}"), "x".repeat(1024 * 1024));
    }
    let (s, b) = send(&n, "POST", "/api/collections/docs/records", None, form);
    assert_eq!(s, 413, "{b}");
    assert_eq!(n.get("/api/collections/docs/records", None).1["totalItems"], 0);
}

/// Bytes process `pid` has written so far (`wchar` of `/proc/PID/io`: files and sockets).
fn written_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar: ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Sends the head of a multipart request announcing `announced` bytes of body, and only the
/// first part's first 64 KiB; returns the status line the server answers with (within 30 s).
fn answer_before_the_body(n: &Node, method: &str, path: &str, announced: usize) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", n.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = "--XyZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n\
                Content-Type: application/octet-stream\r\n\r\n";
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n\
         Content-Length: {announced}\r\n\r\n{head}"
    )
    .unwrap();
    s.write_all(&vec![7u8; 64 * 1024]).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no answer before the rest of the body: {e}"));
    line.trim_end().to_string()
}

#[test]
fn a_rule_that_needs_no_body_refuses_an_upload_before_reading_it() {
    let n = spawn_master();
    let admin = n.admin_token();
    docs(
        &n,
        &admin,
        json!({"createRule": "@request.auth.id != ''", "updateRule": "@request.auth.id != ''",
               "fields": [{"name": "title", "type": "text"},
                          {"name": "files", "type": "file", "maxSelect": 3, "maxSize": 100000000}]}),
    );
    let (s, rec) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        Some(&admin),
        Form::new().text("title", "mine"),
    );
    assert_eq!(s, 200, "{rec}");
    let before = written_bytes(n.pid());
    // A guest announces 50 MB and sends 64 KiB: the answer comes without the rest.
    let line = answer_before_the_body(&n, "POST", "/api/collections/docs/records", 50_000_000);
    assert!(line.starts_with("HTTP/1.1 400"), "{line}");
    let path = format!("/api/collections/docs/records/{}", rec["id"].as_str().unwrap());
    let line = answer_before_the_body(&n, "PATCH", &path, 50_000_000);
    assert!(line.starts_with("HTTP/1.1 404"), "{line}");
    let wrote = written_bytes(n.pid()) - before;
    assert!(wrote < 1_000_000, "the refused uploads cost {wrote} bytes of writes");
    assert!(files_under(&n.data_dir.join("storage")).is_empty());
    // Signed in, the same upload goes through.
    let (s, b) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        Some(&admin),
        Form::new().part("files", part(&vec![1u8; 300_000], "a.bin", "application/octet-stream")),
    );
    assert_eq!(s, 200, "{b}");
}

#[test]
fn a_multipart_body_has_at_most_100_parts_and_body_limit_of_text() {
    let n = spawn_master_with(NodeOptions::default().env("BODY_LIMIT", "2000000"));
    let admin = n.admin_token();
    docs(&n, &admin, json!({}));
    // 1,000 empty file parts: refused at the 101st, not after 1,000 temporary files.
    let mut form = Form::new();
    for i in 0..1000 {
        form = form.part("files", part(b"", &format!("e{i}.bin"), "application/octet-stream"));
    }
    let (s, b) = send(&n, "POST", "/api/collections/docs/records", None, form);
    assert_eq!(s, 400, "{b}");
    assert!(b["message"].as_str().unwrap().contains("at most 100 parts"), "{b}");
    // Text parts together are held to BODY_LIMIT (2 MB here): three of 1 MB are too many.
    let mut form = Form::new();
    for i in 0..3 {
        form = form.text(format!("junk{i}"), "x".repeat(1_000_000));
    }
    let (s, b) = send(&n, "POST", "/api/collections/docs/records", None, form);
    assert_eq!(s, 413, "{b}");
    assert_eq!(n.get("/api/collections/docs/records", None).1["totalItems"], 0);
    assert!(files_under(&n.data_dir.join("storage")).is_empty());
}

#[test]
fn a_record_id_that_cannot_exist_places_nothing() {
    use std::io::{BufRead, Write};
    let n = spawn_master();
    let admin = n.admin_token();
    docs(&n, &admin, json!({}));
    let storage = n.data_dir.join("storage");
    let listing = || {
        let mut v: Vec<PathBuf> = walk_all(&storage);
        v.sort();
        v
    };
    let before = listing();
    for id in ["..", "a%2F..", "x.y"] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", n.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = "--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\n\
                    Content-Type: text/plain\r\n\r\nhello\r\n--B--\r\n";
        write!(
            s,
            "PATCH /api/collections/docs/records/{id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 404"), "{id}: {line}");
    }
    assert_eq!(listing(), before, "nothing was written under storage/");
}

/// Every file and directory under `dir`.
fn walk_all(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.clone());
            if p.is_dir() {
                out.extend(walk_all(&p));
            }
        }
    }
    out
}

#[test]
fn mime_types_are_checked_on_the_content_and_only_media_is_shown_inline() {
    let n = spawn_master();
    let admin = n.admin_token();
    docs(&n, &admin, json!({}));
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
    // `avatar` allows image/png and text/plain. A script declared as a PNG is not a PNG…
    let (s, b) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        None,
        Form::new().part("avatar", part(b"<script>alert(1)</script>", "x.png", "image/png")),
    );
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["data"]["avatar"]["code"], "validation_invalid_mime_type", "{b}");
    // …and a PDF declared as text is a PDF.
    let (s, b) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        None,
        Form::new().part("avatar", part(b"%PDF-1.7\n%fake", "notes.txt", "text/plain")),
    );
    assert_eq!(s, 400, "{b}");
    assert!(
        b["data"]["avatar"]["message"]
            .as_str()
            .unwrap()
            .contains("application/pdf"),
        "{b}"
    );
    // Real content of an allowed type passes.
    let (s, rec) = send(
        &n,
        "POST",
        "/api/collections/docs/records",
        None,
        Form::new().part("avatar", part(png, "dot.png", "image/png")).part(
            "files",
            part(b"<html><script>alert(1)</script></html>", "page.html", "text/html"),
        ),
    );
    assert_eq!(s, 200, "{rec}");
    let id = rec["id"].as_str().unwrap();
    let disposition = |name: &str| {
        let r = fetch(&n, &format!("/api/files/docs/{id}/{name}"), &[]);
        assert_eq!(r.status(), 200);
        r.headers()["content-disposition"].to_str().unwrap().to_string()
    };
    assert!(disposition(rec["avatar"].as_str().unwrap()).starts_with("inline"));
    // HTML never renders as a page of this origin: it is downloaded.
    assert!(disposition(rec["files"][0].as_str().unwrap()).starts_with("attachment"));
}
