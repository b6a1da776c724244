//! Wire codec: frame headers, the startup family of packets, and the few messages the proxy reads or writes. No I/O.
//!
//! Incoming bytes are parsed by hand here (pgwire is never handed unvalidated peer bytes); messages pgrelay writes
//! itself are encoded with pgwire's message types.

use bytes::{BufMut, BytesMut};
use pgwire::messages::Message;

/// Protocol version 3.0 as sent in a startup packet.
pub const PROTOCOL_3_0: u32 = 196_608;
/// Magic version codes of the special startup packets.
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// PostgreSQL refuses startup packets longer than this; so do we.
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Why bytes from a peer could not be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid length {0} in packet header")]
    BadLength(usize),
    #[error("message of {len} bytes exceeds max_packet_size {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
}

/// A parsed untyped startup-phase packet (body after the 4-byte length).
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: i32 },
    Startup { minor: u16, params: Vec<(String, String)> },
}

/// Reads the length of a startup-phase packet from its first 4 bytes; checks its bounds.
pub fn startup_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(header) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ProtocolError::BadLength(len));
    }
    Ok(len)
}

/// Parses the body (everything after the length) of a startup-phase packet.
pub fn parse_startup(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    if body.len() < 4 {
        return Err(ProtocolError::Malformed("startup packet"));
    }
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST if rest.is_empty() => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST if rest.is_empty() => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST if rest.len() == 8 => Ok(StartupPacket::Cancel {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            key: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(ProtocolError::Malformed("request packet")),
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let mut params = Vec::new();
            let mut r = rest;
            loop {
                let name = take_cstr(&mut r).ok_or(ProtocolError::Malformed("startup parameters"))?;
                if name.is_empty() {
                    break;
                }
                let value = take_cstr(&mut r).ok_or(ProtocolError::Malformed("startup parameters"))?;
                params.push((name.to_string(), value.to_string()));
            }
            if !r.is_empty() {
                return Err(ProtocolError::Malformed("startup packet: bytes after the terminator"));
            }
            Ok(StartupPacket::Startup { minor, params })
        }
    }
}

/// Header of a typed message at the start of `buf`: (type, total length including the type byte).
/// `Ok(None)` when fewer than 5 bytes are there.
#[inline]
pub fn frame_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(ProtocolError::BadLength(len));
    }
    if len > max_len {
        return Err(ProtocolError::TooLarge { len, max: max_len });
    }
    Ok(Some((buf[0], len + 1)))
}

/// Takes a NUL-terminated UTF-8 string off the front of `r`.
pub fn take_cstr<'a>(r: &mut &'a [u8]) -> Option<&'a str> {
    let end = r.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&r[..end]).ok()?;
    *r = &r[end + 1..];
    Some(s)
}

/// Takes a big-endian i32 off the front of `r`.
pub fn take_i32(r: &mut &[u8]) -> Option<i32> {
    if r.len() < 4 {
        return None;
    }
    let v = i32::from_be_bytes([r[0], r[1], r[2], r[3]]);
    *r = &r[4..];
    Some(v)
}

/// Takes a big-endian i16 off the front of `r`.
pub fn take_i16(r: &mut &[u8]) -> Option<i16> {
    if r.len() < 2 {
        return None;
    }
    let v = i16::from_be_bytes([r[0], r[1]]);
    *r = &r[2..];
    Some(v)
}

/// Fields of an ErrorResponse or NoticeResponse body that the proxy logs or acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// Parses an ErrorResponse/NoticeResponse body (after the 5-byte header). Tolerates garbage.
pub fn parse_error_fields(mut body: &[u8]) -> ErrorFields {
    let mut f = ErrorFields::default();
    while let Some((&t, rest)) = body.split_first() {
        if t == 0 {
            break;
        }
        body = rest;
        let Some(v) = take_cstr(&mut body) else { break };
        match t {
            b'S' => f.severity = v.to_string(),
            b'C' => f.code = v.to_string(),
            b'M' => f.message = v.to_string(),
            _ => {}
        }
    }
    f
}

/// Query text of a Query ('Q') body.
pub fn query_text(body: &[u8]) -> &str {
    let mut r = body;
    take_cstr(&mut r).unwrap_or("")
}

fn put<M: Message>(buf: &mut BytesMut, m: M) {
    // Encoding into a BytesMut only fails for lengths over i32, which nothing pgrelay writes reaches.
    let _ = m.encode(buf);
}

/// SQLSTATE codes pgrelay uses in its own errors.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT: &str = "08001";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const UNKNOWN_DATABASE: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const UNDEFINED_PREPARED_STATEMENT: &str = "26000";
    pub const INTERNAL: &str = "XX000";
}

/// Appends an ErrorResponse.
pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    put(
        buf,
        pgwire::messages::response::ErrorResponse::new(vec![
            (b'S', severity.to_string()),
            (b'V', severity.to_string()),
            (b'C', code.to_string()),
            (b'M', message.to_string()),
        ]),
    );
}

/// Appends a NoticeResponse.
pub fn notice_response(buf: &mut BytesMut, code: &str, message: &str) {
    put(
        buf,
        pgwire::messages::response::NoticeResponse::new(vec![
            (b'S', "NOTICE".into()),
            (b'V', "NOTICE".into()),
            (b'C', code.to_string()),
            (b'M', message.to_string()),
        ]),
    );
}

/// Appends ReadyForQuery with the given status byte.
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    buf.put_u8(b'Z');
    buf.put_i32(5);
    buf.put_u8(status);
}

/// Appends an Authentication message.
pub fn authentication(buf: &mut BytesMut, a: pgwire::messages::startup::Authentication) {
    put(buf, a);
}

/// Appends ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    // Written in place: a login sends a dozen of these, and building pgwire messages costs two Strings each.
    buf.put_u8(b'S');
    buf.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
    put_cstr(buf, name);
    put_cstr(buf, value);
}

/// Appends BackendKeyData.
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    buf.put_u8(b'K');
    buf.put_i32(12);
    buf.put_i32(pid);
    buf.put_i32(key);
}

/// Appends NegotiateProtocolVersion (newest minor we support, and the options we did not recognise).
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unsupported: Vec<String>) {
    put(buf, pgwire::messages::startup::NegotiateProtocolVersion::new(minor, unsupported));
}

/// Appends RowDescription with all-text columns.
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    use pgwire::messages::data::{FieldDescription, RowDescription};
    let fields = columns
        .iter()
        // 25 = text; every admin column is sent as text, as pgBouncer's are readable either way.
        .map(|c| FieldDescription::new((*c).to_string(), 0, 0, 25, -1, -1, 0))
        .collect();
    put(buf, RowDescription::new(fields));
}

/// Appends a DataRow of text values (None = NULL).
pub fn data_row(buf: &mut BytesMut, values: &[Option<String>]) {
    let mut data = BytesMut::new();
    for v in values {
        match v {
            Some(s) => {
                data.put_i32(s.len() as i32);
                data.put_slice(s.as_bytes());
            }
            None => data.put_i32(-1),
        }
    }
    put(buf, pgwire::messages::data::DataRow::new(data, values.len() as i16));
}

/// Appends CommandComplete.
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put(buf, pgwire::messages::response::CommandComplete::new(tag.into()));
}

/// Appends EmptyQueryResponse.
pub fn empty_query(buf: &mut BytesMut) {
    buf.put_u8(b'I');
    buf.put_i32(4);
}

/// Appends a startup packet (protocol 3.0) with the given parameters.
pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let start = buf.len();
    buf.put_i32(0);
    buf.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(buf, k);
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - start) as i32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a CancelRequest packet.
pub fn cancel_request(buf: &mut BytesMut, pid: i32, key: i32) {
    buf.put_i32(16);
    buf.put_u32(CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_i32(key);
}

/// Appends a simple Query.
pub fn query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(b'Q');
    buf.put_i32((4 + sql.len() + 1) as i32);
    put_cstr(buf, sql);
}

/// Appends a PasswordMessage ('p') carrying a NUL-terminated string.
pub fn password_message(buf: &mut BytesMut, password: &str) {
    buf.put_u8(b'p');
    buf.put_i32((4 + password.len() + 1) as i32);
    put_cstr(buf, password);
}

/// Appends SASLInitialResponse.
pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    buf.put_u8(b'p');
    buf.put_i32((4 + mechanism.len() + 1 + 4 + data.len()) as i32);
    put_cstr(buf, mechanism);
    buf.put_i32(data.len() as i32);
    buf.put_slice(data);
}

/// Appends SASLResponse.
pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    buf.put_u8(b'p');
    buf.put_i32((4 + data.len()) as i32);
    buf.put_slice(data);
}

/// Appends Terminate.
pub fn terminate(buf: &mut BytesMut) {
    buf.put_u8(b'X');
    buf.put_i32(4);
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// Quotes a string as an SQL literal ('...', with quotes doubled); backslashes are safe under
/// standard_conforming_strings, and an E'' literal is used when they appear so the meaning is the same either way.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quotes an identifier ("...", with quotes doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_roundtrip() {
        let mut b = BytesMut::new();
        startup_message(&mut b, &[("user", "u"), ("database", "d")]);
        let len = startup_len([b[0], b[1], b[2], b[3]]).unwrap();
        assert_eq!(len, b.len());
        match parse_startup(&b[4..]).unwrap() {
            StartupPacket::Startup { minor, params } => {
                assert_eq!(minor, 0);
                assert_eq!(params, vec![("user".into(), "u".into()), ("database".into(), "d".into())]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_startups() {
        assert!(startup_len(1_000_000u32.to_be_bytes()).is_err());
        assert!(startup_len(3u32.to_be_bytes()).is_err());
        assert_eq!(parse_startup(&[0, 4, 0, 0, 0]), Err(ProtocolError::UnsupportedVersion { major: 4, minor: 0 }));
        assert!(parse_startup(&[0, 3, 0, 0, b'u', 0]).is_err());
        let mut cancel = BytesMut::new();
        cancel_request(&mut cancel, 7, 9);
        assert_eq!(parse_startup(&cancel[4..]).unwrap(), StartupPacket::Cancel { pid: 7, key: 9 });
    }

    #[test]
    fn frame_headers() {
        assert_eq!(frame_header(b"Q\0\0", 100).unwrap(), None);
        assert_eq!(frame_header(b"Q\0\0\0\x09abc", 100).unwrap(), Some((b'Q', 10)));
        assert!(frame_header(b"Q\0\0\0\x02", 100).is_err());
        assert!(frame_header(b"Q\x7f\0\0\0", 100).is_err());
    }

    #[test]
    fn error_fields() {
        let mut b = BytesMut::new();
        error_response(&mut b, "FATAL", "28P01", "nope");
        let f = parse_error_fields(&b[5..]);
        assert_eq!((f.severity.as_str(), f.code.as_str(), f.message.as_str()), ("FATAL", "28P01", "nope"));
        assert_eq!(parse_error_fields(b"S"), ErrorFields::default());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
