//! Authentication: who is making a request (admin, auth-collection user, replica, guest), and
//! the admin and user sign-in endpoints.

pub mod handlers;
pub mod installer;
pub mod limit;
pub mod password;
pub mod token;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};

use crate::collections::model::Collection;
use crate::collections::store::SUPERUSERS;
use crate::db::DEFAULT_DB;
use crate::error::{ApiError, ApiResult};
use crate::http::requested_db_name;
use crate::records::store::{self as record_store, Stored};
use crate::state::AppState;
use token::{TokenType, token_key_fingerprint};

pub use handlers::configure;

/// Who sent a request. A token of one type never grants another type's rights.
#[derive(Debug, Clone)]
pub enum Identity {
    /// No token, or a token that failed verification (forged, expired, revoked).
    Guest,
    /// An administrator (a `_superusers` record in `default`).
    Admin(Stored),
    /// A record of an auth collection.
    User {
        db: String,
        collection: Arc<Collection>,
        record: Stored,
    },
    /// A replica (replica tokens only grant `/api/replica/*`).
    Replica(String),
}

impl Identity {
    pub fn is_admin(&self) -> bool {
        matches!(self, Identity::Admin(_))
    }

    /// `Ok` for admins; 401 for guests, 403 for everyone else.
    pub fn require_admin(&self) -> ApiResult<&Stored> {
        match self {
            Identity::Admin(a) => Ok(a),
            Identity::Guest => Err(ApiError::Unauthorized(
                "The request requires valid admin authorization.".into(),
            )),
            Identity::User { .. } | Identity::Replica(_) => {
                Err(ApiError::Forbidden("Only admins can perform this action.".into()))
            }
        }
    }

    /// Whether this identity is the auth record `id` of collection `collection_id`.
    pub fn is_record(&self, collection_id: &str, id: &str) -> bool {
        matches!(self, Identity::User { collection, record, .. } if collection.id == collection_id && record.id() == id)
    }
}

/// The token of a request: `Authorization: Bearer <token>`, or a bare token in that header.
pub fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get("authorization")?.to_str().ok()?.trim();
    let token = match value.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("bearer ") => value[7..].trim(),
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

/// Resolves the identity of `req`. A token whose record is gone, or whose `tokenKey` was
/// rotated, counts as no token.
///
/// The tenant model: an admin token (a `_superusers` record of `default`) is valid for every
/// database; a user token is valid only in the database that issued it. A user token sent to
/// another database (by `X-Dbname` or `?db=`) counts as no token there, so it can never pass a
/// rule, fill `@request.auth`, or be refreshed outside its own database.
pub async fn identify(req: &HttpRequest, state: &AppState) -> ApiResult<Identity> {
    identify_token(state, bearer_token(req), &requested_db_name(req)).await
}

/// Resolves the identity of `token` for a request to database `requested` (see [`identify`]).
pub async fn identify_token(state: &AppState, token: Option<&str>, requested: &str) -> ApiResult<Identity> {
    let Some(claims) = token.and_then(|t| state.tokens.verify(t)) else {
        return Ok(Identity::Guest);
    };
    let (db_name, collection) = match claims.kind {
        TokenType::Replica => return Ok(Identity::Replica(claims.sub)),
        TokenType::Admin => (DEFAULT_DB.to_string(), None),
        // A user's token acts only in its own database; PocketBase's superuser token (an `auth`
        // token of `_superusers` in `default`, checked below) in every database.
        TokenType::Auth => match (&claims.db, &claims.collection_id) {
            (Some(db), Some(c)) if db == requested || db == DEFAULT_DB => (db.clone(), Some(c.clone())),
            _ => return Ok(Identity::Guest),
        },
    };
    let Some(db) = state.dbs.get(&db_name) else {
        return Ok(Identity::Guest);
    };
    let schema = state.schemas.get(&db).await?;
    let coll = match &collection {
        Some(id) => schema.by_id(id),
        None => schema.get(SUPERUSERS),
    };
    let Some(coll) = coll.filter(|c| c.is_auth()) else {
        return Ok(Identity::Guest);
    };
    let superuser = claims.kind == TokenType::Auth && coll.name == SUPERUSERS && db_name == DEFAULT_DB;
    if claims.kind == TokenType::Auth && !superuser && db_name != requested {
        return Ok(Identity::Guest);
    }
    let (c2, id) = (coll.clone(), claims.sub.clone());
    let Some(record) = db.read(move |conn| record_store::get(conn, &c2, &id)).await? else {
        return Ok(Identity::Guest);
    };
    let fingerprint = record.token_key.as_deref().map(token_key_fingerprint);
    if fingerprint.is_none() || claims.tk != fingerprint {
        return Ok(Identity::Guest);
    }
    Ok(match claims.kind {
        TokenType::Admin => Identity::Admin(record),
        TokenType::Auth if superuser => Identity::Admin(record),
        _ => Identity::User {
            db: db_name,
            collection: coll,
            record,
        },
    })
}

impl FromRequest for Identity {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = req
                .app_data::<web::Data<AppState>>()
                .ok_or_else(|| ApiError::internal("identity", "application state missing"))?;
            identify(&req, state).await
        })
    }
}
