//! The replicated schema of a database: its `sqlite_master` objects, their hash, and the
//! migration that brings a replica's schema up to a master's (append-only: tables are never
//! dropped, columns are only added).

use std::collections::{BTreeMap, HashSet};

use rusqlite::Connection;
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

/// Brings the schema of `conn` up to `target` (a master's objects): [`migrate_structure`],
/// then [`migrate_indexes`]. Runs inside the caller's transaction.
pub fn migrate(conn: &Connection, target: &[SchemaObject]) -> rusqlite::Result<()> {
    migrate_structure(conn, target)?;
    migrate_indexes(conn, target)
}

/// The part of a migration that must come before an entry's data: drops the indexes the
/// master dropped or changed, creates missing tables and adds missing columns. Tables are never
/// dropped and columns never removed.
///
/// Indexes the master created are left to [`migrate_indexes`], after the data: a transaction
/// that fixed a duplicate and then added a UNIQUE index on the master must not meet the
/// duplicate here.
pub fn migrate_structure(conn: &Connection, target: &[SchemaObject]) -> rusqlite::Result<()> {
    check_target(target)?;
    let local: BTreeMap<(String, String), SchemaObject> = objects(conn)?
        .into_iter()
        .map(|o| ((o.kind.clone(), o.name.clone()), o))
        .collect();
    let wanted: HashSet<(String, String)> = target.iter().map(|o| (o.kind.clone(), o.name.clone())).collect();
    for ((kind, name), o) in &local {
        let changed = target
            .iter()
            .any(|t| &t.kind == kind && &t.name == name && t.sql != o.sql);
        if kind == "index" && (!wanted.contains(&(kind.clone(), name.clone())) || changed) {
            conn.execute_batch(&format!("DROP INDEX IF EXISTS {}", quote_ident(name)))?;
        }
    }
    for t in target.iter().filter(|t| t.kind == "table") {
        match local.get(&(t.kind.clone(), t.name.clone())) {
            None => run_schema_sql(conn, &t.sql)?,
            Some(o) if o.sql != t.sql => add_missing_columns(conn, t)?,
            Some(_) => {}
        }
    }
    Ok(())
}

/// The part of a migration that comes after an entry's data: creates the indexes the master has
/// and this copy lacks.
pub fn migrate_indexes(conn: &Connection, target: &[SchemaObject]) -> rusqlite::Result<()> {
    check_target(target)?;
    let have: HashSet<(String, String)> = objects(conn)?.into_iter().map(|o| (o.kind, o.name)).collect();
    for t in target.iter().filter(|t| t.kind == "index") {
        if !have.contains(&(t.kind.clone(), t.name.clone())) {
            run_schema_sql(conn, &t.sql)?;
        }
    }
    Ok(())
}

/// vski creates tables and indexes only; a master's schema with anything else (a trigger, a
/// view) is refused rather than partly applied.
fn check_target(target: &[SchemaObject]) -> rusqlite::Result<()> {
    match target.iter().find(|t| t.kind != "table" && t.kind != "index") {
        Some(t) => Err(refused(&format!("{} {}", t.kind, t.name))),
        None => Ok(()),
    }
}

fn refused(what: &str) -> rusqlite::Error {
    log::error!("refused schema SQL from the master: {what}");
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_AUTH),
        Some(format!("refused schema SQL from the master: {what}")),
    )
}

/// Runs one schema statement from the master, one statement only, and only of the shapes vski
/// itself creates: `CREATE TABLE` and `CREATE [UNIQUE] INDEX`. Anything else (`ATTACH`,
/// `VACUUM INTO`, `PRAGMA`, a second statement) is refused and logged.
pub fn run_schema_sql(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    let words: Vec<String> = sql.split_whitespace().take(3).map(|w| w.to_ascii_uppercase()).collect();
    let shape_ok = matches!(
        words.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
        ["CREATE", "TABLE", _] | ["CREATE", "INDEX", _] | ["CREATE", "UNIQUE", "INDEX"]
    );
    if !shape_ok {
        return Err(refused(sql));
    }
    // `prepare` refuses a string with a second statement after the first.
    let mut stmt = conn.prepare(sql).map_err(|e| match e {
        rusqlite::Error::MultipleStatement => refused(sql),
        other => other,
    })?;
    stmt.raw_execute()?;
    Ok(())
}

/// Adds the columns the master's table has and the local one lacks. The master's column list
/// comes from running its CREATE TABLE in a scratch in-memory database.
fn add_missing_columns(conn: &Connection, t: &SchemaObject) -> rusqlite::Result<()> {
    let scratch = Connection::open_in_memory()?;
    run_schema_sql(&scratch, &t.sql)?;
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
    if !crate::db::table_exists(conn, table)? {
        return Ok(None);
    }
    Ok(Some(columns(conn, table)?.len()))
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
    fn only_single_create_table_and_index_statements_run() {
        let c = Connection::open_in_memory().unwrap();
        for ok in [
            "CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL)",
            "CREATE INDEX ia ON a (id)",
            "create unique index ib on a (id)",
        ] {
            run_schema_sql(&c, ok).unwrap();
        }
        for bad in [
            "ATTACH '/tmp/x.db' AS x",
            "VACUUM INTO '/tmp/copy.db'",
            "PRAGMA writable_schema = 1",
            "CREATE TABLE b (id TEXT PRIMARY KEY); ATTACH '/tmp/y.db' AS y",
            "CREATE TRIGGER t AFTER INSERT ON a BEGIN DELETE FROM a; END",
            "DROP TABLE a",
        ] {
            assert!(run_schema_sql(&c, bad).is_err(), "{bad}");
        }
        assert!(
            column_count(&c, "b").unwrap().is_none(),
            "the statement before ATTACH did not run"
        );
        let trigger = SchemaObject {
            kind: "trigger".into(),
            name: "t".into(),
            tbl_name: "a".into(),
            sql: "CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; END".into(),
        };
        assert!(migrate(&c, &[trigger]).is_err());
    }

    #[test]
    fn new_indexes_wait_for_the_data_and_dropped_ones_go_first() {
        // The master fixed a duplicate and added a UNIQUE index in one transaction.
        let replica = Connection::open_in_memory().unwrap();
        replica
            .execute_batch(
                "CREATE TABLE u (id TEXT PRIMARY KEY NOT NULL, handle TEXT NOT NULL DEFAULT '');
                 INSERT INTO u VALUES ('a', 'dup'), ('b', 'dup');",
            )
            .unwrap();
        let master = Connection::open_in_memory().unwrap();
        master
            .execute_batch(
                "CREATE TABLE u (id TEXT PRIMARY KEY NOT NULL, handle TEXT NOT NULL DEFAULT '');
                 CREATE UNIQUE INDEX u_handle ON u (handle);",
            )
            .unwrap();
        let target = objects(&master).unwrap();
        migrate_structure(&replica, &target).unwrap();
        replica
            .execute_batch("UPDATE u SET handle = 'b' WHERE id = 'b'")
            .unwrap();
        migrate_indexes(&replica, &target).unwrap();
        assert_eq!(hash(&objects(&replica).unwrap()), hash(&target));
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
