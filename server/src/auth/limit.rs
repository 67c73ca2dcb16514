//! Rate limiting of password sign-in, per client IP and identity, with governor's GCRA.
//!
//! The key is the TCP peer address (never `X-Forwarded-For`, which any client can set) with the
//! database, the collection and the lower-cased identity. Behind a reverse proxy every client
//! has the proxy's address, so the limit then counts per identity across all clients: a
//! guesser still cannot go faster than the limit, at the price that one person can hold up
//! another's sign-in for a minute.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::{ApiError, ApiResult};

/// The sign-in limiter shared by every worker.
pub struct SignInLimiter {
    /// `None` when `AUTH_RATE_LIMIT=0`.
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl SignInLimiter {
    /// Allows `per_minute` attempts per key per minute, all of them at once at most (the burst
    /// equals the per-minute count). 0 allows everything.
    pub fn new(per_minute: u32) -> Self {
        SignInLimiter {
            limiter: NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n))),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one attempt for `ip` and `identity` in `scope` (the database and collection);
    /// past the limit, a 429 saying when to retry.
    pub fn check(&self, ip: &str, scope: &str, identity: &str) -> ApiResult<()> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let key = format!("{ip}\n{scope}\n{}", identity.trim().to_lowercase());
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::TooManyRequests {
                retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }

    /// Forgets keys that are back at a full allowance, so a client spraying identities cannot
    /// grow the table without bound. Called every minute.
    pub fn prune(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How often [`SignInLimiter::prune`] runs.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_per_ip_and_identity() {
        let l = SignInLimiter::new(3);
        for _ in 0..3 {
            l.check("1.1.1.1", "default/users", "ada@example.com").unwrap();
        }
        match l.check("1.1.1.1", "default/users", "ADA@example.com ") {
            Err(ApiError::TooManyRequests { retry_after }) => assert!((1..=60).contains(&retry_after)),
            other => panic!("expected 429, got {other:?}"),
        }
        l.check("2.2.2.2", "default/users", "ada@example.com").unwrap();
        l.check("1.1.1.1", "default/users", "bob@example.com").unwrap();
        l.check("1.1.1.1", "tenant/users", "ada@example.com").unwrap();
    }

    #[test]
    fn zero_turns_it_off() {
        let l = SignInLimiter::new(0);
        for _ in 0..1000 {
            l.check("1.1.1.1", "s", "x").unwrap();
        }
        assert!(l.is_empty());
    }
}
