//! Just enough RFC 5322 and MIME to show a message the way Mailpit does: unfolded headers, a
//! decoded `Subject`, and the text and HTML bodies.
//!
//! Written by hand on purpose, and best effort by design: the sink is a test fixture, so it
//! reads what `lettre` writes (single-part bodies in 7bit, quoted-printable or base64;
//! `multipart/alternative` and `multipart/mixed`; RFC 2047 encoded words in UTF-8) and never
//! refuses a message it cannot read: anything it does not understand is shown raw (lossy
//! UTF-8). Bodies are taken as UTF-8 whatever their `charset`.
//!
//! Must not break: these functions take client bytes, so they never panic and never recurse
//! without a bound ([`MAX_DEPTH`]).

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Deepest nesting of multiparts that is looked into (`mixed` > `alternative` > `related` is 3).
const MAX_DEPTH: usize = 8;

/// Standard alphabet, padding optional: encoders disagree on it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One header field, unfolded (RFC 5322 §2.2.3: the line breaks before continuation lines
/// removed) and trimmed. The value is as sent: encoded words are not decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// The header block and what follows it.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    pub headers: Vec<Header>,
    pub body: &'a [u8],
}

/// Splits `data` into headers and body. The header block ends at the first empty line, or at
/// the first line that is neither a header field nor a continuation (then that line is the
/// first line of the body).
pub(crate) fn parse(data: &[u8]) -> Parsed<'_> {
    let mut headers: Vec<Header> = Vec::new();
    let mut pos = 0;
    while let Some(rest) = data.get(pos..).filter(|r| !r.is_empty()) {
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let line = trim_eol(rest.get(..len).unwrap_or(rest));
        match line.first() {
            None => {
                pos += len;
                break;
            }
            Some(b' ' | b'\t') => match headers.last_mut() {
                Some(last) => last.value.push_str(&String::from_utf8_lossy(line)),
                None => break,
            },
            Some(_) => match split_field(line) {
                Some((name, value)) => headers.push(Header {
                    name: String::from_utf8_lossy(name).into_owned(),
                    value: String::from_utf8_lossy(value).into_owned(),
                }),
                None => break,
            },
        }
        pos += len;
    }
    for header in &mut headers {
        header.value = header.value.trim().to_owned();
    }
    Parsed {
        headers,
        body: data.get(pos..).unwrap_or_default(),
    }
}

/// `Name: value` with a printable, non-empty name.
fn split_field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (line.get(..colon)?, line.get(colon + 1..)?);
    (!name.is_empty() && name.iter().all(u8::is_ascii_graphic)).then_some((name, value))
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The first header called `name` (case-insensitive).
pub(crate) fn header<'h>(headers: &'h [Header], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// A header name as Go's `textproto.CanonicalMIMEHeaderKey` writes it (`message-id` ->
/// `Message-Id`), which is how Mailpit's `/headers` endpoint names them. A name with a
/// character outside a token is returned unchanged, as Go does.
pub(crate) fn canonical_name(name: &str) -> String {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !name.chars().all(token) {
        return name.to_owned();
    }
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// Decodes RFC 2047 encoded words (`=?UTF-8?B?...?=`, `=?utf-8?q?...?=`) in a header value.
/// Whitespace between two adjacent encoded words is dropped, as the RFC says. A word in a
/// charset other than UTF-8, US-ASCII or ISO-8859-1, or one that does not decode, is kept as
/// written.
pub(crate) fn decode_words(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut after_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, candidate) = rest.split_at(start);
        match decode_word(candidate) {
            Some((text, used)) => {
                if !(after_word && before.chars().all(char::is_whitespace)) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = candidate.get(used..).unwrap_or_default();
                after_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = candidate.get(2..).unwrap_or_default();
                after_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One encoded word at the start of `s`: its text and how many bytes of `s` it spans.
fn decode_word(s: &str) -> Option<(String, usize)> {
    let inner = s.strip_prefix("=?")?;
    let (charset, after) = inner.split_once('?')?;
    let (encoding, after) = after.split_once('?')?;
    let end = after.find("?=")?;
    let text = after.get(..end)?;
    if text.contains(char::is_whitespace) {
        return None;
    }
    let bytes = match encoding {
        "B" | "b" => BASE64.decode(text).ok()?,
        "Q" | "q" => decode_quoted_printable(text.as_bytes(), true),
        _ => return None,
    };
    // RFC 2231 allows a language after the charset: `UTF-8*en`.
    let charset = charset.split('*').next().unwrap_or_default();
    let decoded = match charset.to_ascii_lowercase().as_str() {
        "utf-8" | "utf8" | "us-ascii" => String::from_utf8_lossy(&bytes).into_owned(),
        "iso-8859-1" | "latin1" => bytes.iter().map(|&b| char::from(b)).collect(),
        _ => return None,
    };
    let used = 2 + charset_len(inner) + 1 + encoding.len() + 1 + end + 2;
    Some((decoded, used))
}

fn charset_len(inner: &str) -> usize {
    inner.find('?').unwrap_or(inner.len())
}

/// Quoted-printable (RFC 2045 §6.7): `=XX` is a byte, `=` at a line end is a soft break. In
/// encoded words (`underscore_is_space`) `_` stands for a space. Malformed escapes are kept.
fn decode_quoted_printable(input: &[u8], underscore_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while let Some(&b) = input.get(i) {
        match (b, input.get(i + 1), input.get(i + 2)) {
            (b'=', Some(b'\r'), Some(b'\n')) => i += 3,
            (b'=', Some(b'\n'), _) => i += 2,
            (b'=', Some(&hi), Some(&lo)) => match (hex(hi), hex(lo)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    out.push(b'=');
                    i += 1;
                }
            },
            (b'_', _, _) if underscore_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// The text and HTML bodies of a message, as Mailpit's `Text` and `HTML` show them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Bodies {
    pub text: String,
    pub html: String,
}

/// The first `text/plain` and the first `text/html` part that is not an attachment, decoded.
/// A message without `Content-Type` is text. Line endings in the result are `\n`.
pub(crate) fn bodies(data: &[u8]) -> Bodies {
    let parsed = parse(data);
    let mut found = Found::default();
    walk(&parsed.headers, parsed.body, 0, &mut found);
    Bodies {
        text: found.text.unwrap_or_default(),
        html: found.html.unwrap_or_default(),
    }
}

#[derive(Default)]
struct Found {
    text: Option<String>,
    html: Option<String>,
}

fn walk(headers: &[Header], body: &[u8], depth: usize, found: &mut Found) {
    let content_type = header(headers, "content-type").unwrap_or("text/plain");
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media.starts_with("multipart/")
        && depth < MAX_DEPTH
        && let Some(boundary) = parameter(content_type, "boundary")
    {
        for part in split_multipart(body, &boundary) {
            let parsed = parse(part);
            walk(&parsed.headers, parsed.body, depth + 1, found);
        }
        return;
    }
    let attachment = header(headers, "content-disposition").is_some_and(|d| {
        d.trim_start()
            .to_ascii_lowercase()
            .starts_with("attachment")
    });
    if attachment {
        return;
    }
    let slot = match media.as_str() {
        "text/plain" | "" => &mut found.text,
        "text/html" => &mut found.html,
        _ => return,
    };
    if slot.is_none() {
        let decoded = decode_body(header(headers, "content-transfer-encoding"), body);
        *slot = Some(String::from_utf8_lossy(&decoded).replace("\r\n", "\n"));
    }
}

/// A body undone from its transfer encoding; raw when it is 7bit, 8bit, binary, unknown or
/// does not decode.
fn decode_body(encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        Some("base64") => {
            let compact: Vec<u8> = body
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            BASE64.decode(compact).unwrap_or_else(|_| body.to_vec())
        }
        Some("quoted-printable") => decode_quoted_printable(body, false),
        _ => body.to_vec(),
    }
}

/// A `Content-Type` parameter (`boundary="abc"`), unquoted; names compare case-insensitively.
fn parameter(content_type: &str, name: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (key, value) = param.split_once('=')?;
        key.trim().eq_ignore_ascii_case(name).then(|| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
                .to_owned()
        })
    })
}

/// The parts of a multipart body (RFC 2046 §5.1.1): what lies between `--boundary` lines, up
/// to `--boundary--`. The line break before a delimiter belongs to the delimiter.
fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut part_start: Option<usize> = None;
    let mut pos = 0;
    while let Some(rest) = body.get(pos..).filter(|r| !r.is_empty()) {
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let line = trim_eol(rest.get(..len).unwrap_or(rest));
        if let Some(after) = line.strip_prefix(delimiter.as_bytes()) {
            let closing = after.starts_with(b"--");
            if closing || after.iter().all(u8::is_ascii_whitespace) {
                if let Some(start) = part_start {
                    let part = body.get(start..pos).unwrap_or_default();
                    let part = part.strip_suffix(b"\n").unwrap_or(part);
                    parts.push(part.strip_suffix(b"\r").unwrap_or(part));
                }
                if closing {
                    return parts;
                }
                part_start = Some(pos + len);
            }
        }
        pos += len;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_headers_are_unfolded_and_the_body_follows_the_blank_line() {
        let data = b"Subject: a long\r\n  subject\r\nTo: x@example.com\r\n\r\nbody\r\n";
        let parsed = parse(data);
        assert_eq!(header(&parsed.headers, "SUBJECT"), Some("a long  subject"));
        assert_eq!(header(&parsed.headers, "to"), Some("x@example.com"));
        assert_eq!(parsed.body, b"body\r\n");
    }

    #[test]
    fn a_message_without_headers_is_all_body() {
        let parsed = parse(b"just text\r\nmore\r\n");
        assert!(parsed.headers.is_empty());
        assert_eq!(parsed.body, b"just text\r\nmore\r\n");
    }

    #[test]
    fn encoded_words_are_decoded_and_the_space_between_them_dropped() {
        assert_eq!(
            decode_words("=?utf-8?b?QmVzdGVsbHVuZyA=?= =?UTF-8?Q?best=C3=A4tigt?= (42)"),
            "Bestellung bestätigt (42)"
        );
        assert_eq!(
            decode_words("=?koi8-r?b?8NLJ?= plain"),
            "=?koi8-r?b?8NLJ?= plain"
        );
        assert_eq!(decode_words("a =? b ?= c"), "a =? b ?= c");
    }

    #[test]
    fn quoted_printable_soft_breaks_and_escapes() {
        assert_eq!(
            decode_quoted_printable(b"caf=C3=A9 is=\r\n open =ZZ", false),
            "café is open =ZZ".as_bytes()
        );
    }

    #[test]
    fn multipart_alternative_yields_text_and_html() {
        let data = b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n\
preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: base64\r\n\r\nSGVsbG8sIHfDtnJsZA==\r\n\
--b1\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n--b1--\r\n";
        let bodies = bodies(data);
        assert_eq!(bodies.text, "Hello, wörld");
        assert_eq!(bodies.html, "<p>Hello</p>");
    }

    #[test]
    fn header_names_are_canonical_as_in_go() {
        assert_eq!(canonical_name("message-id"), "Message-Id");
        assert_eq!(canonical_name("CONTENT-TYPE"), "Content-Type");
        assert_eq!(canonical_name("odd name"), "odd name");
    }

    /// Client bytes never panic the parser: every prefix of a tricky message, and noise.
    #[test]
    fn any_bytes_parse_without_panicking() {
        let tricky: &[u8] = b"Content-Type: multipart/mixed; boundary=x\r\n \r\n\r\n--x\r\n\
Content-Type: multipart/alternative; boundary=\"\"\r\nSubject: =?utf-8?q?=\r\n\r\n--\r\n--x--";
        for end in 0..=tricky.len() {
            let prefix = tricky.get(..end).unwrap_or_default();
            let _ = bodies(prefix);
            let _ = decode_words(&String::from_utf8_lossy(prefix));
        }
        let mut state = 0x2545_f491_u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state.to_le_bytes()[0]
            })
            .collect();
        let _ = bodies(&noise);
    }
}
