//! Realtime latency: from the moment a write is sent to the master until an SSE subscriber
//! receives its event, on the master and on a streaming replica with `REPLICA_REALTIME=on`.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vski_tests::{Node, Value, json};

/// Opens an SSE subscription to `bench/*` on `url`; create events arrive as (record id, time).
fn subscribe(url: &str) -> mpsc::Receiver<(String, Instant)> {
    let (id, events) = vski_tests::sse_stream(&format!("{url}/api/realtime"));
    let resp = reqwest::blocking::Client::new()
        .post(format!("{url}/api/realtime"))
        .json(&json!({"clientId": id, "subscriptions": ["bench/*"]}))
        .send()
        .expect("subscribe");
    assert_eq!(resp.status().as_u16(), 204);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (_, data, at) in events {
            if let Some(id) = data["record"]["id"].as_str() {
                if tx.send((id.to_string(), at)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// (p50, p99, max) in ms, events received, writes sent.
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub events: usize,
    pub writes: usize,
}

/// Writes at `rate` per second for `secs` to `master` and measures when each create reaches a
/// subscriber of `watch`.
pub fn measure(master: &Node, watch: &str, rate: u32, secs: u64) -> Latency {
    let events = subscribe(watch);
    let total = rate as usize * secs as usize;
    let client = reqwest::blocking::Client::new();
    let url = format!("{}/api/collections/bench/records", master.url);
    let start = Instant::now() + Duration::from_millis(100);
    let mut sent: HashMap<String, Instant> = HashMap::new();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let at = Instant::now();
        let resp = client
            .post(&url)
            .json(&json!({"title": format!("realtime probe {i}"), "n": i}))
            .send()
            .expect("write");
        let v: Value = resp.json().expect("json");
        sent.insert(v["id"].as_str().expect("id").to_string(), at);
    }
    let mut ms = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ms.len() < sent.len() {
        let Ok((id, at)) = events.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break;
        };
        if let Some(t) = sent.get(&id) {
            ms.push(at.duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        ms.get(((ms.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Latency {
        p50: at(0.5),
        p99: at(0.99),
        max: at(1.0),
        events: ms.len(),
        writes: total,
    }
}
