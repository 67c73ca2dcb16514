//! Capturing the committed changes of databases that record no changelog (`stats`,
//! `workflows`, every database with `CHANGELOG=off`, a replica's local databases), for realtime.
//! A session is attached only while the database has connected clients; otherwise a
//! transaction pays one map lookup.

use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use rusqlite::session::Session;

use super::Hub;
use crate::db::writer::{Recorder, TxRecording};
use crate::replica::is_local_table;

/// A [`Recorder`] that only hands each committed changeset to the realtime hub.
pub struct Capture {
    db: String,
    hub: Arc<Hub>,
    /// The changeset of the transaction in flight, published when it commits.
    pending: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Capture {
    pub fn new(db: &str, hub: Arc<Hub>) -> Arc<Self> {
        Arc::new(Capture {
            db: db.to_string(),
            hub,
            pending: Arc::new(Mutex::new(None)),
        })
    }
}

struct Idle;

impl TxRecording for Idle {
    fn before_commit(self: Box<Self>, _: &Connection) -> rusqlite::Result<()> {
        Ok(())
    }
}

struct Capturing<'c> {
    session: Session<'c>,
    db: String,
    hub: Arc<Hub>,
    pending: Arc<Mutex<Option<Vec<u8>>>>,
}

impl TxRecording for Capturing<'_> {
    /// Never fails the transaction: events are a view of the data, not part of it. A changeset
    /// that cannot be taken makes the clients resync instead.
    fn before_commit(self: Box<Self>, _: &Connection) -> rusqlite::Result<()> {
        let Capturing {
            mut session,
            db,
            hub,
            pending,
        } = *self;
        let mut changeset = Vec::new();
        match session.changeset_strm(&mut changeset) {
            Ok(()) => {
                if let Ok(mut p) = pending.lock() {
                    *p = Some(changeset);
                }
            }
            Err(e) => {
                log::warn!("realtime: cannot take the changes of a transaction of '{db}': {e}");
                hub.resync(&db);
            }
        }
        Ok(())
    }
}

impl Recorder for Capture {
    fn init(&self, _: &Connection) -> rusqlite::Result<()> {
        Ok(())
    }

    fn begin<'c>(&self, conn: &'c Connection) -> rusqlite::Result<Box<dyn TxRecording + 'c>> {
        if let Ok(mut p) = self.pending.lock() {
            *p = None;
        }
        if !self.hub.watching(&self.db) {
            return Ok(Box::new(Idle));
        }
        let mut session = Session::new(conn)?;
        session.table_filter(Some(|t: &str| !is_local_table(t)));
        session.attach(None::<&str>)?;
        Ok(Box::new(Capturing {
            session,
            db: self.db.clone(),
            hub: self.hub.clone(),
            pending: self.pending.clone(),
        }))
    }

    fn finished(&self, committed: bool) {
        let changes = self.pending.lock().ok().and_then(|mut p| p.take());
        if let (true, Some(cs)) = (committed, changes) {
            self.hub.publish(&self.db, cs);
        }
    }
}
