//! `openapi.json` is generated from the routes and types (`stork::http::openapi`, served at
//! `/api/v1/openapi.json`); the committed copy must be what the code generates. Security
//! matches the extractors, every operation is complete, and every `$ref` resolves.

use serde_json::Value;

const COMMITTED: &str = "openapi.json";

fn doc() -> Value {
    serde_json::from_str(stork::http::openapi::document_json()).expect("the document is JSON")
}

/// Golden file: when the API changes on purpose, regenerate with
/// `STORK_BLESS=1 cargo test -p stork --test openapi` and review the diff.
#[test]
fn committed_document_is_the_generated_one() {
    let generated = stork::http::openapi::document_json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(COMMITTED);
    if std::env::var_os("STORK_BLESS").is_some() {
        std::fs::write(&path, generated).expect("write openapi.json");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "appliance/openapi.json is stale: regenerate it with \
         `STORK_BLESS=1 cargo test -p stork --test openapi` and review the diff"
    );
}

#[test]
fn document_header() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    // The unknown-action 404 is routed but is not an endpoint.
    assert!(doc["paths"].get("/machines/{id}/{action}").is_none());
    assert!(doc["paths"].as_object().expect("paths").len() >= 29);
}

#[test]
fn security_matches_the_extractors() {
    let doc = doc();
    assert_eq!(doc["security"], serde_json::json!([{"adminToken": []}]));
    let schemes = &doc["components"]["securitySchemes"];
    for s in ["adminToken", "agentToken"] {
        assert_eq!(schemes[s]["scheme"], "bearer", "{s}");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (m, op) in item.as_object().unwrap() {
            let security = op.get("security");
            let what = format!("{} {path}", m.to_uppercase());
            if ["/agent/enlist", "/agent/report", "/openapi.json"].contains(&path.as_str()) {
                assert_eq!(
                    security,
                    Some(&serde_json::json!([])),
                    "{what}: needs no token"
                );
            } else if path.starts_with("/agent/") {
                assert_eq!(
                    security,
                    Some(&serde_json::json!([{"agentToken": []}])),
                    "{what}: agent token"
                );
                assert!(op["responses"]["403"].is_object(), "{what}: 403 documented");
            } else {
                assert_eq!(security, None, "{what}: inherits the admin token");
                assert!(op["responses"]["401"].is_object(), "{what}: 401 documented");
            }
        }
    }
}

#[test]
fn operations_are_complete_and_refs_resolve() {
    let doc = doc();
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (m, op) in item.as_object().unwrap() {
            let what = format!("{} {path}", m.to_uppercase());
            let id = op["operationId"].as_str().expect("operationId");
            assert!(
                ids.insert(id.to_string()),
                "{what}: duplicate operationId {id}"
            );
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|c| c.starts_with('2')),
                "{what}: no success response"
            );
            // Every path parameter is declared.
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            for seg in path.split('/') {
                if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    assert!(declared.contains(&name), "{what}: path parameter {name}");
                }
            }
        }
    }
    // The error answer's shape.
    let err = &doc["components"]["schemas"]["Error"];
    assert_eq!(err["required"], serde_json::json!(["code", "message"]));

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    out.push(r);
                }
                o.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local $ref");
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

/// The documented bounds are the ones the code enforces (schema attributes take literals).
#[test]
fn documented_bounds_are_the_enforced_ones() {
    use stork_proto::layout::{
        DEFAULT_ESP_MIB, MAX_ESP_MIB, MAX_ROOT_MIB, MIN_ESP_MIB, MIN_ROOT_MIB,
    };
    let doc = doc();
    let layout = &doc["components"]["schemas"]["DiskLayout"]["properties"];
    let esp = &layout["esp_mib"];
    assert_eq!(esp["default"], DEFAULT_ESP_MIB);
    assert_eq!(esp["minimum"], MIN_ESP_MIB);
    assert_eq!(esp["maximum"], MAX_ESP_MIB);
    assert_eq!(layout["root_mib"]["minimum"], MIN_ROOT_MIB);
    assert_eq!(layout["root_mib"]["maximum"], MAX_ROOT_MIB);
    let ipmi = &doc["components"]["schemas"]["IpmiParams"]["properties"];
    assert_eq!(ipmi["port"]["default"], stork::power::ipmi::DEFAULT_PORT);
    let ops: Vec<&str> = stork_proto::api::PowerOp::ALL
        .iter()
        .map(|op| op.as_str())
        .collect();
    assert_eq!(
        doc["components"]["schemas"]["PowerOp"]["enum"],
        serde_json::json!(ops)
    );
}
