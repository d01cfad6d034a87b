//! The effective settings as `key = value` lines with every secret redacted: what
//! `<service> check-config` prints.
//!
//! A value is a secret when the last part of its key names one (`password`, `secret`,
//! `secrets`, `token`, `api_key`, `key`) or when the service's development profile sets that
//! key (the profile holds nothing but secrets). A secret is replaced whole, except a URL,
//! which keeps everything but its password and the query parameters that name a secret (the
//! host and database are what an operator checks); a URL the profile holds with no password
//! is replaced whole. Must not break: no secret value reaches
//! the output, whatever its shape (string, list, table).

use figment::value::Value;

/// Key parts that name a secret: their values are never printed.
const SECRET_KEYS: &[&str] = &["password", "secret", "secrets", "token", "api_key", "key"];

/// The placeholder printed instead of a secret.
const REDACTED: &str = "<redacted>";

/// Appends every setting under `prefix` to `out`, redacted; `secret_keys` are the keys the
/// development profile sets.
pub(crate) fn flatten(
    prefix: &str,
    value: &Value,
    secret_keys: &[String],
    out: &mut Vec<(String, String)>,
) {
    let last = prefix.rsplit('.').next().unwrap_or(prefix);
    let profile_secret = secret_keys.iter().any(|k| k == prefix);
    match value {
        // First, whatever the value's shape: a table or list under a secret's name
        // (`[webhook.secrets] current = "whsec_…"`) is redacted whole too.
        _ if is_secret_key(last) => out.push((prefix.to_owned(), REDACTED.to_owned())),
        // A URL with a password that the profile holds keeps the rest for the reader (host,
        // database), as any URL does; anything else it holds is redacted whole: without a
        // password, whatever makes the URL secret is somewhere else in it.
        Value::String(_, s) if profile_secret && !has_password(s) => {
            out.push((prefix.to_owned(), REDACTED.to_owned()));
        }
        Value::Dict(..) | Value::Array(..) if profile_secret => {
            out.push((prefix.to_owned(), REDACTED.to_owned()));
        }
        Value::Dict(_, dict) => {
            for (k, v) in dict {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, secret_keys, out);
            }
        }
        Value::String(_, s) => out.push((prefix.to_owned(), redact_url(s))),
        Value::Array(_, items) => {
            let items: Vec<String> = items
                .iter()
                .map(|v| match v {
                    Value::String(_, s) => format!("{:?}", redact_url(s)),
                    other => display(other),
                })
                .collect();
            out.push((prefix.to_owned(), format!("[{}]", items.join(", "))));
        }
        _ if profile_secret => out.push((prefix.to_owned(), REDACTED.to_owned())),
        other => out.push((prefix.to_owned(), display(other))),
    }
}

/// A scalar as text (numbers without quotes, as TOML writes them).
pub(crate) fn display(value: &Value) -> String {
    match value {
        Value::String(_, s) => s.clone(),
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_i128()
            .map(|i| i.to_string())
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
        Value::Empty(..) => String::new(),
        Value::Dict(..) | Value::Array(..) => "…".to_owned(),
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS
        .iter()
        .any(|s| key == *s || key.ends_with(&format!("_{s}")))
}

fn has_password(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| u.password().is_some())
}

/// `postgres://app:pw@host/db?sslpassword=x` -> the password and every query parameter that
/// names a secret redacted (libpq also takes `?password=`); anything that is not a URL as is.
fn redact_url(s: &str) -> String {
    let Ok(mut u) = url::Url::parse(s) else {
        return s.to_owned();
    };
    if u.cannot_be_a_base() {
        return s.to_owned();
    }
    if u.password().is_some() {
        let _ = u.set_password(Some(REDACTED));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_key(&k) || k.to_ascii_lowercase().contains("password") {
                    REDACTED.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}
