//! `X-Db-Position` tokens: which history of a database a node holds, and how far along it.
//!
//! A token is `<epoch>.<uid>.<version>.<hash>`: the master's epoch, the database's uid, a
//! version, and the first [`HASH_CHARS`] hex characters of the changelog's chained hash at that
//! version. Epoch and uid alone cannot tell two histories apart: a master restored from a file
//! copy, or one that lost its last commits in a power cut, keeps both and writes new entries
//! under the version numbers of the lost ones. The hash can: two histories that agree on the
//! hash at a version are the same history up to it. Tokens without the hash (older servers,
//! version 0, entries written before the chain) are accepted and compared by version alone.

/// Hex characters of the chained hash kept in a token: 64 bits, enough that two histories of
/// one database never share a prefix by chance.
pub const HASH_CHARS: usize = 16;

/// A database's position: which history (`epoch`, `uid`, and the hash at `version`) and how
/// far along it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub uid: String,
    pub version: i64,
    /// The prefix of the chained hash at `version`; empty when unknown.
    pub hash: String,
}

/// The cookie that carries a database's position for clients that send no
/// `X-Min-Db-Position` (`POSITION_COOKIE=on`).
pub fn cookie_name(db: &str) -> String {
    format!("vski_position_{db}")
}

/// How long a position cookie lives: long enough for the reads after a write, short enough
/// that a browser does not keep waiting for old positions.
pub const COOKIE_MAX_AGE_SECS: i64 = 300;

/// The part of a chained hash that positions keep.
pub fn prefix(hash: &str) -> String {
    hash.get(..HASH_CHARS).unwrap_or(hash).to_string()
}

impl Position {
    pub fn new(epoch: &str, uid: &str, version: i64, hash: &str) -> Position {
        Position {
            epoch: epoch.to_string(),
            uid: uid.to_string(),
            version,
            hash: prefix(hash),
        }
    }

    /// The token sent in `X-Db-Position`.
    pub fn token(&self) -> String {
        if self.hash.is_empty() {
            format!("{}.{}.{}", self.epoch, self.uid, self.version)
        } else {
            format!("{}.{}.{}.{}", self.epoch, self.uid, self.version, self.hash)
        }
    }

    /// Reads a token; `None` for anything that is not one.
    pub fn parse(token: &str) -> Option<Position> {
        let mut parts = token.trim().split('.');
        let (e, u, v) = (parts.next()?, parts.next()?, parts.next()?);
        let h = parts.next().unwrap_or("");
        if parts.next().is_some() {
            return None;
        }
        let id = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric());
        let hex = h.len() <= HASH_CHARS && h.bytes().all(|b| b.is_ascii_hexdigit());
        (id(e) && id(u) && hex).then_some(())?;
        let version = v.parse().ok().filter(|v: &i64| *v >= 0)?;
        Some(Position::new(e, u, version, &h.to_ascii_lowercase()))
    }

    /// Whether `other` is of the same master epoch and database (its history may still differ).
    pub fn same_origin(&self, other: &Position) -> bool {
        self.epoch == other.epoch && self.uid == other.uid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_with_and_without_the_hash() {
        let p = Position::new("ep", "uid1", 42, "0123456789abcdef0123456789abcdef");
        assert_eq!(p.token(), "ep.uid1.42.0123456789abcdef");
        assert_eq!(Position::parse(&p.token()), Some(p));
        let old = Position::parse("ep.uid1.7").unwrap();
        assert_eq!((old.version, old.hash.as_str()), (7, ""));
        assert_eq!(old.token(), "ep.uid1.7");
    }

    #[test]
    fn anything_else_is_not_a_position() {
        for bad in [
            "",
            "a.b",
            "a.b.-1",
            "a.b.x",
            "a.b.1.xyz",
            "a.b.1.0123456789abcdef0",
            "a.b.1.ab.cd",
            "a-b.c.1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
    }
}
