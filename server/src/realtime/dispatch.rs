//! The dispatcher: turns committed changesets into events and hands each client the ones its
//! rules let it see.
//!
//! A router ([`run`]) hands each commit to the lane of its database ([`lane`]): one task per
//! database with clients, so rendering the events of one database (its rules, its subscribers,
//! its read connections) never holds up another's. Within a lane, commits are rendered one at a
//! time in commit order, and identical work is done once per commit: subscribers who are the
//! same identity with the same subscription share one rule check and one rendered record.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::web;
use rusqlite::Connection;
use rusqlite::fallible_streaming_iterator::FallibleStreamingIterator;
use rusqlite::session::ChangesetIter;
use rusqlite::types::Value as Sql;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Client, Committed, Protocol, Subscription};
use crate::auth::Identity;
use crate::collections::model::Collection;
use crate::collections::store::Schema;
use crate::error::{ApiError, ApiResult};
use crate::query::Condition;
use crate::records::expand::{PathTree, expand, pick};
use crate::records::handlers::public_record;
use crate::records::rules::{Action, auth_record, authorize, condition};
use crate::records::store;
use crate::state::AppState;

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Create,
    Update,
    Delete,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Update => "update",
            Kind::Delete => "delete",
        }
    }
}

/// One changed row of a changeset.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: String,
    pub kind: Kind,
    /// The primary key (a record id for a collection's table) and its column.
    pub id: String,
    pub pk: usize,
    /// Per column, in table order: the new values of a create (all of them) or an update
    /// (`None` for a column it did not change), the old values of a delete.
    pub values: Vec<Option<Sql>>,
}

/// The changed rows of a changeset, in its order.
pub fn decode(changeset: &[u8]) -> rusqlite::Result<Vec<Change>> {
    let mut input: &[u8] = changeset;
    let reader: &mut dyn std::io::Read = &mut input;
    let mut it = ChangesetIter::start_strm(&reader)?;
    let mut out = Vec::new();
    while let Some(item) = it.next()? {
        let op = item.op()?;
        let kind = match op.code() {
            rusqlite::hooks::Action::SQLITE_INSERT => Kind::Create,
            rusqlite::hooks::Action::SQLITE_UPDATE => Kind::Update,
            rusqlite::hooks::Action::SQLITE_DELETE => Kind::Delete,
            _ => continue,
        };
        let columns = op.number_of_columns().max(0) as usize;
        let table = op.table_name().to_string();
        let Some(pk) = item.pk()?.iter().position(|&flag| flag != 0) else {
            continue;
        };
        let key = if kind == Kind::Create {
            item.new_value(pk)?
        } else {
            item.old_value(pk)?
        };
        let key = owned(key);
        let id = match &key {
            Sql::Text(t) => t.clone(),
            Sql::Integer(i) => i.to_string(),
            _ => continue,
        };
        // An update leaves the columns it did not change out of the changeset.
        let mut values: Vec<Option<Sql>> = (0..columns)
            .map(|c| {
                let v = if kind == Kind::Delete {
                    item.old_value(c)
                } else {
                    item.new_value(c)
                };
                v.ok().map(owned)
            })
            .collect();
        if let Some(v) = values.get_mut(pk) {
            *v = Some(key);
        }
        out.push(Change {
            table,
            kind,
            id,
            pk,
            values,
        });
    }
    Ok(out)
}

fn owned(v: rusqlite::types::ValueRef<'_>) -> Sql {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Sql::Null,
        ValueRef::Integer(i) => Sql::Integer(i),
        ValueRef::Real(f) => Sql::Real(f),
        ValueRef::Text(t) => Sql::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Sql::Blob(b.to_vec()),
    }
}

/// Runs until the hub is dropped: routes each commit to its database's lane, starting lanes as
/// databases gain clients and letting them end once a database has neither clients nor
/// commits in flight (so a later lane of the same database never overtakes an earlier one).
pub async fn run(state: web::Data<AppState>, mut queue: mpsc::UnboundedReceiver<Committed>) {
    let mut lanes: HashMap<String, mpsc::UnboundedSender<Committed>> = HashMap::new();
    let mut prune = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            committed = queue.recv() => {
                let Some(committed) = committed else { return };
                let db = committed.db().to_string();
                let tx = lanes.entry(db.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    actix_web::rt::spawn(lane(state.clone(), db.clone(), rx));
                    tx
                });
                if let Err(mpsc::error::SendError(lost)) = tx.send(committed) {
                    // The lane ended (it only does when its sender is dropped, or it panicked).
                    lanes.remove(&db);
                    if let Committed::Changes { changeset, .. } = lost {
                        state.realtime.rendered(&db, changeset.len());
                    }
                    state.realtime.resync(&db);
                }
            }
            _ = prune.tick() => {
                lanes.retain(|db, _| state.realtime.watching(db) || state.realtime.pending(db) > 0);
            }
        }
    }
}

/// The lane of database `db`: its commits, one at a time, in commit order.
async fn lane(state: web::Data<AppState>, db: String, mut queue: mpsc::UnboundedReceiver<Committed>) {
    while let Some(committed) = queue.recv().await {
        match committed {
            Committed::Resync { db } => {
                for client in state.realtime.subscribers(&db) {
                    state.realtime.deliver(&client, resync_message(&client, &db));
                }
            }
            Committed::Changes { db: _, changeset } => {
                let bytes = changeset.len();
                if let Err(e) = deliver(&state, &db, changeset).await {
                    log::warn!("realtime: cannot turn a commit of '{db}' into events: {e}");
                }
                state.realtime.rendered(&db, bytes);
            }
        }
    }
}

fn resync_message(client: &Client, db: &str) -> String {
    match client.protocol {
        Protocol::Sse => sse_frame(&client.id, "resync", &json!({"db": db})),
        Protocol::WebSocket => json!({"type": "RESYNC", "db": db}).to_string(),
    }
}

/// One Server-Sent Events message.
pub fn sse_frame(id: &str, event: &str, data: &Value) -> String {
    format!("id:{id}\nevent:{event}\ndata:{data}\n\n")
}

async fn deliver(state: &AppState, db_name: &str, changeset: Vec<u8>) -> ApiResult<()> {
    let clients = state.realtime.subscribers(db_name);
    if clients.is_empty() {
        return Ok(());
    }
    let Some(db) = state.dbs.get(db_name) else {
        return Ok(());
    };
    let changes = decode(&changeset)?;
    let schema = state.schemas.get(&db).await?;
    // A commit that changed a subscriber's own auth record may have revoked it: its identity is
    // checked again before any event of this commit goes out.
    let touched: std::collections::HashSet<&str> = changes
        .iter()
        .filter(|c| schema.get(&c.table).is_some_and(|c| c.is_auth()))
        .map(|c| c.id.as_str())
        .collect();
    if !touched.is_empty() {
        let affected: Vec<_> = clients
            .iter()
            .filter(|c| super::revoke::record_id(&c.identity()).is_some_and(|id| touched.contains(id.as_str())))
            .cloned()
            .collect();
        super::revoke::recheck(state, &affected, true).await;
    }
    let clients: Vec<_> = clients.into_iter().filter(|c| !c.is_closing()).collect();
    let messages = db
        .read(move |conn| Ok(render(conn, &schema, &changes, &clients)))
        .await?;
    for (client, message) in messages {
        state.realtime.deliver(&client, message);
    }
    Ok(())
}

/// The condition a record must match to reach `who` through `sub`: the listRule (the
/// viewRule for a one-record subscription) and the subscription's filter. `Ok(None)` when the
/// rule lets `who` see nothing; an error when the filter is invalid.
pub fn access(
    c: &Collection,
    schema: &Schema,
    who: &Identity,
    sub: &Subscription,
) -> ApiResult<Option<Option<Condition>>> {
    let action = if sub.record.is_some() {
        Action::View
    } else {
        Action::List
    };
    let auth = auth_record(who);
    let filter = match crate::query::parse(sub.filter.as_deref().unwrap_or("")) {
        Ok(None) => None,
        Ok(Some(e)) => {
            let ctx = crate::query::Context {
                schema,
                auth: auth.as_ref(),
                body: None,
                now: crate::util::now_string(),
                admin: who.is_admin(),
            };
            Some(crate::query::compile(&e, c, &ctx).map_err(|e| invalid_filter(&e))?)
        }
        Err(e) => return Err(invalid_filter(&e)),
    };
    let Ok(access) = authorize(c, action, who) else {
        return Ok(None);
    };
    let rule = condition(&access, c, schema, auth.as_ref(), None)?;
    Ok(Some(crate::records::handlers::both(rule, filter)))
}

fn invalid_filter(e: &crate::query::FilterError) -> ApiError {
    ApiError::invalid_field("filter", "validation_invalid_filter", format!("Invalid filter: {e}"))
}

/// Checks an `expand` and `fields` request of a subscription against the collection.
pub fn shape(c: &Collection, schema: &Schema, sub: &Subscription) -> ApiResult<(PathTree, PathTree)> {
    let tree = PathTree::parse(sub.expand.as_deref().unwrap_or(""));
    crate::records::expand::check(c, schema, &tree)?;
    Ok((tree, PathTree::parse(sub.fields.as_deref().unwrap_or(""))))
}

/// What a subscription needs to check and shape events of one collection for one subscriber:
/// compiled once per batch of changes, used for every row.
struct Prepared {
    cond: Option<Condition>,
    tree: PathTree,
    fields: PathTree,
}

/// `Ok(None)` when the rule lets the subscriber see nothing of `c`.
fn prepare(c: &Collection, schema: &Schema, who: &Identity, sub: &Subscription) -> ApiResult<Option<Prepared>> {
    let Some(cond) = access(c, schema, who, sub)? else {
        return Ok(None);
    };
    let (tree, fields) = shape(c, schema, sub)?;
    Ok(Some(Prepared { cond, tree, fields }))
}

/// The record of a row image (`columns` and their `values`) as `who` may see it, or `None`.
fn visible(
    conn: &Connection,
    schema: &Schema,
    c: &Collection,
    columns: &[String],
    values: &[Sql],
    who: &Identity,
    p: &Prepared,
) -> ApiResult<Option<Value>> {
    let Some(stored) = store::get_image(conn, c, columns, values, p.cond.as_ref())? else {
        return Ok(None);
    };
    let mut items = vec![public_record(c, &stored, who)];
    if !p.tree.0.is_empty() {
        let auth = auth_record(who);
        expand(conn, schema, c, &mut items, &p.tree, who, auth.as_ref())?;
    }
    Ok(items.pop().map(|v| pick(v, &p.fields)))
}

/// What, besides the identity, decides the events a subscription gets (its topic name only
/// labels them).
#[derive(PartialEq, Eq, Hash)]
struct SubKey<'a> {
    record: Option<&'a str>,
    filter: Option<&'a str>,
    expand: Option<&'a str>,
    fields: Option<&'a str>,
}

impl<'a> SubKey<'a> {
    fn of(sub: &'a Subscription) -> SubKey<'a> {
        SubKey {
            record: sub.record.as_deref(),
            filter: sub.filter.as_deref(),
            expand: sub.expand.as_deref(),
            fields: sub.fields.as_deref(),
        }
    }
}

/// Who a subscriber is, for rules and for the fields a record shows it: equal keys see equal
/// events. A signed-in caller is its record as its token loaded it: the same record at the same
/// `updated` holds the same fields, so two connections of one user share their checks until
/// one of them sees the record changed.
fn identity_key(who: &Identity) -> String {
    let updated = |r: &store::Stored| {
        r.data
            .get("updated")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match who {
        Identity::Guest => "guest".into(),
        Identity::Replica(id) => format!("replica:{id}"),
        Identity::Admin(a) => format!("admin:{}:{}", a.id(), updated(a)),
        Identity::User { db, collection, record } => {
            format!("user:{db}:{}:{}:{}", collection.id, record.id(), updated(record))
        }
    }
}

/// The row of `table` whose column `pk` is `id`, all columns in order.
fn current_row(
    conn: &Connection,
    table: &str,
    columns: &[String],
    pk: usize,
    id: &str,
) -> rusqlite::Result<Option<Vec<Sql>>> {
    use rusqlite::OptionalExtension;
    let Some(key) = columns.get(pk) else { return Ok(None) };
    let sql = format!(
        "SELECT * FROM {} WHERE {} = ?1",
        crate::util::quote_ident(table),
        crate::util::quote_ident(key)
    );
    conn.prepare_cached(&sql)?
        .query_row([id], |r| (0..columns.len()).map(|i| r.get::<_, Sql>(i)).collect())
        .optional()
}

/// The messages `changes` give each of `clients`, in order: one SSE message per matching
/// topic, one WebSocket message per collection.
///
/// Each event describes its row as the change left it: a create and a delete carry the whole
/// row in the changeset; an update carries the columns it changed, and takes the others from
/// the same row earlier in these changes, or else from the database now.
fn render(
    conn: &Connection,
    schema: &Schema,
    changes: &[Change],
    clients: &[Arc<Client>],
) -> Vec<(Arc<Client>, String)> {
    let mut out = Vec::new();
    let mut columns: HashMap<String, Vec<String>> = HashMap::new();
    let mut images: HashMap<(String, String), Vec<Sql>> = HashMap::new();
    let subs: Vec<(Identity, Arc<Vec<Subscription>>)> =
        clients.iter().map(|c| (c.identity(), c.subscriptions())).collect();
    // Rules, filters and shapes compiled once per (identity, subscription, collection), shared
    // by every client that is that identity with that subscription; `slots` maps
    // (client, subscription, collection) to it.
    let who_keys: Vec<String> = subs.iter().map(|(who, _)| identity_key(who)).collect();
    let mut shared: HashMap<(&str, SubKey<'_>, String), usize> = HashMap::new();
    let mut prepared: Vec<Option<Prepared>> = Vec::new();
    let mut slots: HashMap<(usize, usize, String), usize> = HashMap::new();
    // WebSocket events gathered per (client, collection), in first-seen order.
    let mut ws: Vec<((usize, String), Vec<Value>)> = Vec::new();
    for change in changes {
        let Some(c) = schema.get(&change.table).filter(|c| c.name == change.table) else {
            continue;
        };
        if !columns.contains_key(&c.name) {
            columns.insert(c.name.clone(), store::table_columns(conn, &c.name).unwrap_or_default());
        }
        let cols = columns.get(&c.name).map(Vec::as_slice).unwrap_or(&[]);
        let key = (c.name.clone(), change.id.clone());
        // The master's own events carry every column of an updated row; a session's (and a
        // replica's) leave the unchanged ones out, to be read from the row as it is now.
        let whole = change.values.len() == cols.len() && change.values.iter().all(Option::is_some);
        let base = match change.kind {
            Kind::Update if whole => None,
            Kind::Update => match images.remove(&key) {
                Some(image) => Some(image),
                None => current_row(conn, &c.name, cols, change.pk, &change.id).unwrap_or(None),
            },
            _ => None,
        };
        let image: Vec<Sql> = (0..cols.len())
            .map(|i| match change.values.get(i).cloned().flatten() {
                Some(v) => v,
                None => base.as_ref().and_then(|b| b.get(i).cloned()).unwrap_or(Sql::Null),
            })
            .collect();
        if change.kind == Kind::Update && !whole && base.is_none() {
            // Deleted since, and not seen here: its delete event follows.
            continue;
        }
        // The record each prepared subscription sees of this change, computed once.
        let mut seen: HashMap<usize, Option<Value>> = HashMap::new();
        for (i, client) in clients.iter().enumerate() {
            let (who, subs) = &subs[i];
            let wanted = subs.iter().enumerate().filter(|(_, s)| {
                (s.collection == c.name || s.collection == c.id) && s.record.as_ref().is_none_or(|r| *r == change.id)
            });
            for (j, sub) in wanted {
                let slot = *slots.entry((i, j, c.id.clone())).or_insert_with(|| {
                    *shared
                        .entry((who_keys[i].as_str(), SubKey::of(sub), c.id.clone()))
                        .or_insert_with(|| {
                            prepared.push(prepare(&c, schema, who, sub).unwrap_or_else(|e| {
                                log::debug!("realtime: subscription of client {} skipped: {e}", client.id);
                                None
                            }));
                            prepared.len() - 1
                        })
                });
                let Some(p) = prepared[slot].as_ref() else { continue };
                let record = seen.entry(slot).or_insert_with(|| {
                    visible(conn, schema, &c, cols, &image, who, p).unwrap_or_else(|e| {
                        log::debug!("realtime: event for client {} skipped: {e}", client.id);
                        None
                    })
                });
                let Some(record) = record.clone() else { continue };
                let data = json!({"action": change.kind.as_str(), "record": record});
                match client.protocol {
                    Protocol::Sse => out.push((client.clone(), sse_frame(&client.id, &sub.topic, &data))),
                    Protocol::WebSocket => {
                        let key = (i, c.name.clone());
                        let event = json!({"id": change.id, "data": data});
                        match ws.iter_mut().find(|(k, _)| *k == key) {
                            Some((_, events)) => events.push(event),
                            None => ws.push((key, vec![event])),
                        }
                        // One event per change for a WebSocket client, however many of its
                        // subscriptions match.
                        break;
                    }
                }
            }
        }
        if change.kind != Kind::Delete {
            images.insert(key, image);
        }
    }
    for ((i, collection), events) in ws {
        out.push((
            clients[i].clone(),
            json!({"collection": collection, "events": events}).to_string(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::session::Session;

    #[test]
    fn a_changeset_decodes_to_its_rows() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE posts (id TEXT PRIMARY KEY NOT NULL, title TEXT, n INTEGER)")
            .unwrap();
        conn.execute_batch("INSERT INTO posts VALUES ('b', 'old', 2), ('c', 'gone', 3)")
            .unwrap();
        let mut session = Session::new(&conn).unwrap();
        session.attach(None::<&str>).unwrap();
        conn.execute_batch(
            "INSERT INTO posts VALUES ('a', 'new', 1); UPDATE posts SET title = 'edited' WHERE id = 'b';
             DELETE FROM posts WHERE id = 'c';",
        )
        .unwrap();
        let mut cs = Vec::new();
        session.changeset_strm(&mut cs).unwrap();
        let mut got = decode(&cs).unwrap();
        got.sort_by(|a, b| a.id.cmp(&b.id));
        let kinds: Vec<(&str, Kind)> = got.iter().map(|c| (c.id.as_str(), c.kind)).collect();
        assert_eq!(kinds, [("a", Kind::Create), ("b", Kind::Update), ("c", Kind::Delete)]);
        assert_eq!(
            got[2].values,
            [
                Some(Sql::Text("c".into())),
                Some(Sql::Text("gone".into())),
                Some(Sql::Integer(3))
            ]
        );
        // An update carries the key and the columns it changed.
        assert_eq!(
            got[1].values,
            [Some(Sql::Text("b".into())), Some(Sql::Text("edited".into())), None]
        );
        assert!(got.iter().all(|c| c.table == "posts"));
        assert!(decode(b"not a changeset").is_err() || decode(b"not a changeset").unwrap().is_empty());
    }
}
