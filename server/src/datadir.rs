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

/// Records the role of the server starting on `dir`.
pub fn write_mode(dir: &Path, replica: bool) -> std::io::Result<()> {
    std::fs::write(dir.join(MODE_FILE), if replica { "replica\n" } else { "master\n" })
}

/// Whether the last server on `dir` was a replica (by the marker, or by the replica state
/// kept in its `default` database).
pub fn is_replica_dir(dir: &Path) -> bool {
    let marker = std::fs::read_to_string(dir.join(MODE_FILE)).unwrap_or_default();
    if marker.trim() == "replica" {
        return true;
    }
    let db = dir.join("default.db");
    if !db.exists() {
        return false;
    }
    rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| crate::db::table_exists(&c, "_replica_state"))
        .unwrap_or(false)
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
