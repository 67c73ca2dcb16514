//! The data directory as a whole: its creation with private permissions, the lock that allows
//! one vski process per directory, and the marker of the role the last server there played.
//!
//! Snapshots and database files hold password hashes and token keys, so everything vski
//! creates is private to its user: the process runs with umask 077 (files 0600, directories
//! 0700). The lock is an OS file lock (`flock`), which the kernel releases when the process
//! dies, so a crashed server never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The role marker: `replica` or `master`, written when a server starts.
const MODE_FILE: &str = ".node_mode";
const LOCK_FILE: &str = ".lock";

/// Makes every file and directory this process creates private to its user.
pub fn private_umask() {
    // SAFETY: umask only changes this process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (mode 0700 under [`private_umask`]) when `create` is set; otherwise it must
/// exist already.
pub fn ensure(dir: &Path, create: bool) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if !create {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "data directory {} does not exist (give --create to create it)",
                dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create data directory {}: {e}", dir.display())))
}

/// An exclusive lock on a data directory, held until dropped or the process ends.
#[derive(Debug)]
pub struct DirLock {
    /// The open lock file: closing it releases the `flock`.
    _file: File,
    pub path: PathBuf,
}

/// Takes the lock of `dir` without waiting. When another process holds it, the error says so
/// in one line, with that process's pid when known.
pub fn lock(dir: &Path) -> std::io::Result<DirLock> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on a file descriptor we own; it has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let pid = holder.trim();
            let who = if pid.is_empty() {
                "another vski process".to_string()
            } else {
                format!("another vski process (pid {pid})")
            };
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!("data directory {} is in use by {who}", dir.display()),
            ));
        }
        return Err(std::io::Error::new(
            err.kind(),
            format!("cannot lock {}: {err}", path.display()),
        ));
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(DirLock { _file: file, path })
}

/// The role a server plays on a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
}

impl Role {
    pub fn of(replica: bool) -> Role {
        if replica { Role::Replica } else { Role::Master }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Replica => "replica",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where [`claim_role`] moves a directory's data when its role changes.
const ROLE_CHANGE_DIR: &str = ".role-change";

/// Records the role of the server starting on `dir`.
pub fn write_mode(dir: &Path, replica: bool) -> std::io::Result<()> {
    std::fs::write(dir.join(MODE_FILE), format!("{}\n", Role::of(replica)))
}

/// The role the last server on `dir` played: the marker, or for a directory written before
/// markers existed, the replica state kept in its `default` database (a replica) or any
/// database file (a master). `None` for a directory that holds no data.
pub fn last_role(dir: &Path) -> Option<Role> {
    match std::fs::read_to_string(dir.join(MODE_FILE)).unwrap_or_default().trim() {
        "replica" => return Some(Role::Replica),
        "master" => return Some(Role::Master),
        _ => {}
    }
    let db = dir.join("default.db");
    let has_state = db.exists()
        && rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| crate::db::table_exists(&c, "_replica_state"))
            .unwrap_or(false);
    if has_state {
        Some(Role::Replica)
    } else if held_data(dir).is_empty() {
        None
    } else {
        Some(Role::Master)
    }
}

/// Whether the last server on `dir` was a replica.
pub fn is_replica_dir(dir: &Path) -> bool {
    last_role(dir) == Some(Role::Replica)
}

/// The entries of `dir` that hold data: database files (with their WAL and shared-memory
/// files) and the local file storage. Sorted by name.
fn held_data(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name == "storage" || name.ends_with(".db") || name.ends_with(".db-wal") || name.ends_with(".db-shm")
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// What `paths` hold, in a few words: the databases by name and their total size, and whether
/// there is file storage.
fn describe(paths: &[PathBuf]) -> String {
    let mut dbs = Vec::new();
    let mut bytes = 0u64;
    let mut storage = false;
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "storage" {
            storage = true;
            continue;
        }
        bytes += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        if let Some(db) = name.strip_suffix(".db") {
            dbs.push(db.to_string());
        }
    }
    let mut out = format!(
        "{} database{} ({}; {:.1} MB)",
        dbs.len(),
        if dbs.len() == 1 { "" } else { "s" },
        dbs.join(", "),
        bytes as f64 / 1e6
    );
    if storage {
        out.push_str(" and uploaded files in storage/");
    }
    out
}

/// Checks that `dir` may be started in role `role`, then records the role.
///
/// A directory last run in the other role that holds data is refused, naming the role and what
/// it holds: a replica would replace a master's databases with another master's snapshot, and
/// a master would take writes on a copy of someone else's history. With `allow_change` its
/// data is moved aside to `.role-change/OLDROLE-UNIXTIME/` instead (never deleted), and that
/// path is returned. An empty directory takes any role.
pub fn claim_role(dir: &Path, role: Role, allow_change: bool) -> std::io::Result<Option<PathBuf>> {
    let mut moved = None;
    match last_role(dir) {
        Some(last) if last != role => {
            let held = held_data(dir);
            if !held.is_empty() {
                if !allow_change {
                    let consequence = match role {
                        Role::Replica => "starting it as a replica would replace them with the master's snapshot",
                        Role::Master => {
                            "starting it as a master would take writes on a copy of another master's history"
                        }
                    };
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!(
                            "data directory {} was last run as a {last} and holds {}; {consequence}. \
                             Start it as a {last} again, give this {role} an empty directory, or set \
                             ALLOW_ROLE_CHANGE=true (--allow-role-change) to move that data aside to \
                             {}/ and start empty",
                            dir.display(),
                            describe(&held),
                            dir.join(ROLE_CHANGE_DIR).display()
                        ),
                    ));
                }
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = dir.join(ROLE_CHANGE_DIR).join(format!("{last}-{secs}"));
                std::fs::create_dir_all(&aside)?;
                for p in &held {
                    if let Some(name) = p.file_name() {
                        std::fs::rename(p, aside.join(name))?;
                    }
                }
                // The replica's id and position-related state go with its data.
                let _ = std::fs::rename(dir.join(".replica_id"), aside.join(".replica_id"));
                moved = Some(aside);
            }
        }
        _ => {}
    }
    write_mode(dir, role == Role::Replica)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock(tmp.path()).unwrap();
        let err = lock(tmp.path()).unwrap_err();
        assert!(
            err.to_string().contains("is in use by another vski process (pid"),
            "{err}"
        );
        drop(first);
        lock(tmp.path()).unwrap();
    }

    #[test]
    fn a_missing_directory_needs_create() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new");
        assert!(ensure(&dir, false).unwrap_err().to_string().contains("--create"));
        ensure(&dir, true).unwrap();
        assert!(dir.is_dir());
    }

    /// A directory with one database file, last run as `role`.
    fn dir_with_data(role: Role) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("default.db"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("storage")).unwrap();
        write_mode(tmp.path(), role == Role::Replica).unwrap();
        tmp
    }

    #[test]
    fn a_directory_of_the_other_role_is_refused_and_left_alone() {
        let tmp = dir_with_data(Role::Master);
        let err = claim_role(tmp.path(), Role::Replica, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("was last run as a master and holds 1 database (default;"),
            "{msg}"
        );
        assert!(msg.contains("storage/"), "{msg}");
        assert!(msg.contains("ALLOW_ROLE_CHANGE"), "{msg}");
        assert!(tmp.path().join("default.db").exists());
        assert_eq!(last_role(tmp.path()), Some(Role::Master));
    }

    #[test]
    fn a_role_change_when_allowed_moves_the_data_aside() {
        let tmp = dir_with_data(Role::Replica);
        let aside = claim_role(tmp.path(), Role::Master, true)
            .unwrap()
            .expect("moved aside");
        assert!(aside.starts_with(tmp.path().join(".role-change")));
        assert!(aside.file_name().unwrap().to_str().unwrap().starts_with("replica-"));
        assert_eq!(std::fs::read(aside.join("default.db")).unwrap(), b"x");
        assert!(aside.join("storage").is_dir());
        assert!(!tmp.path().join("default.db").exists());
        assert_eq!(last_role(tmp.path()), Some(Role::Master));
    }

    #[test]
    fn an_empty_directory_or_the_same_role_starts_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(claim_role(tmp.path(), Role::Replica, false).unwrap(), None);
        let tmp = dir_with_data(Role::Master);
        assert_eq!(claim_role(tmp.path(), Role::Master, false).unwrap(), None);
        assert!(tmp.path().join("default.db").exists());
        // Data written before markers existed: database files without `_replica_state` are a
        // master's.
        std::fs::remove_file(tmp.path().join(".node_mode")).unwrap();
        assert_eq!(last_role(tmp.path()), Some(Role::Master));
        assert!(claim_role(tmp.path(), Role::Replica, false).is_err());
    }

    #[test]
    fn the_mode_marker_says_replica() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!is_replica_dir(tmp.path()));
        write_mode(tmp.path(), true).unwrap();
        assert!(is_replica_dir(tmp.path()));
        write_mode(tmp.path(), false).unwrap();
        assert!(!is_replica_dir(tmp.path()));
    }
}
