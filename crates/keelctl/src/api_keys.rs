//! `keelctl api-keys create --customer <id> [--service <name>]` and
//! `keelctl api-keys revoke <id> [--service <name>]`: customers' API keys, as the operator.
//!
//! A key is issued for one service (checkout unless `--service` names another): it is written
//! to that service's database, `customer_api_keys`, and is valid only on that service's API.
//! Each service's database holds its own keys; a customer that calls two services holds two
//! keys. The command connects as `keel_operator` to the service's `operator_url` (the
//! registry's, or `KEEL_<SERVICE>__OPERATOR_URL`), whose grants are exactly the one INSERT of
//! issuing and the one UPDATE of revoking: it cannot read a key's hash back.
//!
//! The key's format, its hash, the INSERT and the UPDATE are the platform's
//! (`keel_pg::api_keys`), shared with the services that verify keys
//! (`keel_service::api_keys::ApiKey`): keelctl links no service, only the platform crate the
//! services use too. What is here is the command line's side: a key is printed once, alone on
//! stdout, and never logged.

use keel_config::SecretString;

pub use keel_pg::api_keys::{ApiKeyError, IssuedKey, validate_customer, validate_id};

/// The service a key is issued for when `--service` is not given.
pub const DEFAULT_SERVICE: &str = "checkout";

/// [`keel_pg::api_keys::issue`] on a connection of its own to `database_url` (a service's
/// database, as a role allowed the INSERT): for harnesses that hold a URL, not a connection.
pub async fn issue(database_url: &str, customer: &str) -> Result<IssuedKey, ApiKeyError> {
    let mut conn = crate::connect(&SecretString::from(database_url.to_owned())).await?;
    let issued = keel_pg::api_keys::issue(&mut conn, customer).await;
    // Closing is courtesy to the server; the key is issued (or not) either way.
    let _ = sqlx::Connection::close(conn).await;
    issued
}
