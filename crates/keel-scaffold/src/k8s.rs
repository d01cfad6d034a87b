//! The new service's place in the Kubernetes manifests (`k8s/`), so `make kind-up` deploys it
//! with the others and `infra/k8s/check.sh` and the drift test hold it to the same rules.
//!
//! Two folders, from `templates/k8s/` rendered like the service's template (the placeholder
//! name and port replaced): `k8s/base/<name>/` (its Deployment, Service, migration Job,
//! network policy, disruption budget) and `k8s/overlays/kind/secrets/<name>/` (the kind
//! cluster's development Secret, one file per key). And three one-line edits to what lists the
//! services: the base's `resources:`, the kind overlay's `images:` and `secretGenerator:`, and
//! the database list of the script that creates the kind Postgres's roles.
//!
//! Everything else in the overlay was made not to name a service, so it needs no edit: its
//! patches select Deployments by label, pgbouncer looks every role up in Postgres, and the
//! dependencies' network policies admit pods by their `keel.dev/database` and
//! `keel.dev/broker` labels.
//!
//! As with compose.yaml ([`crate::deploy`]), the files are edited as text, never re-serialised
//! (their comments are what a reader learns from), and every anchor is checked before
//! anything is written: a file reshaped by hand fails the generator with the reason.

use std::path::Path;

use crate::commit::{Folder, Replace};
use crate::{ScaffoldError, ServiceName};

/// The template of a service's manifests, relative to the workspace root.
pub const TEMPLATE_BASE: &str = "templates/k8s/base";

/// The template of a service's development Secret in the kind overlay, one file per key.
pub const TEMPLATE_KIND_SECRETS: &str = "templates/k8s/overlays/kind/secrets";

/// Where each service's manifests live: `<BASE>/<name>/`, listed in `<BASE>/kustomization.yaml`.
pub const BASE: &str = "k8s/base";

/// The kind overlay.
pub const KIND: &str = "k8s/overlays/kind";

/// The script that creates the kind Postgres's roles and databases.
pub const KIND_ROLES: &str = "k8s/overlays/kind/dependencies/postgres/10-keel-roles.sh";

/// The tag `infra/k8s/kind.sh` gives the images it builds, which the overlay pins.
pub const KIND_TAG: &str = "dev";

/// What the roles script passes psql: the databases to create, comma-separated.
const SERVICES_VAR: &str = "-v services=";

/// What [`plan`] adds: the new folders and the edited files.
#[derive(Debug)]
pub(crate) struct Plan {
    pub folders: Vec<Folder>,
    pub replaces: Vec<Replace>,
}

fn template(file: &str, reason: impl Into<String>) -> ScaffoldError {
    ScaffoldError::Template {
        reason: format!("{file}: {}", reason.into()),
    }
}

/// The manifests and kind entries of `name` on `http_port` (see the module docs). A folder
/// that exists already refuses the name.
pub(crate) fn plan(root: &Path, name: &ServiceName, http_port: u16) -> Result<Plan, ScaffoldError> {
    let base_dir = root.join(BASE).join(name.as_str());
    let secrets_dir = root.join(KIND).join("secrets").join(name.as_str());
    for dir in [&base_dir, &secrets_dir] {
        if dir.exists() {
            return Err(ScaffoldError::Taken {
                name: name.to_string(),
                by: format!("{} exists", dir.display()),
            });
        }
        if let Some(parent) = dir.parent().filter(|p| !p.is_dir()) {
            return Err(ScaffoldError::Workspace {
                reason: format!("{} is not a folder", parent.display()),
            });
        }
    }

    let mut manifests = Vec::new();
    crate::render_template(
        &root.join(TEMPLATE_BASE),
        Path::new(""),
        name,
        &mut manifests,
    )?;
    let mut ports = 0;
    for file in &mut manifests {
        let text = String::from_utf8_lossy(&file.content);
        let (text, count) = crate::replace_port(&text, http_port);
        file.content = text.into_bytes();
        ports += count;
    }
    if ports == 0 {
        return Err(template(
            TEMPLATE_BASE,
            "no manifest mentions the placeholder port",
        ));
    }
    let mut secrets = Vec::new();
    crate::render_template(
        &root.join(TEMPLATE_KIND_SECRETS),
        Path::new(""),
        name,
        &mut secrets,
    )?;
    let keys: Vec<String> = secrets
        .iter()
        .map(|f| f.path.to_string_lossy().into_owned())
        .collect();
    if keys.is_empty() {
        return Err(template(TEMPLATE_KIND_SECRETS, "no secret file"));
    }

    let mut replaces = Vec::new();
    let mut edit = |file: &str,
                    change: &dyn Fn(&str) -> Result<String, ScaffoldError>|
     -> Result<(), ScaffoldError> {
        let path = root.join(file);
        let old = crate::read(&path)?;
        let new = change(&old)?;
        replaces.push(Replace {
            path,
            old: Some(old.into_bytes()),
            new: new.into_bytes(),
        });
        Ok(())
    };
    let base_kustomization = format!("{BASE}/kustomization.yaml");
    edit(&base_kustomization, &|text| {
        add_to_base(text, name.as_str(), &base_kustomization)
    })?;
    let kind_kustomization = format!("{KIND}/kustomization.yaml");
    edit(&kind_kustomization, &|text| {
        add_to_kind(text, name.as_str(), &keys, &kind_kustomization)
    })?;
    edit(KIND_ROLES, &|text| add_database(text, name.as_str()))?;

    Ok(Plan {
        folders: vec![
            Folder {
                path: base_dir,
                files: manifests,
            },
            Folder {
                path: secrets_dir,
                files: secrets,
            },
        ],
        replaces,
    })
}

/// The base's kustomization with the service's folder at the end of its `resources:`.
pub fn add_to_base(kustomization: &str, name: &str, file: &str) -> Result<String, ScaffoldError> {
    append_to_list(kustomization, "resources:", &format!("  - {name}\n"), file)
}

/// The kind overlay's kustomization with the service's image pinned (at the end of `images:`)
/// and its Secret generated from `keys`, the files of `secrets/<name>/` (at the end of
/// `secretGenerator:`).
pub fn add_to_kind(
    kustomization: &str,
    name: &str,
    keys: &[String],
    file: &str,
) -> Result<String, ScaffoldError> {
    let image = format!("  - {{ name: keel/{name}, newTag: {KIND_TAG} }}\n");
    let text = append_to_list(kustomization, "images:", &image, file)?;
    let mut secret = format!("  - name: {name}\n    files:\n");
    for key in keys {
        secret.push_str(&format!("      - secrets/{name}/{key}\n"));
    }
    append_to_list(&text, "secretGenerator:", &secret, file)
}

/// `text` with `item` (one or more lines, first indented `  - `) after the last line of the
/// list under the top-level `key` (a line of its own; the list is the indented lines after
/// it). Refused when the key is missing or given twice, when what follows it is not such a
/// list, or when the list has `item`'s first line already.
fn append_to_list(text: &str, key: &str, item: &str, file: &str) -> Result<String, ScaffoldError> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let keys: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim_end() == key)
        .collect();
    let [at] = keys[..] else {
        return Err(template(
            file,
            format!(
                "needs exactly one top-level `{key}` line, found {}",
                keys.len()
            ),
        ));
    };
    let list = &lines[at + 1..];
    let len = list
        .iter()
        .take_while(|l| l.starts_with(' ') && !l.trim().is_empty())
        .count();
    if len == 0 || !list[0].starts_with("  - ") {
        return Err(template(
            file,
            format!("`{key}` is not followed by a `  - ` list"),
        ));
    }
    let first = item.lines().next().unwrap_or_default();
    if list[..len].iter().any(|l| l.trim_end() == first) {
        return Err(template(
            file,
            format!("`{key}` already has `{}`", first.trim()),
        ));
    }
    let mut out = String::with_capacity(text.len() + item.len() + 1);
    for line in &lines[..=at + len] {
        out.push_str(line);
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(item);
    for line in &lines[at + len + 1..] {
        out.push_str(line);
    }
    Ok(out)
}

/// The kind Postgres's roles script with `name` at the end of its `-v services=` list.
pub fn add_database(script: &str, name: &str) -> Result<String, ScaffoldError> {
    let found: Vec<usize> = script.match_indices(SERVICES_VAR).map(|(i, _)| i).collect();
    let [at] = found[..] else {
        return Err(template(
            KIND_ROLES,
            format!("needs exactly one `{SERVICES_VAR}`, found {}", found.len()),
        ));
    };
    let start = at + SERVICES_VAR.len();
    let end = script[start..]
        .find(char::is_whitespace)
        .map_or(script.len(), |i| start + i);
    let list = &script[start..end];
    if list.split(',').any(|s| s == name) {
        return Err(template(KIND_ROLES, format!("already lists `{name}`")));
    }
    let sep = if list.is_empty() { "" } else { "," };
    Ok(format!("{}{sep}{name}{}", &script[..end], &script[end..]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE_TEXT: &str =
        "# services\nkind: Kustomization\nresources:\n  - namespace.yaml\n  - checkout\n";

    const KIND_TEXT: &str = "resources:\n  - ../../base\n# pinned\nimages:\n  - { name: keel/checkout, newTag: dev }\n# secrets\nsecretGenerator:\n  - name: checkout\n    files:\n      - secrets/checkout/database-url\npatches:\n  - target:\n      kind: Service\n";

    #[test]
    fn the_folder_is_appended_to_the_bases_resources() {
        let out = add_to_base(BASE_TEXT, "inventory", "k").unwrap();
        assert_eq!(out, format!("{BASE_TEXT}  - inventory\n"));
        // A file that does not end in a newline still gets one line per entry.
        let out = add_to_base(BASE_TEXT.trim_end(), "inventory", "k").unwrap();
        assert!(out.ends_with("  - checkout\n  - inventory\n"), "{out}");
    }

    #[test]
    fn the_image_and_the_secret_go_at_the_end_of_their_lists() {
        let keys = ["amqp-url".to_owned(), "database-url".to_owned()];
        let out = add_to_kind(KIND_TEXT, "inventory", &keys, "k").unwrap();
        assert!(
            out.contains(
                "  - { name: keel/checkout, newTag: dev }\n  - { name: keel/inventory, newTag: dev }\n# secrets\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "      - secrets/checkout/database-url\n  - name: inventory\n    files:\n      - secrets/inventory/amqp-url\n      - secrets/inventory/database-url\npatches:\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_reshaped_kustomization_is_refused_with_the_reason() {
        let e = add_to_base("resources: [a, b]\n", "inventory", "k").unwrap_err();
        assert!(e.to_string().contains("one top-level `resources:`"), "{e}");
        let e = add_to_base("resources:\n# none yet\n", "inventory", "k").unwrap_err();
        assert!(
            e.to_string().contains("not followed by a `  - ` list"),
            "{e}"
        );
        let e =
            add_to_kind(&KIND_TEXT.replace("images:", "images: []"), "x", &[], "k").unwrap_err();
        assert!(e.to_string().contains("one top-level `images:`"), "{e}");
        let e = add_to_base(BASE_TEXT, "checkout", "k").unwrap_err();
        assert!(e.to_string().contains("already has `- checkout`"), "{e}");
    }

    #[test]
    fn the_database_joins_the_roles_scripts_list() {
        let script = "psql \\\n  -v services=checkout,billing -v extra_roles= \\\n  -f x\n";
        let out = add_database(script, "inventory").unwrap();
        assert!(
            out.contains("-v services=checkout,billing,inventory -v extra_roles="),
            "{out}"
        );
        let empty = add_database("psql -v services= -f x", "inventory").unwrap();
        assert_eq!(empty, "psql -v services=inventory -f x");
        let e = add_database(script, "billing").unwrap_err();
        assert!(e.to_string().contains("already lists `billing`"), "{e}");
        let e = add_database("psql -f x", "inventory").unwrap_err();
        assert!(e.to_string().contains("-v services="), "{e}");
    }
}
