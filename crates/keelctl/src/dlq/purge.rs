//! `dlq purge`: empty one dead-letter queue (or `keel.unrouted`), after the operator has seen
//! how many messages that is and typed the queue's name, or said `--yes`.
//!
//! Only a [`DeadLetterQueue`] built with [`DeadLetterQueue::exact`] reaches [`purge`], so a
//! consumer queue cannot be purged by a slip of the name. Off a terminal (a script, a pipe) no
//! one can type the name, so without `--yes` the purge is refused ([`consent`]) rather than
//! read a confirmation from whatever stdin happens to hold.

use std::io::{BufRead, Write};

use lapin::Connection;
use lapin::options::QueuePurgeOptions;

use super::{DeadLetterQueue, DlqError};
use crate::BrokerError;
use crate::queues::{close, is_not_found, probe};

/// Whether a purge may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// `--yes`.
    Given,
    /// On a terminal: show the count, ask for the queue's name ([`confirm`]).
    Ask,
    /// No `--yes` and no terminal to ask on.
    Refused,
}

/// What `--yes` and whether stdin is a terminal allow.
pub fn consent(yes: bool, stdin_is_terminal: bool) -> Consent {
    match (yes, stdin_is_terminal) {
        (true, _) => Consent::Given,
        (false, true) => Consent::Ask,
        (false, false) => Consent::Refused,
    }
}

/// Asks on `prompt` for `queue`'s name, reads one line of `input`: whether it was typed.
pub fn confirm(
    queue: &DeadLetterQueue,
    messages: u32,
    mut input: impl BufRead,
    mut prompt: impl Write,
) -> std::io::Result<bool> {
    write!(
        prompt,
        "{queue} holds {messages} ready messages; purging deletes them for good.\n\
         Type the queue name to confirm: "
    )?;
    prompt.flush()?;
    let mut line = String::new();
    input.read_line(&mut line)?;
    Ok(line.trim() == queue.name())
}

/// Ready messages in `queue` (what the prompt shows).
pub async fn depth(conn: &Connection, queue: &DeadLetterQueue) -> Result<u32, DlqError> {
    let p = probe(conn, queue.name()).await?;
    if p.exists {
        Ok(p.messages)
    } else {
        Err(DlqError::NoSuchQueue(queue.to_string()))
    }
}

/// Deletes every ready message of `queue`: how many it deleted.
pub async fn purge(conn: &Connection, queue: &DeadLetterQueue) -> Result<u32, DlqError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open a channel"))?;
    match channel
        .queue_purge(queue.name().into(), QueuePurgeOptions::default())
        .await
    {
        Ok(n) => {
            close(channel).await;
            Ok(n)
        }
        Err(e) if is_not_found(&e) => Err(DlqError::NoSuchQueue(queue.to_string())),
        Err(e) => Err(BrokerError::amqp(format!("purge {queue}"))(e).into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_purge_asks_on_a_terminal_and_is_refused_off_one_without_yes() {
        assert_eq!(consent(true, false), Consent::Given);
        assert_eq!(consent(true, true), Consent::Given);
        assert_eq!(consent(false, true), Consent::Ask);
        assert_eq!(consent(false, false), Consent::Refused);
    }

    #[test]
    fn only_the_queues_own_name_confirms() {
        let q = DeadLetterQueue::exact("test.work.dlq").unwrap();
        let mut shown = Vec::new();
        assert!(confirm(&q, 3, &b"test.work.dlq\n"[..], &mut shown).unwrap());
        assert!(
            String::from_utf8(shown)
                .unwrap()
                .contains("3 ready messages")
        );
        assert!(!confirm(&q, 3, &b"y\n"[..], Vec::new()).unwrap());
        assert!(!confirm(&q, 3, &b""[..], Vec::new()).unwrap());
    }
}
