//! Sign-in endpoints: admins (`/api/admins/*`, `_superusers`), auth collections
//! (`auth-with-password`, `auth-refresh`) and the `/api/auth/*` aliases on `users`.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Map, Value, json};

use super::Identity;
use super::password;
use super::token::{TokenKeys, TokenType, token_key_fingerprint};
use crate::collections::model::Collection;
use crate::collections::store::{SUPERUSERS, USERS};
use crate::db::{DEFAULT_DB, Database};
use crate::error::{ApiError, ApiResult, FieldErrors, field_error};
use crate::http::resource;
use crate::records::handlers::{create_record, public_record};
use crate::records::store::{self as record_store, Stored};
use crate::records::values::Changes;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/admins/has-admins").route(web::get().to(has_admins)))
        .service(resource("/api/admins/init").route(web::post().to(init_admin)))
        .service(resource("/api/admins/auth-with-password").route(web::post().to(admin_login)))
        .service(resource("/api/admins/me").route(web::get().to(admin_me)))
        .service(resource("/api/collections/{c}/auth-with-password").route(web::post().to(auth_with_password)))
        .service(resource("/api/collections/{c}/auth-refresh").route(web::post().to(auth_refresh)))
        .service(resource("/api/auth/login").route(web::post().to(login_alias)))
        .service(resource("/api/auth/register").route(web::post().to(register_alias)))
        .service(resource("/api/auth/me").route(web::get().to(me_alias)));
}

/// The admin JSON: never the password hash or token key.
fn admin_json(a: &Stored) -> Value {
    let mut m = Map::new();
    for k in ["id", "email", "created", "updated"] {
        m.insert(k.into(), a.data.get(k).cloned().unwrap_or(Value::Null));
    }
    Value::Object(m)
}

/// An admin as PocketBase's `_superusers` routes answer it: a record of that collection, which
/// PocketBase's SDK recognises (with an `auth` token) as a superuser's session.
fn superuser_json(c: &Collection, a: &Stored) -> Value {
    let mut v = admin_json(a);
    if let Some(m) = v.as_object_mut() {
        m.insert("collectionId".into(), json!(c.id));
        m.insert("collectionName".into(), json!(SUPERUSERS));
    }
    v
}

/// Mints a token for `rec` of `c`. An `auth` token of `_superusers` is PocketBase's superuser
/// token: an admin's (see `auth::identify_token`), with an admin's lifetime.
fn mint_for(state: &AppState, kind: TokenType, db: &str, c: &Collection, rec: &Stored) -> ApiResult<String> {
    let ttl = if kind == TokenType::Admin || c.name == SUPERUSERS {
        state.settings.admin_token_ttl
    } else {
        state.settings.auth_token_ttl
    };
    let mut claims = TokenKeys::claims(kind, rec.id(), ttl);
    claims.tk = rec.token_key.as_deref().map(token_key_fingerprint);
    if kind == TokenType::Auth {
        claims.collection_id = Some(c.id.clone());
        claims.db = Some(db.to_string());
    }
    state.tokens.mint(&claims)
}

fn default_db(state: &AppState) -> ApiResult<Arc<Database>> {
    state
        .dbs
        .get(DEFAULT_DB)
        .ok_or_else(|| ApiError::internal("admins", "default database missing"))
}

async fn has_admins(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(json!({"hasAdmins": state.has_admins().await?})))
}

/// Reads `keys` as strings from a JSON body; missing or non-string values are field errors.
fn strings<const N: usize>(body: &Value, keys: [&str; N]) -> ApiResult<[String; N]> {
    let mut errors = FieldErrors::new();
    let out = keys.map(|k| match body.get(k) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            field_error(&mut errors, k, "validation_required", "Missing required value.");
            String::new()
        }
    });
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::validation(errors))
    }
}

/// A 400 naming what is wrong with an admin's email or password, if anything.
pub fn check_admin_input(email: &str, password: &str) -> ApiResult<()> {
    let mut errors = FieldErrors::new();
    if !crate::records::values::parse_email(email) {
        field_error(
            &mut errors,
            "email",
            "validation_invalid_email",
            "Must be a valid email address.",
        );
    }
    if let Err(msg) = password::check_strength(password) {
        field_error(&mut errors, "password", "validation_length_out_of_range", msg);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::validation(errors))
    }
}

/// Creates or updates the admin `email` with `password`. Used by `vski admin create` and by
/// `/api/admins/init` (with `only_first`, which refuses when an admin exists).
pub async fn upsert_admin(
    db: &Database,
    c: Arc<Collection>,
    email: String,
    password: String,
    only_first: bool,
) -> ApiResult<Stored> {
    check_admin_input(&email, &password)?;
    let hash = password::hash_async(password).await?;
    db.write(move |conn| {
        use rusqlite::types::Value as Sql;
        let count: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM {}", crate::util::quote_ident(&c.name)),
            [],
            |r| r.get(0),
        )?;
        if only_first && count > 0 {
            return Err(ApiError::bad_request("An admin already exists."));
        }
        let key = Sql::Text(crate::util::random_id(50));
        match record_store::find_auth(conn, &c, &email)? {
            Some(existing) => {
                let changes: Changes = vec![("password".into(), Sql::Text(hash)), ("tokenKey".into(), key)];
                record_store::update(conn, &c, existing.id(), changes)
            }
            None => {
                let changes: Changes = vec![
                    ("email".into(), Sql::Text(email.to_lowercase())),
                    ("password".into(), Sql::Text(hash)),
                    ("tokenKey".into(), key),
                ];
                record_store::insert(conn, &c, None, changes)
            }
        }
    })
    .await
}

/// `POST /api/admins/init`: the first admin, for the holder of the installer token (see
/// `installer.rs`). Once an admin exists: 400, whatever the token.
async fn init_admin(state: web::Data<AppState>, req: HttpRequest, body: web::Json<Value>) -> ApiResult<HttpResponse> {
    let db = default_db(&state)?;
    if state.has_admins().await? {
        return Err(ApiError::bad_request("An admin already exists."));
    }
    if !state.installer.accepts(crate::auth::bearer_token(&req)) {
        let why = if state.installer.is_open() {
            format!(
                "Creating the first admin needs the installer token: send it as `Authorization: Bearer <token>`. \
                 It is in {} on the server and in its start-up log.",
                state.installer.path().display()
            )
        } else {
            "Creating the first admin needs the installer token, which the server makes when it starts \
             with no admin: restart it, or stop it and run `vski admin create`."
                .to_string()
        };
        return Err(ApiError::Unauthorized(why));
    }
    let [email, password] = strings(&body, ["email", "password"])?;
    let c = state.collection(&db, SUPERUSERS).await?;
    let admin = upsert_admin(&db, c.clone(), email, password, true).await?;
    state.installer.close();
    let token = mint_for(&state, TokenType::Admin, DEFAULT_DB, &c, &admin)?;
    Ok(HttpResponse::Ok().json(json!({"token": token, "admin": admin_json(&admin)})))
}

/// Checks `identity`/`password` against auth collection `c`. Unknown identity and wrong
/// password give the same 400 and take the same time. Every attempt counts against the
/// sign-in rate limit of the client's IP and the identity (429 past it).
async fn authenticate(
    state: &AppState,
    req: &HttpRequest,
    db: &Database,
    c: Arc<Collection>,
    body: &Value,
) -> ApiResult<Stored> {
    let identity = body
        .get("identity")
        .or_else(|| body.get("email"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let found = if identity.is_empty() || identity.len() > 320 {
        None
    } else {
        let (c, identity) = (c.clone(), identity.clone());
        db.read(move |conn| record_store::find_auth(conn, &c, &identity))
            .await?
    };
    // Counted per record when the identity names one, whichever way (email, username or id):
    // each spelling of one account must not get an allowance of its own.
    let ip = crate::http::client_ip(req, &state.settings.trusted_proxies)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let key = found.as_ref().map_or(identity.as_str(), |r| r.id());
    state.sign_in.check(&ip, &format!("{}/{}", db.name, c.name), key)?;
    let password = body
        .get("password")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut errors = FieldErrors::new();
    if identity.is_empty() {
        field_error(
            &mut errors,
            "identity",
            "validation_required",
            "Missing required value.",
        );
    }
    if password.is_empty() {
        field_error(
            &mut errors,
            "password",
            "validation_required",
            "Missing required value.",
        );
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let hash = found
        .as_ref()
        .and_then(|r| r.password.clone())
        .filter(|h| !h.is_empty());
    if password.len() <= password::MAX_PASSWORD_LEN * 4 && password::verify_async(password, hash).await {
        // `verify_async` only succeeds with a hash, which only exists when a record was found.
        return found.ok_or_else(|| ApiError::internal("authenticate", "verified without a record"));
    }
    Err(ApiError::bad_request("Failed to authenticate."))
}

async fn admin_login(state: web::Data<AppState>, req: HttpRequest, body: web::Json<Value>) -> ApiResult<HttpResponse> {
    let db = default_db(&state)?;
    let c = state.collection(&db, SUPERUSERS).await?;
    let admin = authenticate(&state, &req, &db, c.clone(), &body).await?;
    let token = mint_for(&state, TokenType::Admin, DEFAULT_DB, &c, &admin)?;
    Ok(HttpResponse::Ok().json(json!({"token": token, "admin": admin_json(&admin)})))
}

async fn admin_me(who: Identity) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(admin_json(who.require_admin()?)))
}

async fn auth_collection(state: &AppState, db: &Database, name: &str) -> ApiResult<Arc<Collection>> {
    let c = state.collection(db, name).await?;
    if !c.is_auth() {
        return Err(ApiError::bad_request(format!(
            "'{}' is not an auth collection.",
            c.name
        )));
    }
    Ok(c)
}

async fn login(state: &AppState, req: &HttpRequest, coll: &str, body: &Value) -> ApiResult<HttpResponse> {
    let db = if coll == SUPERUSERS {
        default_db(state)?
    } else {
        state.db(req)?
    };
    let c = auth_collection(state, &db, coll).await?;
    let rec = authenticate(state, req, &db, c.clone(), body).await?;
    if c.name == SUPERUSERS {
        let token = mint_for(state, TokenType::Auth, DEFAULT_DB, &c, &rec)?;
        return Ok(HttpResponse::Ok().json(json!({"token": token, "record": superuser_json(&c, &rec)})));
    }
    let token = mint_for(state, TokenType::Auth, &db.name, &c, &rec)?;
    let who = Identity::User {
        db: db.name.clone(),
        collection: c.clone(),
        record: rec.clone(),
    };
    Ok(HttpResponse::Ok().json(json!({"token": token, "record": public_record(&c, &rec, &who)})))
}

async fn auth_with_password(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> ApiResult<HttpResponse> {
    login(&state, &req, &path, &body).await
}

async fn login_alias(state: web::Data<AppState>, req: HttpRequest, body: web::Json<Value>) -> ApiResult<HttpResponse> {
    login(&state, &req, USERS, &body).await
}

/// A fresh token for the caller's own auth record.
async fn refresh(state: &AppState, req: &HttpRequest, who: Identity, coll: &str) -> ApiResult<HttpResponse> {
    let db = state.db(req)?;
    let c = auth_collection(state, &db, coll).await?;
    match &who {
        Identity::User {
            db: token_db,
            collection,
            record,
        } if collection.id == c.id && token_db == &db.name => {
            let token = mint_for(state, TokenType::Auth, &db.name, &c, record)?;
            Ok(HttpResponse::Ok().json(json!({"token": token, "record": public_record(&c, record, &who)})))
        }
        Identity::Admin(a) if c.name == SUPERUSERS => {
            let token = mint_for(state, TokenType::Auth, DEFAULT_DB, &c, a)?;
            Ok(HttpResponse::Ok().json(json!({"token": token, "record": superuser_json(&c, a)})))
        }
        Identity::Guest => Err(ApiError::Unauthorized(
            "The request requires a valid record authorization token.".into(),
        )),
        _ => Err(ApiError::Forbidden(
            "The token does not belong to this collection.".into(),
        )),
    }
}

async fn auth_refresh(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    refresh(&state, &req, who, &path).await
}

async fn me_alias(state: web::Data<AppState>, req: HttpRequest, who: Identity) -> ApiResult<HttpResponse> {
    let db = state.db(&req)?;
    match &who {
        Identity::User {
            db: token_db,
            collection,
            record,
        } if collection.name == USERS && token_db == &db.name => {
            Ok(HttpResponse::Ok().json(public_record(collection, record, &who)))
        }
        Identity::Guest => Err(ApiError::Unauthorized(
            "The request requires a valid record authorization token.".into(),
        )),
        _ => Err(ApiError::Forbidden(
            "The token does not belong to the users collection.".into(),
        )),
    }
}

/// Signs up in `users` and signs in: `{token, record}`.
async fn register_alias(
    state: web::Data<AppState>,
    req: HttpRequest,
    who: Identity,
    body: web::Json<Value>,
) -> ApiResult<HttpResponse> {
    let db = state.db(&req)?;
    let c = auth_collection(&state, &db, USERS).await?;
    let rec = create_record(&state, &db, c.clone(), &who, body.into_inner(), Vec::new()).await?;
    let token = mint_for(&state, TokenType::Auth, &db.name, &c, &rec)?;
    let me = Identity::User {
        db: db.name.clone(),
        collection: c.clone(),
        record: rec.clone(),
    };
    Ok(HttpResponse::Ok().json(json!({"token": token, "record": public_record(&c, &rec, &me)})))
}
