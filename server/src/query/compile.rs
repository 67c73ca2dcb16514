//! Compiles a parsed filter to an SQL condition over one collection's table, with every value
//! a bound parameter: user text never becomes SQL text. Field names are checked against the
//! collection (and, through relations, against the target collections) and quoted.

use rusqlite::types::Value as Sql;
use serde_json::{Map, Value};

use super::parse::{Expr, FilterError, Op, Operand};
use crate::collections::model::{Collection, FieldType};
use crate::collections::store::Schema;
use crate::util::quote_ident;

/// What a filter can see besides the record: the caller and the submitted body.
pub struct Context<'a> {
    pub schema: &'a Schema,
    /// The signed-in caller's record (`id`, `collectionId`, `collectionName`, fields), if any.
    pub auth: Option<&'a Map<String, Value>>,
    /// The submitted body (create and update rules).
    pub body: Option<&'a Map<String, Value>>,
    /// `@now`, in the API's date format.
    pub now: String,
    /// Whether hidden fields may be named: true for admins and for rules (which admins write),
    /// false for the filters and sorts of everyone else, so hidden values cannot be probed.
    pub admin: bool,
}

/// An SQL condition and its parameters (`?` placeholders, in order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Condition {
    pub sql: String,
    pub params: Vec<Sql>,
}

/// A compiled operand: one value, or a set of values.
enum Term {
    Scalar(String),
    Set(SetQuery),
}

/// A set of values as the parts of a query: tables and table-valued functions joined left to
/// right (so `json_each(x.col)` may follow the table `x`), conditions, and the value.
struct SetQuery {
    from: Vec<String>,
    wheres: Vec<String>,
    value: String,
}

impl SetQuery {
    fn sql(&self) -> String {
        let mut q = format!("SELECT {} AS v FROM {}", self.value, self.from.join(", "));
        if !self.wheres.is_empty() {
            q.push_str(&format!(" WHERE {}", self.wheres.join(" AND ")));
        }
        q
    }
}

struct Compiler<'a> {
    ctx: &'a Context<'a>,
    params: Vec<Sql>,
    aliases: usize,
    /// Whether the comparison being compiled is an any-of form (`?=` …): then a json field is
    /// read as the set of its elements.
    any: bool,
    /// The `@collection` joins the any-of comparisons made: (collection and alias as written,
    /// the SQL alias, the quoted table), joined once around the whole condition.
    joins: Vec<(String, String, String)>,
}

fn fail<T>(at: usize, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError {
        message: message.into(),
        at,
    })
}

fn json_to_sql(v: Option<&Value>) -> Sql {
    match v {
        None | Some(Value::Null) => Sql::Null,
        Some(Value::Bool(b)) => Sql::Integer(*b as i64),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Sql::Integer)
            .unwrap_or_else(|| Sql::Real(n.as_f64().unwrap_or(0.0))),
        Some(Value::String(s)) => Sql::Text(s.clone()),
        Some(other) => Sql::Text(other.to_string()),
    }
}

impl Compiler<'_> {
    fn param(&mut self, v: Sql) -> String {
        self.params.push(v);
        "?".to_string()
    }

    fn alias(&mut self) -> String {
        self.aliases += 1;
        format!("_q{}", self.aliases)
    }

    /// Whether a filter may read the records of `target` through a relation, a back-relation
    /// or `@collection`: admins and rules may; everyone else only collections everyone may view.
    fn may_read(&self, target: &Collection, through: &str, at: usize) -> Result<(), FilterError> {
        if self.ctx.admin || target.view_rule.as_deref().map(str::trim) == Some("") {
            return Ok(());
        }
        fail(
            at,
            format!(
                "'{through}' leads to '{}', whose records are not public; it cannot be filtered through.",
                target.name
            ),
        )
    }

    /// `<collection>_via_<field>` as seen from `c` (aliased `alias`): the records of another
    /// collection (or of `c`) whose relation `field` points at this record, as a set.
    fn back_relation(&mut self, c: &Collection, alias: &str, path: &[String], at: usize) -> Result<Term, FilterError> {
        let name = &path[0];
        let unknown = || fail(at, format!("Unknown field '{name}' in '{}'.", c.name));
        let Some((source, via)) = name.rsplit_once("_via_") else {
            return unknown();
        };
        let Some(source) = self.ctx.schema.get(source).filter(|s| s.name == source) else {
            return unknown();
        };
        let relation = source.field(via).filter(|f| {
            f.kind == FieldType::Relation
                && f.options.collection_id.as_deref() == Some(c.id.as_str())
                && (!f.hidden || self.ctx.admin)
        });
        let Some(relation) = relation else {
            return fail(
                at,
                format!(
                    "'{name}': '{}' has no relation field '{via}' to '{}'.",
                    source.name, c.name
                ),
            );
        };
        self.may_read(&source, name, at)?;
        let t = self.alias();
        let col = format!("{t}.{}", quote_ident(via));
        let link = if relation.is_multi() {
            format!("{alias}.\"id\" IN (SELECT value FROM json_each({col}))")
        } else {
            format!("{col} = {alias}.\"id\"")
        };
        let inner = if path.len() == 1 {
            Term::Scalar(format!("{t}.\"id\""))
        } else {
            self.field(&source, &t, &path[1..], at)?
        };
        Ok(joined(format!("{} {t}", quote_ident(&source.name)), Some(link), inner))
    }

    /// `@collection.<name>[:alias].<path>`. An any-of comparison reads it from the record joined
    /// around the whole condition (one per name and alias, as PocketBase joins it); any other
    /// comparison reads it as the set of that value over every record of the collection.
    fn collection(&mut self, name: &str, join: &str, path: &[String], at: usize) -> Result<Term, FilterError> {
        let Some(target) = self.ctx.schema.get(name).filter(|t| t.name == name) else {
            return fail(at, format!("Unknown collection '{name}' in '@collection.{name}'."));
        };
        self.may_read(&target, &format!("@collection.{name}"), at)?;
        let table = quote_ident(&target.name);
        if self.any {
            let key = format!("{name}:{join}");
            let sql_alias = match self.joins.iter().find(|(k, _, _)| *k == key) {
                Some((_, a, _)) => a.clone(),
                None => {
                    let a = format!("_c{}", self.joins.len() + 1);
                    self.joins.push((key, a.clone(), table));
                    a
                }
            };
            return self.field(&target, &sql_alias, path, at);
        }
        let t = self.alias();
        let inner = self.field(&target, &t, path, at)?;
        Ok(joined(format!("{table} {t}"), None, inner))
    }

    /// A column of `c` (seen as `alias`), following relations for longer paths.
    fn field(&mut self, c: &Collection, alias: &str, path: &[String], at: usize) -> Result<Term, FilterError> {
        let name = &path[0];
        if name.contains("_via_") && c.field(name).is_none() {
            return self.back_relation(c, alias, path, at);
        }
        let col = format!("{alias}.{}", quote_ident(name));
        if path.len() == 1 {
            // Emails are private unless shown: only admins (and rules) may filter or sort by them.
            let email_ok = name != "email" || self.ctx.admin;
            if ["id", "created", "updated"].contains(&name.as_str())
                || (c.is_auth() && ["email", "emailVisibility", "verified"].contains(&name.as_str()) && email_ok)
            {
                return Ok(Term::Scalar(col));
            }
            return match c.field(name) {
                Some(f) if f.hidden && !self.ctx.admin => fail(at, format!("Unknown field '{name}' in '{}'.", c.name)),
                Some(f) if f.is_multi() || (self.any && f.kind == FieldType::Json) => {
                    let je = self.alias();
                    Ok(Term::Set(SetQuery {
                        from: vec![format!("json_each({col}) {je}")],
                        wheres: vec![],
                        value: format!("{je}.value"),
                    }))
                }
                Some(_) => Ok(Term::Scalar(col)),
                None => fail(at, format!("Unknown field '{name}' in '{}'.", c.name)),
            };
        }
        let Some(f) = c.field(name).filter(|f| !f.hidden || self.ctx.admin) else {
            return fail(at, format!("Unknown field '{name}' in '{}'.", c.name));
        };
        if f.kind != FieldType::Relation {
            return fail(
                at,
                format!("'{name}' is not a relation, so '{}' cannot follow it.", path.join(".")),
            );
        }
        let target = f
            .options
            .collection_id
            .as_deref()
            .and_then(|id| self.ctx.schema.by_id(id));
        let Some(target) = target else {
            return fail(at, format!("The collection related by '{name}' no longer exists."));
        };
        // Following a relation reads the target's records.
        self.may_read(&target, name, at)?;
        let t = self.alias();
        let table = quote_ident(&target.name);
        let inner = self.field(&target, &t, &path[1..], at)?;
        let link = if f.is_multi() {
            format!("{t}.\"id\" IN (SELECT value FROM json_each({col}))")
        } else {
            format!("{t}.\"id\" = {col}")
        };
        Ok(match (inner, f.is_multi()) {
            (Term::Scalar(e), false) => Term::Scalar(format!("(SELECT {e} FROM {table} {t} WHERE {link})")),
            (Term::Scalar(e), true) => Term::Set(SetQuery {
                from: vec![format!("{table} {t}")],
                wheres: vec![link],
                value: e,
            }),
            (Term::Set(inner), _) => {
                let mut from = vec![format!("{table} {t}")];
                from.extend(inner.from);
                let mut wheres = vec![link];
                wheres.extend(inner.wheres);
                Term::Set(SetQuery {
                    from,
                    wheres,
                    value: inner.value,
                })
            }
        })
    }

    fn operand(&mut self, c: &Collection, o: &Operand, at: usize) -> Result<Term, FilterError> {
        Ok(match o {
            Operand::Field(path) => return self.field(c, "_t", path, at),
            Operand::Collection { name, alias, path } => return self.collection(name, alias, path, at),
            Operand::Str(s) => Term::Scalar(self.param(Sql::Text(s.clone()))),
            Operand::Num(n) => {
                let v = if n.fract() == 0.0 && n.abs() < 9.0e15 {
                    Sql::Integer(*n as i64)
                } else {
                    Sql::Real(*n)
                };
                Term::Scalar(self.param(v))
            }
            Operand::Bool(b) => Term::Scalar(self.param(Sql::Integer(*b as i64))),
            Operand::Null => Term::Scalar("NULL".into()),
            Operand::Now => Term::Scalar(self.param(Sql::Text(self.ctx.now.clone()))),
            // A guest's @request.auth values are empty strings, as in PocketBase.
            Operand::Auth(_) if self.ctx.auth.is_none() => Term::Scalar(self.param(Sql::Text(String::new()))),
            Operand::Auth(path) => {
                let v = match path.as_slice() {
                    [] => self.ctx.auth.and_then(|a| a.get("id")),
                    [key] => self.ctx.auth.and_then(|a| a.get(key)),
                    _ => return fail(at, "@request.auth paths may name one field."),
                };
                match v {
                    Some(Value::Array(items)) => {
                        let je = self.alias();
                        let list = self.param(Sql::Text(Value::Array(items.clone()).to_string()));
                        Term::Set(SetQuery {
                            from: vec![format!("json_each({list}) {je}")],
                            wheres: vec![],
                            value: format!("{je}.value"),
                        })
                    }
                    other => Term::Scalar(self.param(json_to_sql(other))),
                }
            }
            Operand::Body(path) => match path.as_slice() {
                [key] => Term::Scalar(self.param(json_to_sql(self.ctx.body.and_then(|b| b.get(key))))),
                _ => return fail(at, "@request.body paths may name one field."),
            },
        })
    }

    fn compare(&mut self, l: &str, op: Op, r: &str, r_is_null: bool) -> String {
        if r_is_null {
            return match op {
                // Each fragment appears once: it may hold `?` placeholders bound by position.
                Op::Eq => format!("COALESCE({l}, '') IN ('', '[]')"),
                Op::Neq => format!("COALESCE({l}, '') NOT IN ('', '[]')"),
                // Ordering against null is never true; `l` stays, since its parameters are bound.
                _ => format!("({l} IS NULL AND 0)"),
            };
        }
        match op {
            Op::Eq => format!("{l} IS {r}"),
            Op::Neq => format!("{l} IS NOT {r}"),
            Op::Gt => format!("{l} > {r}"),
            Op::Gte => format!("{l} >= {r}"),
            Op::Lt => format!("{l} < {r}"),
            Op::Lte => format!("{l} <= {r}"),
            Op::Like => format!("{l} LIKE {r} ESCAPE '\\'"),
            Op::NotLike => format!("{l} NOT LIKE {r} ESCAPE '\\'"),
        }
    }

    fn expr(&mut self, c: &Collection, e: &Expr) -> Result<String, FilterError> {
        match e {
            Expr::And(a, b) => Ok(format!("({} AND {})", self.expr(c, a)?, self.expr(c, b)?)),
            Expr::Or(a, b) => Ok(format!("({} OR {})", self.expr(c, a)?, self.expr(c, b)?)),
            Expr::Cmp {
                left,
                op,
                any,
                right,
                at,
            } => {
                self.any = *any;
                // Placeholders are positional: the parameters of each side are set aside and
                // bound below in the order the two sides appear in the SQL text.
                let base = self.params.len();
                let l = self.operand(c, left, *at)?;
                let l_params = self.params.split_off(base);
                // `~` wraps a literal in % unless it already holds one (as PocketBase).
                let r = match (op, right) {
                    (Op::Like | Op::NotLike, Operand::Str(s)) => {
                        let pattern = if s.contains('%') {
                            s.clone()
                        } else {
                            format!("%{}%", s.replace('\\', "\\\\").replace('_', "\\_"))
                        };
                        Term::Scalar(self.param(Sql::Text(pattern)))
                    }
                    (Op::Like | Op::NotLike, other) => match self.operand(c, other, *at)? {
                        Term::Scalar(s) => Term::Scalar(format!("('%' || {s} || '%')")),
                        set => set,
                    },
                    _ => self.operand(c, right, *at)?,
                };
                let r_params = self.params.split_off(base);
                let r_null = matches!(right, Operand::Null);
                let mut right_first = false;
                let sql = match (l, r) {
                    (Term::Scalar(l), Term::Scalar(r)) => self.compare(&l, *op, &r, r_null),
                    // A multi-value operand is "null" when it holds no value.
                    (Term::Set(s), Term::Scalar(_)) if r_null && matches!(op, Op::Eq | Op::Neq) => {
                        let exists = format!("EXISTS (SELECT 1 FROM ({}) _e)", s.sql());
                        if *op == Op::Eq { format!("NOT {exists}") } else { exists }
                    }
                    (Term::Set(s), Term::Scalar(r)) => {
                        let s = s.sql();
                        let cond = self.compare("_e.v", *op, &r, r_null);
                        if *any {
                            format!("EXISTS (SELECT 1 FROM ({s}) _e WHERE {cond})")
                        } else {
                            right_first = true;
                            // Every value matches, and there is at least one: one pass over the set.
                            format!(
                                "(SELECT COUNT(*) > 0 AND COALESCE(SUM(CASE WHEN {cond} THEN 0 ELSE 1 END), 0) = 0 FROM ({s}) _e)"
                            )
                        }
                    }
                    (Term::Scalar(l), Term::Set(s)) => {
                        right_first = true;
                        let s = s.sql();
                        let cond = self.compare(&l, *op, "_e.v", false);
                        format!("EXISTS (SELECT 1 FROM ({s}) _e WHERE {cond})")
                    }
                    (Term::Set(a), Term::Set(b)) => {
                        let (a, b) = (a.sql(), b.sql());
                        let cond = self.compare("_a.v", *op, "_b.v", false);
                        format!("EXISTS (SELECT 1 FROM ({a}) _a, ({b}) _b WHERE {cond})")
                    }
                };
                let (first, second) = if right_first {
                    (r_params, l_params)
                } else {
                    (l_params, r_params)
                };
                self.params.extend(first);
                self.params.extend(second);
                Ok(sql)
            }
        }
    }
}

/// `inner` read through the records of `from` (a table and its alias) that `link` selects:
/// always a set.
fn joined(from: String, link: Option<String>, inner: Term) -> Term {
    let wheres: Vec<String> = link.into_iter().collect();
    match inner {
        Term::Scalar(value) => Term::Set(SetQuery {
            from: vec![from],
            wheres,
            value,
        }),
        Term::Set(inner) => {
            let mut all_from = vec![from];
            all_from.extend(inner.from);
            let mut all_wheres = wheres;
            all_wheres.extend(inner.wheres);
            Term::Set(SetQuery {
                from: all_from,
                wheres: all_wheres,
                value: inner.value,
            })
        }
    }
}

/// Compiles `e` to a condition on collection `c`, whose table must be aliased `_t` in the query.
pub fn compile(e: &Expr, c: &Collection, ctx: &Context) -> Result<Condition, FilterError> {
    let mut comp = Compiler {
        ctx,
        params: Vec::new(),
        aliases: 0,
        any: false,
        joins: Vec::new(),
    };
    let mut sql = comp.expr(c, e)?;
    let mut params = comp.params;
    // A collection with no records joins one record of nulls, as PocketBase's LEFT JOIN does,
    // so `@collection.x.a ?= 1 || true` still holds.
    match comp.joins.as_slice() {
        [] => {}
        // The usual case, written so that SQLite can look the joined record up by an index:
        // an inner join, or else the record of nulls when the collection is empty. The
        // condition appears twice, so its parameters are bound twice.
        [(_, alias, table)] => {
            sql = format!(
                "(EXISTS (SELECT 1 FROM {table} {alias} WHERE {sql}) OR (NOT EXISTS (SELECT 1 FROM {table}) \
                 AND EXISTS (SELECT 1 FROM (SELECT 1) _one LEFT JOIN {table} {alias} ON 0 WHERE {sql})))"
            );
            params.extend(params.clone());
        }
        joins => {
            let joins: String = joins
                .iter()
                .map(|(_, alias, table)| format!(" LEFT JOIN {table} {alias} ON 1"))
                .collect();
            sql = format!("EXISTS (SELECT 1 FROM (SELECT 1) _one{joins} WHERE {sql})");
        }
    }
    Ok(Condition { sql, params })
}

/// The SQL of one value of `c` (aliased `_t`) reached by a dotted path such as `author.name`,
/// for sorting. Paths to several values (multi-value fields) are refused.
pub fn scalar_path(c: &Collection, schema: &Schema, path: &str, admin: bool) -> Result<String, FilterError> {
    let parts: Vec<String> = path.split('.').map(str::to_string).collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 7 {
        return fail(0, format!("'{path}' is not a field path."));
    }
    let ctx = Context {
        schema,
        auth: None,
        body: None,
        now: String::new(),
        admin,
    };
    let mut comp = Compiler {
        ctx: &ctx,
        params: Vec::new(),
        aliases: 100,
        any: false,
        joins: Vec::new(),
    };
    match comp.field(c, "_t", &parts, 0)? {
        Term::Scalar(sql) => Ok(sql),
        Term::Set(_) => fail(0, format!("Cannot sort by '{path}': it holds several values.")),
    }
}
