//! HS256 JSON Web Tokens: minting and checking, with a `type` claim that keeps admin, user and
//! replica tokens apart.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::util::{sha256_hex, unix_now};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Admin,
    Auth,
    Replica,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    /// Admin or record id; for replica tokens, the replica id.
    pub sub: String,
    #[serde(rename = "type")]
    pub kind: TokenType,
    /// Auth tokens: the id of the auth collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection_id: Option<String>,
    /// Auth tokens: the database of the auth collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<String>,
    /// A fingerprint of the record's `tokenKey`: rotating the key (password change) makes
    /// every earlier token of that record invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tk: Option<String>,
    pub iat: u64,
    pub exp: u64,
    /// Not valid before (seconds since the epoch). vski does not set it, but honours it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// The signing secret in both forms jsonwebtoken needs.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The fingerprint of a `tokenKey` stored in tokens.
pub fn token_key_fingerprint(token_key: &str) -> String {
    sha256_hex(token_key.as_bytes())[..16].to_string()
}

impl TokenKeys {
    pub fn new(secret: &str) -> Self {
        TokenKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    pub fn mint(&self, claims: &Claims) -> ApiResult<String> {
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding).map_err(|e| ApiError::internal("sign token", e))
    }

    /// Claims for a new token of `kind` for `sub`, valid for `ttl` seconds.
    pub fn claims(kind: TokenType, sub: &str, ttl: u64) -> Claims {
        let now = unix_now();
        Claims {
            sub: sub.to_string(),
            kind,
            collection_id: None,
            db: None,
            tk: None,
            iat: now,
            exp: now + ttl,
            nbf: None,
        }
    }

    /// Checks signature (HS256 only: `alg: none` and other algorithms fail), expiry and shape.
    ///
    /// Admin and user tokens get 5 s of leeway on `exp` and `nbf`. Replica tokens, minted by
    /// another machine, get [`REPLICA_LEEWAY`] both ways (`exp`, and an `iat` ahead of this
    /// clock), so that a replica whose clock is a few minutes off keeps syncing.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        // Expiry and `nbf` are checked below, with the leeway of the token's type.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "sub"]);
        let claims = decode::<Claims>(token, &self.decoding, &v).ok()?.claims;
        let now = unix_now();
        let leeway = if claims.kind == TokenType::Replica {
            REPLICA_LEEWAY
        } else {
            5
        };
        let expired = claims.exp.saturating_add(leeway) < now;
        // A token that is not valid yet is no token.
        let early = claims.nbf.is_some_and(|nbf| nbf > now + leeway)
            || (claims.kind == TokenType::Replica && claims.iat > now + leeway);
        (!expired && !early).then_some(claims)
    }
}

/// Seconds a replica's clock may be off the master's, either way, before the master refuses its
/// tokens (the replica then says "clock skew" with both clocks).
pub const REPLICA_LEEWAY: u64 = 300;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_secret() {
        let k = TokenKeys::new("secret-a");
        let t = k.mint(&TokenKeys::claims(TokenType::Admin, "abc", 60)).unwrap();
        let c = k.verify(&t).unwrap();
        assert_eq!((c.sub.as_str(), c.kind), ("abc", TokenType::Admin));
        assert!(TokenKeys::new("secret-b").verify(&t).is_none());
    }

    #[test]
    fn tokens_not_valid_yet_fail() {
        let k = TokenKeys::new("s");
        let mut c = TokenKeys::claims(TokenType::Auth, "u", 3600);
        c.nbf = Some(unix_now() + 600);
        assert!(k.verify(&k.mint(&c).unwrap()).is_none());
        c.nbf = Some(unix_now() - 1);
        assert!(k.verify(&k.mint(&c).unwrap()).is_some());
    }

    #[test]
    fn replica_tokens_allow_minutes_of_clock_skew_and_no_more() {
        let k = TokenKeys::new("s");
        let minted_at = |offset: i64| {
            let mut c = TokenKeys::claims(TokenType::Replica, "r", 300);
            c.iat = (unix_now() as i64 + offset) as u64;
            c.exp = c.iat + 300;
            k.mint(&c).unwrap()
        };
        // A replica 400 s behind or 250 s ahead is accepted; 700 s either way is not.
        assert!(k.verify(&minted_at(-400)).is_some());
        assert!(k.verify(&minted_at(250)).is_some());
        assert!(k.verify(&minted_at(-700)).is_none());
        assert!(k.verify(&minted_at(700)).is_none());
        // A user token gets no such leeway.
        let mut c = TokenKeys::claims(TokenType::Auth, "u", 60);
        c.exp = unix_now() - 60;
        assert!(k.verify(&k.mint(&c).unwrap()).is_none());
    }

    #[test]
    fn expired_tokens_fail() {
        let k = TokenKeys::new("s");
        let mut c = TokenKeys::claims(TokenType::Auth, "u", 60);
        c.exp = unix_now() - 3600;
        assert!(k.verify(&k.mint(&c).unwrap()).is_none());
    }
}
