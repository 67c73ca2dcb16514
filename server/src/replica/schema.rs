//! The replicated schema of a database: its `sqlite_master` objects, their hash, and the
//! migration that brings a replica's schema up to a master's (append-only: tables are never
//! dropped, columns are only added).

use std::collections::{BTreeMap, HashSet};

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::is_local_table;
use crate::util::{quote_ident, sha256_hex};

/// One row of `sqlite_master` that replicates.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SchemaObject {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub tbl_name: String,
    pub sql: String,
}

/// The replicated objects of `conn`'s main database, sorted by type and name. Internal
/// objects (`sqlite_*`, automatic indexes without SQL) and local tables are left out.
pub fn objects(conn: &Connection) -> rusqlite::Result<Vec<SchemaObject>> {
    let mut stmt = conn.prepare_cached(
        "SELECT type, name, tbl_name, sql FROM sqlite_master
         WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY type, name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SchemaObject {
            kind: r.get(0)?,
            name: r.get(1)?,
            tbl_name: r.get(2)?,
            sql: r.get(3)?,
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        let o = row?;
        if !is_local_table(&o.tbl_name) {
            out.push(o);
        }
    }
    Ok(out)
}

/// A hash of the objects: equal on two databases with the same replicated schema.
pub fn hash(objects: &[SchemaObject]) -> String {
    let mut text = String::new();
    for o in objects {
        text.push_str(&format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1e}",
            o.kind, o.name, o.tbl_name, o.sql
        ));
    }
    sha256_hex(text.as_bytes())
}

/// `(name, declaration)` of each column of `table`, in order, as `ADD COLUMN` would take it.
fn columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({})", quote_ident(table)))?;
    let rows = stmt.query_map([], |r| {
        let name: String = r.get(1)?;
        let ty: String = r.get(2)?;
        let not_null: bool = r.get(3)?;
        let default: Option<String> = r.get(4)?;
        let mut decl = format!("{} {ty}", quote_ident(&name));
        if not_null {
            decl.push_str(" NOT NULL");
        }
        if let Some(d) = default {
            decl.push_str(&format!(" DEFAULT {d}"));
        }
        Ok((name, decl))
    })?;
    rows.collect()
}

/// Brings the schema of `conn` up to `target` (a master's objects): creates missing tables,
/// adds missing columns, and creates, replaces or drops indexes, triggers and views. Tables are
/// never dropped and columns never removed. Runs inside the caller's transaction.
pub fn migrate(conn: &Connection, target: &[SchemaObject]) -> rusqlite::Result<()> {
    let local: BTreeMap<(String, String), SchemaObject> = objects(conn)?
        .into_iter()
        .map(|o| ((o.kind.clone(), o.name.clone()), o))
        .collect();
    let wanted: HashSet<(String, String)> = target.iter().map(|o| (o.kind.clone(), o.name.clone())).collect();

    // Objects that depend on tables go first, so they can be rebuilt after the tables change.
    for ((kind, name), o) in &local {
        let changed = target
            .iter()
            .any(|t| &t.kind == kind && &t.name == name && t.sql != o.sql);
        if kind != "table" && (!wanted.contains(&(kind.clone(), name.clone())) || changed) {
            conn.execute_batch(&format!("DROP {} IF EXISTS {}", kind.to_uppercase(), quote_ident(name)))?;
        }
    }
    for t in target.iter().filter(|t| t.kind == "table") {
        match local.get(&(t.kind.clone(), t.name.clone())) {
            None => conn.execute_batch(&t.sql)?,
            Some(o) if o.sql != t.sql => add_missing_columns(conn, t)?,
            Some(_) => {}
        }
    }
    let after: HashSet<(String, String)> = objects(conn)?.into_iter().map(|o| (o.kind, o.name)).collect();
    for t in target.iter().filter(|t| t.kind != "table") {
        if !after.contains(&(t.kind.clone(), t.name.clone())) {
            conn.execute_batch(&t.sql)?;
        }
    }
    Ok(())
}

/// Adds the columns the master's table has and the local one lacks. The master's column list
/// comes from running its CREATE TABLE in a scratch in-memory database.
fn add_missing_columns(conn: &Connection, t: &SchemaObject) -> rusqlite::Result<()> {
    let scratch = Connection::open_in_memory()?;
    scratch.execute_batch(&t.sql)?;
    let theirs = columns(&scratch, &t.name)?;
    let ours: HashSet<String> = columns(conn, &t.name)?
        .into_iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    for (name, decl) in theirs {
        if !ours.contains(&name.to_ascii_lowercase()) {
            conn.execute_batch(&format!("ALTER TABLE {} ADD COLUMN {decl}", quote_ident(&t.name)))?;
        }
    }
    Ok(())
}

/// The number of columns of `table`, if it exists.
pub fn column_count(conn: &Connection, table: &str) -> rusqlite::Result<Option<usize>> {
    let exists = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |_| Ok(()),
        )
        .optional()?;
    match exists {
        Some(()) => Ok(Some(columns(conn, table)?.len())),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_adds_tables_columns_and_indexes_but_never_drops_tables() {
        let master = Connection::open_in_memory().unwrap();
        master
            .execute_batch(
                "CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL, x TEXT NOT NULL DEFAULT '');
                 ALTER TABLE a ADD COLUMN y NUMERIC NOT NULL DEFAULT 0;
                 CREATE TABLE b (id TEXT PRIMARY KEY NOT NULL);
                 CREATE INDEX ia ON a (y);",
            )
            .unwrap();
        let replica = Connection::open_in_memory().unwrap();
        replica
            .execute_batch(
                "CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL, x TEXT NOT NULL DEFAULT '');
                 CREATE TABLE old (id TEXT PRIMARY KEY NOT NULL);
                 CREATE INDEX gone ON a (x);
                 INSERT INTO a (id, x) VALUES ('r1', 'kept');",
            )
            .unwrap();
        let target = objects(&master).unwrap();
        migrate(&replica, &target).unwrap();
        let mut got = objects(&replica).unwrap();
        got.retain(|o| o.name != "old");
        assert_eq!(got.iter().map(|o| &o.name).collect::<Vec<_>>(), vec!["ia", "a", "b"]);
        assert_eq!(column_count(&replica, "a").unwrap(), Some(3));
        assert_eq!(
            column_count(&replica, "old").unwrap(),
            Some(1),
            "tables are never dropped"
        );
        let y: i64 = replica
            .query_row("SELECT y FROM a WHERE id = 'r1'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(y, 0);
        migrate(&replica, &target).unwrap();
    }

    #[test]
    fn hash_ignores_local_tables() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL)")
            .unwrap();
        let before = hash(&objects(&c).unwrap());
        c.execute_batch("CREATE TABLE _changelog (version INTEGER PRIMARY KEY)")
            .unwrap();
        assert_eq!(before, hash(&objects(&c).unwrap()));
    }
}
