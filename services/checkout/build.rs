//! Rebuilds the service when a migration is added to `migrations/`.
//!
//! `sqlx::migrate!` embeds each file with `include_str!`, so cargo notices an edited file but
//! not a new one: without this, a new migration would be missing from the binary (and never
//! applied by `migrate`) until something else changed. (sqlx's own advice: `sqlx migrate
//! build-script`.)
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
