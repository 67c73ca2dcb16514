//! The query language: filters parsed to an AST (`parse`) and compiled to SQL conditions with
//! bound parameters (`compile`). Knows nothing about HTTP.

pub mod compile;
pub mod parse;

pub use compile::{Condition, Context, compile};
pub use parse::{Expr, FilterError, parse};

#[cfg(test)]
mod properties {
    //! Random filters never panic, and every filter that compiles is valid SQL that runs.

    use proptest::prelude::*;
    use rusqlite::Connection;
    use serde_json::json;

    use super::{Context, compile, parse};
    use crate::collections::model::Collection;
    use crate::collections::store::Schema;

    fn fixture() -> (Schema, Collection, Connection) {
        let people: Collection = serde_json::from_value(json!({
            "id": "people_id", "name": "people", "type": "base", "system": false, "indexes": [],
            "listRule": null, "viewRule": null, "createRule": null, "updateRule": null, "deleteRule": null,
            "created": "", "updated": "",
            "fields": [
                {"id": "f1", "name": "name", "type": "text"},
                {"id": "f2", "name": "age", "type": "number"},
                {"id": "f3", "name": "tags", "type": "select", "values": ["a", "b"], "maxSelect": 3},
                {"id": "f4", "name": "meta", "type": "json"},
                {"id": "f5", "name": "friend", "type": "relation", "collectionId": "people_id"},
                {"id": "f6", "name": "friends", "type": "relation", "collectionId": "people_id", "maxSelect": 5}
            ]
        }))
        .expect("fixture collection");
        let conn = Connection::open_in_memory().expect("db");
        conn.execute_batch(&people.create_table_sql()).expect("table");
        conn.execute_batch(
            "INSERT INTO people (id, name, age, tags, meta, friend, friends)
             VALUES ('p1', 'Ada', 36, '[\"a\"]', '{\"k\": [1, 2]}', 'p2', '[\"p2\"]'),
                    ('p2', 'Bob', 20, '[]', NULL, '', '[]')",
        )
        .expect("rows");
        (Schema::from_collections(vec![people.clone()]), people, conn)
    }

    const TOKENS: &[&str] = &[
        "name",
        "age",
        "tags",
        "meta",
        "friend",
        "friend.name",
        "friends.age",
        "friend.friends.tags",
        "id",
        "created",
        "nope",
        "=",
        "!=",
        ">",
        ">=",
        "<",
        "<=",
        "~",
        "!~",
        "?=",
        "?!=",
        "?>",
        "?~",
        "&&",
        "||",
        "(",
        ")",
        "'x'",
        "\"y\"",
        "'it\\'s'",
        "1",
        "-2.5",
        "1e3",
        "true",
        "false",
        "null",
        "@now",
        "@request.auth.id",
        "@request.auth.name",
        "@request.body.name",
        "@request.nope",
        "'",
        "\\",
        ";",
        "--",
        "/*",
        "%",
        "_",
        "é",
        "'%_'",
        "DROP",
        "TABLE",
    ];

    const OPERANDS: &[&str] = &[
        "name",
        "age",
        "tags",
        "meta",
        "friend",
        "friend.name",
        "friends.age",
        "friend.friends.tags",
        "friends.tags",
        "id",
        "created",
        "nope",
        "'x'",
        "\"y\"",
        "1",
        "-2.5",
        "true",
        "null",
        "@now",
        "@request.auth.id",
        "@request.auth.tags",
        "@request.body.name",
        "'%a_'",
    ];
    const OPS: &[&str] = &[
        "=", "!=", ">", ">=", "<", "<=", "~", "!~", "?=", "?!=", "?>", "?>=", "?<", "?<=", "?~", "?!~",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn token_soup_never_panics_and_compiles_to_valid_sql(picks in proptest::collection::vec(0..TOKENS.len(), 0..14), auth in any::<bool>()) {
            let (schema, people, conn) = fixture();
            let src: Vec<&str> = picks.iter().map(|i| TOKENS[*i]).collect();
            let src = src.join(" ");
            let auth_rec = json!({"id": "p1", "name": "Ada", "tags": ["a"]});
            let auth_map = auth_rec.as_object().cloned();
            let body = json!({"name": "Ada"}).as_object().cloned();
            if let Ok(Some(e)) = parse(&src) {
                let ctx = Context { schema: &schema, auth: if auth { auth_map.as_ref() } else { None }, body: body.as_ref(), now: "2026-01-01 00:00:00.000Z".into(), admin: true };
                if let Ok(cond) = compile(&e, &people, &ctx) {
                    let sql = format!("SELECT COUNT(*) FROM people _t WHERE {}", cond.sql);
                    let n: Result<i64, _> = conn.query_row(&sql, rusqlite::params_from_iter(cond.params.iter()), |r| r.get(0));
                    prop_assert!(n.is_ok(), "{src} -> {sql}: {n:?}");
                }
            }
        }

        #[test]
        fn well_formed_filters_compile_to_sql_that_runs(
            parts in proptest::collection::vec((0..OPERANDS.len(), 0..OPS.len(), 0..OPERANDS.len(), any::<bool>(), any::<bool>()), 1..6)
        ) {
            let (schema, people, conn) = fixture();
            let mut src = String::new();
            for (i, (l, op, r, or, paren)) in parts.iter().enumerate() {
                if i > 0 {
                    src.push_str(if *or { " || " } else { " && " });
                }
                let cmp = format!("{} {} {}", OPERANDS[*l], OPS[*op], OPERANDS[*r]);
                src.push_str(&if *paren { format!("({cmp})") } else { cmp });
            }
            let e = parse(&src).map_err(|e| TestCaseError::fail(format!("{src}: {e}")))?.expect("non-empty");
            let auth = json!({"id": "p1", "name": "Ada", "tags": ["a"]}).as_object().cloned();
            let ctx = Context { schema: &schema, auth: auth.as_ref(), body: None, now: "2026-01-01 00:00:00.000Z".into(), admin: true };
            match compile(&e, &people, &ctx) {
                Ok(cond) => {
                    let sql = format!("SELECT COUNT(*) FROM people _t WHERE {}", cond.sql);
                    let n: Result<i64, _> = conn.query_row(&sql, rusqlite::params_from_iter(cond.params.iter()), |r| r.get(0));
                    prop_assert!(n.is_ok(), "{src} -> {sql}: {n:?}");
                }
                // Only operands naming unknown fields, or requests of many values in one place,
                // may fail to compile.
                Err(err) => prop_assert!(src.contains("nope") || err.message.contains("one field"), "{src}: {err}"),
            }
        }

        #[test]
        fn arbitrary_text_never_panics(src in ".{0,200}") {
            let _ = parse(&src);
        }
    }
}
