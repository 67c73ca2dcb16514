//! HTTP benchmark of a real `vski` master: create, view and list records over keep-alive
//! connections, printed as requests/second next to PocketBase's figures on the same kind of
//! machine (from `shared/spec/replication.md`).
//!
//! Run with `tests/bench` (builds the release binary first). Options:
//! `--seconds N` per measurement (default 5), `--concurrency 1,16` (default).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vski_tests::{NodeOptions, Value, json, spawn_master_with};

struct Args {
    seconds: u64,
    concurrency: Vec<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 5,
        concurrency: vec![1, 16],
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => args.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--concurrency" => {
                args.concurrency = it
                    .next()
                    .map(|v| {
                        v.split(',')
                            .map(|x| x.trim().parse().expect("--concurrency 1,16"))
                            .collect()
                    })
                    .expect("--concurrency 1,16")
            }
            other => panic!("unknown argument {other}; use --seconds N --concurrency 1,16"),
        }
    }
    args
}

/// Runs `op(client, worker, i)` from `workers` threads for `secs` seconds; returns requests/s.
fn measure(
    workers: usize,
    secs: u64,
    op: impl Fn(&reqwest::blocking::Client, usize, usize) + Send + Sync + 'static,
) -> f64 {
    let op = Arc::new(op);
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (op, done) = (op.clone(), done.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("client");
                let mut i = 0;
                while Instant::now() < deadline {
                    op(&client, w, i);
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn check(resp: reqwest::blocking::Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {body}");
    body
}

fn main() {
    let args = parse_args();
    let node = spawn_master_with(NodeOptions::default().env("RUST_LOG", "warn,vski::app=info"));
    let token = node.admin_token();
    let (s, b) = node.post(
        "/api/collections",
        Some(&token),
        &json!({"name": "bench", "listRule": "", "viewRule": "", "createRule": "",
                "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"}]}),
    );
    assert_eq!(s, 200, "{b}");
    let base = Arc::new(node.url.clone());
    println!(
        "vski HTTP benchmark: {} s per row, keep-alive, server with 2 workers, binary {}",
        args.seconds,
        vski_tests::vski_bin().display()
    );
    println!(
        "{:<34} {:>6} {:>12}   PocketBase 0.40.6 anchor (same machine kind)",
        "operation", "conns", "req/s"
    );
    for &c in &args.concurrency {
        let url = base.clone();
        let rate = measure(c, args.seconds, move |client, w, i| {
            let body = json!({"title": format!("record {w}-{i}"), "n": i});
            check(
                client
                    .post(format!("{url}/api/collections/bench/records"))
                    .json(&body)
                    .send()
                    .expect("create"),
            );
        });
        let anchor = if c == 1 { "1,500-1,700 sequential creates/s" } else { "" };
        println!("{:<34} {:>6} {:>12.0}   {anchor}", "create record", c, rate);
    }
    let (_, page) = node.get("/api/collections/bench/records?perPage=200&skipTotal=1", None);
    let ids: Arc<Vec<String>> = Arc::new(
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_string())
            .collect(),
    );
    for &c in &args.concurrency {
        let (url, ids) = (base.clone(), ids.clone());
        let rate = measure(c, args.seconds, move |client, _, i| {
            let id = &ids[i % ids.len()];
            check(
                client
                    .get(format!("{url}/api/collections/bench/records/{id}"))
                    .send()
                    .expect("view"),
            );
        });
        let anchor = if c == 1 { "1,900-2,400 views/s" } else { "" };
        println!("{:<34} {:>6} {:>12.0}   {anchor}", "view record", c, rate);
    }
    let (_, total) = node.get("/api/collections/bench/records?perPage=1", None);
    for (label, query, anchor) in [
        (
            "list 30 (with total count)",
            "perPage=30",
            "650-970 list requests/s with count",
        ),
        ("list 30 (skipTotal)", "perPage=30&skipTotal=1", "~1,100 with skipTotal"),
    ] {
        for &c in &args.concurrency {
            let url = base.clone();
            let q = query.to_string();
            let rate = measure(c, args.seconds, move |client, _, _| {
                check(
                    client
                        .get(format!("{url}/api/collections/bench/records?{q}"))
                        .send()
                        .expect("list"),
                );
            });
            println!(
                "{:<34} {:>6} {:>12.0}   {}",
                label,
                c,
                rate,
                if c == 1 { anchor } else { "" }
            );
        }
    }
    println!("(list requests ran over a table of {} records)", total["totalItems"]);
}
