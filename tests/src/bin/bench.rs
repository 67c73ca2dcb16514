//! HTTP benchmark of a real `vski` master: create, view and list records over keep-alive
//! connections, printed as requests/second next to PocketBase's figures on the same kind of
//! machine (from `spec/replication.md`).
//!
//! Run with `tests/bench` (builds the release binary first). Options:
//! `--seconds N` per measurement (default 5), `--concurrency 1,16` (default).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vski_tests::{NodeOptions, Value, json, spawn_master_with};

#[path = "../bench/compare.rs"]
mod compare;
#[path = "../bench/lag.rs"]
mod lag;
#[path = "../bench/realtime.rs"]
mod realtime;
#[path = "../bench/subscriptions.rs"]
mod subscriptions;

struct Args {
    seconds: u64,
    concurrency: Vec<usize>,
    /// `http`, `replication` or `all`.
    suite: String,
    /// Records in the database whose snapshot download is timed.
    snapshot_rows: usize,
    /// Size in MB of the database whose replica bootstrap is timed.
    bootstrap_mb: usize,
    /// `compare`: alternating rounds per row, and the table sizes.
    rounds: usize,
    sizes: Vec<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 5,
        concurrency: vec![1, 16],
        suite: "all".into(),
        snapshot_rows: 200_000,
        bootstrap_mb: 1000,
        rounds: 3,
        sizes: vec![10_000, 100_000],
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
            "--suite" => {
                args.suite = it
                    .next()
                    .expect("--suite http|query|replication|replica|lag|fanout|realtime|catchup|bootstrap|compare|subscriptions|all")
            }
            "--rounds" => args.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--sizes" => {
                args.sizes = it
                    .next()
                    .map(|v| {
                        v.split(',')
                            .map(|x| x.trim().parse().expect("--sizes 10000,100000"))
                            .collect()
                    })
                    .expect("--sizes 10000,100000")
            }
            "--bootstrap-mb" => args.bootstrap_mb = it.next().and_then(|v| v.parse().ok()).expect("--bootstrap-mb N"),
            "--snapshot-rows" => {
                args.snapshot_rows = it.next().and_then(|v| v.parse().ok()).expect("--snapshot-rows N")
            }
            other => panic!(
                "unknown argument {other}; use --seconds N --concurrency 1,16 --suite http|query|replication|replica|lag|fanout|realtime|catchup|bootstrap|compare|all --snapshot-rows N"
            ),
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
    measure_timed(workers, secs, op).0
}

/// [`measure`], and the time each request took, sorted.
fn measure_timed(
    workers: usize,
    secs: u64,
    op: impl Fn(&reqwest::blocking::Client, usize, usize) + Send + Sync + 'static,
) -> (f64, Vec<Duration>) {
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let op = op.clone();
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("client");
                let mut took = Vec::new();
                let mut i = 0;
                loop {
                    let t = Instant::now();
                    if t >= deadline {
                        break took;
                    }
                    op(&client, w, i);
                    took.push(t.elapsed());
                    i += 1;
                }
            })
        })
        .collect();
    let mut took: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().expect("worker")).collect();
    let rate = took.len() as f64 / start.elapsed().as_secs_f64();
    took.sort();
    (rate, took)
}

/// The `q` quantile (0..=1) of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn check(resp: reqwest::blocking::Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {body}");
    body
}

fn main() {
    let args = parse_args();
    if args.suite == "http" || args.suite == "all" {
        http_suite(&args);
    }
    if args.suite == "replication" || args.suite == "all" {
        replication_suite(&args);
    }
    if args.suite == "query" || args.suite == "all" {
        query_suite(&args);
    }
    if args.suite == "replica" || args.suite == "all" {
        replica_suite(&args);
    }
    if args.suite == "compare" {
        compare::suite(args.seconds, args.rounds, &args.sizes);
    }
    if args.suite == "bootstrap" {
        bootstrap_bench(&args);
    }
    if args.suite == "catchup" {
        catchup_bench();
    }
    if args.suite == "lag" {
        lag_suite(&args);
    }
    if args.suite == "realtime" || args.suite == "replica" {
        realtime_suite(&args);
    }
    if args.suite == "fanout" {
        fanout_suite(&args);
    }
    if args.suite == "subscriptions" {
        let node = spawn_master_with(NodeOptions::default().env("RUST_LOG", "warn,vski::app=info"));
        let pb = std::env::var("POCKETBASE_BIN")
            .ok()
            .map(|bin| compare::start_pocketbase(std::path::Path::new(&bin)));
        subscriptions::suite(&compare::vski_server(&node), pb.as_ref().map(|p| &p.server));
    }
}

fn http_suite(args: &Args) {
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
        let rate = create_rate(&node, c, args.seconds);
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

const SECRET: &str = "bench-secret-0123456789abcdef";

fn bench_master(changelog: &str) -> vski_tests::Node {
    let node = spawn_master_with(
        NodeOptions::default()
            .env("RUST_LOG", "warn,vski::app=info")
            .env("JWT_SECRET", SECRET)
            .env("CHANGELOG", changelog),
    );
    let token = node.admin_token();
    let (s, b) = node.post(
        "/api/collections",
        Some(&token),
        &json!({"name": "bench", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"}]}),
    );
    assert_eq!(s, 200, "{b}");
    node
}

fn create_rate(node: &vski_tests::Node, conns: usize, secs: u64) -> f64 {
    create_timed(node, conns, secs).0
}

/// [`create_rate`], and the time each create took, sorted.
fn create_timed(node: &vski_tests::Node, conns: usize, secs: u64) -> (f64, Vec<Duration>) {
    let url = node.url.clone();
    measure_timed(conns, secs, move |client, w, i| {
        let body = json!({"title": format!("Post title number {w}-{i}"), "n": i});
        check(
            client
                .post(format!("{url}/api/collections/bench/records"))
                .json(&body)
                .send()
                .expect("create"),
        );
    })
}

/// Recording cost, changeset sizes and snapshot download speed.
fn replication_suite(args: &Args) {
    println!();
    println!(
        "vski replication benchmark (master side), {} s per throughput row",
        args.seconds
    );
    println!(
        "{:<44} {:>12} {:>12} {:>10}",
        "write throughput (create record)", "changelog on", "off", "cost"
    );
    for &c in &args.concurrency {
        // Alternate on/off runs and take medians: the client shares the machine's two cores, so
        // single runs are noisy. Server CPU per request is the steadier figure.
        let (mut on, mut off, mut on_cpu, mut off_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut on_tail, mut off_tail) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            for (mode, rates, cpus, tails) in [
                ("on", &mut on, &mut on_cpu, &mut on_tail),
                ("off", &mut off, &mut off_cpu, &mut off_tail),
            ] {
                let n = bench_master(mode);
                let cpu0 = vski_tests::cpu_seconds(n.pid());
                let (rate, took) = create_timed(&n, c, args.seconds);
                let cpu = vski_tests::cpu_seconds(n.pid()) - cpu0;
                rates.push(rate);
                cpus.push(cpu * 1e6 / (rate * args.seconds as f64));
                tails.push((quantile_ms(&took, 0.99), quantile_ms(&took, 0.999)));
            }
        }
        let (on, off, on_cpu, off_cpu) = (median(on), median(off), median(on_cpu), median(off_cpu));
        let pick = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
        let (on_p99, off_p99) = (pick(&on_tail, |p| p.0), pick(&off_tail, |p| p.0));
        let (on_p999, off_p999) = (pick(&on_tail, |p| p.1), pick(&off_tail, |p| p.1));
        println!(
            "{:<44} {:>12.0} {:>12.0} {:>9.1}%   target: <= 10%",
            format!("  {c} connection(s), req/s (median of 5)"),
            on,
            off,
            (1.0 - on / off) * 100.0
        );
        println!(
            "{:<44} {:>12.0} {:>12.0} {:>9.1}%",
            "    server CPU µs per request",
            on_cpu,
            off_cpu,
            (on_cpu / off_cpu - 1.0) * 100.0
        );
        println!(
            "{:<44} {:>12.2} {:>12.2}",
            "    p99 latency of a create, ms", on_p99, off_p99
        );
        println!(
            "{:<44} {:>12.2} {:>12.2}",
            "    p99.9 latency of a create, ms", on_p999, off_p999
        );
    }

    let node = bench_master("on");
    let rt = vski_tests::replica_token(SECRET, "bench");
    let head = |n: &vski_tests::Node| {
        n.get("/api/replica/status", Some(&rt)).1["dbs"][0]["version"]
            .as_i64()
            .expect("version")
    };
    let rows = 1000;
    let v0 = head(&node);
    let mut ids = Vec::new();
    for i in 0..rows {
        let (s, b) = node.post(
            "/api/collections/bench/records",
            None,
            &json!({"title": format!("Post title number {i}"), "n": i}),
        );
        assert_eq!(s, 200, "{b}");
        ids.push(b["id"].clone());
    }
    let v1 = head(&node);
    let (s, _) = node.patch(
        "/api/collections/bench/records/bulk",
        None,
        &json!({"ids": ids, "data": {"title": "Edited title", "n": 7}}),
    );
    assert_eq!(s, 200);
    let v2 = head(&node);
    let (s, _) = node.request(
        "DELETE",
        "/api/collections/bench/records/bulk",
        None,
        Some(&json!({"ids": ids})),
        &[],
    );
    assert_eq!(s, 200);
    let entries = vski_tests::changelog(&node, &rt, "default", v0);
    let bytes = |from: i64, to: i64| -> usize {
        entries
            .iter()
            .filter(|e| e.version > from && e.version <= to)
            .map(|e| e.changeset.len())
            .sum()
    };
    let v3 = head(&node);
    println!(
        "{:<44} {:>12}",
        "changeset bytes per row (id, 2 dates, title, n)", "bytes/row"
    );
    println!(
        "{:<44} {:>12.1}   (one row per transaction)",
        "  insert",
        bytes(v0, v1) as f64 / rows as f64
    );
    println!(
        "{:<44} {:>12.1}   (1000 rows in one bulk update)",
        "  update (title, n, updated)",
        bytes(v1, v2) as f64 / rows as f64
    );
    println!(
        "{:<44} {:>12.1}   (1000 rows in one bulk delete)",
        "  delete",
        bytes(v2, v3) as f64 / rows as f64
    );
    drop(node);

    // Snapshot download vs copying the file.
    let node = bench_master("on");
    let url = node.url.clone();
    let target = args.snapshot_rows;
    fill(
        &url,
        target,
        8,
        |i| json!({"title": format!("Snapshot row {i} with some padding text to look like a real title"), "n": i}),
    );
    let db_path = node.data_dir.join("default.db");
    let dir = tempfile::tempdir().expect("tmp");
    let client = reqwest::blocking::Client::new();
    let mut best_dl = f64::MAX;
    let mut size = 0u64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut resp = client
            .get(format!("{url}/api/replica/download?db=default"))
            .bearer_auth(&rt)
            .send()
            .expect("download");
        assert!(resp.status().is_success());
        let mut f = std::fs::File::create(dir.path().join("dl.db")).expect("file");
        size = std::io::copy(&mut resp, &mut f).expect("body");
        best_dl = best_dl.min(start.elapsed().as_secs_f64());
    }
    let mut best_cp = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        std::fs::copy(&db_path, dir.path().join("cp.db")).expect("copy");
        best_cp = best_cp.min(start.elapsed().as_secs_f64());
    }
    let file_size = std::fs::metadata(&db_path).map(|m| m.len()).unwrap_or(0);
    println!(
        "{:<44} {:>12} {:>12} {:>10}",
        format!("snapshot of {target} records"),
        "seconds",
        "MB/s",
        "ratio"
    );
    println!(
        "{:<44} {:>12.3} {:>12.0} {:>9.1}x",
        format!("  GET /api/replica/download ({} MB)", size / 1_000_000),
        best_dl,
        size as f64 / 1e6 / best_dl,
        best_dl / best_cp
    );
    println!(
        "{:<44} {:>12.3} {:>12.0} {:>10}",
        format!("  cp of the database file ({} MB, no WAL)", file_size / 1_000_000),
        best_cp,
        file_size as f64 / 1e6 / best_cp,
        "1.0x"
    );
}

/// Write-to-visible lag at 10 and 500 writes/s: vski streaming, vski polling every second, and
/// Litestream 0.5 (file replica and `restore -f` follower, both at 10 ms intervals), in one run.
fn lag_suite(args: &Args) {
    let secs = (args.seconds * 2).max(4);
    println!("lag, write acknowledged -> readable on the follower ({secs} s per row; p50 / p99 / max in ms)");
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8}",
        "follower", "writes/s", "p50", "p99", "max", "probes", "reached"
    );
    let row = |label: &str, rate: u32, lag: lag::Lag| {
        println!(
            "{:<44} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>8.0}",
            label, rate, lag.p50, lag.p99, lag.max, lag.probes, lag.rate
        );
    };
    for rate in [10, 500] {
        for (label, env) in [
            (
                "vski replica, SYNC_MODE=stream",
                [("SYNC_MODE", "stream"), ("SYNC_INTERVAL", "60")],
            ),
            (
                "vski replica, SYNC_MODE=poll SYNC_INTERVAL=1",
                [("SYNC_MODE", "poll"), ("SYNC_INTERVAL", "1")],
            ),
        ] {
            let master = bench_master("on");
            let replicas = lag::replicas(&master, SECRET, 1, &env);
            let target = lag::Target::Replicas(replicas.iter().map(|r| r.url.clone()).collect());
            row(label, rate, lag::run(rate, secs, target, lag::vski_writer(&master.url)));
        }
        let dir = tempfile::tempdir().expect("tmp");
        let ls = lag::litestream(dir.path());
        let target = lag::Target::File(ls.out.clone());
        row(
            "Litestream 0.5.17, 10 ms intervals, restore -f",
            rate,
            lag::run(rate, secs, target, lag::litestream_writer(&ls.src)),
        );
    }
}

/// Realtime latency: write sent to the master -> SSE event at a subscriber of the master, and of
/// a streaming replica with REPLICA_REALTIME=on.
fn realtime_suite(args: &Args) {
    let secs = (args.seconds * 2).max(4);
    println!("realtime, write sent to the master -> SSE event at the subscriber ({secs} s per row; ms)");
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "subscriber on", "writes/s", "p50", "p99", "max", "events"
    );
    for rate in [10, 500] {
        let master = bench_master("on");
        let replicas = lag::replicas(
            &master,
            SECRET,
            1,
            &[
                ("SYNC_MODE", "stream"),
                ("SYNC_INTERVAL", "60"),
                ("REPLICA_REALTIME", "on"),
            ],
        );
        for (label, url) in [
            ("the master", master.url.clone()),
            ("a streaming replica, REPLICA_REALTIME=on", replicas[0].url.clone()),
        ] {
            let l = realtime::measure(&master, &url, rate, secs);
            println!(
                "{:<44} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>4}/{:<4}",
                label, rate, l.p50, l.p99, l.max, l.events, l.writes
            );
        }
    }
}

/// How many streaming replicas one master feeds at 500 writes/s: lag per replica count.
fn fanout_suite(args: &Args) {
    let secs = (args.seconds * 2).max(4);
    println!("fan-out: one master at 500 writes/s, streaming replicas, probes spread over them ({secs} s per row)");
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>7}",
        "replicas", "p50", "p99", "max", "probes"
    );
    for n in [1, 4, 16, 64] {
        let master = bench_master("on");
        let replicas = lag::replicas(&master, SECRET, n, &[("SYNC_MODE", "stream"), ("SYNC_INTERVAL", "60")]);
        let target = lag::Target::Replicas(replicas.iter().map(|r| r.url.clone()).collect());
        let (cpu, start) = (vski_tests::cpu_seconds(master.pid()), Instant::now());
        let l = lag::run(500, secs, target, lag::vski_writer(&master.url));
        let cpu = (vski_tests::cpu_seconds(master.pid()) - cpu) / start.elapsed().as_secs_f64();
        println!(
            "{:<10} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>8.0} {:>10.0}%   {}",
            n,
            l.p50,
            l.p99,
            l.max,
            l.probes,
            l.rate,
            cpu * 100.0,
            if l.p99 <= 50.0 {
                "p99 within 50 ms"
            } else {
                "p99 over 50 ms"
            }
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench_replica(master: &vski_tests::Node, interval: &str, extra: &[(&str, &str)]) -> vski_tests::Node {
    let mut opts = NodeOptions::default()
        .env("RUST_LOG", "warn,vski::app=info")
        .env("SYNC_INTERVAL", interval);
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    vski_tests::spawn_replica(master, SECRET, opts)
}

/// Replica side: lag, catch-up apply rate, bootstrap time.
fn replica_suite(args: &Args) {
    println!();
    println!("vski replication benchmark (replica side)");

    lag_suite(args);
    fanout_suite(args);

    catchup_bench();
    bootstrap_bench(args);
}

/// Catch-up: a manual-mode replica applies 100k inserts in one sync call.
fn catchup_bench() {
    let master = bench_master("on");
    let replica = bench_replica(&master, "0", &[]);
    vski_tests::wait_converged(&master, &replica, SECRET, "default", Duration::from_secs(60));
    let rows = 100_000;
    fill(
        &master.url,
        rows,
        16,
        |i| json!({"title": format!("Post title number {i}"), "n": i}),
    );
    let admin = master.admin_login();
    let start = Instant::now();
    let (s, b) = replica.post("/api/replica/sync", Some(&admin), &json!({}));
    let took = start.elapsed().as_secs_f64();
    assert_eq!(s, 200, "{b}");
    vski_tests::wait_converged(&master, &replica, SECRET, "default", Duration::from_secs(60));
    println!(
        "{:<48} {:>8.0} rows/s   ({rows} inserts in {took:.2} s, fetched and applied)",
        "catch-up apply (one POST /api/replica/sync)",
        rows as f64 / took
    );
    drop(replica);
    drop(master);
}

/// Bootstrap of a large database against cp of its file.
fn bootstrap_bench(args: &Args) {
    let mb = args.bootstrap_mb;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let big = data.join("big.db");
    {
        let conn = vski::rusqlite::Connection::open(&big).expect("big.db");
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE bulk (id TEXT PRIMARY KEY NOT NULL, payload TEXT NOT NULL);",
        )
        .expect("schema");
        let payload = "p".repeat(1000);
        conn.execute_batch("BEGIN").expect("begin");
        let mut stmt = conn
            .prepare("INSERT INTO bulk (id, payload) VALUES (?1, ?2)")
            .expect("insert");
        for i in 0..mb * 950 {
            stmt.execute(vski::rusqlite::params![format!("{i:012}"), payload])
                .expect("row");
        }
        drop(stmt);
        conn.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")
            .expect("commit");
    }
    let size = std::fs::metadata(&big).expect("size").len();
    let master = vski_tests::Node::start(
        data,
        NodeOptions::default()
            .env("RUST_LOG", "warn,vski::app=info")
            .env("JWT_SECRET", SECRET),
        None,
    );
    // Three rounds, each a `cp` of the file (from the page cache, as the master reads it) and
    // a new replica bootstrapping it; the medians are compared.
    let (mut cps, mut synced_cps, mut boots) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let copy = tmp.path().join("copy.db");
        let start = Instant::now();
        std::fs::copy(master.data_dir.join("big.db"), &copy).expect("cp");
        cps.push(start.elapsed().as_secs_f64());
        // A replica's copy must survive a power cut: it is fsynced. So is this one.
        std::fs::File::open(&copy)
            .and_then(|f| f.sync_all())
            .expect("fsync copy");
        synced_cps.push(start.elapsed().as_secs_f64());
        std::fs::remove_file(&copy).expect("rm copy");
        let start = Instant::now();
        let replica = bench_replica(&master, "0", &[("REPLICA_OMIT_DBS", "default")]);
        vski_tests::wait_for("big.db on the replica", Duration::from_secs(1800), || {
            (replica.health()["dbs"]["big"]["lastSync"].is_string()).then_some(())
        });
        boots.push(start.elapsed().as_secs_f64());
    }
    let (cp, synced_cp, boot) = (median(cps.clone()), median(synced_cps.clone()), median(boots.clone()));
    println!(
        "{:<48} {:>8.2} s   ({} MB: snapshot, transfer, sha256, fsync, check, rename; runs {:.2?})",
        "bootstrap of a large database (replica start -> synced)",
        boot,
        size / 1_000_000,
        boots,
    );
    println!(
        "{:<48} {:>8.2} s   ratio {:.1}x   (runs {:.2?})",
        "  cp of the file, then fsync of the copy",
        synced_cp,
        boot / synced_cp,
        synced_cps
    );
    println!(
        "{:<48} {:>8.2} s   ratio {:.1}x   (runs {:.2?}; the copy stays in the page cache)",
        "  cp of the file alone",
        cp,
        boot / cp,
        cps
    );
}

/// Filtered, sorted lists over 100k records, with and without an index and a total count.
fn query_suite(args: &Args) {
    println!();
    println!(
        "vski query benchmark: list with filter and sort over 100,000 records, {} s per row",
        args.seconds
    );
    let node = bench_master("on");
    let rows = 100_000;
    fill(
        &node.url,
        rows,
        16,
        move |i| json!({"title": format!("Post title number {i}"), "n": (i * 7919) % rows}),
    );
    let filter = "filter=n%20%3E%3D%2050000%20%26%26%20n%20%3C%2050100&sort=-n&perPage=30";
    let run = |label: &str, query: String| {
        for &c in &args.concurrency {
            let (url, q) = (node.url.clone(), query.clone());
            let rate = measure(c, args.seconds, move |client, _, _| {
                check(
                    client
                        .get(format!("{url}/api/collections/bench/records?{q}"))
                        .send()
                        .expect("list"),
                );
            });
            println!("{:<58} {:>6} {:>10.0} req/s", label, c, rate);
        }
    };
    println!(
        "{:<58} {:>6} {:>16}",
        "filter `n >= 50000 && n < 50100`, sort `-n`, perPage 30", "conns", ""
    );
    run("  no index, with total count", filter.to_string());
    run("  no index, skipTotal", format!("{filter}&skipTotal=1"));
    let admin = node.admin_login();
    let (s, b) = node.patch(
        "/api/collections/bench",
        Some(&admin),
        &json!({"indexes": ["CREATE INDEX idx_bench_n ON bench (n)"]}),
    );
    assert_eq!(s, 200, "{b}");
    run("  index on n, with total count", filter.to_string());
    run("  index on n, skipTotal", format!("{filter}&skipTotal=1"));
}

/// Creates `rows` records in `bench` from `threads` keep-alive connections; record `i` gets
/// `body(i)`.
fn fill(url: &str, rows: usize, threads: usize, body: impl Fn(usize) -> Value + Send + Sync + 'static) {
    let next = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(body);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (url, next, body) = (url.to_string(), next.clone(), body.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= rows {
                        break;
                    }
                    check(
                        client
                            .post(format!("{url}/api/collections/bench/records"))
                            .json(&body(i))
                            .send()
                            .expect("fill"),
                    );
                }
            })
        })
        .collect();
    workers.into_iter().for_each(|h| h.join().expect("fill"));
}
