#![doc = include_str!("../README.md")]

mod commit;
pub mod deploy;
pub mod identifiers;
pub mod k8s;
mod name;
pub mod registry;
pub mod workspace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use commit::{File, Folder, Replace};

pub use name::{NameError, ServiceName};

/// The template's folder, relative to the workspace root.
pub const TEMPLATE_DIR: &str = "templates/service";

/// The template's registry entry, relative to the workspace root.
pub const REGISTRY_ENTRY: &str = "templates/registry-entry.toml";

/// The registry, relative to the workspace root.
pub const REGISTRY: &str = "infra/services.toml";

/// The template's placeholder name, in its three spellings.
pub const PLACEHOLDER: [&str; 3] = ["skeleton", "Skeleton", "SKELETON"];

/// What the template appends to the camel-cased name to name the service's command-line type
/// (`SkeletonService`, `InventoryService`): a suffix, so the type can never be one of the
/// template's own names (`App`, `Config`) or the prelude's (`Result`, `Option`), which the bare
/// camel-cased name could.
pub const MARKER_SUFFIX: &str = "Service";

/// The template's placeholder HTTP port: `port = 8099` in its `config/default.toml`,
/// `http = 8099` in its registry entry, and every 8099 of its compose entry and Kubernetes
/// manifests, each replaced by the port the generator picks.
pub const PLACEHOLDER_PORT: u16 = 8099;

/// The one file of the template that sets the HTTP port.
const CONFIG_FILE: &str = "config/default.toml";

/// Why a service could not be scaffolded. Nothing is written unless every check passed.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(transparent)]
    Name(#[from] NameError),
    /// The name is free as a word but taken in this workspace.
    #[error("`{name}` is taken: {by}")]
    Taken { name: String, by: String },
    /// Writing failed and so did undoing part of it: what is left is named.
    #[error("{source}; undoing it failed too: {left}")]
    Incomplete {
        source: Box<ScaffoldError>,
        left: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("infra/services.toml: {reason}")]
    Registry { reason: String },
    #[error("{reason}")]
    Workspace { reason: String },
    /// The template no longer has what the generator replaces (a bug in the template).
    #[error("template: {reason}")]
    Template { reason: String },
}

/// What [`new_service`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaffolded {
    pub name: ServiceName,
    /// `services/<name>`, relative to the workspace root.
    pub dir: PathBuf,
    pub http_port: u16,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ScaffoldError + '_ {
    move |source| ScaffoldError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, ScaffoldError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// `text` with the placeholder replaced by `name`, in all three spellings.
pub fn render(text: &str, name: &ServiceName) -> String {
    let [lower, camel, upper] = PLACEHOLDER;
    text.replace(lower, name.as_str())
        .replace(camel, &name.camel())
        .replace(upper, &name.upper())
}

/// `text` with `key = 8099` (the placeholder port) replaced by `key = port`; it must occur
/// exactly once, or the template has drifted from what the generator knows.
fn set_port(text: &str, key: &str, port: u16, file: &str) -> Result<String, ScaffoldError> {
    let placeholder = format!("{key} = {PLACEHOLDER_PORT}");
    if text.matches(&placeholder).count() != 1 {
        return Err(ScaffoldError::Template {
            reason: format!("{file} must contain `{placeholder}` exactly once"),
        });
    }
    Ok(text.replace(&placeholder, &format!("{key} = {port}")))
}

/// `text` with every [`PLACEHOLDER_PORT`] that stands as a number of its own (not inside a
/// longer one, as in 18099) replaced by `port`, and how many there were.
pub(crate) fn replace_port(text: &str, port: u16) -> (String, usize) {
    let placeholder = PLACEHOLDER_PORT.to_string();
    let (mut out, mut count, mut last) = (String::with_capacity(text.len()), 0, 0);
    for (at, _) in text.match_indices(&placeholder) {
        let end = at + placeholder.len();
        let digit_before = text[..at].ends_with(|c: char| c.is_ascii_digit());
        let digit_after = text[end..].starts_with(|c: char| c.is_ascii_digit());
        if digit_before || digit_after {
            continue;
        }
        out.push_str(&text[last..at]);
        out.push_str(&port.to_string());
        last = end;
        count += 1;
    }
    out.push_str(&text[last..]);
    (out, count)
}

/// Every name the template's Rust files (`src/` and `tests/`) use at module level, lowercased,
/// with one place it was found (`App` in `src/lib.rs`).
fn template_names(
    dir: &Path,
    rel: &Path,
    out: &mut BTreeMap<String, String>,
) -> Result<(), ScaffoldError> {
    let here = dir.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&here)
        .map_err(io(&here))?
        .collect::<Result<_, _>>()
        .map_err(io(&here))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let rel_path = rel.join(entry.file_name());
        let path = entry.path();
        if entry.file_type().map_err(io(&path))?.is_dir() {
            if entry.file_name() != "target" {
                template_names(dir, &rel_path, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = read(&path)?;
            for ident in identifiers::module_level(&text) {
                out.entry(ident.to_ascii_lowercase())
                    .or_insert_with(|| format!("`{ident}` in {}", rel_path.display()));
            }
        }
    }
    Ok(())
}

/// Refuses a name that would collide with what the template or the dependency graph already
/// calls that: the service's crate is named `name` and its command-line type
/// `{Camel}Service`, and both share scopes with the template's own names.
fn check_collisions(root: &Path, name: &ServiceName) -> Result<(), ScaffoldError> {
    let taken = |by: String| ScaffoldError::Taken {
        name: name.to_string(),
        by,
    };
    let template_dir = root.join(TEMPLATE_DIR);
    let mut names = BTreeMap::new();
    template_names(&template_dir, Path::new(""), &mut names)?;
    if let Some(place) = names.get(name.as_str()) {
        return Err(taken(format!(
            "the template already uses {place} at module level, and a service's name must \
             differ from those in any letter case (it becomes the crate `{name}` and the type \
             `{}{MARKER_SUFFIX}` beside them). Pick another name",
            name.camel()
        )));
    }
    let marker = format!("{}{MARKER_SUFFIX}", name.camel());
    if let Some(place) = names.get(&marker.to_ascii_lowercase()) {
        return Err(taken(format!(
            "the service's command-line type would be `{marker}`, and the template already \
             uses {place} at module level"
        )));
    }
    if workspace::lock_packages(root)?.contains(name.as_str()) {
        return Err(taken(format!(
            "Cargo.lock has a package `{name}` (a dependency): a service crate of the same \
             name would shadow it and break the build. Pick another name"
        )));
    }
    Ok(())
}

/// Reads a template folder into memory, rendered. Build output (`target/`) is not part of it.
pub(crate) fn render_template(
    dir: &Path,
    rel: &Path,
    name: &ServiceName,
    out: &mut Vec<File>,
) -> Result<(), ScaffoldError> {
    let here = dir.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&here)
        .map_err(io(&here))?
        .collect::<Result<_, _>>()
        .map_err(io(&here))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name == "target" {
            continue;
        }
        let rel_path = rel.join(render(&file_name, name));
        let path = entry.path();
        if entry.file_type().map_err(io(&path))?.is_dir() {
            render_template(dir, &rel.join(&*file_name), name, out)?;
            // Keep the rendered directory name (a placeholder in a folder name is replaced).
            let from = rel.join(&*file_name);
            if from != rel_path {
                for f in out.iter_mut().filter(|f| f.path.starts_with(&from)) {
                    if let Ok(tail) = f.path.strip_prefix(&from) {
                        f.path = rel_path.join(tail);
                    }
                }
            }
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let content = match String::from_utf8(bytes) {
            Ok(text) => render(&text, name).into_bytes(),
            // Not text: copied as it is.
            Err(e) => e.into_bytes(),
        };
        out.push(File {
            path: rel_path,
            content,
        });
    }
    Ok(())
}

/// Scaffolds `services/<raw_name>` in the workspace at `root` (see the crate docs).
pub fn new_service(root: &Path, raw_name: &str) -> Result<Scaffolded, ScaffoldError> {
    let name = ServiceName::parse(raw_name)?;
    let taken = |by: String| ScaffoldError::Taken {
        name: name.to_string(),
        by,
    };

    // 1. Everything that could refuse, before anything is written.
    let registry_path = root.join(REGISTRY);
    let registry_text = read(&registry_path)?;
    let in_registry = registry::taken(&registry_text)?;
    if in_registry.services.contains(name.as_str()) {
        return Err(taken(
            "a service of that name is in infra/services.toml".into(),
        ));
    }
    if in_registry.role_prefixes.contains(name.as_str()) {
        return Err(taken("a [[roles]] prefix in infra/services.toml".into()));
    }
    let manifest_path = root.join("Cargo.toml");
    let manifest = read(&manifest_path)?;
    let members = workspace::members(&manifest)?;
    if workspace::package_names(root, &members)?.contains(name.as_str()) {
        return Err(taken("a workspace package of that name exists".into()));
    }
    let dir = PathBuf::from("services").join(name.as_str());
    let target = root.join(&dir);
    if target.exists() {
        return Err(taken(format!("{} exists", dir.display())));
    }
    let member = format!("services/{name}");
    if members.contains(&member) {
        return Err(taken(format!("`{member}` is a workspace member")));
    }
    check_collisions(root, &name)?;
    let http_port = registry::next_http_port(&in_registry)?;

    // 2. The new texts, in memory.
    let template_dir = root.join(TEMPLATE_DIR);
    let mut files = Vec::new();
    render_template(&template_dir, Path::new(""), &name, &mut files)?;
    let config = files
        .iter_mut()
        .find(|f| f.path == Path::new(CONFIG_FILE))
        .ok_or_else(|| ScaffoldError::Template {
            reason: format!("no {CONFIG_FILE}"),
        })?;
    let text = String::from_utf8_lossy(&config.content).into_owned();
    config.content = set_port(&text, "port", http_port, CONFIG_FILE)?.into_bytes();
    let entry = render(&read(&root.join(REGISTRY_ENTRY))?, &name);
    let entry = set_port(&entry, "http", http_port, REGISTRY_ENTRY)?;
    let entry: String = entry
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let old_registry = registry_text;
    let registry_text = registry::append_service(&old_registry, &entry);
    if !registry::taken(&registry_text)?
        .services
        .contains(name.as_str())
    {
        return Err(ScaffoldError::Template {
            reason: format!("{REGISTRY_ENTRY} did not add a service called `{name}`"),
        });
    }
    let new_manifest = workspace::add_member(&manifest, &member)?;

    // Its place in the deployments: compose.yaml and the Kubernetes manifests.
    let compose = deploy::plan(root, &name, http_port)?;
    let cluster = k8s::plan(root, &name, http_port)?;

    // 3. Write the folders and every file that names the service all or nothing: the
    // service's folder first, the root manifest last (it is what makes cargo look for the
    // folder).
    let mut folders = vec![Folder {
        path: target,
        files,
    }];
    folders.extend(cluster.folders);
    let mut replaces = compose;
    replaces.extend(cluster.replaces);
    replaces.push(Replace {
        path: registry_path,
        old: Some(old_registry.into_bytes()),
        new: registry_text.into_bytes(),
    });
    replaces.push(Replace {
        path: manifest_path,
        old: Some(manifest.into_bytes()),
        new: new_manifest.into_bytes(),
    });
    commit::apply(&folders, &replaces, name.as_str())?;
    Ok(Scaffolded {
        name,
        dir,
        http_port,
    })
}
