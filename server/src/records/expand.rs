//! `expand` and `fields`: attaching related records to record JSON (respecting each target
//! collection's viewRule for the caller), and keeping only the requested keys.

use std::collections::{BTreeMap, HashMap, HashSet};

use rusqlite::Connection;
use serde_json::{Map, Value};

use super::handlers::public_record;
use super::rules::{Action, authorize, condition};
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
        // Each related record is read, checked against the viewRule and expanded once, however
        // many items point at it; the items then get copies.
        let mut wanted: Vec<&str> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for item in items.iter() {
            for id in related_ids(item.get(name.as_str())) {
                if seen.insert(id) {
                    wanted.push(id);
                }
            }
        }
        if wanted.is_empty() {
            continue;
        }
        let mut found: Vec<Value> = store::get_many(conn, &target, &wanted, view.as_ref())?
            .iter()
            .map(|rec| public_record(&target, rec, who))
            .collect();
        expand_level(conn, schema, &target, &mut found, sub, who, auth, views)?;
        let by_id: HashMap<&str, &Value> = found.iter().filter_map(|v| Some((v.get("id")?.as_str()?, v))).collect();
        for item in items.iter_mut() {
            let related: Vec<Value> = related_ids(item.get(name.as_str()))
                .filter_map(|id| by_id.get(id).map(|v| (*v).clone()))
                .collect();
            if related.is_empty() {
                continue;
            }
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

/// The non-empty record ids a relation value names: one id, or a list of them.
fn related_ids(v: Option<&Value>) -> impl Iterator<Item = &str> {
    let (one, many) = match v {
        Some(Value::String(s)) if !s.is_empty() => (Some(s.as_str()), None),
        Some(Value::Array(a)) => (None, Some(a.iter().filter_map(Value::as_str))),
        _ => (None, None),
    };
    one.into_iter().chain(many.into_iter().flatten())
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

    /// 1,000 posts pointing at 10 authors, with a viewRule on authors: expanding reads the 10
    /// authors once, so the allocations per post are those of its copy of the author, not of a
    /// query and a rule check each.
    #[test]
    fn expanding_allocates_about_one_copy_per_record() {
        let authors: Collection = serde_json::from_value(json!({
            "id": "authors_id", "name": "authors", "type": "base", "system": false, "indexes": [],
            "listRule": "", "viewRule": "name != ''", "createRule": null, "updateRule": null, "deleteRule": null,
            "created": "", "updated": "",
            "fields": [{"id": "a1", "name": "name", "type": "text"}, {"id": "a2", "name": "bio", "type": "text"}]
        }))
        .unwrap();
        let posts: Collection = serde_json::from_value(json!({
            "id": "posts_id", "name": "posts", "type": "base", "system": false, "indexes": [],
            "listRule": "", "viewRule": "", "createRule": null, "updateRule": null, "deleteRule": null,
            "created": "", "updated": "",
            "fields": [{"id": "p1", "name": "author", "type": "relation", "collectionId": "authors_id"}]
        }))
        .unwrap();
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&authors.create_table_sql()).unwrap();
        for i in 0..10 {
            conn.execute(
                "INSERT INTO authors (id, created, updated, name, bio) VALUES (?1, '', '', ?2, 'x')",
                [format!("author{i:08}"), format!("name {i}")],
            )
            .unwrap();
        }
        // A hidden author: the viewRule leaves it out.
        conn.execute(
            "INSERT INTO authors (id, created, updated, name, bio) VALUES ('hiddenauthor000', '', '', '', '')",
            [],
        )
        .unwrap();
        let schema = Schema::from_collections(vec![authors.clone(), posts.clone()]);
        let author_of = |i: usize| {
            if i % 100 == 99 {
                "hiddenauthor000".to_string()
            } else {
                format!("author{:08}", i % 10)
            }
        };
        let fresh = || -> Vec<Value> {
            (0..1000)
                .map(|i| json!({"id": format!("post{i:011}"), "author": author_of(i)}))
                .collect()
        };
        let tree = PathTree::parse("author");
        let mut items = fresh();
        expand(&conn, &schema, &posts, &mut items, &tree, &Identity::Guest, None).unwrap(); // warm caches
        let mut items = fresh();
        let before = crate::alloc_count::allocations();
        expand(&conn, &schema, &posts, &mut items, &tree, &Identity::Guest, None).unwrap();
        let spent = crate::alloc_count::allocations() - before;
        for (i, item) in items.iter().enumerate() {
            let got = item.pointer("/expand/author/id").and_then(Value::as_str);
            if i % 100 == 99 {
                assert_eq!(got, None, "post {i} expanded an author its rule hides");
            } else {
                assert_eq!(got, Some(author_of(i).as_str()), "post {i}");
            }
        }
        // The least any expand can do: copy the author into each post's new `expand` object.
        let author = items[0].pointer("/expand/author").unwrap().clone();
        let mut bare = fresh();
        let before = crate::alloc_count::allocations();
        for item in bare.iter_mut().filter(|v| v["author"] != "hiddenauthor000") {
            let mut e = Map::new();
            e.insert("author".into(), author.clone());
            item.as_object_mut().unwrap().insert("expand".into(), Value::Object(e));
        }
        let floor = crate::alloc_count::allocations() - before;
        let per_record = spent as f64 / 1000.0;
        println!(
            "expand of 1,000 records over 10 authors: {spent} allocations ({per_record:.1} per record); copying alone: {floor}"
        );
        assert!(
            spent <= floor + floor / 4,
            "expand allocated {spent} times for 1,000 records; copying the authors alone takes {floor}"
        );
    }
}
