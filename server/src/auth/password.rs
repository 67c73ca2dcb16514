//! Password hashing with Argon2id (the crate's recommended parameters).
//!
//! Hashing takes tens of milliseconds of CPU on purpose: callers run it on a blocking thread.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};

use crate::error::{ApiError, ApiResult};

/// Minimum password length (as PocketBase).
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted; bounds the work one request can cause.
pub const MAX_PASSWORD_LEN: usize = 256;

/// An Argon2id PHC string for `password`.
pub fn hash(password: &str) -> ApiResult<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal("hash password", e.to_string()))
}

/// Whether `password` matches the PHC string `hash`. A malformed hash never matches.
pub fn verify(password: &str, hash: &str) -> bool {
    Argon2::default().verify_password(password.as_bytes(), hash).is_ok()
}

/// Verifies against a fixed hash, so that an unknown identity costs the same time as a wrong
/// password and the two cannot be told apart by timing.
pub fn verify_dummy(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let h = DUMMY.get_or_init(|| hash("dummy password for timing").unwrap_or_default());
    let _ = verify(password, h);
}

/// Checks length rules; returns the message for the `password` field if they fail.
pub fn check_strength(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_LEN {
        return Err(format!("Must be at least {MIN_PASSWORD_LEN} characters."));
    }
    if n > MAX_PASSWORD_LEN {
        return Err(format!("Must be at most {MAX_PASSWORD_LEN} characters."));
    }
    Ok(())
}

/// Gives the memory of a finished hash back to the system. Argon2id works in 19 MiB, which
/// glibc keeps in the arena of the blocking thread that ran it; over a few threads that is
/// tens of MiB of resident memory for an idle server. Trimming costs far less than a hash.
fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs [`hash`] on a blocking thread.
pub async fn hash_async(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || {
        let h = hash(&password);
        release_memory();
        h
    })
    .await
    .map_err(|e| ApiError::internal("hash task", e.to_string()))?
}

/// Runs [`verify`] (or [`verify_dummy`] when there is no hash) on a blocking thread.
pub async fn verify_async(password: String, hash: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        let ok = match hash {
            Some(h) => verify(&password, &h),
            None => {
                verify_dummy(&password);
                false
            }
        };
        release_memory();
        ok
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashes_are_argon2id_and_verify() {
        let h = super::hash("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(super::verify("correct horse", &h));
        assert!(!super::verify("wrong horse", &h));
        assert!(!super::verify("x", "not a hash"));
    }
}
