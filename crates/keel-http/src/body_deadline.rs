//! A deadline for reading a whole request body (P15, with [`crate::serve`]).
//!
//! The failure: a client that sends a valid head and then trickles its body (one byte a
//! second, well under any per-read timeout) keeps the handler, its database connection if it
//! took one early, and the socket busy for as long as it likes. tower-http's
//! `RequestBodyTimeout` restarts its clock at every chunk, so a trickle never trips it; this
//! one is counted from the request head, for the body as a whole. Written by hand for that
//! reason: it is twenty lines.
//!
//! When the deadline passes the body fails, the handler's extractor gives up, and the client
//! gets 408 `request-timeout` with `Connection: close` (the rest of its upload is not read).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body::{Body as _, Frame, SizeHint};
use tokio::time::Sleep;

use crate::problem::Problem;

/// Middleware: the request's body must be read within `limit` of the head's arrival.
pub async fn enforce(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            expired: expired.clone(),
        })
    });
    let response = next.run(request).await;
    if !expired.load(Ordering::Relaxed) {
        return response;
    }
    metrics::counter!("http_request_bodies_timed_out_total").increment(1);
    let mut response = Problem::for_status(StatusCode::REQUEST_TIMEOUT)
        .with_detail("the request body did not arrive in time")
        .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The error a late body ends with; the handler sees it as a failed body read.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within its deadline")]
struct BodyTimedOut;

struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        // Data already here is taken even at the deadline; only waiting is cut short.
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
