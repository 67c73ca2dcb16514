//! Small helpers with no knowledge of HTTP or databases: ids, timestamps, hex, name checks.

use sha2::{Digest, Sha256};

const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) {
    // The OS random source failing means the machine cannot do cryptography at all;
    // there is nothing sensible to continue with.
    getrandom::fill(buf).expect("operating system random source failed");
}

/// A random string of `len` characters of `[a-z0-9]` (record and collection ids).
pub fn random_id(len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        random_bytes(&mut buf);
        for b in buf {
            // 252 = 7 * 36: rejecting the rest keeps every character equally likely.
            if b < 252 && out.len() < len {
                out.push(ID_ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    out
}

/// A new 15-character record id.
pub fn new_record_id() -> String {
    random_id(15)
}

/// A random secret of 64 hex characters (256 bits).
pub fn random_secret() -> String {
    let mut buf = [0u8; 32];
    random_bytes(&mut buf);
    hex(&buf)
}

/// An HTTP client for requests to URLs users configured (cron jobs, webhooks): at most
/// `timeout` per request, and redirects are not followed (a redirect could lead anywhere).
pub fn outbound_client(timeout: std::time::Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The current time as the API formats it: `YYYY-MM-DD HH:MM:SS.sssZ` (UTC).
/// The format sorts lexicographically in time order, so it is stored as-is in SQLite.
pub fn now_string() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Size and hex sha256 of a file, read in 1 MiB chunks.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex(&h.finalize())))
}

/// Whether `name` is a valid identifier for collections and fields:
/// a letter or `_` followed by letters, digits or `_`, at most 64 characters.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    name.len() <= 64 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Quotes an identifier for SQL. Callers validate names with [`is_identifier`] first; the
/// quoting is a second line of defence, not the first.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape() {
        for _ in 0..100 {
            let id = new_record_id();
            assert_eq!(id.len(), 15);
            assert!(id.bytes().all(|b| ID_ALPHABET.contains(&b)), "{id}");
        }
        assert_ne!(new_record_id(), new_record_id());
    }

    #[test]
    fn identifiers() {
        for ok in ["posts", "_superusers", "a1", "A_b"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "1a", "x; DROP TABLE posts", "a-b", "a b", "é", &"a".repeat(65)] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_sort_and_have_the_api_format() {
        let t = now_string();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b' ', "{t}");
    }

    #[test]
    fn hex_and_quote() {
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
