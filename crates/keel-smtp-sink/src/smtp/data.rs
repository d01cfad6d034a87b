//! The DATA phase: collecting a message line by line until the lone `.`.
//!
//! RFC 5321 §4.5.2: the client doubles a leading `.` on every line (dot-stuffing) so that a
//! line holding only `.` can end the message; the server removes one leading `.` from each line
//! (dot-unstuffing). The size bound is enforced here: once a message is over it, the lines are
//! still read (the client cannot be stopped mid-DATA without closing the connection) but no
//! longer kept, and the end of DATA answers `552`, so the connection stays usable for the next
//! message.
//!
//! Must not break: a refused message keeps nothing in memory past the bound.

/// Collects one message's lines.
#[derive(Debug)]
pub(crate) struct DataCollector {
    data: Vec<u8>,
    max_bytes: usize,
    too_large: bool,
    line_too_long: bool,
}

/// How a DATA phase ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DataOutcome {
    /// The message, dots unstuffed, every line ending in CRLF.
    Message(Vec<u8>),
    /// Over the size bound: `552`.
    TooLarge,
    /// A line over the line bound: `500` (the message would arrive damaged if kept).
    LineTooLong,
}

impl DataCollector {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            data: Vec::new(),
            max_bytes,
            too_large: false,
            line_too_long: false,
        }
    }

    /// Takes one line (without its line ending); `true` when it was the terminating `.`.
    pub(crate) fn line(&mut self, line: &[u8]) -> bool {
        if line == b"." {
            return true;
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        if !self.too_large {
            if self.data.len().saturating_add(line.len()).saturating_add(2) > self.max_bytes {
                self.too_large = true;
                self.data = Vec::new();
            } else {
                self.data.extend_from_slice(line);
                self.data.extend_from_slice(b"\r\n");
            }
        }
        false
    }

    /// Notes a line that was over the line bound (and already discarded by the reader).
    pub(crate) fn line_too_long(&mut self) {
        self.line_too_long = true;
    }

    pub(crate) fn finish(self) -> DataOutcome {
        if self.too_large {
            DataOutcome::TooLarge
        } else if self.line_too_long {
            DataOutcome::LineTooLong
        } else {
            DataOutcome::Message(self.data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(lines: &[&str], max: usize) -> DataOutcome {
        let mut collector = DataCollector::new(max);
        for line in lines {
            if collector.line(line.as_bytes()) {
                break;
            }
        }
        collector.finish()
    }

    #[test]
    fn leading_dots_are_unstuffed_and_the_lone_dot_ends_data() {
        let outcome = collect(
            &["Subject: x", "", "..", "..leading", "mid.dle", ".", "after"],
            1000,
        );
        assert_eq!(
            outcome,
            DataOutcome::Message(b"Subject: x\r\n\r\n.\r\n.leading\r\nmid.dle\r\n".to_vec())
        );
    }

    #[test]
    fn a_message_over_the_bound_is_refused_and_not_kept() {
        assert_eq!(
            collect(&["0123456789", "0123456789", "."], 20),
            DataOutcome::TooLarge
        );
        assert_eq!(
            collect(&["01234567", "01234567", "."], 20),
            DataOutcome::Message(b"01234567\r\n01234567\r\n".to_vec())
        );
    }
}
