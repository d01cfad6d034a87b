//! Rebuilds keel-pg when a platform migration is added (see `src/schema.rs`).
//!
//! `sqlx::migrate!` embeds each file with `include_str!`, so cargo notices an edited file but
//! not a new one: without this, a new platform migration would be missing from the binary
//! until something else changed. (sqlx's own advice: `sqlx migrate build-script`.)
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
