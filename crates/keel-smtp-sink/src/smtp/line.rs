//! Reading one line with a bound on its length.
//!
//! `AsyncBufReadExt::read_line` would buffer whatever a client sends until it sends a line
//! feed; this reader keeps at most `max` bytes and discards the rest of an overlong line, so a
//! client that never sends `\n` costs the sink `max` bytes, not its memory.
//!
//! Must not break: the bytes after an overlong line's `\n` are left in the reader (they are the
//! next command), and a line is accepted with a bare `\n` as well as with CRLF (lenient, as a
//! sink can afford to be).

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// A line, now in the buffer without its line ending.
    Line,
    /// A line longer than the bound; it was discarded up to and including its `\n`.
    TooLong,
    /// The client closed the connection (a partial last line is dropped).
    Eof,
}

/// Reads the next line into `line` (cleared first), keeping at most `max` bytes of it,
/// line ending included.
pub(crate) async fn read_line<R>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Read>
where
    R: AsyncBufRead + Unpin,
{
    line.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Read::Eof);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (available.get(..=i).unwrap_or(available), true),
            None => (available, false),
        };
        let used = chunk.len();
        if !too_long {
            if line.len().saturating_add(used) > max {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if done {
            if too_long {
                return Ok(Read::TooLong);
            }
            strip_line_ending(line);
            return Ok(Read::Line);
        }
    }
}

fn strip_line_ending(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overlong_line_is_skipped_and_the_next_one_read() {
        let mut input: &[u8] = b"NOOP\r\nAAAAAAAAAAAAAAAAAAAA\r\nQUIT\nhalf";
        let mut line = Vec::new();
        let mut next = async || {
            let read = read_line(&mut input, &mut line, 10).await.ok();
            (read, String::from_utf8_lossy(&line).into_owned())
        };
        assert_eq!(next().await, (Some(Read::Line), "NOOP".into()));
        assert_eq!(next().await, (Some(Read::TooLong), String::new()));
        assert_eq!(next().await, (Some(Read::Line), "QUIT".into()));
        assert_eq!(next().await.0, Some(Read::Eof));
    }

    #[tokio::test]
    async fn the_bound_counts_the_line_ending() {
        let mut line = Vec::new();
        let mut exact: &[u8] = b"12345678\r\n";
        assert_eq!(
            read_line(&mut exact, &mut line, 10).await.ok(),
            Some(Read::Line)
        );
        let mut over: &[u8] = b"123456789\r\n";
        assert_eq!(
            read_line(&mut over, &mut line, 10).await.ok(),
            Some(Read::TooLong)
        );
    }
}
