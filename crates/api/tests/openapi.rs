//! The OpenAPI document (`openapi.json`) against the code: the routes the daemon serves, the
//! error codes it sends, and the document's own consistency.

use std::collections::{BTreeMap, BTreeSet};

use api::routes::ALL;
use api::{ErrorCode, OPENAPI_JSON};
use serde_json::Value;

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(OPENAPI_JSON).expect("openapi.json is not valid JSON")
}

/// Every operation of `doc` as ((METHOD, path), operation object).
fn operations(doc: &Value) -> Vec<((String, String), &Value)> {
    let paths = doc["paths"].as_object().expect("`paths` is not an object");
    let mut ops = Vec::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is not an object");
        for (key, op) in item {
            if METHODS.contains(&key.as_str()) {
                ops.push(((key.to_uppercase(), path.clone()), op));
            }
        }
    }
    ops
}

/// Every `$ref` string anywhere under `v`.
fn collect_refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "$ref" {
                    out.push(child.as_str().expect("a $ref is not a string"));
                } else {
                    collect_refs(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|c| collect_refs(c, out)),
        _ => {}
    }
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "components/schemas/{name} is missing");
    s
}

/// `v`, or the schema it refers to when it is a `$ref`.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => schema(doc, r.trim_start_matches("#/components/schemas/")),
        None => v,
    }
}

#[test]
fn test_document_is_openapi_3_for_this_version() {
    let doc = document();

    let openapi = doc["openapi"].as_str().unwrap_or_default();
    let version = doc["info"]["version"].as_str().unwrap_or_default();

    assert!(openapi.starts_with("3."), "openapi is {openapi:?}");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn test_paths_match_served_routes_exactly() {
    let doc = document();
    let served: BTreeSet<(String, String)> = ALL
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();

    let documented: BTreeSet<(String, String)> =
        operations(&doc).into_iter().map(|(key, _)| key).collect();

    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "openapi.json differs from api::routes::ALL: missing {missing:?}, extra {extra:?}"
    );
}

#[test]
fn test_every_operation_has_id_summary_and_responses() {
    let doc = document();

    let incomplete: Vec<_> = operations(&doc)
        .into_iter()
        .filter(|(_, op)| {
            op["operationId"].as_str().is_none()
                || op["summary"].as_str().is_none()
                || op["responses"].as_object().is_none_or(|r| r.is_empty())
        })
        .map(|(key, _)| key)
        .collect();

    assert!(
        incomplete.is_empty(),
        "incomplete operations: {incomplete:?}"
    );
}

#[test]
fn test_operation_ids_are_unique() {
    let doc = document();
    let mut by_id: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();

    for (key, op) in operations(&doc) {
        let id = op["operationId"].as_str().unwrap_or_default();
        by_id.entry(id).or_default().push(key);
    }

    let duplicated: Vec<_> = by_id.iter().filter(|(_, ops)| ops.len() > 1).collect();
    assert!(
        duplicated.is_empty(),
        "duplicate operationIds: {duplicated:?}"
    );
}

#[test]
fn test_every_ref_resolves_to_a_schema() {
    let doc = document();
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("components/schemas is not an object");
    let mut refs = Vec::new();

    collect_refs(&doc, &mut refs);

    let dangling: BTreeSet<&str> = refs
        .iter()
        .copied()
        .filter(|r| {
            r.strip_prefix("#/components/schemas/")
                .is_none_or(|name| !schemas.contains_key(name))
        })
        .collect();
    assert!(!refs.is_empty(), "the document has no $ref at all");
    assert!(dangling.is_empty(), "unresolved $refs: {dangling:?}");
}

#[test]
fn test_error_schema_lists_every_error_code() {
    let doc = document();
    let code = resolve(&doc, &schema(&doc, "Error")["properties"]["code"]);
    let documented: BTreeSet<&str> = code["enum"]
        .as_array()
        .expect("Error.code has no enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();

    let missing: Vec<String> = ErrorCode::ALL
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .filter(|c| !documented.contains(c.as_str()))
        .collect();

    assert!(missing.is_empty(), "Error.code enum misses {missing:?}");
    assert_eq!(
        documented.len(),
        ErrorCode::ALL.len(),
        "Error.code enum has extra values"
    );
}
