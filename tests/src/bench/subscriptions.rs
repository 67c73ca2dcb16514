//! The cost of a realtime subscription: memory held per subscription, and server CPU spent per
//! subscription for each event, on vski and on PocketBase, from the same run. Ten SSE guests
//! hold 1,000 subscriptions each (distinct filters that match nothing, so no two share a rule
//! check); one more subscription matches everything and times each update's event.

use std::time::{Duration, Instant};

use vski_tests::{Value, json, sse_stream};

use super::compare::{Server, create_collection, rss_mib};

const CLIENTS: usize = 10;
const PER_CLIENT: usize = 1000;
const UPDATES: usize = 20;

/// (KiB of memory per subscription, µs of server CPU per subscription per event, median ms
/// from an update to its event).
fn measure(s: &Server) -> (f64, f64, f64) {
    let http = reqwest::blocking::Client::new();
    create_collection(s, "subs");
    let id = http
        .post(format!("{}/api/collections/subs/records", s.url))
        .json(&json!({"title": "watched"}))
        .send()
        .and_then(|r| r.json::<Value>())
        .expect("record")["id"]
        .as_str()
        .expect("id")
        .to_string();
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_mib(s.pid).0;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (client_id, rx) = sse_stream(&format!("{}/api/realtime", s.url));
        let mut topics: Vec<String> = (0..PER_CLIENT - usize::from(c == 0))
            .map(|k| {
                let options = json!({"query": {"filter": format!("title = 'never-{c}-{k}'")}}).to_string();
                format!("subs/*?options={}", vski_tests::urlencode(&options))
            })
            .collect();
        if c == 0 {
            topics.push("subs/*".into());
        }
        let resp = http
            .post(format!("{}/api/realtime", s.url))
            .json(&json!({"clientId": client_id, "subscriptions": topics}))
            .send()
            .expect("subscribe");
        assert!(
            resp.status().is_success(),
            "{}: {}",
            s.name,
            resp.text().unwrap_or_default()
        );
        clients.push(rx);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_mib(s.pid).0;
    let subscriptions = (CLIENTS * PER_CLIENT) as f64;
    let cpu = vski_tests::cpu_seconds(s.pid);
    let mut ms = Vec::new();
    for i in 0..UPDATES {
        let sent = Instant::now();
        let resp = http
            .patch(format!("{}/api/collections/subs/records/{id}", s.url))
            .header("Authorization", &s.token)
            .json(&json!({"title": format!("watched {i}")}))
            .send()
            .expect("update");
        assert!(resp.status().is_success(), "{}", s.name);
        loop {
            let (_, data, at) = clients[0]
                .recv_timeout(Duration::from_secs(120))
                .expect("the update's event");
            if data["record"]["title"] == json!(format!("watched {i}")) {
                ms.push(at.duration_since(sent).as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    let cpu = vski_tests::cpu_seconds(s.pid) - cpu;
    ms.sort_by(|a, b| a.total_cmp(b));
    (
        (after - before) * 1024.0 / subscriptions,
        cpu * 1e6 / (UPDATES as f64 * subscriptions),
        ms[ms.len() / 2],
    )
}

pub fn suite(vski: &Server, pocketbase: Option<&Server>) {
    println!(
        "realtime subscription cost: {CLIENTS} SSE guests x {PER_CLIENT} filtered subscriptions, {UPDATES} updates"
    );
    println!(
        "{:<12} {:>14} {:>22} {:>16}",
        "server", "KiB per sub", "CPU us per sub/event", "update->event"
    );
    for s in std::iter::once(vski).chain(pocketbase) {
        let (kib, us, ms) = measure(s);
        println!("{:<12} {:>14.2} {:>22.2} {:>13.1} ms", s.name, kib, us, ms);
    }
}
