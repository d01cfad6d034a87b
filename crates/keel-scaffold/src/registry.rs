//! `infra/services.toml`, as the generator needs it: which names and ports are taken, and the
//! file's text with one more `[[service]]` entry.
//!
//! The entry is appended as text, not by re-serialising the parsed TOML, so every comment and
//! the layout the registry's readers rely on (a TOML subset read by a bash script, see the
//! file's header) stay exactly as they were. It goes after the last `[[service]]` entry,
//! because the registry's order is the start order, and before the `[[roles]]` pairs.

use std::collections::BTreeSet;

use crate::ScaffoldError;

/// Where HTTP ports of services start (checkout's 8080, the conventions table).
pub const FIRST_HTTP_PORT: u16 = 8080;

/// What the registry already holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taken {
    /// `[[service]]` names.
    pub services: BTreeSet<String>,
    /// `[[roles]]` prefixes (a service's roles would collide with them).
    pub role_prefixes: BTreeSet<String>,
    /// Every port of every kind of every service.
    pub ports: BTreeSet<u16>,
}

/// Reads the names and ports the registry text holds.
pub fn taken(text: &str) -> Result<Taken, ScaffoldError> {
    let value: toml::Table = toml::from_str(text).map_err(|e| ScaffoldError::Registry {
        reason: e.to_string(),
    })?;
    let mut taken = Taken::default();
    let tables = |key: &str| -> Vec<toml::Table> {
        value
            .get(key)
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_table().cloned()).collect())
            .unwrap_or_default()
    };
    for service in tables("service") {
        if let Some(name) = service.get("name").and_then(toml::Value::as_str) {
            taken.services.insert(name.to_owned());
        }
        let ports = service.get("ports").and_then(toml::Value::as_table);
        for port in ports.into_iter().flat_map(|p| p.values()) {
            if let Some(p) = port.as_integer().and_then(|p| u16::try_from(p).ok()) {
                taken.ports.insert(p);
            }
        }
    }
    for roles in tables("roles") {
        if let Some(prefix) = roles.get("prefix").and_then(toml::Value::as_str) {
            taken.role_prefixes.insert(prefix.to_owned());
        }
    }
    Ok(taken)
}

/// The first port from [`FIRST_HTTP_PORT`] up that no registered service uses, of any kind.
pub fn next_http_port(taken: &Taken) -> Result<u16, ScaffoldError> {
    (FIRST_HTTP_PORT..=u16::MAX)
        .find(|p| !taken.ports.contains(p))
        .ok_or_else(|| ScaffoldError::Registry {
            reason: "no free port left".to_owned(),
        })
}

/// `text` with `entry` (one `[[service]]` table, no trailing blank line) inserted after the
/// last `[[service]]` entry, or at the end if there is none.
pub fn append_service(text: &str, entry: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_header = |l: &str| l.trim_start().starts_with('[');
    let belongs_to_service = |l: &str| {
        let l = l.trim_start();
        l.starts_with("[[service]]") || l.starts_with("[service.")
    };
    let last_service = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("[[service]]"));
    let mut at = match last_service {
        None => lines.len(),
        Some(start) => lines[start + 1..]
            .iter()
            .position(|l| is_header(l) && !belongs_to_service(l))
            .map_or(lines.len(), |offset| start + 1 + offset),
    };
    // The comment block (and blank lines) just above the next table introduces that table:
    // the new entry goes above it.
    while at > 0
        && {
            let l = lines[at - 1].trim();
            l.is_empty() || l.starts_with('#')
        }
        && last_service.is_some_and(|s| at - 1 > s)
    {
        at -= 1;
    }
    // One blank line on each side of the entry, whatever was there before.
    let mut out: Vec<&str> = lines[..at].to_vec();
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    let rest: Vec<&str> = lines[at..]
        .iter()
        .copied()
        .skip_while(|l| l.trim().is_empty())
        .collect();
    out.push("");
    out.extend(entry.trim_end().lines());
    if !rest.is_empty() {
        out.push("");
        out.extend(rest);
    }
    // Keep the file's final newline.
    let mut joined = out.join("\n");
    joined.push('\n');
    joined
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const REGISTRY: &str = r#"# header

[[service]]
name = "a"
ports = { http = 8080, grpc = 50051 }

[[service]]
name = "b"
ports = { http = 8081 }
[service.env]
KEEL_X = "y"

# Role pairs: comment about roles.
[[roles]]
prefix = "platform"
"#;

    #[test]
    fn taken_names_prefixes_and_ports_are_read() {
        let t = taken(REGISTRY).unwrap();
        assert_eq!(t.services, ["a", "b"].map(String::from).into());
        assert_eq!(t.role_prefixes, ["platform"].map(String::from).into());
        assert_eq!(t.ports, [8080, 8081, 50051].into());
        assert_eq!(next_http_port(&t).unwrap(), 8082);
    }

    #[test]
    fn the_entry_goes_after_the_last_service_and_before_the_roles_comment() {
        let out = append_service(
            REGISTRY,
            "[[service]]\nname = \"c\"\nports = { http = 8082 }",
        );
        let expected = r#"# header

[[service]]
name = "a"
ports = { http = 8080, grpc = 50051 }

[[service]]
name = "b"
ports = { http = 8081 }
[service.env]
KEEL_X = "y"

[[service]]
name = "c"
ports = { http = 8082 }

# Role pairs: comment about roles.
[[roles]]
prefix = "platform"
"#;
        assert_eq!(out, expected);
        let t = taken(&out).unwrap();
        assert!(t.services.contains("c"));
    }

    #[test]
    fn a_registry_with_no_service_gets_the_entry_at_the_end() {
        let out = append_service("# only a header\n", "[[service]]\nname = \"c\"");
        assert_eq!(out, "# only a header\n\n[[service]]\nname = \"c\"\n");
    }
}
