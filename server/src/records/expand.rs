//! `expand` and `fields`: attaching related records to record JSON (respecting each target
//! collection's viewRule for the caller), and keeping only the requested keys.

use std::collections::{BTreeMap, HashMap};

use rusqlite::Connection;
use serde_json::{Map, Value};

use super::handlers::public_record;
use super::rules::{Action, authorize, condition, matches};
use super::store;
use crate::auth::Identity;
use crate::collections::model::{Collection, FieldType};
use crate::collections::store::Schema;
use crate::error::{ApiError, ApiResult};
use crate::query::Condition;

/// Deepest expand path (as PocketBase).
pub const MAX_EXPAND_DEPTH: usize = 6;

/// A comma list of dotted paths as a tree: `a.b,a.c,d` → `{a: {b, c}, d}`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PathTree(pub BTreeMap<String, PathTree>);

impl PathTree {
    pub fn parse(list: &str) -> PathTree {
        let mut root = PathTree::default();
        for path in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut node = &mut root;
            for part in path.split('.') {
                node = node.0.entry(part.to_string()).or_default();
            }
        }
        root
    }

    fn depth(&self) -> usize {
        self.0.values().map(|t| 1 + t.depth()).max().unwrap_or(0)
    }
}

/// Checks an expand list against `c` (relation fields only, at most 6 levels).
pub fn check(c: &Collection, schema: &Schema, tree: &PathTree) -> ApiResult<()> {
    if tree.depth() > MAX_EXPAND_DEPTH {
        return Err(ApiError::invalid_field(
            "expand",
            "validation_invalid_expand",
            format!("Expand at most {MAX_EXPAND_DEPTH} levels deep."),
        ));
    }
    for (name, sub) in &tree.0 {
        let target = c
            .field(name)
            .filter(|f| f.kind == FieldType::Relation)
            .and_then(|f| f.options.collection_id.as_deref())
            .and_then(|id| schema.by_id(id))
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "expand",
                    "validation_invalid_expand",
                    format!("'{name}' is not a relation field of '{}'.", c.name),
                )
            })?;
        check(&target, schema, sub)?;
    }
    Ok(())
}

/// Expands the relations named in `tree` on the record JSON `items` of collection `c`, in place.
/// Related records the caller may not view are left out.
pub fn expand(
    conn: &Connection,
    schema: &Schema,
    c: &Collection,
    items: &mut [Value],
    tree: &PathTree,
    who: &Identity,
    auth: Option<&Map<String, Value>>,
) -> ApiResult<()> {
    let mut views: HashMap<String, Option<Option<Condition>>> = HashMap::new();
    expand_level(conn, schema, c, items, tree, who, auth, &mut views)
}

/// Per target collection: `None` = the caller may view none of it, `Some(cond)` = the records
/// matching `cond`.
type ViewCache = HashMap<String, Option<Option<Condition>>>;

#[allow(clippy::too_many_arguments)]
fn expand_level(
    conn: &Connection,
    schema: &Schema,
    c: &Collection,
    items: &mut [Value],
    tree: &PathTree,
    who: &Identity,
    auth: Option<&Map<String, Value>>,
    views: &mut ViewCache,
) -> ApiResult<()> {
    for (name, sub) in &tree.0 {
        let Some(f) = c.field(name) else { continue };
        let Some(target) = f.options.collection_id.as_deref().and_then(|id| schema.by_id(id)) else {
            continue;
        };
        if !views.contains_key(&target.id) {
            let view = match authorize(&target, Action::View, who) {
                Ok(access) => Some(condition(&access, &target, schema, auth, None)?),
                Err(_) => None,
            };
            views.insert(target.id.clone(), view);
        }
        let Some(Some(view)) = views.get(&target.id).cloned() else {
            continue;
        };
        for item in items.iter_mut() {
            let ids: Vec<String> = match item.get(name) {
                Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
                Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
                _ => continue,
            };
            let mut related = Vec::new();
            for id in ids {
                if let Some(rec) = store::get(conn, &target, &id)? {
                    if matches(conn, &target, &id, view.as_ref())? {
                        related.push(public_record(&target, &rec, who));
                    }
                }
            }
            if related.is_empty() {
                continue;
            }
            expand_level(conn, schema, &target, &mut related, sub, who, auth, views)?;
            let value = if f.is_multi() {
                Value::Array(related)
            } else {
                related.into_iter().next().unwrap_or(Value::Null)
            };
            if let Some(obj) = item.as_object_mut() {
                let exp = obj.entry("expand").or_insert_with(|| Value::Object(Map::new()));
                if let Some(e) = exp.as_object_mut() {
                    e.insert(name.clone(), value);
                }
            }
        }
    }
    Ok(())
}

/// Keeps only the keys named in `tree` (`*` keeps every key of its level; `expand.author.name`
/// keeps just `name` of the expanded author). An empty tree keeps everything.
pub fn pick(v: Value, tree: &PathTree) -> Value {
    if tree.0.is_empty() {
        return v;
    }
    match v {
        Value::Object(m) => {
            let all = tree.0.contains_key("*");
            Value::Object(
                m.into_iter()
                    .filter_map(|(k, val)| match tree.0.get(&k) {
                        Some(sub) => Some((k, pick(val, sub))),
                        None if all => Some((k, val)),
                        None => None,
                    })
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|x| pick(x, tree)).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn path_trees_and_picking() {
        let t = PathTree::parse("id, expand.author.name,expand.author.id");
        let v = json!({"id": 1, "title": "x", "expand": {"author": {"id": "a", "name": "n", "age": 3}, "other": {}}});
        assert_eq!(
            pick(v.clone(), &t),
            json!({"id": 1, "expand": {"author": {"id": "a", "name": "n"}}})
        );
        assert_eq!(pick(v.clone(), &PathTree::parse("*")), v);
        assert_eq!(pick(v.clone(), &PathTree::parse("")), v);
        assert_eq!(PathTree::parse("a.b.c.d.e.f.g").depth(), 7);
    }
}
