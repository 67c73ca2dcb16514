//! Realtime: record events pushed to subscribers over WebSocket or PocketBase's Server-Sent
//! Events protocol.
//!
//! Events come from committed changes, never from handler code: every committed write
//! transaction of a database with connected clients hands its changeset to the [`Hub`]
//! (`capture` on a master; the follower after each applied page on a replica). A router task
//! hands each commit to its database's lane (`dispatch`), one task per database with clients,
//! which turns it into events, checks each against the subscriber's rules on a read connection
//! of that database, and queues it on the client's bounded buffer.
//!
//! Architecture invariants:
//! - The writer only ever hands over a changeset it already has (or captures one while clients
//!   are connected); it never waits for a client, a rule check or the dispatcher.
//! - A client's buffer is bounded. A client that cannot keep up is disconnected with a close
//!   reason; it never slows the writer or the other clients.
//! - An event is sent only after the rule it is checked against (listRule for a collection
//!   subscription, viewRule for a record subscription) passed for that client, on committed data.
//! - One database's subscribers never delay another database's events: each database's commits
//!   are rendered by its own lane, in commit order, and queue against its own share of the
//!   backlog ([`MAX_BACKLOG`] commits, [`MAX_LANE_BYTES`]).

pub mod capture;
pub mod dispatch;
pub mod handlers;
pub mod revoke;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{Notify, mpsc};

use crate::auth::Identity;

pub use handlers::configure;

/// Subscriptions one client may hold (as PocketBase).
pub const MAX_SUBSCRIPTIONS: usize = 1000;

/// Commits of one database waiting for (or in) its lane before the lane is considered
/// overloaded: further commits are dropped and every client of the database gets a `resync`
/// instead.
pub const MAX_BACKLOG: usize = 10_000;

/// Bytes of changesets waiting, over every database (as with [`MAX_BACKLOG`]): a few large
/// transactions must not hold hundreds of MB in the queue.
pub const MAX_BACKLOG_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of changesets one database may have waiting: a quarter of [`MAX_BACKLOG_BYTES`], so a
/// database whose subscribers are slow to serve cannot take the whole budget from the others.
pub const MAX_LANE_BYTES: usize = MAX_BACKLOG_BYTES / 4;

/// Bytes of topics, filters, expands and fields one client's subscriptions may hold together:
/// with [`MAX_SUBSCRIPTIONS`], what bounds a client's memory.
pub const MAX_SUBSCRIPTION_BYTES: usize = 128 * 1024;

/// What a subscription asks for: the records of one collection, or one record of it, with the
/// list options of a PocketBase topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// The SSE event name (the topic as the client sent it) or, over WebSocket, the collection.
    pub topic: String,
    /// Collection name or id.
    pub collection: String,
    /// One record (checked against the viewRule) or every record (the listRule).
    pub record: Option<String>,
    pub filter: Option<String>,
    pub expand: Option<String>,
    pub fields: Option<String>,
}

impl Subscription {
    /// The bytes of text it holds, counted against [`MAX_SUBSCRIPTION_BYTES`].
    pub fn bytes(&self) -> usize {
        let opt = |o: &Option<String>| o.as_ref().map_or(0, String::len);
        self.topic.len()
            + self.collection.len()
            + opt(&self.record)
            + opt(&self.filter)
            + opt(&self.expand)
            + opt(&self.fields)
    }
}

/// Checks a client's whole subscription set against [`MAX_SUBSCRIPTIONS`] and
/// [`MAX_SUBSCRIPTION_BYTES`].
pub fn check_limits(subs: &[Subscription]) -> Result<(), String> {
    if subs.len() > MAX_SUBSCRIPTIONS {
        return Err(format!("a client holds at most {MAX_SUBSCRIPTIONS} subscriptions"));
    }
    let bytes: usize = subs.iter().map(Subscription::bytes).sum();
    if bytes > MAX_SUBSCRIPTION_BYTES {
        return Err(format!(
            "a client's subscriptions hold at most {} KiB of topics, filters, expands and fields ({} KiB asked)",
            MAX_SUBSCRIPTION_BYTES >> 10,
            bytes.div_ceil(1024)
        ));
    }
    Ok(())
}

/// The two wire protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    WebSocket,
    Sse,
}

/// One connected realtime client.
pub struct Client {
    pub id: String,
    pub db: String,
    pub protocol: Protocol,
    /// Who the client is; over SSE, set by the subscription POST.
    pub who: Mutex<Identity>,
    /// The token `who` came from, re-checked while the connection lives (see `revoke.rs`).
    pub token: Mutex<Option<String>>,
    /// The peer address, for `REALTIME_MAX_PER_IP`.
    pub ip: Option<std::net::IpAddr>,
    /// Shared with the lane rendering a commit, which takes a reference instead of a copy.
    pub subs: Mutex<Arc<Vec<Subscription>>>,
    out: mpsc::Sender<String>,
    /// Set once, with the reason the client is being disconnected.
    closed: Mutex<Option<String>>,
    close: Notify,
}

impl Client {
    /// Queues one message; `false` when the client is gone or was just disconnected because
    /// its buffer is full.
    pub fn send(&self, message: String) -> bool {
        match self.out.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.disconnect(format!("too slow: {} messages were waiting", self.out.max_capacity()));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the connection to close with `reason`; the first reason wins.
    pub fn disconnect(&self, reason: String) {
        if let Ok(mut c) = self.closed.lock() {
            if c.is_none() {
                log::info!("realtime client {} disconnected: {reason}", self.id);
                *c = Some(reason);
            }
        }
        self.close.notify_one();
    }

    /// Resolves with the reason once the client must be disconnected.
    pub async fn closing(&self) -> String {
        loop {
            if let Some(r) = self.closed.lock().ok().and_then(|c| c.clone()) {
                return r;
            }
            self.close.notified().await;
        }
    }

    /// Whether the client is being disconnected.
    pub fn is_closing(&self) -> bool {
        self.closed.lock().map(|c| c.is_some()).unwrap_or(true)
    }

    pub fn identity(&self) -> Identity {
        self.who.lock().map(|w| w.clone()).unwrap_or(Identity::Guest)
    }

    pub fn subscriptions(&self) -> Arc<Vec<Subscription>> {
        self.subs.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node holds `REALTIME_MAX_CLIENTS` connections.
    Full,
    /// The peer address holds `REALTIME_MAX_PER_IP` connections.
    PerIp,
}

/// A committed change set of one database, or the news that its copy was replaced.
pub enum Committed {
    Changes { db: String, changeset: Vec<u8> },
    Resync { db: String },
}

impl Committed {
    pub fn db(&self) -> &str {
        match self {
            Committed::Changes { db, .. } | Committed::Resync { db } => db,
        }
    }
}

/// The registry of connected clients and the queue of commits to turn into events.
pub struct Hub {
    clients: RwLock<HashMap<String, Arc<Client>>>,
    /// Connected clients per database: commits of other databases are not captured.
    watching: RwLock<HashMap<String, usize>>,
    queue: mpsc::UnboundedSender<Committed>,
    /// Per database, the commits and bytes of changesets published and not yet rendered.
    backlog: Mutex<HashMap<String, (usize, usize)>>,
    /// Bytes of the changesets not yet rendered, over every database.
    backlog_bytes: AtomicUsize,
    pub buffer: usize,
    pub ping: std::time::Duration,
    pub max_clients: usize,
    /// `REALTIME_MAX_PER_IP`: connections one peer address may hold (0: no limit).
    pub max_per_ip: usize,
    /// Connections per peer address.
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Whether this node serves subscriptions (always on a master; `REPLICA_REALTIME` on a replica).
    pub enabled: bool,
}

impl Hub {
    /// A hub and the receiving end of its commit queue (for [`dispatch::run`]).
    pub fn new(
        enabled: bool,
        buffer: usize,
        ping: std::time::Duration,
        max_clients: usize,
        max_per_ip: usize,
    ) -> (Arc<Hub>, mpsc::UnboundedReceiver<Committed>) {
        let (queue, rx) = mpsc::unbounded_channel();
        let hub = Hub {
            clients: RwLock::new(HashMap::new()),
            watching: RwLock::new(HashMap::new()),
            queue,
            backlog: Mutex::new(HashMap::new()),
            backlog_bytes: AtomicUsize::new(0),
            buffer,
            ping,
            max_clients,
            max_per_ip,
            per_ip: Mutex::new(HashMap::new()),
            enabled,
        };
        (Arc::new(hub), rx)
    }

    /// Whether database `db` has connected clients (then its commits are worth capturing).
    pub fn watching(&self, db: &str) -> bool {
        self.watching
            .read()
            .map(|w| w.get(db).is_some_and(|n| *n > 0))
            .unwrap_or(false)
    }

    /// Hands a committed changeset of `db` to the dispatcher. Never blocks.
    pub fn publish(&self, db: &str, changeset: Vec<u8>) {
        if changeset.is_empty() || !self.watching(db) {
            return;
        }
        let bytes = changeset.len();
        let admitted = self.backlog.lock().is_ok_and(|mut backlog| {
            let (commits, lane_bytes) = backlog.entry(db.to_string()).or_default();
            let total = self.backlog_bytes.load(Ordering::Acquire);
            if *commits >= MAX_BACKLOG || *lane_bytes + bytes > MAX_LANE_BYTES || total + bytes > MAX_BACKLOG_BYTES {
                return false;
            }
            *commits += 1;
            *lane_bytes += bytes;
            self.backlog_bytes.fetch_add(bytes, Ordering::AcqRel);
            true
        });
        if !admitted {
            log::warn!(
                "realtime: the events of '{db}' are too far behind ({MAX_BACKLOG} commits, {} MiB of the \
                 database or {} MiB in all): its clients must resync",
                MAX_LANE_BYTES >> 20,
                MAX_BACKLOG_BYTES >> 20
            );
            self.resync(db);
            return;
        }
        if self
            .queue
            .send(Committed::Changes {
                db: db.to_string(),
                changeset,
            })
            .is_err()
        {
            self.rendered(db, bytes);
        }
    }

    /// Commits of `db` published and not yet rendered.
    pub fn pending(&self, db: &str) -> usize {
        self.backlog
            .lock()
            .map(|b| b.get(db).map_or(0, |(n, _)| *n))
            .unwrap_or(0)
    }

    /// Tells every client of `db` that its events stopped describing the data (the replica's
    /// copy was replaced, or events were dropped): it must read again.
    pub fn resync(&self, db: &str) {
        if self.watching(db) {
            let _ = self.queue.send(Committed::Resync { db: db.to_string() });
        }
    }

    /// Queues `message` for `client`, and forgets a client that could not take it, so that a
    /// stuck connection costs nothing more.
    pub fn deliver(&self, client: &Client, message: String) {
        if !client.send(message) {
            self.disconnected(client);
        }
    }

    /// Called by a lane when it rendered (or gave up on) a commit of `db` of `bytes`.
    fn rendered(&self, db: &str, bytes: usize) {
        if let Ok(mut backlog) = self.backlog.lock() {
            if let Some((commits, lane_bytes)) = backlog.get_mut(db) {
                *commits = commits.saturating_sub(1);
                *lane_bytes = lane_bytes.saturating_sub(bytes);
                if *commits == 0 {
                    backlog.remove(db);
                }
            }
        }
        self.backlog_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Registers a new client of `db` connected from `ip`; refused when the node is at
    /// `REALTIME_MAX_CLIENTS` or the address at `REALTIME_MAX_PER_IP`.
    pub fn connect(
        &self,
        db: &str,
        protocol: Protocol,
        who: Identity,
        token: Option<String>,
        ip: Option<std::net::IpAddr>,
    ) -> Result<(Arc<Client>, mpsc::Receiver<String>), Refused> {
        let (out, rx) = mpsc::channel(self.buffer);
        let client = Arc::new(Client {
            id: crate::util::random_id(30),
            db: db.to_string(),
            protocol,
            who: Mutex::new(who),
            token: Mutex::new(token),
            ip,
            subs: Mutex::new(Arc::new(Vec::new())),
            out,
            closed: Mutex::new(None),
            close: Notify::new(),
        });
        let mut clients = self.clients.write().map_err(|_| Refused::Full)?;
        if clients.len() >= self.max_clients {
            return Err(Refused::Full);
        }
        if let (Some(ip), true) = (ip, self.max_per_ip > 0) {
            let mut per_ip = self.per_ip.lock().map_err(|_| Refused::Full)?;
            let n = per_ip.entry(ip).or_default();
            if *n >= self.max_per_ip {
                return Err(Refused::PerIp);
            }
            *n += 1;
        }
        clients.insert(client.id.clone(), client.clone());
        if let Ok(mut w) = self.watching.write() {
            *w.entry(db.to_string()).or_default() += 1;
        }
        Ok((client, rx))
    }

    /// Forgets a client whose connection ended.
    pub fn disconnected(&self, client: &Client) {
        let removed = self
            .clients
            .write()
            .map(|mut c| c.remove(&client.id).is_some())
            .unwrap_or(false);
        if let (true, Some(ip), Ok(mut per_ip)) = (removed, client.ip, self.per_ip.lock()) {
            if let Some(n) = per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        if removed {
            if let Ok(mut w) = self.watching.write() {
                if let Some(n) = w.get_mut(&client.db) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        w.remove(&client.db);
                    }
                }
            }
        }
    }

    pub fn client(&self, id: &str) -> Option<Arc<Client>> {
        self.clients.read().ok()?.get(id).cloned()
    }

    /// The clients of `db` that hold at least one subscription.
    /// Every connected client, of every database.
    pub fn all(&self) -> Vec<Arc<Client>> {
        self.clients
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn subscribers(&self, db: &str) -> Vec<Arc<Client>> {
        self.clients
            .read()
            .map(|c| {
                c.values()
                    .filter(|c| c.db == db && c.subs.lock().is_ok_and(|s| !s.is_empty()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Connected clients (for `/health`).
    pub fn count(&self) -> usize {
        self.clients.read().map(|c| c.len()).unwrap_or(0)
    }
}

/// Parses a PocketBase topic: `collection/*` or `collection/recordId`, optionally followed by
/// `?options={"query": {"filter", "expand", "fields"}}` (URL-encoded JSON).
pub fn parse_topic(topic: &str) -> Result<Subscription, String> {
    if topic.is_empty() || topic.len() > 2048 {
        return Err("a topic is 1 to 2048 characters".into());
    }
    let (path, query) = match topic.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (topic, None),
    };
    let (collection, record) = path
        .split_once('/')
        .ok_or_else(|| format!("topic '{path}' is not 'collection/*' or 'collection/recordId'"))?;
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid(collection) || !(record == "*" || valid(record)) {
        return Err(format!("topic '{path}' is not 'collection/*' or 'collection/recordId'"));
    }
    let mut sub = Subscription {
        topic: topic.to_string(),
        collection: collection.to_string(),
        record: (record != "*").then(|| record.to_string()),
        filter: None,
        expand: None,
        fields: None,
    };
    if let Some(q) = query {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k != "options" {
                continue;
            }
            let options: serde_json::Value =
                serde_json::from_str(&v).map_err(|e| format!("topic options are not JSON: {e}"))?;
            let query = &options["query"];
            let text = |k: &str| -> Result<Option<String>, String> {
                match &query[k] {
                    serde_json::Value::Null => Ok(None),
                    serde_json::Value::String(s) if s.is_empty() => Ok(None),
                    serde_json::Value::String(s) => Ok(Some(s.clone())),
                    _ => Err(format!("topic option '{k}' must be a string")),
                }
            };
            sub.filter = text("filter")?;
            sub.expand = text("expand")?;
            sub.fields = text("fields")?;
        }
    }
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        let s = parse_topic("posts/*").unwrap();
        assert_eq!((s.collection.as_str(), s.record.as_deref()), ("posts", None));
        let s = parse_topic(
            "posts/abc123?options=%7B%22query%22%3A%7B%22expand%22%3A%22author%22%2C%22filter%22%3A%22n%3E1%22%7D%7D",
        )
        .unwrap();
        assert_eq!(s.record.as_deref(), Some("abc123"));
        assert_eq!(s.expand.as_deref(), Some("author"));
        assert_eq!(s.filter.as_deref(), Some("n>1"));
        for bad in [
            "",
            "posts",
            "posts/",
            "/x",
            "po sts/*",
            "posts/../x",
            "posts/*?options=nope",
        ] {
            assert!(parse_topic(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn the_commit_queue_is_bounded_in_bytes_per_database_and_overflow_becomes_a_resync() {
        let (hub, mut rx) = Hub::new(true, 2, std::time::Duration::from_secs(25), 10, 0);
        let dbs = ["default", "b", "c", "d", "e"];
        let _clients: Vec<_> = dbs
            .iter()
            .map(|db| hub.connect(db, Protocol::Sse, Identity::Guest, None, None).unwrap())
            .collect();
        // 40 commits of 4 MiB to one database with no dispatcher running: it holds at most its
        // share, and the other databases' commits are still taken.
        for _ in 0..40 {
            hub.publish("default", vec![7u8; 4 << 20]);
        }
        for db in &dbs[1..] {
            for _ in 0..4 {
                hub.publish(db, vec![7u8; 4 << 20]);
            }
        }
        let mut held: HashMap<String, usize> = HashMap::new();
        let mut resyncs: HashMap<String, usize> = HashMap::new();
        while let Ok(c) = rx.try_recv() {
            match c {
                Committed::Changes { db, changeset } => *held.entry(db).or_default() += changeset.len(),
                Committed::Resync { db } => *resyncs.entry(db).or_default() += 1,
            }
        }
        assert_eq!(held["default"], MAX_LANE_BYTES);
        assert_eq!(
            resyncs["default"], 36,
            "every dropped commit asks its clients to resync"
        );
        for db in ["b", "c", "d"] {
            assert_eq!(held[db], 4 * (4 << 20), "{db}");
        }
        // Over every database, the queue holds at most MAX_BACKLOG_BYTES.
        assert_eq!(held.values().sum::<usize>(), MAX_BACKLOG_BYTES);
        assert_eq!(resyncs["e"], 4);
        assert_eq!(hub.pending("default"), 4);
        hub.rendered("default", 4 << 20);
        assert_eq!(hub.pending("default"), 3);
    }

    #[tokio::test]
    async fn a_full_buffer_disconnects_only_that_client() {
        let (hub, _rx) = Hub::new(true, 2, std::time::Duration::from_secs(25), 10, 0);
        let (slow, _slow_rx) = hub
            .connect("default", Protocol::Sse, Identity::Guest, None, None)
            .unwrap();
        let (fast, mut fast_rx) = hub
            .connect("default", Protocol::Sse, Identity::Guest, None, None)
            .unwrap();
        for i in 0..3 {
            slow.send(format!("m{i}"));
            fast.send(format!("m{i}"));
            assert_eq!(fast_rx.recv().await.as_deref(), Some(format!("m{i}").as_str()));
        }
        assert!(slow.closing().await.starts_with("too slow"));
        assert!(fast.closed.lock().unwrap().is_none());
        assert!(hub.watching("default"));
        hub.disconnected(&slow);
        hub.disconnected(&fast);
        assert!(!hub.watching("default"));
        let (hub, _rx) = Hub::new(true, 2, std::time::Duration::from_secs(25), 1, 0);
        let _one = hub
            .connect("default", Protocol::Sse, Identity::Guest, None, None)
            .unwrap();
        assert!(
            hub.connect("default", Protocol::Sse, Identity::Guest, None, None)
                .is_err()
        );
    }
}
