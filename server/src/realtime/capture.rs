//! Capturing the committed changes of databases that record no changelog (`stats`,
//! `workflows`, every database with `CHANGELOG=off`, a replica's local databases), for realtime.
//! A session is attached only while the database has connected clients; otherwise a
//! transaction pays one map lookup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use rusqlite::session::Session;

use super::Hub;
use crate::db::writer::{Recorder, TxRecording};
use crate::replica::is_local_table;
use crate::webhooks::Emitter;

/// A [`Recorder`] that only hands each committed changeset to the realtime hub.
pub struct Capture {
    db: String,
    hub: Arc<Hub>,
    /// The changeset of the transaction in flight, published when it commits.
    pending: Arc<Mutex<Option<Vec<u8>>>>,
    /// Webhook deliveries, queued in the transaction of their change (master only), and
    /// whether the transaction in flight queued some.
    webhooks: Option<Arc<Emitter>>,
    queued: Arc<AtomicBool>,
}

impl Capture {
    pub fn new(db: &str, hub: Arc<Hub>, webhooks: Option<Arc<Emitter>>) -> Arc<Self> {
        Arc::new(Capture {
            db: db.to_string(),
            hub,
            pending: Arc::new(Mutex::new(None)),
            webhooks,
            queued: Arc::new(AtomicBool::new(false)),
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
    webhooks: Option<(Arc<Emitter>, Arc<AtomicBool>)>,
}

impl TxRecording for Capturing<'_> {
    /// Realtime never fails the transaction: events are a view of the data, not part of it,
    /// and a changeset that cannot be taken makes the clients resync instead. Webhook
    /// deliveries are part of the commit: failing to queue them fails it.
    fn before_commit(self: Box<Self>, conn: &Connection) -> rusqlite::Result<()> {
        let Capturing {
            mut session,
            db,
            hub,
            pending,
            webhooks,
        } = *self;
        let mut changeset = Vec::new();
        let taken = session.changeset_strm(&mut changeset);
        drop(session);
        if let Some((emitter, queued)) = webhooks.filter(|(e, _)| e.active()) {
            taken.as_ref().map_err(|_| rusqlite::Error::InvalidQuery)?;
            if emitter.enqueue(conn, &changeset)? > 0 {
                queued.store(true, Ordering::Relaxed);
            }
        }
        match taken {
            Ok(()) => {
                if hub.watching(&db) {
                    if let Ok(mut p) = pending.lock() {
                        *p = Some(changeset);
                    }
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
    fn init(&self, _: &mut Connection) -> rusqlite::Result<()> {
        Ok(())
    }

    fn begin<'c>(&self, conn: &'c Connection) -> rusqlite::Result<Box<dyn TxRecording + 'c>> {
        if let Ok(mut p) = self.pending.lock() {
            *p = None;
        }
        self.queued.store(false, Ordering::Relaxed);
        let webhooks = self.webhooks.as_ref().filter(|w| w.active());
        if !self.hub.watching(&self.db) && webhooks.is_none() {
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
            webhooks: webhooks.map(|w| (w.clone(), self.queued.clone())),
        }))
    }

    fn finished(&self, committed: bool) {
        if committed && self.queued.swap(false, Ordering::Relaxed) {
            if let Some(w) = &self.webhooks {
                w.hooks.queued(&w.db);
            }
        }
        let changes = self.pending.lock().ok().and_then(|mut p| p.take());
        if let (true, Some(cs)) = (committed, changes) {
            self.hub.publish(&self.db, cs);
        }
    }
}
