//! File replication (local storage): replicas download what the master's file journal adds,
//! delete what it deletes, list the master's files when they start or fall behind, and
//! converge after a kill in the middle. Real master and replica processes on loopback.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::blocking::multipart::{Form, Part};
use vski_tests::*;

const SECRET: &str = "files-shared-secret-0123456789";
const WAIT: Duration = Duration::from_secs(60);

fn master() -> Node {
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let admin = m.admin_token();
    let (s, b) = m.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "docs", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "title", "type": "text"},
                           {"name": "files", "type": "file", "maxSelect": 5, "maxSize": 5000000}]}),
    );
    assert_eq!(s, 200, "{b}");
    m
}

/// Creates a record with `count` files of `size` bytes; returns its JSON.
fn upload(m: &Node, count: usize, size: usize, seed: u8) -> Value {
    let mut form = Form::new().text("title", format!("r{seed}"));
    for i in 0..count {
        let bytes: Vec<u8> = (0..size)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add(i as u8))
            .collect();
        form = form.part("files", Part::bytes(bytes).file_name(format!("f{i}.bin")));
    }
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/api/collections/docs/records", m.url))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

/// Relative path → (size, sha256) of every file under a node's storage for `default`.
fn tree(node: &Node) -> BTreeMap<String, (u64, String)> {
    let root = node.data_dir.join("storage/default");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if let Ok(bytes) = std::fs::read(&p) {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(rel, (bytes.len() as u64, vski::util::sha256_hex(&bytes)));
        }
    }
}

fn same_files(m: &Node, r: &Node) {
    wait_for("the replica's files to match the master's", WAIT, || {
        (tree(m) == tree(r)).then_some(())
    });
}

fn get_bytes(node: &Node, path: &str) -> (u16, Vec<u8>) {
    let r = reqwest::blocking::get(format!("{}{path}", node.url)).unwrap();
    (r.status().as_u16(), r.bytes().unwrap().to_vec())
}

#[test]
fn a_replica_serves_the_same_bytes_and_follows_deletes() {
    let m = master();
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "60"));
    let recs: Vec<Value> = (0..3).map(|i| upload(&m, 2, 50_000 + i, i as u8)).collect();
    same_files(&m, &r);
    assert_eq!(tree(&r).len(), 6);
    for rec in &recs {
        for name in rec["files"].as_array().unwrap() {
            let path = format!(
                "/api/files/docs/{}/{}",
                rec["id"].as_str().unwrap(),
                name.as_str().unwrap()
            );
            assert_eq!(get_bytes(&r, &path), get_bytes(&m, &path));
            assert_eq!(get_bytes(&r, &path).0, 200);
        }
    }
    // A removed file and a deleted record go on the replica too.
    let id0 = recs[0]["id"].as_str().unwrap();
    let gone = recs[0]["files"][0].as_str().unwrap();
    let (s, _) = m.patch(
        &format!("/api/collections/docs/records/{id0}"),
        None,
        &json!({"files-": gone}),
    );
    assert_eq!(s, 200);
    assert_eq!(
        m.delete(
            &format!("/api/collections/docs/records/{}", recs[1]["id"].as_str().unwrap()),
            None
        )
        .0,
        204
    );
    same_files(&m, &r);
    assert_eq!(tree(&r).len(), 3);
    assert_eq!(get_bytes(&r, &format!("/api/files/docs/{id0}/{gone}")).0, 404);
}

#[test]
fn a_replica_started_later_lists_the_masters_files() {
    let m = master();
    for i in 0..4 {
        upload(&m, 1, 10_000, i);
    }
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    same_files(&m, &r);
    assert_eq!(tree(&r).len(), 4);
    // And it keeps following from the journal's head.
    upload(&m, 1, 20_000, 9);
    same_files(&m, &r);
}

#[test]
fn a_replica_killed_during_file_sync_converges() {
    let m = master();
    for i in 0..30 {
        upload(&m, 2, 1_000_000, i);
    }
    let total = tree(&m).len();
    // Through a link of 4 MB/s the 60 MB of files take about 15 s to arrive, so the kill
    // below falls in the middle of the sync, not after it.
    let proxy = FaultProxy::start(&m.url);
    proxy.throttle(4_000_000);
    let mut r = spawn_replica_of(&proxy.url(), SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    // Kill it once some files have arrived, and before all of them have.
    let mut caught = false;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let n = tree(&r).len();
        if n > 0 && n < total {
            caught = true;
            break;
        }
        if n == total {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    r.kill();
    let kept = tree(&r).len();
    assert!(caught, "the kill came mid-sync: {kept} of {total} files");
    eprintln!("killed with {kept} of {total} files");
    proxy.throttle(0);
    let r = r.restart();
    same_files(&m, &r);
    assert!(
        std::fs::read_dir(r.data_dir.join("storage/.tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "partial downloads left behind"
    );
}

#[test]
fn a_forwarding_replica_proxies_a_file_it_does_not_have_yet() {
    let m = master();
    let plain = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "60"));
    let forwarding = spawn_replica(
        &m,
        SECRET,
        NodeOptions::default()
            .env("SYNC_INTERVAL", "60")
            .env("REPLICA_WRITES", "forward"),
    );
    let rec = upload(&m, 1, 30_000, 1);
    same_files(&m, &plain);
    same_files(&m, &forwarding);
    let path = format!(
        "/api/files/docs/{}/{}",
        rec["id"].as_str().unwrap(),
        rec["files"][0].as_str().unwrap()
    );
    // The file is lost on both replicas (as if it had not arrived yet).
    for r in [&plain, &forwarding] {
        for (rel, _) in tree(r) {
            std::fs::remove_file(r.data_dir.join("storage/default").join(rel)).unwrap();
        }
    }
    assert_eq!(get_bytes(&plain, &path).0, 404);
    assert_eq!(get_bytes(&forwarding, &path), get_bytes(&m, &path));
}

#[test]
fn the_master_prunes_file_journal_entries_every_replica_acknowledged() {
    let m = spawn_master_with(
        NodeOptions::default()
            .env("JWT_SECRET", SECRET)
            // The retention task then runs about every second.
            .env("CHANGELOG_RETENTION_HOURS", "0.001"),
    );
    let admin = m.admin_token();
    let (s, b) = m.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "docs", "listRule": "", "viewRule": "", "createRule": "",
                "fields": [{"name": "files", "type": "file", "maxSelect": 5}]}),
    );
    assert_eq!(s, 200, "{b}");
    for i in 0..3 {
        upload(&m, 1, 1000, i);
    }
    let journal = |since: i64| m.get(&format!("/api/replica/files?db=default&since={since}"), Some(&admin));
    // No replica has acknowledged anything: the entries stay.
    std::thread::sleep(Duration::from_millis(2500));
    let (s, b) = journal(0);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["entries"].as_array().unwrap().len(), 3);
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    same_files(&m, &r);
    wait_for("the acknowledged entries to be pruned", WAIT, || {
        (journal(0).0 == 410).then_some(())
    });
    let (_, replicas) = m.get("/api/replica/replicas", Some(&admin));
    assert_eq!(replicas[0]["filePositions"]["default"], 3, "{replicas}");
    // Replicas keep up from where they are, and a new one lists the files.
    upload(&m, 1, 2000, 7);
    same_files(&m, &r);
    let late = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    same_files(&m, &late);
}

#[test]
fn a_file_damaged_on_the_way_is_never_served_and_leaves_nothing_behind() {
    let m = master();
    let proxy = FaultProxy::start(&m.url);
    proxy.corrupt("/api/replica/files/");
    let r = spawn_replica_of(&proxy.url(), SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    let rec = upload(&m, 1, 200_000, 7);
    let path = format!(
        "/api/files/docs/{}/{}",
        rec["id"].as_str().unwrap(),
        rec["files"][0].as_str().unwrap()
    );
    let good = get_bytes(&m, &path);
    assert_eq!(good.0, 200);
    // Every download of the file is damaged: the replica refuses it each time (sha256), and
    // never serves or keeps the bad bytes.
    let h = wait_for("two refused downloads", WAIT, || {
        let h = r.health();
        (proxy.corrupted() >= 2 && h["dbs"]["default"]["lastError"].as_str()?.contains("sha256")).then_some(h)
    });
    assert_eq!(get_bytes(&r, &path).0, 404, "{h}");
    assert!(tree(&r).is_empty(), "{:?}", tree(&r));
    let tmp = std::fs::read_dir(r.data_dir.join("storage/.tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp, 0, "a refused download stays in storage/.tmp");
    // The link heals: the right bytes arrive.
    proxy.stop_corrupting();
    same_files(&m, &r);
    assert_eq!(get_bytes(&r, &path), good);
}
