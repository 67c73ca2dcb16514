//! The master's change capture: SQLite's preupdate hook notes which rows a write transaction
//! touched, and before COMMIT the notes become a changeset in the session extension's format.
//!
//! It does what a session object does (a session is itself a preupdate hook), but keeps what
//! a session must rebuild for every transaction: the tables' column lists and the statements
//! that read a row's current values. Sessions cannot be reset, so the recorder used to create
//! one per transaction and pay SQLite's `PRAGMA table_xinfo` and statement preparation each
//! time, which was most of the changelog's cost at one connection.
//!
//! Architecture invariant: the changeset describes the committed transaction exactly, as a
//! session's would. The hook keeps each row's first image in the transaction (its state
//! before the transaction); the new image is read from the database before COMMIT. A
//! savepoint rolled back in between therefore needs no bookkeeping: a row it restored reads
//! back as unchanged and is left out, as in a session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::hooks::{Action, PreUpdateCase};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};

use super::is_local_table;

/// One column value, as a changeset stores it.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Int(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl Val {
    fn of(v: ValueRef<'_>) -> Val {
        match v {
            ValueRef::Null => Val::Null,
            ValueRef::Integer(i) => Val::Int(i),
            ValueRef::Real(f) => Val::Real(f),
            ValueRef::Text(t) => Val::Text(t.to_vec()),
            ValueRef::Blob(b) => Val::Blob(b.to_vec()),
        }
    }

    /// Appends the value in the changeset encoding: a type byte, then 8 big-endian bytes for
    /// numbers, or a varint length and the bytes for text and blobs.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Val::Null => out.push(5),
            Val::Int(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_be_bytes());
            }
            Val::Real(f) => {
                out.push(2);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
            Val::Text(t) => {
                out.push(3);
                put_varint(out, t.len() as u64);
                out.extend_from_slice(t);
            }
            Val::Blob(b) => {
                out.push(4);
                put_varint(out, b.len() as u64);
                out.extend_from_slice(b);
            }
        }
    }

    /// Whether two values are the same for a changeset: same type and same bytes (a session
    /// compares exactly this way, so `1` and `1.0` differ).
    fn same(&self, other: &Val) -> bool {
        match (self, other) {
            (Val::Real(a), Val::Real(b)) => a.to_bits() == b.to_bits(),
            _ => self == other,
        }
    }
}

/// SQLite's varint: 7 bits a byte, most significant group first (lengths stay far below the
/// 9-byte form).
fn put_varint(out: &mut Vec<u8>, v: u64) {
    let mut groups = [0u8; 10];
    let mut n = 0;
    let mut v = v;
    loop {
        groups[n] = (v & 0x7f) as u8;
        n += 1;
        v >>= 7;
        if v == 0 {
            break;
        }
    }
    for i in (0..n).rev() {
        out.push(if i > 0 { groups[i] | 0x80 } else { groups[i] });
    }
}

/// What the hook saw, in order. Values are copied whole; which of them form the key is
/// known only to the table cache, consulted before COMMIT.
#[derive(Debug)]
struct Event {
    table: usize,
    old: Option<Vec<Val>>,
    new: Option<Vec<Val>>,
    indirect: bool,
}

#[derive(Default)]
struct Captured {
    /// True between `start` and `finish`: changes outside a recorded transaction are not noted.
    on: bool,
    tables: Vec<String>,
    events: Vec<Event>,
    /// A value the hook could not read: the transaction must fail rather than lose a change.
    failed: Option<String>,
}

impl Captured {
    fn table(&mut self, name: &str) -> usize {
        match self.tables.iter().rposition(|t| t == name) {
            Some(i) => i,
            None => {
                self.tables.push(name.to_string());
                self.tables.len() - 1
            }
        }
    }
}

/// A table's columns as a changeset describes them.
#[derive(Debug)]
struct TableInfo {
    columns: usize,
    /// Per column: 0, or its position in the primary key (1-based), as in the changeset header.
    pk: Vec<u8>,
    /// The default of each column, for rows noted before an `ADD COLUMN` in the transaction.
    defaults: Vec<Option<String>>,
    /// `SELECT <every column> FROM t WHERE <key columns> = ?…`, prepared once and cached.
    select: String,
    /// Key column indexes in primary-key order.
    key: Vec<usize>,
}

/// The capture of one writer connection. Install it once with [`RowLog::install`]; then
/// `start` after BEGIN and `changeset` before COMMIT.
#[derive(Default)]
pub struct RowLog {
    captured: Arc<Mutex<Captured>>,
    /// Table descriptions by name, valid for one `schema_version`.
    tables: Mutex<TableCache>,
}

/// `(schema_version, descriptions)`; `None` for a table a changeset leaves out.
type TableCache = (i64, HashMap<String, Option<Arc<TableInfo>>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_values(count: i32, get: impl Fn(i32) -> rusqlite::Result<Val>) -> Result<Vec<Val>, String> {
    (0..count).map(|i| get(i).map_err(|e| e.to_string())).collect()
}

impl RowLog {
    /// Sets the preupdate hook on `conn`. The connection must not also carry a session (a
    /// session replaces the hook).
    pub fn install(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let captured = self.captured.clone();
        conn.preupdate_hook(Some(move |_: Action, db: &str, table: &str, case: &PreUpdateCase| {
            if db != "main" || is_local_table(table) {
                return;
            }
            let mut c = lock(&captured);
            if !c.on || c.failed.is_some() {
                return;
            }
            let (old, new, depth) = match case {
                PreUpdateCase::Insert(n) => (
                    None,
                    Some(read_values(n.get_column_count(), |i| {
                        n.get_new_column_value(i).map(Val::of)
                    })),
                    n.get_query_depth(),
                ),
                PreUpdateCase::Delete(o) => (
                    Some(read_values(o.get_column_count(), |i| {
                        o.get_old_column_value(i).map(Val::of)
                    })),
                    None,
                    o.get_query_depth(),
                ),
                PreUpdateCase::Update {
                    old_value_accessor: o,
                    new_value_accessor: n,
                } => (
                    Some(read_values(o.get_column_count(), |i| {
                        o.get_old_column_value(i).map(Val::of)
                    })),
                    Some(read_values(n.get_column_count(), |i| {
                        n.get_new_column_value(i).map(Val::of)
                    })),
                    o.get_query_depth(),
                ),
                PreUpdateCase::Unknown => {
                    c.failed = Some(format!("an unknown change to table {table}"));
                    return;
                }
            };
            let (old, new) = match (old.transpose(), new.transpose()) {
                (Ok(o), Ok(n)) => (o, n),
                (Err(e), _) | (_, Err(e)) => {
                    c.failed = Some(format!("reading a changed row of {table}: {e}"));
                    return;
                }
            };
            let table = c.table(table);
            c.events.push(Event {
                table,
                old,
                new,
                indirect: depth > 0,
            });
        }))
    }

    /// Starts noting changes (right after BEGIN).
    pub fn start(&self) {
        let mut c = lock(&self.captured);
        c.on = true;
        c.events.clear();
        c.tables.clear();
        c.failed = None;
    }

    /// Stops noting changes without a changeset (the transaction was rolled back).
    pub fn stop(&self) {
        let mut c = lock(&self.captured);
        c.on = false;
        c.events = Vec::new();
        c.tables.clear();
    }

    /// Stops noting changes and returns the transaction's changeset (empty when no row of a
    /// recorded table changed). Call before COMMIT, on the connection the hook is set on, with
    /// its current `PRAGMA schema_version` (the table descriptions cached for another version
    /// are read again).
    pub fn changeset(&self, conn: &Connection, schema_version: i64) -> rusqlite::Result<Vec<u8>> {
        Ok(self.changesets(conn, schema_version, false)?.0)
    }

    /// [`RowLog::changeset`], and with `full` a second one for realtime events whose updates
    /// carry every column's new value (a session's leave out the unchanged ones). An event
    /// rendered after a later commit deleted the row still has the whole row as updated.
    pub fn changesets(
        &self,
        conn: &Connection,
        schema_version: i64,
        full: bool,
    ) -> rusqlite::Result<(Vec<u8>, Option<Vec<u8>>)> {
        let (tables, events, failed) = {
            let mut c = lock(&self.captured);
            c.on = false;
            (
                std::mem::take(&mut c.tables),
                std::mem::take(&mut c.events),
                c.failed.take(),
            )
        };
        if let Some(msg) = failed {
            return Err(schema_error(msg));
        }
        if events.is_empty() {
            return Ok((Vec::new(), full.then(Vec::new)));
        }
        let infos: Vec<Option<Arc<TableInfo>>> = {
            let mut cache = lock(&self.tables);
            if cache.0 != schema_version {
                *cache = (schema_version, HashMap::new());
            }
            let mut out = Vec::with_capacity(tables.len());
            for name in &tables {
                let info = match cache.1.get(name) {
                    Some(i) => i.clone(),
                    None => {
                        let i = table_info(conn, name)?.map(Arc::new);
                        cache.1.insert(name.clone(), i.clone());
                        i
                    }
                };
                out.push(info);
            }
            out
        };

        // The first image of every row, keyed by its primary key, in the order rows were
        // first touched.
        let mut rows: Vec<Vec<Row>> = (0..tables.len()).map(|_| Vec::new()).collect();
        let mut index: Vec<HashMap<Vec<u8>, usize>> = (0..tables.len()).map(|_| HashMap::new()).collect();
        for ev in events {
            let Some(info) = &infos[ev.table] else { continue };
            let old = ev.old.map(|v| fit(conn, info, v, &tables[ev.table])).transpose()?;
            let new = ev.new.map(|v| fit(conn, info, v, &tables[ev.table])).transpose()?;
            let old_key = old.as_ref().and_then(|v| key_of(info, v));
            let new_key = new.as_ref().and_then(|v| key_of(info, v));
            let mut note = |key: Vec<u8>, values: Option<Vec<Val>>, before: Option<Vec<Val>>| {
                let (rows, index) = (&mut rows[ev.table], &mut index[ev.table]);
                match index.get(&key) {
                    Some(&i) => rows[i].indirect &= ev.indirect,
                    None => {
                        index.insert(key, rows.len());
                        rows.push(Row {
                            before,
                            key_values: values.unwrap_or_default(),
                            indirect: ev.indirect,
                        });
                    }
                }
            };
            // The row as it was (an update or a delete), unless its key holds a NULL.
            if let Some(k) = &old_key {
                let kv = key_values(info, old.as_deref().unwrap_or_default());
                note(k.clone(), Some(kv), old.clone());
            }
            // The row as it is now under another key (an insert, or an update that moved the
            // key): it did not exist before, unless it was noted already. A key with a NULL
            // is not recorded, as in a session.
            if let Some(k) = new_key.filter(|k| Some(k) != old_key.as_ref()) {
                let kv = key_values(info, new.as_deref().unwrap_or_default());
                note(k, Some(kv), None);
            }
        }

        let mut out = Vec::new();
        let mut events_out = full.then(Vec::new);
        for (t, name) in tables.iter().enumerate() {
            let Some(info) = &infos[t] else { continue };
            if rows[t].is_empty() {
                continue;
            }
            let mut header = vec![b'T'];
            put_varint(&mut header, info.columns as u64);
            header.extend_from_slice(&info.pk);
            header.extend_from_slice(name.as_bytes());
            header.push(0);
            let (header_at, events_at) = (out.len(), events_out.as_ref().map_or(0, Vec::len));
            out.extend_from_slice(&header);
            if let Some(e) = events_out.as_mut() {
                e.extend_from_slice(&header);
            }
            let mut stmt = conn.prepare_cached(&info.select)?;
            for row in &rows[t] {
                let now: Option<Vec<Val>> = stmt
                    .query_row(rusqlite::params_from_iter(row.key_values.iter()), |r| {
                        (0..info.columns).map(|i| r.get_ref(i).map(Val::of)).collect()
                    })
                    .optional()?;
                append_change(&mut out, info, row, now.as_deref(), false);
                if let Some(e) = events_out.as_mut() {
                    append_change(e, info, row, now.as_deref(), true);
                }
            }
            if out.len() == header_at + header.len() {
                out.truncate(header_at);
                if let Some(e) = events_out.as_mut() {
                    e.truncate(events_at);
                }
            }
        }
        Ok((out, events_out))
    }
}

struct Row {
    /// The row before the transaction; `None` when it did not exist.
    before: Option<Vec<Val>>,
    /// Its primary key values, in key order, to read its current values.
    key_values: Vec<Val>,
    indirect: bool,
}

/// Appends one row's change. `full`: an update's new record carries every column, not only
/// the changed ones (for realtime events, never for the changelog).
fn append_change(out: &mut Vec<u8>, info: &TableInfo, row: &Row, now: Option<&[Val]>, full: bool) {
    match (&row.before, now) {
        (None, None) => {}
        (None, Some(now)) => {
            out.push(18); // SQLITE_INSERT
            out.push(row.indirect as u8);
            now.iter().for_each(|v| v.encode(out));
        }
        (Some(before), None) => {
            out.push(9); // SQLITE_DELETE
            out.push(row.indirect as u8);
            before.iter().for_each(|v| v.encode(out));
        }
        (Some(before), Some(now)) => {
            let changed: Vec<bool> = (0..info.columns)
                .map(|i| info.pk[i] == 0 && !before[i].same(&now[i]))
                .collect();
            if !changed.iter().any(|c| *c) {
                return;
            }
            out.push(23); // SQLITE_UPDATE
            out.push(row.indirect as u8);
            // The old record: the key and the old values of changed columns; the new record:
            // the new values of changed columns. 0 marks a value left out.
            for i in 0..info.columns {
                if changed[i] || info.pk[i] != 0 {
                    before[i].encode(out);
                } else {
                    out.push(0);
                }
            }
            for i in 0..info.columns {
                if changed[i] || full {
                    now[i].encode(out);
                } else {
                    out.push(0);
                }
            }
        }
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            Val::Null => ValueRef::Null,
            Val::Int(i) => ValueRef::Integer(*i),
            Val::Real(f) => ValueRef::Real(*f),
            Val::Text(t) => ValueRef::Text(t),
            Val::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// The encoded primary key of a row; `None` when a key column is NULL.
fn key_of(info: &TableInfo, values: &[Val]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for &i in &info.key {
        if values[i] == Val::Null {
            return None;
        }
        values[i].encode(&mut out);
    }
    Some(out)
}

fn key_values(info: &TableInfo, values: &[Val]) -> Vec<Val> {
    info.key.iter().map(|&i| values[i].clone()).collect()
}

/// A row noted with fewer columns than the table has now (a column was added later in the
/// transaction) gets the new columns' defaults, as SQLite gives old rows; more columns than
/// the table has (a column dropped) cannot be described and fails the transaction.
fn fit(conn: &Connection, info: &TableInfo, mut values: Vec<Val>, table: &str) -> rusqlite::Result<Vec<Val>> {
    if values.len() > info.columns {
        return Err(schema_error(format!(
            "table {table} lost columns during the transaction; its changes cannot be recorded"
        )));
    }
    for i in values.len()..info.columns {
        let v = match &info.defaults[i] {
            Some(expr) => conn.query_row(&format!("SELECT {expr}"), [], |r| r.get_ref(0).map(Val::of))?,
            None => Val::Null,
        };
        values.push(v);
    }
    Ok(values)
}

fn schema_error(msg: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_SCHEMA), Some(msg))
}

/// Describes `table`; `None` when it does not exist any more or has no primary key (a
/// session records neither).
fn table_info(conn: &Connection, table: &str) -> rusqlite::Result<Option<TableInfo>> {
    let cols: Vec<(String, i64, i64, Option<String>)> = conn
        .prepare_cached("SELECT name, pk, hidden, dflt_value FROM pragma_table_xinfo(?1)")?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if cols.is_empty() || cols.iter().all(|c| c.1 == 0) {
        return Ok(None);
    }
    if cols.iter().any(|c| c.2 != 0) {
        return Err(schema_error(format!(
            "table {table} has hidden or generated columns, which the changelog does not record"
        )));
    }
    let mut key: Vec<(i64, usize)> = cols
        .iter()
        .enumerate()
        .filter(|(_, c)| c.1 > 0)
        .map(|(i, c)| (c.1, i))
        .collect();
    key.sort();
    let quote = crate::util::quote_ident;
    let select = format!(
        "SELECT {} FROM {} WHERE {}",
        cols.iter().map(|c| quote(&c.0)).collect::<Vec<_>>().join(", "),
        quote(table),
        key.iter()
            .enumerate()
            .map(|(n, (_, i))| format!("{} = ?{}", quote(&cols[*i].0), n + 1))
            .collect::<Vec<_>>()
            .join(" AND ")
    );
    Ok(Some(TableInfo {
        columns: cols.len(),
        pk: cols.iter().map(|c| c.1.clamp(0, 255) as u8).collect(),
        defaults: cols.iter().map(|c| c.3.clone()).collect(),
        select,
        key: key.into_iter().map(|(_, i)| i).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rusqlite::fallible_streaming_iterator::FallibleStreamingIterator;
    use rusqlite::session::{ChangesetIter, Session};

    const SCHEMA: &str = "PRAGMA foreign_keys = ON;
        CREATE TABLE a (id TEXT PRIMARY KEY NOT NULL, n INTEGER, r REAL, t TEXT, b BLOB);
        CREATE TABLE c (k2 INTEGER, k1 TEXT, v, PRIMARY KEY (k1, k2));
        CREATE TABLE i (id INTEGER PRIMARY KEY, v);
        CREATE TABLE w (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
        CREATE TABLE nopk (v);
        CREATE TABLE _replica_x (id TEXT PRIMARY KEY, v);
        CREATE TABLE child (id TEXT PRIMARY KEY, parent TEXT REFERENCES a (id) ON DELETE CASCADE, v);";

    /// A value of every storage class, including `1` and `1.0`, which a changeset tells apart.
    fn val(v: u8) -> String {
        match v % 7 {
            0 => "NULL".into(),
            1 => format!("{}", v / 7),
            2 => format!("{}.5", v / 7),
            3 => format!("'t{}'", v / 7),
            4 => format!("x'0{}'", v % 10),
            5 => "1".into(),
            _ => "1.0".into(),
        }
    }

    /// One statement (or savepoint step) of a generated transaction.
    fn step(kind: u8, k: u8, k2: u8, v: u8, depth: &mut usize) -> Option<String> {
        let (k, k2, x) = (k % 5, k2 % 5, val(v));
        Some(match kind % 21 {
            0 => format!("INSERT OR REPLACE INTO a VALUES ('k{k}', {x}, {x}, {x}, {x})"),
            1 => format!("UPDATE a SET n = {x}, t = 't{k2}' WHERE id = 'k{k}'"),
            2 => format!("UPDATE a SET id = 'k{k2}' WHERE id = 'k{k}'"),
            3 => format!("DELETE FROM a WHERE id = 'k{k}'"),
            4 => format!(
                "INSERT OR REPLACE INTO c (k1, k2, v) VALUES ({}, {}, {x})",
                if k == 4 { "NULL".into() } else { format!("'x{k}'") },
                k2 % 3
            ),
            5 => format!("UPDATE c SET v = {x} WHERE k2 = {}", k2 % 3),
            6 => format!("DELETE FROM c WHERE k1 = 'x{k}'"),
            7 => format!("INSERT OR REPLACE INTO i VALUES ({k}, {x})"),
            8 => format!("UPDATE i SET id = id + 10 WHERE id = {k}"),
            9 => format!("INSERT INTO nopk VALUES ({x})"),
            10 => format!("INSERT OR REPLACE INTO _replica_x VALUES ('k{k}', {x})"),
            11 => format!("INSERT OR REPLACE INTO child VALUES ('c{k}', 'k{k2}', {x})"),
            12 => "DELETE FROM a".into(),
            13 => "UPDATE a SET n = n, r = r".into(),
            14 => format!("INSERT OR REPLACE INTO w VALUES ('w{k}', {x})"),
            15 => format!("UPDATE w SET v = {x} WHERE k = 'w{k2}'"),
            19 => format!("UPDATE c SET k1 = NULL WHERE k2 = {}", k2 % 3),
            20 => format!("UPDATE c SET k1 = 'x{k}' WHERE k1 IS NULL AND k2 = {}", k2 % 3),
            16 => {
                *depth += 1;
                format!("SAVEPOINT sp{}", *depth - 1)
            }
            17 if *depth > 0 => format!("ROLLBACK TO sp{}", *depth - 1),
            18 if *depth > 0 => {
                *depth -= 1;
                format!("RELEASE sp{depth}")
            }
            _ => return None,
        })
    }

    fn version_of(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA schema_version", [], |r| r.get(0)).unwrap()
    }

    type Change = (String, i32, bool, Vec<u8>, Vec<Option<Val>>, Vec<Option<Val>>);

    fn parse(cs: &[u8]) -> Vec<Change> {
        let mut input = cs;
        let reader: &mut dyn std::io::Read = &mut input;
        let mut it = ChangesetIter::start_strm(&reader).unwrap();
        let mut out = Vec::new();
        while let Some(item) = it.next().unwrap() {
            let op = item.op().unwrap();
            let n = op.number_of_columns() as usize;
            let code = op.code() as i32;
            let old = (0..n)
                .map(|i| {
                    if code == 18 {
                        None
                    } else {
                        item.old_value(i).ok().map(Val::of)
                    }
                })
                .collect();
            let new = (0..n)
                .map(|i| {
                    if code == 9 {
                        None
                    } else {
                        item.new_value(i).ok().map(Val::of)
                    }
                })
                .collect();
            out.push((
                op.table_name().to_string(),
                code,
                op.indirect(),
                item.pk().unwrap().to_vec(),
                old,
                new,
            ));
        }
        out
    }

    fn dump(conn: &Connection) -> Vec<String> {
        ["a", "c", "i", "w", "child"]
            .iter()
            .flat_map(|t| {
                // A row with a NULL in its key is recorded by neither.
                let only = if *t == "c" { "WHERE k1 IS NOT NULL" } else { "" };
                let sql = format!("SELECT * FROM {t} {only} ORDER BY 1, 2");
                let mut stmt = conn.prepare(&sql).unwrap();
                let n = stmt.column_count();
                stmt.query_map([], |r| {
                    Ok(format!(
                        "{t}:{:?}",
                        (0..n).map(|i| Val::of(r.get_ref(i).unwrap())).collect::<Vec<_>>()
                    ))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Runs the same transactions on two databases, one recorded by a session and one by a
    /// `RowLog`, and checks that both describe the same changes, byte for byte when there is
    /// one change, and that applying ours to a copy reproduces the database.
    fn compare(txs: &[Vec<(u8, u8, u8, u8)>]) {
        let with_session = Connection::open_in_memory().unwrap();
        let mut with_log = Connection::open_in_memory().unwrap();
        let follower = Connection::open_in_memory().unwrap();
        for c in [&with_session, &with_log, &follower] {
            c.execute_batch(SCHEMA).unwrap();
        }
        follower.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
        let log = RowLog::default();
        log.install(&mut with_log).unwrap();
        for tx in txs {
            with_session.execute_batch("BEGIN").unwrap();
            with_log.execute_batch("BEGIN").unwrap();
            let mut session = Session::new(&with_session).unwrap();
            session.table_filter(Some(|t: &str| !is_local_table(t)));
            session.attach(None::<&str>).unwrap();
            log.start();
            let mut depth = 0;
            for &(kind, k, k2, v) in tx {
                let Some(sql) = step(kind, k, k2, v, &mut depth) else {
                    continue;
                };
                let a = with_session.execute_batch(&sql).map_err(|e| e.to_string());
                let b = with_log.execute_batch(&sql).map_err(|e| e.to_string());
                assert_eq!(a, b, "{sql}");
            }
            let mut expected = Vec::new();
            session.changeset_strm(&mut expected).unwrap();
            drop(session);
            let ours = log.changeset(&with_log, version_of(&with_log)).unwrap();
            with_session.execute_batch("COMMIT").unwrap();
            with_log.execute_batch("COMMIT").unwrap();
            let (mut e, mut o) = (parse(&expected), parse(&ours));
            if e.len() == 1 {
                assert_eq!(ours, expected, "one change: the same bytes");
            }
            e.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
            o.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
            assert_eq!(o, e, "transaction {tx:?}");
            let mut input: &[u8] = &ours;
            follower
                .apply_strm(&mut input, None::<fn(&str) -> bool>, |kind, _| {
                    panic!("conflict {kind:?} applying our changeset")
                })
                .unwrap();
            assert_eq!(dump(&follower), dump(&with_log));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn a_rowlog_changeset_is_the_sessions(
            txs in prop::collection::vec(prop::collection::vec(any::<(u8, u8, u8, u8)>(), 0..24), 1..5)
        ) {
            compare(&txs);
        }
    }

    #[test]
    fn single_changes_match_the_session_byte_for_byte() {
        // Every statement kind on its own, after a setup that gives it rows to change.
        let setup: Vec<_> = [0u8, 4, 7, 11, 14]
            .iter()
            .flat_map(|&k| (0..5).map(move |i| (k, i, i, 8)))
            .collect();
        for kind in (0..16).chain(19..21) {
            for v in 0..14 {
                compare(&[setup.clone(), vec![(kind, 1, 2, v)]]);
            }
        }
    }

    #[test]
    fn events_get_every_column_of_an_update_and_the_changelog_a_sessions() {
        use crate::realtime::dispatch::decode;
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, a, b); INSERT INTO t VALUES ('x', 1, 'kept')")
            .unwrap();
        let log = RowLog::default();
        log.install(&mut conn).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        log.start();
        conn.execute_batch("UPDATE t SET a = 2 WHERE id = 'x'; INSERT INTO t VALUES ('y', 3, 'new')")
            .unwrap();
        let (plain, full) = log.changesets(&conn, version_of(&conn), true).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        let text = |v: &str| Some(rusqlite::types::Value::Text(v.into()));
        let int = |i: i64| Some(rusqlite::types::Value::Integer(i));
        let full = decode(&full.expect("asked for")).unwrap();
        assert_eq!(full[0].values, vec![text("x"), int(2), text("kept")], "the whole row");
        assert_eq!(full[1].values, vec![text("y"), int(3), text("new")]);
        let plain = decode(&plain).unwrap();
        assert_eq!(plain[0].values, vec![text("x"), int(2), None], "as a session writes it");
        assert_eq!(plain.len(), 2);
    }

    #[test]
    fn a_column_added_in_the_transaction_gets_its_default_in_earlier_rows() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, v); INSERT INTO t VALUES ('a', 1)")
            .unwrap();
        let log = RowLog::default();
        log.install(&mut conn).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        log.start();
        conn.execute_batch("DELETE FROM t WHERE id = 'a'; ALTER TABLE t ADD COLUMN d TEXT NOT NULL DEFAULT 'x'")
            .unwrap();
        let cs = log.changeset(&conn, version_of(&conn)).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        let changes = parse(&cs);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0].4,
            vec![
                Some(Val::Text(b"a".to_vec())),
                Some(Val::Int(1)),
                Some(Val::Text(b"x".to_vec()))
            ]
        );
    }
}
