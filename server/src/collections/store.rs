//! Collection definitions inside each database (`_collections`), the DDL that goes with them,
//! and an in-memory cache of the live definitions per database.
//!
//! Architecture invariant: a collection's definition and its SQL objects change in the same
//! write transaction, so a copy of the database file is always self-consistent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use rusqlite::{Connection, OptionalExtension, params};

use super::model::{
    Collection, CollectionInput, CollectionType, Field, FieldInput, IndexDef, MAX_FIELDS, check_field_name,
    check_field_options, is_sqlite_reserved,
};
use crate::db::{DEFAULT_DB, Database};
use crate::error::{ApiError, ApiResult, FieldErrors, field_error};
use crate::util::{is_identifier, now_string, quote_ident, random_id};

/// Name of the built-in admins collection (in `default` only).
pub const SUPERUSERS: &str = "_superusers";
/// Name of the default auth collection (in `default`).
pub const USERS: &str = "users";

const CREATE_COLLECTIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS _collections (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    type TEXT NOT NULL,
    system INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    definition TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
)";

/// The live collections of one database.
#[derive(Debug, Default)]
pub struct Schema {
    by_name: HashMap<String, Arc<Collection>>,
    by_id: HashMap<String, Arc<Collection>>,
    /// Whether any collection has an enabled webhook trigger.
    triggered: bool,
}

impl Schema {
    /// A schema of the given collections (tests and tools).
    pub fn from_collections(list: Vec<Collection>) -> Schema {
        let mut s = Schema::default();
        for c in list {
            let c = Arc::new(c);
            s.triggered |= c.triggers.iter().any(|t| t.enabled);
            s.by_id.insert(c.id.clone(), c.clone());
            s.by_name.insert(c.name.clone(), c);
        }
        s
    }

    /// Whether a commit of this database may have webhooks to send.
    pub fn has_triggers(&self) -> bool {
        self.triggered
    }

    /// This schema with `c` in place of the collection of its id (or added): how a collection
    /// being saved sees itself, for its own back-relations and `@collection` joins.
    pub fn with(mut self, c: &Collection) -> Schema {
        if let Some(old) = self.by_id.remove(&c.id) {
            self.by_name.remove(&old.name);
        }
        let c = Arc::new(c.clone());
        self.by_id.insert(c.id.clone(), c.clone());
        self.by_name.insert(c.name.clone(), c);
        self
    }

    pub fn get(&self, id_or_name: &str) -> Option<Arc<Collection>> {
        self.by_name
            .get(id_or_name)
            .or_else(|| self.by_id.get(id_or_name))
            .cloned()
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<Collection>> {
        self.by_id.get(id).cloned()
    }

    /// Every live collection, sorted by name.
    pub fn all(&self) -> Vec<Arc<Collection>> {
        let mut v: Vec<_> = self.by_name.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// Cached [`Schema`] per database name.
#[derive(Default)]
pub struct SchemaCache {
    /// A std lock held only to clone or replace an `Arc`, never across `.await`.
    map: RwLock<HashMap<String, Arc<Schema>>>,
    /// Serializes reloads so a slower, older reload cannot overwrite a newer one.
    reload_lock: tokio::sync::Mutex<()>,
}

impl SchemaCache {
    /// The schema of `db`, loaded on first use.
    pub async fn get(&self, db: &Database) -> ApiResult<Arc<Schema>> {
        if let Some(s) = self.map.read().ok().and_then(|m| m.get(&db.name).cloned()) {
            return Ok(s);
        }
        self.reload(db).await
    }

    /// Reads the definitions again; call after every committed change to `_collections`.
    pub async fn reload(&self, db: &Database) -> ApiResult<Arc<Schema>> {
        let _guard = self.reload_lock.lock().await;
        let schema = Arc::new(db.read(load).await?);
        if let Ok(mut m) = self.map.write() {
            m.insert(db.name.clone(), schema.clone());
        }
        Ok(schema)
    }

    /// The cached schema of database `name`, without loading it (for the writer thread).
    pub fn peek(&self, name: &str) -> Option<Arc<Schema>> {
        self.map.read().ok().and_then(|m| m.get(name).cloned())
    }

    pub fn forget(&self, db_name: &str) {
        if let Ok(mut m) = self.map.write() {
            m.remove(db_name);
        }
    }
}

/// The live collections stored in the database of `conn`.
pub fn load_schema(conn: &Connection) -> ApiResult<Schema> {
    load(conn)
}

fn load(conn: &Connection) -> ApiResult<Schema> {
    let mut schema = Schema::default();
    if !crate::db::table_exists(conn, "_collections")? {
        return Ok(schema);
    }
    let mut stmt = conn.prepare("SELECT definition FROM _collections WHERE deleted = 0")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    for row in rows {
        let c: Collection = serde_json::from_str(&row?).map_err(|e| ApiError::internal("collection definition", e))?;
        let c = Arc::new(c);
        schema.triggered |= c.triggers.iter().any(|t| t.enabled);
        schema.by_id.insert(c.id.clone(), c.clone());
        schema.by_name.insert(c.name.clone(), c);
    }
    Ok(schema)
}

/// Creates `_collections` and, in `default`, the built-in `_superusers` and `users`.
pub fn bootstrap(conn: &Connection, db_name: &str) -> ApiResult<()> {
    conn.execute_batch(CREATE_COLLECTIONS_TABLE)?;
    ensure_system_indexes(conn)?;
    if db_name != DEFAULT_DB {
        return Ok(());
    }
    // `users` gets PocketBase's defaults: anyone may sign up, a user may list, view, update and
    // delete only itself. A directory made by an older vski keeps the rules it has.
    let own = || Some(Some("id = @request.auth.id".to_string()));
    let users_rules = [own(), own(), Some(Some(String::new())), own(), own()];
    let admins_only = [Some(None), Some(None), Some(None), Some(None), Some(None)];
    for (name, system, rules) in [(SUPERUSERS, true, admins_only), (USERS, false, users_rules)] {
        if find_any(conn, name)?.is_some() {
            continue;
        }
        let input = CollectionInput {
            name: Some(name.to_string()),
            kind: Some(CollectionType::Auth),
            rules,
            ..Default::default()
        };
        create_in(conn, input, system)?;
    }
    Ok(())
}

/// Creates the system indexes a collection made by an older vski lacks (the `created, id`
/// order index). Nothing is written when none is missing.
fn ensure_system_indexes(conn: &Connection) -> ApiResult<()> {
    let defs: Vec<String> = conn
        .prepare("SELECT definition FROM _collections WHERE deleted = 0")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for def in defs {
        let c: Collection = serde_json::from_str(&def).map_err(|e| ApiError::internal("collection definition", e))?;
        for (name, sql) in c.system_indexes() {
            if !sqlite_object_exists(conn, &name)? {
                log::info!("creating index {name} on '{}'", c.name);
                conn.execute_batch(&sql)?;
            }
        }
    }
    Ok(())
}

/// A collection by id or name, including soft-deleted ones, with its `deleted` flag.
fn find_any(conn: &Connection, id_or_name: &str) -> ApiResult<Option<(Collection, bool)>> {
    let row: Option<(String, bool)> = conn
        .query_row(
            "SELECT definition, deleted FROM _collections WHERE id = ?1 OR name = ?1 ORDER BY deleted LIMIT 1",
            [id_or_name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(def, deleted)| {
        serde_json::from_str(&def)
            .map(|c| (c, deleted))
            .map_err(|e| ApiError::internal("collection definition", e))
    })
    .transpose()
}

/// A live collection by id or name, read inside the current transaction.
pub fn find_live(conn: &Connection, id_or_name: &str) -> ApiResult<Option<Collection>> {
    Ok(find_any(conn, id_or_name)?
        .filter(|(_, deleted)| !deleted)
        .map(|(c, _)| c))
}

/// Writer job: creates a collection from `input`.
pub fn create(conn: &Connection, input: CollectionInput) -> ApiResult<Collection> {
    create_in(conn, input, false)
}

fn create_in(conn: &Connection, input: CollectionInput, system: bool) -> ApiResult<Collection> {
    let mut errors = FieldErrors::new();
    let name = input.name.clone().unwrap_or_default();
    if name.is_empty() {
        field_error(&mut errors, "name", "validation_required", "Missing required value.");
    } else if !is_identifier(&name) || (name.starts_with('_') && !system) || is_sqlite_reserved(&name) {
        field_error(
            &mut errors,
            "name",
            "validation_invalid_name",
            "Use letters, digits and _, starting with a letter.",
        );
    } else if let Some((_, deleted)) = find_any(conn, &name)? {
        let msg = if deleted {
            "A deleted collection keeps this name (its table is kept); choose another name."
        } else {
            "A collection with this name already exists."
        };
        field_error(&mut errors, "name", "validation_not_unique", msg);
    } else if sqlite_object_exists(conn, &name)? {
        field_error(
            &mut errors,
            "name",
            "validation_not_unique",
            "This name is taken by an internal table.",
        );
    }
    let kind = input.kind.unwrap_or(CollectionType::Base);
    let id = random_id(15);
    let now = now_string();
    let mut collection = Collection {
        id: id.clone(),
        name: name.clone(),
        kind,
        system,
        fields: Vec::new(),
        indexes: Vec::new(),
        triggers: Vec::new(),
        list_rule: None,
        view_rule: None,
        create_rule: None,
        update_rule: None,
        delete_rule: None,
        created: now.clone(),
        updated: now,
    };
    apply_rules(&mut collection, &input);
    let mut seen = HashSet::new();
    for (i, f) in input.fields.into_iter().flatten().enumerate() {
        if f.system && is_system_column(&f.name, kind) {
            continue; // a system field echoed back by a PocketBase client
        }
        match check_new_field(conn, &f, kind, &name, &id, &mut seen) {
            Ok(f) => collection.fields.push(f.into_field(random_id(10))),
            Err(msg) => field_error(&mut errors, &format!("fields.{i}"), "validation_invalid", msg),
        }
    }
    check_field_count(collection.fields.len(), &mut errors);
    let indexes = check_indexes(&collection, input.indexes.as_deref().unwrap_or_default(), &mut errors);
    validate_rules(conn, &collection, &mut errors)?;
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    conn.execute_batch(&collection.create_table_sql())?;
    for (_, sql) in collection.system_indexes() {
        conn.execute_batch(&sql)?;
    }
    create_user_indexes(conn, &collection, &indexes)?;
    collection.indexes = indexes.iter().map(|d| d.to_sql(&collection.name)).collect();
    save(conn, &collection, true)?;
    Ok(collection)
}

/// Writer job: applies an update (append-only for fields) to the collection `id_or_name`.
pub fn update(conn: &Connection, id_or_name: &str, input: CollectionInput) -> ApiResult<Collection> {
    let mut c = find_live(conn, id_or_name)?.ok_or_else(|| ApiError::not_found("Collection not found."))?;
    let old = c.clone();
    let mut errors = FieldErrors::new();
    if let Some(name) = &input.name {
        if name != &c.name {
            field_error(
                &mut errors,
                "name",
                "validation_immutable",
                "Collections cannot be renamed.",
            );
        }
    }
    if let Some(kind) = input.kind {
        if kind != c.kind {
            field_error(
                &mut errors,
                "type",
                "validation_immutable",
                "The type of a collection cannot change.",
            );
        }
    }
    if c.name == SUPERUSERS {
        // The admins' collection is not for rules: opening it (a createRule of "") would let
        // anyone sign up as an admin. Its rules stay null, whatever an update sends.
        let changes_a_rule = [
            &c.list_rule,
            &c.view_rule,
            &c.create_rule,
            &c.update_rule,
            &c.delete_rule,
        ]
        .into_iter()
        .zip(&input.rules)
        .any(|(now, given)| given.as_ref().is_some_and(|g| g != now));
        if changes_a_rule {
            field_error(
                &mut errors,
                "createRule",
                "validation_immutable",
                "The rules of _superusers are fixed: only admins manage admins.",
            );
        }
        if let Some(t) = &input.triggers {
            c.triggers = t.clone();
        }
    } else {
        apply_rules(&mut c, &input);
    }
    let mut new_columns = Vec::new();
    if let Some(inputs) = input.fields {
        let mut kept = HashSet::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (i, f) in inputs.into_iter().enumerate() {
            if f.system && is_system_column(&f.name, c.kind) {
                continue;
            }
            let key = format!("fields.{i}");
            if !seen.insert(f.name.to_ascii_lowercase()) {
                field_error(
                    &mut errors,
                    &key,
                    "validation_invalid",
                    format!("Duplicate field name '{}'.", f.name),
                );
                continue;
            }
            let existing =
                f.id.as_ref()
                    .and_then(|id| c.fields.iter().position(|x| &x.id == id))
                    .or_else(|| c.fields.iter().position(|x| x.name.eq_ignore_ascii_case(&f.name)));
            match existing {
                Some(pos) => {
                    let cur = &c.fields[pos];
                    if cur.name != f.name {
                        field_error(
                            &mut errors,
                            &key,
                            "validation_immutable",
                            format!("Field '{}' cannot be renamed.", cur.name),
                        );
                    } else if cur.kind != f.kind || cur.is_multi() != f.is_multi() {
                        field_error(
                            &mut errors,
                            &key,
                            "validation_immutable",
                            format!("The type of field '{}' cannot change.", cur.name),
                        );
                    } else if let Err(msg) = check_relation_target(conn, &f, &c).and_then(|()| check_field_options(&f))
                    {
                        field_error(&mut errors, &key, "validation_invalid", msg);
                    } else {
                        let id = cur.id.clone();
                        let mut f = f;
                        resolve_relation(conn, &mut f, &c)?;
                        c.fields[pos] = f.into_field(id.clone());
                        kept.insert(id);
                    }
                }
                None => {
                    let mut names = HashSet::new();
                    match check_new_field(conn, &f, c.kind, &c.name, &c.id, &mut names) {
                        Ok(f) => {
                            let field = f.into_field(random_id(10));
                            kept.insert(field.id.clone());
                            new_columns.push(field.column_sql());
                            c.fields.push(field);
                        }
                        Err(msg) => field_error(&mut errors, &key, "validation_invalid", msg),
                    }
                }
            }
        }
        for f in c.fields.iter_mut() {
            if !kept.contains(&f.id) {
                f.deleted = true;
            }
        }
    }
    check_field_count(c.fields.len(), &mut errors);
    let indexes = input.indexes.as_ref().map(|list| check_indexes(&c, list, &mut errors));
    validate_rules(conn, &c, &mut errors)?;
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    for col in new_columns {
        conn.execute_batch(&format!("ALTER TABLE {} ADD COLUMN {col}", quote_ident(&c.name)))?;
    }
    // Unique-field indexes: create the new ones, drop the ones no longer wanted.
    let before: HashMap<String, String> = old.system_indexes().into_iter().collect();
    let after: HashMap<String, String> = c.system_indexes().into_iter().collect();
    for name in before.keys().filter(|n| !after.contains_key(*n)) {
        conn.execute_batch(&format!("DROP INDEX IF EXISTS {}", quote_ident(name)))?;
    }
    for (name, sql) in after.iter().filter(|(n, _)| !before.contains_key(*n)) {
        if let Err(e) = conn.execute_batch(sql) {
            return Err(constraint_or(e, || {
                let field = name.rsplit('_').next().unwrap_or_default();
                ApiError::invalid_field(
                    field,
                    "validation_not_unique",
                    "Existing records have duplicate values; the field cannot be unique.",
                )
            }));
        }
    }
    if let Some(indexes) = indexes {
        let old_defs: Vec<IndexDef> = old.indexes.iter().filter_map(|s| IndexDef::parse(s).ok()).collect();
        let new_sql: HashSet<String> = indexes.iter().map(|d| d.to_sql(&c.name)).collect();
        for d in &old_defs {
            if !new_sql.contains(&d.to_sql(&c.name)) {
                conn.execute_batch(&format!("DROP INDEX IF EXISTS {}", quote_ident(&d.name)))?;
            }
        }
        let old_sql: HashSet<String> = old_defs.iter().map(|d| d.to_sql(&c.name)).collect();
        let fresh: Vec<IndexDef> = indexes
            .iter()
            .filter(|d| !old_sql.contains(&d.to_sql(&c.name)))
            .cloned()
            .collect();
        create_user_indexes(conn, &c, &fresh)?;
        c.indexes = indexes.iter().map(|d| d.to_sql(&c.name)).collect();
    }
    c.updated = now_string();
    save(conn, &c, false)?;
    Ok(c)
}

/// Writer job: soft-deletes a collection (the table and its rows stay in the file).
pub fn delete(conn: &Connection, id_or_name: &str) -> ApiResult<()> {
    let c = find_live(conn, id_or_name)?.ok_or_else(|| ApiError::not_found("Collection not found."))?;
    if c.system {
        return Err(ApiError::bad_request("System collections cannot be deleted."));
    }
    let mut stmt = conn.prepare("SELECT definition FROM _collections WHERE deleted = 0 AND id != ?1")?;
    let others = stmt.query_map([&c.id], |r| r.get::<_, String>(0))?;
    for def in others {
        let other: Collection =
            serde_json::from_str(&def?).map_err(|e| ApiError::internal("collection definition", e))?;
        if other
            .live_fields()
            .any(|f| f.options.collection_id.as_deref() == Some(c.id.as_str()))
        {
            return Err(ApiError::bad_request(format!(
                "Collection '{}' is referenced by a relation field of '{}'; remove that field first.",
                c.name, other.name
            )));
        }
    }
    conn.execute(
        "UPDATE _collections SET deleted = 1, updated = ?2 WHERE id = ?1",
        params![c.id, now_string()],
    )?;
    Ok(())
}

fn save(conn: &Connection, c: &Collection, insert: bool) -> ApiResult<()> {
    let def = serde_json::to_string(c).map_err(|e| ApiError::internal("collection definition", e))?;
    let kind = if c.is_auth() { "auth" } else { "base" };
    if insert {
        conn.execute(
            "INSERT INTO _collections (id, name, type, system, deleted, definition, created, updated) VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7)",
            params![c.id, c.name, kind, c.system, def, c.created, c.updated],
        )?;
    } else {
        conn.execute(
            "UPDATE _collections SET definition = ?2, updated = ?3 WHERE id = ?1",
            params![c.id, def, c.updated],
        )?;
    }
    Ok(())
}

fn apply_rules(c: &mut Collection, input: &CollectionInput) {
    if let Some(t) = &input.triggers {
        c.triggers = t.clone();
    }
    let targets = [
        &mut c.list_rule,
        &mut c.view_rule,
        &mut c.create_rule,
        &mut c.update_rule,
        &mut c.delete_rule,
    ];
    for (slot, given) in targets.into_iter().zip(&input.rules) {
        if let Some(rule) = given {
            *slot = rule.clone();
        }
    }
}

/// Checks every rule of `c` against its fields (run once the fields are final).
fn validate_rules(conn: &Connection, c: &Collection, errors: &mut FieldErrors) -> ApiResult<()> {
    let schema = load(conn)?.with(c);
    let rules = [
        &c.list_rule,
        &c.view_rule,
        &c.create_rule,
        &c.update_rule,
        &c.delete_rule,
    ];
    for (rule, key) in rules.into_iter().zip(super::model::RULE_KEYS) {
        if let Err(msg) = crate::records::rules::check_rule(rule.as_deref(), c, &schema) {
            field_error(errors, key, "validation_invalid_rule", msg);
        }
    }
    Ok(())
}

fn is_system_column(name: &str, kind: CollectionType) -> bool {
    super::model::BASE_COLUMNS.contains(&name)
        || (kind == CollectionType::Auth && super::model::AUTH_COLUMNS.contains(&name))
}

fn check_new_field(
    conn: &Connection,
    f: &FieldInput,
    kind: CollectionType,
    coll_name: &str,
    coll_id: &str,
    seen: &mut HashSet<String>,
) -> Result<FieldInput, String> {
    check_field_name(&f.name, kind)?;
    if !seen.insert(f.name.to_ascii_lowercase()) {
        return Err(format!("Duplicate field name '{}'.", f.name));
    }
    check_field_options(f)?;
    let mut f = f.clone();
    f.system = false;
    if f.kind == crate::collections::model::FieldType::Relation {
        let target = f.options.collection_id.clone().unwrap_or_default();
        if target == coll_name || target == coll_id {
            f.options.collection_id = Some(coll_id.to_string());
        } else {
            match find_live(conn, &target).map_err(|_| "Could not read collections.".to_string())? {
                Some(t) => f.options.collection_id = Some(t.id),
                None => {
                    return Err(format!(
                        "Field '{}': relation target '{target}' does not exist.",
                        f.name
                    ));
                }
            }
        }
    }
    Ok(f)
}

fn check_relation_target(conn: &Connection, f: &FieldInput, c: &Collection) -> Result<(), String> {
    if f.kind != crate::collections::model::FieldType::Relation {
        return Ok(());
    }
    let target = f.options.collection_id.clone().unwrap_or_default();
    if target == c.id || target == c.name {
        return Ok(());
    }
    match find_live(conn, &target) {
        Ok(Some(_)) => Ok(()),
        _ => Err(format!(
            "Field '{}': relation target '{target}' does not exist.",
            f.name
        )),
    }
}

fn resolve_relation(conn: &Connection, f: &mut FieldInput, c: &Collection) -> ApiResult<()> {
    if f.kind == crate::collections::model::FieldType::Relation {
        let target = f.options.collection_id.clone().unwrap_or_default();
        let id = if target == c.id || target == c.name {
            c.id.clone()
        } else {
            find_live(conn, &target)?.map(|t| t.id).unwrap_or(target)
        };
        f.options.collection_id = Some(id);
    }
    Ok(())
}

/// A 400 on `fields` when a collection would have more than [`MAX_FIELDS`] columns of fields.
fn check_field_count(n: usize, errors: &mut FieldErrors) {
    if n > MAX_FIELDS {
        field_error(
            errors,
            "fields",
            "validation_too_many_fields",
            format!("A collection may have at most {MAX_FIELDS} fields, deleted ones included."),
        );
    }
}

fn check_indexes(c: &Collection, list: &[String], errors: &mut FieldErrors) -> Vec<IndexDef> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, sql) in list.iter().enumerate() {
        let key = format!("indexes.{i}");
        match IndexDef::parse(sql) {
            Ok(d) => {
                if let Some((col, _)) = d.columns.iter().find(|(col, _)| !c.has_column(col)) {
                    field_error(
                        errors,
                        &key,
                        "validation_invalid_index",
                        format!("Unknown column '{col}'."),
                    );
                } else if !names.insert(d.name.to_ascii_lowercase()) {
                    field_error(
                        errors,
                        &key,
                        "validation_invalid_index",
                        format!("Duplicate index name '{}'.", d.name),
                    );
                } else {
                    out.push(d);
                }
            }
            Err(msg) => field_error(errors, &key, "validation_invalid_index", msg),
        }
    }
    out
}

fn create_user_indexes(conn: &Connection, c: &Collection, defs: &[IndexDef]) -> ApiResult<()> {
    for (i, d) in defs.iter().enumerate() {
        if sqlite_object_exists(conn, &d.name)? {
            return Err(ApiError::invalid_field(
                &format!("indexes.{i}"),
                "validation_invalid_index",
                format!("The name '{}' is already used in this database.", d.name),
            ));
        }
        if let Err(e) = conn.execute_batch(&d.to_sql(&c.name)) {
            return Err(constraint_or(e, || {
                ApiError::invalid_field(
                    &format!("indexes.{i}"),
                    "validation_invalid_index",
                    "Existing records have duplicate values for this unique index.",
                )
            }));
        }
    }
    Ok(())
}

fn sqlite_object_exists(conn: &Connection, name: &str) -> ApiResult<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE name = ?1 COLLATE NOCASE",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Maps a constraint violation to `f()`, anything else to an internal error.
pub fn constraint_or(e: rusqlite::Error, f: impl FnOnce() -> ApiError) -> ApiError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => f(),
        _ => e.into(),
    }
}

/// The live fields of `c` that are relations into `target_id`.
pub fn relations_into<'a>(c: &'a Collection, target_id: &str) -> Vec<&'a Field> {
    c.live_fields()
        .filter(|f| f.options.collection_id.as_deref() == Some(target_id))
        .collect()
}

#[cfg(test)]
mod tests {
    //! A sweep for 500s: random collection definitions, updates and records must each end in a
    //! success or a 400, never an internal error or a panic.

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::records::values;

    const NAMES: &[&str] = &[
        "posts",
        "sqlite_x",
        "SQLITE_y",
        "_hidden",
        "1bad",
        "x y",
        "users",
        "id",
        "ROWID",
        "Created",
        "email",
        "expand",
        "f",
        "g",
        "F",
        "tokenKey",
        "a_very_long_name_that_goes_on_and_on_well_past_sixty_four_characters",
    ];
    const TYPES: &[&str] = &[
        "text", "number", "bool", "email", "url", "editor", "date", "select", "json", "file", "relation", "bogus",
    ];
    const INDEXES: &[&str] = &[
        "CREATE INDEX i1 ON t (f)",
        "CREATE UNIQUE INDEX i2 ON t (f, g DESC)",
        "CREATE INDEX sqlite_i ON t (f)",
        "CREATE INDEX i3 ON t (nope)",
        "CREATE INDEX i1 ON t (g)",
        "CREATE INDEX IF NOT EXISTS i4 ON t (created)",
        "CREATE INDEX i5 ON t (f) WHERE f > 1",
        "DROP TABLE t",
        "CREATE INDEX i6 ON t (f, f, f)",
        "",
    ];

    fn option_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!(null)),
            Just(json!(0)),
            Just(json!(-1)),
            Just(json!(1e308)),
            Just(json!(-1e308)),
            Just(json!(u64::MAX)),
            Just(json!("x")),
            Just(json!("2024-01-01")),
            Just(json!(true)),
            Just(json!([])),
            Just(json!(["a", "a", ""])),
            Just(json!({})),
            Just(json!("(")),
            Just(json!("^[a-z]+$")),
            Just(json!("a{99999}")),
            Just(json!("posts")),
            Just(json!(4_294_967_295u64)),
        ]
    }

    /// Mostly plain names, sometimes a hostile or reserved one.
    fn name() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            6 => proptest::sample::select(vec!["f", "g", "h", "k", "title", "n2"]),
            1 => proptest::sample::select(NAMES.to_vec()),
        ]
    }

    fn field() -> impl Strategy<Value = Value> {
        let mut all: Vec<&str> = crate::collections::model::OPTION_KEYS.to_vec();
        all.extend(["required", "unique", "hidden", "system"]);
        let keys = proptest::sample::subsequence(all, 0..3);
        (
            name(),
            0..TYPES.len(),
            keys,
            proptest::collection::vec(option_value(), 5),
            any::<bool>(),
        )
            .prop_map(|(n, t, keys, vals, nested)| {
                let mut opts = serde_json::Map::new();
                for (k, v) in keys.iter().zip(vals) {
                    opts.insert(k.to_string(), v);
                }
                let mut f = json!({"name": n, "type": TYPES[t]});
                match TYPES[t] {
                    "select" => f["values"] = json!(["a", "b"]),
                    "relation" => f["collectionId"] = json!("t1"),
                    _ => {}
                }
                if nested {
                    f["options"] = Value::Object(opts);
                } else {
                    f.as_object_mut().unwrap().extend(opts);
                }
                f
            })
    }

    fn definition() -> impl Strategy<Value = Value> {
        (
            prop_oneof![3 => proptest::sample::select(vec!["t1", "t2", "t3"]), 1 => proptest::sample::select(NAMES.to_vec())],
            any::<bool>(),
            proptest::collection::vec(field(), 0..4),
            prop_oneof![2 => Just(vec![]), 1 => proptest::collection::vec(0..INDEXES.len(), 1..3)],
            prop_oneof![
                4 => Just(None),
                1 => proptest::sample::select(vec!["", "f > 1", "nope = 1", "((", "@request.auth.id != ''"]).prop_map(Some),
            ],
        )
            .prop_map(|(name, auth, fields, idx, rule)| {
                let indexes: Vec<String> = idx.iter().map(|i| INDEXES[*i].replace(" t ", &format!(" {name} "))).collect();
                json!({"name": name, "type": if auth { "auth" } else { "base" }, "fields": fields,
                       "indexes": indexes, "listRule": rule, "updateRule": rule})
            })
    }

    fn record() -> impl Strategy<Value = Value> {
        proptest::collection::vec((name(), option_value(), any::<bool>()), 0..6).prop_map(|kv| {
            let mut m = serde_json::Map::new();
            for (n, v, modifier) in kv {
                let key = if modifier { format!("{n}+") } else { n.to_string() };
                m.insert(key, v);
            }
            Value::Object(m)
        })
    }

    /// Runs `job` in a savepoint as the writer does, and fails on anything but success or a 4xx.
    fn job<T>(conn: &Connection, what: &Value, job: impl FnOnce() -> ApiResult<T>) -> Result<Option<T>, TestCaseError> {
        conn.execute_batch("SAVEPOINT job").unwrap();
        match job() {
            Ok(v) => {
                conn.execute_batch("RELEASE job").unwrap();
                Ok(Some(v))
            }
            Err(ApiError::Internal { context, source }) => Err(TestCaseError::fail(format!(
                "{what}: internal error {context}: {source}"
            ))),
            Err(_) => {
                conn.execute_batch("ROLLBACK TO job; RELEASE job").unwrap();
                Ok(None)
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn random_definitions_and_records_give_success_or_400(
            defs in proptest::collection::vec(definition(), 1..4),
            update in definition(),
            records in proptest::collection::vec(record(), 0..4),
        ) {
            let conn = Connection::open_in_memory().unwrap();
            bootstrap(&conn, DEFAULT_DB).unwrap();
            let mut created = Vec::new();
            for def in &defs {
                let mut errors = FieldErrors::new();
                let input = CollectionInput::parse(def, &mut errors);
                if errors.is_empty() {
                    if let Some(c) = job(&conn, def, || create(&conn, input))? {
                        created.push(c);
                    }
                }
            }
            for c in &created {
                let mut errors = FieldErrors::new();
                let mut body = update.clone();
                body["name"] = json!(c.name);
                let input = CollectionInput::parse(&body, &mut errors);
                if errors.is_empty() {
                    job(&conn, &body, || update_collection(&conn, &c.id, input))?;
                }
                let Some(live) = find_live(&conn, &c.id).unwrap() else { continue };
                for r in &records {
                    job(&conn, r, || {
                        let obj = r.as_object().unwrap();
                        let (changes, _) = values::prepare(&live, obj, None).map_err(ApiError::validation)?;
                        crate::records::store::insert(&conn, &live, None, changes)
                    })?;
                }
            }
            prop_assert!(load_schema(&conn).is_ok());
        }
    }

    use super::update as update_collection;
}
