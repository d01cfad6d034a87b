//! P10 proofs for the ledger: the projection rebuilt from the events equals the live one
//! (even after the projection was damaged), a writer with a stale version is rejected and
//! nobody's event is lost, and the event store is append-only for the runtime role.
//!
//! The lost update comes first: two writers decide on the same version of a stream, and a
//! naive append (the next version taken at insert time, written here in the test) lets the
//! second one write an event its view ruled out; the same interleaving, fixed by a barrier,
//! through `ledger::record` and its expected version is refused.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use billing::ledger::{
    self, Currency, LedgerError, OrderId, PaymentEvent, PaymentId, PaymentStatus,
};
use keel_testkit::{TestDb, eventually};
use sqlx::{Connection, PgConnection};
use support::{Billing, SECRET, authorize_request, captured_body, key, now_unix, signed};

#[tokio::test]
async fn projection_rebuilt_from_events_equals_the_live_one() {
    let b = Billing::start().await;
    // One payment in every state the journey produces.
    let authorized = b.authorize(&key("a"), "tok_approve").await.unwrap();
    b.authorize(&key("a"), "tok_decline").await.unwrap();
    let pending = b.authorize(&key("a"), "tok_approve").await.unwrap();
    b.capture(&key("c"), &pending.payment_id).await.unwrap();
    let captured = b.authorize(&key("a"), "tok_approve").await.unwrap();
    b.capture(&key("c"), &captured.payment_id).await.unwrap();
    let auth = b.authorization_id(&captured.payment_id).await;
    let body = captured_body(&captured, &auth);
    let headers = signed("msg_rebuild", now_unix(), &body, SECRET);
    assert_eq!(b.post_webhook(&headers, &body).await.status(), 200);
    let voided = b.authorize(&key("a"), "tok_approve").await.unwrap();
    b.void(&key("v"), &voided.payment_id).await.unwrap();
    b.psp.set_down(true);
    let abandoned = authorize_request(&key("a"), "tok_approve");
    b.authorize_request(abandoned.clone()).await.unwrap_err();
    let abandoned_id = ledger::payment_id_for_authorize_key(&abandoned.idempotency_key).to_string();
    b.void(&key("v"), &abandoned_id).await.unwrap();

    let mut conn = b.pool.acquire().await.unwrap();
    let live = ledger::projection::all(&mut conn).await.unwrap();
    assert_eq!(live.len(), 6);

    // Damage the read model: a row lost, another rewritten.
    sqlx::query("DELETE FROM payments WHERE payment_id = $1::uuid")
        .bind(&authorized.payment_id)
        .execute(&b.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE payments SET status = 'CAPTURED', version = 99 WHERE payment_id = $1::uuid",
    )
    .bind(&voided.payment_id)
    .execute(&b.pool)
    .await
    .unwrap();
    assert_ne!(ledger::projection::all(&mut conn).await.unwrap(), live);

    let rebuilt = billing::rebuild_projections(&b.config).await.unwrap();
    assert_eq!(rebuilt.streams, 6);
    assert_eq!(rebuilt.events, 2 + 2 + 3 + 4 + 3 + 2);
    assert_eq!(ledger::projection::all(&mut conn).await.unwrap(), live);
}

async fn new_stream(conn: &mut PgConnection) -> (PaymentId, ledger::Payment) {
    let id = PaymentId(uuid::Uuid::new_v4());
    let mut tx = conn.begin().await.unwrap();
    let event = PaymentEvent::AuthorizationRequested {
        order_id: OrderId(uuid::Uuid::new_v4()),
        amount_minor: 500,
        currency: Currency::parse("EUR").unwrap(),
    };
    let p = ledger::record(&mut tx, id, None, &[event], &serde_json::json!({}))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    (id, p)
}

/// How a writer appends.
#[derive(Debug, Clone, Copy)]
enum Append {
    /// The next version is whatever follows the stream's end at insert time: no check that
    /// the stream is still where the writer's decision was taken. Test code only.
    Naive,
    /// Keel's: `ledger::record` with the version the writer decided on.
    Expected,
}

impl Append {
    async fn run(
        self,
        tx: &mut PgConnection,
        id: PaymentId,
        view: &ledger::Payment,
        event: PaymentEvent,
    ) -> Result<(), LedgerError> {
        let meta = serde_json::json!({});
        match self {
            Self::Expected => ledger::record(tx, id, Some(view), &[event], &meta)
                .await
                .map(|_| ()),
            Self::Naive => {
                let mut stored = serde_json::to_value(&event).unwrap();
                sqlx::query(
                    "INSERT INTO payment_events (stream_id, version, event_type, data, metadata)
                     SELECT $1, COALESCE(max(version), 0) + 1, $2, $3, $4
                       FROM payment_events WHERE stream_id = $1",
                )
                .bind(id.0)
                .bind(event.event_type())
                .bind(stored["data"].take())
                .bind(&meta)
                .execute(tx)
                .await?;
                Ok(())
            }
        }
    }
}

/// A stream at version 2 (`AuthorizationRequested`, `PaymentAuthorized`), then two writers
/// that both load it before either appends — a barrier makes sure of that — and append in a
/// fixed order: the capture (the provider's webhook) commits first, then the void (an
/// operator's command), decided on the view the capture has since made stale. Returns the
/// stream and the void's result.
async fn capture_races_void(db: &TestDb, append: Append) -> (PaymentId, Result<(), LedgerError>) {
    let mut setup = PgConnection::connect(&db.app_url()).await.unwrap();
    let (id, v1) = new_stream(&mut setup).await;
    let mut tx = setup.begin().await.unwrap();
    let authorized = PaymentEvent::PaymentAuthorized {
        psp_authorization_id: "auth_1".into(),
    };
    ledger::record(
        &mut tx,
        id,
        Some(&v1),
        &[authorized],
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let both_loaded = Arc::new(tokio::sync::Barrier::new(2));
    let (captured_tx, captured) = tokio::sync::oneshot::channel::<()>();
    let capture = tokio::spawn({
        let (url, both_loaded) = (db.app_url(), both_loaded.clone());
        async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            let view = ledger::load(&mut conn, id).await.unwrap().unwrap();
            both_loaded.wait().await;
            let mut tx = conn.begin().await.unwrap();
            let event = PaymentEvent::PaymentCaptured {
                webhook_id: "msg_capture".into(),
            };
            append.run(&mut tx, id, &view, event).await.unwrap();
            tx.commit().await.unwrap();
            captured_tx.send(()).unwrap();
        }
    });
    let void = tokio::spawn({
        let url = db.app_url();
        async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            let view = ledger::load(&mut conn, id).await.unwrap().unwrap();
            both_loaded.wait().await;
            captured.await.unwrap();
            // The decision, on the view loaded before the capture: authorized, so voidable.
            assert_eq!(view.status, PaymentStatus::Authorized);
            assert_eq!(view.version, 2);
            let mut tx = conn.begin().await.unwrap();
            let event = PaymentEvent::PaymentVoided { at_provider: true };
            let result = append.run(&mut tx, id, &view, event).await;
            if result.is_ok() {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
            result
        }
    });
    capture.await.unwrap();
    (id, void.await.unwrap())
}

async fn event_types(conn: &mut PgConnection, id: PaymentId) -> Vec<&'static str> {
    ledger::store::load_stream(conn, id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.event_type())
        .collect()
}

#[tokio::test]
async fn a_naive_append_loses_the_capture_to_a_stale_void_and_the_expected_version_refuses_it() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let mut conn = PgConnection::connect(&db.app_url()).await.unwrap();

    // Naive: both appends succeed. The stream now says the payment was captured and then
    // voided, a void nobody would have decided had they seen the capture: the fold reports
    // VOIDED for money the provider has taken.
    let (naive, voided) = capture_races_void(&db, Append::Naive).await;
    voided.unwrap();
    assert_eq!(
        event_types(&mut conn, naive).await,
        [
            "AuthorizationRequested",
            "PaymentAuthorized",
            "PaymentCaptured",
            "PaymentVoided"
        ]
    );
    let folded = ledger::load(&mut conn, naive).await.unwrap().unwrap();
    assert_eq!(folded.status, PaymentStatus::Voided, "the capture is lost");

    // Keel: the same interleaving; the void's append is refused as a conflict, nothing of it
    // is stored, and the writer's reload shows the capture it must now decide on.
    let (keel, voided) = capture_races_void(&db, Append::Expected).await;
    let err = voided.unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::Conflict {
                expected_version: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        event_types(&mut conn, keel).await,
        [
            "AuthorizationRequested",
            "PaymentAuthorized",
            "PaymentCaptured"
        ]
    );
    let reloaded = ledger::load(&mut conn, keel).await.unwrap().unwrap();
    assert_eq!(reloaded.status, PaymentStatus::Captured);
    let projected = ledger::projection::get(&mut conn, keel)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(projected, reloaded, "the projection holds the winner");
}

#[tokio::test]
async fn concurrent_append_with_a_stale_version_is_rejected_not_lost() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let mut setup = PgConnection::connect(&db.app_url()).await.unwrap();
    let (id, v1) = new_stream(&mut setup).await;
    let meta = serde_json::json!({});

    // Writer A decides on version 1 and appends, not yet committed.
    let mut a = PgConnection::connect(&db.app_url()).await.unwrap();
    let mut tx_a = a.begin().await.unwrap();
    let authorized = PaymentEvent::PaymentAuthorized {
        psp_authorization_id: "auth_a".into(),
    };
    ledger::record(&mut tx_a, id, Some(&v1), &[authorized], &meta)
        .await
        .unwrap();

    // Writer B decided on the same version 1: its append waits on A's row...
    let app_url = db.app_url();
    let stale = v1.clone();
    let b = tokio::spawn(async move {
        let mut b = PgConnection::connect(&app_url).await.unwrap();
        let mut tx_b = b.begin().await.unwrap();
        let declined = PaymentEvent::PaymentDeclined {
            reason: "card_declined".into(),
        };
        ledger::record(
            &mut tx_b,
            id,
            Some(&stale),
            &[declined],
            &serde_json::json!({}),
        )
        .await
        .map(|_| ())
    });
    let admin = sqlx::PgPool::connect(&db.admin_url()).await.unwrap();
    eventually(Duration::from_secs(10), "B waits on A's version", || {
        let admin = admin.clone();
        let name = db.name.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = $1 AND wait_event_type = 'Lock'",
            )
            .bind(name)
            .fetch_one(&admin)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        }
    })
    .await;
    // ...and when A commits, B is told its view is stale.
    tx_a.commit().await.unwrap();
    let err = b.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::Conflict {
                expected_version: 1,
                ..
            }
        ),
        "{err:?}"
    );

    // A's event is kept, B's is not there, nothing was overwritten.
    let events = ledger::store::load_stream(&mut setup, id).await.unwrap();
    let types: Vec<_> = events.iter().map(|e| e.event.event_type()).collect();
    assert_eq!(types, ["AuthorizationRequested", "PaymentAuthorized"]);
    let projected = ledger::projection::get(&mut setup, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(projected.status, PaymentStatus::Authorized);
    assert_eq!(projected.version, 2);
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregate_id = $1")
        .bind(id.to_string())
        .fetch_one(&mut setup)
        .await
        .unwrap();
    assert_eq!(published, 1, "only the winner's event is published");

    // A stale writer that comes later (no race at all) is refused the same way; after
    // reloading, it appends on top of the winner.
    let mut tx = setup.begin().await.unwrap();
    let err = ledger::record(
        &mut tx,
        id,
        Some(&v1),
        &[PaymentEvent::CaptureRequested {}],
        &meta,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LedgerError::Conflict { .. }), "{err:?}");
    tx.rollback().await.unwrap();
    let current = ledger::load(&mut setup, id).await.unwrap().unwrap();
    let mut tx = setup.begin().await.unwrap();
    let after = ledger::record(
        &mut tx,
        id,
        Some(&current),
        &[PaymentEvent::CaptureRequested {}],
        &meta,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(after.version, 3);
    assert_eq!(after.status, PaymentStatus::CapturePending);
}

#[tokio::test]
async fn payment_events_are_append_only_for_the_app_role() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    let (id, _) = new_stream(&mut app).await;
    for sql in [
        "UPDATE payment_events SET event_type = 'PaymentVoided' WHERE stream_id = $1",
        "DELETE FROM payment_events WHERE stream_id = $1",
    ] {
        let err = sqlx::query(sql)
            .bind(id.0)
            .execute(&mut app)
            .await
            .unwrap_err();
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default();
        assert_eq!(code, "42501", "{sql}: {err}");
    }
    let err = sqlx::query("TRUNCATE payment_events")
        .execute(&mut app)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default(),
        "42501"
    );
    let stream = ledger::store::load_stream(&mut app, id).await.unwrap();
    assert_eq!(stream.len(), 1, "history intact");
    // The projection, by contrast, is the app's to rewrite (rebuild-projections does).
    sqlx::query("DELETE FROM payments WHERE payment_id = $1")
        .bind(id.0)
        .execute(&mut app)
        .await
        .unwrap();
}

/// Only a lost race for a version (`23505` on the primary key) is a `Conflict`: any other
/// database error is passed on as one, so a caller never retries a "conflict" that was really
/// a broken transaction or a refused write. Here the append runs in a read-only transaction
/// (`25006`), which must surface as a database error.
#[tokio::test]
async fn an_append_that_fails_for_another_reason_is_not_reported_as_a_conflict() {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let mut conn = PgConnection::connect(&db.app_url()).await.unwrap();
    let (id, v1) = new_stream(&mut conn).await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .unwrap();
    let authorized = PaymentEvent::PaymentAuthorized {
        psp_authorization_id: "auth_ro".into(),
    };
    let err = ledger::record(
        &mut tx,
        id,
        Some(&v1),
        &[authorized],
        &serde_json::json!({}),
    )
    .await
    .unwrap_err();
    assert!(
        !matches!(err, LedgerError::Conflict { .. }),
        "a read-only transaction's refusal was reported as a version conflict: {err:?}"
    );
    let text = format!("{err:?}");
    assert!(
        text.contains("25006") || text.contains("read-only"),
        "{text}"
    );
}
