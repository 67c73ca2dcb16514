//! The master's commit feed: which replicated databases committed since a point, and a wake-up
//! for the long-polls of streaming replicas (`GET /api/replica/stream`).
//!
//! Architecture invariant: a commit is published only after its COMMIT returned and its
//! position became the recorder's head, so a replica woken by the feed always finds the entry.
//! Nothing polls: a held request sleeps on a `watch` channel that only a commit (or shutdown)
//! moves.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// Commits of this process, numbered from 1, with the number of each database's last commit.
pub struct CommitFeed {
    /// Random per process: a cursor of an earlier process of the master means nothing here.
    boot: String,
    state: Mutex<FeedState>,
    tx: watch::Sender<u64>,
    stopping: AtomicBool,
}

#[derive(Default)]
struct FeedState {
    seq: u64,
    last_commit: HashMap<String, u64>,
}

/// What changed after a cursor.
#[derive(Debug, PartialEq)]
pub enum Changes {
    /// The cursor is of this process: the databases that committed after it (maybe none).
    Since(Vec<String>),
    /// The cursor is missing or of another process: every database may have moved.
    All,
}

impl Default for CommitFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl CommitFeed {
    pub fn new() -> Self {
        CommitFeed {
            boot: crate::util::random_id(10),
            state: Mutex::new(FeedState::default()),
            tx: watch::channel(0).0,
            stopping: AtomicBool::new(false),
        }
    }

    /// Publishes a commit of database `db`. Called by its recorder after COMMIT.
    pub fn committed(&self, db: &str) {
        let seq = {
            let Ok(mut s) = self.state.lock() else { return };
            s.seq += 1;
            let seq = s.seq;
            match s.last_commit.get_mut(db) {
                Some(v) => *v = seq,
                None => {
                    s.last_commit.insert(db.to_string(), seq);
                }
            }
            seq
        };
        self.tx.send_replace(seq);
    }

    /// The cursor of now and what changed after `cursor` (`<boot>.<seq>`, as returned before).
    pub fn since(&self, cursor: &str) -> (String, Changes) {
        let Ok(s) = self.state.lock() else {
            return (format!("{}.0", self.boot), Changes::All);
        };
        let now = format!("{}.{}", self.boot, s.seq);
        let theirs = cursor
            .split_once('.')
            .filter(|(boot, _)| *boot == self.boot)
            .and_then(|(_, seq)| seq.parse::<u64>().ok())
            .filter(|seq| *seq <= s.seq);
        let Some(after) = theirs else {
            return (now, Changes::All);
        };
        let mut names: Vec<String> = s
            .last_commit
            .iter()
            .filter(|(_, seq)| **seq > after)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        (now, Changes::Since(names))
    }

    /// A receiver that `changed()` wakes at the next commit. Take it before calling `since`,
    /// so that a commit between the two is never missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Ends every held request now (graceful shutdown must not wait for long-polls).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.tx.send_modify(|_| {});
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::{Changes, CommitFeed};

    #[test]
    fn a_cursor_names_exactly_the_databases_that_committed_after_it() {
        let feed = CommitFeed::new();
        let (start, all) = feed.since("");
        assert_eq!(all, Changes::All, "no cursor: everything may have moved");
        assert_eq!(feed.since(&start).1, Changes::Since(vec![]));
        feed.committed("a");
        feed.committed("b");
        let (mid, changes) = feed.since(&start);
        assert_eq!(changes, Changes::Since(vec!["a".into(), "b".into()]));
        feed.committed("b");
        assert_eq!(feed.since(&mid).1, Changes::Since(vec!["b".into()]));
        assert_eq!(feed.since("otherboot.1").1, Changes::All, "a cursor of another process");
        assert_eq!(
            feed.since(&format!("{}.999", start.split('.').next().unwrap())).1,
            Changes::All
        );
    }

    #[tokio::test]
    async fn a_commit_after_subscribing_wakes_the_receiver() {
        let feed = std::sync::Arc::new(CommitFeed::new());
        let mut rx = feed.subscribe();
        let f = feed.clone();
        std::thread::spawn(move || f.committed("a"));
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
            .await
            .expect("woken")
            .expect("sender alive");
    }
}
