//! Named prepared statements across server connections in transaction mode, and the few SQL commands the proxy
//! must understand to keep session state honest (SET/RESET, DEALLOCATE, DISCARD, PREPARE, pinning features).
//!
//! A client's statement is identified by its content (query text + parameter types) and given a proxy-wide name
//! `pgrelay_<hash>`, so every client preparing the same text shares one server-side statement per connection.
//! Statements are prepared lazily on whichever server a client gets; each server keeps an LRU bounded by
//! `max_prepared_statements`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::observe::fingerprint::{self, QueryType};
use crate::protocol::take_cstr;

/// One statement as the proxy knows it.
#[derive(Debug)]
pub struct Prepared {
    /// Server-side identity (content hash mixed with its version); the server-side name is derived from it.
    pub hash: u64,
    /// Hash of the query text and parameter types.
    pub content: u64,
    /// The version of `content` this statement was prepared under.
    pub version: u32,
    /// The pool's DDL epoch when it was prepared.
    pub epoch: u32,
    /// Server-side name.
    pub name: String,
    /// A complete Parse message that prepares it under `name`.
    pub parse: Bytes,
    pub qtype: QueryType,
    pub fingerprint: u64,
    pub query: Arc<str>,
    /// A session command this statement runs (SET, PREPARE, LISTEN, ...), recognised once at Parse.
    pub session: Option<SessionCommand>,
    /// Parameter types as the server described them (ParameterDescription), for showing captured values.
    pub described_types: std::sync::OnceLock<Vec<u32>>,
}

/// Server-side name for a content hash.
pub fn server_name(hash: u64) -> String {
    format!("pgrelay_{hash:016x}")
}

/// Builds the proxy's record of a client Parse body (`name\0query\0nparams types...`). `None` if malformed.
///
/// `version` gives the current version of a content hash: it is bumped when the server-side statement went stale
/// ("cached plan must not change result type" after DDL), so new prepares get a fresh server statement while clients
/// holding the old one keep getting PostgreSQL's error, as they would without a pooler.
///
/// `epoch` counts the DDL statements seen through this pool: a prepare after DDL gets its own server statement, while
/// statements prepared before keep theirs (and PostgreSQL says whether they still fit).
pub fn from_parse(body: &[u8], version: impl Fn(u64) -> u32, epoch: u32) -> Option<(String, Prepared)> {
    let mut r = body;
    let client_name = take_cstr(&mut r)?.to_string();
    let query = take_cstr(&mut r)?;
    // The rest (parameter type count and OIDs) is part of the identity and copied verbatim.
    let types = r;
    let content = content_hash(query.as_bytes(), types);
    let v = version(content);
    let hash = content
        ^ (v as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (epoch as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f).rotate_left(17);
    let name = server_name(hash);
    let mut parse = BytesMut::with_capacity(1 + 4 + name.len() + 1 + query.len() + 1 + types.len());
    parse.put_u8(b'P');
    parse.put_i32((4 + name.len() + 1 + query.len() + 1 + types.len()) as i32);
    parse.put_slice(name.as_bytes());
    parse.put_u8(0);
    parse.put_slice(query.as_bytes());
    parse.put_u8(0);
    parse.put_slice(types);
    Some((
        client_name,
        Prepared {
            hash,
            content,
            version: v,
            epoch,
            name,
            parse: parse.freeze(),
            qtype: fingerprint::query_type(query),
            fingerprint: fingerprint::fingerprint(query),
            query: Arc::from(query),
            session: classify(query),
            described_types: std::sync::OnceLock::new(),
        },
    ))
}

/// The same statement under another version of its content (a fresh server-side name).
pub fn reversion(p: &Prepared, version: u32) -> Option<Prepared> {
    // Rebuild the client-side Parse body (name is irrelevant here) and go through the one constructor.
    let off = 5 + p.name.len() + 1 + p.query.len() + 1;
    let types = p.parse.get(off..)?;
    let mut body = Vec::with_capacity(2 + p.query.len() + types.len());
    body.push(0);
    body.extend_from_slice(p.query.as_bytes());
    body.push(0);
    body.extend_from_slice(types);
    from_parse(&body, |_| version, p.epoch).map(|(_, mut n)| {
        if let Some(t) = p.described_types.get() {
            let _ = n.described_types.set(t.clone());
        }
        n.session = p.session.clone();
        n
    })
}

fn content_hash(query: &[u8], types: &[u8]) -> u64 {
    // FNV-1a over both parts with a separator; 64 bits is plenty for the statements one proxy sees.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in query.iter().chain(std::iter::once(&0u8)).chain(types) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Rewrites a Bind body to name the server-side statement: `portal\0stmt\0rest` → `portal\0name\0rest`.
pub fn rewrite_bind(out: &mut BytesMut, body: &[u8], server_name: &str) -> bool {
    let mut r = body;
    let Some(portal) = take_cstr(&mut r) else {
        return false;
    };
    let Some(_) = take_cstr(&mut r) else {
        return false;
    };
    out.put_u8(b'B');
    out.put_i32((4 + portal.len() + 1 + server_name.len() + 1 + r.len()) as i32);
    out.put_slice(portal.as_bytes());
    out.put_u8(0);
    out.put_slice(server_name.as_bytes());
    out.put_u8(0);
    out.put_slice(r);
    true
}

/// Writes Describe or Close of a statement by its server-side name.
pub fn statement_message(out: &mut BytesMut, msg: u8, server_name: &str) {
    out.put_u8(msg);
    out.put_i32((4 + 1 + server_name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(server_name.as_bytes());
    out.put_u8(0);
}

/// What one server connection has prepared: content hashes with a use counter, evicting the least recently used.
#[derive(Default, Debug)]
pub struct ServerStatements {
    used: HashMap<u64, u64>,
    tick: u64,
}

impl ServerStatements {
    /// Whether `hash` is prepared here; marks it used.
    pub fn touch(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&hash) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `hash` as prepared; returns the statement to close if the connection is over `cap`.
    pub fn insert(&mut self, hash: u64, cap: usize) -> Option<u64> {
        self.tick += 1;
        self.used.insert(hash, self.tick);
        if self.used.len() <= cap.max(1) {
            return None;
        }
        // O(n) only when full, n = max_prepared_statements.
        let (&victim, _) = self.used.iter().filter(|(h, _)| **h != hash).min_by_key(|(_, t)| **t)?;
        self.used.remove(&victim);
        Some(victim)
    }

    pub fn remove(&mut self, hash: u64) {
        self.used.remove(&hash);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// SQL commands (simple-protocol, single statement) the proxy acts on in transaction mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionCommand {
    /// `SET [SESSION] name {=|TO} value`: follows the client to every server.
    Set { name: String, value: String },
    /// `RESET name`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate(String),
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// `DISCARD ALL`.
    DiscardAll,
    /// SQL-level `PREPARE`: refused in transaction mode (see README).
    Prepare,
    /// Session-scoped features that pin the client to its server: LISTEN, session advisory locks, temp tables.
    Pin(&'static str),
}

/// Recognises the commands above; cheap for everything else (looks at the first keyword only, plus a scan for
/// session advisory locks).
pub fn classify(sql: &str) -> Option<SessionCommand> {
    let s = sql.trim_start();
    let first = s.as_bytes().first()?.to_ascii_lowercase();
    if !matches!(first, b's' | b'r' | b'd' | b'p' | b'l' | b'c') {
        return advisory(s);
    }
    // SELECT (the common case) is never a session command by its first keyword.
    if first == b's' && s.len() > 6 && s.as_bytes()[..6].eq_ignore_ascii_case(b"select") {
        return advisory(s);
    }
    let body = s.trim_end().trim_end_matches(';').trim_end();
    if body.contains(';') {
        // Several statements: leave them to the server.
        return advisory(s);
    }
    let mut words = body.split_whitespace();
    let w0 = words.next()?.to_ascii_lowercase();
    match w0.as_str() {
        "set" => {
            let rest = body[3..].trim_start();
            let lower = rest.to_ascii_lowercase();
            if lower.starts_with("local ")
                || lower.starts_with("transaction")
                || lower.starts_with("session characteristics")
            {
                return None;
            }
            let rest = if lower.starts_with("session ") { rest[8..].trim_start() } else { rest };
            let (name, value) = split_set(rest)?;
            Some(SessionCommand::Set { name, value })
        }
        "reset" => {
            let name = words.next()?;
            if words.next().is_some() {
                return None;
            }
            if name.eq_ignore_ascii_case("all") {
                Some(SessionCommand::ResetAll)
            } else {
                Some(SessionCommand::Reset(name.to_ascii_lowercase()))
            }
        }
        "deallocate" => {
            let mut w = words.next()?;
            if w.eq_ignore_ascii_case("prepare") {
                w = words.next()?;
            }
            if w.eq_ignore_ascii_case("all") {
                Some(SessionCommand::DeallocateAll)
            } else {
                Some(SessionCommand::Deallocate(unquote_ident(w)))
            }
        }
        "discard" => {
            let w = words.next()?;
            w.eq_ignore_ascii_case("all").then_some(SessionCommand::DiscardAll)
        }
        "prepare" => Some(SessionCommand::Prepare),
        "listen" => Some(SessionCommand::Pin("LISTEN")),
        "create" => {
            let w = words.next()?.to_ascii_lowercase();
            if w == "temp"
                || w == "temporary"
                || (w == "local" || w == "global")
                    && words.next().is_some_and(|x| x.to_ascii_lowercase().starts_with("temp"))
            {
                Some(SessionCommand::Pin("temporary table"))
            } else {
                None
            }
        }
        _ => advisory(s),
    }
}

/// Session advisory locks (not the `_xact_` kind) anywhere in the text.
pub fn advisory(sql: &str) -> Option<SessionCommand> {
    // pg_advisory_lock / pg_try_advisory_lock / their _shared variants, but not pg_advisory_xact_lock: every match
    // follows an underscore, so only the (few) underscores are looked at.
    let b = sql.as_bytes();
    let needle = b"advisory_lock";
    for i in memchr::memchr_iter(b'_', b) {
        if b.len() - i > needle.len() && b[i + 1..i + 1 + needle.len()].eq_ignore_ascii_case(needle) {
            return Some(SessionCommand::Pin("session advisory lock"));
        }
    }
    None
}

/// Whether a simple Query could be one of the commands pgrelay answers itself in transaction mode (DEALLOCATE,
/// DISCARD, PREPARE): a one-byte look at the first keyword, so that every other query skips `classify` there.
pub fn maybe_local(sql: &[u8]) -> bool {
    matches!(sql.trim_ascii_start().first(), Some(b'd' | b'D' | b'p' | b'P'))
}

fn split_set(rest: &str) -> Option<(String, String)> {
    let idx_eq = rest.find('=');
    let lower = rest.to_ascii_lowercase();
    let idx_to = lower.find(" to ");
    let (name, value) = match (idx_eq, idx_to) {
        (Some(e), Some(t)) if t < e => (&rest[..t], &rest[t + 4..]),
        (Some(e), _) => (&rest[..e], &rest[e + 1..]),
        (None, Some(t)) => (&rest[..t], &rest[t + 4..]),
        (None, None) => return None,
    };
    let name = name.trim();
    let value = value.trim();
    if name.is_empty() || value.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    Some((unquote_ident(name).to_ascii_lowercase(), value.to_string()))
}

fn unquote_ident(s: &str) -> String {
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1].replace("\"\"", "\"")
    } else {
        s.to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_identity_and_rewrite() {
        let mut body = Vec::new();
        body.extend_from_slice(b"s1\0select $1\0");
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&23u32.to_be_bytes());
        let (n, p) = from_parse(&body, |_| 0, 0).unwrap();
        assert_eq!(n, "s1");
        let mut body2 = b"other\0select $1\0".to_vec();
        body2.extend_from_slice(&body[13..]);
        let (_, p2) = from_parse(&body2, |_| 0, 0).unwrap();
        assert_eq!(p.hash, p2.hash, "same content, same server statement");
        let mut body3 = b"s1\0select $1\0".to_vec();
        body3.extend_from_slice(&1i16.to_be_bytes());
        body3.extend_from_slice(&25u32.to_be_bytes());
        assert_ne!(from_parse(&body3, |_| 0, 0).unwrap().1.hash, p.hash, "parameter types are part of the identity");
        assert_eq!(&p.parse[5..5 + p.name.len()], p.name.as_bytes());
        let mut out = BytesMut::new();
        assert!(rewrite_bind(&mut out, b"\0s1\0\0\0\0\0\0\0", &p.name));
        assert_eq!(out.len(), 1 + 4 + 1 + p.name.len() + 1 + 6);
        assert!(from_parse(b"noterminator", |_| 0, 0).is_none());
    }

    #[test]
    fn lru_evicts_least_recent() {
        let mut s = ServerStatements::default();
        assert_eq!(s.insert(1, 2), None);
        assert_eq!(s.insert(2, 2), None);
        assert!(s.touch(1));
        assert_eq!(s.insert(3, 2), Some(2));
        assert!(s.touch(1) && s.touch(3) && !s.touch(2));
    }

    #[test]
    fn session_commands() {
        assert_eq!(
            classify("SET search_path TO myschema, public"),
            Some(SessionCommand::Set { name: "search_path".into(), value: "myschema, public".into() })
        );
        assert_eq!(
            classify("set session TimeZone = 'UTC';"),
            Some(SessionCommand::Set { name: "timezone".into(), value: "'UTC'".into() })
        );
        assert_eq!(classify("SET LOCAL work_mem = '1MB'"), None);
        assert_eq!(classify("set transaction isolation level serializable"), None);
        assert_eq!(classify("RESET ALL"), Some(SessionCommand::ResetAll));
        assert_eq!(classify("reset work_mem"), Some(SessionCommand::Reset("work_mem".into())));
        assert_eq!(classify("DEALLOCATE _pg3_0"), Some(SessionCommand::Deallocate("_pg3_0".into())));
        assert_eq!(classify("deallocate prepare all"), Some(SessionCommand::DeallocateAll));
        assert_eq!(classify("DISCARD ALL"), Some(SessionCommand::DiscardAll));
        assert_eq!(classify("PREPARE p AS select 1"), Some(SessionCommand::Prepare));
        assert_eq!(classify("LISTEN chan"), Some(SessionCommand::Pin("LISTEN")));
        assert_eq!(classify("select pg_advisory_lock(1)"), Some(SessionCommand::Pin("session advisory lock")));
        assert_eq!(classify("select pg_advisory_xact_lock(1)"), None);
        assert_eq!(classify("SELECT PG_TRY_ADVISORY_LOCK(1)"), Some(SessionCommand::Pin("session advisory lock")));
        assert_eq!(classify("  select pg_advisory_lock_shared(7)"), Some(SessionCommand::Pin("session advisory lock")));
        assert_eq!(classify("update t set a_b = 1 where c_d = 'x_advisory_loc'"), None);
        assert_eq!(advisory("pg_advisory_lock"), Some(SessionCommand::Pin("session advisory lock")));
        assert_eq!(advisory("x_advisory_loc"), None);
        assert_eq!(advisory("_"), None);
        assert!(maybe_local(b" DEALLOCATE a") && maybe_local(b"discard all") && maybe_local(b"prepare p as select 1"));
        assert!(!maybe_local(b"select 1") && !maybe_local(b"") && !maybe_local(b"  set x = 1"));
        assert_eq!(classify("create temp table x(a int)"), Some(SessionCommand::Pin("temporary table")));
        assert_eq!(classify("select 1"), None);
        assert_eq!(classify("set a = 1; select 1"), None);
        assert_eq!(classify(""), None);
    }
}
