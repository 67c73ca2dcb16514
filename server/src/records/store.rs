//! SQL for records: reading rows into JSON, insert, update, delete with relation cascades, and
//! list pages. Every function takes a connection and runs inside the caller's transaction (a
//! writer job) or read; none of them knows about HTTP.

use std::collections::HashSet;

use rusqlite::types::Value as Sql;
use rusqlite::{Connection, OptionalExtension, params_from_iter};
use serde_json::{Map, Value, json};

use super::values::{Changes, from_sql};
use crate::collections::model::{Collection, Field};
use crate::collections::store::{Schema, constraint_or, relations_into};
use crate::error::{ApiError, ApiResult, FieldErrors, field_error};
use crate::query::Condition;
use crate::util::{new_record_id, now_string, quote_ident, random_id};

/// A record as stored, with the secret auth columns kept apart from the JSON.
#[derive(Debug, Clone)]
pub struct Stored {
    /// `id`, `created`, `updated`, auth columns (`email`, `emailVisibility`, `verified`) and
    /// every live field, in their API form.
    pub data: Map<String, Value>,
    /// Argon2id PHC string (auth collections only).
    pub password: Option<String>,
    /// Secret that signs this record's tokens (auth collections only).
    pub token_key: Option<String>,
}

impl Stored {
    pub fn id(&self) -> &str {
        self.data.get("id").and_then(Value::as_str).unwrap_or_default()
    }
}

fn select_list(c: &Collection) -> String {
    let mut cols: Vec<String> = ["id", "created", "updated"].iter().map(|s| quote_ident(s)).collect();
    if c.is_auth() {
        cols.extend(
            ["email", "emailVisibility", "verified", "password", "tokenKey"]
                .iter()
                .map(|s| quote_ident(s)),
        );
    }
    cols.extend(c.live_fields().map(|f| quote_ident(&f.name)));
    cols.join(", ")
}

fn read_row(c: &Collection, row: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    let mut data = Map::new();
    let text = |i: usize| -> rusqlite::Result<String> { Ok(row.get::<_, Option<String>>(i)?.unwrap_or_default()) };
    data.insert("id".into(), json!(text(0)?));
    data.insert("created".into(), json!(text(1)?));
    data.insert("updated".into(), json!(text(2)?));
    let mut idx = 3;
    let (mut password, mut token_key) = (None, None);
    if c.is_auth() {
        data.insert("email".into(), json!(text(3)?));
        data.insert(
            "emailVisibility".into(),
            json!(row.get::<_, Option<i64>>(4)?.unwrap_or(0) != 0),
        );
        data.insert(
            "verified".into(),
            json!(row.get::<_, Option<i64>>(5)?.unwrap_or(0) != 0),
        );
        password = Some(text(6)?);
        token_key = Some(text(7)?);
        idx = 8;
    }
    for f in c.live_fields() {
        let v: Sql = row.get(idx)?;
        data.insert(f.name.clone(), from_sql(f, v));
        idx += 1;
    }
    Ok(Stored {
        data,
        password,
        token_key,
    })
}

/// One record by id.
pub fn get(conn: &Connection, c: &Collection, id: &str) -> ApiResult<Option<Stored>> {
    let sql = format!(
        "SELECT {} FROM {} _t WHERE _t.id = ?1",
        select_list(c),
        quote_ident(&c.name)
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], |r| read_row(c, r))
        .optional()?)
}

/// The records of `c` among `ids` that match `cond` (every one of them, when there is no
/// condition), in one query; ids that do not exist or do not match are left out.
pub fn get_many(conn: &Connection, c: &Collection, ids: &[&str], cond: Option<&Condition>) -> ApiResult<Vec<Stored>> {
    let sql = format!(
        "SELECT {} FROM {} _t WHERE _t.id IN (SELECT value FROM json_each(?)) AND ({})",
        select_list(c),
        quote_ident(&c.name),
        cond.map_or("1", |c| c.sql.as_str())
    );
    let mut params = vec![Sql::Text(serde_json::to_string(ids).unwrap_or_default())];
    if let Some(cond) = cond {
        params.extend(cond.params.iter().cloned());
    }
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(params), |r| read_row(c, r))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The column names of `table`, in order (the layout of a changeset's row values).
pub fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached("SELECT name FROM pragma_table_info(?1)")?
        .query_map([table], |r| r.get(0))?
        .collect()
}

/// The record of `c` that a row image holds (`values` of the table's `columns`, in order), if
/// it matches `cond`: a row as a change left it, which may no longer be in the table. The row
/// is the query's `_t`, so a rule compiled for the table applies to it unchanged, and every
/// relation, back-relation and `@collection` join of the rule reads the real tables, as a REST
/// request does. (The row's own table is not shadowed: its name is not a collection's.)
pub fn get_image(
    conn: &Connection,
    c: &Collection,
    columns: &[String],
    values: &[Sql],
    cond: Option<&Condition>,
) -> ApiResult<Option<Stored>> {
    if columns.is_empty() {
        return Ok(None);
    }
    let names: Vec<String> = columns.iter().map(|n| quote_ident(n)).collect();
    let marks = vec!["?"; columns.len()].join(", ");
    let sql = format!(
        "WITH \"event row\"({}) AS (VALUES ({marks})) SELECT {} FROM \"event row\" _t WHERE ({})",
        names.join(", "),
        select_list(c),
        cond.map_or("1", |c| c.sql.as_str()),
    );
    // A column added since the change reads NULL; one dropped since is left out.
    let mut params: Vec<Sql> = (0..columns.len())
        .map(|i| values.get(i).cloned().unwrap_or(Sql::Null))
        .collect();
    if let Some(cond) = cond {
        params.extend(cond.params.iter().cloned());
    }
    Ok(conn
        .prepare(&sql)?
        .query_row(params_from_iter(params), |r| read_row(c, r))
        .optional()?)
}

/// One auth record by email (case-insensitive), or by id when `identity` has no `@`.
pub fn find_auth(conn: &Connection, c: &Collection, identity: &str) -> ApiResult<Option<Stored>> {
    let col = if identity.contains('@') {
        "email = ?1 COLLATE NOCASE"
    } else {
        "id = ?1"
    };
    let sql = format!(
        "SELECT {} FROM {} WHERE {col} AND email != ''",
        select_list(c),
        quote_ident(&c.name)
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([identity], |r| read_row(c, r))
        .optional()?)
}

/// Maps a UNIQUE violation to a 400 on the column it names, anything else to 500.
fn unique_error(e: rusqlite::Error, c: &Collection) -> ApiError {
    let msg = e.to_string();
    constraint_or(e, || {
        let field = msg
            .split(&format!("{}.", c.name))
            .nth(1)
            .map(|s| s.split([',', ' ']).next().unwrap_or(s).to_string())
            .unwrap_or_else(|| "id".into());
        ApiError::invalid_field(&field, "validation_not_unique", "Value must be unique.")
    })
}

/// Checks that every related id exists in its target collection.
pub fn check_relations(
    conn: &Connection,
    schema: &Schema,
    relations: &[(Field, Value)],
    errors: &mut FieldErrors,
) -> ApiResult<()> {
    for (f, v) in relations {
        let target = f.options.collection_id.as_deref().and_then(|id| schema.by_id(id));
        let Some(target) = target else {
            field_error(
                errors,
                &f.name,
                "validation_missing_rel_records",
                "The related collection no longer exists.",
            );
            continue;
        };
        let ids: Vec<&str> = match v {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            Value::String(s) => vec![s.as_str()],
            _ => vec![],
        };
        let sql = format!("SELECT 1 FROM {} WHERE id = ?1", quote_ident(&target.name));
        let mut stmt = conn.prepare_cached(&sql)?;
        for id in ids {
            if stmt.query_row([id], |_| Ok(())).optional()?.is_none() {
                field_error(
                    errors,
                    &f.name,
                    "validation_missing_rel_records",
                    format!("Related record '{id}' does not exist."),
                );
                break;
            }
        }
    }
    Ok(())
}

/// Whether `id` is acceptable as a client-chosen record id.
pub fn is_valid_record_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Inserts a record with `changes` (field columns plus any auth columns) and returns it.
pub fn insert(conn: &Connection, c: &Collection, id: Option<String>, mut changes: Changes) -> ApiResult<Stored> {
    let id = id.unwrap_or_else(new_record_id);
    let now = now_string();
    if c.is_auth() && !changes.iter().any(|(k, _)| k == "tokenKey") {
        changes.push(("tokenKey".into(), Sql::Text(random_id(50))));
    }
    let mut cols = vec!["id".to_string(), "created".into(), "updated".into()];
    let mut vals = vec![Sql::Text(id.clone()), Sql::Text(now.clone()), Sql::Text(now)];
    for (k, v) in changes {
        cols.push(k);
        vals.push(v);
    }
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        quote_ident(&c.name),
        cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
        (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
    );
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(vals))
        .map_err(|e| unique_error(e, c))?;
    get(conn, c, &id)?.ok_or_else(|| ApiError::internal("insert", "inserted record not found"))
}

/// Most bytes of records one bulk request may change: a quarter of what a changelog entry may
/// hold ([`crate::replica::recorder::MAX_ENTRY_BYTES`]), since an update carries old and new
/// values and every copy of an entry (session, changeset, log row, response) costs memory.
pub const MAX_BULK_BYTES: usize = crate::replica::recorder::MAX_ENTRY_BYTES / 4;

/// Refuses (413) a bulk operation on `ids` whose records hold more than [`MAX_BULK_BYTES`]:
/// the changes of one transaction, and the changelog entry that carries them to replicas, must
/// stay bounded in memory.
pub fn check_transaction_size(conn: &Connection, c: &Collection, ids: &[String]) -> ApiResult<()> {
    let mut cols = vec!["id".to_string(), "created".into(), "updated".into()];
    cols.extend(c.fields.iter().map(|f| f.name.clone()));
    let size_expr = cols
        .iter()
        .map(|n| format!("COALESCE(length(CAST({} AS BLOB)), 0)", quote_ident(n)))
        .collect::<Vec<_>>()
        .join(" + ");
    let sql = format!(
        "SELECT COALESCE(SUM({size_expr}), 0) FROM {} WHERE id IN (SELECT value FROM json_each(?1))",
        quote_ident(&c.name)
    );
    let ids_json = serde_json::to_string(ids).map_err(|e| ApiError::internal("bulk size", e))?;
    let bytes: i64 = conn.query_row(&sql, [ids_json], |r| r.get(0))?;
    if bytes as usize > MAX_BULK_BYTES {
        return Err(ApiError::TransactionTooLarge(format!(
            "These {} records hold about {} MiB; one bulk request may change at most {} MiB. Send fewer ids per request.",
            ids.len(),
            bytes / (1024 * 1024),
            MAX_BULK_BYTES / (1024 * 1024)
        )));
    }
    Ok(())
}

/// Whether `id` is the id of a record in an auth collection of `schema` other than `c`.
pub fn auth_id_taken(conn: &Connection, schema: &Schema, c: &Collection, id: &str) -> ApiResult<bool> {
    for other in schema.all().iter().filter(|o| o.is_auth() && o.id != c.id) {
        let sql = format!("SELECT 1 FROM {} WHERE id = ?1", quote_ident(&other.name));
        if conn.prepare_cached(&sql)?.exists([id])? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Updates the columns in `changes` (and `updated`) of record `id`.
pub fn update(conn: &Connection, c: &Collection, id: &str, changes: Changes) -> ApiResult<Stored> {
    let mut sets = vec!["\"updated\" = ?1".to_string()];
    let mut vals = vec![Sql::Text(now_string())];
    for (k, v) in changes {
        vals.push(v);
        sets.push(format!("{} = ?{}", quote_ident(&k), vals.len()));
    }
    vals.push(Sql::Text(id.to_string()));
    let sql = format!(
        "UPDATE {} SET {} WHERE id = ?{}",
        quote_ident(&c.name),
        sets.join(", "),
        vals.len()
    );
    let n = conn
        .prepare_cached(&sql)?
        .execute(params_from_iter(vals))
        .map_err(|e| unique_error(e, c))?;
    if n == 0 {
        return Err(ApiError::not_found("Record not found."));
    }
    get(conn, c, id)?.ok_or_else(|| ApiError::internal("update", "updated record not found"))
}

/// Deletes record `id` and applies the relation rules of every collection that points at it:
/// cascade-delete, or remove the reference (refused when the relation is required).
/// Returns the `(collection id, record id)` of the record and of every record its relations
/// cascaded to (some may not have existed), for deleting their files after COMMIT.
pub fn delete(conn: &Connection, schema: &Schema, c: &Collection, id: &str) -> ApiResult<Vec<(String, String)>> {
    let mut visited = HashSet::new();
    delete_inner(conn, schema, c, id, 0, &mut visited)?;
    Ok(visited.into_iter().collect())
}

const MAX_CASCADE_DEPTH: usize = 32;

fn delete_inner(
    conn: &Connection,
    schema: &Schema,
    c: &Collection,
    id: &str,
    depth: usize,
    visited: &mut HashSet<(String, String)>,
) -> ApiResult<()> {
    if !visited.insert((c.id.clone(), id.to_string())) {
        return Ok(());
    }
    if depth > MAX_CASCADE_DEPTH {
        return Err(ApiError::bad_request("Relation cascade is too deep."));
    }
    let n = conn.execute(&format!("DELETE FROM {} WHERE id = ?1", quote_ident(&c.name)), [id])?;
    if n == 0 {
        return if depth == 0 {
            Err(ApiError::not_found("Record not found."))
        } else {
            Ok(())
        };
    }
    for other in schema.all() {
        for f in relations_into(&other, &c.id) {
            let table = quote_ident(&other.name);
            let col = quote_ident(&f.name);
            let sql = if f.is_multi() {
                format!(
                    "SELECT id, {col} FROM {table} WHERE EXISTS (SELECT 1 FROM json_each({table}.{col}) WHERE value = ?1)"
                )
            } else {
                format!("SELECT id, {col} FROM {table} WHERE {col} = ?1")
            };
            let refs: Vec<(String, String)> = conn
                .prepare(&sql)?
                .query_map([id], |r| {
                    Ok((r.get(0)?, r.get::<_, Option<String>>(1)?.unwrap_or_default()))
                })?
                .collect::<Result<_, _>>()?;
            for (rid, current) in refs {
                if f.options.cascade_delete == Some(true) {
                    delete_inner(conn, schema, &other, &rid, depth + 1, visited)?;
                    continue;
                }
                let new_value = if f.is_multi() {
                    let mut ids: Vec<String> = serde_json::from_str(&current).unwrap_or_default();
                    ids.retain(|x| x != id);
                    if ids.is_empty() && f.required {
                        return Err(referenced(&other, &rid));
                    }
                    json!(ids).to_string()
                } else {
                    if f.required {
                        return Err(referenced(&other, &rid));
                    }
                    String::new()
                };
                conn.execute(
                    &format!("UPDATE {table} SET {col} = ?1, \"updated\" = ?2 WHERE id = ?3"),
                    rusqlite::params![new_value, now_string(), rid],
                )?;
            }
        }
    }
    Ok(())
}

fn referenced(other: &Collection, rid: &str) -> ApiError {
    ApiError::bad_request(format!(
        "The record is referenced by the required relation of '{}' record '{rid}'; delete or change that record first.",
        other.name
    ))
}

/// One sort key: an SQL expression over `_t` and its direction, or random order.
#[derive(Debug, Clone, PartialEq)]
pub enum SortKey {
    Expr(String, bool),
    Random,
}

/// Parses `-created,title,author.name` against the collection (paths follow relations).
/// Hidden fields can be sorted by only when `admin`.
/// Most terms a `sort` may have (SQLite's own limit on ORDER BY terms is far past any real
/// need; a sort of thousands of terms only costs the server).
pub const MAX_SORT_TERMS: usize = 16;

pub fn parse_sort(c: &Collection, schema: &Schema, sort: &str, admin: bool) -> ApiResult<Vec<SortKey>> {
    let mut keys = Vec::new();
    let parts: Vec<&str> = sort.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if parts.len() > MAX_SORT_TERMS {
        return Err(ApiError::invalid_field(
            "sort",
            "validation_too_many_values",
            format!("Sort by at most {MAX_SORT_TERMS} terms."),
        ));
    }
    for part in parts {
        if part == "@random" {
            keys.push(SortKey::Random);
            continue;
        }
        let (name, desc) = match part.strip_prefix('-') {
            Some(n) => (n, true),
            None => (part.strip_prefix('+').unwrap_or(part), false),
        };
        let sql = crate::query::compile::scalar_path(c, schema, name, admin).map_err(|e| {
            ApiError::invalid_field(
                "sort",
                "validation_invalid_sort",
                format!("Cannot sort by '{name}': {}", e.message),
            )
        })?;
        keys.push(SortKey::Expr(sql, desc));
    }
    Ok(keys)
}

/// The SQL of one page of a list and of its count, built once, run by [`run_list`].
pub struct ListQuery {
    sql: String,
    params: Vec<Sql>,
    /// `SELECT COUNT(*)` and its parameters, unless the caller skips the total.
    count: Option<(String, Vec<Sql>)>,
    /// Whether the same query gives the same rows at the same generation (not with `@random`).
    pub cacheable: bool,
}

impl ListQuery {
    /// The cache key: the statements and every bound value.
    pub fn key(&self) -> String {
        format!("{}\u{1}{:?}\u{1}{:?}", self.sql, self.params, self.count)
    }
}

/// The page `page` of `per_page` records matching `cond`, in `sort` order, and unless
/// `skip_total` how many match.
pub fn list_query(
    c: &Collection,
    cond: Option<&crate::query::Condition>,
    sort: &[SortKey],
    page: u64,
    per_page: u64,
    skip_total: bool,
) -> ListQuery {
    let mut order: Vec<String> = sort
        .iter()
        .map(|k| match k {
            SortKey::Expr(e, desc) => format!("{e}{}", if *desc { " DESC" } else { "" }),
            SortKey::Random => "RANDOM()".into(),
        })
        .collect();
    // Without a sort, records come in creation order. The id ends every order: it makes the
    // order total (pages never overlap or skip rows), and unlike the rowid it is replicated, so
    // a page is the same on the master, on every replica and after a re-bootstrap.
    if order.is_empty() {
        order.push("_t.\"created\"".into());
    }
    order.push("_t.\"id\"".into());
    let (where_sql, mut params) = match cond {
        Some(cond) => (format!("WHERE {}", cond.sql), cond.params.clone()),
        None => (String::new(), Vec::new()),
    };
    let table = quote_ident(&c.name);
    let order = order.join(", ");
    // Measured: over 100k rows of ~250 bytes a sort on an unindexed field costs about what
    // scanning the table does (13 ms either way); sorting only keys and rowids first (a
    // deferred join) saved 4% there and lost 15% at 10k rows, so the plain query stays. What
    // makes repeated lists fast is the result cache; what makes a first one fast is an index.
    let random = sort.contains(&SortKey::Random);
    let sql = format!(
        "SELECT {} FROM {table} _t {where_sql} ORDER BY {order} LIMIT ? OFFSET ?",
        select_list(c)
    );
    let offset = (page - 1).saturating_mul(per_page);
    let count = (!skip_total).then(|| (format!("SELECT COUNT(*) FROM {table} _t {where_sql}"), params.clone()));
    params.push(Sql::Integer(per_page as i64));
    params.push(Sql::Integer(offset.min(i64::MAX as u64) as i64));
    ListQuery {
        sql,
        params,
        count,
        cacheable: !random,
    }
}

impl ListQuery {
    /// Whether the query counts the matching records too.
    pub fn counts(&self) -> bool {
        self.count.is_some()
    }
}

/// The page's records of a [`ListQuery`].
pub fn run_page(conn: &Connection, c: &Collection, q: &ListQuery) -> ApiResult<Vec<Stored>> {
    Ok(conn
        .prepare_cached(&q.sql)?
        .query_map(params_from_iter(q.params.iter()), |r| read_row(c, r))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// How many records a [`ListQuery`] matches (`None` when it skips the total).
pub fn run_count(conn: &Connection, q: &ListQuery) -> ApiResult<Option<u64>> {
    match &q.count {
        None => Ok(None),
        Some((sql, params)) => {
            let n: i64 = conn
                .prepare_cached(sql)?
                .query_row(params_from_iter(params.iter()), |r| r.get(0))?;
            Ok(Some(n as u64))
        }
    }
}
