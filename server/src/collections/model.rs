//! Collection and field definitions: their JSON form, validation of a definition, and the SQL
//! that a definition maps to. Knows nothing about HTTP.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{FieldErrors, field_error};
use crate::util::{is_identifier, quote_ident};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Text,
    Number,
    Bool,
    Email,
    Url,
    Editor,
    Date,
    Select,
    Json,
    File,
    Relation,
}

impl FieldType {
    fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(Value::String(s.to_string())).ok()
    }

    /// Whether the field holds several values (stored as a JSON array) given its `maxSelect`.
    pub fn is_multi(self, options: &FieldOptions) -> bool {
        matches!(self, FieldType::Select | FieldType::File | FieldType::Relation) && options.max_select.unwrap_or(1) > 1
    }
}

/// Type-specific settings. Accepted at the top level of a field (PocketBase) or inside
/// `options` (VSKI); returned at the top level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldOptions {
    /// text: minimum length; number: minimum value; date: earliest date.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<Value>,
    /// text: maximum length; number: maximum value; date: latest date.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<Value>,
    /// text: a regular expression the value must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// number: only integers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_int: Option<bool>,
    /// select: the allowed values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// select, file, relation: how many values the field holds (1 = a single value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_select: Option<u32>,
    /// json, editor: maximum size in bytes; file: maximum size of one file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    /// file: accepted MIME types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mime_types: Option<Vec<String>>,
    /// relation: the id of the target collection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collection_id: Option<String>,
    /// relation: delete this record when the target record is deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade_delete: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FieldType,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub unique: bool,
    #[serde(default)]
    pub hidden: bool,
    #[serde(default)]
    pub system: bool,
    #[serde(flatten)]
    pub options: FieldOptions,
    /// Soft-deleted: hidden from the API, the column stays. Stored, never returned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl Field {
    pub fn is_multi(&self) -> bool {
        self.kind.is_multi(&self.options)
    }

    /// The column definition used by CREATE TABLE and ALTER TABLE ADD COLUMN. Every column
    /// has a constant default so that ADD COLUMN works on tables with rows.
    pub fn column_sql(&self) -> String {
        let decl = match self.kind {
            FieldType::Number => "NUMERIC NOT NULL DEFAULT 0",
            FieldType::Bool => "INTEGER NOT NULL DEFAULT 0",
            FieldType::Json => "JSON DEFAULT NULL",
            _ if self.is_multi() => "JSON NOT NULL DEFAULT '[]'",
            _ => "TEXT NOT NULL DEFAULT ''",
        };
        format!("{} {decl}", quote_ident(&self.name))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectionType {
    Base,
    Auth,
}

/// A collection as stored in `_collections.definition` (plus its row's columns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Collection {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: CollectionType,
    pub system: bool,
    pub fields: Vec<Field>,
    pub indexes: Vec<String>,
    pub list_rule: Option<String>,
    pub view_rule: Option<String>,
    pub create_rule: Option<String>,
    pub update_rule: Option<String>,
    pub delete_rule: Option<String>,
    /// Webhooks: requests sent after a record of this collection is created, updated or deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
    pub created: String,
    pub updated: String,
}

/// A collection webhook (see `webhooks/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trigger {
    /// `create`, `update` or `delete`.
    pub action: String,
    pub url: String,
    #[serde(default = "Trigger::default_method")]
    pub method: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub headers: Map<String, Value>,
    /// Attempts after the first one before the delivery is given up.
    #[serde(default = "Trigger::default_retry_limit")]
    pub retry_limit: u32,
    #[serde(default = "Trigger::yes")]
    pub enabled: bool,
    /// When set, every delivery carries `X-Vski-Signature: sha256=HMAC(secret, body)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Triggers one collection may have.
pub const MAX_TRIGGERS: usize = 20;
/// The most retries a trigger may ask for.
pub const MAX_RETRY_LIMIT: u32 = 20;

impl Trigger {
    fn default_method() -> String {
        "POST".into()
    }

    fn default_retry_limit() -> u32 {
        5
    }

    fn yes() -> bool {
        true
    }

    /// Parses and checks one trigger of a collection definition.
    pub fn parse(v: &Value) -> Result<Trigger, String> {
        let mut t: Trigger = serde_json::from_value(v.clone()).map_err(|e| format!("Invalid trigger: {e}."))?;
        if !matches!(t.action.as_str(), "create" | "update" | "delete") {
            return Err("action must be \"create\", \"update\" or \"delete\".".into());
        }
        let url_ok =
            reqwest::Url::parse(&t.url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !url_ok {
            return Err("url must be an http:// or https:// URL.".into());
        }
        t.method = t.method.to_ascii_uppercase();
        if !matches!(t.method.as_str(), "POST" | "PUT" | "PATCH" | "GET" | "DELETE") {
            return Err("method must be POST, PUT, PATCH, GET or DELETE.".into());
        }
        let headers_ok = t.headers.iter().all(|(k, v)| {
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && v.as_str()
                    .is_some_and(|v| reqwest::header::HeaderValue::from_str(v).is_ok())
        });
        if !headers_ok {
            return Err("headers must map header names to string values.".into());
        }
        if t.retry_limit > MAX_RETRY_LIMIT {
            return Err(format!("retryLimit is at most {MAX_RETRY_LIMIT}."));
        }
        if t.secret.as_ref().is_some_and(|s| s.is_empty() || s.len() > 256) {
            return Err("secret is 1 to 256 characters.".into());
        }
        Ok(t)
    }
}

/// Most fields a collection may have over its life, soft-deleted ones included (their columns
/// stay in the table). SQLite allows 2,000 columns per table; this leaves room for the system
/// columns and keeps rows of a reasonable width.
pub const MAX_FIELDS: usize = 1000;
/// Most columns one index may list.
pub const MAX_INDEX_COLUMNS: usize = 32;

/// Whether SQLite reserves `name` for its own tables and indexes (`sqlite_*`, any case).
pub fn is_sqlite_reserved(name: &str) -> bool {
    name.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("sqlite_"))
}

/// Columns every collection table has.
pub const BASE_COLUMNS: [&str; 3] = ["id", "created", "updated"];
/// Columns auth collection tables add.
pub const AUTH_COLUMNS: [&str; 5] = ["email", "emailVisibility", "verified", "password", "tokenKey"];
/// Names a field may not take: columns of every table and keys of the record JSON.
const RESERVED: [&str; 8] = [
    "collectionId",
    "collectionName",
    "expand",
    "passwordConfirm",
    "oldPassword",
    "rowid",
    "oid",
    "_rowid_",
];

impl Collection {
    /// Fields visible through the API (not soft-deleted).
    pub fn live_fields(&self) -> impl Iterator<Item = &Field> {
        self.fields.iter().filter(|f| !f.deleted)
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.live_fields().find(|f| f.name == name)
    }

    pub fn is_auth(&self) -> bool {
        self.kind == CollectionType::Auth
    }

    /// Whether `name` is a column the records API can sort by.
    pub fn has_column(&self, name: &str) -> bool {
        BASE_COLUMNS.contains(&name)
            || (self.is_auth() && ["email", "emailVisibility", "verified"].contains(&name))
            || self.field(name).is_some()
    }

    /// The API representation: type-specific options at the top level of each field, soft-
    /// deleted fields left out, `schema` as an alias of `fields` for VSKI clients.
    pub fn to_json(&self) -> Value {
        // Serializing plain data structures cannot fail.
        let mut v = serde_json::to_value(self).expect("collection serializes");
        let fields = Value::Array(
            self.live_fields()
                .map(|f| serde_json::to_value(f).expect("field serializes"))
                .collect(),
        );
        v["fields"] = fields.clone();
        v["schema"] = fields;
        v
    }

    /// CREATE TABLE for this collection.
    pub fn create_table_sql(&self) -> String {
        let mut cols = vec![
            "\"id\" TEXT PRIMARY KEY NOT NULL".to_string(),
            "\"created\" TEXT NOT NULL DEFAULT ''".to_string(),
            "\"updated\" TEXT NOT NULL DEFAULT ''".to_string(),
        ];
        if self.is_auth() {
            cols.extend([
                "\"email\" TEXT NOT NULL DEFAULT ''".to_string(),
                "\"emailVisibility\" INTEGER NOT NULL DEFAULT 0".to_string(),
                "\"verified\" INTEGER NOT NULL DEFAULT 0".to_string(),
                "\"password\" TEXT NOT NULL DEFAULT ''".to_string(),
                "\"tokenKey\" TEXT NOT NULL DEFAULT ''".to_string(),
            ]);
        }
        cols.extend(self.fields.iter().map(Field::column_sql));
        format!("CREATE TABLE {} ({})", quote_ident(&self.name), cols.join(", "))
    }

    /// Indexes vski maintains itself: unique fields, and email/tokenKey of auth collections.
    pub fn system_indexes(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        // The default list order (`created, id`) walks this index instead of sorting.
        let order = format!("_order_{}", self.name);
        let sql = format!(
            "CREATE INDEX {} ON {} (\"created\", \"id\")",
            quote_ident(&order),
            quote_ident(&self.name)
        );
        out.push((order, sql));

        let mut unique_on = |col: &str| {
            let name = format!("_unique_{}_{}", self.name, col);
            let sql = format!(
                "CREATE UNIQUE INDEX {} ON {} ({c}) WHERE {c} != ''",
                quote_ident(&name),
                quote_ident(&self.name),
                c = quote_ident(col)
            );
            out.push((name, sql));
        };
        if self.is_auth() {
            unique_on("email");
            unique_on("tokenKey");
        }
        for f in self.fields.iter().filter(|f| f.unique && !f.deleted) {
            unique_on(&f.name);
        }
        out
    }
}

/// A collection definition as submitted (create or update), before it is merged and checked.
#[derive(Debug, Default)]
pub struct CollectionInput {
    pub name: Option<String>,
    pub kind: Option<CollectionType>,
    pub fields: Option<Vec<FieldInput>>,
    pub indexes: Option<Vec<String>>,
    /// `Some(None)` = set to null (admins only); `None` = not given.
    pub rules: [Option<Option<String>>; 5],
    pub triggers: Option<Vec<Trigger>>,
}

/// The options a field may carry, at the top level (PocketBase) or under `options` (VSKI).
pub const OPTION_KEYS: [&str; 10] = [
    "min",
    "max",
    "pattern",
    "onlyInt",
    "values",
    "maxSelect",
    "maxSize",
    "mimeTypes",
    "collectionId",
    "cascadeDelete",
];

pub const RULE_KEYS: [&str; 5] = ["listRule", "viewRule", "createRule", "updateRule", "deleteRule"];

#[derive(Debug, Clone)]
pub struct FieldInput {
    pub id: Option<String>,
    pub name: String,
    pub kind: FieldType,
    pub required: bool,
    pub unique: bool,
    pub hidden: bool,
    pub system: bool,
    pub options: FieldOptions,
}

impl CollectionInput {
    /// Parses a request body. Problems are reported per key in `errors`.
    pub fn parse(body: &Value, errors: &mut FieldErrors) -> Self {
        let mut input = CollectionInput::default();
        let Some(obj) = body.as_object() else {
            field_error(errors, "body", "validation_invalid", "Expected a JSON object.");
            return input;
        };
        match obj.get("name") {
            None => {}
            Some(Value::String(s)) => input.name = Some(s.clone()),
            Some(_) => field_error(errors, "name", "validation_invalid", "Must be a string."),
        }
        match obj.get("type") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "base" => input.kind = Some(CollectionType::Base),
            Some(Value::String(s)) if s == "auth" => input.kind = Some(CollectionType::Auth),
            Some(_) => field_error(errors, "type", "validation_invalid", "Must be \"base\" or \"auth\"."),
        }
        if let Some(list) = obj.get("fields").or_else(|| obj.get("schema")) {
            match list.as_array() {
                Some(items) => {
                    let mut fields = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        match parse_field(item) {
                            Ok(f) => fields.push(f),
                            Err(msg) => field_error(errors, &format!("fields.{i}"), "validation_invalid", msg),
                        }
                    }
                    input.fields = Some(fields);
                }
                None => field_error(errors, "fields", "validation_invalid", "Must be an array of fields."),
            }
        }
        if let Some(list) = obj.get("indexes") {
            match list.as_array().and_then(|a| {
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            }) {
                Some(v) => input.indexes = Some(v),
                None => field_error(errors, "indexes", "validation_invalid", "Must be an array of strings."),
            }
        }
        match obj.get("triggers") {
            None => {}
            Some(Value::Null) => input.triggers = Some(Vec::new()),
            Some(Value::Array(items)) if items.len() <= MAX_TRIGGERS => {
                let mut triggers = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match Trigger::parse(item) {
                        Ok(t) => triggers.push(t),
                        Err(msg) => field_error(errors, &format!("triggers.{i}"), "validation_invalid", msg),
                    }
                }
                input.triggers = Some(triggers);
            }
            Some(_) => field_error(
                errors,
                "triggers",
                "validation_invalid",
                format!("Must be an array of at most {MAX_TRIGGERS} triggers."),
            ),
        }
        for (i, key) in RULE_KEYS.iter().enumerate() {
            match obj.get(*key) {
                None => {}
                Some(Value::Null) => input.rules[i] = Some(None),
                Some(Value::String(s)) => input.rules[i] = Some(Some(s.clone())),
                Some(_) => field_error(errors, key, "validation_invalid", "Must be a string or null."),
            }
        }
        input
    }
}

fn parse_field(v: &Value) -> Result<FieldInput, String> {
    let obj = v.as_object().ok_or("Each field must be an object.")?;
    // Merge `options` (VSKI) under the top-level keys (PocketBase); top level wins.
    let mut merged: Map<String, Value> = match obj.get("options") {
        Some(Value::Object(o)) => o.clone(),
        Some(Value::Null) | None => Map::new(),
        Some(_) => return Err("options must be an object.".into()),
    };
    for (k, val) in obj {
        if k != "options" {
            merged.insert(k.clone(), val.clone());
        }
    }
    let name = merged
        .get("name")
        .and_then(Value::as_str)
        .ok_or("Each field needs a name.")?
        .to_string();
    let kind_str = merged
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("Field '{name}' needs a type."))?;
    let kind = FieldType::parse(kind_str).ok_or_else(|| format!("Field '{name}' has an unknown type '{kind_str}'."))?;
    let flag = |k: &str| -> Result<bool, String> {
        match merged.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("Field '{name}': {k} must be a boolean.")),
        }
    };
    let (required, unique, hidden, system) = (flag("required")?, flag("unique")?, flag("hidden")?, flag("system")?);
    // Drop nulls so that `"max": null` means "not set".
    let opts: Map<String, Value> = merged
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let options: FieldOptions =
        serde_json::from_value(Value::Object(opts)).map_err(|e| format!("Field '{name}' has invalid options: {e}"))?;
    let id = merged
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    Ok(FieldInput {
        id,
        name,
        kind,
        required,
        unique,
        hidden,
        system,
        options,
    })
}

/// Whether a field may be called `name` in a collection of type `kind`. SQLite column names
/// are case-insensitive, so the comparison is too.
pub fn check_field_name(name: &str, kind: CollectionType) -> Result<(), String> {
    if !is_identifier(name) || name.starts_with('_') {
        return Err(format!(
            "'{name}' is not a valid field name: use letters, digits and _, starting with a letter."
        ));
    }
    let taken = BASE_COLUMNS
        .iter()
        .chain(RESERVED.iter())
        .chain(if kind == CollectionType::Auth {
            AUTH_COLUMNS.iter()
        } else {
            [].iter()
        });
    for t in taken {
        if t.eq_ignore_ascii_case(name) {
            return Err(format!("'{name}' is a reserved field name."));
        }
    }
    Ok(())
}

/// Checks the type-specific options of a field; returns the problem if any.
pub fn check_field_options(f: &FieldInput) -> Result<(), String> {
    let o = &f.options;
    let n = &f.name;
    let is_num = |v: &Option<Value>| v.as_ref().is_none_or(Value::is_number);
    match f.kind {
        FieldType::Text | FieldType::Number if !is_num(&o.min) || !is_num(&o.max) => {
            return Err(format!("Field '{n}': min and max must be numbers."));
        }
        FieldType::Date => {
            for v in [&o.min, &o.max].into_iter().flatten() {
                if v.as_str().and_then(crate::records::values::parse_date).is_none() && v.as_str() != Some("") {
                    return Err(format!("Field '{n}': min and max must be dates."));
                }
            }
        }
        _ => {}
    }
    if let Some(p) = &o.pattern {
        if f.kind != FieldType::Text {
            return Err(format!("Field '{n}': pattern applies to text fields only."));
        }
        if p.len() > 1000 || regex::Regex::new(p).is_err() {
            return Err(format!("Field '{n}': pattern is not a valid regular expression."));
        }
    }
    if f.kind == FieldType::Select {
        let values = o.values.as_deref().unwrap_or_default();
        if values.is_empty() {
            return Err(format!("Field '{n}': a select field needs a non-empty values list."));
        }
        if values.iter().any(String::is_empty) {
            return Err(format!("Field '{n}': select values cannot be empty strings."));
        }
    }
    if f.kind == FieldType::Relation && o.collection_id.as_deref().unwrap_or("").is_empty() {
        return Err(format!("Field '{n}': a relation field needs collectionId."));
    }
    if o.max_select == Some(0) {
        return Err(format!("Field '{n}': maxSelect must be at least 1."));
    }
    if f.unique && (f.kind == FieldType::Json || f.is_multi()) {
        return Err(format!("Field '{n}': json and multi-value fields cannot be unique."));
    }
    Ok(())
}

impl FieldInput {
    pub fn is_multi(&self) -> bool {
        self.kind.is_multi(&self.options)
    }

    pub fn into_field(self, id: String) -> Field {
        Field {
            id,
            name: self.name,
            kind: self.kind,
            required: self.required,
            unique: self.unique,
            hidden: self.hidden,
            system: false,
            options: self.options,
            deleted: false,
        }
    }
}

/// A parsed `CREATE [UNIQUE] INDEX name ON table (col [ASC|DESC], …)` statement.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexDef {
    pub name: String,
    pub unique: bool,
    pub columns: Vec<(String, bool)>,
}

impl IndexDef {
    /// Parses the restricted index syntax vski accepts. `WHERE` clauses and expressions are
    /// refused: the statement is rebuilt from identifiers only, never passed through.
    pub fn parse(sql: &str) -> Result<IndexDef, String> {
        let tokens = tokenize(sql)?;
        let mut it = tokens.iter().peekable();
        let kw = |s: Option<&String>| s.map(|x| x.to_ascii_uppercase()).unwrap_or_default();
        if kw(it.next()) != "CREATE" {
            return Err("An index must start with CREATE INDEX.".into());
        }
        let mut unique = false;
        let mut next = kw(it.next());
        if next == "UNIQUE" {
            unique = true;
            next = kw(it.next());
        }
        if next != "INDEX" {
            return Err("Expected INDEX.".into());
        }
        let mut name = it.next().cloned().ok_or("Expected an index name.")?;
        if name.eq_ignore_ascii_case("IF") {
            if kw(it.next()) != "NOT" || kw(it.next()) != "EXISTS" {
                return Err("Expected IF NOT EXISTS.".into());
            }
            name = it.next().cloned().ok_or("Expected an index name.")?;
        }
        let name = unquote(&name);
        if !is_identifier(&name) || name.starts_with('_') || is_sqlite_reserved(&name) {
            return Err(format!("'{name}' is not a valid index name."));
        }
        if kw(it.next()) != "ON" {
            return Err("Expected ON.".into());
        }
        let _table = it.next().ok_or("Expected a table name.")?;
        if it.next().map(String::as_str) != Some("(") {
            return Err("Expected ( after the table name.".into());
        }
        let mut columns = Vec::new();
        loop {
            let col = unquote(it.next().ok_or("Unclosed column list.")?);
            if !is_identifier(&col) {
                return Err(format!("'{col}' is not a column name."));
            }
            let mut desc = false;
            let mut tok = it.next().ok_or("Unclosed column list.")?;
            match tok.to_ascii_uppercase().as_str() {
                "ASC" => tok = it.next().ok_or("Unclosed column list.")?,
                "DESC" => {
                    desc = true;
                    tok = it.next().ok_or("Unclosed column list.")?;
                }
                _ => {}
            }
            columns.push((col, desc));
            if columns.len() > MAX_INDEX_COLUMNS {
                return Err(format!("An index may list at most {MAX_INDEX_COLUMNS} columns."));
            }
            match tok.as_str() {
                "," => continue,
                ")" => break,
                other => return Err(format!("Unexpected '{other}' in the column list.")),
            }
        }
        if let Some(extra) = it.next() {
            return Err(format!(
                "Unsupported '{extra}' after the column list (WHERE and expressions are not allowed)."
            ));
        }
        Ok(IndexDef { name, unique, columns })
    }

    /// The canonical SQL for this index on `table`.
    pub fn to_sql(&self, table: &str) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|(c, desc)| format!("{}{}", quote_ident(c), if *desc { " DESC" } else { "" }))
            .collect();
        format!(
            "CREATE {}INDEX {} ON {} ({})",
            if self.unique { "UNIQUE " } else { "" },
            quote_ident(&self.name),
            quote_ident(table),
            cols.join(", ")
        )
    }
}

fn unquote(s: &str) -> String {
    let b = s.as_bytes();
    if b.len() >= 2 && matches!((b[0], b[b.len() - 1]), (b'"', b'"') | (b'`', b'`') | (b'[', b']')) {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

fn tokenize(sql: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = sql.trim().trim_end_matches(';').chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '(' || c == ')' || c == ',' {
            out.push(c.to_string());
            chars.next();
        } else if c == '"' || c == '`' || c == '[' {
            let close = if c == '[' { ']' } else { c };
            let mut tok = String::from(c);
            chars.next();
            loop {
                match chars.next() {
                    Some(x) if x == close => {
                        tok.push(x);
                        break;
                    }
                    Some(x) => tok.push(x),
                    None => return Err("Unclosed quoted name.".into()),
                }
            }
            out.push(tok);
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let mut tok = String::new();
            while let Some(&x) = chars.peek() {
                if x.is_ascii_alphanumeric() || x == '_' {
                    tok.push(x);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(tok);
        } else {
            return Err(format!("Unexpected character '{c}' in index definition."));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pocketbase_index_syntax() {
        let d = IndexDef::parse("CREATE UNIQUE INDEX `idx_slug` ON `posts` (`slug`, created DESC)").unwrap();
        assert_eq!(
            d,
            IndexDef {
                name: "idx_slug".into(),
                unique: true,
                columns: vec![("slug".into(), false), ("created".into(), true)]
            }
        );
        assert_eq!(
            d.to_sql("posts"),
            "CREATE UNIQUE INDEX \"idx_slug\" ON \"posts\" (\"slug\", \"created\" DESC)"
        );
        assert!(IndexDef::parse("CREATE INDEX IF NOT EXISTS i ON t (a)").is_ok());
    }

    #[test]
    fn refuses_anything_but_plain_columns() {
        for bad in [
            "CREATE INDEX i ON t (a) WHERE 1",
            "CREATE INDEX i ON t (lower(a))",
            "CREATE INDEX i ON t (a); DROP TABLE t",
            "DROP TABLE t",
            "CREATE INDEX i ON t (a",
            "CREATE INDEX _i ON t (a)",
        ] {
            assert!(IndexDef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_names() {
        assert!(check_field_name("title", CollectionType::Base).is_ok());
        assert!(check_field_name("email", CollectionType::Base).is_ok());
        for bad in ["ID", "Created", "x; DROP TABLE posts", "_hidden", "expand"] {
            assert!(check_field_name(bad, CollectionType::Base).is_err(), "{bad}");
        }
        assert!(check_field_name("Email", CollectionType::Auth).is_err());
    }

    #[test]
    fn options_inside_or_at_top_level() {
        let a =
            parse_field(&serde_json::json!({"name": "s", "type": "select", "values": ["a"], "maxSelect": 2})).unwrap();
        let b = parse_field(
            &serde_json::json!({"name": "s", "type": "select", "options": {"values": ["a"], "maxSelect": 2}}),
        )
        .unwrap();
        assert_eq!(a.options, b.options);
        assert!(a.is_multi());
    }
}
