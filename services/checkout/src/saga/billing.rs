//! The saga's client of billing's `PaymentService` (gRPC), and how its errors are judged.
//!
//! - The channel connects lazily (`Endpoint::connect_lazy`): checkout starts, takes orders and
//!   runs sagas' first step while billing is down; payment steps retry until it is back or
//!   the saga's deadline passes.
//! - Every call has a deadline: min(`billing.call_timeout`, what is left of the saga's
//!   deadline). It travels to billing as `grpc-timeout` (P26 lite: billing can stop working
//!   on a call nobody waits for) and bounds the wait here, even on a black-holed connection.
//! - Every mutating call carries the idempotency key `"{saga_id}:{step}"`: a re-run step
//!   (retry, or a resumed saga after a crash) repeats the same call, and billing answers it
//!   with the first call's result instead of charging twice (P13).
//!
//! Error classes (the rule a reader must not break: only transient failures are retried):
//! - retryable: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `CANCELLED` (tonic's own timeout),
//!   `UNKNOWN` (transport failures without a status), `RESOURCE_EXHAUSTED`, `ABORTED`,
//!   `INTERNAL` (HTTP/2 errors surface as it) — retried while the saga's deadline holds;
//! - final: everything else (`INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `NOT_FOUND`, ...) —
//!   retrying would get the same answer.

use std::time::Duration;

use keel_contracts::billing_v1::payment_service_client::PaymentServiceClient;
use keel_contracts::billing_v1::{
    AuthorizeRequest, CaptureRequest, GetPaymentRequest, Money as PbMoney, Payment, PaymentStatus,
    VoidRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::config::BillingConfig;
use keel_events::Money;

/// A failed billing call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Transient: the same call may succeed later.
    #[error("retryable {code:?}: {message}")]
    Retryable { code: Code, message: String },
    /// Billing refused the call; repeating it gets the same answer.
    #[error("final {code:?}: {message}")]
    Final { code: Code, message: String },
}

impl CallError {
    pub fn code(&self) -> Code {
        match self {
            Self::Retryable { code, .. } | Self::Final { code, .. } => *code,
        }
    }

    fn from_status(status: &Status) -> Self {
        let code = status.code();
        let message = status.message().to_owned();
        match code {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal => Self::Retryable { code, message },
            _ => Self::Final { code, message },
        }
    }
}

/// What `Void` releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidTarget {
    /// The payment the saga recorded when billing authorized it.
    Payment(String),
    /// Every payment of this order that still holds money: the saga never learned the
    /// payment id (its Authorize answer was lost). Voiding nothing is a success.
    Order(String),
}

/// What a payment is, as far as the saga cares.
pub fn status_of(p: &Payment) -> PaymentStatus {
    PaymentStatus::try_from(p.status).unwrap_or(PaymentStatus::Unspecified)
}

/// billing's `PaymentService`, with deadlines and error classes.
#[derive(Debug, Clone)]
pub struct Billing {
    client: PaymentServiceClient<Channel>,
    call_timeout: Duration,
}

/// Where billing is, checked, with nothing started yet: the channel (and the task tonic runs
/// behind it) is made by [`BillingEndpoint::connect_lazy`] when the saga worker starts.
#[derive(Debug, Clone)]
pub struct BillingEndpoint {
    endpoint: Endpoint,
    call_timeout: Duration,
}

impl BillingEndpoint {
    /// Parses `billing.grpc_url` and applies the connect bound; fails on a bad URL.
    pub fn new(config: &BillingConfig) -> Result<Self, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(config.grpc_url.clone())?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true);
        Ok(Self {
            endpoint,
            call_timeout: config.call_timeout,
        })
    }

    /// A client whose channel connects on first use.
    pub fn connect_lazy(self) -> Billing {
        Billing {
            client: PaymentServiceClient::new(self.endpoint.connect_lazy()),
            call_timeout: self.call_timeout,
        }
    }
}

impl Billing {
    /// A client whose channel connects on first use (never at start-up).
    pub fn connect_lazy(config: &BillingConfig) -> Result<Self, tonic::transport::Error> {
        Ok(BillingEndpoint::new(config)?.connect_lazy())
    }

    /// The deadline of one call: the per-call bound, or less if the saga has less left.
    fn timeout(&self, budget: Duration) -> Duration {
        self.call_timeout.min(budget).max(Duration::from_millis(1))
    }

    fn request<T>(message: T, timeout: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(timeout);
        // Join billing's spans to this saga step's trace (P35), when tracing exports.
        if let Some(tp) = keel_telemetry::propagation::current_traceparent()
            && let Ok(value) = tp.parse()
        {
            request.metadata_mut().insert("traceparent", value);
        }
        request
    }

    async fn bounded<F>(timeout: Duration, call: F) -> Result<Payment, CallError>
    where
        F: Future<Output = Result<tonic::Response<Payment>, Status>>,
    {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CallError::from_status(&status)),
            Err(_) => Err(CallError::Retryable {
                code: Code::DeadlineExceeded,
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }

    /// `Authorize` `amount` for `order_id` with the customer's token.
    pub async fn authorize(
        &self,
        idempotency_key: String,
        order_id: String,
        amount: Money,
        payment_token: String,
        budget: Duration,
    ) -> Result<Payment, CallError> {
        let timeout = self.timeout(budget);
        let request = Self::request(
            AuthorizeRequest {
                idempotency_key,
                order_id,
                amount: Some(PbMoney {
                    amount_minor: amount.minor,
                    currency: amount.currency.as_str().to_owned(),
                }),
                payment_token,
            },
            timeout,
        );
        let mut client = self.client.clone();
        Self::bounded(timeout, client.authorize(request)).await
    }

    /// `Capture` an authorized payment.
    pub async fn capture(
        &self,
        idempotency_key: String,
        payment_id: String,
        budget: Duration,
    ) -> Result<Payment, CallError> {
        let timeout = self.timeout(budget);
        let request = Self::request(
            CaptureRequest {
                idempotency_key,
                payment_id,
            },
            timeout,
        );
        let mut client = self.client.clone();
        Self::bounded(timeout, client.capture(request)).await
    }

    /// `Void` an authorization (compensation): `target`'s payment, or every payment of its
    /// order that still holds money. Voiding nothing is a success (status VOIDED).
    pub async fn void(
        &self,
        idempotency_key: String,
        target: VoidTarget,
        budget: Duration,
    ) -> Result<Payment, CallError> {
        let timeout = self.timeout(budget);
        // billing reads `payment_id` when it is set, else `order_id`.
        let (payment_id, order_id) = match target {
            VoidTarget::Payment(id) => (id, String::new()),
            VoidTarget::Order(id) => (String::new(), id),
        };
        let request = Self::request(
            VoidRequest {
                idempotency_key,
                payment_id,
                order_id,
            },
            timeout,
        );
        let mut client = self.client.clone();
        Self::bounded(timeout, client.void(request)).await
    }

    /// `GetPayment`: the payment's current state.
    pub async fn get_payment(
        &self,
        payment_id: String,
        budget: Duration,
    ) -> Result<Payment, CallError> {
        let timeout = self.timeout(budget);
        let request = Self::request(GetPaymentRequest { payment_id }, timeout);
        let mut client = self.client.clone();
        Self::bounded(timeout, client.get_payment(request)).await
    }

    /// The per-call bound (compensation calls use it whole: they have no saga deadline).
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes_are_retried_and_refusals_are_final() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            assert!(matches!(
                CallError::from_status(&Status::new(code, "x")),
                CallError::Retryable { .. }
            ));
        }
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound,
        ] {
            assert!(matches!(
                CallError::from_status(&Status::new(code, "x")),
                CallError::Final { .. }
            ));
        }
    }
}
