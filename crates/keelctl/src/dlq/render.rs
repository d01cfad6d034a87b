//! How `dlq` prints for people (JSON is the types' own `Serialize`): tables of 100 columns
//! ([`crate::output`]), message ids never wrapped, long errors cut.

use std::fmt::Write as _;

use super::message::{Body, DeadLetter, flatten};
use super::{ReplaySummary, Shown};

/// Characters of an error a list row shows (`dlq show` has all of it).
const ERROR_CHARS: usize = 80;

/// `dlq list` as text: per queue, a heading and a table of its dead letters.
///
/// Laid out for what an operator copies into the next command: the message id and, under it,
/// the original routing key share the first column, each whole on its own line; the failure
/// and its error share the last (`rejected: body is not an event envelope`), which wraps.
/// The queue is the heading, not a column. So every value the brief asks for fits 100 columns.
pub fn list_table(rows: &[DeadLetter]) -> String {
    grouped(
        rows,
        |r| r.queue.as_str(),
        |queue, mine| {
            let mut t =
                crate::output::table(["message id / routing key", "tries", "age", "size", "why"]);
            for r in mine {
                let why = match &r.error {
                    Some(error) => format!("{}: {}", r.failure, cut(error)),
                    None => r.failure.clone(),
                };
                t.add_row([
                    format!(
                        "{}\n{}",
                        r.message_id.as_deref().unwrap_or("-"),
                        r.origin.as_ref().map_or("?", |o| o.routing_key.as_str())
                    ),
                    r.attempts.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                    r.age_seconds.map_or_else(|| "-".to_owned(), age),
                    size(r.size),
                    why,
                ]);
            }
            crate::output::keep_whole(&mut t, &[0, 1, 2, 3]);
            let n = mine.len();
            let s = if n == 1 { "" } else { "s" };
            format!("{queue}: {n} dead letter{s}\n{t}")
        },
    )
    .unwrap_or_else(|| "no dead letters".to_owned())
}

/// `render(queue, its rows)` for each queue in `rows`' order, blank-line separated; `None`
/// when there are no rows.
fn grouped<T>(
    rows: &[T],
    queue: impl Fn(&T) -> &str,
    render: impl Fn(&str, &[&T]) -> String,
) -> Option<String> {
    let mut queues: Vec<&str> = rows.iter().map(&queue).collect();
    queues.dedup();
    let parts: Vec<String> = queues
        .into_iter()
        .map(|q| {
            let mine: Vec<&T> = rows.iter().filter(|r| queue(r) == q).collect();
            render(q, &mine)
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// `dlq show` as text: the summary, the properties, every header (nested ones flattened to
/// `x-death[0].reason`), then the body.
pub fn show_text(shown: &Shown) -> String {
    let m = &shown.summary;
    let mut pairs: Vec<(String, String)> = vec![
        ("queue".into(), m.queue.clone()),
        (
            "origin".into(),
            m.origin
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), ToString::to_string),
        ),
        ("failure".into(), m.failure.clone()),
        ("error".into(), m.error.clone().unwrap_or_default()),
        (
            "attempts".into(),
            m.attempts.map_or_else(|| "-".to_owned(), |n| n.to_string()),
        ),
        ("replays".into(), m.replays.to_string()),
        (
            "failed at".into(),
            m.failed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        ),
        ("size".into(), size(m.size)),
    ];
    for (k, v) in &shown.properties {
        flatten(k, v, &mut pairs);
    }
    for (k, v) in &shown.headers {
        flatten(k, v, &mut pairs);
    }
    let mut t = crate::output::table(["field", "value"]);
    for (k, v) in pairs {
        t.add_row([k, v]);
    }
    crate::output::keep_whole(&mut t, &[0]);
    let mut out = format!("{t}\n\nbody:\n");
    match &shown.body {
        Body::Json { value } => {
            out.push_str(&serde_json::to_string_pretty(value).unwrap_or_default());
        }
        Body::Text { text, truncated } => {
            out.push_str(text);
            if *truncated {
                let _ = write!(
                    out,
                    "\n[truncated: the first {} of {} bytes]",
                    super::message::SHOW_BODY_LIMIT,
                    m.size
                );
            }
        }
    }
    out
}

/// `dlq replay`: per queue, each selected message and where it went (exchange, and under it
/// the routing key); then the counts.
pub fn replay_table(summary: &ReplaySummary) -> String {
    let tables = grouped(
        &summary.messages,
        |r| r.queue.as_str(),
        |queue, mine| {
            let mut t = crate::output::table(["message id", "to", "outcome"]);
            for r in mine {
                let outcome = match &r.outcome {
                    super::Outcome::Replayed => "replayed".to_owned(),
                    super::Outcome::WouldReplay => "would replay".to_owned(),
                    super::Outcome::Failed { error } => format!("failed: {error}"),
                    super::Outcome::Skipped { reason } => format!("skipped: {reason}"),
                };
                t.add_row([
                    r.message_id.clone().unwrap_or_else(|| "-".to_owned()),
                    r.to.as_ref()
                        .map(|to| format!("{}\n{}", to.exchange, to.routing_key))
                        .unwrap_or_default(),
                    outcome,
                ]);
            }
            crate::output::keep_whole(&mut t, &[0, 1]);
            format!("{queue}:\n{t}")
        },
    );
    let verb = if summary.dry_run {
        "dry run: would replay"
    } else {
        "replayed"
    };
    let counts = format!(
        "{verb} {}, skipped {}, failed {}",
        summary.replayed, summary.skipped, summary.failed
    );
    match tables {
        Some(tables) => format!("{tables}\n{counts}"),
        None => counts,
    }
}

/// At most [`ERROR_CHARS`] characters, with `…` when cut.
fn cut(s: &str) -> String {
    if s.chars().count() <= ERROR_CHARS {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(ERROR_CHARS - 1).collect();
    out.push('…');
    out
}

/// `42s`, `5m`, `3h`, `2d`: the largest whole unit.
fn age(seconds: i64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3_600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// `312 B`, `4.0 KiB`, `1.2 MiB`.
fn size(bytes: usize) -> String {
    const KIB: usize = 1024;
    match bytes {
        b if b < KIB => format!("{b} B"),
        b if b < KIB * KIB => format!("{}.{} KiB", b / KIB, (b % KIB) * 10 / KIB),
        b => format!(
            "{}.{} MiB",
            b / (KIB * KIB),
            (b % (KIB * KIB)) * 10 / (KIB * KIB)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_read_at_a_glance() {
        assert_eq!(age(42), "42s");
        assert_eq!(age(5 * 60 + 3), "5m");
        assert_eq!(age(3 * 3600), "3h");
        assert_eq!(age(2 * 86_400 + 5), "2d");
        assert_eq!(size(312), "312 B");
        assert_eq!(size(4096), "4.0 KiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(cut(&"x".repeat(200)).chars().count(), ERROR_CHARS);
    }
}
