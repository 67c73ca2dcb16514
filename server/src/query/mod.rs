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
        "@collection.people.name",
        "@collection.people:b.friend.tags",
        "people_via_friend.age",
        "@collection.nope.x",
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
        "people_via_friend.name",
        "people_via_friends",
        "@collection.people.age",
        "@collection.people:x.friends.name",
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

#[cfg(test)]
mod joins {
    //! Back-relations and `@collection`, with PocketBase's meaning: `?=` forms read one joined
    //! record shared by the whole condition, the others every record.

    use rusqlite::Connection;
    use serde_json::json;

    use super::{Context, compile, parse};
    use crate::collections::model::Collection;
    use crate::collections::store::Schema;

    fn collection(v: serde_json::Value) -> Collection {
        let mut base = json!({"type": "base", "system": false, "indexes": [], "listRule": null, "viewRule": null,
            "createRule": null, "updateRule": null, "deleteRule": null, "created": "", "updated": ""});
        base.as_object_mut().unwrap().extend(v.as_object().unwrap().clone());
        serde_json::from_value(base).expect("collection")
    }

    /// Teams, their members, and folders with a parent: ids that match `filter` on `of`.
    fn matching(of: &str, filter: &str, auth: Option<&str>, admin: bool) -> Result<Vec<String>, String> {
        let teams = collection(json!({"id": "teams_id", "name": "teams", "viewRule": "",
            "fields": [{"id": "t1", "name": "name", "type": "text"}]}));
        let members = collection(json!({"id": "members_id", "name": "members",
            "fields": [{"id": "m1", "name": "team", "type": "relation", "collectionId": "teams_id"},
                       {"id": "m2", "name": "user", "type": "text"},
                       {"id": "m3", "name": "teams", "type": "relation", "collectionId": "teams_id", "maxSelect": 5}]}));
        let folders = collection(json!({"id": "folders_id", "name": "folders", "viewRule": "",
            "fields": [{"id": "f1", "name": "locked", "type": "bool"},
                       {"id": "f2", "name": "parent", "type": "relation", "collectionId": "folders_id"}]}));
        let empty = collection(json!({"id": "empty_id", "name": "empty",
            "fields": [{"id": "e1", "name": "x", "type": "text"}]}));
        let conn = Connection::open_in_memory().unwrap();
        for c in [&teams, &members, &folders, &empty] {
            conn.execute_batch(&c.create_table_sql()).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO teams (id, name) VALUES ('t1', 'one'), ('t2', 'two'), ('t3', 'three');
             INSERT INTO members (id, team, user, teams) VALUES ('m1', 't1', 'ann', '[\"t3\"]'), ('m2', 't2', 'bob', '[\"t3\"]');
             INSERT INTO folders (id, locked, parent) VALUES ('root', 1, ''), ('open', 0, ''), ('a', 0, 'root'), ('b', 0, 'open');",
        )
        .unwrap();
        let schema = Schema::from_collections(vec![teams, members, folders, empty]);
        let auth = auth.map(|id| json!({"id": id}).as_object().cloned().unwrap());
        let ctx = Context {
            schema: &schema,
            auth: auth.as_ref(),
            body: None,
            now: String::new(),
            admin,
        };
        let c = schema.get(of).unwrap();
        let e = parse(filter).map_err(|e| e.to_string())?.unwrap();
        let cond = compile(&e, &c, &ctx).map_err(|e| e.to_string())?;
        let sql = format!("SELECT id FROM {of} _t WHERE {} ORDER BY id", cond.sql);
        let mut stmt = conn.prepare(&sql).map_err(|e| format!("{sql}: {e}"))?;
        let ids = stmt
            .query_map(rusqlite::params_from_iter(cond.params.iter()), |r| r.get(0))
            .unwrap()
            .collect::<Result<Vec<String>, _>>()
            .unwrap();
        Ok(ids)
    }

    #[test]
    fn any_of_collection_comparisons_share_one_joined_record() {
        // ann is a member of t1 only: the two conditions hold of one members record.
        let rule = "@collection.members.team ?= id && @collection.members.user ?= @request.auth.id";
        assert_eq!(matching("teams", rule, Some("ann"), true).unwrap(), ["t1"]);
        assert_eq!(matching("teams", rule, Some("bob"), true).unwrap(), ["t2"]);
        assert!(matching("teams", rule, None, true).unwrap().is_empty());
        // An alias joins the collection again, independently.
        let loose = "@collection.members.team ?= id && @collection.members:other.user ?= @request.auth.id";
        assert_eq!(matching("teams", loose, Some("ann"), true).unwrap(), ["t1", "t2"]);
        // Through a multiple relation of the joined record.
        let multi = "@collection.members.teams ?= id && @collection.members.user ?= 'bob'";
        assert_eq!(matching("teams", multi, None, true).unwrap(), ["t3"]);
    }

    #[test]
    fn other_collection_comparisons_hold_of_every_record() {
        assert!(
            matching("teams", "@collection.members.user = 'ann'", None, true)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            matching("teams", "@collection.members.user != 'cy'", None, true)
                .unwrap()
                .len(),
            3
        );
        // An empty join still lets the rest of the condition decide.
        assert_eq!(
            matching(
                "teams",
                "@collection.members.user ?= 'nobody' || name = 'two'",
                None,
                true
            )
            .unwrap(),
            ["t2"]
        );
        for joined in [
            "@collection.empty.x ?= 'a'",
            "@collection.empty.x ?= 'a' && @collection.empty:b.x ?= 'b'",
        ] {
            let f = format!("({joined}) || name = 'two' || name = @request.auth.id");
            assert_eq!(matching("teams", &f, Some("one"), true).unwrap(), ["t1", "t2"], "{f}");
            assert!(matching("teams", joined, None, true).unwrap().is_empty());
        }
        assert_eq!(
            matching("teams", "@collection.empty.x ?= null", None, true)
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn back_relations_read_the_records_pointing_here() {
        assert_eq!(
            matching("teams", "members_via_team.user ?= 'bob'", None, true).unwrap(),
            ["t2"]
        );
        assert_eq!(
            matching("teams", "members_via_teams.user ?= 'bob'", None, true).unwrap(),
            ["t3"]
        );
        assert_eq!(
            matching("teams", "members_via_team ?= 'm1'", None, true).unwrap(),
            ["t1"]
        );
        // A self back-relation: folders with a locked child, and a self-relation.
        assert!(
            matching("folders", "folders_via_parent.locked ?= true", None, true)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            matching("folders", "folders_via_parent.locked ?= false", None, true).unwrap(),
            ["open", "root"]
        );
        assert_eq!(matching("folders", "parent.locked = true", None, true).unwrap(), ["a"]);
    }

    #[test]
    fn joins_are_checked_and_private_ones_refused_outside_rules() {
        let e = matching("teams", "@collection.nope.x ?= 1", None, true).unwrap_err();
        assert!(e.contains("Unknown collection 'nope'"), "{e}");
        let e = matching("teams", "members_via_user ?= 1", None, true).unwrap_err();
        assert!(e.contains("no relation field 'user'"), "{e}");
        let e = matching("teams", "nobody_via_team ?= 1", None, true).unwrap_err();
        assert!(e.contains("Unknown field"), "{e}");
        // members is not public: a user's filter cannot read it, a rule can.
        let e = matching("teams", "@collection.members.user ?= 'ann'", None, false).unwrap_err();
        assert!(e.contains("not public"), "{e}");
        let e = matching("teams", "members_via_team.user ?= 'ann'", None, false).unwrap_err();
        assert!(e.contains("not public"), "{e}");
        assert_eq!(
            matching("teams", "@collection.teams.name ?= 'two' && name = 'one'", None, false).unwrap(),
            ["t1"]
        );
        let e = matching("teams", "@collection.teams:a:b.name ?= 1", None, true).unwrap_err();
        assert!(e.contains("not a collection reference"), "{e}");
        let e = matching("teams", "@request.auth.id:isset = true", None, true).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
    }
}
