//! The records API: list, view, create, update, delete and bulk operations, with collection
//! rules and auth-collection specifics (sign-up, password change).

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use rusqlite::types::Value as Sql;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::expand::PathTree;
use super::rules::{self, Action, auth_record, authorize, condition, matches};
use super::store::{self, Stored};
use super::values::{self, Changes};
use crate::auth::{Identity, password};
use crate::collections::model::Collection;
use crate::collections::store::Schema;
use crate::db::Database;
use crate::error::{ApiError, ApiResult, FieldErrors, field_error};
use crate::files::fields::Pending;
use crate::files::upload::Uploads;
use crate::http::resource;
use crate::query::Condition;
use crate::state::AppState;
use crate::util::random_id;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/api/collections/{c}/records")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(
        resource("/api/collections/{c}/records/bulk")
            .route(web::patch().to(bulk_update))
            .route(web::delete().to(bulk_delete)),
    )
    .service(
        resource("/api/collections/{c}/records/{id}")
            .route(web::get().to(view))
            .route(web::patch().to(update))
            .route(web::delete().to(delete)),
    );
}

/// Most records one bulk request may touch.
const MAX_BULK: usize = 1000;
/// Largest `perPage`.
const MAX_PER_PAGE: u64 = 1000;

/// The JSON a caller sees: hidden fields only for admins; an auth record's email only for
/// admins, the record itself, or when `emailVisibility` is on.
pub fn public_record(c: &Collection, s: &Stored, who: &Identity) -> Value {
    record_json(c, s, who.is_admin(), who.is_record(&c.id, s.id()))
}

/// A record's JSON as an admin (`admin`: hidden fields and email) or its owner (`owner`: email)
/// sees it.
pub fn record_json(c: &Collection, s: &Stored, admin: bool, owner: bool) -> Value {
    let mut m = Map::new();
    for k in ["id", "created", "updated"] {
        m.insert(k.into(), s.data.get(k).cloned().unwrap_or(Value::Null));
    }
    m.insert("collectionId".into(), json!(c.id));
    m.insert("collectionName".into(), json!(c.name));
    if c.is_auth() {
        let visible = s.data.get("emailVisibility") == Some(&json!(true));
        for k in ["emailVisibility", "verified"] {
            m.insert(k.into(), s.data.get(k).cloned().unwrap_or(json!(false)));
        }
        if visible || admin || owner {
            m.insert("email".into(), s.data.get("email").cloned().unwrap_or(json!("")));
        }
    }
    for f in c.live_fields() {
        if !f.hidden || admin {
            m.insert(
                f.name.clone(),
                s.data.get(&f.name).cloned().unwrap_or_else(|| values::zero_value(f)),
            );
        }
    }
    Value::Object(m)
}

/// The `expand` and `fields` of a request, checked against the collection.
fn shape(
    c: &Collection,
    schema: &Schema,
    expand: Option<&str>,
    fields: Option<&str>,
) -> ApiResult<(PathTree, PathTree)> {
    let tree = PathTree::parse(expand.unwrap_or(""));
    super::expand::check(c, schema, &tree)?;
    Ok((tree, PathTree::parse(fields.unwrap_or(""))))
}

/// What a request addresses: its database and collection, and the condition the records must
/// match under the collection's rule for the action (`None`: all of them).
struct Target {
    db: Arc<Database>,
    c: Arc<Collection>,
    schema: Arc<Schema>,
    cond: Option<Condition>,
}

/// Resolves the target of a request once `who` passes the rule for `action` (403 for a `null`
/// rule). `body` is what `@request.body` sees.
async fn target(
    state: &AppState,
    req: &HttpRequest,
    coll: &str,
    who: &Identity,
    action: Action,
    body: Option<&Map<String, Value>>,
) -> ApiResult<Target> {
    let db = state.db(req)?;
    let c = state.collection(&db, coll).await?;
    let access = authorize(&c, action, who)?;
    let schema = state.schemas.get(&db).await?;
    let auth = auth_record(who);
    let cond = condition(&access, &c, &schema, auth.as_ref(), body)?;
    Ok(Target { db, c, schema, cond })
}

/// `a AND b` of two optional conditions.
pub(crate) fn both(a: Option<Condition>, b: Option<Condition>) -> Option<Condition> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let mut params = a.params;
            params.extend(b.params);
            Some(Condition {
                sql: format!("({}) AND ({})", a.sql, b.sql),
                params,
            })
        }
        (a, None) => a,
        (None, b) => b,
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    page: Option<String>,
    per_page: Option<String>,
    sort: Option<String>,
    filter: Option<String>,
    expand: Option<String>,
    fields: Option<String>,
    skip_total: Option<String>,
}

fn parse_positive(name: &str, v: Option<&str>, default: u64) -> ApiResult<u64> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => s
            .parse::<u64>()
            .map(|n| n.max(1))
            .map_err(|_| ApiError::invalid_field(name, "validation_invalid_number", "Must be a positive integer.")),
    }
}

async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
    q: web::Query<ListQuery>,
) -> ApiResult<HttpResponse> {
    let Target { db, c, schema, cond } = target(&state, &req, &path, &who, Action::List, None).await?;
    let (tree, fields) = shape(&c, &schema, q.expand.as_deref(), q.fields.as_deref())?;
    let filter = match crate::query::parse(q.filter.as_deref().unwrap_or("")) {
        Ok(None) => None,
        Ok(Some(e)) => {
            let auth = auth_record(&who);
            let ctx = crate::query::Context {
                schema: &schema,
                auth: auth.as_ref(),
                body: None,
                now: crate::util::now_string(),
                admin: who.is_admin(),
            };
            Some(crate::query::compile(&e, &c, &ctx).map_err(|e| filter_error(&e))?)
        }
        Err(e) => return Err(filter_error(&e)),
    };
    let cond = both(cond, filter);
    let page = parse_positive("page", q.page.as_deref(), 1)?;
    let per_page = parse_positive("perPage", q.per_page.as_deref(), 30)?.min(MAX_PER_PAGE);
    let skip_total = matches!(q.skip_total.as_deref(), Some("1" | "true"));
    let sort = store::parse_sort(&c, &schema, q.sort.as_deref().unwrap_or(""), who.is_admin())?;
    let query = store::list_query(&c, cond.as_ref(), &sort, page, per_page, skip_total);
    // The same query at the same generation gives the same rows: they come from the cache,
    // which a commit makes miss (see `Database::cached`). Rules and filters are part of the
    // query, so one caller never gets rows chosen for another.
    type Page = (Vec<store::Stored>, Option<u64>);
    let key = query.cacheable.then(|| query.key());
    let at = db.generation();
    let hit: Option<Arc<Page>> = key.as_deref().and_then(|k| db.cached::<Page>(k));
    let (items, total, fresh) = match hit {
        Some(page) if tree.0.is_empty() => {
            let items: Vec<Value> = page.0.iter().map(|s| public_record(&c, s, &who)).collect();
            (items, page.1, None)
        }
        hit => {
            let query = Arc::new(query);
            // A miss with a total counts beside the page, on another connection: both may scan
            // the table, and the caller waits for the slower of the two instead of for both.
            let count = match (&hit, query.counts()) {
                (None, true) => {
                    let (db, q) = (db.clone(), query.clone());
                    Some(actix_web::rt::spawn(async move {
                        db.read(move |conn| store::run_count(conn, &q)).await
                    }))
                }
                _ => None,
            };
            let fresh_rows = hit.is_none();
            let (items, page) = db
                .read(move |conn| {
                    let page: Arc<Page> = match hit {
                        Some(p) => p,
                        None => Arc::new((store::run_page(conn, &c, &query)?, None)),
                    };
                    let mut items: Vec<Value> = page.0.iter().map(|s| public_record(&c, s, &who)).collect();
                    if !tree.0.is_empty() {
                        let auth = auth_record(&who);
                        super::expand::expand(conn, &schema, &c, &mut items, &tree, &who, auth.as_ref())?;
                    }
                    Ok((items, page))
                })
                .await?;
            let total = match count {
                Some(handle) => handle
                    .await
                    .map_err(|e| ApiError::internal("count task", e.to_string()))??,
                None => page.1,
            };
            // A page just read is kept with its total, for the next identical list.
            let fresh = fresh_rows.then(|| match Arc::try_unwrap(page) {
                Ok((rows, _)) => Arc::new((rows, total)),
                Err(shared) => Arc::new((shared.0.clone(), total)),
            });
            (items, total, fresh)
        }
    };
    if let (Some(page), Some(key)) = (fresh, key) {
        db.cache(key, at, page);
    }
    let items: Vec<Value> = items.into_iter().map(|v| super::expand::pick(v, &fields)).collect();
    let (total_items, total_pages) = match total {
        Some(t) => (t as i64, t.div_ceil(per_page) as i64),
        None => (-1, -1),
    };
    Ok(HttpResponse::Ok().json(json!({
        "page": page, "perPage": per_page, "totalItems": total_items, "totalPages": total_pages, "items": items,
    })))
}

#[derive(Debug, Deserialize)]
struct ViewQuery {
    fields: Option<String>,
    expand: Option<String>,
}

async fn view(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<(String, String)>,
    q: web::Query<ViewQuery>,
) -> ApiResult<HttpResponse> {
    let (coll, id) = path.into_inner();
    let Target { db, c, schema, cond } = target(&state, &req, &coll, &who, Action::View, None).await?;
    let (tree, fields) = shape(&c, &schema, q.expand.as_deref(), q.fields.as_deref())?;
    let plain = tree.0.is_empty();
    let lookup = move |conn: &rusqlite::Connection| match store::get(conn, &c, &id)? {
        Some(r) if matches(conn, &c, &id, cond.as_ref())? => {
            let mut items = vec![public_record(&c, &r, &who)];
            if !tree.0.is_empty() {
                let auth = auth_record(&who);
                super::expand::expand(conn, &schema, &c, &mut items, &tree, &who, auth.as_ref())?;
            }
            Ok(items.pop())
        }
        _ => Ok(None),
    };
    // One row by primary key (and a view rule over that row) takes microseconds: it runs on
    // this thread. An expand follows relations and may read many rows: the blocking pool.
    let rec = if plain {
        db.read_now(lookup).await?
    } else {
        db.read(lookup).await?
    }
    .ok_or_else(|| ApiError::not_found("Record not found."))?;
    Ok(HttpResponse::Ok().json(super::expand::pick(rec, &fields)))
}

fn body_object(body: Value) -> ApiResult<Map<String, Value>> {
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad_request("The body must be a JSON object.")),
    }
}

/// Auth-collection columns of a create or update (email, visibility, verified, password).
/// Returns the changes and the plain password to hash, if one was set.
fn auth_changes(
    body: &Map<String, Value>,
    who: &Identity,
    current: Option<&Stored>,
    errors: &mut FieldErrors,
) -> (Changes, Option<String>) {
    let mut changes = Changes::new();
    let creating = current.is_none();
    let current_email = current.and_then(|r| r.data.get("email")).and_then(Value::as_str);
    match body.get("email") {
        // PocketBase's rule: only admins change an address directly (an unchanged one echoed
        // back by a client is fine). Anyone else would keep `verified` on an unproven address.
        Some(Value::String(e))
            if !creating && !who.is_admin() && current_email != Some(e.trim().to_lowercase().as_str()) =>
        {
            field_error(
                errors,
                "email",
                "validation_email_change",
                "Only admins can change an email address directly.",
            )
        }
        Some(Value::String(e)) if values::parse_email(e.trim()) => {
            changes.push(("email".into(), Sql::Text(e.trim().to_lowercase())))
        }
        None if !creating => {}
        None => field_error(errors, "email", "validation_required", "Missing required value."),
        Some(_) => field_error(
            errors,
            "email",
            "validation_invalid_email",
            "Must be a valid email address.",
        ),
    }
    for key in ["emailVisibility", "verified"] {
        match body.get(key) {
            None => {}
            Some(Value::Bool(_)) if key == "verified" && !who.is_admin() => {}
            Some(Value::Bool(b)) => changes.push((key.into(), Sql::Integer(*b as i64))),
            Some(_) => field_error(errors, key, "validation_invalid_value", "Must be a boolean."),
        }
    }
    let password = body.get("password").and_then(Value::as_str);
    match (password, creating) {
        (None, false) => return (changes, None),
        (None, true) => {
            field_error(errors, "password", "validation_required", "Missing required value.");
            return (changes, None);
        }
        _ => {}
    }
    let password = password.unwrap_or_default().to_string();
    if let Err(msg) = password::check_strength(&password) {
        field_error(errors, "password", "validation_length_out_of_range", msg);
    }
    if body.get("passwordConfirm").and_then(Value::as_str) != Some(password.as_str()) {
        field_error(
            errors,
            "passwordConfirm",
            "validation_values_mismatch",
            "Values don't match.",
        );
    }
    (changes, Some(password))
}

/// Creates a record in `c` for `who` (rules, validation, sign-up for auth collections).
pub async fn create_record(
    state: &AppState,
    db: &Database,
    c: Arc<Collection>,
    who: &Identity,
    body: Value,
    files: Vec<Pending>,
) -> ApiResult<Stored> {
    let access = authorize(&c, Action::Create, who)?;
    let mut body = body_object(body)?;
    let mut errors = FieldErrors::new();
    let plan = match crate::files::fields::plan(&c, &mut body, &files, None) {
        Ok(p) => p,
        Err(e) => {
            errors.extend(e);
            Default::default()
        }
    };
    let id = match body.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if store::is_valid_record_id(s) => Some(s.clone()),
        Some(_) => {
            field_error(
                &mut errors,
                "id",
                "validation_invalid_id",
                "Use 1-64 characters of letters, digits, _ and -.",
            );
            None
        }
    };
    let (mut changes, plain) = if c.is_auth() {
        auth_changes(&body, who, None, &mut errors)
    } else {
        (Changes::new(), None)
    };
    let (field_changes, relations) = match values::prepare(&c, &body, None) {
        Ok(v) => v,
        Err(e) => {
            errors.extend(e);
            Default::default()
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    changes.extend(field_changes);
    let id = merge_files(&c, &mut changes, &plan, id);
    if let Some(p) = plain {
        changes.push(("password".into(), Sql::Text(password::hash_async(p).await?)));
    }
    let schema = state.schemas.get(db).await?;
    let auth = auth_record(who);
    let cond = condition(&access, &c, &schema, auth.as_ref(), Some(&body))?;
    let weight = changes_weight(&changes);
    let (c3, placed_id) = (c.clone(), id.clone());
    let journaled = journals_files(state, &db.name);
    let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    if let Some(id) = &id {
        // The files are in place before the record that names them commits.
        if let Err(e) = place_files(state, &db.name, &c, id, &files).await {
            state.storage.remove(&db.name, &c, id, &names).await;
            return Err(e);
        }
    }
    let result = db
        .write_weighted(weight, move |conn| {
            let mut errors = FieldErrors::new();
            store::check_relations(conn, &schema, &relations, &mut errors)?;
            if let Some(id) = id.as_deref().filter(|_| c.is_auth()) {
                // `@request.auth.id` names a record without its collection: an auth record must
                // not share its id with a record of another auth collection of this database.
                if store::auth_id_taken(conn, &schema, &c, id)? {
                    field_error(
                        &mut errors,
                        "id",
                        "validation_not_unique",
                        "The id is already taken by another auth record.",
                    );
                }
            }
            if !errors.is_empty() {
                return Err(ApiError::validation(errors));
            }
            if let (Some(id), true) = (&id, journaled) {
                journal_files(conn, &c, id, &files, &plan)?;
            }
            let rec = store::insert(conn, &c, id, changes)?;
            // The create rule is checked on the stored record; failing, the job's savepoint rolls
            // the insert back.
            if !matches(conn, &c, rec.id(), cond.as_ref())? {
                return Err(ApiError::bad_request(
                    "Failed to create record: the collection's createRule does not match.",
                ));
            }
            Ok(rec)
        })
        .await;
    if let (Err(_), Some(id)) = (&result, &placed_id) {
        state.storage.remove(&db.name, &c3, id, &names).await;
    }
    result
}

/// Puts the file fields' new values into `changes` (in place of what `values::prepare` made of
/// them); returns the record id to use, generated now when files must be placed under it.
fn merge_files(
    c: &Collection,
    changes: &mut Changes,
    plan: &crate::files::fields::Plan,
    id: Option<String>,
) -> Option<String> {
    if plan.values.is_empty() {
        return id;
    }
    changes.retain(|(k, _)| !plan.values.iter().any(|(f, _)| f == k));
    for (name, v) in &plan.values {
        if let Some(f) = c.field(name) {
            changes.push((name.clone(), values::to_sql(f, v)));
        }
    }
    Some(id.unwrap_or_else(crate::util::new_record_id))
}

/// Whether writes to database `db` on this node journal their files for replicas.
fn journals_files(state: &AppState, db: &str) -> bool {
    // With S3, every node reads the same bucket: there is nothing to copy.
    state.follower.is_none() && state.storage.s3.is_none() && crate::replica::is_replicated_db(db)
}

/// Journals what a plan does to a record's files, in the transaction of the record change.
fn journal_files(
    conn: &rusqlite::Connection,
    c: &Collection,
    id: &str,
    files: &[Pending],
    plan: &crate::files::fields::Plan,
) -> ApiResult<()> {
    use crate::files::replica::Entry;
    let mut entries: Vec<Entry> = plan
        .place
        .iter()
        .map(|&i| Entry::add(&c.id, id, &files[i].name, files[i].size, &files[i].sha256))
        .collect();
    entries.extend(plan.dropped.iter().map(|d| Entry::delete(&c.id, id, Some(d))));
    Ok(crate::files::replica::journal(conn, &entries)?)
}

/// Journals the directories of deleted records of collections with file fields.
fn journal_deleted(conn: &rusqlite::Connection, schema: &Schema, gone: &[(String, String)]) -> ApiResult<()> {
    use crate::files::replica::Entry;
    let entries: Vec<Entry> = gone
        .iter()
        .filter(|(cid, _)| {
            schema.by_id(cid).is_some_and(|c| {
                c.live_fields()
                    .any(|f| f.kind == crate::collections::model::FieldType::File)
            })
        })
        .map(|(cid, rid)| Entry::delete(cid, rid, None))
        .collect();
    Ok(crate::files::replica::journal(conn, &entries)?)
}

/// Puts a write's uploads in place before the write runs: a record is never committed naming a
/// file that is not there yet. The caller removes them if the write fails.
async fn place_files(state: &AppState, db: &str, c: &Collection, id: &str, files: &[Pending]) -> ApiResult<()> {
    if files.is_empty() {
        return Ok(());
    }
    state
        .storage
        .place_all(db, c, id, files)
        .await
        .map_err(|e| ApiError::internal("store an uploaded file", e.to_string()))
}

/// About how many bytes `changes` write.
fn changes_weight(changes: &Changes) -> usize {
    changes
        .iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    Sql::Text(t) => t.len(),
                    Sql::Blob(b) => b.len(),
                    _ => 8,
                }
        })
        .sum()
}

/// A 400 for a filter that does not parse or names unknown fields.
fn filter_error(e: &crate::query::FilterError) -> ApiError {
    ApiError::invalid_field("filter", "validation_invalid_filter", format!("Invalid filter: {e}"))
}

async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
    payload: web::Payload,
) -> actix_web::Result<HttpResponse> {
    let db = state.db(&req)?;
    let c = state.collection(&db, &path).await?;
    // A caller the rule refuses outright does not get to upload first: a rule that does not
    // depend on the body (`@request.auth.id != ""`) is decided before a byte of a multipart
    // body is read. (A JSON body never reaches the disk; its rule is decided once, after.)
    let access = authorize(&c, Action::Create, &who)?;
    let multipart = crate::files::upload::is_multipart(&req);
    if multipart && rules::decided_without_body(&state, &db, &c, &access, &who).await? == Some(false) {
        return Err(
            ApiError::bad_request("Failed to create record: the collection's createRule does not match.").into(),
        );
    }
    let (body, _uploads, pending) = read_body(&state, &req, payload, &c).await?;
    let rec = create_record(&state, &db, c.clone(), &who, body, pending).await?;
    Ok(HttpResponse::Ok().json(public_record(&c, &rec, &who)))
}

async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> actix_web::Result<HttpResponse> {
    let (coll, id) = path.into_inner();
    // An id no record can have is answered before anything of the body is read or placed.
    if !store::is_valid_record_id(&id) {
        return Err(ApiError::not_found("Record not found.").into());
    }
    let db0 = state.db(&req)?;
    let c0 = state.collection(&db0, &coll).await?;
    let access = authorize(&c0, Action::Update, &who)?;
    // A rule that does not depend on the body is decided on the stored record first: a caller
    // who may not update this record uploads nothing. (A JSON body is decided after, once.)
    if crate::files::upload::is_multipart(&req)
        && !rules::record_allowed_without_body(&state, &db0, &c0, &access, &who, &id).await?
    {
        return Err(ApiError::not_found("Record not found.").into());
    }
    let (body, _uploads, files) = read_body(&state, &req, payload, &c0).await?;
    let body = body_object(body)?;
    let Target { db, c, schema, cond } = target(&state, &req, &coll, &who, Action::Update, Some(&body)).await?;
    let mut auth = Changes::new();
    if c.is_auth() {
        let (c2, id2, cond2) = (c.clone(), id.clone(), cond.clone());
        let current = db
            .read(move |conn| match store::get(conn, &c2, &id2)? {
                Some(r) if matches(conn, &c2, &id2, cond2.as_ref())? => Ok(Some(r)),
                _ => Ok(None),
            })
            .await?
            .ok_or_else(|| ApiError::not_found("Record not found."))?;
        let mut errors = FieldErrors::new();
        let (changes, plain) = auth_changes(&body, &who, Some(&current), &mut errors);
        if let Some(p) = &plain {
            if !who.is_admin() {
                let old = body
                    .get("oldPassword")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if !password::verify_async(old, current.password.clone()).await {
                    field_error(
                        &mut errors,
                        "oldPassword",
                        "validation_invalid_old_password",
                        "Missing or invalid old password.",
                    );
                }
            }
            if errors.is_empty() {
                auth.push(("password".into(), Sql::Text(password::hash_async(p.clone()).await?)));
                // A new token key makes every token issued before the change invalid.
                auth.push(("tokenKey".into(), Sql::Text(random_id(50))));
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::validation(errors).into());
        }
        auth.extend(changes);
    }
    let c2 = c.clone();
    // The new values (the body's size as sent, not serialized again), and about as much again
    // for the old ones the changeset keeps.
    let sent = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(0);
    let weight = 2 * sent;
    let record_id = id.clone();
    let journaled = journals_files(&state, &db.name);
    let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    if let Err(e) = place_files(&state, &db.name, &c, &id, &files).await {
        state.storage.remove(&db.name, &c, &id, &names).await;
        return Err(e.into());
    }
    let result = db
        .write_weighted(weight, move |conn| {
            let current = store::get(conn, &c2, &id)?
                .filter(|_| matches(conn, &c2, &id, cond.as_ref()).unwrap_or(false))
                .ok_or_else(|| ApiError::not_found("Record not found."))?;
            let mut body = body;
            let plan = crate::files::fields::plan(&c2, &mut body, &files, Some(&current.data));
            let prepared = values::prepare(&c2, &body, Some(&current.data));
            let (mut changes, relations, plan) = match (prepared, plan) {
                (Ok((c, r)), Ok(p)) => (c, r, p),
                (a, b) => {
                    let mut errors = FieldErrors::new();
                    if let Err(e) = a {
                        errors.extend(e);
                    }
                    if let Err(e) = b {
                        errors.extend(e);
                    }
                    return Err(ApiError::validation(errors));
                }
            };
            let mut errors = FieldErrors::new();
            store::check_relations(conn, &schema, &relations, &mut errors)?;
            if !errors.is_empty() {
                return Err(ApiError::validation(errors));
            }
            changes.extend(auth);
            merge_files(&c2, &mut changes, &plan, Some(id.clone()));
            if journaled {
                journal_files(conn, &c2, &id, &files, &plan)?;
            }
            let rec = store::update(conn, &c2, &id, changes)?;
            Ok((rec, plan.dropped))
        })
        .await;
    let (rec, dropped) = match result {
        Ok(v) => v,
        Err(e) => {
            state.storage.remove(&db.name, &c, &record_id, &names).await;
            return Err(e.into());
        }
    };
    if !dropped.is_empty() {
        let (storage, db_name, c4) = (state.storage.clone(), db.name.clone(), c.clone());
        actix_web::rt::spawn(async move { storage.remove(&db_name, &c4, &record_id, &dropped).await });
    }
    Ok(HttpResponse::Ok().json(public_record(&c, &rec, &who)))
}

async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (coll, id) = path.into_inner();
    let Target { db, c, schema, cond } = target(&state, &req, &coll, &who, Action::Delete, None).await?;
    let journaled = journals_files(&state, &db.name);
    let gone = db
        .write(move |conn| {
            if !matches(conn, &c, &id, cond.as_ref())? {
                return Err(ApiError::not_found("Record not found."));
            }
            let gone = store::delete(conn, &schema, &c, &id)?;
            if journaled {
                journal_deleted(conn, &schema, &gone)?;
            }
            Ok(gone)
        })
        .await?;
    remove_files_of(&state, &db.name, &gone);
    Ok(HttpResponse::NoContent().finish())
}

/// Deletes the files of deleted records (after their delete committed), off the worker thread.
fn remove_files_of(state: &AppState, db: &str, gone: &[(String, String)]) {
    if gone.is_empty() {
        return;
    }
    let (storage, db, gone) = (state.storage.clone(), db.to_string(), gone.to_vec());
    actix_web::rt::spawn(async move {
        for (collection_id, record_id) in gone {
            storage.remove_record(&db, &collection_id, &record_id).await;
        }
    });
}

/// The body of a create or update: JSON, or multipart/form-data with files (streamed to
/// temporary files, removed when the returned guard drops unless placed).
async fn read_body(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    c: &Collection,
) -> actix_web::Result<(Value, Uploads, Vec<Pending>)> {
    if !crate::files::upload::is_multipart(req) {
        use actix_web::FromRequest;
        let body = web::Json::<Value>::from_request(req, &mut payload.into_inner()).await?;
        return Ok((body.into_inner(), Uploads::default(), Vec::new()));
    }
    let max_file = |field: &str| {
        c.field(field)
            .filter(|f| f.kind == crate::collections::model::FieldType::File)
            .map(|f| f.options.max_size.unwrap_or(crate::files::DEFAULT_MAX_SIZE))
    };
    let (body, uploads) =
        crate::files::upload::read(req, payload, &state.storage, state.settings.body_limit, max_file).await?;
    let pending = uploads
        .0
        .iter()
        .map(|u| Pending {
            key: u.key.clone(),
            content_type: u.content_type.clone(),
            size: u.size,
            tmp: u.tmp.clone(),
            name: crate::files::stored_name(&u.original),
            sha256: u.sha256.clone(),
        })
        .collect();
    Ok((Value::Object(body), uploads, pending))
}

fn bulk_ids(body: &Value) -> ApiResult<Vec<String>> {
    let ids: Vec<String> = body
        .get("ids")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| ApiError::invalid_field("ids", "validation_required", "A list of record ids is required."))?;
    if ids.is_empty() || ids.len() > MAX_BULK {
        return Err(ApiError::invalid_field(
            "ids",
            "validation_length_out_of_range",
            format!("Give between 1 and {MAX_BULK} ids."),
        ));
    }
    Ok(ids)
}

/// `{ids, data}`: applies `data` to every record, all or nothing.
async fn bulk_update(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> ApiResult<HttpResponse> {
    let ids = bulk_ids(&body)?;
    let data = body_object(body.get("data").cloned().unwrap_or(Value::Null))
        .map_err(|_| ApiError::invalid_field("data", "validation_required", "An object of changes is required."))?;
    let Target { db, c, schema, cond } = target(&state, &req, &path, &who, Action::Update, Some(&data)).await?;
    if c.is_auth()
        && ["email", "password", "verified", "emailVisibility"]
            .iter()
            .any(|k| data.contains_key(*k))
    {
        return Err(ApiError::invalid_field(
            "data",
            "validation_invalid_value",
            "Auth fields cannot be changed in bulk.",
        ));
    }
    let updated = db
        .write_alone(move |conn| {
            store::check_transaction_size(conn, &c, &ids)?;
            for id in &ids {
                let current = store::get(conn, &c, id)?
                    .filter(|_| matches(conn, &c, id, cond.as_ref()).unwrap_or(false))
                    .ok_or_else(|| ApiError::not_found(format!("Record '{id}' not found.")))?;
                let (changes, relations) =
                    values::prepare(&c, &data, Some(&current.data)).map_err(ApiError::validation)?;
                let mut errors = FieldErrors::new();
                store::check_relations(conn, &schema, &relations, &mut errors)?;
                if !errors.is_empty() {
                    return Err(ApiError::validation(errors));
                }
                store::update(conn, &c, id, changes)?;
            }
            Ok(ids)
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({"updated": updated})))
}

/// `{ids}`: deletes every record, all or nothing.
async fn bulk_delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> ApiResult<HttpResponse> {
    let Target { db, c, schema, cond } = target(&state, &req, &path, &who, Action::Delete, None).await?;
    let ids = bulk_ids(&body)?;
    let journaled = journals_files(&state, &db.name);
    let (deleted, gone) = db
        .write_alone(move |conn| {
            store::check_transaction_size(conn, &c, &ids)?;
            let mut gone = Vec::new();
            for id in &ids {
                if !matches(conn, &c, id, cond.as_ref())? {
                    return Err(ApiError::not_found(format!("Record '{id}' not found.")));
                }
                gone.extend(store::delete(conn, &schema, &c, id).map_err(|e| match e {
                    ApiError::NotFound(_) => ApiError::not_found(format!("Record '{id}' not found.")),
                    other => other,
                })?);
            }
            if journaled {
                journal_deleted(conn, &schema, &gone)?;
            }
            Ok((ids, gone))
        })
        .await?;
    remove_files_of(&state, &db.name, &gone);
    Ok(HttpResponse::Ok().json(json!({"deleted": deleted})))
}
