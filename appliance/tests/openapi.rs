//! `openapi.json` (served at `/api/v1/openapi.json`) against the router in `http/api.rs`:
//! every route and method is documented, nothing documented is missing from the router,
//! security matches the extractors, and every `$ref` resolves. The router's source is read
//! as text so that adding a route without documenting it fails here.

use serde_json::Value;

const API_RS: &str = include_str!("../src/http/api.rs");
const DOC: &str = include_str!("../openapi.json");
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// `(path, methods)` of every `.route(...)` in `routes()`.
fn routes() -> Vec<(String, Vec<&'static str>)> {
    let start = API_RS.find("pub fn routes()").expect("routes() in api.rs");
    let body = &API_RS[start..];
    let body = &body[..body.find("\n}\n").expect("end of routes()")];
    // rustfmt may break a long `.route(` call over lines: compare without white space.
    let body: String = body.split_whitespace().collect();
    let mut out = Vec::new();
    for chunk in body.split(".route(\"").skip(1) {
        let (path, handlers) = chunk.split_once('"').expect("route path");
        // `get(list).post(create)`: a method name directly followed by `(`, not part of a
        // longer identifier such as `delete_machine`.
        let methods: Vec<&str> = METHODS
            .into_iter()
            .filter(|m| {
                handlers.match_indices(&format!("{m}(")).any(|(i, _)| {
                    i == 0
                        || !handlers[..i]
                            .chars()
                            .next_back()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_')
                })
            })
            .collect();
        assert!(!methods.is_empty(), "no method found for route {path}");
        out.push((path.to_string(), methods));
    }
    assert!(out.len() > 10, "parsed only {} routes", out.len());
    out
}

fn doc() -> Value {
    serde_json::from_str(DOC).expect("openapi.json is JSON")
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    let paths = doc["paths"].as_object().expect("paths");

    // Router -> document. `/machines/{id}/{action}` is the JSON 404 for an unknown
    // action, not an endpoint.
    let mut expected: Vec<(String, &str)> = Vec::new();
    for (path, methods) in routes() {
        if path.contains("{action}") {
            continue;
        }
        for m in methods {
            expected.push((path.clone(), m));
        }
    }
    for (path, m) in &expected {
        assert!(
            paths.get(path).and_then(|p| p.get(*m)).is_some(),
            "{} {path} is routed in api.rs but not documented in openapi.json",
            m.to_uppercase()
        );
    }
    // Document -> router.
    for (path, item) in paths {
        for m in item.as_object().expect("path item").keys() {
            assert!(
                expected.iter().any(|(p, em)| p == path && em == m),
                "{} {path} is documented but not routed",
                m.to_uppercase()
            );
        }
    }
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
