//! The installer token: who may create the first admin over HTTP.
//!
//! A master whose data directory holds no admin makes a one-time token, keeps it in
//! `DATA_DIR/.install_token` (mode 0600) and prints a ready command with it in the start-up log,
//! as PocketBase prints its installer link. `POST /api/admins/init` needs it as a bearer token;
//! the file is removed once the first admin exists. Whoever reaches the port first therefore no
//! longer becomes the admin: only someone who can read the log or the data directory can.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The file the token is kept in, inside the data directory.
pub const FILE: &str = ".install_token";

pub struct Installer {
    path: PathBuf,
    token: Mutex<Option<String>>,
}

impl Installer {
    /// An installer for `data_dir`, holding no token until [`Installer::open`].
    pub fn new(data_dir: &Path) -> Installer {
        Installer {
            path: data_dir.join(FILE),
            token: Mutex::new(None),
        }
    }

    /// The token of a data directory with no admin: the one kept from an earlier start, or a
    /// new one written with mode 0600.
    pub fn open(&self) -> std::io::Result<String> {
        let token = match std::fs::read_to_string(&self.path) {
            Ok(t) if t.trim().len() >= 32 => t.trim().to_string(),
            _ => {
                let t = crate::util::random_id(48);
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&self.path)?;
                f.write_all(t.as_bytes())?;
                f.sync_all()?;
                t
            }
        };
        if let Ok(mut held) = self.token.lock() {
            *held = Some(token.clone());
        }
        Ok(token)
    }

    /// Whether `presented` is the token (compared as digests, so the time taken says nothing
    /// of how much of it matched).
    pub fn accepts(&self, presented: Option<&str>) -> bool {
        let Some(presented) = presented else { return false };
        let held = self.token.lock().ok().and_then(|t| t.clone());
        held.is_some_and(|t| Sha256::digest(t.as_bytes()) == Sha256::digest(presented.as_bytes()))
    }

    /// Whether a token is waiting to be used.
    pub fn is_open(&self) -> bool {
        self.token.lock().is_ok_and(|t| t.is_some())
    }

    /// Forgets the token and removes its file: the first admin exists.
    pub fn close(&self) {
        if let Ok(mut held) = self.token.lock() {
            *held = None;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => log::info!("removed the installer token: an admin exists"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", self.path.display()),
        }
    }

    /// Where the token is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes the token file of `data_dir`, if any (`vski admin create` made an admin).
pub fn remove(data_dir: &Path) {
    Installer::new(data_dir).close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_kept_private_across_starts_and_removed_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let a = Installer::new(dir.path());
        assert!(!a.accepts(Some("anything")));
        let t = a.open().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A restart reads the same token.
        let b = Installer::new(dir.path());
        assert_eq!(b.open().unwrap(), t);
        assert!(b.accepts(Some(&t)));
        assert!(!b.accepts(Some(&t[1..])));
        assert!(!b.accepts(None));
        b.close();
        assert!(!b.accepts(Some(&t)) && !b.is_open());
        assert!(!b.path().exists());
    }
}
