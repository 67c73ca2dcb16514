//! Realtime connections do not outlive the identity they were opened with.
//!
//! A connection keeps the token it authenticated with (`Client::token`), and its identity is
//! checked again:
//! - before the events of a commit that changed its own auth record (a password change rotates
//!   the token key, a deleted or changed record): by the dispatcher, so no event of that commit
//!   or after it reaches a revoked client;
//! - every [`SWEEP`], for every signed-in connection: a token past its `exp` (plus leeway), and
//!   for admins the `_superusers` record in `default`, which may change while their connection
//!   is on another database.
//!
//! A token that no longer verifies or names a record that is gone, or whose key changed, ends
//! the connection with a reason (a WebSocket close frame, the end of the SSE stream). The same
//! record with changed fields (a demoted user) stays connected, and its rules see the new record.

use std::sync::Arc;
use std::time::Duration;

use super::Client;
use crate::auth::{Identity, identify_token};
use crate::state::AppState;

/// The id of the auth record (user or admin) behind `who`.
pub fn record_id(who: &Identity) -> Option<String> {
    match who {
        Identity::Admin(a) => Some(a.id().to_string()),
        Identity::User { record, .. } => Some(record.id().to_string()),
        Identity::Guest | Identity::Replica(_) => None,
    }
}

/// How often signed-in connections are checked for expiry and deleted admins.
pub const SWEEP: Duration = Duration::from_secs(1);

/// Checks the identity of each of `clients` that signed in; see the module doc. `deep` re-reads
/// the record (a database read per client: the dispatcher passes only the clients whose record
/// a commit changed); otherwise only admins' records are re-read and the others' tokens
/// verified.
pub async fn recheck(state: &AppState, clients: &[Arc<Client>], deep: bool) {
    for client in clients {
        let who = client.identity();
        if matches!(who, Identity::Guest | Identity::Replica(_)) {
            continue;
        }
        let token = client.token.lock().ok().and_then(|t| t.clone());
        if token.as_deref().and_then(|t| state.tokens.verify(t)).is_none() {
            client.disconnect("auth revoked: the token expired".into());
            continue;
        }
        if !deep && !matches!(who, Identity::Admin(_)) {
            continue;
        }
        let Ok(now) = identify_token(state, token.as_deref(), &client.db).await else {
            continue;
        };
        if matches!(now, Identity::Guest) || !super::handlers::may_become(&who, &now) {
            client.disconnect("auth revoked: the user was deleted or its password changed".into());
            continue;
        }
        if let Ok(mut w) = client.who.lock() {
            *w = now;
        }
    }
}

/// Runs until the process stops: every [`SWEEP`], checks the signed-in connections.
pub async fn sweep(state: actix_web::web::Data<AppState>) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let clients = state.realtime.all();
        if !clients.is_empty() {
            recheck(&state, &clients, false).await;
        }
    }
}
