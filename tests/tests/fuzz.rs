//! "No 500" at the HTTP layer: seeded random requests (a new seed each run, printed; set
//! `VSKI_FUZZ_SEED` to replay one) with random JSON and multipart bodies, headers, tokens and ids,
//! against every route family of a master and a replica. Every answer must be 2xx, 3xx or 4xx,
//! and no node may panic (the harness fails the test on a `panicked at` in a log).

use std::time::Duration;

use reqwest::blocking::multipart::{Form, Part};
use vski_tests::*;

const SECRET: &str = "fuzz-shared-secret-0123456789";

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A short string that is sometimes valid, sometimes hostile.
    fn word(&mut self) -> String {
        let pool = [
            "posts",
            "users",
            "files",
            "default",
            "stats",
            "x",
            "",
            "..",
            "../../etc/passwd",
            "%00",
            "a'b\"c",
            "😀",
            "_changelog",
            "sqlite_master",
            "-1",
            "0",
            "99999999999999999999",
            "null",
            "true",
            "[]",
            "{}",
            "a b",
            "<script>",
            "*",
            "id",
            "title",
            "created",
            "@request.auth.id",
            "title ~ 'a' && (",
        ];
        let mut w = self.pick(&pool).to_string();
        if self.below(3) == 0 {
            let len = self.below(40);
            w = (0..len).map(|_| char::from(32 + self.below(95) as u8)).collect();
        }
        w
    }

    fn json(&mut self, depth: usize) -> Value {
        match self.below(if depth > 3 { 5 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => json!(self.next() as i64),
            3 => json!((self.next() as f64) / 7.0),
            4 => json!(self.word()),
            5 => Value::Array((0..self.below(5)).map(|_| self.json(depth + 1)).collect()),
            _ => {
                let keys = [
                    "name",
                    "title",
                    "fields",
                    "type",
                    "listRule",
                    "viewRule",
                    "createRule",
                    "filter",
                    "expand",
                    "identity",
                    "password",
                    "email",
                    "schedule",
                    "sql",
                    "url",
                    "db",
                    "since",
                    "version",
                    "files",
                    "files-",
                    "n+",
                    "options",
                    "indexes",
                    "triggers",
                    "action",
                    "clientId",
                    "subscriptions",
                ];
                let mut m = serde_json::Map::new();
                for _ in 0..self.below(6) {
                    let k = if self.below(4) == 0 {
                        self.word()
                    } else {
                        self.pick(&keys).to_string()
                    };
                    m.insert(k, self.json(depth + 1));
                }
                Value::Object(m)
            }
        }
    }
}

/// Percent-encodes everything but letters and digits, for a path segment or query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The 5xx answers the API documents: a replica that is not ready or does not serve realtime
/// (503), one behind a client's position (504), a manual sync whose round failed (502). Any
/// other 5xx is a bug.
fn documented(status: u16, body: &Value) -> bool {
    let message = body["message"].as_str().unwrap_or_default();
    match status {
        503 => message.starts_with("replica") || message.contains("realtime"),
        504 => message == "replica is behind",
        502 => message.starts_with("Sync failed"),
        _ => false,
    }
}

fn seed() -> u64 {
    std::env::var("VSKI_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

#[test]
fn random_requests_get_no_500_and_no_panic() {
    let seed = seed();
    eprintln!("fuzz seed: {seed} (replay with VSKI_FUZZ_SEED={seed})");
    let mut rng = Rng(seed);
    let m = spawn_master_with(NodeOptions::default().env("JWT_SECRET", SECRET));
    let admin = m.admin_token();
    let (s, b) = m.post(
        "/api/collections",
        Some(&admin),
        &json!({"name": "posts", "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
                "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"},
                           {"name": "files", "type": "file", "maxSelect": 3, "maxSize": 100000},
                           {"name": "tags", "type": "json"}, {"name": "when", "type": "date"}]}),
    );
    assert_eq!(s, 200, "{b}");
    let (_, rec) = m.post("/api/collections/posts/records", None, &json!({"title": "seed"}));
    let rid = rec["id"].as_str().unwrap().to_string();
    let r = spawn_replica(&m, SECRET, NodeOptions::default().env("SYNC_INTERVAL", "1"));
    let replica = replica_token(SECRET, "fuzzer");
    // A fresh connection per request: a server may close a connection after refusing a body it
    // did not read, and a reused one would fail for the client's reason, not the server's.
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let paths = [
        "/api/collections",
        "/api/collections/{w}",
        "/api/collections/posts",
        "/api/collections/posts/records",
        "/api/collections/posts/records?filter={w}&sort={w}&expand={w}&page={n}&perPage={n}&fields={w}",
        "/api/collections/posts/records/{id}",
        "/api/collections/posts/records/{w}",
        "/api/collections/posts/records/bulk",
        "/api/collections/{w}/records/{w}",
        "/api/collections/users/auth-with-password",
        "/api/collections/users/auth-refresh",
        "/api/admins/auth-with-password",
        "/api/admins/init",
        "/api/auth/login",
        "/api/auth/register",
        "/api/databases",
        "/api/databases/{w}",
        "/api/files/posts/{id}/{w}",
        "/api/files/{w}/{w}/{w}",
        "/api/realtime",
        "/api/cron",
        "/api/cron/{w}",
        "/api/cron/{w}/runs",
        "/api/webhooks/logs?limit={n}",
        "/api/replica/changesets?db={w}&since={n}&hash={w}&limit={n}",
        "/api/replica/status?checksum={w}",
        "/api/replica/stream?since={w}&wait={n}",
        "/api/replica/files?db={w}&since={n}",
        "/api/replica/files/{w}?db={w}",
        "/api/replica/ack",
        "/api/replica/schema-sync?db={w}",
        "/api/replica/replicas",
        "/api/replica/sync",
        "/health",
    ];
    // Weighted towards the methods routes take, so that most requests reach a handler.
    let methods = [
        "GET", "GET", "GET", "GET", "POST", "POST", "POST", "PATCH", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS",
    ];
    let mut bad = Vec::new();
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    let rounds = 4000;
    for i in 0..rounds {
        let node = if rng.below(4) == 0 { &r } else { &m };
        let mut path = rng.pick(&paths).to_string();
        while let Some(at) = path.find("{w}") {
            let w = encode(&rng.word());
            path.replace_range(at..at + 3, &w);
        }
        while let Some(at) = path.find("{n}") {
            let n = rng
                .pick(&["0", "1", "-5", "abc", "1000000", "18446744073709551616"])
                .to_string();
            path.replace_range(at..at + 3, &n);
        }
        path = path.replace("{id}", &rid);
        let method = *rng.pick(&methods);
        let mut rb = client.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", node.url),
        );
        match rng.below(5) {
            0 => rb = rb.bearer_auth(&admin),
            1 => rb = rb.bearer_auth(&replica),
            2 => rb = rb.bearer_auth(rng.word()),
            _ => {}
        }
        if rng.below(4) == 0 {
            rb = rb.header("X-Dbname", rng.word());
        }
        if rng.below(6) == 0 {
            rb = rb.header("X-Min-Db-Position", rng.word());
        }
        let what = match rng.below(4) {
            0 => {
                let body = rng.json(0);
                rb = rb.json(&body);
                format!("json {body}")
            }
            1 => {
                let mut form = Form::new();
                for _ in 0..rng.below(4) {
                    let name = rng
                        .pick(&["title", "files", "n", "tags", "files+", "@jsonPayload", "x"])
                        .to_string();
                    if rng.below(2) == 0 {
                        form = form.text(name, rng.word());
                    } else {
                        let bytes: Vec<u8> = (0..rng.below(2000)).map(|_| rng.next() as u8).collect();
                        form = form.part(name, Part::bytes(bytes).file_name(rng.word()));
                    }
                }
                rb = rb.multipart(form);
                "multipart".to_string()
            }
            2 => {
                let bytes: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
                rb = rb.header("Content-Type", "application/json").body(bytes);
                "raw bytes as json".to_string()
            }
            _ => "no body".to_string(),
        };
        let resp = rb
            .send()
            .unwrap_or_else(|e| panic!("seed {seed}, request {i} ({method} {path}, {what}) failed: {e}"));
        let status = resp.status().as_u16();
        *by_status.entry(status).or_default() += 1;
        if status < 500 {
            // Not read: an SSE stream (GET /api/realtime) never ends.
            continue;
        }
        let mut body: Value = serde_json::from_str(&resp.text().unwrap_or_default()).unwrap_or(Value::Null);
        if method == "HEAD" {
            // A HEAD answer has no body: the same request as a GET says what the 5xx was.
            let get = client.get(format!("{}{path}", node.url)).send().unwrap();
            body = serde_json::from_str(&get.text().unwrap_or_default()).unwrap_or(Value::Null);
        }
        if !documented(status, &body) {
            bad.push(format!("{status} for {method} {path} ({what}): {body}"));
        }
    }
    eprintln!("answers by status: {by_status:?}");
    // The requests reached handlers, not only the router's 404: some were accepted, some refused.
    let ok = by_status.range(200..300).map(|(_, n)| n).sum::<usize>();
    let refused = by_status.range(400..405).map(|(_, n)| n).sum::<usize>();
    assert!(ok > 100 && refused > 100, "{by_status:?}");
    assert!(
        bad.is_empty(),
        "seed {seed}: {} of {rounds} requests got a 5xx:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
