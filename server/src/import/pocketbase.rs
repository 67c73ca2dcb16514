//! `vski import-pocketbase`: copies a PocketBase app into a vski database over both servers'
//! HTTP APIs, signed in as a superuser on each: collections (fields, rules, indexes), records
//! with their ids, files, and the users of auth collections.
//!
//! The order follows the references. Collections are created without their relation fields;
//! relation fields, rules and indexes are added once every collection exists (a rule may follow
//! a relation, a relation may point at a collection created later, or at its own). Records are
//! created without their relations, which are set once every record exists, and relation
//! fields get their `required` last. What cannot be carried over is said, never guessed:
//! a rule vski cannot read becomes `null` (admins only, the safe side), and a password never
//! leaves PocketBase through its API, so imported users get a random one.

use std::collections::HashMap;

use reqwest::multipart::{Form, Part};
use serde_json::{Map, Value, json};

/// Where to read and where to write (the command line of `vski import-pocketbase`).
#[derive(Debug, clap::Args)]
pub struct Options {
    /// PocketBase's base URL, e.g. http://127.0.0.1:8090.
    #[arg(long)]
    pub from: String,
    /// A PocketBase superuser's email.
    #[arg(long, env = "POCKETBASE_EMAIL")]
    pub from_email: String,
    /// That superuser's password.
    #[arg(long, env = "POCKETBASE_PASSWORD", hide_env_values = true)]
    pub from_password: String,
    /// vski's base URL, e.g. http://127.0.0.1:3000.
    #[arg(long)]
    pub to: String,
    /// A vski admin's email.
    #[arg(long, env = "VSKI_ADMIN_EMAIL")]
    pub to_email: String,
    /// That admin's password.
    #[arg(long, env = "VSKI_ADMIN_PASSWORD", hide_env_values = true)]
    pub to_password: String,
    /// The vski database to import into (created when missing).
    #[arg(long, default_value = "default")]
    pub db: String,
}

/// What the import did, and what it could not do.
#[derive(Debug, Default)]
pub struct Report {
    pub collections: Vec<String>,
    pub records: usize,
    pub files: usize,
    pub users: usize,
    /// `collection.rule: text`, set to null because vski could not read it.
    pub dropped_rules: Vec<String>,
    /// Collections or fields left out, with why.
    pub skipped: Vec<String>,
}

/// Records fetched per request.
const PAGE: usize = 500;

/// One server's API, signed in as a superuser.
struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    /// `?db=` for vski; empty for PocketBase.
    db: String,
}

impl Api {
    async fn sign_in(base: &str, email: &str, password: &str, db: &str, who: &str) -> Result<Api, String> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| e.to_string())?;
        let base = base.trim_end_matches('/').to_string();
        let resp = http
            .post(format!("{base}/api/collections/_superusers/auth-with-password"))
            .json(&json!({"identity": email, "password": password}))
            .send()
            .await
            .map_err(|e| format!("{who} at {base}: {e}"))?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let token = body["token"].as_str().filter(|_| status == 200).ok_or_else(|| {
            format!(
                "{who} at {base} refused the superuser sign-in of {email} ({status}: {})",
                body["message"].as_str().unwrap_or("no message")
            )
        })?;
        Ok(Api {
            base,
            token: token.to_string(),
            http,
            db: db.to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        if self.db.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}{sep}db={}", self.base, self.db)
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<(u16, Value), String> {
        let resp = rb
            .header("Authorization", &self.token)
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.base))?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value), String> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), String> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    async fn patch(&self, path: &str, body: &Value) -> Result<(u16, Value), String> {
        self.send(self.http.patch(self.url(path)).json(body)).await
    }
}

/// A 2xx, or an error naming `what` and the server's message and field errors.
fn ok(what: &str, (status, body): (u16, Value)) -> Result<Value, String> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    Err(format!(
        "{what}: {status} {} {}",
        body["message"].as_str().unwrap_or(""),
        body.get("data").map(Value::to_string).unwrap_or_default()
    ))
}

/// The fields vski keeps for every record (or auth record) itself.
fn is_builtin(name: &str, auth: bool) -> bool {
    ["id", "created", "updated"].contains(&name)
        || (auth && ["password", "tokenKey", "email", "emailVisibility", "verified"].contains(&name))
}

/// A PocketBase field as vski takes it, or why it is left out. Relation targets are named by
/// collection name, which vski accepts in place of the id.
fn field(f: &Value, auth: bool, names: &HashMap<String, String>) -> Result<Option<Value>, String> {
    let name = f["name"].as_str().unwrap_or_default();
    if is_builtin(name, auth) {
        return Ok(None);
    }
    let kind = match f["type"].as_str().unwrap_or_default() {
        "autodate" => "date",
        "geoPoint" => "json",
        "password" => {
            return Err(format!(
                "field '{name}': a password field other than an auth collection's"
            ));
        }
        k => k,
    };
    let mut out = Map::new();
    out.insert("name".into(), json!(name));
    out.insert("type".into(), json!(kind));
    let carried = crate::collections::model::OPTION_KEYS
        .iter()
        .filter(|k| **k != "collectionId")
        .chain(&["required", "hidden"]);
    for &key in carried {
        // PocketBase writes "" and 0 for options it leaves unset.
        match f.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) && key != "min" => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(v) => {
                out.insert(key.into(), v.clone());
            }
        }
    }
    if kind == "relation" {
        let target = f["collectionId"].as_str().unwrap_or_default();
        let target = names
            .get(target)
            .ok_or_else(|| format!("field '{name}': its collection {target} is not imported"))?;
        out.insert("collectionId".into(), json!(target));
    }
    if kind == "date" && f["type"] == "autodate" {
        out.remove("required");
    }
    Ok(Some(Value::Object(out)))
}

/// Copies the app. Fails before changing anything when the target database already holds a
/// collection of the same name (other than the default `users`, which gets PocketBase's
/// fields and rules).
pub async fn run(o: &Options) -> Result<Report, String> {
    let pb = Api::sign_in(&o.from, &o.from_email, &o.from_password, "", "PocketBase").await?;
    let vski = Api::sign_in(&o.to, &o.to_email, &o.to_password, &o.db, "vski").await?;
    let mut report = Report::default();
    // The target database, created when missing.
    if o.db != crate::db::DEFAULT_DB {
        let (s, _) = vski.get("/api/collections").await?;
        if s == 404 {
            ok(
                "creating the database",
                vski.post("/api/databases", &json!({"name": o.db})).await?,
            )?;
        }
    }
    let listed = ok(
        "PocketBase's collections",
        pb.get("/api/collections?perPage=500").await?,
    )?;
    let mut collections: Vec<Value> = Vec::new();
    for c in listed["items"].as_array().cloned().unwrap_or_default() {
        let name = c["name"].as_str().unwrap_or_default();
        match c["type"].as_str() {
            _ if name.starts_with('_') => {}
            Some("base" | "auth") => collections.push(c),
            Some(kind) => report
                .skipped
                .push(format!("collection '{name}': vski has no {kind} collections")),
            None => {}
        }
    }
    let names: HashMap<String, String> = collections
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_string(),
                c["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let existing = ok("vski's collections", vski.get("/api/collections?perPage=500").await?)?;
    let existing: HashMap<String, Value> = existing["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["name"].as_str()?.to_string(), c.clone())))
        .collect();
    for c in &collections {
        let name = c["name"].as_str().unwrap_or_default();
        if existing.contains_key(name) && name != crate::collections::store::USERS {
            return Err(format!(
                "collection '{name}' already exists in vski's database '{}': import into an empty database (--db NEW)",
                o.db
            ));
        }
    }
    // 1. Collections, without relations, rules or indexes.
    // Per collection, its relation fields: (as first added, not required; as in PocketBase).
    let mut relations: HashMap<String, Vec<(Value, Value)>> = HashMap::new();
    // Per collection, the values its records carry over: the fields imported (by PocketBase
    // type), the id, and an auth record's email, visibility and verification.
    let mut kinds: HashMap<String, HashMap<String, String>> = HashMap::new();
    for c in &collections {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        let auth = c["type"] == "auth";
        let mut plain = Vec::new();
        let carried = kinds.entry(name.clone()).or_default();
        let mut own = vec!["id"];
        if auth {
            own.extend(["email", "emailVisibility", "verified"]);
        }
        for k in own {
            carried.insert(k.to_string(), "builtin".to_string());
        }
        for f in c["fields"].as_array().into_iter().flatten() {
            let mapped = field(f, auth, &names);
            if let Ok(Some(_)) = &mapped {
                carried.insert(
                    f["name"].as_str().unwrap_or_default().to_string(),
                    f["type"].as_str().unwrap_or_default().to_string(),
                );
            }
            match mapped {
                Ok(Some(v)) if v["type"] == "relation" => {
                    let mut loose = v.clone();
                    loose["required"] = json!(false);
                    relations.entry(name.clone()).or_default().push((loose, v));
                }
                Ok(Some(v)) => plain.push(v),
                Ok(None) => {}
                Err(e) => report.skipped.push(format!("collection '{name}', {e}")),
            }
        }
        match existing.get(&name) {
            // The default users: its fields, then PocketBase's others.
            Some(current) => {
                let mut fields: Vec<Value> = current["fields"].as_array().cloned().unwrap_or_default();
                let have: Vec<String> = fields
                    .iter()
                    .filter_map(|f| f["name"].as_str().map(str::to_string))
                    .collect();
                fields.extend(
                    plain
                        .into_iter()
                        .filter(|f| !have.iter().any(|h| f["name"] == json!(h))),
                );
                ok(
                    &format!("updating '{name}'"),
                    vski.patch(&format!("/api/collections/{name}"), &json!({"fields": fields}))
                        .await?,
                )?;
            }
            None => {
                ok(
                    &format!("creating '{name}'"),
                    vski.post(
                        "/api/collections",
                        &json!({"name": name, "type": c["type"], "fields": plain,
                                "listRule": null, "viewRule": null, "createRule": null, "updateRule": null, "deleteRule": null}),
                    )
                    .await?,
                )?;
            }
        }
        report.collections.push(name);
    }
    // 2. Relation fields (not required yet), rules, indexes.
    for c in &collections {
        let name = c["name"].as_str().unwrap_or_default();
        let current = ok("reading back", vski.get(&format!("/api/collections/{name}")).await?)?;
        let mut fields = current["fields"].as_array().cloned().unwrap_or_default();
        fields.extend(
            relations
                .get(name)
                .into_iter()
                .flatten()
                .map(|(loose, _)| loose.clone()),
        );
        ok(
            &format!("relation fields of '{name}'"),
            vski.patch(&format!("/api/collections/{name}"), &json!({"fields": fields}))
                .await?,
        )?;
        for key in crate::collections::model::RULE_KEYS {
            let rule = c[key].clone();
            let (status, body) = vski
                .patch(&format!("/api/collections/{name}"), &json!({key: rule}))
                .await?;
            if status == 400 {
                report.dropped_rules.push(format!(
                    "{name}.{key}: {} ({})",
                    rule.as_str().unwrap_or(""),
                    body["data"][key]["message"].as_str().unwrap_or("refused")
                ));
                ok(
                    &format!("{name}.{key} = null"),
                    vski.patch(&format!("/api/collections/{name}"), &json!({key: null}))
                        .await?,
                )?;
            } else {
                ok(&format!("{name}.{key}"), (status, body))?;
            }
        }
        // An auth collection's own indexes (email, tokenKey) vski makes itself.
        let auth = c["type"] == "auth";
        let indexes: Vec<Value> = c["indexes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| {
                let sql = i.as_str().unwrap_or_default();
                !(auth && (sql.contains("`tokenKey`") || sql.contains("`email`")))
            })
            .cloned()
            .collect();
        // One at a time, so that one vski refuses leaves out only itself.
        let mut accepted: Vec<Value> = current["indexes"].as_array().cloned().unwrap_or_default();
        for index in indexes {
            let mut with = accepted.clone();
            with.push(index.clone());
            let (status, body) = vski
                .patch(&format!("/api/collections/{name}"), &json!({"indexes": with}))
                .await?;
            if status == 200 {
                accepted.push(index);
            } else {
                report.skipped.push(format!(
                    "index of '{name}': {} ({})",
                    index.as_str().unwrap_or(""),
                    body["message"].as_str().unwrap_or("refused")
                ));
            }
        }
    }
    // 3. Records (their files too), without relations; 4. the relations.
    let file_token = ok("a file token", pb.post("/api/files/token", &json!({})).await?)?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut links: Vec<(String, String, Map<String, Value>)> = Vec::new();
    for c in &collections {
        let name = c["name"].as_str().unwrap_or_default();
        let auth = c["type"] == "auth";
        let carried = &kinds[name];
        let mut page = 1;
        loop {
            let got = ok(
                &format!("records of '{name}'"),
                pb.get(&format!(
                    "/api/collections/{name}/records?page={page}&perPage={PAGE}&sort=id&skipTotal=1"
                ))
                .await?,
            )?;
            let items = got["items"].as_array().cloned().unwrap_or_default();
            for r in &items {
                let id = r["id"].as_str().unwrap_or_default().to_string();
                let mut body = Map::new();
                let mut rels = Map::new();
                let mut files: Vec<(String, String)> = Vec::new();
                for (k, v) in r.as_object().into_iter().flatten() {
                    match carried.get(k).map(String::as_str) {
                        None => {}
                        Some("relation") => {
                            rels.insert(k.clone(), v.clone());
                        }
                        Some("file") => {
                            let names: Vec<String> = match v {
                                Value::String(s) if !s.is_empty() => vec![s.clone()],
                                Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
                                _ => vec![],
                            };
                            files.extend(names.into_iter().map(|n| (k.clone(), n)));
                        }
                        Some(_) => {
                            body.insert(k.clone(), v.clone());
                        }
                    }
                }
                if auth {
                    let password = crate::util::random_id(24);
                    body.insert("password".into(), json!(password));
                    body.insert("passwordConfirm".into(), json!(password));
                    report.users += 1;
                }
                let mut form = Form::new().text("@jsonPayload", Value::Object(body).to_string());
                for (field, filename) in &files {
                    let resp = pb
                        .http
                        .get(format!(
                            "{}/api/files/{name}/{id}/{filename}?token={file_token}",
                            pb.base
                        ))
                        .send()
                        .await
                        .map_err(|e| format!("file {filename}: {e}"))?;
                    if !resp.status().is_success() {
                        return Err(format!("file {filename} of {name}/{id}: {}", resp.status()));
                    }
                    let bytes = resp.bytes().await.map_err(|e| format!("file {filename}: {e}"))?;
                    form = form.part(field.clone(), Part::bytes(bytes.to_vec()).file_name(filename.clone()));
                    report.files += 1;
                }
                let answer = vski
                    .send(
                        vski.http
                            .post(vski.url(&format!("/api/collections/{name}/records")))
                            .multipart(form),
                    )
                    .await?;
                ok(&format!("record {name}/{id}"), answer)?;
                report.records += 1;
                if rels.values().any(|v| !(v.is_null() || v == "" || v == &json!([]))) {
                    links.push((name.to_string(), id, rels));
                }
            }
            if items.len() < PAGE {
                break;
            }
            page += 1;
        }
    }
    for (name, id, rels) in &links {
        ok(
            &format!("relations of {name}/{id}"),
            vski.patch(
                &format!("/api/collections/{name}/records/{id}"),
                &Value::Object(rels.clone()),
            )
            .await?,
        )?;
    }
    // 5. Relation fields as required as they were.
    for c in &collections {
        let name = c["name"].as_str().unwrap_or_default();
        let Some(rels) = relations
            .get(name)
            .filter(|r| r.iter().any(|(_, strict)| strict["required"] == true))
        else {
            continue;
        };
        let current = ok("reading back", vski.get(&format!("/api/collections/{name}")).await?)?;
        let fields: Vec<Value> = current["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                let mut f = f.clone();
                if rels
                    .iter()
                    .any(|(_, strict)| strict["name"] == f["name"] && strict["required"] == true)
                {
                    f["required"] = json!(true);
                }
                f
            })
            .collect();
        ok(
            &format!("required relations of '{name}'"),
            vski.patch(&format!("/api/collections/{name}"), &json!({"fields": fields}))
                .await?,
        )?;
    }
    Ok(report)
}
