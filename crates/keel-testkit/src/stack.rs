//! Where the dependencies listen: `.keel/stack.env` (resolved by `infra/dev/stack.sh up`),
//! else the checked-in `infra/dev/stack.env` defaults.

use std::collections::HashMap;
use std::path::PathBuf;

/// Ports of the dependency stack.
#[derive(Debug, Clone)]
pub struct Stack {
    pub pg_port: u16,
    pub pgbouncer_port: u16,
    pub redis_port: u16,
    pub amqp_port: u16,
    pub amqp_mgmt_port: u16,
}

/// The workspace root, found from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_env_file(path: &PathBuf) -> HashMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            // Two forms: `PG_PORT=5432` (the resolved file) and `: "${PG_PORT:=5432}"`
            // (the checked-in defaults, overridable from the environment in bash).
            let l = l
                .strip_prefix(": \"${")
                .and_then(|r| r.strip_suffix("}\""))
                .map_or(l.to_owned(), |r| r.replacen(":=", "=", 1));
            let (k, v) = l.split_once('=')?;
            let v = v.trim().trim_matches('"');
            v.parse::<u16>().ok()?;
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

impl Stack {
    /// Reads the resolved stack file, falling back to the defaults.
    pub fn load() -> Self {
        // Every harness entry point passes here first: the test process gets its TLS provider.
        crate::install_crypto_provider();
        let root = workspace_root();
        let mut values = read_env_file(&root.join("infra/dev/stack.env"));
        values.extend(read_env_file(&root.join(".keel/stack.env")));
        let port = |k: &str, d: u16| values.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        Self {
            pg_port: port("PG_PORT", 5432),
            pgbouncer_port: port("PGBOUNCER_PORT", 6432),
            redis_port: port("REDIS_PORT", 6379),
            amqp_port: port("AMQP_PORT", 5672),
            amqp_mgmt_port: port("AMQP_MGMT_PORT", 15672),
        }
    }

    /// Superuser URL for `database` on the direct port (test set-up only).
    pub fn admin_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.pg_port)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    /// Base URL of the RabbitMQ management API.
    pub fn amqp_mgmt_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.amqp_mgmt_port)
    }
}

#[cfg(test)]
mod tests {
    use super::read_env_file;

    #[test]
    fn reads_both_the_defaults_form_and_the_resolved_form() {
        let path = std::env::temp_dir().join(format!("keel-stack-env-{}", std::process::id()));
        std::fs::write(
            &path,
            "# comment\n: \"${PG_PORT:=5432}\"\nPGBOUNCER_PORT=6499\nNOT_A_PORT=abc\n",
        )
        .unwrap();
        let values = read_env_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(values.get("PG_PORT").map(String::as_str), Some("5432"));
        assert_eq!(
            values.get("PGBOUNCER_PORT").map(String::as_str),
            Some("6499")
        );
        assert!(!values.contains_key("NOT_A_PORT"));
    }
}
