//! The messages the sink has accepted: a bounded ring buffer in memory.
//!
//! The SMTP side pushes a [`StoredMessage`] after the final `.` of DATA and before it answers
//! `250`, so a client that has its `250` can read the message over HTTP at once (no polling
//! needed for the sink; Mailpit behaves the same). When [`crate::SinkConfig::max_messages`]
//! is reached, the oldest message is dropped: a long `make dev` session never fills memory.
//!
//! Must not break: the lock is held only to move `Arc`s in and out, never across an `.await`
//! or while parsing a message.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::mime::{self, Header};

/// A stored message's id: a UUIDv7, so ids sort by arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Uuid);

impl MessageId {
    fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// One accepted message: its envelope, its raw bytes and what was parsed from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    id: MessageId,
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
    subject: String,
    received_at: DateTime<Utc>,
}

impl StoredMessage {
    /// A message as received: the envelope sender (empty for the null path `<>`), the envelope
    /// recipients in `RCPT` order, and the DATA after dot-unstuffing.
    pub(crate) fn new(from: String, to: Vec<String>, data: Vec<u8>) -> Self {
        let subject = mime::header(&mime::parse(&data).headers, "subject")
            .map(mime::decode_words)
            .unwrap_or_default();
        Self {
            id: MessageId::new(),
            from,
            to,
            data,
            subject,
            received_at: Utc::now(),
        }
    }

    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The envelope sender (`MAIL FROM`), empty for a bounce (`MAIL FROM:<>`).
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The envelope recipients (`RCPT TO`), Bcc included, in the order they were given.
    pub fn to(&self) -> &[String] {
        &self.to
    }

    /// The message as received: headers and body, lines ending in CRLF, dots unstuffed.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The `Subject` header, unfolded and with encoded words decoded; empty if there is none.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn received_at(&self) -> DateTime<Utc> {
        self.received_at
    }

    /// The header fields in order, unfolded; values as sent (encoded words not decoded).
    pub fn headers(&self) -> Vec<Header> {
        mime::parse(&self.data).headers
    }

    /// The first header called `name` (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        mime::header(&mime::parse(&self.data).headers, name).map(str::to_owned)
    }

    /// The text body, decoded (see the `mime` module for what "best effort" covers): the
    /// `text/plain` part of a multipart message, `\n` line endings.
    pub fn text(&self) -> String {
        mime::bodies(&self.data).text
    }

    /// The `text/html` part, decoded; empty if there is none.
    pub fn html(&self) -> String {
        mime::bodies(&self.data).html
    }
}

/// The ring buffer of messages, oldest first.
#[derive(Debug)]
pub(crate) struct Mailbox {
    messages: Mutex<VecDeque<Arc<StoredMessage>>>,
    capacity: usize,
}

impl Mailbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            messages: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// A panic elsewhere while holding the lock cannot leave the deque half-updated (every
    /// change is one call), so a poisoned lock is still a consistent mailbox.
    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<StoredMessage>>> {
        self.messages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `message`, dropping the oldest ones if the mailbox is full; returns its id.
    pub(crate) fn push(&self, message: StoredMessage) -> MessageId {
        let id = message.id;
        let dropped = {
            let mut messages = self.lock();
            let mut dropped = 0_usize;
            while messages.len() >= self.capacity {
                messages.pop_front();
                dropped += 1;
            }
            messages.push_back(Arc::new(message));
            dropped
        };
        if dropped > 0 {
            tracing::warn!(
                max_messages = self.capacity,
                dropped,
                "mailbox full: dropped the oldest message"
            );
        }
        id
    }

    /// Every message, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<Arc<StoredMessage>> {
        self.lock().iter().cloned().collect()
    }

    pub(crate) fn get(&self, id: MessageId) -> Option<Arc<StoredMessage>> {
        self.lock().iter().find(|m| m.id == id).cloned()
    }

    pub(crate) fn latest(&self) -> Option<Arc<StoredMessage>> {
        self.lock().back().cloned()
    }

    /// Removes the messages with these ids (all of them when `ids` is `None`).
    pub(crate) fn delete(&self, ids: Option<&[MessageId]>) {
        let mut messages = self.lock();
        match ids {
            None => messages.clear(),
            Some(ids) => messages.retain(|m| !ids.contains(&m.id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize) -> StoredMessage {
        StoredMessage::new(
            "a@example.com".into(),
            vec!["b@example.com".into()],
            format!("Subject: {n}\r\n\r\nbody\r\n").into_bytes(),
        )
    }

    #[test]
    fn a_full_mailbox_drops_the_oldest() {
        let mailbox = Mailbox::new(2);
        for n in 1..=3 {
            mailbox.push(message(n));
        }
        let subjects: Vec<_> = mailbox
            .snapshot()
            .iter()
            .map(|m| m.subject().to_owned())
            .collect();
        assert_eq!(subjects, ["2", "3"]);
    }

    #[test]
    fn delete_by_id_keeps_the_others() {
        let mailbox = Mailbox::new(10);
        let first = mailbox.push(message(1));
        let second = mailbox.push(message(2));
        mailbox.delete(Some(&[first]));
        assert!(mailbox.get(first).is_none());
        assert_eq!(mailbox.latest().map(|m| m.id()), Some(second));
        mailbox.delete(None);
        assert!(mailbox.snapshot().is_empty());
    }
}
