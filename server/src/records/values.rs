//! Record values: checking submitted JSON against field types, turning it into SQL values, and
//! turning stored rows back into record JSON.

use rusqlite::types::Value as Sql;
use serde_json::{Map, Value, json};

use crate::collections::model::{Collection, Field, FieldType};
use crate::error::{FieldErrors, field_error};

/// Parses the date forms clients send (RFC 3339, `YYYY-MM-DD HH:MM:SS[.sss][Z]`, `YYYY-MM-DD`)
/// into the API's canonical `YYYY-MM-DD HH:MM:SS.sssZ` (UTC).
pub fn parse_date(s: &str) -> Option<String> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    let s = s.trim();
    let fmt = |dt: DateTime<Utc>| dt.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(fmt(dt.with_timezone(&Utc)));
    }
    let bare = s.strip_suffix('Z').unwrap_or(s);
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(bare, f) {
            return Some(fmt(dt.and_utc()));
        }
    }
    NaiveDate::parse_from_str(bare, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|dt| fmt(dt.and_utc()))
}

/// Whether `s` looks like an email address (local@domain.tld, no spaces).
pub fn parse_email(s: &str) -> bool {
    is_email(s)
}

fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && domain.len() <= 255
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && domain.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-')
}

fn is_url(s: &str) -> bool {
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(r) => {
            let host = r.split(['/', '?', '#']).next().unwrap_or("");
            !host.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

/// The value a field has when nothing was submitted.
pub fn zero_value(f: &Field) -> Value {
    match f.kind {
        FieldType::Number => json!(0),
        FieldType::Bool => json!(false),
        FieldType::Json => Value::Null,
        _ if f.is_multi() => json!([]),
        _ => json!(""),
    }
}

fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(_) => false,
    }
}

type Problem = (&'static str, String);

fn invalid(msg: impl Into<String>) -> Problem {
    ("validation_invalid_value", msg.into())
}

/// Converts one submitted value to the field's canonical JSON value, or says what is wrong.
fn normalize(f: &Field, v: &Value) -> Result<Value, Problem> {
    let o = &f.options;
    match f.kind {
        FieldType::Text | FieldType::Editor | FieldType::Email | FieldType::Url | FieldType::Date => {
            let s = match v {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                Value::Number(n) if f.kind == FieldType::Text => n.to_string(),
                Value::Bool(b) if f.kind == FieldType::Text => b.to_string(),
                _ => return Err(invalid("Must be a string.")),
            };
            if s.is_empty() {
                return Ok(json!(""));
            }
            match f.kind {
                FieldType::Email if !is_email(&s) => {
                    return Err(("validation_invalid_email", "Must be a valid email address.".into()));
                }
                FieldType::Url if !is_url(&s) => {
                    return Err(("validation_invalid_url", "Must be a valid http(s) URL.".into()));
                }
                FieldType::Date => {
                    let d = parse_date(&s)
                        .ok_or_else(|| ("validation_invalid_date", "Must be a valid date.".to_string()))?;
                    for (bound, is_min) in [(&o.min, true), (&o.max, false)] {
                        if let Some(b) = bound.as_ref().and_then(Value::as_str).and_then(parse_date) {
                            if (is_min && d < b) || (!is_min && d > b) {
                                return Err(invalid(format!(
                                    "Must be {} {b}.",
                                    if is_min { "on or after" } else { "on or before" }
                                )));
                            }
                        }
                    }
                    return Ok(json!(d));
                }
                _ => {}
            }
            let len = s.chars().count() as f64;
            if let Some(min) = o.min.as_ref().and_then(Value::as_f64) {
                if f.kind == FieldType::Text && len < min {
                    return Err((
                        "validation_min_text_constraint",
                        format!("Must be at least {min} characters."),
                    ));
                }
            }
            if let Some(max) = o.max.as_ref().and_then(Value::as_f64) {
                if f.kind == FieldType::Text && len > max {
                    return Err((
                        "validation_max_text_constraint",
                        format!("Must be at most {max} characters."),
                    ));
                }
            }
            if let Some(max) = o.max_size {
                if s.len() as u64 > max {
                    return Err((
                        "validation_max_size_constraint",
                        format!("Must be at most {max} bytes."),
                    ));
                }
            }
            if let Some(p) = &o.pattern {
                // The pattern was checked when the field was defined.
                if regex::Regex::new(p).map(|re| !re.is_match(&s)).unwrap_or(true) {
                    return Err((
                        "validation_invalid_format",
                        "Does not match the required format.".into(),
                    ));
                }
            }
            Ok(json!(s))
        }
        FieldType::Number => {
            let n = match v {
                Value::Null => 0.0,
                Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
                Value::String(s) if s.trim().is_empty() => 0.0,
                Value::String(s) => s.trim().parse::<f64>().map_err(|_| invalid("Must be a number."))?,
                _ => return Err(invalid("Must be a number.")),
            };
            if !n.is_finite() {
                return Err(invalid("Must be a finite number."));
            }
            if o.only_int == Some(true) && n.fract() != 0.0 {
                return Err(invalid("Must be an integer."));
            }
            if let Some(min) = o.min.as_ref().and_then(Value::as_f64) {
                if n < min {
                    return Err(("validation_min_number_constraint", format!("Must be at least {min}.")));
                }
            }
            if let Some(max) = o.max.as_ref().and_then(Value::as_f64) {
                if n > max {
                    return Err(("validation_max_number_constraint", format!("Must be at most {max}.")));
                }
            }
            Ok(number_json(n))
        }
        FieldType::Bool => match v {
            Value::Null => Ok(json!(false)),
            Value::Bool(b) => Ok(json!(b)),
            Value::Number(n) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => {
                Ok(json!(n.as_f64() == Some(1.0)))
            }
            Value::String(s) if s == "true" || s == "1" => Ok(json!(true)),
            Value::String(s) if s == "false" || s == "0" || s.is_empty() => Ok(json!(false)),
            _ => Err(invalid("Must be a boolean.")),
        },
        FieldType::Json => {
            if let Some(max) = o.max_size {
                if v.to_string().len() as u64 > max {
                    return Err((
                        "validation_json_size_limit",
                        format!("Must be at most {max} bytes of JSON."),
                    ));
                }
            }
            Ok(v.clone())
        }
        FieldType::Select | FieldType::Relation | FieldType::File => {
            let items: Vec<String> = match v {
                Value::Null => vec![],
                Value::String(s) if s.is_empty() => vec![],
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => {
                    let mut out = Vec::new();
                    for x in a {
                        match x.as_str() {
                            Some(s) if !s.is_empty() => {
                                if !out.contains(&s.to_string()) {
                                    out.push(s.to_string());
                                }
                            }
                            Some(_) => {}
                            None => return Err(invalid("Must be a string or a list of strings.")),
                        }
                    }
                    out
                }
                _ => return Err(invalid("Must be a string or a list of strings.")),
            };
            let max = o.max_select.unwrap_or(1) as usize;
            if items.len() > max {
                return Err(("validation_too_many_values", format!("Select at most {max}.")));
            }
            if f.kind == FieldType::Select {
                let allowed = o.values.as_deref().unwrap_or_default();
                if let Some(bad) = items.iter().find(|i| !allowed.contains(i)) {
                    return Err(invalid(format!("'{bad}' is not one of the allowed values.")));
                }
            }
            if f.is_multi() {
                Ok(json!(items))
            } else {
                Ok(json!(items.into_iter().next().unwrap_or_default()))
            }
        }
    }
}

/// A whole number as a JSON integer, anything else as a float.
pub fn number_json(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        json!(n as i64)
    } else {
        json!(n)
    }
}

/// The SQL value stored for a canonical JSON value of field `f`.
pub fn to_sql(f: &Field, v: &Value) -> Sql {
    match (f.kind, v) {
        (FieldType::Json, Value::Null) => Sql::Null,
        (FieldType::Json, v) => Sql::Text(v.to_string()),
        (_, Value::Array(_)) => Sql::Text(v.to_string()),
        (_, Value::Bool(b)) => Sql::Integer(*b as i64),
        (_, Value::Number(n)) => match n.as_i64() {
            Some(i) => Sql::Integer(i),
            None => Sql::Real(n.as_f64().unwrap_or(0.0)),
        },
        (_, Value::String(s)) => Sql::Text(s.clone()),
        (_, Value::Null) => Sql::Text(String::new()),
        (_, Value::Object(_)) => Sql::Text(v.to_string()),
    }
}

/// The API value of a stored SQL value of field `f`.
pub fn from_sql(f: &Field, v: Sql) -> Value {
    match (f.kind, v) {
        (FieldType::Bool, Sql::Integer(i)) => json!(i != 0),
        (FieldType::Number, Sql::Integer(i)) => json!(i),
        (FieldType::Number, Sql::Real(r)) => number_json(r),
        (FieldType::Json, Sql::Text(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        (_, Sql::Text(s)) if f.is_multi() => serde_json::from_str(&s).unwrap_or_else(|_| json!([])),
        (_, Sql::Null) => zero_value(f),
        (_, Sql::Text(s)) => json!(s),
        (_, Sql::Integer(i)) => json!(i),
        (_, Sql::Real(r)) => number_json(r),
        (_, Sql::Blob(_)) => Value::Null,
    }
}

/// Changes requested by one create or update, per column, already validated.
pub type Changes = Vec<(String, Sql)>;

/// Validates the submitted `body` for collection `c`. `current` is the record being updated
/// (`None` on create, where every field gets a value). Handles the `field+` / `field-`
/// modifiers for numbers and multi-value fields. Returns the changes and the new JSON values of
/// relation fields (which the caller checks against the database).
pub fn prepare(
    c: &Collection,
    body: &Map<String, Value>,
    current: Option<&Map<String, Value>>,
) -> Result<(Changes, Vec<(Field, Value)>), FieldErrors> {
    let mut errors = FieldErrors::new();
    let mut changes = Changes::new();
    let mut relations = Vec::new();
    for f in c.live_fields() {
        let plus = body.get(&format!("{}+", f.name));
        let minus = body.get(&format!("{}-", f.name));
        let direct = body.get(&f.name);
        if current.is_some() && direct.is_none() && plus.is_none() && minus.is_none() {
            continue;
        }
        let base = match direct {
            Some(v) => normalize(f, v),
            None => Ok(current
                .and_then(|m| m.get(&f.name))
                .cloned()
                .unwrap_or_else(|| zero_value(f))),
        };
        let value = base.and_then(|mut v| {
            for (delta, sign) in [(plus, 1.0), (minus, -1.0)] {
                if let Some(d) = delta {
                    v = apply_modifier(f, v, d, sign)?;
                }
            }
            if plus.is_some() || minus.is_some() {
                normalize(f, &v)
            } else {
                Ok(v)
            }
        });
        match value {
            Ok(v) => {
                if f.required && is_blank(&v) {
                    field_error(&mut errors, &f.name, "validation_required", "Missing required value.");
                    continue;
                }
                if f.kind == FieldType::File && !is_blank(&v) {
                    let old = current.and_then(|m| m.get(&f.name)).cloned().unwrap_or(Value::Null);
                    let kept = |name: &Value| old == *name || old.as_array().is_some_and(|a| a.contains(name));
                    let all_kept = match &v {
                        Value::Array(a) => a.iter().all(kept),
                        other => kept(other),
                    };
                    if !all_kept {
                        field_error(
                            &mut errors,
                            &f.name,
                            "validation_invalid_file",
                            "Files are uploaded with multipart/form-data.",
                        );
                        continue;
                    }
                }
                if f.kind == FieldType::Relation && !is_blank(&v) {
                    relations.push((f.clone(), v.clone()));
                }
                changes.push((f.name.clone(), to_sql(f, &v)));
            }
            Err((code, msg)) => field_error(&mut errors, &f.name, code, msg),
        }
    }
    if errors.is_empty() {
        Ok((changes, relations))
    } else {
        Err(errors)
    }
}

fn apply_modifier(f: &Field, v: Value, delta: &Value, sign: f64) -> Result<Value, Problem> {
    if f.kind == FieldType::Number {
        let d = delta
            .as_f64()
            .or_else(|| delta.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| invalid("The modifier needs a number."))?;
        let cur = v.as_f64().unwrap_or(0.0);
        let sum = cur + sign * d;
        // `json!(inf)` is null, which would be stored as 0: refuse instead.
        if !sum.is_finite() {
            return Err(invalid("Must be a finite number."));
        }
        return Ok(number_json(sum));
    }
    if f.is_multi() {
        let mut items: Vec<Value> = v.as_array().cloned().unwrap_or_default();
        let given: Vec<Value> = match delta {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        if sign > 0.0 {
            items.extend(given);
        } else {
            items.retain(|x| !given.contains(x));
        }
        return Ok(Value::Array(items));
    }
    Err(invalid("Modifiers apply to number and multi-value fields only."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_normalize() {
        assert_eq!(parse_date("2024-01-02").as_deref(), Some("2024-01-02 00:00:00.000Z"));
        assert_eq!(
            parse_date("2024-01-02T03:04:05+01:00").as_deref(),
            Some("2024-01-02 02:04:05.000Z")
        );
        assert_eq!(
            parse_date("2024-01-02 03:04:05.123Z").as_deref(),
            Some("2024-01-02 03:04:05.123Z")
        );
        assert_eq!(parse_date("yesterday"), None);
    }

    #[test]
    fn emails_and_urls() {
        assert!(is_email("a@b.co"));
        assert!(!is_email("a@b") && !is_email("@b.co") && !is_email("a b@c.de"));
        assert!(is_url("https://x.y/z?q") && !is_url("ftp://x") && !is_url("http://"));
    }
}
