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
    Serve(ServeConfig),
    /// Manage administrators without a running server.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an administrator, or set the password of an existing one.
    Create {
        /// Email address the administrator signs in with.
        email: String,
        /// Password (at least 8 characters).
        password: String,
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

    /// HTTP worker threads. Default: one per CPU core.
    #[arg(long, env = "WORKERS")]
    pub workers: Option<usize>,
}
