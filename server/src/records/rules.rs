//! Collection rules: who may list, view, create, update and delete records.
//!
//! A rule is `null` (admins only), `""` (everyone) or a filter expression. Filter expressions
//! are not evaluated yet (the query-language issue adds them), so they are refused when a
//! collection is saved rather than silently ignored.

use crate::auth::Identity;

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
