//! The contract check: an HTTP response held to what `openapi.yaml` says that operation
//! answers, so the document cannot drift from the code unnoticed.
//!
//! For `method path` (the path *template*, as the document keys it) and the received status,
//! headers and body:
//! - the operation and the status must be documented (no `default` catch-all: every status a
//!   client can get is listed);
//! - each header the response documents as required is present, and every documented header
//!   present matches its schema; every response carries `X-Request-Id` (the document's
//!   description promises it);
//! - the body's media type is one the response documents (a response that documents none has
//!   an empty body), and the body validates against that media type's schema: JSON bodies as
//!   JSON (`jsonschema`, draft 2020-12 — OpenAPI 3.1's schema dialect — with `format` checked),
//!   text bodies as a string;
//! - a problem document's `status` is the HTTP status.
//!
//! The schemas close their objects (`additionalProperties: false`, or
//! `unevaluatedProperties: false` where a problem extends the base problem), so a field a
//! handler returns and the document lacks fails here.
//!
//! `TestApp`'s request helpers run every response they receive through [`checked`]; a test
//! that sends its own request can do the same.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use http::HeaderMap;
use serde_json::Value;

/// `openapi.yaml`, parsed, with a compiled validator per schema used so far.
pub struct Contract {
    doc: Value,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

static CHECKOUT: LazyLock<Contract> = LazyLock::new(|| Contract::new(checkout::OPENAPI));

/// checkout's contract: the document it serves.
pub fn contract() -> &'static Contract {
    &CHECKOUT
}

/// Holds `response` (to `method path`, `path` the documented template) to the contract and
/// panics listing every difference; otherwise hands back the same status, headers and body.
pub async fn checked(method: &str, path: &str, response: reqwest::Response) -> reqwest::Response {
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    if let Err(problems) = contract().check(method, path, status.as_u16(), &headers, &body) {
        panic!(
            "{method} {path} answered {status} outside openapi.yaml:\n  {}\nbody: {}",
            problems.join("\n  "),
            String::from_utf8_lossy(&body)
        );
    }
    let mut rebuilt = http::Response::builder().status(status).version(version);
    if let Some(h) = rebuilt.headers_mut() {
        *h = headers;
    }
    reqwest::Response::from(rebuilt.body(body).unwrap())
}

/// A JSON Pointer token (RFC 6901): `/v1/orders` → `~1v1~1orders`.
fn token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// `pointer` as a URI fragment: characters a fragment may not hold (the `{` `}` of path
/// templates) percent-encoded, as RFC 6901 section 6 asks.
fn fragment(pointer: &str) -> String {
    let mut out = String::with_capacity(pointer.len());
    for b in pointer.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Contract {
    /// Parses an OpenAPI 3.1 document (YAML).
    pub fn new(yaml: &str) -> Self {
        let doc: Value = serde_norway::from_str(yaml).unwrap();
        assert_eq!(doc["openapi"], "3.1.0", "an OpenAPI 3.1 document");
        Self {
            doc,
            validators: Mutex::new(HashMap::new()),
        }
    }

    /// The parsed document.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// Follows `$ref`s from the object at `pointer` to the object they name; returns it with
    /// its own pointer (schemas' inner `$ref`s are left to the validator).
    fn resolve(&self, mut pointer: String) -> Result<(String, &Value), String> {
        for _ in 0..8 {
            let v = self
                .doc
                .pointer(&pointer)
                .ok_or_else(|| format!("nothing at #{pointer}"))?;
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    pointer = r
                        .strip_prefix('#')
                        .ok_or_else(|| format!("external $ref {r}"))?
                        .to_owned();
                }
                None => return Ok((pointer, v)),
            }
        }
        Err(format!("$ref chain too long at #{pointer}"))
    }

    /// The validator of the schema at `pointer`, compiled once.
    fn validator(&self, pointer: &str) -> Arc<jsonschema::Validator> {
        let mut cache = self.validators.lock().unwrap();
        if let Some(v) = cache.get(pointer) {
            return v.clone();
        }
        // The whole document is the root schema, so the schemas' `#/components/...` refs
        // resolve as in the document; the root's other members are no JSON Schema keywords
        // and constrain nothing, and its `$ref` selects the schema to apply.
        let mut root = self.doc.clone();
        root["$ref"] = Value::String(format!("#{}", fragment(pointer)));
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("the schema at #{pointer} does not compile: {e}"));
        let validator = Arc::new(validator);
        cache.insert(pointer.to_owned(), validator.clone());
        validator
    }

    /// Validates `value` against the schema at `pointer` (a JSON Pointer into the document).
    pub fn validate(&self, pointer: &str, value: &Value) -> Result<(), Vec<String>> {
        let validator = self.validator(pointer);
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("at {:?}: {e}", e.instance_path().as_str()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Every way the response differs from the document's answer for `method path` and
    /// `status` (module docs); `Ok` when it is one of the documented answers.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), Vec<String>> {
        let op = format!("/paths/{}/{}", token(path), method.to_lowercase());
        if self.doc.pointer(&op).is_none() {
            return Err(vec![format!("{method} {path} is not documented")]);
        }
        let (at, response) = match self.resolve(format!("{op}/responses/{status}")) {
            Ok(found) => found,
            Err(_) => {
                let documented: Vec<&String> = self
                    .doc
                    .pointer(&format!("{op}/responses"))
                    .and_then(Value::as_object)
                    .map(|r| r.keys().collect())
                    .unwrap_or_default();
                return Err(vec![format!(
                    "status {status} is not documented (documented: {documented:?})"
                )]);
            }
        };
        let mut problems = Vec::new();
        if !headers.contains_key("x-request-id") {
            problems.push("no X-Request-Id header".to_owned());
        }
        problems.extend(self.check_headers(&at, response, headers));

        let media = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| {
                ct.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            if !body.is_empty() {
                problems.push(format!(
                    "a body ({}) where the document describes none",
                    media.as_deref().unwrap_or("no content-type")
                ));
            }
            return if problems.is_empty() {
                Ok(())
            } else {
                Err(problems)
            };
        };
        let Some(media) = media.filter(|m| content.contains_key(m)) else {
            problems.push(format!(
                "content-type {:?} is not documented (documented: {:?})",
                headers.get(http::header::CONTENT_TYPE),
                content.keys().collect::<Vec<_>>()
            ));
            return Err(problems);
        };
        let schema = format!("{at}/content/{}/schema", token(&media));
        let json = media == "application/json" || media.ends_with("+json");
        let value = if json {
            match serde_json::from_slice::<Value>(body) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("the {media} body is not JSON: {e}"));
                    return Err(problems);
                }
            }
        } else {
            match std::str::from_utf8(body) {
                Ok(text) => Value::String(text.to_owned()),
                Err(_) => {
                    problems.push(format!("the {media} body is not UTF-8 text"));
                    return Err(problems);
                }
            }
        };
        if let Err(errors) = self.validate(&schema, &value) {
            problems.extend(errors.into_iter().map(|e| format!("body {e}")));
        }
        if media == "application/problem+json" && value["status"] != status {
            problems.push(format!(
                "the problem's status {} is not the HTTP status {status}",
                value["status"]
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The documented headers of the response at `at`: required ones present, present ones
    /// valid against their schema.
    fn check_headers(&self, at: &str, response: &Value, headers: &HeaderMap) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(documented) = response.get("headers").and_then(Value::as_object) else {
            return problems;
        };
        for name in documented.keys() {
            let (header_at, header) = match self.resolve(format!("{at}/headers/{}", token(name))) {
                Ok(found) => found,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            let Some(value) = headers.get(name.as_str()) else {
                if header["required"] == true {
                    problems.push(format!("the required header {name} is missing"));
                }
                continue;
            };
            let Ok(text) = value.to_str() else {
                problems.push(format!("the header {name} is not visible ASCII"));
                continue;
            };
            // Header values are text on the wire; an integer schema means its digits.
            let value = match header.pointer("/schema/type").and_then(Value::as_str) {
                Some("integer") => text
                    .parse::<i64>()
                    .map_or_else(|_| Value::String(text.to_owned()), Value::from),
                _ => Value::String(text.to_owned()),
            };
            if let Err(errors) = self.validate(&format!("{header_at}/schema"), &value) {
                problems.extend(errors.into_iter().map(|e| format!("header {name}: {e}")));
            }
        }
        problems
    }
}
