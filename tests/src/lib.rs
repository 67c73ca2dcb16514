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
}

impl NodeOptions {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
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
    http: reqwest::blocking::Client,
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
            .args(["--host", "127.0.0.1", "--port", "0", "--workers", "2"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&opts.args)
            .env_remove("JWT_SECRET")
            .env_remove("DATA_DIR")
            .env_remove("PORT")
            .env_remove("HOST")
            .env("RUST_LOG", "info,vski::access=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
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
            Some(rest.lines().next()?.trim().to_string())
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
        wait_for("/health", Duration::from_secs(30), || {
            (node.get("/health", None).0 == 200).then_some(())
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

    /// Starts a new process on the same data directory with the same options.
    pub fn restart(mut self) -> Node {
        // Also used after `terminate`/`kill`: then there is no process left to stop.
        self.kill();
        let tmp = self.tmp_handle.take();
        Node::start(self.data_dir.clone(), self.opts.clone(), tmp)
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

    /// Creates the first admin (`admin@example.com` / `adminpass123`) and returns its token.
    pub fn admin_token(&self) -> String {
        let (s, _) = self.post(
            "/api/admins/init",
            None,
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

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the `vski` binary with `args` and `env` to completion; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(vski_bin());
    cmd.args(args)
        .env_remove("JWT_SECRET")
        .env_remove("DATA_DIR")
        .env_remove("PORT")
        .env_remove("HOST")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vski");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
