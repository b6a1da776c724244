//! Authentication: pgBouncer userlist, md5 and SCRAM-SHA-256 (server side towards clients, client side towards PostgreSQL).
//!
//! Everything here is a pure state machine over byte slices: the caller owns the sockets and the
//! protocol framing, which keeps this module fuzzable and free of I/O. Every input that comes from
//! a peer is treated as hostile: parsing is bounded and strict, and failures are `AuthError`s,
//! never panics.
//!
//! References: RFC 5802 (SCRAM), RFC 7677 (SCRAM-SHA-256), and the PostgreSQL documentation on
//! the SASL and md5 authentication flows and on the `pg_authid.rolpassword` formats.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The SASL mechanism name to offer in AuthenticationSASL.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The channel-binding variant, offered only over TLS.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL defines (RFC 5929).
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

/// A random key made once per process, from which the mock salts of unknown users are derived
/// (`ScramServer::mock`). Written once and never changed, so it is a constant in all but name.
pub fn instance_secret() -> &'static [u8] {
    static SECRET: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| random_bytes(32))
}

/// Any SCRAM message larger than this is refused before it is looked at. Real messages are a few
/// hundred bytes; the cap bounds the work a peer can make us do.
pub const MAX_MESSAGE_LEN: usize = 8 * 1024;

/// Upper bound on the PBKDF2 iteration count we accept from a server or a stored verifier. A
/// hostile or misconfigured server could otherwise pin a CPU for minutes per login.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Iteration count PostgreSQL uses by default (`scram_iterations`); used when we have to build a
/// verifier from a plaintext password ourselves.
pub const DEFAULT_ITERATIONS: u32 = 4096;

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";
const SERVER_SALT_LEN: usize = 16;
const SERVER_NONCE_RAW_LEN: usize = 18;
const CLIENT_NONCE_RAW_LEN: usize = 24;
const KEY_LEN: usize = 32;

/// Errors from authentication. None of the variants ever carries a password, hash or key, so it
/// is safe to log them or send their text to a client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM message too long ({0} bytes)")]
    TooLong(usize),
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("SCRAM channel binding data does not match the GS2 header")]
    ChannelBindingMismatch,
    #[error("password authentication failed")]
    BadProof,
    #[error("server signature does not match: the server does not know the password")]
    BadServerSignature,
    #[error("invalid SCRAM iteration count (must be 1..={max})", max = MAX_ITERATIONS)]
    BadIterations,
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error("SCRAM exchange used out of order: {0}")]
    State(&'static str),
    #[error("userlist line {line}: {reason}")]
    Userlist { line: usize, reason: String },
    #[error("server reported SCRAM error: {0}")]
    ServerError(String),
}

// ---------------------------------------------------------------------------------------------
// Small primitives
// ---------------------------------------------------------------------------------------------

/// Compares without an early exit so the time taken does not reveal how many leading bytes of a
/// guess were right. Lengths are public in every use here, so a length mismatch may exit early.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    // Keeps the optimiser from turning the fold back into a short-circuiting compare.
    std::hint::black_box(diff) == 0
}

/// HMAC-SHA-256 without a fallible constructor: RFC 2104 defines the key as zero-padded to the
/// block size (or hashed first when longer), so doing that ourselves gives the identical MAC and
/// leaves no error path that would need an `unwrap`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        let digest: [u8; KEY_LEN] = Sha256::digest(key).into();
        block[..KEY_LEN].copy_from_slice(&digest);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <HmacSha256 as hmac::digest::KeyInit>::new(&block.into());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    Sha256::digest(data).into()
}

fn xor32(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b.iter())) {
        *o = x ^ y;
    }
    out
}

fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn b64_decode(s: &str, what: &'static str) -> Result<Vec<u8>, AuthError> {
    B64.decode(s).map_err(|_| AuthError::Malformed(what))
}

fn b64_decode_key(s: &str, what: &'static str) -> Result<[u8; KEY_LEN], AuthError> {
    let v = b64_decode(s, what)?;
    <[u8; KEY_LEN]>::try_from(v.as_slice()).map_err(|_| AuthError::Malformed(what))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E, i.e. visible ASCII except ','. Nonces are spliced
/// into later messages verbatim, so anything else would break (or smuggle) attributes.
fn is_printable_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// RFC 5802 `posit-number`: no sign, no leading zero. `str::parse` would accept "+4096" and
/// "04096", which PostgreSQL never sends; being strict keeps the parser's language small.
fn parse_iterations(s: &str) -> Result<u32, AuthError> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 10 || !b.iter().all(u8::is_ascii_digit) || b.first() == Some(&b'0') {
        return Err(AuthError::BadIterations);
    }
    let n: u64 = s.parse().map_err(|_| AuthError::BadIterations)?;
    if n == 0 || n > u64::from(MAX_ITERATIONS) {
        return Err(AuthError::BadIterations);
    }
    u32::try_from(n).map_err(|_| AuthError::BadIterations)
}

/// Common entry checks for every SCRAM message: bounded size, UTF-8 (attribute values are
/// defined over UTF-8) and no NUL (PostgreSQL treats these as C strings, so a NUL would make
/// the two ends see different messages).
fn message_str(msg: &[u8]) -> Result<&str, AuthError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(AuthError::TooLong(msg.len()));
    }
    if msg.is_empty() {
        return Err(AuthError::Malformed("empty message"));
    }
    if msg.contains(&0) {
        return Err(AuthError::Malformed("NUL byte in message"));
    }
    std::str::from_utf8(msg).map_err(|_| AuthError::Malformed("message is not UTF-8"))
}

/// Splits `k=value`. The first two bytes are ASCII when this succeeds, so slicing at 2 is on a
/// char boundary.
fn split_attr(part: &str) -> Result<(u8, &str), AuthError> {
    let b = part.as_bytes();
    match b {
        [k, b'=', ..] if k.is_ascii_alphabetic() => Ok((*k, part.get(2..).unwrap_or(""))),
        _ => Err(AuthError::Malformed("attribute is not of the form a=value")),
    }
}

/// Checks the optional extension attributes that may trail a message. They are ignored, but they
/// must be well-formed and must not repeat an attribute the message already defines.
fn check_extensions<'a>(parts: impl Iterator<Item = &'a str>, reserved: &[u8]) -> Result<(), AuthError> {
    let mut seen: Vec<u8> = Vec::new();
    for part in parts {
        let (k, _) = split_attr(part)?;
        if k == b'm' {
            return Err(AuthError::Unsupported("SCRAM mandatory extension (m=)"));
        }
        if reserved.contains(&k) || seen.contains(&k) {
            return Err(AuthError::Malformed("duplicated attribute"));
        }
        seen.push(k);
    }
    Ok(())
}

/// RFC 5802 `saslname`: UTF-8 without ',' where '=' only appears as "=2C" or "=3D".
fn check_saslname(s: &str) -> Result<(), AuthError> {
    let b = s.as_bytes();
    let mut i = 0usize;
    while let Some(&c) = b.get(i) {
        match c {
            b',' => return Err(AuthError::Malformed("',' in user name")),
            b'=' => match b.get(i.saturating_add(1)..i.saturating_add(3)) {
                Some(b"2C") | Some(b"3D") => i = i.saturating_add(3),
                _ => return Err(AuthError::Malformed("bad '=' escape in user name")),
            },
            _ => i = i.saturating_add(1),
        }
    }
    Ok(())
}

fn escape_saslname(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ',' => out.push_str("=2C"),
            '=' => out.push_str("=3D"),
            c => out.push(c),
        }
    }
    out
}

/// Keeps error text from a server out of log-injection territory: only visible ASCII and space.
fn sanitize_server_text(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(256).collect()
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// A stored secret for one user.
///
/// `PartialEq` is not constant time; it exists for configuration reloads and tests, never for
/// checking something a peer sent.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// Plaintext password.
    Plain(String),
    /// "md5" + 32 hex chars (md5(password || username)).
    Md5(String),
    /// Parsed "SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>".
    Scram(ScramVerifier),
}

impl Secret {
    /// Classifies a stored password the way PostgreSQL does: a well-formed md5 hash or SCRAM
    /// verifier is a hash, anything else (including near misses) is a plaintext password.
    pub fn parse(s: &str) -> Secret {
        if is_md5_hash(s) {
            return Secret::Md5(s.to_string());
        }
        if s.starts_with(SCRAM_PREFIX) {
            if let Some(v) = ScramVerifier::parse(s) {
                return Secret::Scram(v);
            }
        }
        Secret::Plain(s.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Md5(<redacted>)"),
            Secret::Scram(v) => f.debug_tuple("Scram").field(v).finish(),
        }
    }
}

fn is_md5_hash(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s.bytes().skip(3).all(|b| b.is_ascii_hexdigit())
}

/// A SCRAM-SHA-256 verifier as stored in `pg_authid.rolpassword`.
///
/// `stored_key` and `server_key` are password equivalents for this protocol (together they let
/// anyone impersonate the server, and `stored_key` plus an observed exchange yields the client
/// key), so `Debug` redacts them. `Display` deliberately prints them: it is the storage format.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses PostgreSQL's `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix(SCRAM_PREFIX)?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations = parse_iterations(iter).ok()?;
        let salt = B64.decode(salt).ok()?;
        if salt.is_empty() {
            return None;
        }
        let stored_key = b64_decode_key(stored, "stored key").ok()?;
        let server_key = b64_decode_key(server, "server key").ok()?;
        Some(ScramVerifier { iterations, salt, stored_key, server_key })
    }

    /// Builds a verifier from a plaintext password.
    ///
    /// SASLprep (RFC 4013) is not applied: the password is used as raw UTF-8 bytes. PostgreSQL
    /// also falls back to the raw bytes whenever SASLprep fails, and for the common case of
    /// printable ASCII the normalisation is the identity, so the results agree there. Passwords
    /// containing non-ASCII spaces or compatibility characters may hash differently than in
    /// PostgreSQL. An iteration count of 0 is treated as 1, since PBKDF2 needs at least one round.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let iterations = iterations.max(1);
        let keys = derive_keys(password, salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&keys.client_key),
            server_key: keys.server_key,
        }
    }

    fn is_usable(&self) -> bool {
        (1..=MAX_ITERATIONS).contains(&self.iterations) && !self.salt.is_empty()
    }
}

impl fmt::Display for ScramVerifier {
    /// PostgreSQL's storage format, so `to_string()` output can go straight into a userlist or
    /// `ALTER ROLE ... PASSWORD`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}:{}${}:{}",
            SCRAM_PREFIX,
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

struct DerivedKeys {
    client_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

fn derive_keys(password: &str, salt: &[u8], iterations: u32) -> DerivedKeys {
    let mut salted = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    DerivedKeys {
        client_key: hmac_sha256(&salted, &[b"Client Key"]),
        server_key: hmac_sha256(&salted, &[b"Server Key"]),
    }
}

// ---------------------------------------------------------------------------------------------
// Userlist
// ---------------------------------------------------------------------------------------------

/// pgBouncer auth_file format: one user per line, `"username" "password-or-hash"`; a `""` inside
/// quotes is a literal `"`; blank lines and lines starting with `;` or `#` are ignored. Extra
/// fields after the second are ignored.
#[derive(Clone, Default)]
pub struct Userlist {
    users: HashMap<String, Secret>,
}

impl Userlist {
    /// Parses an auth_file. When a user appears twice the later line wins, as in pgBouncer, so
    /// that files generated by appending keep working.
    pub fn parse(text: &str) -> Result<Userlist, AuthError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut users = HashMap::new();
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx.saturating_add(1);
            let err = |reason: &str| AuthError::Userlist { line: line_no, reason: reason.to_string() };
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let (user, rest) = parse_quoted(line).map_err(|what| err(&format!("{what} user name")))?;
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
                return Err(err("expected whitespace after the user name"));
            }
            let rest = rest.trim_start();
            if rest.is_empty() {
                return Err(err("missing password field"));
            }
            // Only the structure of the password field is reported, never its content.
            let (password, _extra) = parse_quoted(rest).map_err(|what| err(&format!("{what} password")))?;
            users.insert(user, Secret::parse(&password));
        }
        Ok(Userlist { users })
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl fmt::Debug for Userlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Userlist").field("users", &names).finish()
    }
}

/// Reads one `"..."` field with `""` as an escaped quote; returns the field and what follows the
/// closing quote. The error is a short description to be prefixed onto the field's name.
fn parse_quoted(s: &str) -> Result<(String, &str), &'static str> {
    let inner = s.strip_prefix('"').ok_or("expected '\"' before")?;
    let mut out = String::new();
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        let after = inner.get(i.saturating_add(1)..).unwrap_or("");
        if after.starts_with('"') {
            out.push('"');
            chars.next();
        } else {
            return Ok((out, after));
        }
    }
    Err("unterminated quoted")
}

// ---------------------------------------------------------------------------------------------
// md5
// ---------------------------------------------------------------------------------------------

/// "md5" + hex(md5(password + user)), the form PostgreSQL stores.
pub fn md5_hash(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex_lower(&h.finalize()))
}

/// What a client must answer to AuthenticationMD5Password(salt):
/// "md5" + hex(md5(hex_of_md5_hash_without_prefix + salt)).
///
/// Returns `None` for a SCRAM secret (the md5 hash cannot be derived from it) and for a
/// hand-built `Secret::Md5` that is not a well-formed hash.
pub fn md5_response(user: &str, secret: &Secret, salt: [u8; 4]) -> Option<String> {
    let inner = match secret {
        Secret::Plain(p) => md5_hash(user, p),
        Secret::Md5(h) if is_md5_hash(h) => h.to_ascii_lowercase(),
        Secret::Md5(_) | Secret::Scram(_) => return None,
    };
    let hex = inner.get(3..)?;
    let mut h = Md5::new();
    h.update(hex.as_bytes());
    h.update(salt);
    Some(format!("md5{}", hex_lower(&h.finalize())))
}

/// Server side check of a client's md5 answer (constant-time compare).
///
/// `client_response` is the PasswordMessage payload; one trailing NUL terminator is tolerated so
/// callers may pass the raw payload. An empty plaintext password never verifies: PostgreSQL
/// refuses empty passwords too, and in a userlist it is far more likely a mistake than intent.
pub fn md5_verify(user: &str, secret: &Secret, salt: [u8; 4], client_response: &[u8]) -> bool {
    if matches!(secret, Secret::Plain(p) if p.is_empty()) {
        return false;
    }
    let Some(expected) = md5_response(user, secret, salt) else {
        return false;
    };
    let resp = client_response.strip_suffix(&[0u8]).unwrap_or(client_response);
    ct_eq(expected.as_bytes(), resp)
}

// ---------------------------------------------------------------------------------------------
// SCRAM message parsing (public so fuzz targets can reach them directly)
// ---------------------------------------------------------------------------------------------

/// The gs2-cbind-flag of a client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBindingFlag {
    /// "n": the client does not support channel binding.
    None,
    /// "y": the client supports it but believes the server does not.
    ClientSupports,
    /// "p=<cb-name>": the client requires channel binding of that type.
    Required(String),
}

/// A parsed client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst<'a> {
    pub cbind_flag: ChannelBindingFlag,
    /// The gs2-header exactly as sent ("n,," etc.): the client echoes it back, base64-encoded, in
    /// the `c=` attribute of its final message.
    pub gs2_header: &'a str,
    /// client-first-message-bare, which is part of the AuthMessage.
    pub bare: &'a str,
    /// The user name as sent (still saslname-escaped). PostgreSQL ignores it in favour of the
    /// startup packet's user, and so do we.
    pub user: &'a str,
    pub nonce: &'a str,
}

/// Parses a client-first-message (the data of SASLInitialResponse).
pub fn parse_client_first(msg: &[u8]) -> Result<ClientFirst<'_>, AuthError> {
    let s = message_str(msg)?;
    let (flag, rest) = s.split_once(',').ok_or(AuthError::Malformed("missing GS2 header"))?;
    let cbind_flag = match flag {
        "n" => ChannelBindingFlag::None,
        "y" => ChannelBindingFlag::ClientSupports,
        _ => match flag.strip_prefix("p=") {
            Some(name)
                if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') =>
            {
                ChannelBindingFlag::Required(name.to_string())
            }
            _ => return Err(AuthError::Malformed("bad channel binding flag")),
        },
    };
    let (authzid, bare) = rest.split_once(',').ok_or(AuthError::Malformed("missing GS2 header"))?;
    if !authzid.is_empty() {
        if authzid.starts_with("a=") {
            return Err(AuthError::Unsupported("authorization identity (a=)"));
        }
        return Err(AuthError::Malformed("bad authzid in GS2 header"));
    }
    // flag + ',' + authzid(empty) + ','
    let header_len = flag.len().saturating_add(2);
    let gs2_header = s.get(..header_len).ok_or(AuthError::Malformed("missing GS2 header"))?;

    let mut parts = bare.split(',');
    let first = parts.next().ok_or(AuthError::Malformed("missing user name"))?;
    let (k, user) = split_attr(first)?;
    match k {
        b'n' => {}
        b'm' => return Err(AuthError::Unsupported("SCRAM mandatory extension (m=)")),
        _ => return Err(AuthError::Malformed("expected n= attribute")),
    }
    check_saslname(user)?;
    let second = parts.next().ok_or(AuthError::Malformed("missing nonce"))?;
    let (k, nonce) = split_attr(second)?;
    if k != b'r' {
        return Err(AuthError::Malformed("expected r= attribute"));
    }
    if !is_printable_nonce(nonce) {
        return Err(AuthError::Malformed("nonce has non-printable characters"));
    }
    check_extensions(parts, b"nr")?;
    Ok(ClientFirst { cbind_flag, gs2_header, bare, user, nonce })
}

/// A parsed client-final-message.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientFinal<'a> {
    /// The decoded `c=` attribute: gs2-header plus channel binding data, if any.
    pub channel_binding: Vec<u8>,
    pub nonce: &'a str,
    /// client-final-message-without-proof, which is part of the AuthMessage.
    pub without_proof: &'a str,
    pub proof: [u8; 32],
}

/// The proof crosses the wire, but anyone holding it together with a leaked StoredKey recovers
/// the ClientKey, which is enough to log in by passthrough; so it stays out of logs.
impl fmt::Debug for ClientFinal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientFinal")
            .field("channel_binding", &self.channel_binding)
            .field("nonce", &self.nonce)
            .field("proof", &"<redacted>")
            .finish()
    }
}

/// Parses a client-final-message.
pub fn parse_client_final(msg: &[u8]) -> Result<ClientFinal<'_>, AuthError> {
    let s = message_str(msg)?;
    // The proof is defined to be the last attribute; base64 and nonces cannot contain ',', so the
    // last comma separates it from the part covered by the signature.
    let (without_proof, proof_attr) = s.rsplit_once(',').ok_or(AuthError::Malformed("missing proof"))?;
    let (k, proof) = split_attr(proof_attr)?;
    if k != b'p' {
        return Err(AuthError::Malformed("proof must be the last attribute"));
    }
    let proof = b64_decode_key(proof, "bad proof encoding")?;

    let mut parts = without_proof.split(',');
    let (k, cb) = split_attr(parts.next().unwrap_or(""))?;
    if k != b'c' {
        return Err(AuthError::Malformed("expected c= attribute"));
    }
    let channel_binding = b64_decode(cb, "bad channel binding encoding")?;
    let (k, nonce) = split_attr(parts.next().ok_or(AuthError::Malformed("missing nonce"))?)?;
    if k != b'r' {
        return Err(AuthError::Malformed("expected r= attribute"));
    }
    if !is_printable_nonce(nonce) {
        return Err(AuthError::Malformed("nonce has non-printable characters"));
    }
    check_extensions(parts, b"crp")?;
    Ok(ClientFinal { channel_binding, nonce, without_proof, proof })
}

/// A parsed server-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFirst<'a> {
    pub nonce: &'a str,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// Parses a server-first-message (AuthenticationSASLContinue data).
pub fn parse_server_first(msg: &[u8]) -> Result<ServerFirst<'_>, AuthError> {
    let s = message_str(msg)?;
    let mut parts = s.split(',');
    let (k, nonce) = split_attr(parts.next().unwrap_or(""))?;
    match k {
        b'r' => {}
        b'm' => return Err(AuthError::Unsupported("SCRAM mandatory extension (m=)")),
        _ => return Err(AuthError::Malformed("expected r= attribute")),
    }
    if !is_printable_nonce(nonce) {
        return Err(AuthError::Malformed("nonce has non-printable characters"));
    }
    let (k, salt) = split_attr(parts.next().ok_or(AuthError::Malformed("missing salt"))?)?;
    if k != b's' {
        return Err(AuthError::Malformed("expected s= attribute"));
    }
    let salt = b64_decode(salt, "bad salt encoding")?;
    if salt.is_empty() {
        return Err(AuthError::Malformed("empty salt"));
    }
    let (k, iter) = split_attr(parts.next().ok_or(AuthError::Malformed("missing iteration count"))?)?;
    if k != b'i' {
        return Err(AuthError::Malformed("expected i= attribute"));
    }
    let iterations = parse_iterations(iter)?;
    check_extensions(parts, b"rsi")?;
    Ok(ServerFirst { nonce, salt, iterations })
}

/// A parsed server-final-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFinal {
    Verifier([u8; 32]),
    Error(String),
}

/// Parses a server-final-message (AuthenticationSASLFinal data).
pub fn parse_server_final(msg: &[u8]) -> Result<ServerFinal, AuthError> {
    let s = message_str(msg)?;
    let mut parts = s.split(',');
    let (k, value) = split_attr(parts.next().unwrap_or(""))?;
    let out = match k {
        b'v' => ServerFinal::Verifier(b64_decode_key(value, "bad server signature encoding")?),
        b'e' => {
            if value.is_empty() {
                return Err(AuthError::Malformed("empty server error"));
            }
            ServerFinal::Error(sanitize_server_text(value))
        }
        b'm' => return Err(AuthError::Unsupported("SCRAM mandatory extension (m=)")),
        _ => return Err(AuthError::Malformed("expected v= or e= attribute")),
    };
    check_extensions(parts, b"ve")?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// SCRAM server (pgrelay authenticating a client)
// ---------------------------------------------------------------------------------------------

enum ServerState {
    Initial,
    SentFirst {
        client_first_bare: String,
        server_first: String,
        combined_nonce: String,
        /// What the client must echo in `c=`: the gs2-header, plus channel binding data once
        /// SCRAM-SHA-256-PLUS exists.
        cbind_input: Vec<u8>,
    },
    Done {
        client_key: [u8; KEY_LEN],
    },
    Failed,
}

impl ServerState {
    fn name(&self) -> &'static str {
        match self {
            ServerState::Initial => "Initial",
            ServerState::SentFirst { .. } => "SentFirst",
            ServerState::Done { .. } => "Done",
            ServerState::Failed => "Failed",
        }
    }
}

/// Server side of SCRAM-SHA-256 (pgrelay authenticating a client).
///
/// `channel_binding` holds the tls-server-end-point data of the connection's certificate; only
/// then is SCRAM-SHA-256-PLUS advertised. While it is `None`, accepting "y,," is correct (RFC 5802
/// §6: "y" is only a downgrade signal if the server did advertise channel binding).
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    channel_binding: Option<Vec<u8>>,
    state: ServerState,
}

impl ScramServer {
    /// From a Plain secret compute a verifier with a random 16-byte salt and 4096 iterations;
    /// from a Scram secret use it. Md5 secrets cannot do SCRAM: return Err.
    ///
    /// Only a Scram secret that matches PostgreSQL's stored verifier makes `client_key()` useful
    /// for passthrough: with a Plain secret the salt is fresh each time, so the recovered key only
    /// fits this exchange (but then pgrelay knows the password anyway).
    pub fn new(secret: &Secret) -> Result<ScramServer, AuthError> {
        let nonce = B64.encode(random_bytes(SERVER_NONCE_RAW_LEN));
        Self::build(secret, nonce)
    }

    /// Like `new` but with a caller-chosen server nonce, for known-answer tests and replaying
    /// fuzz cases. A predictable nonce allows replay attacks: never use this on a live
    /// connection.
    pub fn with_nonce(secret: &Secret, server_nonce: &str) -> Result<ScramServer, AuthError> {
        if !is_printable_nonce(server_nonce) {
            return Err(AuthError::Malformed("nonce has non-printable characters"));
        }
        Self::build(secret, server_nonce.to_string())
    }

    /// A server for a user that does not exist. It runs the exchange normally and fails at the
    /// proof, so clients cannot probe which user names exist. The salt is derived from
    /// `instance_secret` and the user name so it stays the same across attempts, as a real
    /// user's would; `instance_secret` should be random per pgrelay process or installation.
    pub fn mock(user: &str, instance_secret: &[u8]) -> ScramServer {
        let mac = hmac_sha256(instance_secret, &[b"pgrelay mock salt", user.as_bytes()]);
        let mut stored_key = [0u8; KEY_LEN];
        let mut server_key = [0u8; KEY_LEN];
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        ScramServer {
            verifier: ScramVerifier {
                iterations: DEFAULT_ITERATIONS,
                salt: mac.get(..SERVER_SALT_LEN).unwrap_or(&mac).to_vec(),
                stored_key,
                server_key,
            },
            server_nonce: B64.encode(random_bytes(SERVER_NONCE_RAW_LEN)),
            channel_binding: None,
            state: ServerState::Initial,
        }
    }

    fn build(secret: &Secret, server_nonce: String) -> Result<ScramServer, AuthError> {
        let verifier = match secret {
            Secret::Plain(p) if p.is_empty() => {
                return Err(AuthError::Unsupported("empty password"));
            }
            Secret::Plain(p) => ScramVerifier::from_password(p, &random_bytes(SERVER_SALT_LEN), DEFAULT_ITERATIONS),
            Secret::Scram(v) if v.is_usable() => v.clone(),
            Secret::Scram(_) => return Err(AuthError::BadIterations),
            Secret::Md5(_) => return Err(AuthError::Unsupported("SCRAM authentication with an md5-hashed password")),
        };
        Ok(ScramServer { verifier, server_nonce, channel_binding: None, state: ServerState::Initial })
    }

    /// Offers SCRAM-SHA-256-PLUS bound to `end_point`, the tls-server-end-point data of the
    /// certificate the client's TLS connection used.
    pub fn with_channel_binding(mut self, end_point: &[u8]) -> ScramServer {
        self.channel_binding = Some(end_point.to_vec());
        self
    }

    /// The mechanisms to advertise in AuthenticationSASL, preferred first.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.channel_binding.is_some() {
            &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            &[SCRAM_SHA_256]
        }
    }

    /// client-first-message (the SASLInitialResponse data) -> server-first-message bytes, for a
    /// client that selected SCRAM-SHA-256.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        self.client_first_with(SCRAM_SHA_256, msg)
    }

    /// Like `client_first` for the mechanism the client selected. The GS2 flag must agree with it:
    /// "p=tls-server-end-point" exactly with SCRAM-SHA-256-PLUS, "n"/"y" only with SCRAM-SHA-256.
    pub fn client_first_with(&mut self, mechanism: &str, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ServerState::Initial) {
            self.state = ServerState::Failed;
            return Err(AuthError::State("client-first-message sent twice"));
        }
        // Any failure ends the exchange: a retry must start a new one.
        self.state = ServerState::Failed;
        let plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if self.channel_binding.is_some() => true,
            _ => return Err(AuthError::Unsupported("SASL mechanism not offered")),
        };
        let cf = parse_client_first(msg)?;
        let mut cbind_input = cf.gs2_header.as_bytes().to_vec();
        match (&cf.cbind_flag, plus) {
            (ChannelBindingFlag::None, false) => {}
            (ChannelBindingFlag::ClientSupports, false) => {
                if self.channel_binding.is_some() {
                    return Err(AuthError::Unsupported(
                        "client claims the server lacks channel binding, but it offers it \
                         (possible downgrade attack)",
                    ));
                }
            }
            (ChannelBindingFlag::Required(name), true) => {
                if name != TLS_SERVER_END_POINT {
                    return Err(AuthError::Unsupported("channel binding type (only tls-server-end-point)"));
                }
                cbind_input.extend_from_slice(self.channel_binding.as_deref().unwrap_or_default());
            }
            (ChannelBindingFlag::Required(_), false) => {
                return Err(AuthError::Unsupported("channel binding requested but SCRAM-SHA-256 selected"));
            }
            (_, true) => {
                return Err(AuthError::Malformed("SCRAM-SHA-256-PLUS selected without channel binding"));
            }
        }
        let combined_nonce = format!("{}{}", cf.nonce, self.server_nonce);
        let server_first =
            format!("r={},s={},i={}", combined_nonce, B64.encode(&self.verifier.salt), self.verifier.iterations);
        let out = server_first.clone().into_bytes();
        self.state = ServerState::SentFirst {
            client_first_bare: cf.bare.to_string(),
            server_first,
            combined_nonce,
            cbind_input,
        };
        Ok(out)
    }

    /// client-final-message -> server-final-message bytes ("v=..."), after verifying the proof in
    /// constant time.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let state = std::mem::replace(&mut self.state, ServerState::Failed);
        let ServerState::SentFirst { client_first_bare, server_first, combined_nonce, cbind_input } = state else {
            return Err(AuthError::State("client-final-message before client-first"));
        };
        let cf = parse_client_final(msg)?;
        if !ct_eq(&cf.channel_binding, &cbind_input) {
            return Err(AuthError::ChannelBindingMismatch);
        }
        if cf.nonce != combined_nonce {
            return Err(AuthError::NonceMismatch);
        }
        let auth_message =
            [client_first_bare.as_bytes(), b",", server_first.as_bytes(), b",", cf.without_proof.as_bytes()];
        let client_signature = hmac_sha256(&self.verifier.stored_key, &auth_message);
        let client_key = xor32(&cf.proof, &client_signature);
        if !ct_eq(&sha256(&client_key), &self.verifier.stored_key) {
            return Err(AuthError::BadProof);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, &auth_message);
        self.state = ServerState::Done { client_key };
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }

    /// After a successful client_final: the ClientKey recovered from the proof (ClientProof XOR
    /// ClientSignature), so pgrelay can log in to PostgreSQL with SCRAM without knowing the
    /// plaintext password.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        match self.state {
            ServerState::Done { client_key } => Some(client_key),
            _ => None,
        }
    }

    /// The ServerKey of the verifier in use, which together with `client_key()` forms the
    /// `ScramCredential::Keys` for passthrough.
    pub fn server_key(&self) -> [u8; 32] {
        self.verifier.server_key
    }

    /// True once the client proved knowledge of the password.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, ServerState::Done { .. })
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer")
            .field("verifier", &self.verifier)
            .field("channel_binding", &self.channel_binding.is_some())
            .field("state", &self.state.name())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// SCRAM client (pgrelay logging in to PostgreSQL)
// ---------------------------------------------------------------------------------------------

/// What pgrelay knows about a server-side user.
///
/// `Keys` is the passthrough case: the keys recovered from a client's SCRAM login (ClientKey)
/// and the matching verifier (ServerKey) are enough to log in, but only to a server whose
/// verifier has the same salt and iteration count.
#[derive(Clone)]
pub enum ScramCredential {
    Password(String),
    Keys { client_key: [u8; 32], server_key: [u8; 32] },
}

impl fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScramCredential::Password(_) => f.write_str("Password(<redacted>)"),
            ScramCredential::Keys { .. } => f.write_str("Keys(<redacted>)"),
        }
    }
}

enum ClientState {
    Initial,
    SentFinal { server_signature: [u8; KEY_LEN] },
    Done,
    Failed,
}

impl ClientState {
    fn name(&self) -> &'static str {
        match self {
            ClientState::Initial => "Initial",
            ClientState::SentFinal { .. } => "SentFinal",
            ClientState::Done => "Done",
            ClientState::Failed => "Failed",
        }
    }
}

/// The channel binding pgrelay uses as a SCRAM client: the GS2 flag it sends and the data bound.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum ClientBinding {
    /// "n": no channel binding (not over TLS, or turned off).
    #[default]
    None,
    /// "y": pgrelay could bind but the server did not offer SCRAM-SHA-256-PLUS. A server that did
    /// offer it refuses this as a downgrade (RFC 5802 §6).
    NotOffered,
    /// "p=tls-server-end-point" with SCRAM-SHA-256-PLUS: bound to this hash of the server's certificate.
    EndPoint(Vec<u8>),
}

impl ClientBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ClientBinding::None => "n,,",
            ClientBinding::NotOffered => "y,,",
            ClientBinding::EndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn name(&self) -> &'static str {
        match self {
            ClientBinding::None => "None",
            ClientBinding::NotOffered => "NotOffered",
            ClientBinding::EndPoint(_) => "EndPoint",
        }
    }
}

impl fmt::Debug for ClientBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Client side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (pgrelay logging in to PostgreSQL).
///
/// With `Keys` credentials `server_first` uses the stored keys directly (ClientKey for the proof,
/// ServerKey for verifying), skipping PBKDF2; with `Password` it runs PBKDF2 with the server's
/// salt and iterations.
pub struct ScramClient {
    cred: ScramCredential,
    binding: ClientBinding,
    nonce: String,
    /// Escaped saslname; empty by default because PostgreSQL takes the user from the startup
    /// packet and ignores this one.
    user: String,
    state: ClientState,
}

impl ScramClient {
    /// Random 24-byte nonce, base64.
    pub fn new(cred: ScramCredential) -> ScramClient {
        ScramClient {
            cred,
            binding: ClientBinding::None,
            nonce: B64.encode(random_bytes(CLIENT_NONCE_RAW_LEN)),
            user: String::new(),
            state: ClientState::Initial,
        }
    }

    /// Like `new` with a caller-chosen nonce, for known-answer tests. A predictable client nonce
    /// weakens the exchange: never use this on a live connection.
    pub fn with_nonce(cred: ScramCredential, nonce: &str) -> Result<ScramClient, AuthError> {
        if !is_printable_nonce(nonce) {
            return Err(AuthError::Malformed("nonce has non-printable characters"));
        }
        Ok(ScramClient {
            cred,
            binding: ClientBinding::None,
            nonce: nonce.to_string(),
            user: String::new(),
            state: ClientState::Initial,
        })
    }

    /// Sets the user name sent in `n=`. PostgreSQL ignores it; this exists for servers and test
    /// vectors that do not.
    pub fn with_user(mut self, user: &str) -> ScramClient {
        self.user = escape_saslname(user);
        self
    }

    /// Sets the channel binding; call before `client_first`.
    pub fn with_binding(mut self, binding: ClientBinding) -> ScramClient {
        self.binding = binding;
        self
    }

    /// The SASL mechanism to name in SASLInitialResponse: SCRAM-SHA-256-PLUS when bound.
    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            ClientBinding::EndPoint(_) => SCRAM_SHA_256_PLUS,
            ClientBinding::None | ClientBinding::NotOffered => SCRAM_SHA_256,
        }
    }

    /// True when the exchange is bound to the TLS session (SCRAM-SHA-256-PLUS).
    pub fn is_bound(&self) -> bool {
        matches!(self.binding, ClientBinding::EndPoint(_))
    }

    fn client_first_bare(&self) -> String {
        format!("n={},r={}", self.user, self.nonce)
    }

    /// "<gs2-header>n=,r=<nonce>", e.g. "n,,n=,r=..." or "p=tls-server-end-point,,n=,r=...".
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare()).into_bytes()
    }

    /// server-first-message -> client-final-message. Checks the server nonce extends ours and the
    /// iteration count is sane (1..=10_000_000).
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ClientState::Initial) {
            self.state = ClientState::Failed;
            return Err(AuthError::State("server-first-message received twice"));
        }
        self.state = ClientState::Failed;
        let sf = parse_server_first(msg)?;
        // The server must append something of its own, or it could replay an old exchange.
        match sf.nonce.strip_prefix(self.nonce.as_str()) {
            Some(server_part) if !server_part.is_empty() => {}
            _ => return Err(AuthError::NonceMismatch),
        }
        let (client_key, server_key) = match &self.cred {
            ScramCredential::Password(p) => {
                let k = derive_keys(p, &sf.salt, sf.iterations);
                (k.client_key, k.server_key)
            }
            ScramCredential::Keys { client_key, server_key } => (*client_key, *server_key),
        };
        // c= is the GS2 header echoed, followed by the channel binding data when bound (RFC 5802 §7).
        let mut cbind_input = self.binding.gs2_header().as_bytes().to_vec();
        if let ClientBinding::EndPoint(data) = &self.binding {
            cbind_input.extend_from_slice(data);
        }
        let without_proof = format!("c={},r={}", B64.encode(&cbind_input), sf.nonce);
        // `msg` is the server-first-message verbatim: message_str already proved it is UTF-8.
        let server_first = std::str::from_utf8(msg).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let bare = self.client_first_bare();
        let auth_message = [bare.as_bytes(), b",", server_first.as_bytes(), b",", without_proof.as_bytes()];
        let stored_key = sha256(&client_key);
        let client_signature = hmac_sha256(&stored_key, &auth_message);
        let proof = xor32(&client_key, &client_signature);
        let server_signature = hmac_sha256(&server_key, &auth_message);
        self.state = ClientState::SentFinal { server_signature };
        Ok(format!("{},p={}", without_proof, B64.encode(proof)).into_bytes())
    }

    /// Verifies the ServerSignature (constant time); "e=..." becomes `ServerError` with that text.
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), AuthError> {
        let state = std::mem::replace(&mut self.state, ClientState::Failed);
        let ClientState::SentFinal { server_signature } = state else {
            return Err(AuthError::State("server-final-message before server-first"));
        };
        match parse_server_final(msg)? {
            ServerFinal::Error(e) => Err(AuthError::ServerError(e)),
            ServerFinal::Verifier(v) => {
                if ct_eq(&v, &server_signature) {
                    self.state = ClientState::Done;
                    Ok(())
                } else {
                    Err(AuthError::BadServerSignature)
                }
            }
        }
    }

    /// True once the server proved it knows the verifier.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, ClientState::Done)
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient")
            .field("cred", &self.cred)
            .field("binding", &self.binding)
            .field("state", &self.state.name())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const RFC_USER: &str = "user";
    const RFC_PASSWORD: &str = "pencil";
    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str =
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    /// The RFC 7677 credentials in PostgreSQL's rolpassword format, computed independently
    /// (Python hashlib/hmac) rather than with this module.
    const RFC_VERIFIER: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    fn rfc_verifier() -> ScramVerifier {
        ScramVerifier::from_password(RFC_PASSWORD, &B64.decode(RFC_SALT).unwrap(), 4096)
    }

    fn run_exchange(server: &mut ScramServer, client: &mut ScramClient) -> Result<(), AuthError> {
        let sf = server.client_first(&client.client_first())?;
        let cf = client.server_first(&sf)?;
        let sfin = server.client_final(&cf)?;
        client.server_final(&sfin)
    }

    #[test]
    fn rfc7677_server_side() {
        let secret = Secret::Scram(rfc_verifier());
        let mut server = ScramServer::with_nonce(&secret, RFC_SERVER_NONCE).unwrap();
        let sf = server.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(sf).unwrap(), RFC_SERVER_FIRST);
        let fin = server.client_final(RFC_CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), RFC_SERVER_FINAL);
        assert!(server.is_authenticated());
        // The recovered ClientKey must be the one PBKDF2 gives for the password.
        let keys = derive_keys(RFC_PASSWORD, &B64.decode(RFC_SALT).unwrap(), 4096);
        assert_eq!(server.client_key(), Some(keys.client_key));
    }

    #[test]
    fn rfc7677_client_side() {
        let cred = ScramCredential::Password(RFC_PASSWORD.into());
        let mut client = ScramClient::with_nonce(cred, RFC_CLIENT_NONCE).unwrap().with_user(RFC_USER);
        assert_eq!(client.client_first(), RFC_CLIENT_FIRST.as_bytes());
        let fin = client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), RFC_CLIENT_FINAL);
        client.server_final(RFC_SERVER_FINAL.as_bytes()).unwrap();
        assert!(client.is_authenticated());
    }

    #[test]
    fn rfc7677_client_side_with_keys() {
        let keys = derive_keys(RFC_PASSWORD, &B64.decode(RFC_SALT).unwrap(), 4096);
        let cred = ScramCredential::Keys { client_key: keys.client_key, server_key: keys.server_key };
        let mut client = ScramClient::with_nonce(cred, RFC_CLIENT_NONCE).unwrap().with_user(RFC_USER);
        let fin = client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fin).unwrap(), RFC_CLIENT_FINAL);
        client.server_final(RFC_SERVER_FINAL.as_bytes()).unwrap();
    }

    #[test]
    fn verifier_string_round_trip() {
        let v = ScramVerifier::parse(RFC_VERIFIER).unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt, B64.decode(RFC_SALT).unwrap());
        assert_eq!(v.to_string(), RFC_VERIFIER);
        assert_eq!(v, rfc_verifier());
        assert_eq!(Secret::parse(RFC_VERIFIER), Secret::Scram(v.clone()));
        let dbg = format!("{:?}", Secret::Scram(v));
        assert!(!dbg.contains("WG5d8"), "{dbg}");
        assert!(!dbg.contains("wfPLw"), "{dbg}");

        for bad in [
            "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$4096:$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4q=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=",
            "SCRAM-SHA-256$+4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
        ] {
            assert!(ScramVerifier::parse(bad).is_none(), "{bad}");
            assert!(matches!(Secret::parse(bad), Secret::Plain(_)));
        }
    }

    #[test]
    fn round_trip_password() {
        let secret = Secret::Plain("correct horse".into());
        let mut server = ScramServer::new(&secret).unwrap();
        let mut client = ScramClient::new(ScramCredential::Password("correct horse".into()));
        run_exchange(&mut server, &mut client).unwrap();
        assert!(server.is_authenticated() && client.is_authenticated());
    }

    #[test]
    fn round_trip_passthrough_keys() {
        // The verifier both pgrelay and PostgreSQL hold for the user.
        let verifier = ScramVerifier::from_password("s3cret", b"0123456789abcdef", 4096);
        let secret = Secret::Scram(verifier.clone());

        // 1. A client logs in to pgrelay with its password.
        let mut front = ScramServer::new(&secret).unwrap();
        let mut app = ScramClient::new(ScramCredential::Password("s3cret".into()));
        run_exchange(&mut front, &mut app).unwrap();
        let client_key = front.client_key().unwrap();
        assert_eq!(front.server_key(), verifier.server_key);

        // 2. pgrelay logs in to "PostgreSQL" with the recovered keys, never seeing the password.
        let mut backend = ScramServer::new(&secret).unwrap();
        let mut relay = ScramClient::new(ScramCredential::Keys { client_key, server_key: verifier.server_key });
        run_exchange(&mut backend, &mut relay).unwrap();
        assert!(backend.is_authenticated() && relay.is_authenticated());
    }

    #[test]
    fn wrong_password_rejected() {
        let secret = Secret::Scram(rfc_verifier());
        let mut server = ScramServer::new(&secret).unwrap();
        let mut client = ScramClient::new(ScramCredential::Password("pencil2".into()));
        let sf = server.client_first(&client.client_first()).unwrap();
        let cf = client.server_first(&sf).unwrap();
        assert!(matches!(server.client_final(&cf), Err(AuthError::BadProof)));
        assert_eq!(server.client_key(), None);
        // A failed exchange stays failed.
        assert!(server.client_final(&cf).is_err());
    }

    #[test]
    fn client_rejects_wrong_server_signature_and_errors() {
        let mut client = ScramClient::with_nonce(ScramCredential::Password(RFC_PASSWORD.into()), RFC_CLIENT_NONCE)
            .unwrap()
            .with_user(RFC_USER);
        client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        let bad = format!("v={}", B64.encode([7u8; 32]));
        assert!(matches!(client.server_final(bad.as_bytes()), Err(AuthError::BadServerSignature)));

        let mut client =
            ScramClient::with_nonce(ScramCredential::Password(RFC_PASSWORD.into()), RFC_CLIENT_NONCE).unwrap();
        client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        match client.server_final(b"e=invalid-proof") {
            Err(AuthError::ServerError(e)) => assert_eq!(e, "invalid-proof"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mock_server_always_fails() {
        let mut a = ScramServer::mock("ghost", b"instance");
        let b = ScramServer::mock("ghost", b"instance");
        assert_eq!(a.verifier.salt, b.verifier.salt);
        let mut client = ScramClient::new(ScramCredential::Password("x".into()));
        let sf = a.client_first(&client.client_first()).unwrap();
        let cf = client.server_first(&sf).unwrap();
        assert!(matches!(a.client_final(&cf), Err(AuthError::BadProof)));
    }

    #[test]
    fn server_gs2_header_handling() {
        let secret = Secret::Scram(rfc_verifier());
        let new = || ScramServer::with_nonce(&secret, RFC_SERVER_NONCE).unwrap();

        // "y,," is accepted and must be echoed as "eSws".
        let mut s = new();
        s.client_first(b"y,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        let mut s2 = new();
        s2.client_first(b"y,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        // "biws" does not match a "y,," header.
        assert!(matches!(s2.client_final(RFC_CLIENT_FINAL.as_bytes()), Err(AuthError::ChannelBindingMismatch)));
        // With "eSws" the channel binding check passes and the proof (computed for "biws") fails.
        let e_sws = RFC_CLIENT_FINAL.replace("c=biws", "c=eSws");
        assert!(matches!(s.client_final(e_sws.as_bytes()), Err(AuthError::BadProof)));

        for (msg, want_unsupported) in [
            (&b"p=tls-server-end-point,,n=,r=abc"[..], true),
            (b"n,a=admin,n=,r=abc", true),
            (b"n,,m=ext,n=,r=abc", true),
            (b"q,,n=,r=abc", false),
            (b"n,,n=,r=", false),
            (b"n,,n=,r=a\x01b", false),
            (b"n,,r=abc", false),
            (b"n,,n=,", false),
            (b"n,,n=a=2Xb,r=abc", false),
            (b"n,,n=,r=abc,r=def", false),
            (b"n,,n=,r=abc,x=1,x=2", false),
            (b"n,,n=,r=abc,m=1", true),
            (b"n,,n=,r=ab\x00c", false),
            (b"n,n=,r=abc", false),
        ] {
            let r = new().client_first(msg);
            match r {
                Err(AuthError::Unsupported(_)) => assert!(want_unsupported, "{msg:?}"),
                Err(_) => assert!(!want_unsupported, "{msg:?}"),
                Ok(_) => panic!("accepted {:?}", String::from_utf8_lossy(msg)),
            }
        }
        let big = vec![b'a'; MAX_MESSAGE_LEN + 1];
        assert!(matches!(new().client_first(&big), Err(AuthError::TooLong(_))));
        // Extensions that are well-formed are ignored.
        new().client_first(b"n,,n=a=2Cb,r=abc,x=whatever").unwrap();
    }

    type ErrCheck = fn(&AuthError) -> bool;

    #[test]
    fn server_rejects_bad_client_final() {
        let secret = Secret::Scram(rfc_verifier());
        let cases: &[(&str, ErrCheck)] = &[
            (
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k1,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                |e| matches!(e, AuthError::NonceMismatch),
            ),
            (
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0X,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                |e| matches!(e, AuthError::NonceMismatch),
            ),
            (
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ",
                |e| matches!(e, AuthError::Malformed(_)),
            ),
            (
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
                |e| matches!(e, AuthError::Malformed(_)),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,c=biws,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                |e| matches!(e, AuthError::Malformed(_)),
            ),
            (
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,c=biws,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                |e| matches!(e, AuthError::Malformed(_)),
            ),
            (
                "c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                |e| matches!(e, AuthError::ChannelBindingMismatch),
            ),
        ];
        for (msg, ok) in cases {
            let mut s = ScramServer::with_nonce(&secret, RFC_SERVER_NONCE).unwrap();
            s.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
            let e = s.client_final(msg.as_bytes()).unwrap_err();
            assert!(ok(&e), "{msg}: {e:?}");
        }
        // Out of order.
        let mut s = ScramServer::with_nonce(&secret, RFC_SERVER_NONCE).unwrap();
        assert!(matches!(s.client_final(RFC_CLIENT_FINAL.as_bytes()), Err(AuthError::State(_))));
    }

    /// SCRAM-SHA-256-PLUS from the client side: the server accepts the binding only when both hold the same
    /// tls-server-end-point data, and "y" is refused by a server that offered PLUS.
    #[test]
    fn client_channel_binding() {
        let secret = Secret::Scram(rfc_verifier());
        let end_point = vec![0xabu8; 32];
        let plus_server = || ScramServer::new(&secret).unwrap().with_channel_binding(&end_point);
        let client =
            |b: ClientBinding| ScramClient::new(ScramCredential::Password(RFC_PASSWORD.into())).with_binding(b);
        let exchange = |server: &mut ScramServer, c: &mut ScramClient| -> Result<(), AuthError> {
            let sf = server.client_first_with(c.mechanism(), &c.client_first())?;
            let cf = c.server_first(&sf)?;
            let sfin = server.client_final(&cf)?;
            c.server_final(&sfin)
        };

        let mut c = client(ClientBinding::EndPoint(end_point.clone()));
        assert_eq!(c.mechanism(), SCRAM_SHA_256_PLUS);
        assert!(c.client_first().starts_with(b"p=tls-server-end-point,,n=,r="));
        exchange(&mut plus_server(), &mut c).unwrap();
        assert!(c.is_authenticated() && c.is_bound());

        // A different certificate (a man in the middle terminating TLS) fails the binding check.
        let mut c = client(ClientBinding::EndPoint(vec![0xcd; 32]));
        assert!(matches!(exchange(&mut plus_server(), &mut c), Err(AuthError::ChannelBindingMismatch)));

        // "y" is a downgrade signal to a server that offered PLUS, and fine for one that did not.
        let mut c = client(ClientBinding::NotOffered);
        assert_eq!(c.mechanism(), SCRAM_SHA_256);
        assert!(matches!(exchange(&mut plus_server(), &mut c), Err(AuthError::Unsupported(_))));
        let mut c = client(ClientBinding::NotOffered);
        exchange(&mut ScramServer::new(&secret).unwrap(), &mut c).unwrap();
        assert!(c.is_authenticated() && !c.is_bound());

        // Passthrough keys bind the same way.
        let keys = derive_keys(RFC_PASSWORD, &B64.decode(RFC_SALT).unwrap(), 4096);
        let mut c =
            ScramClient::new(ScramCredential::Keys { client_key: keys.client_key, server_key: keys.server_key })
                .with_binding(ClientBinding::EndPoint(end_point.clone()));
        exchange(&mut plus_server(), &mut c).unwrap();
    }

    #[test]
    fn client_rejects_bad_server_first() {
        let cases: &[&str] = &[
            // Nonce does not extend ours.
            "r=XXprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            // Server added nothing.
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=10000001",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999999999999",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ=,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,i=4096",
            "m=x,r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,s=AAAA",
            "r=rOprNGfwEbeRWgbNEkqO\u{7f}abc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "",
        ];
        for msg in cases {
            let mut c = ScramClient::with_nonce(
                ScramCredential::Keys { client_key: [1; 32], server_key: [2; 32] },
                RFC_CLIENT_NONCE,
            )
            .unwrap();
            assert!(c.server_first(msg.as_bytes()).is_err(), "{msg}");
            // The exchange cannot continue after a failure.
            assert!(c.server_final(RFC_SERVER_FINAL.as_bytes()).is_err());
        }
    }

    #[test]
    fn md5_known_values() {
        let expected = format!("md5{:x}", Md5::digest(b"secretpostgres"));
        assert_eq!(md5_hash("postgres", "secret"), expected);
        // Same value computed with Python's hashlib.
        assert_eq!(expected, "md553f48b7c4b76a86ce72276c5755f217d");

        let salt = [0x01, 0x02, 0x03, 0x04];
        let inner = format!("{:x}", Md5::digest(b"secretpostgres"));
        let mut h = Md5::new();
        h.update(inner.as_bytes());
        h.update(salt);
        let want = format!("md5{:x}", h.finalize());

        let plain = Secret::Plain("secret".into());
        let hashed = Secret::parse(&md5_hash("postgres", "secret"));
        assert!(matches!(hashed, Secret::Md5(_)));
        assert_eq!(md5_response("postgres", &plain, salt).unwrap(), want);
        assert_eq!(md5_response("postgres", &hashed, salt).unwrap(), want);
        // Uppercase hex in the stored hash still yields what a client computes.
        let upper = Secret::Md5(md5_hash("postgres", "secret").to_uppercase().replacen("MD5", "md5", 1));
        assert_eq!(md5_response("postgres", &upper, salt).unwrap(), want);

        for s in [&plain, &hashed] {
            assert!(md5_verify("postgres", s, salt, want.as_bytes()));
            let mut nul = want.clone().into_bytes();
            nul.push(0);
            assert!(md5_verify("postgres", s, salt, &nul));
            assert!(!md5_verify("postgres", s, [0; 4], want.as_bytes()));
            assert!(!md5_verify("postgres", s, salt, b""));
        }
        // A plaintext secret is salted with the user name; a stored hash already is.
        assert!(!md5_verify("other", &plain, salt, want.as_bytes()));
        let scram = Secret::Scram(rfc_verifier());
        assert_eq!(md5_response("postgres", &scram, salt), None);
        assert!(!md5_verify("postgres", &scram, salt, want.as_bytes()));
        assert!(!md5_verify("u", &Secret::Plain(String::new()), salt, b"md5"));
        assert!(ScramServer::new(&hashed).is_err());
    }

    #[test]
    fn userlist_parsing() {
        let md5 = md5_hash("bob", "pw");
        let text = format!(
            "; comment\n\
             # another\n\
             \n   \n\
             \"alice\" \"plain pass\"\n\
             \"bob\"\t\"{md5}\" \"ignored extra\"\n\
             \"carol\" \"{RFC_VERIFIER}\"\n\
             \"quo\"\"te\" \"pa\"\"ss\"\r\n\
             \"dave\" \"\"\n"
        );
        let ul = Userlist::parse(&text).unwrap();
        assert_eq!(ul.len(), 5);
        assert!(!ul.is_empty());
        assert_eq!(ul.get("alice"), Some(&Secret::Plain("plain pass".into())));
        assert_eq!(ul.get("bob"), Some(&Secret::Md5(md5)));
        assert!(matches!(ul.get("carol"), Some(Secret::Scram(v)) if v.iterations == 4096));
        assert_eq!(ul.get("quo\"te"), Some(&Secret::Plain("pa\"ss".into())));
        assert_eq!(ul.get("dave"), Some(&Secret::Plain(String::new())));
        assert_eq!(ul.get("eve"), None);
        let dbg = format!("{ul:?}");
        assert!(!dbg.contains("plain pass") && dbg.contains("alice"), "{dbg}");

        assert!(Userlist::parse("").unwrap().is_empty());

        for (text, line) in [
            ("\"a\" \"b\"\nbob \"x\"\n", 2),
            ("\"a\" \"b\"\n\n\"bob\" \"unterminated\n", 3),
            ("\"bob\"\n", 1),
            ("; c\n\"bob\"\"x\"\n", 2),
            ("\"bob\"x \"y\"\n", 1),
            ("\"\" \"y\"\n", 1),
            ("\"a\" \"b\"\n\"c\" d\n", 2),
        ] {
            match Userlist::parse(text) {
                Err(AuthError::Userlist { line: l, reason }) => {
                    assert_eq!(l, line, "{text:?}: {reason}");
                    let msg = AuthError::Userlist { line: l, reason }.to_string();
                    assert!(msg.contains(&format!("line {line}")), "{msg}");
                    assert!(!msg.contains("unterminated\n"));
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn debug_output_is_redacted() {
        let s = format!(
            "{:?} {:?} {:?} {:?}",
            Secret::Plain("hunter2".into()),
            Secret::Md5(md5_hash("u", "hunter2")),
            ScramCredential::Password("hunter2".into()),
            ScramClient::new(ScramCredential::Password("hunter2".into())),
        );
        assert!(!s.contains("hunter2") && !s.contains(&md5_hash("u", "hunter2")), "{s}");
        let server = ScramServer::new(&Secret::Plain("hunter2".into())).unwrap();
        assert!(!format!("{server:?}").contains("hunter2"));
    }

    const PUNCT: &[u8] = b",=0nrpcvesim\x00\xff";

    fn mutate(rng: &mut impl Rng, input: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..6) {
                0 if !v.is_empty() => {
                    let at = rng.gen_range(0..v.len());
                    v.truncate(at);
                }
                1 if !v.is_empty() => {
                    let at = rng.gen_range(0..v.len());
                    v[at] = rng.gen();
                }
                2 => {
                    let at = rng.gen_range(0..=v.len());
                    let b = PUNCT[rng.gen_range(0..PUNCT.len())];
                    v.insert(at, b);
                }
                3 if !v.is_empty() => {
                    let at = rng.gen_range(0..v.len());
                    v.remove(at);
                }
                4 if v.len() > 1 => {
                    let a = rng.gen_range(0..v.len());
                    let b = rng.gen_range(0..v.len());
                    v.swap(a, b);
                }
                _ => {
                    let at = rng.gen_range(0..=v.len());
                    let junk: Vec<u8> = (0..rng.gen_range(0..8)).map(|_| rng.gen()).collect();
                    v.splice(at..at, junk);
                }
            }
        }
        v
    }

    #[test]
    fn fuzz_parsers_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let verifier = rfc_verifier();
        let secret = Secret::Scram(verifier.clone());
        let keys = ScramCredential::Keys {
            client_key: derive_keys(RFC_PASSWORD, &verifier.salt, 4096).client_key,
            server_key: verifier.server_key,
        };
        let userlist = format!("\"a\" \"b\"\n\"c\"\"d\" \"{RFC_VERIFIER}\" x\n; c\n");
        let seeds: Vec<&[u8]> = vec![
            RFC_CLIENT_FIRST.as_bytes(),
            RFC_SERVER_FIRST.as_bytes(),
            RFC_CLIENT_FINAL.as_bytes(),
            RFC_SERVER_FINAL.as_bytes(),
            RFC_VERIFIER.as_bytes(),
            userlist.as_bytes(),
            b"e=invalid-proof",
            b"y,,n=,r=abc",
            b"p=tls-server-end-point,,n=,r=abc",
        ];
        for i in 0..6000 {
            let input: Vec<u8> = if i % 4 == 0 {
                let n = rng.gen_range(0..64);
                (0..n).map(|_| rng.gen()).collect()
            } else {
                let seed = seeds[rng.gen_range(0..seeds.len())];
                mutate(&mut rng, seed)
            };
            let text = String::from_utf8_lossy(&input);

            let _ = Secret::parse(&text);
            let _ = ScramVerifier::parse(&text);
            let _ = Userlist::parse(&text);
            let _ = parse_client_first(&input);
            let _ = parse_client_final(&input);
            let _ = parse_server_first(&input);
            let _ = parse_server_final(&input);
            let _ = md5_verify("u", &Secret::Plain("p".into()), [1, 2, 3, 4], &input);
            let _ = md5_response("u", &Secret::Md5(text.to_string()), [1, 2, 3, 4]);

            // Server: fuzz the first message, and the final one after a valid first.
            let mut s = ScramServer::with_nonce(&secret, RFC_SERVER_NONCE).unwrap();
            let _ = s.client_first(&input);
            let _ = s.client_final(&input);
            let mut s = ScramServer::with_nonce(&secret, RFC_SERVER_NONCE).unwrap();
            s.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
            if s.client_final(&input).is_ok() {
                assert_eq!(input, RFC_CLIENT_FINAL.as_bytes());
            }

            // Client: Keys credentials so mutated iteration counts cost nothing.
            let mut c = ScramClient::with_nonce(keys.clone(), RFC_CLIENT_NONCE).unwrap().with_user(RFC_USER);
            let _ = c.server_first(&input);
            let _ = c.server_final(&input);
            let mut c = ScramClient::with_nonce(keys.clone(), RFC_CLIENT_NONCE).unwrap().with_user(RFC_USER);
            c.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
            if c.server_final(&input).is_ok() {
                assert_eq!(input, RFC_SERVER_FINAL.as_bytes());
            }
        }
    }
}
