//! The HTTP API: a subset of Mailpit's `/api/v1`, so a test written against the sink runs
//! unchanged against Mailpit in compose (and the other way round).
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/v1/messages?start=&limit=` | `{"total", "messages_count", "start", "messages": [summary]}`, newest first, `limit` 50 by default |
//! | `GET /api/v1/message/{ID}` | the summary fields plus `Text`, `HTML` and `Headers` |
//! | `GET /api/v1/message/{ID}/headers` | `{"Name": ["value", ...]}`, names as Go writes them |
//! | `GET /api/v1/message/{ID}/raw` | the message source, `text/plain` |
//! | `DELETE /api/v1/messages` | deletes the messages in `{"IDs": [...]}`, or all without a body |
//! | `GET /livez` | `ok` |
//!
//! `{ID}` may be `latest`, as in Mailpit. Field names are Mailpit's (`ID`, `From.Address`,
//! `Created`, ...). Where the sink differs: `From` and `To` are the SMTP envelope (Mailpit
//! reads the headers, so a Bcc recipient shows here and not there), `Name` is always empty,
//! and `Headers` in the message is the sink's own addition (Mailpit serves headers only at
//! `/headers`). Unknown ids are `404` with an RFC 9457 problem document (Mailpit sends plain
//! text; both are 404).
//!
//! No middleware stack: the API listens on loopback (or a compose network) for tests, reads no
//! request body but DELETE's, which axum bounds (2 MB by default), and has no state to protect
//! but the ring buffer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

use crate::mailbox::{Mailbox, MessageId, StoredMessage};
use crate::mime;

/// Mailpit's default page size.
const DEFAULT_LIMIT: usize = 50;

/// The API's routes over `mailbox`.
pub(crate) fn router(mailbox: Arc<Mailbox>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/api/v1/messages", get(list).delete(delete))
        .route("/api/v1/message/{id}", get(message))
        .route("/api/v1/message/{id}/headers", get(headers))
        .route("/api/v1/message/{id}/raw", get(raw))
        .fallback(|| async { ApiError::NotFound })
        .with_state(mailbox)
}

/// The API's one error: the message (or route) does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiError {
    NotFound,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::NotFound => {
                let problem = serde_json::json!({
                    "type": "https://keel.dev/problems/not-found",
                    "title": "Not found",
                    "status": 404,
                });
                (
                    StatusCode::NOT_FOUND,
                    [(header::CONTENT_TYPE, "application/problem+json")],
                    problem.to_string(),
                )
                    .into_response()
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct Address {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Address")]
    address: String,
}

impl Address {
    fn new(address: &str) -> Self {
        Self {
            name: String::new(),
            address: address.to_owned(),
        }
    }
}

/// A message in a list (Mailpit's `MessageSummary`, the fields the sink has).
#[derive(Debug, Serialize)]
struct Summary {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "MessageID")]
    message_id: String,
    #[serde(rename = "From")]
    from: Address,
    #[serde(rename = "To")]
    to: Vec<Address>,
    #[serde(rename = "Subject")]
    subject: String,
    /// RFC 3339 with milliseconds, UTC: `2026-01-01T12:00:00.000Z`.
    #[serde(rename = "Created")]
    created: String,
    #[serde(rename = "Size")]
    size: usize,
}

impl Summary {
    fn of(message: &StoredMessage) -> Self {
        let message_id = message.header("message-id").unwrap_or_default();
        Self {
            id: message.id().to_string(),
            message_id: message_id
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned(),
            from: Address::new(message.from()),
            to: message.to().iter().map(|to| Address::new(to)).collect(),
            subject: message.subject().to_owned(),
            created: message
                .received_at()
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            size: message.data().len(),
        }
    }
}

#[derive(Debug, Serialize)]
struct List {
    total: usize,
    messages_count: usize,
    start: usize,
    messages: Vec<Summary>,
}

#[derive(Debug, Deserialize)]
struct Page {
    start: Option<usize>,
    limit: Option<usize>,
}

async fn list(State(mailbox): State<Arc<Mailbox>>, Query(page): Query<Page>) -> Json<List> {
    let all = mailbox.snapshot();
    let start = page.start.unwrap_or(0);
    let limit = page.limit.filter(|&l| l > 0).unwrap_or(DEFAULT_LIMIT);
    let messages = all
        .iter()
        .rev()
        .skip(start)
        .take(limit)
        .map(|m| Summary::of(m))
        .collect();
    Json(List {
        total: all.len(),
        messages_count: all.len(),
        start,
        messages,
    })
}

/// One message (Mailpit's `Message`, the fields the sink has, plus `Headers`).
#[derive(Debug, Serialize)]
struct Detail {
    #[serde(flatten)]
    summary: Summary,
    #[serde(rename = "Text")]
    text: String,
    #[serde(rename = "HTML")]
    html: String,
    #[serde(rename = "Headers")]
    headers: BTreeMap<String, Vec<String>>,
}

fn find(mailbox: &Mailbox, id: &str) -> Result<Arc<StoredMessage>, ApiError> {
    let found = if id == "latest" {
        mailbox.latest()
    } else {
        id.parse::<MessageId>().ok().and_then(|id| mailbox.get(id))
    };
    found.ok_or(ApiError::NotFound)
}

/// Header fields by canonical name, values in order (Go's `mail.Header`, as Mailpit sends it).
fn header_map(message: &StoredMessage) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for field in message.headers() {
        map.entry(mime::canonical_name(&field.name))
            .or_default()
            .push(field.value);
    }
    map
}

async fn message(
    State(mailbox): State<Arc<Mailbox>>,
    Path(id): Path<String>,
) -> Result<Json<Detail>, ApiError> {
    let message = find(&mailbox, &id)?;
    let bodies = mime::bodies(message.data());
    Ok(Json(Detail {
        summary: Summary::of(&message),
        text: bodies.text,
        html: bodies.html,
        headers: header_map(&message),
    }))
}

async fn headers(
    State(mailbox): State<Arc<Mailbox>>,
    Path(id): Path<String>,
) -> Result<Json<BTreeMap<String, Vec<String>>>, ApiError> {
    let message = find(&mailbox, &id)?;
    Ok(Json(header_map(&message)))
}

async fn raw(
    State(mailbox): State<Arc<Mailbox>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let message = find(&mailbox, &id)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.data().to_vec(),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct DeleteRequest {
    #[serde(rename = "IDs", default)]
    ids: Vec<String>,
}

/// As Mailpit: the messages named in `{"IDs": [...]}`, or every message when there is no body,
/// it is not that JSON, or the list is empty. Unknown ids are ignored.
async fn delete(State(mailbox): State<Arc<Mailbox>>, body: Bytes) -> &'static str {
    let named = serde_json::from_slice::<DeleteRequest>(&body)
        .ok()
        .filter(|request| !request.ids.is_empty());
    match named {
        Some(request) => {
            let ids: Vec<MessageId> = request
                .ids
                .iter()
                .filter_map(|id| id.parse().ok())
                .collect();
            mailbox.delete(Some(&ids));
        }
        None => mailbox.delete(None),
    }
    "ok"
}
