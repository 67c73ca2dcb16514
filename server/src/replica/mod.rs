//! Replication. The master records every write transaction of a replicated database as a
//! changelog entry (`recorder`) and serves it to replicas (`master`); replicas apply entries in
//! order (`apply`) after migrating to the schema they carry (`schema`). `checksum` gives both
//! sides a comparable fingerprint of their content.

pub mod apply;
pub mod checksum;
pub mod feed;
pub mod follower;
pub mod forward;
pub mod master;
pub mod position;
pub mod recorder;
pub mod rowlog;
pub mod schema;

pub use master::configure;

use crate::db::{STATS_DB, WORKFLOWS_DB};

/// Where snapshots are written (master) and downloaded (replica) before they are sent or
/// restored. Nothing in it outlives the process that wrote it.
pub fn snapshot_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join(".snapshots")
}

/// Tables that stay on their node: the changelog, a replica's own sync state, the master's
/// webhook queue, SQLite's own.
pub fn is_local_table(name: &str) -> bool {
    name == "_changelog" || name.starts_with("_replica_") || name.starts_with("_webhook") || name.starts_with("sqlite_")
}

/// Whether database `name` is replicated (and so recorded on the master).
pub fn is_replicated_db(name: &str) -> bool {
    name != STATS_DB && name != WORKFLOWS_DB
}
