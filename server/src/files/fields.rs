//! What a create or update does to `file` fields: the kept, removed and added names, checked
//! against `maxSelect`, `maxSize` and `mimeTypes`, as PocketBase does it.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::collections::model::{Collection, FieldType};
use crate::error::{FieldErrors, field_error};

/// An uploaded file with the name it will be stored under.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The part's name: `field` (replace the field's files) or `field+` (append).
    pub key: String,
    pub content_type: String,
    pub size: u64,
    pub tmp: PathBuf,
    pub name: String,
    pub sha256: String,
}

/// The outcome for the file fields of one write.
#[derive(Debug, Default)]
pub struct Plan {
    /// New values of the file fields the write touches.
    pub values: Vec<(String, Value)>,
    /// Uploads to place (indexes into the pending list).
    pub place: Vec<usize>,
    /// Stored names the write drops (deleted once it committed).
    pub dropped: Vec<String>,
}

fn names(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

/// Takes the file-field keys (`f`, `f-`, `f+`) out of `body` and works out each touched file
/// field's new value from them, the uploads and the `current` values (`None` on create).
pub fn plan(
    c: &Collection,
    body: &mut Map<String, Value>,
    uploads: &[Pending],
    current: Option<&Map<String, Value>>,
) -> Result<Plan, FieldErrors> {
    let mut out = Plan::default();
    let mut errors = FieldErrors::new();
    for f in c.live_fields().filter(|f| f.kind == FieldType::File) {
        let given = body.remove(&f.name);
        let minus = body.remove(&format!("{}-", f.name));
        body.remove(&format!("{}+", f.name));
        let replace: Vec<usize> = (0..uploads.len()).filter(|i| uploads[*i].key == f.name).collect();
        let append: Vec<usize> = (0..uploads.len())
            .filter(|i| uploads[*i].key == format!("{}+", f.name))
            .collect();
        if given.is_none() && minus.is_none() && replace.is_empty() && append.is_empty() {
            if current.is_none() && f.required {
                field_error(&mut errors, &f.name, "validation_required", "Missing required value.");
            }
            continue;
        }
        let old = names(current.and_then(|m| m.get(&f.name)));
        let mut value: Vec<String> = match &given {
            Some(v) => {
                let kept = names(Some(v));
                if let Some(bad) = kept.iter().find(|n| !old.contains(n)) {
                    field_error(
                        &mut errors,
                        &f.name,
                        "validation_invalid_file",
                        format!("'{bad}' is not a file of this record: upload files with multipart/form-data."),
                    );
                    continue;
                }
                kept
            }
            None if !replace.is_empty() => Vec::new(),
            None => old.clone(),
        };
        let removed = names(minus.as_ref());
        value.retain(|n| !removed.contains(n));
        let max = f.options.max_select.unwrap_or(1).max(1) as usize;
        let added: Vec<usize> = replace.iter().chain(&append).copied().collect();
        if max == 1 && !added.is_empty() {
            // A single-file field: a new file takes the place of the old one.
            value.clear();
        }
        let allowed = f.options.mime_types.clone().unwrap_or_default();
        let mut bad_type = None;
        for &i in &added {
            let u = &uploads[i];
            if !allowed.is_empty() && !allowed.iter().any(|t| t.eq_ignore_ascii_case(&u.content_type)) {
                bad_type = Some(u.content_type.clone());
            }
            value.push(u.name.clone());
        }
        if let Some(t) = bad_type {
            field_error(
                &mut errors,
                &f.name,
                "validation_invalid_mime_type",
                format!("'{t}' is not allowed here; allowed: {}.", allowed.join(", ")),
            );
            continue;
        }
        if value.len() > max {
            field_error(
                &mut errors,
                &f.name,
                "validation_too_many_values",
                format!("Select at most {max}."),
            );
            continue;
        }
        if f.required && value.is_empty() {
            field_error(&mut errors, &f.name, "validation_required", "Missing required value.");
            continue;
        }
        out.dropped.extend(old.iter().filter(|n| !value.contains(n)).cloned());
        out.place.extend(added);
        let v = if f.is_multi() {
            Value::Array(value.into_iter().map(Value::String).collect())
        } else {
            Value::String(value.into_iter().next().unwrap_or_default())
        };
        out.values.push((f.name.clone(), v));
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// The stored names a record's file fields hold.
pub fn stored_names(c: &Collection, data: &Map<String, Value>) -> Vec<String> {
    c.live_fields()
        .filter(|f| f.kind == FieldType::File)
        .flat_map(|f| names(data.get(&f.name)))
        .collect()
}
