//! A small pool of read-only connections to one database file.
//!
//! Reads run on tokio's blocking threads with a connection checked out for the duration of
//! one closure, so no connection is ever held across an `.await`. A semaphore bounds how many
//! connections exist; idle ones are kept for reuse.

use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::Connection;
use tokio::sync::Semaphore;

use crate::error::{ApiError, ApiResult};

pub struct ReadPool {
    path: PathBuf,
    /// Idle connections. A plain mutex: it is held only to push or pop, never during a query.
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection that may exist at once.
    permits: Semaphore,
}

impl ReadPool {
    pub fn new(path: PathBuf, size: u32) -> Self {
        ReadPool {
            path,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size as usize),
        }
    }

    /// Runs `f` with a read connection on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> ApiResult<T> + Send + 'static,
    {
        let (_permit, conn) = self.checkout().await?;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let r = f(&conn);
            (conn, r)
        })
        .await
        .map_err(|e| ApiError::internal("read task", e.to_string()))?;
        self.idle.lock().map_err(poisoned)?.push(conn);
        result
    }

    /// Runs `f` with a read connection on the calling thread, without a hand-off to the
    /// blocking pool: for reads that take microseconds (a record by primary key), where moving
    /// to another thread and back costs more than the query. Never for scans.
    pub async fn read_now<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce(&Connection) -> ApiResult<T>,
    {
        let (_permit, conn) = self.checkout().await?;
        let result = f(&conn);
        self.idle.lock().map_err(poisoned)?.push(conn);
        result
    }

    /// A permit and an idle connection (or a new one); the caller pushes the connection back
    /// to `idle` before dropping the permit.
    async fn checkout(&self) -> ApiResult<(tokio::sync::SemaphorePermit<'_>, Connection)> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ApiError::internal("read pool", "database is closed"))?;
        let conn = match self.idle.lock().map_err(poisoned)?.pop() {
            Some(c) => c,
            None => super::open_connection(&self.path, true)?,
        };
        Ok((permit, conn))
    }

    /// Closes every idle connection and refuses new reads.
    pub fn close(&self) {
        self.permits.close();
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> ApiError {
    ApiError::internal("read pool", "lock poisoned")
}
