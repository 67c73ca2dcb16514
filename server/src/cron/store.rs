//! Cron jobs as stored: their definitions in `default`'s `_cron_jobs` (replicated, so a
//! replica knows them), their runs in the node's own `stats` database, and the checks a
//! definition passes before it is stored.

use std::path::Path;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult, FieldErrors, field_error};

pub const JOBS_DDL: &str = "CREATE TABLE IF NOT EXISTS _cron_jobs (
    name TEXT PRIMARY KEY NOT NULL,
    definition TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
)";

pub const RUNS_DDL: &str = "CREATE TABLE IF NOT EXISTS cron_runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    started TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cron_runs_name ON cron_runs (name, id)";

/// Runs kept per job; older ones are pruned as new ones are logged.
pub const RUNS_KEPT: i64 = 100;

/// A job definition, as posted and as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDef {
    pub name: String,
    /// Five fields (minute precision) or six (with seconds first), UTC.
    pub schedule: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl JobDef {
    /// The database an SQL job runs against.
    pub fn database(&self) -> &str {
        self.database.as_deref().unwrap_or(crate::db::DEFAULT_DB)
    }
}

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

/// The six-field form tokio-cron-scheduler takes: a five-field schedule runs at second 0.
pub fn normalize_schedule(schedule: &str) -> Option<String> {
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    match fields.len() {
        5 => Some(format!("0 {}", fields.join(" "))),
        6 => Some(fields.join(" ")),
        _ => None,
    }
}

/// Checks everything about `def` that does not need a database, one entry per field.
pub fn check(def: &mut JobDef) -> FieldErrors {
    let mut errors = FieldErrors::new();
    let name_ok = !def.name.is_empty()
        && def.name.len() <= 64
        && def
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        field_error(
            &mut errors,
            "name",
            "validation_invalid_name",
            "1 to 64 letters, digits, '_' or '-'.",
        );
    }
    let parsed = normalize_schedule(&def.schedule).and_then(|s| {
        tokio_cron_scheduler::Job::new_async(s.as_str(), |_, _| Box::pin(async {}))
            .ok()
            .map(|_| s)
    });
    if parsed.is_none() {
        field_error(
            &mut errors,
            "schedule",
            "validation_invalid_schedule",
            "A cron schedule of 5 fields (minute hour day month weekday) or 6 (with seconds first), in UTC.",
        );
    }
    match def.kind.as_str() {
        "sql" => {
            if def.sql.as_deref().is_none_or(|s| s.trim().is_empty()) {
                field_error(&mut errors, "sql", "validation_required", "An SQL job needs 'sql'.");
            }
            if def.sql.as_ref().is_some_and(|s| s.len() > 100_000) {
                field_error(&mut errors, "sql", "validation_too_long", "At most 100,000 characters.");
            }
            if !crate::db::is_valid_db_name(def.database()) {
                field_error(
                    &mut errors,
                    "database",
                    "validation_invalid_database",
                    "Not a database name.",
                );
            }
            def.url = None;
            def.method = None;
            def.headers = None;
            def.body = None;
        }
        "http" => {
            let url_ok = def.url.as_deref().is_some_and(|u| {
                reqwest::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            });
            if !url_ok {
                field_error(
                    &mut errors,
                    "url",
                    "validation_invalid_url",
                    "An http:// or https:// URL.",
                );
            }
            let method = def.method.clone().unwrap_or_else(|| "GET".into()).to_ascii_uppercase();
            if !METHODS.contains(&method.as_str()) {
                field_error(
                    &mut errors,
                    "method",
                    "validation_invalid_method",
                    "GET, POST, PUT, PATCH, DELETE or HEAD.",
                );
            }
            def.method = Some(method);
            if let Some(h) = &def.headers {
                let valid = h.iter().all(|(k, v)| {
                    reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
                        && v.as_str()
                            .is_some_and(|v| reqwest::header::HeaderValue::from_str(v).is_ok())
                });
                if !valid {
                    field_error(
                        &mut errors,
                        "headers",
                        "validation_invalid_headers",
                        "An object of header names to string values.",
                    );
                }
            }
            if def.body.as_ref().is_some_and(|b| b.len() > 1024 * 1024) {
                field_error(&mut errors, "body", "validation_too_long", "At most 1 MiB.");
            }
            def.sql = None;
            def.database = None;
        }
        _ => field_error(&mut errors, "type", "validation_invalid_type", "'sql' or 'http'."),
    }
    errors
}

/// What cron SQL may do: read anything, and insert, update or delete rows of collection
/// tables. Schema changes, transactions, pragmas, attachments and writes to system tables
/// (`_*`, `sqlite_*`) are refused: they would break the writer's transaction, replication or the
/// append-only schema.
fn authorize(ctx: AuthContext<'_>) -> Authorization {
    let user_table = |t: &str| !t.starts_with('_') && !t.to_ascii_lowercase().starts_with("sqlite_");
    let main = ctx.database_name.is_none_or(|d| d == "main");
    match ctx.action {
        // `load_extension` would run any shared library as the server.
        AuthAction::Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
            Authorization::Deny
        }
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Function { .. } | AuthAction::Recursive => {
            Authorization::Allow
        }
        AuthAction::Insert { table_name } | AuthAction::Delete { table_name } if main && user_table(table_name) => {
            Authorization::Allow
        }
        AuthAction::Update { table_name, .. } if main && user_table(table_name) => Authorization::Allow,
        _ => Authorization::Deny,
    }
}

/// Whether `url` names a loopback or link-local host (literally: a name that resolves there is
/// not caught here), which HTTP jobs may call only with `CRON_HTTP_ALLOW_LOCAL`.
pub fn is_local_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else { return false };
    let Some(host) = u.host_str() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || ip.is_link_local() || ip.is_unspecified(),
        Ok(std::net::IpAddr::V6(ip)) => {
            let mapped = ip
                .to_ipv4_mapped()
                .is_some_and(|v4| v4.is_loopback() || v4.is_link_local());
            ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xffc0) == 0xfe80 || mapped
        }
        Err(_) => {
            let d = host.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
    }
}

/// The first word of a statement, past whitespace and comments.
fn first_keyword(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else {
            break;
        }
    }
    let end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
    &rest[..end]
}

/// Compiles every statement of `sql` against the database file at `path` (read-only, with the
/// cron authorizer), without running any: a 400 names the first problem under `sql`.
pub fn check_sql(path: &Path, sql: &str) -> ApiResult<()> {
    let mut conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.authorizer(Some(authorize))?;
    let invalid = |e: rusqlite::Error| {
        let msg = match &e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::AuthorizationForStatementDenied => {
                "cron SQL may only read, and insert, update or delete rows of collections (no schema changes, transactions, pragmas or system tables)".to_string()
            }
            other => other.to_string(),
        };
        let mut errors = FieldErrors::new();
        field_error(&mut errors, "sql", "validation_invalid_sql", msg);
        ApiError::validation(errors)
    };
    use rusqlite::fallible_iterator::FallibleIterator;
    let mut batch = rusqlite::Batch::new(&conn, sql);
    let mut statements = 0;
    while let Some(stmt) = batch.next().map_err(invalid)? {
        // VACUUM asks the authorizer nothing; it would rewrite the whole file under the writer.
        if first_keyword(&stmt.expanded_sql().unwrap_or_default()).eq_ignore_ascii_case("vacuum") {
            let mut errors = FieldErrors::new();
            field_error(&mut errors, "sql", "validation_invalid_sql", "cron SQL may not VACUUM");
            return Err(ApiError::validation(errors));
        }
        statements += 1;
    }
    if statements == 0 {
        return Err(invalid(rusqlite::Error::InvalidQuery));
    }
    Ok(())
}

pub fn list(conn: &Connection) -> rusqlite::Result<Vec<JobDef>> {
    if !crate::db::table_exists(conn, "_cron_jobs")? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare("SELECT definition FROM _cron_jobs ORDER BY name")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for text in rows {
        match serde_json::from_str(&text?) {
            Ok(def) => out.push(def),
            Err(e) => log::warn!("cron: a stored job cannot be read: {e}"),
        }
    }
    Ok(out)
}

/// Stores `def`, replacing a job of the same name.
pub fn save(conn: &Connection, def: &JobDef) -> rusqlite::Result<()> {
    conn.execute_batch(JOBS_DDL)?;
    let now = crate::util::now_string();
    conn.execute(
        "INSERT INTO _cron_jobs (name, definition, created, updated) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, updated = excluded.updated",
        params![def.name, serde_json::to_string(def).unwrap_or_default(), now],
    )?;
    Ok(())
}

/// Deletes job `name`; whether it existed.
pub fn delete(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.execute_batch(JOBS_DDL)?;
    Ok(conn.execute("DELETE FROM _cron_jobs WHERE name = ?1", [name])? > 0)
}

/// One logged run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub started: String,
    #[serde(rename = "durationMs")]
    pub duration_ms: i64,
    pub outcome: String,
    pub detail: String,
}

pub fn log_run(conn: &Connection, name: &str, run: &Run) -> rusqlite::Result<()> {
    conn.execute_batch(RUNS_DDL)?;
    conn.execute(
        "INSERT INTO cron_runs (name, started, duration_ms, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![name, run.started, run.duration_ms, run.outcome, run.detail],
    )?;
    conn.execute(
        "DELETE FROM cron_runs WHERE name = ?1 AND id <= (SELECT id FROM cron_runs WHERE name = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        params![name, RUNS_KEPT],
    )?;
    Ok(())
}

/// The newest runs of job `name` first.
pub fn runs(conn: &Connection, name: &str) -> rusqlite::Result<Vec<Run>> {
    if !crate::db::table_exists(conn, "cron_runs")? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT started, duration_ms, outcome, detail FROM cron_runs WHERE name = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![name, RUNS_KEPT], |r| {
        Ok(Run {
            started: r.get(0)?,
            duration_ms: r.get(1)?,
            outcome: r.get(2)?,
            detail: r.get(3)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(schedule: &str) -> JobDef {
        JobDef {
            name: "tidy".into(),
            schedule: schedule.into(),
            kind: "sql".into(),
            sql: Some("DELETE FROM posts WHERE 0".into()),
            database: None,
            url: None,
            method: None,
            headers: None,
            body: None,
        }
    }

    #[test]
    fn schedules_of_five_and_six_fields() {
        assert_eq!(normalize_schedule("*/5 * * * *").as_deref(), Some("0 */5 * * * *"));
        assert_eq!(normalize_schedule("*/2 * * * * *").as_deref(), Some("*/2 * * * * *"));
        assert!(check(&mut def("*/5 * * * *")).is_empty());
        assert!(check(&mut def("*/2 * * * * *")).is_empty());
        for bad in [
            "",
            "* * * *",
            "61 * * * *",
            "nope nope nope nope nope",
            "* * * * * * * *",
        ] {
            assert!(check(&mut def(bad)).contains_key("schedule"), "{bad}");
        }
    }

    #[test]
    fn cron_sql_may_change_rows_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE posts (id TEXT PRIMARY KEY, n INTEGER); CREATE TABLE _changelog (version INTEGER PRIMARY KEY);",
        )
        .unwrap();
        for ok in [
            "UPDATE posts SET n = n + 1",
            "DELETE FROM posts WHERE n > 3; INSERT INTO posts (id, n) SELECT 'x', count(*) FROM _changelog",
            "SELECT 1",
        ] {
            check_sql(&path, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "DROP TABLE posts",
            "DELETE FROM _changelog",
            "CREATE TABLE t (x)",
            "ALTER TABLE posts ADD COLUMN y",
            "BEGIN",
            "PRAGMA journal_mode = delete",
            "ATTACH 'other.db' AS o",
            "UPDATE nope SET x = 1",
            "SELEC 1",
            "",
            "UPDATE posts SET n = 1; DROP TABLE posts",
            "VACUUM",
            "vacuum main",
            "/* c */ VACUUM INTO '/tmp/x.db'",
            "SELECT load_extension('/tmp/x.so')",
            "UPDATE posts SET n = LOAD_EXTENSION('x')",
        ] {
            assert!(check_sql(&path, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_and_link_local_urls_are_local() {
        for local in [
            "http://localhost/x",
            "http://LOCALHOST.:8080/",
            "http://api.localhost/",
            "http://127.0.0.1:3000/",
            "http://127.1.2.3/",
            "http://0.0.0.0/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(is_local_url(local), "{local}");
        }
        for remote in [
            "https://example.com/hook",
            "http://10.1.2.3/",
            "http://[2001:db8::1]/",
            "not a url",
        ] {
            assert!(!is_local_url(remote), "{remote}");
        }
    }
}
