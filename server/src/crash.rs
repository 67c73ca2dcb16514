//! Crash points for tests: `VSKI_CRASH_AT=point[@n][,point[@n]…]` makes the process abort the
//! `n`-th time (default: the first) it reaches `point`, exactly where a power cut or `kill -9`
//! would hurt most. The kill tests use them to crash inside a transaction deterministically
//! instead of guessing from log timing. Without the variable, a crash point is one atomic
//! load.
//!
//! Points: `apply:before_commit` (a replica applied a page and set its version, not yet
//! committed), `restore:mid` (a replica's restore has copied part of a snapshot into the live
//! database), `swap:before_rename` (a replica's first copy of a database: the empty file is
//! closed and its WAL removed, the snapshot not yet renamed over it).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The armed points and how many more hits each needs before it fires.
fn armed() -> &'static Mutex<HashMap<String, u32>> {
    static ARMED: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var("VSKI_CRASH_AT").unwrap_or_default();
        let points = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('@') {
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1).max(1)),
                None => (s.to_string(), 1),
            })
            .collect();
        Mutex::new(points)
    })
}

/// Whether `name` is armed at all (a code path may prepare a crash there).
pub fn is_armed(name: &str) -> bool {
    armed().lock().map(|m| m.contains_key(name)).unwrap_or(false)
}

/// Aborts the process when `name` is armed and this is its `n`-th hit.
pub fn point(name: &str) {
    let fire = armed()
        .lock()
        .map(|mut m| match m.get_mut(name) {
            Some(1) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        })
        .unwrap_or(false);
    if fire {
        log::error!("crash point {name} reached: aborting (VSKI_CRASH_AT)");
        std::process::abort();
    }
}
