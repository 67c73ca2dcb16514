//! Command line and environment configuration, parsed once in `main` and passed explicitly.
//!
//! Every flag has an environment variable; `--help` is generated from the doc comments below.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// vski: a self-hosted Backend-as-a-Service over SQLite with read replicas.
#[derive(Debug, Parser)]
#[command(name = "vski", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(Box<ServeConfig>),
    /// Manage administrators without a running server.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Copy a PocketBase app into a running vski, over both HTTP APIs: collections (fields,
    /// rules, indexes), records with their ids, files, and users (with new random passwords:
    /// PocketBase never hands out password hashes). Passwords come from the environment.
    ImportPocketbase(crate::import::pocketbase::Options),
    /// Exit 0 when the server on this machine answers GET /health with 200 (a replica that
    /// holds no data yet answers 503), 1 otherwise. For container health checks.
    Healthcheck {
        /// The server's port.
        #[arg(long, env = "PORT", default_value_t = 3000)]
        port: u16,
        /// The address to ask.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an administrator, or set the password of an existing one.
    Create {
        /// Email address the administrator signs in with.
        email: String,
        /// Password (at least 8 characters). Prefer --password-stdin: a password given here
        /// lands in the shell's history and the process list.
        #[arg(required_unless_present = "password_stdin", conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Directory that holds the databases.
        #[arg(long, env = "DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// Create the data directory when it does not exist (otherwise that is an error, so a
        /// mistyped path cannot create a lone admin in a new directory).
        #[arg(long)]
        create: bool,
    },
    /// List the administrators: id, email, created.
    List {
        /// Directory that holds the databases.
        #[arg(long, env = "DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Delete an administrator (its tokens stop working). Deleting the last one makes the next
    /// start print a new installer token.
    Delete {
        /// Email address of the administrator.
        email: String,
        /// Directory that holds the databases.
        #[arg(long, env = "DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

fn parse_retention(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(h) if h.is_finite() && h > 0.0 => Ok(h),
        _ => Err(format!("'{s}' is not a positive number of hours")),
    }
}

/// Whether `s` is a browser origin: `http(s)://host[:port]`, nothing after.
fn is_origin(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")) else {
        return false;
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (h, Some(p)),
        _ => (rest, None),
    };
    !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

/// Names vski reads that are not flags: the test harness's binary, crash points, the fault
/// injector's trigger (`tests/fault/fault.c`), and the logger's.
const INTERNAL_ENV: [&str; 5] = [
    "VSKI_BIN",
    "VSKI_CRASH_AT",
    "VSKI_FAULT_FILE",
    "RUST_LOG",
    "RUST_BACKTRACE",
];
/// Prefixes of vski's own variables: a variable with one of them that vski does not know is
/// most likely a typo (`REPLICA_MOD=replica` would otherwise start a writable master).
const OWN_PREFIXES: [&str; 4] = ["REPLICA_", "SYNC_", "MASTER_", "VSKI_"];

/// Every environment variable the command line reads.
pub fn known_env_vars() -> Vec<String> {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if let Some(e) = a.get_env() {
                out.push(e.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out: Vec<String> = INTERNAL_ENV.iter().map(|s| s.to_string()).collect();
    walk(&Cli::command(), &mut out);
    out.sort();
    out.dedup();
    out
}

/// Warnings for variables that look meant for vski but that vski does not read, each with the
/// closest known name: any name of vski's own families (`REPLICA_`, `SYNC_`, `MASTER_`,
/// `VSKI_`), and any name a typo or two from one vski reads, in any case (`JWT_SECRT`,
/// `CORS_ORIGIN`, `body_limit`). A short name must be closer: `HOST` and `PORT` are a letter
/// away from many words.
pub fn unknown_env_warnings(vars: impl Iterator<Item = String>) -> Vec<String> {
    let known = known_env_vars();
    let mut out = Vec::new();
    for name in vars {
        if known.contains(&name) {
            continue;
        }
        let upper = name.to_ascii_uppercase();
        let Some((closest, distance)) = known
            .iter()
            .map(|k| (k.as_str(), strsim::levenshtein(k, &upper)))
            .min_by_key(|(_, d)| *d)
        else {
            continue;
        };
        let near = match name.len() {
            0..=4 => 0,
            5..=7 => 1,
            _ => 2,
        };
        if !OWN_PREFIXES.iter().any(|p| upper.starts_with(p)) && distance > near {
            continue;
        }
        out.push(format!(
            "environment variable {name} is not one vski reads (did you mean {closest}?); it is ignored"
        ));
    }
    out
}

impl ServeConfig {
    /// The bucket of `STORAGE=s3` (object_store's S3 client; credentials from the S3_* settings).
    pub fn s3_store(&self) -> Result<Option<std::sync::Arc<dyn object_store::ObjectStore>>, String> {
        if self.storage != "s3" {
            return Ok(None);
        }
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(self.s3_bucket.clone().unwrap_or_default())
            .with_region(self.s3_region.clone())
            .with_access_key_id(self.s3_access_key.clone().unwrap_or_default())
            .with_secret_access_key(self.s3_secret_key.clone().unwrap_or_default())
            .with_virtual_hosted_style_request(!self.s3_force_path_style)
            // A request that cannot succeed fails within half a minute instead of retrying for
            // minutes behind a waiting client.
            .with_retry(object_store::RetryConfig {
                backoff: Default::default(),
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(30),
            });
        if let Some(e) = &self.s3_endpoint {
            b = b.with_endpoint(e.clone()).with_allow_http(e.starts_with("http://"));
        }
        let store = b.build().map_err(|e| format!("STORAGE=s3: {e}"))?;
        Ok(Some(std::sync::Arc::new(store)))
    }

    /// `MASTER_URL` as a list: a replica follows whichever of them answers as the master.
    pub fn master_urls(&self) -> Vec<String> {
        self.master_url
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect()
    }

    pub fn is_replica(&self) -> bool {
        self.replica_mode == "replica"
    }

    /// Checks combinations clap cannot express. The message is printed as the one error line.
    pub fn validate(&self) -> Result<(), String> {
        self.trusted_proxy_list()?;
        if self.is_replica() {
            let urls = self.master_urls();
            if urls.is_empty() {
                return Err(
                    "REPLICA_MODE=replica needs MASTER_URL (the master's base URL, e.g. http://master:3001)".into(),
                );
            }
            for url in &urls {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!("MASTER_URL must start with http:// or https://, got '{url}'"));
                }
            }
            if self.jwt_secret.as_deref().unwrap_or("").is_empty() {
                return Err("REPLICA_MODE=replica needs JWT_SECRET, the same value as on the master".into());
            }
        }
        if self.storage == "s3" {
            for (name, v) in [
                ("S3_BUCKET", &self.s3_bucket),
                ("S3_ACCESS_KEY", &self.s3_access_key),
                ("S3_SECRET_KEY", &self.s3_secret_key),
            ] {
                if v.as_deref().unwrap_or("").trim().is_empty() {
                    return Err(format!("STORAGE=s3 needs {name}"));
                }
            }
            if let Some(e) = &self.s3_endpoint {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(format!("S3_ENDPOINT must start with http:// or https://, got '{e}'"));
                }
            }
        }
        for origin in self.cors_origin_list() {
            if !is_origin(&origin) {
                return Err(format!(
                    "CORS_ORIGINS must be * or a comma-separated list of origins like https://app.example.com, got '{origin}'"
                ));
            }
        }
        if let Some(id) = &self.replica_id {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(format!(
                    "REPLICA_ID must be 1-64 characters of letters, digits, '-', '_' and '.', got '{id}'"
                ));
            }
        }
        Ok(())
    }

    /// The parsed `TRUSTED_PROXIES`, or the entry that is neither an address nor a CIDR.
    pub fn trusted_proxy_list(&self) -> Result<Vec<ipnet::IpNet>, String> {
        self.trusted_proxies
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("TRUSTED_PROXIES: '{s}' is not an address or a CIDR such as 10.0.0.0/8"))
            })
            .collect()
    }

    /// The allowed origins; empty for `*` (any).
    pub fn cors_origin_list(&self) -> Vec<String> {
        if self.cors_origins.trim() == "*" {
            return Vec::new();
        }
        self.cors_origins
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Databases this replica leaves out, besides `stats` and `workflows`.
    pub fn omitted_dbs(&self) -> Vec<String> {
        self.replica_omit_dbs
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Settings of `vski serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// TCP port to listen on.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Directory that holds one SQLite file per database.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// HS256 secret that signs every token. When unset, a master generates one and keeps it
    /// in DATA_DIR/.jwt_secret (mode 0600).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Largest accepted request body, in bytes. Larger bodies get 413.
    #[arg(long, env = "BODY_LIMIT", default_value_t = 10 * 1024 * 1024)]
    pub body_limit: usize,

    /// Lifetime of user (auth collection) tokens, in seconds. Default: 14 days.
    #[arg(long, env = "AUTH_TOKEN_TTL", default_value_t = 14 * 24 * 3600)]
    pub auth_token_ttl: u64,

    /// Lifetime of admin tokens, in seconds. Default: 1 day.
    #[arg(long, env = "ADMIN_TOKEN_TTL", default_value_t = 24 * 3600)]
    pub admin_token_ttl: u64,

    /// List results each database keeps for repeated identical lists (0 = none). A cached
    /// result is served only while nothing was written since it was read.
    #[arg(long, env = "LIST_CACHE_ENTRIES", default_value_t = crate::db::CACHE_ENTRIES)]
    pub list_cache_entries: usize,

    /// Read connections per database (each request that only reads uses one).
    #[arg(long, env = "READ_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub read_pool_size: u32,

    /// Hours the master keeps changelog entries for lagging replicas; a replica further behind
    /// downloads a snapshot. Fractions are allowed.
    #[arg(long, env = "CHANGELOG_RETENTION_HOURS", default_value_t = 168.0, value_parser = parse_retention)]
    pub changelog_retention_hours: f64,

    /// Record changes for replication (`on`). `off` is for benchmarks only: replicas of a master
    /// that ran with `off` miss those changes.
    #[arg(long, env = "CHANGELOG", default_value = "on", value_parser = ["on", "off"])]
    pub changelog: String,

    /// `master` takes writes; `replica` follows MASTER_URL and serves reads only.
    #[arg(long, env = "REPLICA_MODE", default_value = "master", value_parser = ["master", "replica"])]
    pub replica_mode: String,

    /// Base URL of the master (replica only, required there), or a comma list of the nodes that
    /// may be the master: the replica follows whichever answers as the master.
    #[arg(long, env = "MASTER_URL")]
    pub master_url: Option<String>,

    /// Seconds between sync rounds of a replica; 0 = only when asked (POST /api/replica/sync).
    #[arg(long, env = "SYNC_INTERVAL", default_value_t = 60)]
    pub sync_interval: u64,

    /// How a replica follows the master when SYNC_INTERVAL > 0: `stream` (one long-poll for
    /// all databases, answered the moment a write commits on the master; SYNC_INTERVAL is then
    /// the period of the full safety round) or `poll` (a round every SYNC_INTERVAL seconds).
    #[arg(long, env = "SYNC_MODE", default_value = "stream", value_parser = ["stream", "poll"])]
    pub sync_mode: String,

    /// Longest a replica holds a read whose X-Min-Db-Position it has not reached, in
    /// milliseconds; then it answers 504 `replica is behind` (or forwards the read to the
    /// master with REPLICA_WRITES=forward).
    #[arg(long, env = "REPLICA_READ_WAIT_MS", default_value_t = 2000)]
    pub replica_read_wait_ms: u64,

    /// This replica's id, sent to the master and returned in X-Replica-Id. Default: generated
    /// once and kept in DATA_DIR/.replica_id.
    #[arg(long, env = "REPLICA_ID")]
    pub replica_id: Option<String>,

    /// This node's public URL: a replica reports it to the master; a master names itself with
    /// it in `X-Master-Url`.
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Comma-separated databases a replica does not replicate (stats and workflows never are).
    #[arg(long, env = "REPLICA_OMIT_DBS", default_value = "")]
    pub replica_omit_dbs: String,

    /// What a replica does with a write: `refuse` (403 `replica is read-only`, as VSKI) or
    /// `forward` (proxy it to MASTER_URL and answer once the write has been applied here).
    #[arg(long, env = "REPLICA_WRITES", default_value = "refuse", value_parser = ["refuse", "forward"])]
    pub replica_writes: String,

    /// HTTP worker threads. Default: one per CPU core.
    #[arg(long, env = "WORKERS")]
    pub workers: Option<usize>,

    /// Origins browsers may call the API from: `*` (any, as PocketBase) or a comma-separated
    /// list such as `https://app.example.com,http://localhost:5173`.
    #[arg(long, env = "CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,

    /// Reverse proxies whose `X-Forwarded-For` is believed: comma-separated addresses or CIDRs
    /// (`10.0.0.0/8,127.0.0.1`). A request from one of them is logged and rate-limited as the
    /// client the header names; from anyone else the header is ignored. Default: none.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,

    /// `on`: a write's answer also sets a cookie per database with its position
    /// (`vski_position_<db>`, HttpOnly, SameSite=Lax, 5 minutes), which replicas treat like
    /// `X-Min-Db-Position`: clients that know nothing of positions (PocketBase's SDK) read their
    /// own writes through a proxy. Replicas honour the cookie whatever this says.
    #[arg(long, env = "POSITION_COOKIE", default_value = "off", value_parser = ["on", "off"])]
    pub position_cookie: String,

    /// `text` (one line per entry) or `json` (one JSON object per line, for log shippers).
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Whether a replica serves realtime subscriptions from the changes it applies (`on`), or
    /// refuses them with 503 as VSKI does (`off`). A master always serves them.
    #[arg(long, env = "REPLICA_REALTIME", default_value = "off", value_parser = ["on", "off"])]
    pub replica_realtime: String,

    /// Realtime messages one client may have waiting; a client that falls this far behind is
    /// disconnected with a close reason instead of being buffered without limit.
    #[arg(long, env = "REALTIME_CLIENT_BUFFER", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub realtime_client_buffer: u32,

    /// Seconds between pings to a realtime client; one that answers nothing for three of them
    /// is disconnected.
    #[arg(long, env = "REALTIME_PING_SECS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub realtime_ping_secs: u64,

    /// Realtime connections this node accepts at once; more get 503.
    #[arg(long, env = "REALTIME_MAX_CLIENTS", default_value_t = 10_000)]
    pub realtime_max_clients: usize,

    /// Realtime connections one client address (the TCP peer) may hold; past it 429. 0 = no
    /// limit. Behind a reverse proxy every client has the proxy's address: raise it there.
    #[arg(long, env = "REALTIME_MAX_PER_IP", default_value_t = 100)]
    pub realtime_max_per_ip: usize,

    /// The largest total of files one request may upload, in bytes (each file is also held to
    /// its field's `maxSize`).
    #[arg(long, env = "FILE_UPLOAD_LIMIT", default_value_t = 100 * 1024 * 1024)]
    pub file_upload_limit: u64,

    /// Where uploaded files live: `local` (DATA_DIR/storage, copied to replicas) or `s3` (an
    /// S3-compatible bucket every node shares; replicas read it directly).
    #[arg(long, env = "STORAGE", default_value = "local", value_parser = ["local", "s3"])]
    pub storage: String,

    /// The S3 endpoint URL (for AWS itself, leave it unset).
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// The bucket (STORAGE=s3).
    #[arg(long, env = "S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// The bucket's region.
    #[arg(long, env = "S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// The access key id (STORAGE=s3).
    #[arg(long, env = "S3_ACCESS_KEY", hide_env_values = true)]
    pub s3_access_key: Option<String>,

    /// The secret access key (STORAGE=s3).
    #[arg(long, env = "S3_SECRET_KEY", hide_env_values = true)]
    pub s3_secret_key: Option<String>,

    /// Address the bucket as ENDPOINT/BUCKET (MinIO, SeaweedFS) instead of BUCKET.ENDPOINT.
    #[arg(long, env = "S3_FORCE_PATH_STYLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub s3_force_path_style: bool,

    /// Days the master keeps its file journal for replicas; one further behind lists the
    /// master's files instead. Fractions are allowed.
    #[arg(long, env = "FILE_SYNC_RETENTION_DAYS", default_value_t = 7.0, value_parser = parse_retention)]
    pub file_sync_retention_days: f64,

    /// The first webhook retry's delay in milliseconds; each further retry doubles it (with
    /// jitter), up to an hour.
    #[arg(long, env = "WEBHOOK_RETRY_BASE_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub webhook_retry_base_ms: u64,

    /// Longest a cron SQL job may run, in seconds; past it the job is stopped (SQLite's
    /// progress handler), its changes rolled back, and the run logged as an error.
    #[arg(long, env = "CRON_SQL_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub cron_sql_timeout: u64,

    /// Let HTTP cron jobs call loopback and link-local addresses (`localhost`, 127.0.0.0/8, ::1,
    /// 169.254.0.0/16 with cloud metadata, fe80::/10). Off, such a job is refused when saved
    /// and when it would run: an admin token must not reach the host's own services.
    #[arg(long, env = "CRON_HTTP_ALLOW_LOCAL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub cron_http_allow_local: bool,

    /// Password sign-in attempts allowed per minute for one client IP and identity; past it the
    /// endpoint answers 429 with Retry-After. 0 turns the limit off.
    #[arg(long, env = "AUTH_RATE_LIMIT", default_value_t = 20)]
    pub auth_rate_limit: u32,

    /// Start in REPLICA_MODE although the data directory was last run in the other role: its
    /// databases and files are moved aside to `DATA_DIR/.role-change/ROLE-TIME/` (never deleted)
    /// and the node starts empty. Without it such a start is refused.
    #[arg(long, env = "ALLOW_ROLE_CHANGE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_role_change: bool,
}
