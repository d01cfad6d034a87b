//! The root `Cargo.toml`, as the generator needs it: the members' package names (a new
//! service's crate must not share one) and the text with one more member.
//!
//! Like the registry, the manifest is edited as text so its comments and order survive: the
//! new path goes after the last `services/…` member, keeping services together.

use std::collections::BTreeSet;
use std::path::Path;

use crate::ScaffoldError;

/// The workspace members' paths, as listed.
pub fn members(manifest: &str) -> Result<Vec<String>, ScaffoldError> {
    let value: toml::Table = toml::from_str(manifest).map_err(|e| ScaffoldError::Workspace {
        reason: format!("root Cargo.toml: {e}"),
    })?;
    let members = value
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .ok_or_else(|| ScaffoldError::Workspace {
            reason: "root Cargo.toml has no [workspace] members".to_owned(),
        })?;
    Ok(members
        .iter()
        .filter_map(|m| m.as_str().map(str::to_owned))
        .collect())
}

/// Every member's package name, with `-` read as `_`: two crates that differ only there get
/// the same library name, which cargo cannot link side by side.
pub fn package_names(root: &Path, members: &[String]) -> Result<BTreeSet<String>, ScaffoldError> {
    let mut names = BTreeSet::new();
    for member in members {
        let path = root.join(member).join("Cargo.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| ScaffoldError::Io {
            path: path.clone(),
            source,
        })?;
        let value: toml::Table = toml::from_str(&text).map_err(|e| ScaffoldError::Workspace {
            reason: format!("{}: {e}", path.display()),
        })?;
        if let Some(name) = value
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(toml::Value::as_str)
        {
            names.insert(name.replace('-', "_"));
        }
    }
    Ok(names)
}

/// Every package name in `Cargo.lock` (the workspace's members and every dependency, direct
/// or not), with `-` read as `_`. A service called like one of them (`serde`, `sqlx`) would be
/// a second package of that name in the graph, and a crate name that shadows a dependency the
/// service itself uses: the build breaks. Read at generation time, so a dependency added
/// yesterday is refused today.
pub fn lock_packages(root: &Path) -> Result<BTreeSet<String>, ScaffoldError> {
    let path = root.join("Cargo.lock");
    let text = std::fs::read_to_string(&path).map_err(|source| ScaffoldError::Io {
        path: path.clone(),
        source,
    })?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| ScaffoldError::Workspace {
        reason: format!("Cargo.lock: {e}"),
    })?;
    let packages = value
        .get("package")
        .and_then(toml::Value::as_array)
        .ok_or_else(|| ScaffoldError::Workspace {
            reason: "Cargo.lock lists no [[package]]".to_owned(),
        })?;
    Ok(packages
        .iter()
        .filter_map(|p| p.get("name").and_then(toml::Value::as_str))
        .map(|n| n.replace('-', "_"))
        .collect())
}

/// `manifest` with `member` added to `[workspace] members`, after the last `services/` entry
/// (or as the last member if there is none).
pub fn add_member(manifest: &str, member: &str) -> Result<String, ScaffoldError> {
    let lines: Vec<&str> = manifest.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("members"))
        .ok_or_else(|| ScaffoldError::Workspace {
            reason: "root Cargo.toml: no `members = [` line".to_owned(),
        })?;
    let end = lines[start..]
        .iter()
        .position(|l| l.trim() == "]")
        .map(|offset| start + offset)
        .ok_or_else(|| ScaffoldError::Workspace {
            reason: "root Cargo.toml: members must be one entry per line, closed by `]` alone"
                .to_owned(),
        })?;
    let at = lines[start..end]
        .iter()
        .rposition(|l| l.trim_start().starts_with("\"services/"))
        .map_or(end, |offset| start + offset + 1);
    let mut out: Vec<String> = lines[..at].iter().map(|l| (*l).to_owned()).collect();
    out.push(format!("    \"{member}\","));
    out.extend(lines[at..].iter().map(|l| (*l).to_owned()));
    let mut joined = out.join("\n");
    joined.push('\n');
    // The edit must leave a manifest that lists the member, or it is not written at all.
    if !members(&joined)?.iter().any(|m| m == member) {
        return Err(ScaffoldError::Workspace {
            reason: format!("root Cargo.toml: could not add `{member}` to members"),
        });
    }
    Ok(joined)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_member_goes_after_the_last_service() {
        let manifest = "[workspace]\nmembers = [\n    \"crates/a\",\n    \"services/x\",\n    # why\n    \"templates/service\",\n    \"e2e\",\n]\n";
        let out = add_member(manifest, "services/y").unwrap();
        assert_eq!(
            members(&out).unwrap(),
            [
                "crates/a",
                "services/x",
                "services/y",
                "templates/service",
                "e2e"
            ]
        );
    }

    #[test]
    fn without_services_it_is_the_last_member() {
        let out = add_member(
            "[workspace]\nmembers = [\n    \"crates/a\",\n]\n",
            "services/y",
        )
        .unwrap();
        assert_eq!(members(&out).unwrap(), ["crates/a", "services/y"]);
    }
}
