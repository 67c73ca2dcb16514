//! The logical checksum of a database: sha256 over its replicated content, independent of page
//! layout and column order, so a master and an in-sync replica give the same value.
//!
//! Tables are visited in name order, rows in primary-key order, and each row contributes its
//! columns sorted by name as `name`, a type tag and the value bytes.

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use sha2::{Digest, Sha256};

use super::is_local_table;
use crate::util::{hex, quote_ident};

/// Computes the checksum inside one read transaction of `conn` (the caller's), so it matches
/// one committed state.
pub fn logical_checksum(conn: &Connection) -> rusqlite::Result<String> {
    let mut h = Sha256::new();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?
        .into_iter()
        .filter(|t| !is_local_table(t))
        .collect();
    for table in tables {
        // (name, position in the primary key; 0 = not part of it)
        let cols: Vec<(String, i64)> = conn
            .prepare(&format!("PRAGMA table_info({})", quote_ident(&table)))?
            .query_map([], |r| Ok((r.get(1)?, r.get(5)?)))?
            .collect::<Result<_, _>>()?;
        let mut pk: Vec<&(String, i64)> = cols.iter().filter(|(_, p)| *p > 0).collect();
        pk.sort_by_key(|(_, p)| *p);
        let order = if pk.is_empty() {
            "rowid".to_string()
        } else {
            pk.iter().map(|(n, _)| quote_ident(n)).collect::<Vec<_>>().join(", ")
        };
        let mut by_name: Vec<(usize, &String)> = cols.iter().map(|(n, _)| n).enumerate().collect();
        by_name.sort_by(|a, b| a.1.cmp(b.1));
        h.update(b"T");
        h.update(table.as_bytes());
        h.update([0u8]);
        let mut stmt = conn.prepare(&format!("SELECT * FROM {} ORDER BY {order}", quote_ident(&table)))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            h.update(b"R");
            for (i, name) in &by_name {
                h.update(name.as_bytes());
                h.update([0u8]);
                match row.get_ref(*i)? {
                    ValueRef::Null => h.update(b"n"),
                    ValueRef::Integer(v) => {
                        h.update(b"i");
                        h.update(v.to_le_bytes());
                    }
                    ValueRef::Real(v) => {
                        h.update(b"r");
                        h.update(v.to_le_bytes());
                    }
                    ValueRef::Text(t) => {
                        h.update(b"t");
                        h.update((t.len() as u64).to_le_bytes());
                        h.update(t);
                    }
                    ValueRef::Blob(b) => {
                        h.update(b"b");
                        h.update((b.len() as u64).to_le_bytes());
                        h.update(b);
                    }
                }
            }
        }
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_same_checksum_regardless_of_column_order_and_history() {
        let a = Connection::open_in_memory().unwrap();
        a.execute_batch(
            "CREATE TABLE t (id TEXT PRIMARY KEY NOT NULL, x TEXT, y INTEGER);
             INSERT INTO t VALUES ('2', 'b', 2), ('1', 'a', 1), ('3', 'gone', 3);
             DELETE FROM t WHERE id = '3';
             CREATE TABLE _changelog (version INTEGER PRIMARY KEY, c BLOB);
             INSERT INTO _changelog VALUES (1, x'00');",
        )
        .unwrap();
        let b = Connection::open_in_memory().unwrap();
        b.execute_batch(
            "CREATE TABLE t (id TEXT PRIMARY KEY NOT NULL, y INTEGER, x TEXT);
             INSERT INTO t (id, x, y) VALUES ('1', 'a', 1), ('2', 'b', 2);",
        )
        .unwrap();
        assert_eq!(logical_checksum(&a).unwrap(), logical_checksum(&b).unwrap());
        b.execute("UPDATE t SET y = 3 WHERE id = '2'", []).unwrap();
        assert_ne!(logical_checksum(&a).unwrap(), logical_checksum(&b).unwrap());
    }
}
