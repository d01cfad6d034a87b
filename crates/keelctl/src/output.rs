//! How keelctl prints: a table for people, JSON for scripts (`--output json`).
//!
//! Tables are laid out for 100 columns whatever the terminal says (long cells wrap inside
//! their column, except those an operator copies, such as ids, which [`keep_whole`] keeps on
//! one line), so output pasted into an issue or a log keeps its shape. Horizontal rules only:
//! no vertical lines leaves the width to the content, and the rule between rows keeps a
//! wrapped cell readable. JSON goes to stdout
//! alone, with progress and notes on stderr, so `keelctl jobs -o json | jq` always parses.
//! No pattern of its own: presentation, shared by every command.
// The command's output is for the operator's terminal.
#![allow(clippy::print_stdout)]

use comfy_table::{ColumnConstraint, ContentArrangement, Table, presets};
use serde::Serialize;

/// The width every table fits.
pub const WIDTH: u16 = 100;

/// `--output`: how listings are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table that fits 100 columns.
    #[default]
    Table,
    /// JSON on stdout (one document), for scripts.
    Json,
}

/// A table with `header`, laid out for [`WIDTH`] columns.
pub fn table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut t = Table::new();
    t.load_style(presets::UTF8_HORIZONTAL_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(WIDTH)
        .set_header(header);
    // One space between columns instead of two: no vertical lines to pad around.
    for c in t.column_iter_mut() {
        c.set_padding((0, 1));
    }
    t
}

/// Keeps columns `columns` (by index) on one line: values an operator copies into the next
/// command (ids) or reads at a glance (times, counts). The other columns wrap around them.
pub fn keep_whole(table: &mut Table, columns: &[usize]) {
    for &i in columns {
        if let Some(c) = table.column_mut(i) {
            c.set_constraint(ColumnConstraint::ContentWidth);
        }
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) -> Result<(), serde_json::Error> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
