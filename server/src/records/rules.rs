//! Collection rules: who may list, view, create, update and delete records.
//!
//! A rule is `null` (admins only: others get 403), `""` (everyone) or a filter expression that
//! the record must match: list rules filter rows, view/update/delete answer 404 for records
//! that do not match, and create answers 400 when the new record does not match. Admins pass
//! every rule.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params_from_iter};
use serde_json::{Map, Value, json};

use crate::auth::Identity;
use crate::collections::model::Collection;
use crate::collections::store::Schema;
use crate::error::{ApiError, ApiResult};
use crate::query::{Condition, Context, Expr, compile, parse};
use crate::util::{now_string, quote_ident};

/// The five actions a collection has a rule for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    List,
    View,
    Create,
    Update,
    Delete,
}

/// The rule of `c` that governs `action`.
pub fn rule_for(c: &Collection, action: Action) -> &Option<String> {
    match action {
        Action::List => &c.list_rule,
        Action::View => &c.view_rule,
        Action::Create => &c.create_rule,
        Action::Update => &c.update_rule,
        Action::Delete => &c.delete_rule,
    }
}

/// What a caller may do with the records of a collection for one action.
#[derive(Debug, Clone)]
pub enum Access {
    /// Every record (admins, or a `""` rule).
    All,
    /// The records matching this expression.
    Matching(Expr),
}

/// The caller's access for `action`; 403 when the rule is `null` and the caller no admin.
pub fn authorize(c: &Collection, action: Action, who: &Identity) -> ApiResult<Access> {
    if who.is_admin() {
        return Ok(Access::All);
    }
    match rule_for(c, action) {
        None => Err(ApiError::Forbidden("Only admins can perform this action.".into())),
        Some(r) => match parse(r) {
            Ok(None) => Ok(Access::All),
            Ok(Some(e)) => Ok(Access::Matching(e)),
            Err(e) => Err(ApiError::internal("stored rule", e.to_string())),
        },
    }
}

/// The `@request.auth` record of a caller: its fields plus `id`, `collectionId`, `collectionName`.
pub fn auth_record(who: &Identity) -> Option<Map<String, Value>> {
    match who {
        Identity::User { collection, record, .. } => {
            let mut m = record.data.clone();
            m.insert("collectionId".into(), json!(collection.id));
            m.insert("collectionName".into(), json!(collection.name));
            Some(m)
        }
        Identity::Admin(a) => {
            let mut m = a.data.clone();
            m.insert("collectionName".into(), json!("_superusers"));
            Some(m)
        }
        Identity::Guest | Identity::Replica(_) => None,
    }
}

/// Compiles the access condition of `access` for collection `c` (`None` for [`Access::All`]).
pub fn condition(
    access: &Access,
    c: &Collection,
    schema: &Schema,
    auth: Option<&Map<String, Value>>,
    body: Option<&Map<String, Value>>,
) -> ApiResult<Option<Condition>> {
    match access {
        Access::All => Ok(None),
        Access::Matching(e) => {
            let ctx = Context {
                schema,
                auth,
                body,
                now: now_string(),
                // Rules are written by admins: they may name hidden fields.
                admin: true,
            };
            compile(e, c, &ctx)
                .map(Some)
                .map_err(|e| ApiError::internal("rule", e.to_string()))
        }
    }
}

/// Whether record `id` of `c` matches `cond` (always, when there is no condition).
pub fn matches(conn: &Connection, c: &Collection, id: &str, cond: Option<&Condition>) -> ApiResult<bool> {
    let Some(cond) = cond else { return Ok(true) };
    let sql = format!(
        "SELECT 1 FROM {} _t WHERE _t.\"id\" = ? AND ({})",
        quote_ident(&c.name),
        cond.sql
    );
    let mut params = vec![rusqlite::types::Value::Text(id.to_string())];
    params.extend(cond.params.iter().cloned());
    Ok(conn
        .prepare(&sql)?
        .query_row(params_from_iter(params), |_| Ok(()))
        .optional()?
        .is_some())
}

/// Checks a rule when a collection is saved: `null`, `""`, or a filter that parses and whose
/// fields exist in `c` (and, through relations, in `schema`).
pub fn check_rule(rule: Option<&str>, c: &Collection, schema: &Schema) -> Result<(), String> {
    let Some(r) = rule else { return Ok(()) };
    match parse(r) {
        Ok(None) => Ok(()),
        Ok(Some(e)) => {
            let ctx = Context {
                schema,
                auth: None,
                body: None,
                now: now_string(),
                // Rules are written by admins: they may name hidden fields.
                admin: true,
            };
            compile(&e, c, &ctx).map(|_| ()).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `e` reads anything of the request body or of the record (its fields, or the new
/// record's, which come from the body): only then must a rule wait for the body.
fn needs_record_or_body(e: &Expr, record: bool) -> bool {
    let operand = |o: &crate::query::parse::Operand| match o {
        crate::query::parse::Operand::Body(_) => true,
        crate::query::parse::Operand::Field(_) => record,
        _ => false,
    };
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => needs_record_or_body(a, record) || needs_record_or_body(b, record),
        Expr::Cmp { left, right, .. } => operand(left) || operand(right),
    }
}

/// A create rule decided before the body is read: `Some(allowed)` when the rule depends on the
/// caller alone (`@request.auth.*`, `@now`, literals), `None` when it reads the new record or
/// the body and so must wait for them.
pub async fn decided_without_body(
    state: &crate::state::AppState,
    db: &crate::db::Database,
    c: &Collection,
    access: &Access,
    who: &Identity,
) -> ApiResult<Option<bool>> {
    let Access::Matching(e) = access else {
        return Ok(Some(true));
    };
    if needs_record_or_body(e, true) {
        return Ok(None);
    }
    let schema = state.schemas.get(db).await?;
    let Some(cond) = condition(access, c, &schema, auth_record(who).as_ref(), None)? else {
        return Ok(Some(true));
    };
    // No field of the record is named, so the condition holds or fails for every row alike:
    // evaluated over one row with no columns.
    let sql = format!("SELECT 1 FROM (SELECT 1) _t WHERE ({})", cond.sql);
    let allowed = db
        .read(move |conn| {
            Ok(conn
                .prepare(&sql)?
                .query_row(params_from_iter(cond.params.iter()), |_| Ok(()))
                .optional()?
                .is_some())
        })
        .await?;
    Ok(Some(allowed))
}

/// Whether the caller may change record `id` as far as can be told before the body is read:
/// `false` when the record does not exist or a rule that does not read the body refuses it.
/// A rule that reads `@request.body` is decided later, with the body.
pub async fn record_allowed_without_body(
    state: &crate::state::AppState,
    db: &Arc<crate::db::Database>,
    c: &Arc<Collection>,
    access: &Access,
    who: &Identity,
    id: &str,
) -> ApiResult<bool> {
    let check = match access {
        Access::Matching(e) if !needs_record_or_body(e, false) => {
            let schema = state.schemas.get(db).await?;
            condition(access, c, &schema, auth_record(who).as_ref(), None)?
        }
        _ => None,
    };
    let (c, id) = (c.clone(), id.to_string());
    db.read(move |conn| {
        let exists = conn
            .prepare(&format!("SELECT 1 FROM {} WHERE \"id\" = ?1", quote_ident(&c.name)))?
            .query_row([&id], |_| Ok(()))
            .optional()?
            .is_some();
        Ok(exists && matches(conn, &c, &id, check.as_ref())?)
    })
    .await
}
