//! Writing a new service all or nothing: its folders, and the files that name it (the
//! registry, the root manifest, compose.yaml, the Kubernetes kustomizations), appear together
//! or not at all.
//!
//! Why it matters: they are one fact. A folder without its workspace member is a service
//! `make dev` tries to start but cargo never builds; a workspace member without its folder
//! stops every cargo command in the workspace; a registry entry alone makes the dev scripts
//! look for a binary that does not exist; a kustomization naming a folder that is not there
//! stops every render of the overlay. And a re-run refuses a name whose folder exists, so a
//! half-written service cannot be fixed by running the generator again.
//!
//! How: everything is first written where nobody looks (each new folder as `.<name>.scaffolding`
//! beside it, each changed or new file as `.<file>.<name>.scaffolding`, with the original's
//! permissions); a failure there removes
//! those and nothing else changed. Then each is renamed into place (a rename is atomic: a
//! reader sees the old file or the new one, never half of it), folders first and the root
//! manifest last, since the manifest is what makes cargo look for the folder. A failed rename
//! undoes the earlier ones: each folder is removed, each new file removed and each replaced
//! file gets its original content back (by the same write-then-rename). What this cannot
//! cover is the process being killed between two renames; the window is one rename per folder
//! and file, a few milliseconds, and the temporary names of a killed run are removed by the
//! next one.

use std::path::{Path, PathBuf};

use crate::ScaffoldError;

/// One file of a new folder: its path under the folder and its content.
#[derive(Debug)]
pub(crate) struct File {
    pub path: PathBuf,
    pub content: Vec<u8>,
}

/// A folder to create, which must not exist: its path and its files.
#[derive(Debug)]
pub(crate) struct Folder {
    pub path: PathBuf,
    pub files: Vec<File>,
}

/// A file outside the new folder to replace or create: its path, what it held when the
/// generator read it (restored on failure; `None` for a file that did not exist, removed on
/// failure), and its new content.
#[derive(Debug)]
pub(crate) struct Replace {
    pub path: PathBuf,
    pub old: Option<Vec<u8>>,
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

/// Where a new folder is written before it is renamed to `path`. Its own name keeps two runs
/// for two names apart.
fn staging_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.scaffolding"))
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

/// Writes the `folders` and the `replaces`, all or nothing (see the module docs). `tag` (the
/// service's name) keeps the temporary names of two runs for two names apart.
pub(crate) fn apply(
    folders: &[Folder],
    replaces: &[Replace],
    tag: &str,
) -> Result<(), ScaffoldError> {
    let stagings: Vec<PathBuf> = folders.iter().map(|f| staging_path(&f.path)).collect();
    let temps: Vec<PathBuf> = replaces.iter().map(|r| temp_path(&r.path, tag)).collect();
    let remove_temps = || {
        for staging in &stagings {
            if staging.is_dir() {
                let _ = std::fs::remove_dir_all(staging);
            }
        }
        for temp in &temps {
            if temp.is_file() {
                let _ = std::fs::remove_file(temp);
            }
        }
    };

    // 1. Out of sight: a failure here leaves what was there before, and nothing of ours.
    let prepare = || -> Result<(), ScaffoldError> {
        for (folder, staging) in folders.iter().zip(&stagings) {
            // A staging folder a killed run left behind.
            if staging.exists() {
                std::fs::remove_dir_all(staging).map_err(io(staging))?;
            }
            for file in &folder.files {
                let path = staging.join(&file.path);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io(parent))?;
                }
                std::fs::write(&path, &file.content).map_err(io(&path))?;
            }
        }
        for (replace, temp) in replaces.iter().zip(&temps) {
            write_temp(temp, &replace.new, &replace.path)?;
        }
        Ok(())
    };
    if let Err(e) = prepare() {
        remove_temps();
        return Err(e);
    }

    // 2. Into place, one rename each, folders first; a failure undoes the renames before it.
    let renames: Vec<(&PathBuf, &Path)> = stagings
        .iter()
        .zip(folders.iter().map(|f| f.path.as_path()))
        .chain(temps.iter().zip(replaces.iter().map(|r| r.path.as_path())))
        .collect();
    for (done, (from, to)) in renames.iter().enumerate() {
        if let Err(e) = std::fs::rename(from, to).map_err(io(to)) {
            remove_temps();
            let (folders_done, replaces_done) = if done < folders.len() {
                (&folders[..done], &replaces[..0])
            } else {
                (folders, &replaces[..done - folders.len()])
            };
            let left = undo(folders_done, replaces_done, tag);
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

/// Undoes the renames of `folders` and `replaces`, last first; says what it could not undo.
fn undo(folders: &[Folder], replaces: &[Replace], tag: &str) -> Vec<String> {
    let mut left = Vec::new();
    for replace in replaces.iter().rev() {
        let temp = temp_path(&replace.path, tag);
        let restored = match &replace.old {
            Some(old) => write_temp(&temp, old, &replace.path)
                .and_then(|()| std::fs::rename(&temp, &replace.path).map_err(io(&replace.path))),
            None => std::fs::remove_file(&replace.path).map_err(io(&replace.path)),
        };
        if let Err(undo_error) = restored {
            let _ = std::fs::remove_file(&temp);
            left.push(format!(
                "{} keeps the new text ({undo_error})",
                replace.path.display()
            ));
        }
    }
    for folder in folders.iter().rev() {
        if let Err(undo_error) = std::fs::remove_dir_all(&folder.path) {
            left.push(format!(
                "{} is still there ({undo_error})",
                folder.path.display()
            ));
        }
    }
    left
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A scratch folder with `a.toml`, `services/` and `deploy/`, and what `apply` would
    /// change there: two new folders, `a.toml` replaced, `c.toml` created, `b.toml` replaced
    /// (in that order; `b.toml` is left to each test).
    fn scratch(test: &str) -> (PathBuf, Vec<Folder>, Vec<Replace>) {
        let root = std::env::temp_dir().join(format!(
            "keel-scaffold-commit-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("services")).unwrap();
        std::fs::create_dir_all(root.join("deploy")).unwrap();
        std::fs::write(root.join("a.toml"), "old a").unwrap();
        let folder = |path: &str, file: &str| Folder {
            path: root.join(path),
            files: vec![File {
                path: PathBuf::from(file),
                content: b"new".to_vec(),
            }],
        };
        let folders = vec![
            folder("services/x", "src/lib.rs"),
            folder("deploy/x", "a.yaml"),
        ];
        let replaces = vec![
            Replace {
                path: root.join("a.toml"),
                old: Some(b"old a".to_vec()),
                new: b"new a".to_vec(),
            },
            Replace {
                path: root.join("c.toml"),
                old: None,
                new: b"new c".to_vec(),
            },
            Replace {
                path: root.join("b.toml"),
                old: Some(b"old b".to_vec()),
                new: b"new b".to_vec(),
            },
        ];
        (root, folders, replaces)
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

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn everything_is_written_when_nothing_fails() {
        let (root, folders, replaces) = scratch("ok");
        std::fs::write(root.join("b.toml"), "old b").unwrap();
        apply(&folders, &replaces, "x").unwrap();
        assert_eq!(read(root.join("a.toml")), "new a");
        assert_eq!(read(root.join("b.toml")), "new b");
        assert_eq!(read(root.join("c.toml")), "new c");
        assert_eq!(
            tree(&root),
            [
                "a.toml",
                "b.toml",
                "c.toml",
                "deploy",
                "deploy/x",
                "deploy/x/a.yaml",
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
        let (root, folders, replaces) = scratch("prepare");
        std::fs::write(root.join("b.toml"), "old b").unwrap();
        // Something that is not ours where b.toml's new text would be written: by then both
        // folders, a.toml's and c.toml's texts are written aside.
        std::fs::create_dir_all(root.join(".b.toml.x.scaffolding/keep")).unwrap();
        let before = tree(&root);
        let err = apply(&folders, &replaces, "x").unwrap_err();
        assert!(err.to_string().contains(".b.toml.x.scaffolding"), "{err}");
        assert_eq!(tree(&root), before, "no folder, no temporary file left");
        assert_eq!(read(root.join("a.toml")), "old a");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failure_after_the_first_renames_undoes_them() {
        let (root, folders, replaces) = scratch("publish");
        // b.toml cannot be replaced by a rename: a non-empty directory is in its place. By
        // then both folders, a.toml and the new c.toml are in place.
        std::fs::create_dir_all(root.join("b.toml/keep")).unwrap();
        let before = tree(&root);
        let err = apply(&folders, &replaces, "x").unwrap_err();
        assert!(matches!(err, ScaffoldError::Io { .. }), "{err}");
        assert_eq!(
            tree(&root),
            before,
            "both folders and c.toml are gone, no temporary file left"
        );
        assert_eq!(
            read(root.join("a.toml")),
            "old a",
            "a.toml has its old text back"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failure_between_two_folders_removes_the_first() {
        let (root, folders, replaces) = scratch("folders");
        std::fs::write(root.join("b.toml"), "old b").unwrap();
        // The second folder's place is taken by a non-empty directory: the rename fails after
        // the first folder is in place, and before any file is.
        std::fs::create_dir_all(root.join("deploy/x/keep")).unwrap();
        let before = tree(&root);
        let err = apply(&folders, &replaces, "x").unwrap_err();
        assert!(matches!(err, ScaffoldError::Io { .. }), "{err}");
        assert_eq!(
            tree(&root),
            before,
            "services/x is gone, nothing else changed"
        );
        assert_eq!(read(root.join("a.toml")), "old a");
        let _ = std::fs::remove_dir_all(&root);
    }
}
