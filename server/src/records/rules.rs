//! Collection rules: who may list, view, create, update and delete records.
//!
//! A rule is `null` (admins only), `""` (everyone) or a filter expression. Filter expressions
//! are not evaluated yet (the query-language issue adds them), so they are refused when a
//! collection is saved rather than silently ignored.

use crate::auth::Identity;
use crate::collections::model::Collection;
use crate::error::{ApiError, ApiResult};

/// Whether `rule` is acceptable in a collection definition.
pub fn check_rule(rule: Option<&str>) -> Result<(), String> {
    match rule {
        None => Ok(()),
        Some(r) if r.trim().is_empty() => Ok(()),
        Some(_) => {
            Err("Filter expressions in rules are not supported yet: use null (admins only) or \"\" (everyone).".into())
        }
    }
}

/// Whether `who` passes `rule`. Admins pass every rule.
pub fn allows(rule: &Option<String>, who: &Identity) -> bool {
    who.is_admin() || matches!(rule, Some(r) if r.trim().is_empty())
}

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

/// `Ok` when `who` may perform `action` on `c`; otherwise 403 (admins-only or denied).
pub fn authorize(c: &Collection, action: Action, who: &Identity) -> ApiResult<()> {
    match rule_for(c, action) {
        rule if allows(rule, who) => Ok(()),
        None => Err(ApiError::Forbidden("Only admins can perform this action.".into())),
        Some(_) => Err(ApiError::Forbidden(
            "You are not allowed to perform this request.".into(),
        )),
    }
}
