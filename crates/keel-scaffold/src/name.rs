//! A new service's name, parsed once: what `make new-service NAME=…` accepts and the three
//! spellings the template's placeholder is replaced with.
//!
//! Why so strict (`[a-z][a-z0-9]{1,29}`): the name is used unquoted as a Rust crate and
//! binary name, a Postgres database and role prefix (`keel_<name>`, `<name>_owner`), an AMQP
//! queue and routing-key word (`<name>.events`, `<name>.item.created`), a Redis key prefix and
//! an environment variable part (`<NAME>_HTTP_PORT`). A hyphen would need a second spelling in
//! Rust (`psp-sim` is the crate `psp_sim`) and an underscore is refused by the registry; the
//! length keeps `keel_tpl_<name>_<hash>` (the test kit's template database) within Postgres'
//! 63-byte identifiers.

use std::fmt;

/// Words a service cannot be called whatever the workspace holds: Rust keywords, the crates
/// every Rust program sees (a crate named `core` or `test` would shadow them), primitive
/// types, the template's placeholder, the platform's role prefix, and `pg` (roles starting
/// `pg_` are reserved by Postgres). What depends on the workspace (its packages, the
/// dependencies in `Cargo.lock`, the names the template uses) is checked by the generator.
#[rustfmt::skip]
const RESERVED: &[&str] = &[
    // Rust: strict, reserved and weak keywords that fit the pattern.
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum",
    "extern", "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move",
    "mut", "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true", "type",
    "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "gen", "macro",
    "override", "priv", "try", "typeof", "unsized", "virtual", "yield", "union",
    // Crates in every Rust program's prelude or test harness.
    "std", "core", "alloc", "test",
    // Primitive types: a path root is looked up among crates before primitive types, so a
    // crate `u8` would turn every `u8::MAX` and `str::from_utf8` in the service into a path
    // into itself.
    "bool", "char", "str", "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32",
    "u64", "u128", "usize", "f32", "f64",
    // Keel's own words.
    "skeleton", "platform", "keel", "pg",
];

const MAX_LEN: usize = 30;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` cannot be a service name: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: String,
}

/// A valid service name (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceName(String);

impl ServiceName {
    /// Parses `raw`, or says which rule it breaks.
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let refuse = |reason: &str| NameError {
            name: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let mut chars = raw.chars();
        match chars.next() {
            None => return Err(refuse("it is empty")),
            Some(c) if !c.is_ascii_lowercase() => {
                return Err(refuse("it must start with a lowercase ASCII letter"));
            }
            Some(_) => {}
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return Err(refuse(
                "only lowercase ASCII letters and digits are allowed (no `-` or `_`: the name is \
                 also a Rust crate, a Postgres role prefix and a routing-key word)",
            ));
        }
        if raw.len() < 2 || raw.len() > MAX_LEN {
            return Err(refuse(&format!(
                "it must be 2 to {MAX_LEN} characters long"
            )));
        }
        if RESERVED.contains(&raw) {
            return Err(refuse(
                "it is reserved (a Rust keyword, crate or primitive type, or Keel's own word)",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// `inventory`: the crate, binary, database, role, queue and routing-key spelling.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `Inventory`: the spelling of Rust type names.
    pub fn camel(&self) -> String {
        let mut chars = self.0.chars();
        chars
            .next()
            .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
            .unwrap_or_default()
    }

    /// `INVENTORY`: the spelling of environment variables.
    pub fn upper(&self) -> String {
        self.0.to_ascii_uppercase()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_name_parses_into_its_three_spellings() {
        let name = ServiceName::parse("inventory2").expect("valid");
        assert_eq!(
            (name.as_str(), name.camel(), name.upper()),
            (
                "inventory2",
                "Inventory2".to_owned(),
                "INVENTORY2".to_owned()
            )
        );
    }

    #[test]
    fn names_that_would_break_a_crate_a_role_or_a_routing_key_are_refused() {
        for bad in [
            "",
            "Inventory",
            "2fast",
            "in-ventory",
            "in_ventory",
            "in.ventory",
            "ünïcode",
            "x",
            "self",
            "test",
            "std",
            "u8",
            "skeleton",
            "platform",
            "pg",
            "abcdefghijklmnopqrstuvwxyzabcde",
        ] {
            let err = ServiceName::parse(bad).expect_err(bad);
            assert_eq!(err.name, bad);
        }
    }
}
