//! `keel.billing.v1.PaymentService` over tonic: parses requests into commands, runs them
//! within the caller's deadline, and maps every failure to its gRPC code.
//!
//! | failure | code | caller should |
//! |---|---|---|
//! | missing/oversized idempotency key, bad id, amount, currency, token; provider 4xx | `INVALID_ARGUMENT` | not retry |
//! | no such payment | `NOT_FOUND` | not retry |
//! | wrong state (capture after void, …), key reused with another request | `FAILED_PRECONDITION` | not retry |
//! | provider 5xx/unreachable after `psp.max_attempts`, database unavailable | `UNAVAILABLE` | retry with the same key |
//! | the caller's deadline ran out, or the provider timed out | `DEADLINE_EXCEEDED` | retry with the same key, within its own budget |
//!
//! Deadlines: the caller's `grpc-timeout` (capped by `grpc.max_deadline`, which also applies
//! when the caller sets none), minus `grpc.deadline_reserve` kept back for billing's own
//! database work and the answer, bounds every provider call. Billing therefore answers
//! `DEADLINE_EXCEEDED` itself, just before the caller gives up — tonic's own timeout would
//! answer `CANCELLED` and drop the handler mid-way. The command runs in its own task for the
//! same reason: if the caller goes away, the command still finishes (bounded by the same
//! deadline) and stores or releases its idempotency key instead of leaving it in progress.

use std::time::Duration;

use keel_contracts::billing_v1 as pb;
use keel_contracts::billing_v1::payment_service_server::PaymentService;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{AuthorizeCommand, PaymentError, Payments, VoidAnswer, VoidTarget};
use crate::ledger::{Currency, Money, OrderId, Payment, PaymentId, PaymentStatus};
use crate::psp::PaymentToken;

/// Longest idempotency key accepted (checkout's are a saga id and a step name).
pub const MAX_KEY_LEN: usize = 200;

/// Longest payment token accepted.
const MAX_TOKEN_LEN: usize = 200;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct PaymentApi {
    payments: Payments,
    max_deadline: Duration,
    reserve: Duration,
}

impl PaymentApi {
    pub fn new(payments: Payments, max_deadline: Duration, reserve: Duration) -> Self {
        Self {
            payments,
            max_deadline,
            reserve,
        }
    }

    /// The instant by which provider calls must be done for this request.
    fn deadline<T>(&self, request: &Request<T>) -> Instant {
        let asked = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(self.max_deadline)
            .min(self.max_deadline);
        Instant::now() + asked.saturating_sub(self.reserve)
    }
}

/// Parses a `grpc-timeout` value (`100m`, `5S`, …; at most 8 digits and a unit).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl From<PaymentError> for Status {
    fn from(e: PaymentError) -> Self {
        match e {
            PaymentError::InvalidArgument(m) => Status::invalid_argument(m),
            PaymentError::NotFound => Status::not_found("payment not found"),
            PaymentError::FailedPrecondition(m) => Status::failed_precondition(m),
            PaymentError::Unavailable(m) => Status::unavailable(m),
            PaymentError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            PaymentError::Internal(detail) => {
                // Logged once, here, where it is handled; the caller gets no internals.
                tracing::error!(error = %detail, "payment command failed");
                Status::internal("internal error")
            }
        }
    }
}

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m.into())
}

fn idempotency_key(key: &str) -> Result<String, Status> {
    if key.is_empty() {
        return Err(invalid("idempotency_key is required"));
    }
    if key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(invalid(format!(
            "idempotency_key must be at most {MAX_KEY_LEN} bytes of printable text"
        )));
    }
    Ok(key.to_owned())
}

fn payment_id(id: &str) -> Result<PaymentId, Status> {
    id.parse().map_err(|_| invalid("payment_id must be a UUID"))
}

fn order_id(id: &str) -> Result<OrderId, Status> {
    id.parse()
        .map(OrderId)
        .map_err(|_| invalid("order_id must be a UUID"))
}

/// `payment_id` when given (`order_id` is then ignored), else `order_id`.
fn void_target(r: &pb::VoidRequest) -> Result<VoidTarget, Status> {
    match (r.payment_id.is_empty(), r.order_id.is_empty()) {
        (false, _) => payment_id(&r.payment_id).map(VoidTarget::Payment),
        (true, false) => order_id(&r.order_id).map(VoidTarget::Order),
        (true, true) => Err(invalid("payment_id or order_id is required")),
    }
}

fn authorize_command(r: pb::AuthorizeRequest) -> Result<AuthorizeCommand, Status> {
    let idempotency_key = idempotency_key(&r.idempotency_key)?;
    let order_id = order_id(&r.order_id)?;
    let amount = r.amount.ok_or_else(|| invalid("amount is required"))?;
    if amount.amount_minor <= 0 {
        return Err(invalid("amount.amount_minor must be positive"));
    }
    let currency = Currency::parse(&amount.currency).map_err(|e| invalid(e.to_string()))?;
    if r.payment_token.is_empty() || r.payment_token.len() > MAX_TOKEN_LEN {
        return Err(invalid(format!(
            "payment_token is required, at most {MAX_TOKEN_LEN} bytes"
        )));
    }
    Ok(AuthorizeCommand {
        idempotency_key,
        order_id,
        amount: Money {
            minor: amount.amount_minor,
            currency,
        },
        payment_token: PaymentToken::new(r.payment_token),
    })
}

/// The wire form of a payment.
pub fn to_proto(p: &Payment) -> pb::Payment {
    let status = match p.status {
        // Internal: the provider has not answered yet.
        PaymentStatus::AuthorizationPending => pb::PaymentStatus::Unspecified,
        PaymentStatus::Authorized => pb::PaymentStatus::Authorized,
        PaymentStatus::Declined => pb::PaymentStatus::Declined,
        PaymentStatus::CapturePending => pb::PaymentStatus::CapturePending,
        PaymentStatus::Captured => pb::PaymentStatus::Captured,
        PaymentStatus::Voided => pb::PaymentStatus::Voided,
    };
    pb::Payment {
        payment_id: p.payment_id.to_string(),
        order_id: p.order_id.to_string(),
        amount: Some(pb::Money {
            amount_minor: p.amount.minor,
            currency: p.amount.currency.as_str().to_owned(),
        }),
        status: status as i32,
        decline_reason: p.decline_reason.clone().unwrap_or_default(),
        version: p.version,
    }
}

/// Runs a command in its own task (see the module docs) and converts its answer.
async fn run<F>(command: F) -> Result<Response<pb::Payment>, Status>
where
    F: Future<Output = Result<Payment, PaymentError>> + Send + 'static,
{
    match tokio::spawn(command).await {
        Ok(Ok(p)) => Ok(Response::new(to_proto(&p))),
        Ok(Err(e)) => Err(e.into()),
        Err(join) => Err(PaymentError::Internal(format!("command task failed: {join}")).into()),
    }
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let deadline = self.deadline(&request);
        let cmd = authorize_command(request.into_inner())?;
        let payments = self.payments.clone();
        run(async move { payments.authorize(&cmd, deadline).await }).await
    }

    async fn capture(
        &self,
        request: Request<pb::CaptureRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let key = idempotency_key(&r.idempotency_key)?;
        let id = payment_id(&r.payment_id)?;
        let payments = self.payments.clone();
        run(async move { payments.capture(&key, id, deadline).await }).await
    }

    async fn void(
        &self,
        request: Request<pb::VoidRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let key = idempotency_key(&r.idempotency_key)?;
        let target = void_target(&r)?;
        let payments = self.payments.clone();
        let answer = tokio::spawn(async move { payments.void(&key, target, deadline).await });
        match answer.await {
            Ok(Ok(VoidAnswer::Payment(p))) => Ok(Response::new(to_proto(&p))),
            Ok(Ok(VoidAnswer::Order { order_id })) => Ok(Response::new(pb::Payment {
                order_id: order_id.to_string(),
                status: pb::PaymentStatus::Voided as i32,
                ..Default::default()
            })),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => Err(PaymentError::Internal(format!("command task failed: {join}")).into()),
        }
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let id = payment_id(&request.get_ref().payment_id)?;
        let p = self.payments.get(id).await?;
        Ok(Response::new(to_proto(&p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("30000000u"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }
}
