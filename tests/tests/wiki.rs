//! Runs the ```sh blocks of the user documentation against a real vski, so every command a
//! reader copies works. Blocks of one page run in order in one shell, with `VSKI` pointing at a
//! fresh node; pages other than Getting-Started start with the admin it creates.

use std::path::Path;
use std::time::Duration;

use vski_tests::*;

fn sh_blocks(page: &str) -> String {
    let out = sh_block_list(page).concat();
    assert!(!out.is_empty(), "{page} has no ```sh blocks");
    out
}

/// The ```` ```sh ```` blocks of a wiki page, each as its text.
fn sh_block_list(page: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wiki").join(page);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match block.as_mut() {
            Some(_) if line.trim_start().starts_with("```") => out.extend(block.take()),
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None if line.trim() == "```sh" => block = Some(String::new()),
            None => {}
        }
    }
    out
}

fn run_page(page: &str, create_admin: bool) -> String {
    let node = spawn_master();
    if create_admin {
        let (s, b) = node.post(
            "/api/admins/init",
            Some(&node.install_token()),
            &json!({"email": "admin@example.com", "password": "change-me-now"}),
        );
        assert_eq!(s, 200, "{b}");
    }
    let script = format!("set -euo pipefail\n{}", sh_blocks(page));
    let out = bash_within(Duration::from_secs(300))
        .arg("-c")
        .arg(&script)
        .env("VSKI", &node.url)
        .env("DATA_DIR", &node.data_dir)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{page}: the examples failed ({}).\n--- script ---\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn getting_started_examples_run() {
    let out = run_page("Getting-Started.md", false);
    assert!(out.contains("\"Hello, vski\""), "{out}");
    assert!(out.contains("validation_required"), "{out}");
}

#[test]
fn collections_examples_run() {
    let out = run_page("Collections.md", true);
    assert!(out.contains("idx_articles_status"), "{out}");
    assert!(out.contains("\"summary\""), "{out}");
    assert!(out.contains("204"), "{out}");
    assert!(out.contains("\"tenant-a\""), "{out}");
}

#[test]
fn records_examples_run() {
    let out = run_page("Records.md", true);
    let compact: String = out.split_whitespace().collect();
    assert!(compact.contains(r#"{"points":5,"labels":["docs","ui"]}"#), "{out}");
    assert!(compact.contains(r#""status":400"#), "{out}");
    assert!(compact.contains(r#""deleted":["#), "{out}");
    assert!(
        compact.contains(r#"{"expand":{"project":{"name":"vski"}},"title":"Shipit"}"#),
        "{out}"
    );
}

#[test]
fn authentication_examples_run() {
    let started = std::time::Instant::now();
    let out = run_page("Authentication.md", true);
    assert!(out.contains("\"ada@example.com\""), "{out}");
    // Twenty 400s, then 429s; the limiter refills one attempt every 3 s, so a slow run may
    // see one more 400 for each 3 s the whole page took, and no more.
    let refilled = (started.elapsed().as_secs_f64() / 3.0).ceil() as usize;
    let codes: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("400 400 "))
        .unwrap_or_else(|| panic!("the rate-limit example's line: {out}"))
        .split_whitespace()
        .collect();
    let passed = codes.iter().take_while(|c| **c == "400").count();
    assert_eq!(codes.len(), 25, "{codes:?}");
    assert!(
        passed >= 20 && passed <= 20 + refilled,
        "twenty 400s, then 429s: {codes:?}"
    );
    assert!(codes[passed..].iter().all(|c| *c == "429") && passed < 25, "{codes:?}");
    assert!(out.trim_end().ends_with("201\n200\n401"), "the tenant model: {out}");
}

#[test]
fn wiki_links_point_at_pages_that_exist() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wiki");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap();
            if target.ends_with(".md") && !target.contains('/') {
                assert!(
                    dir.join(target).exists(),
                    "{} links to missing {target}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn replication_examples_run() {
    let secret = "wiki-shared-secret-0123456789";
    // The page creates the admin itself (its first block, with the installer token in
    // DATA_DIR), before the replica starts, as it says.
    let master = spawn_master_with(NodeOptions::default().env("JWT_SECRET", secret));
    let blocks = sh_block_list("Replication.md");
    let out = bash_within(Duration::from_secs(60))
        .arg("-c")
        .arg(format!("set -euo pipefail\n{}", blocks[0]))
        .env("VSKI", &master.url)
        .env("DATA_DIR", &master.data_dir)
        .output()
        .expect("run bash");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("admin@example.com"),
        "the admin block: {out:?}"
    );
    let replica = spawn_replica(&master, secret, NodeOptions::default().env("SYNC_INTERVAL", "0"));
    let script = format!("set -euo pipefail\n{}", blocks[1..].concat());
    let out = bash_within(Duration::from_secs(300))
        .arg("-c")
        .arg(&script)
        .env("VSKI", &master.url)
        .env("REPLICA", &replica.url)
        .env("DATA_DIR", &master.data_dir)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "Replication.md examples failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "Hello from the master",
        "replica is read-only",
        "x-replica-mode: replica",
        "x-master-url",
        "x-db-position: ",
        "read-your-writes: 1",
        "\"lag\": 0",
        "admin@example.com",
    ] {
        assert!(
            stdout.to_lowercase().contains(&needle.to_lowercase()),
            "missing {needle:?} in:\n{stdout}"
        );
    }
}

#[test]
fn deployment_examples_run() {
    let master = spawn_master();
    let (s, b) = master.post(
        "/api/admins/init",
        Some(&master.install_token()),
        &json!({"email": "admin@example.com", "password": "change-me-now"}),
    );
    assert_eq!(s, 200, "{b}");
    let script = format!("set -euo pipefail\n{}", sh_blocks("Deployment.md"));
    // From the repository's root, as the page says.
    let out = bash_within(Duration::from_secs(300))
        .arg("-c")
        .arg(&script)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env("VSKI", &master.url)
        .env("DATA_DIR", &master.data_dir)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "Deployment.md examples failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "TRAEFIK_DYNAMIC=",
        "use_backend master if is_write",
        "r001.example.org",
        "default.db",
        "ok",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[test]
fn realtime_examples_run() {
    let out = run_page("Realtime.md", true);
    assert!(out.contains(r#"{"action":"create","text":"hello lobby"}"#), "{out}");
    assert!(
        out.contains(r#"{"collection":"messages","action":"create","text":"over a socket"}"#),
        "{out}"
    );
}

#[test]
fn cron_examples_run() {
    let out = run_page("Cron.md", true);
    for needle in [
        r#"{"outcome":"ok","detail":"1 rows changed"}"#,
        r#"{"status":400,"fields":["schedule","sql"]}"#,
        r#"[{"name":"expire-sessions","active":true},{"name":"nightly-report","active":true}]"#,
        "204",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in {out}");
    }
}

#[test]
fn webhooks_examples_run() {
    let out = run_page("Webhooks.md", true);
    for needle in [
        r#"[{"action":"create","method":"POST","retryLimit":3,"enabled":true}]"#,
        r#"{"event": "create", "total": 42, "attempts": 3, "same key": true}"#,
        r#"["delivered","retrying","retrying"]"#,
    ] {
        assert!(out.contains(needle), "missing {needle:?} in {out}");
    }
}

#[test]
fn files_examples_run() {
    let out = run_page("Files.md", true);
    for needle in [
        r#"{"title":"Holidays","photos":2,"cover":true}"#,
        "first photo\nphoto\n404\n2\n",
        r#"{"status":400,"data":["photos"]}"#,
    ] {
        assert!(out.contains(needle), "missing {needle:?} in {out}");
    }
}

#[test]
fn coming_from_pocketbase_examples_run() {
    // A PocketBase app with a collection and a record, and a vski with the page's admin.
    let pb = spawn_pocketbase(&pocketbase_bin(), "pb-admin@example.com", "pb-admin-pass-1");
    let http = reqwest::blocking::Client::new();
    let send = |path: &str, body: Value| {
        let resp = http
            .post(format!("{}{path}", pb.url))
            .header("Authorization", &pb.token)
            .json(&body)
            .send()
            .unwrap();
        assert!(
            resp.status().is_success(),
            "{path}: {}",
            resp.text().unwrap_or_default()
        );
    };
    send(
        "/api/collections",
        json!({"name": "posts", "type": "base", "listRule": "", "viewRule": "",
               "fields": [{"name": "title", "type": "text"}]}),
    );
    send("/api/collections/posts/records", json!({"title": "from PocketBase"}));
    let node = spawn_master();
    let (s, b) = node.post(
        "/api/admins/init",
        Some(&node.install_token()),
        &json!({"email": "admin@example.com", "password": "change-me-now"}),
    );
    assert_eq!(s, 200, "{b}");
    let script = format!("set -euo pipefail\n{}", sh_blocks("Coming-from-PocketBase.md"));
    let out = bash_within(Duration::from_secs(120))
        .arg("-c")
        .arg(&script)
        .env("VSKI", &node.url)
        .env("PB", &pb.url)
        .env("VSKI_BIN", vski_bin())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("imported 2 collections"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with('1'),
        "one record read back from vski: {stdout}"
    );
}
