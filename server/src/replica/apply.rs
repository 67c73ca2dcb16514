//! Applying changelog entries to a copy of a database (the replica's sync engine, and tests).

use rusqlite::Connection;
use rusqlite::fallible_streaming_iterator::FallibleStreamingIterator;
use rusqlite::session::{ChangesetItem, ChangesetIter, ConflictAction, ConflictType};

use super::recorder::Entry;
use super::schema;
use crate::error::{ApiError, ApiResult};

/// What to do when a change does not fit the local row (the copy drifted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflicts {
    /// The master's row wins; a missing row to update or delete is skipped. Converges.
    Converge,
    /// Any conflict aborts the entry: for checks that a copy is exactly at a version.
    Strict,
}

/// Applies one entry inside the caller's transaction: migrates to its schema when it carries
/// one, then applies its changeset. Refuses (instead of silently skipping, as SQLite would) a
/// changeset for a table the local schema lacks or has fewer columns in.
pub fn apply_entry(conn: &Connection, e: &Entry, policy: Conflicts) -> ApiResult<()> {
    if let Some(objects) = &e.schema {
        schema::migrate(conn, objects)?;
    }
    if e.changeset.is_empty() {
        return Ok(());
    }
    check_tables(conn, &e.changeset)?;
    conn.apply_strm(
        &mut &e.changeset[..],
        None::<fn(&str) -> bool>,
        move |kind: ConflictType, _: &ChangesetItem| match (policy, kind) {
            // Versions are applied once each, so conflicts mean the copy drifted.
            (Conflicts::Converge, ConflictType::SQLITE_CHANGESET_DATA | ConflictType::SQLITE_CHANGESET_CONFLICT) => {
                ConflictAction::SQLITE_CHANGESET_REPLACE
            }
            (Conflicts::Converge, ConflictType::SQLITE_CHANGESET_NOTFOUND) => ConflictAction::SQLITE_CHANGESET_OMIT,
            _ => ConflictAction::SQLITE_CHANGESET_ABORT,
        },
    )?;
    Ok(())
}

fn check_tables(conn: &Connection, changeset: &[u8]) -> ApiResult<()> {
    let mut input: &[u8] = changeset;
    let reader: &mut dyn std::io::Read = &mut input;
    let mut it = ChangesetIter::start_strm(&reader)?;
    let mut last = String::new();
    while let Some(item) = it.next()? {
        let op = item.op()?;
        if op.table_name() == last {
            continue;
        }
        last = op.table_name().to_string();
        let need = op.number_of_columns() as usize;
        match schema::column_count(conn, &last)? {
            Some(have) if have >= need => {}
            have => {
                return Err(ApiError::internal(
                    "apply changeset",
                    format!(
                        "table '{last}' has {} columns here, the changeset needs {need}",
                        have.unwrap_or(0)
                    ),
                ));
            }
        }
    }
    Ok(())
}
