//! A progress line on stderr while keelctl waits (`keelctl demo`).
//!
//! On a terminal the line is redrawn in place; in a log (stderr not a terminal) a line is
//! written only when the count changes, so a CI log shows each step once instead of a redraw
//! per poll. stderr keeps stdout clean for the table or the JSON. No pattern of its own: it
//! shows a bounded wait (the waiting itself is the caller's, with its deadline).

use std::io::{IsTerminal, Write};

/// One progress line.
#[derive(Debug)]
pub struct Progress {
    tty: bool,
    last: Option<(usize, usize)>,
    drawn: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Self::stderr()
    }
}

impl Progress {
    /// Progress on this process's stderr.
    pub fn stderr() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    /// Shows `done` of `total` with `what` (e.g. "orders settled"), plus `detail` on a terminal.
    pub fn update(&mut self, what: &str, done: usize, total: usize, detail: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            // \r and "erase line": redraw in place.
            let _ = write!(err, "\r\x1b[2K{what}: {done}/{total} {detail}");
            self.drawn = true;
        } else if self.last != Some((done, total)) {
            let _ = writeln!(err, "{what}: {done}/{total}");
        }
        let _ = err.flush();
        self.last = Some((done, total));
    }

    /// Ends the line (on a terminal) so what follows starts on its own.
    pub fn finish(&mut self) {
        if self.tty && self.drawn {
            let _ = writeln!(std::io::stderr());
        }
        self.drawn = false;
        self.last = None;
    }
}
