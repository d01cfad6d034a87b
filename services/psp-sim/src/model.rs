//! The simulator's vocabulary: where an authorization stands and why a card was declined.
//!
//! These are plain values that the API's answers, its errors ([`crate::error`]) and its fault
//! rules ([`crate::faults`]) all speak of. They live here, below every other module, so the
//! module graph stays a DAG (lowest first):
//!
//! ```text
//! model, store          values and bounded memory: import nothing from the crate
//!   └─ error            ApiError: speaks of model's values
//!        ├─ idempotency  keys and stored answers (error, store)
//!        ├─ faults       token outcomes and knobs (error, model)
//!        └─ webhooks     queue, sender, admin (error, store)
//!             └─ authorizations   the card API: uses all of the above
//! ```
//!
//! Must not break: this module imports nothing from the crate; a type that needs
//! [`crate::error::ApiError`] does not belong here.

use serde::Serialize;

/// Where an authorization stands (`authorized` → `capture_pending` → `captured`, or
/// `authorized` → `voided`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Authorized,
    CapturePending,
    Captured,
    Voided,
}

/// Why a card was declined (the `decline_code` of a 402).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineCode {
    CardDeclined,
    InsufficientFunds,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Which top-level modules each top-level module imports (`crate::<module>` outside
    /// comments), read from the source tree; `lib.rs`, the root, is left out.
    fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
        fn visit(path: &Path, top: &str, graph: &mut BTreeMap<String, BTreeSet<String>>) {
            if path.is_dir() {
                for entry in std::fs::read_dir(path).unwrap() {
                    visit(&entry.unwrap().path(), top, graph);
                }
                return;
            }
            let deps = graph.entry(top.to_owned()).or_default();
            let source = std::fs::read_to_string(path).unwrap();
            // Code only: not comments, and not tests (which may use anything).
            let code = source
                .lines()
                .take_while(|l| l.trim() != "#[cfg(test)]")
                .filter(|l| !l.trim_start().starts_with("//"));
            let prefix = concat!("crate", "::");
            for line in code {
                for (i, _) in line.match_indices(prefix) {
                    let rest = &line[i + prefix.len()..];
                    let end = rest
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    if !rest[..end].is_empty() && rest[..end] != *top {
                        deps.insert(rest[..end].to_owned());
                    }
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if name != "lib" && name != "main" {
                visit(&path, &name, &mut graph);
            }
        }
        graph
    }

    #[test]
    fn the_module_graph_is_a_dag_with_the_vocabulary_at_the_bottom() {
        let graph = module_graph();
        assert_eq!(graph["model"], BTreeSet::new(), "model imports nothing");
        assert_eq!(graph["store"], BTreeSet::new(), "store imports nothing");
        // Peel off modules whose imports are all peeled already; a cycle leaves some behind.
        let mut left = graph.clone();
        let mut order = Vec::new();
        while let Some(next) = left
            .iter()
            .find(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| m.clone())
        {
            left.remove(&next);
            order.push(next);
        }
        assert!(
            left.is_empty(),
            "import cycle among {left:?} (graph {graph:?})"
        );
        assert!(
            !graph["error"].iter().any(|d| d != "model"),
            "error imports only the vocabulary: {:?}",
            graph["error"]
        );
    }
}
