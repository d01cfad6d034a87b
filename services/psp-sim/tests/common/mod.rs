//! Shared set-up for psp-sim's tests: the simulator in-process on port 0 (both its listeners),
//! and a tiny webhook receiver (billing's stand-in) on another free port that answers from a
//! script.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use keel_service::Drained;
use psp_sim::{App, Config};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The default dev secret's key, base64: tests verify signatures with it independently.
pub const DEV_SECRET_KEY_B64: &str = "S2vWrImrY1hJwx70XjbtZeu65l4ixwO6";

/// A running simulator.
pub struct Sim {
    /// The card API's listener.
    pub base: String,
    /// The `/admin` listener.
    pub admin: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Drained>,
}

/// Starts psp-sim with `overrides` (`KEEL_*` variables) on a free port.
pub async fn start(overrides: &[(&str, &str)]) -> Sim {
    let mut vars = vec![
        ("KEEL_HTTP__PORT", "0"),
        ("KEEL_ADMIN__PORT", "0"),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
    ];
    vars.extend_from_slice(overrides);
    let config: Config = keel_testkit::config(psp_sim::DEFAULT_CONFIG, &vars);
    let app = App::build(config).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let admin = format!("http://{}", app.admin_addr());
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        app.run(async {
            let _ = rx.await;
        })
        .await
        .unwrap()
    });
    Sim {
        base,
        admin,
        client: reqwest::Client::new(),
        stop: Some(tx),
        handle,
    }
}

/// An authorize body for `token`.
pub fn authorize_body(token: &str) -> Value {
    json!({"amount_minor": 4200, "currency": "EUR", "token": token, "reference": "pay_test_1"})
}

impl Sim {
    /// Where a caller finds `path`: `/admin/...` on the admin listener, the rest on the public
    /// one.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("/admin") {
            format!("{}{path}", self.admin)
        } else {
            self.public_url(path)
        }
    }

    /// `path` on the public listener, whatever it is.
    pub fn public_url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST path` with an optional idempotency key and JSON body.
    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url(path));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.unwrap()
    }

    /// `POST /v1/authorizations` with `token` under a fresh key, expecting 201; the authorization.
    pub async fn authorized(&self, token: &str) -> Value {
        let key = uuid::Uuid::new_v4().to_string();
        let r = self
            .post(
                "/v1/authorizations",
                Some(&key),
                Some(&authorize_body(token)),
            )
            .await;
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// The simulator's record of the webhooks for one authorization.
    pub async fn webhooks_of(&self, authorization_id: &str) -> Vec<Value> {
        let body = self
            .get_json(&format!(
                "/admin/webhooks?authorization_id={authorization_id}"
            ))
            .await;
        body["webhooks"].as_array().unwrap().clone()
    }

    /// Signals shutdown and waits for the run to end.
    pub async fn stop(mut self) -> Drained {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap()
    }
}

/// One webhook request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).unwrap().to_str().unwrap()
    }
}

#[derive(Clone, Default)]
struct ReceiverState {
    script: Arc<Mutex<Vec<u16>>>,
    then: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

/// A webhook receiver answering `script` in order, then `then` for every later request.
pub struct Receiver {
    pub url: String,
    state: ReceiverState,
}

impl Receiver {
    pub async fn start(script: &[u16], then: u16) -> Self {
        let state = ReceiverState {
            script: Arc::new(Mutex::new(script.iter().rev().copied().collect())),
            then,
            received: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    state
        .received
        .lock()
        .unwrap()
        .push(Received { headers, body });
    let status = state.script.lock().unwrap().pop().unwrap_or(state.then);
    StatusCode::from_u16(status).unwrap()
}

/// Checks a received webhook's Standard Webhooks signature with the dev secret, computed
/// here from scratch (not with psp-sim's own `sign`), the way any receiver would.
pub fn signature_is_valid(r: &Received) -> bool {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use hmac::{Hmac, Mac};

    let key = STANDARD.decode(DEV_SECRET_KEY_B64).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(
        format!(
            "{}.{}.",
            r.header("webhook-id"),
            r.header("webhook-timestamp")
        )
        .as_bytes(),
    );
    mac.update(&r.body);
    let Some(sig) = r.header("webhook-signature").strip_prefix("v1,") else {
        return false;
    };
    let Ok(sig) = STANDARD.decode(sig) else {
        return false;
    };
    mac.verify_slice(&sig).is_ok()
}
