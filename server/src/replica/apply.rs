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
///
/// The schema goes in two steps around the data: tables, columns and dropped indexes first,
/// new indexes after (see [`schema::migrate_structure`]).
///
/// Returns the number of conflicts met. Versions are applied once each, so a conflict means the
/// copy drifted from the master: each one is logged as a warning, and the caller shows the
/// count (`/health` on a replica).
pub fn apply_entry(conn: &Connection, e: &Entry, policy: Conflicts) -> ApiResult<u64> {
    if let Some(objects) = &e.schema {
        schema::migrate_structure(conn, objects)?;
    }
    let conflicts = apply_changeset(conn, e, policy)?;
    if let Some(objects) = &e.schema {
        schema::migrate_indexes(conn, objects)?;
    }
    Ok(conflicts)
}

/// Applies a page of entries in order inside the caller's transaction, as [`apply_entry`] each
/// would. Runs of entries that change no schema are merged into one changeset first (SQLite's
/// changegroup: the merge of A then B has the effect of A then B) and applied in one call:
/// every call of the session extension opens and releases a savepoint, whose cost grows with
/// the transaction, so thousands of small entries applied one by one cost quadratic time.
pub fn apply_entries(conn: &Connection, entries: &[Entry], policy: Conflicts) -> ApiResult<u64> {
    let mut conflicts = 0;
    let mut i = 0;
    while i < entries.len() {
        let run = entries[i..].iter().take_while(|e| e.schema.is_none()).count();
        if run <= 1 {
            conflicts += apply_entry(conn, &entries[i], policy)?;
            i += 1;
            continue;
        }
        let mut group = rusqlite::session::Changegroup::new()?;
        for e in &entries[i..i + run] {
            if !e.changeset.is_empty() {
                group.add_stream(&mut &e.changeset[..])?;
            }
        }
        let mut merged = Vec::new();
        group.output_strm(&mut merged)?;
        conflicts += apply_bytes(conn, &merged, entries[i + run - 1].version, policy)?;
        i += run;
    }
    Ok(conflicts)
}

fn apply_changeset(conn: &Connection, e: &Entry, policy: Conflicts) -> ApiResult<u64> {
    apply_bytes(conn, &e.changeset, e.version, policy)
}

/// Applies one changeset (of the entries up to `version`).
fn apply_bytes(conn: &Connection, changeset: &[u8], version: i64, policy: Conflicts) -> ApiResult<u64> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    if changeset.is_empty() {
        return Ok(0);
    }
    check_tables(conn, changeset)?;
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    conn.apply_strm(
        &mut &changeset[..],
        None::<fn(&str) -> bool>,
        move |kind: ConflictType, item: &ChangesetItem| {
            counted.fetch_add(1, Ordering::Relaxed);
            let table = item.op().map(|op| op.table_name().to_string()).unwrap_or_default();
            log::warn!("drift: conflict {kind:?} on table '{table}' while applying versions up to {version}");
            match (policy, kind) {
                (
                    Conflicts::Converge,
                    ConflictType::SQLITE_CHANGESET_DATA | ConflictType::SQLITE_CHANGESET_CONFLICT,
                ) => ConflictAction::SQLITE_CHANGESET_REPLACE,
                (Conflicts::Converge, ConflictType::SQLITE_CHANGESET_NOTFOUND) => ConflictAction::SQLITE_CHANGESET_OMIT,
                _ => ConflictAction::SQLITE_CHANGESET_ABORT,
            }
        },
    )?;
    Ok(count.load(Ordering::Relaxed))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::writer::Recorder;
    use crate::replica::recorder::{ChangeRecorder, entries_since};

    const START: &str = "CREATE TABLE u (id TEXT PRIMARY KEY NOT NULL, handle TEXT NOT NULL DEFAULT '');
         INSERT INTO u VALUES ('a', 'dup'), ('b', 'dup');";

    /// Records `sql` as one transaction on a master that starts at [`START`]; returns its entry.
    fn recorded(sql: &str) -> Entry {
        let mut master = Connection::open_in_memory().unwrap();
        master.execute_batch(START).unwrap();
        let recorder = ChangeRecorder::new();
        recorder.init(&mut master).unwrap();
        master.execute_batch("BEGIN IMMEDIATE").unwrap();
        let tx = recorder.begin(&master).unwrap();
        master.execute_batch(sql).unwrap();
        tx.before_commit(&master).unwrap();
        master.execute_batch("COMMIT").unwrap();
        let mut entries = entries_since(&master, 0, 10, 1 << 20).unwrap();
        assert_eq!(entries.len(), 1);
        entries.pop().unwrap()
    }

    #[test]
    fn data_and_a_unique_index_in_one_transaction_apply_in_the_masters_order() {
        let e = recorded("UPDATE u SET handle = 'b' WHERE id = 'b'; CREATE UNIQUE INDEX u_handle ON u (handle);");
        assert!(e.schema.is_some() && !e.changeset.is_empty());
        let replica = Connection::open_in_memory().unwrap();
        replica.execute_batch(START).unwrap();
        replica.execute_batch("BEGIN").unwrap();
        assert_eq!(apply_entry(&replica, &e, Conflicts::Strict).unwrap(), 0);
        replica.execute_batch("COMMIT").unwrap();
        assert_eq!(schema::hash(&schema::objects(&replica).unwrap()), e.schema_hash);
    }

    #[test]
    fn a_merged_page_ends_where_entries_applied_one_by_one_end() {
        // One master, many small transactions over the same rows, and a schema change between.
        let mut master = Connection::open_in_memory().unwrap();
        master.execute_batch(START).unwrap();
        let recorder = ChangeRecorder::new();
        recorder.init(&mut master).unwrap();
        let steps = [
            "INSERT INTO u VALUES ('c', 'x')",
            "UPDATE u SET handle = 'y' WHERE id = 'c'",
            "DELETE FROM u WHERE id = 'a'",
            "INSERT INTO u VALUES ('a', 'back')",
            "ALTER TABLE u ADD COLUMN n INTEGER NOT NULL DEFAULT 0",
            "UPDATE u SET n = 5 WHERE id = 'b'",
            "INSERT INTO u VALUES ('d', 'z', 1)",
            "DELETE FROM u WHERE id = 'd'",
            "UPDATE u SET n = n + 1, handle = 'last' WHERE id = 'c'",
        ];
        for sql in steps {
            master.execute_batch("BEGIN IMMEDIATE").unwrap();
            let tx = recorder.begin(&master).unwrap();
            master.execute_batch(sql).unwrap();
            tx.before_commit(&master).unwrap();
            master.execute_batch("COMMIT").unwrap();
            recorder.finished(true);
        }
        let entries = entries_since(&master, 0, 100, 1 << 20).unwrap();
        assert_eq!(entries.len(), steps.len());
        let content = |c: &Connection| -> Vec<(String, String, i64)> {
            c.prepare("SELECT id, handle, n FROM u ORDER BY id")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let one_by_one = Connection::open_in_memory().unwrap();
        one_by_one.execute_batch(START).unwrap();
        for e in &entries {
            assert_eq!(apply_entry(&one_by_one, e, Conflicts::Strict).unwrap(), 0);
        }
        let merged = Connection::open_in_memory().unwrap();
        merged.execute_batch(START).unwrap();
        merged.execute_batch("BEGIN").unwrap();
        assert_eq!(apply_entries(&merged, &entries, Conflicts::Strict).unwrap(), 0);
        merged.execute_batch("COMMIT").unwrap();
        assert_eq!(content(&merged), content(&master));
        assert_eq!(content(&one_by_one), content(&master));
    }

    #[test]
    fn a_dropped_index_goes_before_the_data_that_breaks_it() {
        let setup = "CREATE UNIQUE INDEX u_id2 ON u (id, handle);";
        let e = recorded(&format!("{setup} DROP INDEX u_id2;"));
        let replica = Connection::open_in_memory().unwrap();
        replica.execute_batch(START).unwrap();
        replica.execute_batch(setup).unwrap();
        apply_entry(&replica, &e, Conflicts::Strict).unwrap();
        assert_eq!(schema::hash(&schema::objects(&replica).unwrap()), e.schema_hash);
    }
}
