//! Writing a new service all or nothing: its folder, and the registry and root manifest that
//! name it, appear together or not at all.
//!
//! Why it matters: the three are one fact. A folder without its workspace member is a service
//! `make dev` tries to start but cargo never builds; a workspace member without its folder
//! stops every cargo command in the workspace; a registry entry alone makes the dev scripts
//! look for a binary that does not exist. And a re-run refuses a name whose folder exists, so
//! a half-written service cannot be fixed by running the generator again.
//!
//! How: everything is first written where nobody looks (the folder under
//! `services/.<name>.scaffolding`, each changed file as `.<file>.<name>.scaffolding` beside
//! it, with the original's permissions); a failure there removes those and nothing else
//! changed. Then each is renamed into place (a rename is atomic: a reader sees the old file or
//! the new one, never half of it), folder first and the root manifest last, since the
//! manifest is what makes cargo look for the folder. A failed rename undoes the earlier ones:
//! the folder is removed and each replaced file gets its original content back (by the same
//! write-then-rename). What this cannot cover is the process being killed between two renames;
//! the window is three renames long, and the temporary names of a killed run are removed by
//! the next one.

use std::path::{Path, PathBuf};

use crate::ScaffoldError;

/// One file of the new folder: its path under the folder and its content.
#[derive(Debug)]
pub(crate) struct File {
    pub path: PathBuf,
    pub content: Vec<u8>,
}

/// A file outside the new folder to replace: its path, what it held when the generator read
/// it (restored on failure), and its new content.
#[derive(Debug)]
pub(crate) struct Replace {
    pub path: PathBuf,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ScaffoldError + '_ {
    move |source| ScaffoldError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a changed file is written before it is renamed over `path`.
fn temp_path(path: &Path, tag: &str) -> PathBuf {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{file_name}.{tag}.scaffolding"))
}

/// Writes `content` to `temp`, with the permissions of `like` if it exists.
fn write_temp(temp: &Path, content: &[u8], like: &Path) -> Result<(), ScaffoldError> {
    // A temporary file a killed run left behind; anything else there makes the write fail.
    if temp.is_file() {
        std::fs::remove_file(temp).map_err(io(temp))?;
    }
    std::fs::write(temp, content).map_err(io(temp))?;
    if let Ok(meta) = std::fs::metadata(like) {
        std::fs::set_permissions(temp, meta.permissions()).map_err(io(temp))?;
    }
    Ok(())
}

/// Writes the folder `target` (made of `files`) and the `replaces`, all or nothing (see the
/// module docs). `tag` (the service's name) keeps the temporary names of two runs for two
/// names apart.
pub(crate) fn apply(
    target: &Path,
    files: &[File],
    replaces: &[Replace],
    tag: &str,
) -> Result<(), ScaffoldError> {
    let staging = target.with_file_name(format!(".{tag}.scaffolding"));
    let temps: Vec<PathBuf> = replaces.iter().map(|r| temp_path(&r.path, tag)).collect();
    let remove_temps = || {
        for temp in &temps {
            if temp.is_file() {
                let _ = std::fs::remove_file(temp);
            }
        }
    };

    // 1. Out of sight: a failure here leaves what was there before, and nothing of ours.
    let prepare = || -> Result<(), ScaffoldError> {
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        for file in files {
            let path = staging.join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, &file.content).map_err(io(&path))?;
        }
        for (replace, temp) in replaces.iter().zip(&temps) {
            write_temp(temp, &replace.new, &replace.path)?;
        }
        Ok(())
    };
    if let Err(e) = prepare() {
        let _ = std::fs::remove_dir_all(&staging);
        remove_temps();
        return Err(e);
    }

    // 2. Into place, one rename each; a failure undoes the renames before it.
    if let Err(e) = std::fs::rename(&staging, target).map_err(io(target)) {
        let _ = std::fs::remove_dir_all(&staging);
        remove_temps();
        return Err(e);
    }
    for (done, (replace, temp)) in replaces.iter().zip(&temps).enumerate() {
        if let Err(e) = std::fs::rename(temp, &replace.path).map_err(io(&replace.path)) {
            remove_temps();
            let mut left = Vec::new();
            for undo in replaces[..done].iter().rev() {
                let temp = temp_path(&undo.path, tag);
                let restored = write_temp(&temp, &undo.old, &undo.path)
                    .and_then(|()| std::fs::rename(&temp, &undo.path).map_err(io(&undo.path)));
                if let Err(undo_error) = restored {
                    let _ = std::fs::remove_file(&temp);
                    left.push(format!(
                        "{} keeps the new text ({undo_error})",
                        undo.path.display()
                    ));
                }
            }
            if let Err(undo_error) = std::fs::remove_dir_all(target) {
                left.push(format!(
                    "{} is still there ({undo_error})",
                    target.display()
                ));
            }
            return Err(if left.is_empty() {
                e
            } else {
                ScaffoldError::Incomplete {
                    source: Box::new(e),
                    left: left.join("; "),
                }
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A scratch folder with `a.toml` and `services/`, and what `apply` would change there.
    fn scratch(test: &str) -> (PathBuf, Vec<File>, Vec<Replace>) {
        let root = std::env::temp_dir().join(format!(
            "keel-scaffold-commit-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("services")).unwrap();
        std::fs::write(root.join("a.toml"), "old a").unwrap();
        let files = vec![File {
            path: PathBuf::from("src/lib.rs"),
            content: b"//! new".to_vec(),
        }];
        let replaces = vec![
            Replace {
                path: root.join("a.toml"),
                old: b"old a".to_vec(),
                new: b"new a".to_vec(),
            },
            Replace {
                path: root.join("b.toml"),
                old: b"old b".to_vec(),
                new: b"new b".to_vec(),
            },
        ];
        (root, files, replaces)
    }

    /// Every path under `dir`, relative to it.
    fn tree(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(dir).unwrap().to_owned());
            if path.is_dir() {
                out.extend(
                    tree(&path)
                        .into_iter()
                        .map(|p| path.strip_prefix(dir).unwrap().join(p)),
                );
            }
        }
        out.sort();
        out
    }

    #[test]
    fn everything_is_written_when_nothing_fails() {
        let (root, files, replaces) = scratch("ok");
        std::fs::write(root.join("b.toml"), "old b").unwrap();
        apply(&root.join("services/x"), &files, &replaces, "x").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("a.toml")).unwrap(),
            "new a"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("b.toml")).unwrap(),
            "new b"
        );
        assert_eq!(
            tree(&root),
            [
                "a.toml",
                "b.toml",
                "services",
                "services/x",
                "services/x/src",
                "services/x/src/lib.rs"
            ]
            .map(PathBuf::from)
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failure_while_preparing_leaves_the_tree_as_it_was() {
        let (root, files, replaces) = scratch("prepare");
        std::fs::write(root.join("b.toml"), "old b").unwrap();
        // Something that is not ours where b.toml's new text would be written.
        std::fs::create_dir_all(root.join(".b.toml.x.scaffolding/keep")).unwrap();
        let before = tree(&root);
        let err = apply(&root.join("services/x"), &files, &replaces, "x").unwrap_err();
        assert!(err.to_string().contains(".b.toml.x.scaffolding"), "{err}");
        assert_eq!(tree(&root), before, "no folder, no temporary file left");
        assert_eq!(
            std::fs::read_to_string(root.join("a.toml")).unwrap(),
            "old a"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failure_after_the_first_renames_undoes_them() {
        let (root, files, replaces) = scratch("publish");
        // b.toml cannot be replaced by a rename: a non-empty directory is in its place. By
        // then the folder and a.toml are already in place.
        std::fs::create_dir_all(root.join("b.toml/keep")).unwrap();
        let before = tree(&root);
        let err = apply(&root.join("services/x"), &files, &replaces, "x").unwrap_err();
        assert!(matches!(err, ScaffoldError::Io { .. }), "{err}");
        assert_eq!(
            tree(&root),
            before,
            "the folder is gone, no temporary file left"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("a.toml")).unwrap(),
            "old a",
            "a.toml has its old text back"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
