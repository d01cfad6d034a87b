//! The names a Rust file gives at module level (items it defines and names it imports), read
//! from the template so a new service's name cannot collide with them.
//!
//! Why the generator reads them instead of keeping a list: the new service's name becomes its
//! crate's name (which every file of the service and its tests can see as a path root) and,
//! camel-cased, part of its command-line type (`{Camel}Service`). A name the template already
//! uses at module level (a module `items`, a struct `App`, an import `Drained`) would then
//! mean two things in one scope: two items of one name, or a `use` path that is ambiguous
//! between the crate and the local module. A list kept by hand goes stale the day someone adds
//! a module to the template; reading the template at generation time cannot.
//!
//! This is a small lexer, not a Rust parser: comments, strings, chars and lifetimes are
//! skipped, braces are counted, and at brace depth 0 it takes the name after `mod`, `struct`,
//! `enum`, `union`, `trait`, `type`, `fn`, `const`, `static`, `macro_rules!` and
//! `extern crate`, and every name a `use` tree brings in (its leaves, `self` as its parent,
//! an `as` alias instead of what it renames). Where it is unsure it errs towards reporting a
//! name (so a name is refused, never a broken service written).

/// A token of the kinds the scan needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Punct(char),
    /// A string, char, number or lifetime: never a name.
    Literal,
}

/// Item keywords followed by the item's name.
const ITEM_KEYWORDS: &[&str] = &[
    "mod", "struct", "enum", "union", "trait", "type", "fn", "const", "static",
];

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Skips a quoted string body starting after its opening `"`; returns the index after the
/// closing quote.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Skips a raw string starting at `r` (after an optional `b`); `None` if this is not one.
fn skip_raw_string(chars: &[char], at: usize) -> Option<usize> {
    let mut i = at + 1;
    let mut hashes = 0;
    while chars.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    if chars.get(i) != Some(&'"') {
        return None;
    }
    i += 1;
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return Some(i + 1 + hashes);
        }
        i += 1;
    }
    Some(i)
}

fn tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0usize;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i + 1);
            out.push(Token::Literal);
        } else if c == 'b' && next == Some('"') {
            i = skip_string(&chars, i + 2);
            out.push(Token::Literal);
        } else if let Some(end) = (c == 'r')
            .then(|| skip_raw_string(&chars, i))
            .flatten()
            .or_else(|| (c == 'b' && next == Some('r')).then(|| skip_raw_string(&chars, i + 1))?)
        {
            i = end;
            out.push(Token::Literal);
        } else if c == '\'' || (c == 'b' && next == Some('\'')) {
            let start = if c == 'b' { i + 1 } else { i };
            if chars.get(start + 1) == Some(&'\\') {
                // An escaped char (`'\''`, `'\u{7f}'`): past the escape, up to the closing
                // quote.
                i = start + 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(start + 2) == Some(&'\'') {
                i = start + 3;
            } else {
                // A lifetime (`'a`, `'static`): its name is not an item.
                i = start + 1;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
            }
            out.push(Token::Literal);
        } else if c == 'r'
            && next == Some('#')
            && chars.get(i + 2).is_some_and(|c| is_ident_start(*c))
        {
            // A raw identifier (`r#type`): the name without its prefix.
            let start = i + 2;
            i = start;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() {
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            out.push(Token::Literal);
        } else {
            out.push(Token::Punct(c));
            i += 1;
        }
    }
    out
}

fn ident(tokens: &[Token], at: usize) -> Option<&str> {
    match tokens.get(at) {
        Some(Token::Ident(s)) => Some(s),
        _ => None,
    }
}

fn punct(tokens: &[Token], at: usize, c: char) -> bool {
    tokens.get(at) == Some(&Token::Punct(c))
}

fn path_sep(tokens: &[Token], at: usize) -> bool {
    punct(tokens, at, ':') && punct(tokens, at + 1, ':')
}

/// Reads one use tree starting at `at`, pushing the names it brings into scope; returns the
/// index after it. `parent` is the last path segment before an enclosing `{` (what `self`
/// names).
fn use_tree(tokens: &[Token], mut at: usize, parent: Option<&str>, out: &mut Vec<String>) -> usize {
    let mut last: Option<String> = None;
    loop {
        if path_sep(tokens, at) {
            at += 2;
            continue;
        }
        if let Some(name) = ident(tokens, at) {
            last = Some(name.to_owned());
            at += 1;
            if path_sep(tokens, at) {
                at += 2;
                continue;
            }
            break;
        }
        if punct(tokens, at, '{') {
            at += 1;
            loop {
                if punct(tokens, at, '}') {
                    return at + 1;
                }
                if at >= tokens.len() {
                    return at;
                }
                let before = at;
                at = use_tree(tokens, at, last.as_deref(), out);
                if punct(tokens, at, ',') {
                    at += 1;
                } else if at == before {
                    // Not a use tree: stop rather than loop.
                    return at + 1;
                }
            }
        }
        if punct(tokens, at, '*') {
            return at + 1;
        }
        break;
    }
    if ident(tokens, at) == Some("as") {
        if let Some(alias) = ident(tokens, at + 1).filter(|a| *a != "_") {
            out.push(alias.to_owned());
        }
        return at + 2;
    }
    match last.as_deref() {
        Some("self") => out.extend(parent.map(str::to_owned)),
        Some("crate" | "super") | None => {}
        Some(name) => out.push(name.to_owned()),
    }
    at
}

/// The names `source` (one Rust file, which is one module) gives at module level, in order,
/// duplicates kept (so a caller can tell two items of one name).
///
/// ```
/// let names = keel_scaffold::identifiers::module_level(
///     "mod a;\nuse std::{fmt, net::SocketAddr as Addr};\npub struct App { x: u8 }\nfn f() { let y = 1; }",
/// );
/// assert_eq!(names, ["a", "fmt", "Addr", "App", "f"]);
/// ```
pub fn module_level(source: &str) -> Vec<String> {
    let tokens = tokens(source);
    let mut out = Vec::new();
    let mut depth = 0usize;
    for (at, token) in tokens.iter().enumerate() {
        match token {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => depth = depth.saturating_sub(1),
            Token::Ident(word) if depth == 0 => match word.as_str() {
                "use" => {
                    use_tree(&tokens, at + 1, None, &mut out);
                }
                "macro_rules" if punct(&tokens, at + 1, '!') => {
                    out.extend(ident(&tokens, at + 2).map(str::to_owned));
                }
                "extern" if ident(&tokens, at + 1) == Some("crate") => {
                    let alias = (ident(&tokens, at + 3) == Some("as"))
                        .then(|| ident(&tokens, at + 4))
                        .flatten();
                    out.extend(alias.or(ident(&tokens, at + 2)).map(str::to_owned));
                }
                keyword if ITEM_KEYWORDS.contains(&keyword) => {
                    let mut name_at = at + 1;
                    if keyword == "static" && ident(&tokens, name_at) == Some("mut") {
                        name_at += 1;
                    }
                    // `const fn f`, `unsafe fn f`: the `fn` that follows names the item.
                    if let Some(name) = ident(&tokens, name_at)
                        .filter(|n| *n != "_" && !ITEM_KEYWORDS.contains(n) && *n != "unsafe")
                    {
                        out.push(name.to_owned());
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn items_and_imports_at_module_level_are_named_and_nothing_inside_a_block() {
        let source = r#####"
//! doc mentioning struct Ghost
#![allow(dead_code)]
pub mod config;
pub(crate) mod error;
use std::future::Future;
use keel_service::{BrokerReadiness, Drained, Service as Svc, ServiceError};
pub use crate::config::Config;
use crate::items::{self, api::{ItemsState, routes}};
use serde::Deserialize as _;
use super::*;
/* block /* nested */ struct Hidden; */
const S: &str = "struct NotAnItem { } {";
const R: &str = r#"fn not_a_fn() { "#;
const C: char = '{';
const E: char = '\'';
static mut COUNT: u8 = 0;
pub const fn double(x: u8) -> u8 { x * 2 }
unsafe fn raw() {}
#[derive(Debug)]
pub struct App<'a> { field: &'a str }
enum Kind { A, B }
type Alias = u8;
trait Named { fn name(&self) -> &str; const N: u8; }
impl App<'_> { pub fn build() -> Self { struct Local; todo!() } }
macro_rules! shout { () => {} }
extern crate alloc as heap;
fn r#match() {}
mod tests { use super::*; fn inner() {} }
"#####;
        assert_eq!(
            module_level(source),
            [
                "config",
                "error",
                "Future",
                "BrokerReadiness",
                "Drained",
                "Svc",
                "ServiceError",
                "Config",
                "items",
                "ItemsState",
                "routes",
                "S",
                "R",
                "C",
                "E",
                "COUNT",
                "double",
                "raw",
                "App",
                "Kind",
                "Alias",
                "Named",
                "shout",
                "heap",
                "match",
                "tests",
            ]
        );
    }
}
