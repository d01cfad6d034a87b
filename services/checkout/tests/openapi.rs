//! `openapi.yaml` is the contract clients read: it must parse, be OpenAPI 3.1, and describe
//! exactly the routes the router serves — no undocumented route, no documented route that
//! does not exist.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::TestApp;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value = serde_norway::from_str(checkout::OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

#[test]
fn the_openapi_document_lists_every_route_the_router_serves_and_no_other() {
    let routes: BTreeSet<(String, String)> = checkout::routes()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(documented(), routes);
}

#[test]
fn every_schema_reference_in_the_openapi_document_resolves() {
    let doc: serde_json::Value = serde_norway::from_str(checkout::OPENAPI).unwrap();
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", serde_json::Value::String(r)) => out.push(r.clone()),
                        _ => refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

#[tokio::test]
async fn the_router_answers_every_documented_route_and_serves_the_document() {
    let app = TestApp::start("http://127.0.0.1:1", &[("KEEL_SAGA__RUN_WORKER", "false")]).await;
    let fallback = "https://keel.dev/problems/not-found";
    for (method, path) in documented() {
        let url = format!(
            "{}{}",
            app.base,
            path.replace("{id}", &uuid::Uuid::new_v4().to_string())
        );
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app
            .client
            .request(method.clone(), &url)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        // Served: not a 405, and not the router's fallback 404 (an unknown order is a 404
        // of its own type).
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !body.contains(fallback),
            "{method} {path} is not routed: {body}"
        );
        // And no other method on a documented path is served.
        for other in ["PUT", "PATCH", "DELETE"] {
            let r = app
                .client
                .request(reqwest::Method::from_bytes(other.as_bytes()).unwrap(), &url)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 405, "{other} {path} is served but undocumented");
        }
    }
    let r = app
        .client
        .get(format!("{}/openapi.yaml", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/yaml");
    assert_eq!(r.text().await.unwrap(), checkout::OPENAPI);
    app.stop().await;
}
