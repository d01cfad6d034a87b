#![doc = include_str!("../README.md")]

mod name;
pub mod registry;
pub mod workspace;

use std::path::{Path, PathBuf};

pub use name::{NameError, ServiceName};

/// The template's folder, relative to the workspace root.
pub const TEMPLATE_DIR: &str = "templates/service";

/// The template's registry entry, relative to the workspace root.
pub const REGISTRY_ENTRY: &str = "templates/registry-entry.toml";

/// The registry, relative to the workspace root.
pub const REGISTRY: &str = "infra/services.toml";

/// The template's placeholder name, in its three spellings.
pub const PLACEHOLDER: [&str; 3] = ["skeleton", "Skeleton", "SKELETON"];

/// The template's placeholder HTTP port: `port = 8099` in its `config/default.toml` and
/// `http = 8099` in its registry entry, each replaced by the port the generator picks.
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

/// One file of the service to write: its path under the service's folder and its content.
#[derive(Debug)]
struct File {
    path: PathBuf,
    content: Vec<u8>,
}

/// Reads the template into memory, rendered. Build output (`target/`) is not part of it.
fn render_template(
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
    let registry_text = registry::append_service(&registry_text, &entry);
    if !registry::taken(&registry_text)?
        .services
        .contains(name.as_str())
    {
        return Err(ScaffoldError::Template {
            reason: format!("{REGISTRY_ENTRY} did not add a service called `{name}`"),
        });
    }
    let manifest = workspace::add_member(&manifest, &member)?;

    // 3. Write: the folder under a temporary name first, so a failure leaves no half service.
    let staging = root.join("services").join(format!(".{name}.scaffolding"));
    let _ = std::fs::remove_dir_all(&staging);
    let write = || -> Result<(), ScaffoldError> {
        for file in &files {
            let path = staging.join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, &file.content).map_err(io(&path))?;
        }
        std::fs::rename(&staging, &target).map_err(io(&target))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::write(&registry_path, registry_text).map_err(io(&registry_path))?;
    std::fs::write(&manifest_path, manifest).map_err(io(&manifest_path))?;
    Ok(Scaffolded {
        name,
        dir,
        http_port,
    })
}
