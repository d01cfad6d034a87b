//! The SMTP conversation as a state machine, without I/O: a command line in, a [`Step`] out.
//!
//! Keeping it pure lets unit tests drive every command and every ordering error without a
//! socket, and lets the connection loop ([`super::connection`]) stay about bytes and timeouts.
//!
//! States (RFC 5321 §4.1.4): before `EHLO`/`HELO` only those, `RSET`, `NOOP` and `QUIT` are
//! accepted; `MAIL` opens a transaction, `RCPT` adds recipients to it, `DATA` needs at least
//! one recipient; `RSET`, `EHLO`/`HELO` and the end of DATA close it. A command in the wrong
//! state gets `503`, a command the sink does not know `500`, one it knows but does not offer
//! (`STARTTLS`, `AUTH`, `VRFY`, ...) `502`.
//!
//! Must not break: `EHLO` advertises only what is implemented (`8BITMIME`, `SIZE`): a client
//! that saw `STARTTLS` or `AUTH` would try them; and no input may panic (commands are client
//! bytes, parsed with `get`/`split_once`, never indexed).

use std::borrow::Cow;

use super::data::DataOutcome;

/// One reply: a code and one or more lines of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    code: u16,
    lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub(crate) fn new(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            lines: vec![text.into()],
        }
    }

    fn multiline(code: u16, lines: Vec<Cow<'static, str>>) -> Self {
        Self { code, lines }
    }

    #[cfg(test)]
    pub(crate) fn code(&self) -> u16 {
        self.code
    }

    /// `250-first\r\n250 last\r\n`.
    pub(crate) fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let separator = if i == last { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{separator}{line}\r\n", self.code).as_bytes());
        }
        out
    }

    pub(crate) fn greeting(hostname: &str) -> Self {
        Self::new(220, format!("{hostname} ESMTP keel-smtp-sink ready"))
    }

    pub(crate) fn line_too_long() -> Self {
        Self::new(500, "line too long")
    }

    pub(crate) fn idle_timeout(hostname: &str) -> Self {
        Self::new(421, format!("{hostname} idle timeout, closing connection"))
    }

    pub(crate) fn shutting_down(hostname: &str) -> Self {
        Self::new(421, format!("{hostname} shutting down"))
    }

    pub(crate) fn too_many_connections(hostname: &str) -> Self {
        Self::new(
            421,
            format!("{hostname} too many connections, try again later"),
        )
    }
}

/// What the connection does after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send the reply, read the next command.
    Reply(Reply),
    /// Send the reply (`354`), then read the message with a [`super::data::DataCollector`] and
    /// hand its outcome to [`Session::end_data`].
    Data(Reply),
    /// Send the reply and close the connection.
    Close(Reply),
}

/// The sender and recipients of the message in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub from: String,
    pub to: Vec<String>,
}

#[derive(Debug)]
enum State {
    AwaitingHello,
    Ready,
    Transaction(Envelope),
}

/// The bounds a session enforces.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub hostname: String,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
}

/// One connection's conversation.
#[derive(Debug)]
pub(crate) struct Session {
    limits: Limits,
    state: State,
}

impl Session {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::AwaitingHello,
        }
    }

    /// Answers one command line (without its line ending).
    pub(crate) fn command(&mut self, line: &[u8]) -> Step {
        let Ok(line) = std::str::from_utf8(line) else {
            return Step::Reply(Reply::new(500, "syntax error: command is not UTF-8"));
        };
        let (verb, args) = line.split_once(' ').unwrap_or((line, ""));
        let args = args.trim();
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => self.hello(args, true),
            "HELO" => self.hello(args, false),
            "MAIL" => Step::Reply(self.mail(args)),
            "RCPT" => Step::Reply(self.rcpt(args)),
            "DATA" => self.data(args),
            "RSET" => {
                if !matches!(self.state, State::AwaitingHello) {
                    self.state = State::Ready;
                }
                Step::Reply(Reply::new(250, "OK"))
            }
            "NOOP" => Step::Reply(Reply::new(250, "OK")),
            "QUIT" => Step::Close(Reply::new(
                221,
                format!("{} closing connection", self.limits.hostname),
            )),
            "STARTTLS" | "AUTH" | "VRFY" | "EXPN" | "HELP" | "TURN" | "ETRN" | "ATRN" | "BDAT" => {
                Step::Reply(Reply::new(502, "command not implemented"))
            }
            _ => Step::Reply(Reply::new(500, "command not recognized")),
        }
    }

    fn hello(&mut self, domain: &str, extended: bool) -> Step {
        if domain.is_empty() {
            return Step::Reply(Reply::new(501, "syntax: EHLO domain"));
        }
        self.state = State::Ready;
        let host = &self.limits.hostname;
        if !extended {
            return Step::Reply(Reply::new(250, host.clone()));
        }
        Step::Reply(Reply::multiline(
            250,
            vec![
                format!("{host} greets {domain}").into(),
                "8BITMIME".into(),
                format!("SIZE {}", self.limits.max_message_bytes).into(),
            ],
        ))
    }

    fn mail(&mut self, args: &str) -> Reply {
        match self.state {
            State::AwaitingHello => return Reply::new(503, "send EHLO or HELO first"),
            State::Transaction(_) => return Reply::new(503, "nested MAIL command"),
            State::Ready => {}
        }
        let Some((path, params)) = path_after(args, "FROM:") else {
            return Reply::new(501, "syntax: MAIL FROM:<address>");
        };
        for param in params.split_whitespace() {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key.to_ascii_uppercase().as_str() {
                "SIZE" => match value.parse::<u64>() {
                    Ok(size)
                        if size
                            > u64::try_from(self.limits.max_message_bytes).unwrap_or(u64::MAX) =>
                    {
                        return Reply::new(552, "message size exceeds fixed maximum message size");
                    }
                    Ok(_) => {}
                    Err(_) => return Reply::new(501, "syntax: SIZE=<number>"),
                },
                "BODY"
                    if value.eq_ignore_ascii_case("7BIT")
                        || value.eq_ignore_ascii_case("8BITMIME") => {}
                _ => return Reply::new(555, "MAIL FROM parameter not recognized"),
            }
        }
        self.state = State::Transaction(Envelope {
            from: path.to_owned(),
            to: Vec::new(),
        });
        Reply::new(250, "OK")
    }

    fn rcpt(&mut self, args: &str) -> Reply {
        let State::Transaction(envelope) = &mut self.state else {
            return Reply::new(503, "need MAIL before RCPT");
        };
        let Some((path, params)) = path_after(args, "TO:") else {
            return Reply::new(501, "syntax: RCPT TO:<address>");
        };
        if path.is_empty() {
            return Reply::new(501, "syntax: RCPT TO:<address>");
        }
        if !params.is_empty() {
            return Reply::new(555, "RCPT TO parameters not recognized");
        }
        if envelope.to.len() >= self.limits.max_recipients {
            return Reply::new(452, "too many recipients");
        }
        envelope.to.push(path.to_owned());
        Reply::new(250, "OK")
    }

    fn data(&mut self, args: &str) -> Step {
        if !args.is_empty() {
            return Step::Reply(Reply::new(501, "syntax: DATA"));
        }
        match &self.state {
            State::Transaction(envelope) if !envelope.to.is_empty() => {
                Step::Data(Reply::new(354, "end data with <CR><LF>.<CR><LF>"))
            }
            _ => Step::Reply(Reply::new(503, "need RCPT before DATA")),
        }
    }

    /// Ends the DATA phase: the envelope and message to store, or the refusal to send. Either
    /// way the transaction is over.
    pub(crate) fn end_data(&mut self, outcome: DataOutcome) -> Result<(Envelope, Vec<u8>), Reply> {
        let State::Transaction(envelope) = std::mem::replace(&mut self.state, State::Ready) else {
            return Err(Reply::new(503, "no transaction"));
        };
        match outcome {
            DataOutcome::Message(data) => Ok((envelope, data)),
            DataOutcome::TooLarge => Err(Reply::new(
                552,
                "message size exceeds fixed maximum message size",
            )),
            DataOutcome::LineTooLong => Err(Reply::new(500, "line too long in message")),
        }
    }
}

/// `FROM:<a@b> PARAMS` -> (`a@b`, `PARAMS`). The keyword is case-insensitive and a space after
/// the colon is tolerated; the path must be in angle brackets. A source route (`<@x,@y:a@b>`)
/// is dropped, as RFC 5321 §4.1.1.3 allows.
fn path_after<'a>(args: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let head = args.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = args.get(keyword.len()..)?.trim_start();
    let (path, params) = rest.strip_prefix('<')?.split_once('>')?;
    let path = match path.split_once(':') {
        Some((route, mailbox)) if route.starts_with('@') => mailbox,
        _ => path,
    };
    if path.chars().any(|c| c.is_control() || c == '<') {
        return None;
    }
    Some((path, params.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::new(Limits {
            hostname: "sink.test".into(),
            max_message_bytes: 1000,
            max_recipients: 2,
        })
    }

    fn code(session: &mut Session, line: &str) -> u16 {
        match session.command(line.as_bytes()) {
            Step::Reply(r) | Step::Data(r) | Step::Close(r) => r.code(),
        }
    }

    #[test]
    fn a_whole_transaction() {
        let mut s = session();
        assert_eq!(code(&mut s, "ehlo client.test"), 250);
        assert_eq!(
            code(&mut s, "MAIL FROM:<a@x.test> BODY=8BITMIME SIZE=10"),
            250
        );
        assert_eq!(code(&mut s, "RCPT TO: <@relay.test:b@x.test>"), 250);
        assert!(matches!(s.command(b"DATA"), Step::Data(_)));
        let stored = s.end_data(DataOutcome::Message(b"x\r\n".to_vec()));
        let envelope = stored.map(|(e, _)| e).ok();
        assert_eq!(
            envelope,
            Some(Envelope {
                from: "a@x.test".into(),
                to: vec!["b@x.test".into()]
            })
        );
        assert_eq!(
            code(&mut s, "RCPT TO:<c@x.test>"),
            503,
            "transaction is over"
        );
    }

    #[test]
    fn ehlo_offers_only_8bitmime_and_size() {
        let Step::Reply(reply) = session().command(b"EHLO c") else {
            panic!("EHLO is answered");
        };
        assert_eq!(
            String::from_utf8_lossy(&reply.to_wire()),
            "250-sink.test greets c\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"
        );
    }

    #[test]
    fn out_of_order_commands_get_503() {
        let mut s = session();
        assert_eq!(code(&mut s, "MAIL FROM:<a@x>"), 503, "before EHLO");
        assert_eq!(code(&mut s, "HELO c"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<b@x>"), 503, "before MAIL");
        assert_eq!(code(&mut s, "DATA"), 503, "before MAIL");
        assert_eq!(code(&mut s, "MAIL FROM:<>"), 250, "null sender");
        assert_eq!(code(&mut s, "MAIL FROM:<a@x>"), 503, "nested");
        assert_eq!(code(&mut s, "DATA"), 503, "before RCPT");
        assert_eq!(code(&mut s, "RSET"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<b@x>"), 503, "RSET ended it");
    }

    #[test]
    fn bounds_and_bad_syntax() {
        let mut s = session();
        assert_eq!(code(&mut s, "EHLO"), 501);
        assert_eq!(code(&mut s, "EHLO c"), 250);
        assert_eq!(code(&mut s, "MAIL FROM:<a@x> SIZE=1001"), 552);
        assert_eq!(code(&mut s, "MAIL FROM:<a@x> SMTPUTF8"), 555);
        assert_eq!(code(&mut s, "MAIL FROM:a@x"), 501);
        assert_eq!(code(&mut s, "MAIL FROM:<a@x>"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<>"), 501);
        assert_eq!(code(&mut s, "RCPT TO:<1@x>"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<2@x>"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<3@x>"), 452);
        assert_eq!(code(&mut s, "DATA now"), 501);
        assert_eq!(code(&mut s, "STARTTLS"), 502);
        assert_eq!(code(&mut s, "AUTH PLAIN AAAA"), 502);
        assert_eq!(code(&mut s, "XYZZY"), 500);
        assert_eq!(code(&mut s, "QUIT"), 221);
    }

    /// Any bytes as a command: an answer, never a panic.
    #[test]
    fn any_command_bytes_get_an_answer() {
        let mut state = 0x9e37_79b9_u32;
        let mut s = session();
        for round in 0..2000 {
            let len = (state % 40) as usize;
            let mut line: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state.to_le_bytes()[1]
                })
                .collect();
            let prefixes: [&[u8]; 4] = [b"MAIL FROM:<", b"RCPT TO:", b"EHLO ", b""];
            let mut command = prefixes[round % 4].to_vec();
            command.append(&mut line);
            let _ = s.command(&command);
        }
    }
}
