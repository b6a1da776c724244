//! Owns SQL text normalisation, the stable 64-bit query fingerprint and cheap statement classification.
//!
//! # Normal form
//!
//! The normaliser lexes the input once, left to right, and writes a canonical token stream:
//!
//! * Constants — `'..'` (with `''`), `E'..'` (with backslash escapes), `B'..'`, `X'..'`, `N'..'`,
//!   `U&'..'`, dollar-quoted `$tag$..$tag$`, numbers (integers, decimals, exponents, `0x`/`0o`/`0b`,
//!   `1_000`) and existing `$N` parameters — become `$1`, `$2`, ... numbered in order of
//!   appearance. Original parameter numbers are discarded, so `id = 5` and `id = $7` agree.
//! * A unary `-`/`+` directly before a number or parameter (i.e. where an operand is expected)
//!   is folded into the placeholder, so `= -5` and `= 5` agree.
//! * `IN (c, c, ...)` where every element is a constant collapses to `in ($k...)`, and
//!   `ARRAY[c, ...]` to `array[$k...]`: one placeholder number is consumed per collapsed list.
//! * `VALUES (c, ...), (c, ...), ...`: the first all-constant row is kept with one placeholder per
//!   column (the column count is part of the query's shape) and every following all-constant row
//!   is dropped, so single- and multi-row inserts agree.
//! * Comments (`--`, nested `/* */`) are removed, whitespace is folded, keywords and unquoted
//!   identifiers are ASCII-lower-cased, `"Quoted"` identifiers are kept verbatim, trailing
//!   semicolons are dropped.
//! * Spacing: tokens are separated by one space, except none after `(`/`[`, none before
//!   `)`/`]`/`,`/`;`, none around `.` and `::`, none between a function name (any word that is not
//!   one of a few clause keywords) and `(`, and none between an operand and `[`.
//!
//! Example: `SELECT  * FROM Users WHERE id IN (1, 2, 3) AND name = 'bob' -- x` becomes
//! `select * from users where id in ($1...) and name = $2`.
//!
//! The fingerprint is FNV-1a 64 over the bytes of the normal form, passed through the murmur3
//! `fmix64` finaliser so that every output bit is usable for sharding/bucketing (plain FNV-1a's low
//! bits only depend on the low bits of the input bytes). Both steps are fixed arithmetic, so values
//! are identical across runs, builds and platforms.
//!
//! Lexing is a single forward pass; the only re-reading is bounded lookahead over a candidate
//! constant list (stopping at its first non-constant token) and a one-token peek after a sign,
//! so total work stays linear in the input length.

/// Kind of statement, for the `query_type` label of db_query_duration_seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueryType {
    Select,
    Insert,
    Update,
    Delete,
    Other,
}

impl QueryType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::Select => "select",
            QueryType::Insert => "insert",
            QueryType::Update => "update",
            QueryType::Delete => "delete",
            QueryType::Other => "other",
        }
    }
}

/// Cheap classification from the first keyword, skipping leading whitespace, comments (`--` and
/// nested `/* */`) and opening parentheses. For `WITH ...` the CTE list is skipped (tracking
/// parenthesis depth) and the first top-level verb decides, so `with d as (delete ...) select ...`
/// is a Select. `TABLE t` and `VALUES (...)` count as Select. Case-insensitive. No allocation.
pub fn query_type(sql: &str) -> QueryType {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        let t = next_token(sql, i);
        match t.kind {
            Tok::LParen => i = t.end,
            Tok::Word => {
                let w = &b[t.start..t.end];
                if w.eq_ignore_ascii_case(b"with") {
                    return main_verb_after_with(sql, t.end);
                }
                return verb(w).unwrap_or(QueryType::Other);
            }
            _ => return QueryType::Other,
        }
    }
}

fn verb(w: &[u8]) -> Option<QueryType> {
    if w.eq_ignore_ascii_case(b"select") || w.eq_ignore_ascii_case(b"values") || w.eq_ignore_ascii_case(b"table") {
        Some(QueryType::Select)
    } else if w.eq_ignore_ascii_case(b"insert") {
        Some(QueryType::Insert)
    } else if w.eq_ignore_ascii_case(b"update") {
        Some(QueryType::Update)
    } else if w.eq_ignore_ascii_case(b"delete") {
        Some(QueryType::Delete)
    } else {
        None
    }
}

fn main_verb_after_with(sql: &str, mut i: usize) -> QueryType {
    // CTE bodies sit inside parentheses, so the first verb at depth 0 is the main statement's.
    let b = sql.as_bytes();
    let mut depth = 0usize;
    loop {
        let t = next_token(sql, i);
        i = t.end;
        match t.kind {
            Tok::End => return QueryType::Other,
            Tok::LParen => depth += 1,
            Tok::RParen => depth = depth.saturating_sub(1),
            Tok::Word if depth == 0 => {
                if let Some(q) = verb(&b[t.start..t.end]) {
                    return q;
                }
            }
            _ => {}
        }
    }
}

/// Normalises `sql` into `out` (cleared first) and returns a stable 64-bit fingerprint of the
/// normalised form. One pass over the bytes, no allocation besides growing `out`.
pub fn normalize(sql: &str, out: &mut String) -> u64 {
    out.clear();
    // The normal form is rarely much longer than the input, so one up-front reservation
    // usually avoids repeated growth.
    out.reserve(sql.len());
    let mut sink = TextSink { out, hash: HashSink::new() };
    run(sql, &mut sink);
    fmix64(sink.hash.h)
}

/// A cheap key for caching fingerprints: texts with equal keys have equal fingerprints and equal `query_type`s.
///
/// The key hashes every byte except the digits of plain numbers and the contents of plain `'...'` strings, which the
/// normaliser turns into placeholders whatever they hold. So `... WHERE aid = 12345` and `... WHERE aid = 777` share
/// a key, and a text seen once with inline literals costs one pass over its bytes instead of a normalisation.
/// Texts the rule can't vouch for get `None` (the caller normalises them): comments, `$` outside an identifier
/// (dollar quotes), and prefixed strings (`E'..'`, `B'..'`, `X'..'`, `N'..'`, `U&'..'`). A digit run is only skipped
/// when no identifier character sits on either side of it and no `.` follows (so `0x1F`, `1_000`, `1e5`, `t1` are
/// hashed as written).
pub fn shape_key(sql: &str) -> Option<u64> {
    let b = sql.as_bytes();
    let n = b.len();
    let mut h: u64 = 0x5eed_0000;
    let mut i = 0;
    loop {
        // A run of bytes hashed as written, eight at a time.
        let seg = i;
        loop {
            if i + 8 <= n {
                let m = stop_candidates(u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes")));
                if m == 0 {
                    i += 8;
                    continue;
                }
                i += (m.trailing_zeros() / 8) as usize;
            } else if i >= n {
                break;
            }
            if !SHAPE_PLAIN[b[i] as usize] {
                break;
            }
            i += 1;
        }
        h = hash_segment(h, &b[seg..i]);
        if i >= n {
            break;
        }
        let c = b[i];
        let prev_ident = i > 0 && is_ident_cont(b[i - 1]);
        match c {
            b'0'..=b'9' => {
                let mut j = i + 1;
                while j < n && b[j].is_ascii_digit() {
                    j += 1;
                }
                let next = if j < n { b[j] } else { b' ' };
                h = if prev_ident || is_ident_cont(next) || next == b'.' {
                    hash_segment(h, &b[i..j])
                } else {
                    mix_byte(h, b'#')
                };
                i = j;
            }
            b'\'' => {
                if prev_ident || (i > 0 && b[i - 1] == b'&') {
                    return None;
                }
                let end = memchr::memchr(b'\'', &b[i + 1..])? + i + 1;
                h = mix_byte(h, b'\'');
                i = end + 1;
            }
            b'"' => {
                let end = memchr::memchr(b'"', &b[i + 1..])? + i + 1;
                h = hash_segment(mix_byte(h, b'"'), &b[i + 1..end]);
                i = end + 1;
            }
            b'-' | b'/' => {
                let next = if i + 1 < n { b[i + 1] } else { 0 };
                if (c == b'-' && next == b'-') || (c == b'/' && next == b'*') {
                    return None;
                }
                h = mix_byte(h, c);
                i += 1;
            }
            _ => return None, // `$`
        }
    }
    Some(fmix64(h))
}

/// Bytes `shape_key` hashes as written without a second look: everything but digits, quotes, `$`, `-` and `/`.
static SHAPE_PLAIN: [bool; 256] = {
    let mut t = [true; 256];
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] = false;
        d += 1;
    }
    t[b'\'' as usize] = false;
    t[b'"' as usize] = false;
    t[b'$' as usize] = false;
    t[b'-' as usize] = false;
    t[b'/' as usize] = false;
    t
};

/// The bytes of a little-endian word that might stop a plain run: a mask with the high bit set in every byte within
/// 0x22..=0x39, the range that holds every byte `SHAPE_PLAIN` rejects (along with a few plain ones such as `(` and
/// `,`). Zero means eight plain bytes at once. No byte can carry into its neighbour: the sums stay below 0x100.
#[inline]
fn stop_candidates(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let low = w & !HIGHS;
    let at_least = (low + ONES * (0x80 - 0x22)) & HIGHS;
    let below = !(low + ONES * (0x80 - 0x3a)) & HIGHS;
    at_least & below & !w
}

#[inline]
fn mix_byte(h: u64, c: u8) -> u64 {
    (h ^ u64::from(c) ^ 0x100).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(27)
}

/// Word-at-a-time hash of a byte run, continuing from `h` (also the text cache's hash of exact texts).
#[inline]
pub fn hash_segment(mut h: u64, seg: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunks = seg.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(31);
    }
    // The last 0-7 bytes as a zero-padded little-endian word, assembled in registers (a copy into a buffer is a
    // memcpy call).
    let tail = chunks.remainder().iter().rev().fold(0u64, |t, &b| (t << 8) | u64::from(b));
    // The length goes in too, so that segment boundaries (and zero bytes) are part of the key.
    (h ^ tail ^ ((seg.len() as u64) << 56)).wrapping_mul(K).rotate_left(29)
}

/// Fingerprint only (no text), same value as normalize() returns; must not allocate.
pub fn fingerprint(sql: &str) -> u64 {
    let mut sink = HashSink::new();
    run(sql, &mut sink);
    fmix64(sink.h)
}

// ---------------------------------------------------------------------------------------------
// Hashing sinks: the normaliser is generic over where the canonical bytes go, so fingerprint()
// and normalize() share one code path and cannot drift apart.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

trait Sink {
    fn put(&mut self, s: &str);
    fn put_lower(&mut self, s: &str);
}

struct HashSink {
    h: u64,
}

impl HashSink {
    fn new() -> Self {
        HashSink { h: FNV_OFFSET }
    }
    #[inline]
    fn byte(&mut self, b: u8) {
        self.h ^= u64::from(b);
        self.h = self.h.wrapping_mul(FNV_PRIME);
    }
}

impl Sink for HashSink {
    fn put(&mut self, s: &str) {
        for &b in s.as_bytes() {
            self.byte(b);
        }
    }
    fn put_lower(&mut self, s: &str) {
        for &b in s.as_bytes() {
            self.byte(b.to_ascii_lowercase());
        }
    }
}

struct TextSink<'a> {
    out: &'a mut String,
    hash: HashSink,
}

impl Sink for TextSink<'_> {
    fn put(&mut self, s: &str) {
        self.out.push_str(s);
        self.hash.put(s);
    }
    fn put_lower(&mut self, s: &str) {
        let start = self.out.len();
        self.out.push_str(s);
        // ASCII-only lower-casing leaves multi-byte UTF-8 untouched, so the String stays valid
        // and the hash sink (which lower-cases byte-wise) sees exactly the same bytes.
        if let Some(tail) = self.out.get_mut(start..) {
            tail.make_ascii_lowercase();
        }
        self.hash.put_lower(s);
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer. Works on bytes; every token boundary is either at an ASCII byte or at the end of input
// (all bytes >= 0x80 are identifier bytes), so slicing the &str at token boundaries is safe.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    Word,
    QuotedIdent,
    Number,
    Str,
    Param,
    Op,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Semi,
    Dot,
    Cast,
    Other,
    End,
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Tok,
    start: usize,
    end: usize,
}

#[inline]
fn at(b: &[u8], i: usize) -> u8 {
    // 0 is never syntactically special, so a real NUL byte and end-of-input behave alike in
    // one-byte lookahead checks; loops still bound themselves by b.len().
    b.get(i).copied().unwrap_or(0)
}

#[inline]
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

#[inline]
fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

#[inline]
fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

#[inline]
fn is_op_char(c: u8) -> bool {
    matches!(
        c,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

fn skip_trivia(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        let c = b[i];
        if is_space(c) {
            i += 1;
        } else if c == b'-' && at(b, i + 1) == b'-' {
            i += 2;
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && at(b, i + 1) == b'*' {
            i = skip_block_comment(b, i + 2);
        } else {
            break;
        }
    }
    i
}

fn skip_block_comment(b: &[u8], mut i: usize) -> usize {
    // PostgreSQL block comments nest; an unterminated one swallows the rest of the input.
    let mut depth = 1usize;
    while i < b.len() {
        if b[i] == b'/' && at(b, i + 1) == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && at(b, i + 1) == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// Returns the index just past the closing quote, or b.len() if unterminated.
fn scan_quoted(b: &[u8], mut i: usize, q: u8, backslash: bool) -> usize {
    while i < b.len() {
        let c = b[i];
        if backslash && c == b'\\' {
            i += 2;
        } else if c == q {
            if at(b, i + 1) == q {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

fn scan_digits(b: &[u8], mut i: usize, ok: fn(u8) -> bool) -> usize {
    // PostgreSQL 16 allows single underscores between digits.
    while i < b.len() && (ok(b[i]) || (b[i] == b'_' && ok(at(b, i + 1)) && i > 0 && ok(b[i - 1]))) {
        i += 1;
    }
    i
}

fn scan_number(b: &[u8], i: usize) -> usize {
    if b[i] == b'0' {
        let radix: Option<fn(u8) -> bool> = match at(b, i + 1) {
            b'x' | b'X' => Some(|c: u8| c.is_ascii_hexdigit()),
            b'o' | b'O' => Some(|c: u8| (b'0'..=b'7').contains(&c)),
            b'b' | b'B' => Some(|c: u8| c == b'0' || c == b'1'),
            _ => None,
        };
        if let Some(ok) = radix {
            if ok(at(b, i + 2)) {
                return scan_digits(b, i + 2, ok);
            }
        }
    }
    let dec = |c: u8| c.is_ascii_digit();
    let mut j = scan_digits(b, i, dec);
    if at(b, j) == b'.' && at(b, j + 1) != b'.' {
        j = scan_digits(b, j + 1, dec);
    }
    if matches!(at(b, j), b'e' | b'E') {
        let mut k = j + 1;
        if matches!(at(b, k), b'+' | b'-') {
            k += 1;
        }
        if at(b, k).is_ascii_digit() {
            j = scan_digits(b, k, dec);
        }
    }
    j
}

/// `$` at b[i]: a `$N` parameter, a dollar-quoted string, or a stray `$`.
fn scan_dollar(sql: &str, i: usize) -> Token {
    let b = sql.as_bytes();
    let tok = |kind, end| Token { kind, start: i, end };
    if at(b, i + 1).is_ascii_digit() {
        let mut j = i + 1;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        return tok(Tok::Param, j);
    }
    let mut j = i + 1;
    if is_ident_start(at(b, j)) {
        while is_ident_start(at(b, j)) || at(b, j).is_ascii_digit() {
            j += 1;
        }
    }
    if at(b, j) != b'$' {
        return tok(Tok::Other, i + 1);
    }
    let body = j + 1;
    // Two-way substring search keeps long or adversarial tags linear-time.
    let (Some(tag), Some(rest)) = (sql.get(i..body), sql.get(body..)) else {
        return tok(Tok::Other, i + 1);
    };
    match rest.find(tag) {
        Some(p) => tok(Tok::Str, body + p + tag.len()),
        None => tok(Tok::Str, b.len()),
    }
}

fn next_token(sql: &str, i: usize) -> Token {
    let b = sql.as_bytes();
    let i = skip_trivia(b, i);
    let tok = |kind, end: usize| Token { kind, start: i, end: end.min(b.len()) };
    if i >= b.len() {
        return Token { kind: Tok::End, start: b.len(), end: b.len() };
    }
    let c = b[i];
    let c1 = at(b, i + 1);
    match c {
        b'\'' => tok(Tok::Str, scan_quoted(b, i + 1, b'\'', false)),
        b'"' => tok(Tok::QuotedIdent, scan_quoted(b, i + 1, b'"', false)),
        b'e' | b'E' if c1 == b'\'' => tok(Tok::Str, scan_quoted(b, i + 2, b'\'', true)),
        b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if c1 == b'\'' => tok(Tok::Str, scan_quoted(b, i + 2, b'\'', false)),
        b'u' | b'U' if c1 == b'&' && at(b, i + 2) == b'\'' => tok(Tok::Str, scan_quoted(b, i + 3, b'\'', false)),
        b'u' | b'U' if c1 == b'&' && at(b, i + 2) == b'"' => tok(Tok::QuotedIdent, scan_quoted(b, i + 3, b'"', false)),
        _ if is_ident_start(c) => {
            let mut j = i + 1;
            while j < b.len() && is_ident_cont(b[j]) {
                j += 1;
            }
            tok(Tok::Word, j)
        }
        b'0'..=b'9' => tok(Tok::Number, scan_number(b, i)),
        b'.' if c1.is_ascii_digit() => tok(Tok::Number, scan_number(b, i)),
        b'.' => tok(Tok::Dot, i + 1),
        b'$' => scan_dollar(sql, i),
        b'(' => tok(Tok::LParen, i + 1),
        b')' => tok(Tok::RParen, i + 1),
        b'[' => tok(Tok::LBracket, i + 1),
        b']' => tok(Tok::RBracket, i + 1),
        b',' => tok(Tok::Comma, i + 1),
        b';' => tok(Tok::Semi, i + 1),
        b':' if c1 == b':' => tok(Tok::Cast, i + 2),
        b':' if c1 == b'=' => tok(Tok::Op, i + 2),
        b':' => tok(Tok::Op, i + 1),
        _ if is_op_char(c) => tok(Tok::Op, scan_operator(b, i)),
        _ => tok(Tok::Other, i + 1),
    }
}

fn scan_operator(b: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < b.len() && is_op_char(b[j]) {
        // A comment start ends the operator, as in PostgreSQL's lexer.
        if j > i && ((b[j] == b'-' && at(b, j + 1) == b'-') || (b[j] == b'/' && at(b, j + 1) == b'*')) {
            break;
        }
        j += 1;
    }
    // PostgreSQL: a multi-char operator may not end in + or - unless it contains one of
    // ~ ! @ # % ^ & | ` ?, which is what makes `=-5` mean `= -5`.
    let special =
        b[i..j].iter().any(|c| matches!(c, b'~' | b'!' | b'@' | b'#' | b'%' | b'^' | b'&' | b'|' | b'`' | b'?'));
    if !special {
        while j - i > 1 && matches!(b[j - 1], b'+' | b'-') {
            j -= 1;
        }
    }
    j
}

// ---------------------------------------------------------------------------------------------
// Normaliser.

/// What was last written, which decides spacing, unary-sign detection and list collapsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Start,
    /// A word that is not one of the clause keywords below: identifiers, function names, and
    /// value-like keywords (`null`, `true`, `end`) that end an operand.
    Ident,
    Keyword,
    KwIn,
    KwValues,
    KwArray,
    Quoted,
    Const,
    Op,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Semi,
    Dot,
    Cast,
    Other,
}

/// Clause keywords after which `(` starts a sub-expression rather than an argument list, and
/// after which a `-`/`+` can only be a sign.
#[rustfmt::skip]
const CLAUSE_KEYWORDS: [&str; 65] = [
    "select", "from", "where", "and", "or", "not", "as", "on", "join", "by", "having", "limit",
    "offset", "union", "intersect", "except", "all", "distinct", "case", "when", "then", "else",
    "between", "like", "ilike", "is", "exists", "set", "into", "returning", "using", "with",
    "return", "over", "partition", "filter", "within", "lateral", "similar", "escape",
    "recursive", "materialized", "do", "conflict", "insert", "update", "delete", "table", "group",
    "order", "window", "fetch", "only", "to", "for", "if", "elsif", "while", "asc", "desc",
    "left", "right", "inner", "outer", "cross",
];
const MAX_KEYWORD_LEN: usize = 12;

/// Packs a word of at most 12 bytes, ASCII-lower-cased, into an integer. Words never contain NUL,
/// so zero padding keeps distinct words distinct, and a keyword lookup becomes one hash probe on
/// an integer instead of dozens of byte-string comparisons (word classification dominated the
/// normaliser's profile before this).
const fn pack_word(w: &[u8]) -> u128 {
    let mut v = 0u128;
    let mut i = 0;
    while i < w.len() && i < MAX_KEYWORD_LEN {
        v = (v << 8) | w[i].to_ascii_lowercase() as u128;
        i += 1;
    }
    v << (8 * (MAX_KEYWORD_LEN - i))
}

const KW_SLOTS: usize = 256;

const fn kw_slot(p: u128) -> usize {
    let x = (p as u64) ^ ((p >> 64) as u64);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize % KW_SLOTS
}

/// Open-addressing table (linear probing) built at compile time; slot key 0 means empty.
const KW_TABLE: [(u128, Class); KW_SLOTS] = {
    let mut t = [(0u128, Class::Ident); KW_SLOTS];
    let mut k = 0;
    while k < CLAUSE_KEYWORDS.len() + 3 {
        let (word, class) = if k < CLAUSE_KEYWORDS.len() {
            (CLAUSE_KEYWORDS[k], Class::Keyword)
        } else if k == CLAUSE_KEYWORDS.len() {
            ("in", Class::KwIn)
        } else if k == CLAUSE_KEYWORDS.len() + 1 {
            ("values", Class::KwValues)
        } else {
            ("array", Class::KwArray)
        };
        assert!(word.len() <= MAX_KEYWORD_LEN);
        let p = pack_word(word.as_bytes());
        let mut i = kw_slot(p);
        while t[i].0 != 0 {
            assert!(t[i].0 != p, "duplicate keyword");
            i = (i + 1) % KW_SLOTS;
        }
        t[i] = (p, class);
        k += 1;
    }
    t
};

fn classify_word(w: &[u8]) -> Class {
    if w.is_empty() || w.len() > MAX_KEYWORD_LEN {
        return Class::Ident;
    }
    let p = pack_word(w);
    let mut i = kw_slot(p);
    loop {
        let (k, class) = KW_TABLE[i];
        if k == p {
            return class;
        }
        if k == 0 {
            return Class::Ident;
        }
        i = (i + 1) % KW_SLOTS;
    }
}

fn need_space(prev: Class, cur: Class) -> bool {
    use Class::*;
    if matches!(prev, Start | LParen | LBracket | Dot | Cast) {
        return false;
    }
    match cur {
        RParen | RBracket | Comma | Semi | Dot | Cast => false,
        // Function call / array constructor: `count(*)`, `array(select ...)`.
        LParen => !matches!(prev, Ident | KwArray | Quoted),
        // Subscript or array literal: `a[1]`, `array[...]`, `(x)[1]`.
        LBracket => !matches!(prev, Ident | Keyword | KwIn | KwValues | KwArray | Quoted | Const | RParen | RBracket),
        _ => true,
    }
}

fn sign_allowed_after(prev: Class) -> bool {
    use Class::*;
    matches!(prev, Start | Keyword | KwIn | KwValues | Op | LParen | LBracket | Comma | Semi | Cast | Other)
}

fn is_sign(sql: &str, t: Token) -> bool {
    t.kind == Tok::Op && matches!(sql.as_bytes().get(t.start..t.end), Some(b"-") | Some(b"+"))
}

fn is_const(kind: Tok) -> bool {
    matches!(kind, Tok::Number | Tok::Str | Tok::Param)
}

/// Lookahead over `c, c, ...<close>` starting just after the opening bracket. Returns the number
/// of elements and the index after the closing bracket if every element is a (possibly signed)
/// constant. A `...` directly after an element is accepted so that normal forms re-normalise to
/// themselves.
fn scan_const_list(sql: &str, mut i: usize, close: Tok) -> Option<(u64, usize)> {
    let mut count = 0u64;
    loop {
        let mut t = next_token(sql, i);
        if is_sign(sql, t) {
            t = next_token(sql, t.end);
            if !matches!(t.kind, Tok::Number | Tok::Param) {
                return None;
            }
        }
        if !is_const(t.kind) {
            return None;
        }
        count += 1;
        let mut e = t.end;
        if sql.as_bytes().get(e..e + 3) == Some(b"...") {
            e += 3;
        }
        let s = next_token(sql, e);
        if s.kind == close {
            return Some((count, s.end));
        }
        if s.kind != Tok::Comma {
            return None;
        }
        i = s.end;
    }
}

/// After a collapsed VALUES row: skips every following `, (constants...)` row.
fn skip_const_rows(sql: &str, mut i: usize) -> usize {
    loop {
        let c = next_token(sql, i);
        if c.kind != Tok::Comma {
            return i;
        }
        let p = next_token(sql, c.end);
        if p.kind != Tok::LParen {
            return i;
        }
        match scan_const_list(sql, p.end, Tok::RParen) {
            Some((_, e)) => i = e,
            None => return i,
        }
    }
}

#[derive(Clone, Copy)]
enum Case {
    Verbatim,
    Lower,
}

struct Norm<'s, S: Sink> {
    sink: &'s mut S,
    prev: Class,
    next_param: u64,
}

impl<S: Sink> Norm<'_, S> {
    fn emit(&mut self, cur: Class, text: &str, case: Case) {
        if need_space(self.prev, cur) {
            self.sink.put(" ");
        }
        match case {
            Case::Verbatim => self.sink.put(text),
            Case::Lower => self.sink.put_lower(text),
        }
        self.prev = cur;
    }

    fn placeholder(&mut self, suffix: &str) {
        let mut buf = [0u8; 21];
        let mut i = buf.len();
        let mut v = self.next_param;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        i -= 1;
        buf[i] = b'$';
        self.next_param = self.next_param.saturating_add(1);
        let text = std::str::from_utf8(&buf[i..]).unwrap_or("$");
        self.emit(Class::Const, text, Case::Verbatim);
        if !suffix.is_empty() {
            self.sink.put(suffix);
        }
    }
}

fn run<S: Sink>(sql: &str, sink: &mut S) {
    let mut n = Norm { sink, prev: Class::Start, next_param: 1 };
    let mut i = 0usize;
    // Semicolons are held back so that trailing ones can be dropped without lookahead.
    let mut pending_semis = 0usize;
    loop {
        let t = next_token(sql, i);
        if t.kind == Tok::End {
            break;
        }
        i = t.end;
        if t.kind == Tok::Semi {
            pending_semis += 1;
            continue;
        }
        for _ in 0..pending_semis {
            n.emit(Class::Semi, ";", Case::Verbatim);
        }
        pending_semis = 0;
        let text = sql.get(t.start..t.end).unwrap_or("");
        match t.kind {
            Tok::Number | Tok::Str | Tok::Param => n.placeholder(""),
            Tok::Word => n.emit(classify_word(text.as_bytes()), text, Case::Lower),
            Tok::QuotedIdent => {
                // Quoted identifiers are case-sensitive; only the U& prefix is case-folded.
                if let Some(rest) = text.strip_prefix("U&") {
                    n.emit(Class::Quoted, "u&", Case::Verbatim);
                    n.sink.put(rest);
                } else {
                    n.emit(Class::Quoted, text, Case::Verbatim);
                }
            }
            Tok::Op => {
                if is_sign(sql, t) && sign_allowed_after(n.prev) {
                    let u = next_token(sql, t.end);
                    if matches!(u.kind, Tok::Number | Tok::Param) {
                        n.placeholder("");
                        i = u.end;
                        continue;
                    }
                }
                n.emit(Class::Op, text, Case::Verbatim);
            }
            Tok::LParen => {
                if n.prev == Class::KwIn {
                    if let Some((_, end)) = scan_const_list(sql, t.end, Tok::RParen) {
                        n.emit(Class::LParen, "(", Case::Verbatim);
                        n.placeholder("...");
                        n.emit(Class::RParen, ")", Case::Verbatim);
                        i = end;
                        continue;
                    }
                } else if n.prev == Class::KwValues {
                    if let Some((count, end)) = scan_const_list(sql, t.end, Tok::RParen) {
                        n.emit(Class::LParen, "(", Case::Verbatim);
                        for k in 0..count {
                            if k > 0 {
                                n.emit(Class::Comma, ",", Case::Verbatim);
                            }
                            n.placeholder("");
                        }
                        n.emit(Class::RParen, ")", Case::Verbatim);
                        i = skip_const_rows(sql, end);
                        continue;
                    }
                }
                n.emit(Class::LParen, "(", Case::Verbatim);
            }
            Tok::LBracket => {
                if n.prev == Class::KwArray {
                    if let Some((_, end)) = scan_const_list(sql, t.end, Tok::RBracket) {
                        n.emit(Class::LBracket, "[", Case::Verbatim);
                        n.placeholder("...");
                        n.emit(Class::RBracket, "]", Case::Verbatim);
                        i = end;
                        continue;
                    }
                }
                n.emit(Class::LBracket, "[", Case::Verbatim);
            }
            Tok::RParen => n.emit(Class::RParen, ")", Case::Verbatim),
            Tok::RBracket => n.emit(Class::RBracket, "]", Case::Verbatim),
            Tok::Comma => n.emit(Class::Comma, ",", Case::Verbatim),
            Tok::Dot => n.emit(Class::Dot, ".", Case::Verbatim),
            Tok::Cast => n.emit(Class::Cast, "::", Case::Verbatim),
            Tok::Other => n.emit(Class::Other, text, Case::Verbatim),
            Tok::Semi | Tok::End => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_segment_values_stay_as_they_were() {
        // Computed with the earlier form that copied the last 0-7 bytes into a zeroed 8-byte word: the register
        // form must give the same keys.
        for (seg, want) in [
            ("", 0x4f61_2c92_6a70_8a82),
            ("a", 0x16f5_ae0b_c3e3_4ffd),
            ("abcdefg", 0x4d69_8f4b_c68d_e4e6),
            ("abcdefgh", 0x05f8_e6f1_b00e_9b98),
            ("abcdefghijk", 0xc1d2_1816_0193_d128),
        ] {
            assert_eq!(hash_segment(7, seg.as_bytes()), want, "{seg:?}");
        }
    }

    #[test]
    fn stop_candidates_cover_every_byte_a_plain_run_stops_at() {
        for c in 0..=255u8 {
            for pos in 0..8 {
                let mut bytes = [b'a'; 8];
                bytes[pos] = c;
                let m = stop_candidates(u64::from_le_bytes(bytes));
                let in_range = (0x22..=0x39).contains(&c);
                assert_eq!(m != 0, in_range, "byte {c:#x} at {pos}");
                if in_range {
                    assert_eq!(m.trailing_zeros() / 8, pos as u32);
                }
                if !SHAPE_PLAIN[c as usize] {
                    assert!(in_range, "byte {c:#x} stops a run but is outside the word check");
                }
            }
        }
        // Several candidates: the first one (lowest address) is found.
        let m = stop_candidates(u64::from_le_bytes(*b"ab1c'd9e"));
        assert_eq!(m.trailing_zeros() / 8, 2);
    }

    #[test]
    fn shape_key_agrees_with_fingerprint() {
        // (a, b, same key expected)
        let cases = [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
                true,
            ),
            ("select * from t where a = 'x' and b = 15", "select * from t where a = 'yy z' and b = 250", true),
            ("select 1.5", "select 2.5", false),
            ("select * from t where a in (1, 2, 3)", "select * from t where a in (4, 5, 6)", true),
            ("select * from t where a = -5", "select * from t where a = -77", true),
            ("insert into t values (1, 'a'), (2, 'b')", "insert into t values (3, 'c'), (4, 'd')", true),
            ("select 0x1F", "select 1x1F", false),
            ("select 1_000", "select 2_000", false),
            ("select 1e5", "select 2e5", false),
            ("select c1 from t1", "select c2 from t2", false),
            ("select \"a'1\" from t", "select \"a'2\" from t", false),
            ("select 1 from t where x = 'a' ", "select 1 from t where x = 'a'", false),
        ];
        for (a, b, same) in cases {
            let (ka, kb) = (shape_key(a), shape_key(b));
            assert!(ka.is_some() && kb.is_some(), "{a} / {b}");
            assert_eq!(ka == kb, same, "{a} / {b}");
            if same {
                assert_eq!(fingerprint(a), fingerprint(b), "{a} / {b}");
                assert_eq!(query_type(a), query_type(b), "{a} / {b}");
            }
        }
        for bail in [
            "select 1 -- c",
            "/* x */ select 1",
            "select $$a$$",
            "select $1",
            "select E'a\\'b'",
            "select B'101'",
            "select x'1f'",
            "select U&'d!0061t'",
            "select 'unterminated",
        ] {
            assert_eq!(shape_key(bail), None, "{bail}");
        }
    }

    /// Random texts built from literal-bearing pieces: whenever two share a shape key they share a fingerprint.
    #[test]
    fn shape_key_never_merges_different_fingerprints() {
        let pieces = [
            "select ", "a", "b1", " from ", "t", " where ", "x", " = ", "1", "22", "-3", "4.5", ".6", "7e8", "0x9",
            "1_0", "'s'", "'t''u'", "\"Q1\"", "\"q'\"", " in (", ", ", ")", " and ", "::int", "[", "]", ";", "(", " ",
            "e", "E", "_", "&", "+", "-", "*", ".",
        ];
        let mut seed: u64 = 0x1234_5678;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut by_key: std::collections::HashMap<u64, (String, u64)> = std::collections::HashMap::new();
        for _ in 0..200_000 {
            let len = 1 + (next() % 8) as usize;
            let mut q = String::new();
            for _ in 0..len {
                q.push_str(pieces[(next() % pieces.len() as u64) as usize]);
            }
            if let Some(k) = shape_key(&q) {
                let fp = fingerprint(&q);
                let e = by_key.entry(k).or_insert_with(|| (q.clone(), fp));
                assert_eq!(e.1, fp, "{:?} and {:?} share a shape key", e.0, q);
            }
        }
    }

    fn norm(sql: &str) -> String {
        let mut out = String::new();
        let fp = normalize(sql, &mut out);
        assert_eq!(fp, fingerprint(sql), "fingerprint() disagrees for {sql:?}");
        out
    }

    fn same(a: &str, b: &str) {
        assert_eq!(norm(a), norm(b), "{a:?} vs {b:?}");
        assert_eq!(fingerprint(a), fingerprint(b), "{a:?} vs {b:?}");
    }

    fn differ(a: &str, b: &str) {
        assert_ne!(fingerprint(a), fingerprint(b), "{a:?} vs {b:?}");
    }

    #[test]
    fn brief_example() {
        assert_eq!(
            norm("SELECT  * FROM Users WHERE id IN (1, 2, 3) AND name = 'bob' -- x"),
            "select * from users where id in ($1...) and name = $2"
        );
    }

    #[test]
    fn in_lists_collapse() {
        same("select * from t where id in (1)", "select * from t where id in (1,2,3)");
        same("select * from t where id in (1)", "SELECT * FROM t WHERE id IN ($1, $2)");
        same("select * from t where id IN(1,2)", "select * from t where id IN ( 1 , 2 )");
        same("select * from t where id in ('a', 'b')", "select * from t where id in ($1)");
        same("select * from t where id not in (-1, +2, 3.5)", "select * from t where id not in (4)");
        assert_eq!(norm("select 1 where x in (1, 2)"), "select $1 where x in ($2...)");
        // Non-constant lists are left alone.
        assert_eq!(
            norm("select 1 from t where x in (select y from u where z = 1)"),
            "select $1 from t where x in (select y from u where z = $2)"
        );
        assert_eq!(norm("x in (a, 1)"), "x in (a, $1)");
        differ("select * from t where id in (1)", "select * from t where id in (a)");
    }

    #[test]
    fn arrays_and_values_collapse() {
        same("select * from t where id = ANY(ARRAY[1,2,3])", "select * from t where id = any(array[$1])");
        assert_eq!(
            norm("select * from t where id = ANY(ARRAY[1, -2])"),
            "select * from t where id = any(array[$1...])"
        );
        same("INSERT INTO t (a, b) VALUES (1, 'x')", "insert into t (a, b) values (1, 'x'), (2, 'y'), ($1, $2)");
        assert_eq!(
            norm("insert into t (a, b) values (1, 'x'), (2, 'y') returning id"),
            "insert into t(a, b) values ($1, $2) returning id"
        );
        differ("insert into t values (1)", "insert into t values (1, 2)");
        // A non-constant row stops the collapse but earlier constant rows still fold.
        same("insert into t values (1,2),(3,4),(now(),5)", "insert into t values (1,2),(now(),5)");
    }

    #[test]
    fn literal_and_param_agree() {
        same("select * from users where id = 5", "select * from users where id = $1");
        same("select * from users where id = '5'", "select * from users where id = $9");
        same("update t set a = 1.5e-3, b = 0x1F where c = .5", "update t set a = $3, b = $2 where c = $1");
        assert_eq!(norm("select $2, $1, 7"), "select $1, $2, $3");
    }

    #[test]
    fn negative_numbers() {
        same("select * from t where a = -5", "select * from t where a = 5");
        same("select * from t where a=-5", "select * from t where a = $1");
        same("select -1", "select 1");
        same("select f(-1, +2)", "select f(1, 2)");
        // Binary minus stays.
        assert_eq!(norm("select a - 5 from t"), "select a - $1 from t");
        assert_eq!(norm("select a-5 from t"), "select a - $1 from t");
        assert_eq!(norm("select (a) - 5"), "select (a) - $1");
        differ("select a - 5 from t", "select a, 5 from t");
    }

    #[test]
    fn identifiers_with_digits_are_not_numbers() {
        assert_eq!(
            norm("SELECT t1.col_2, T2.x3 FROM t1 JOIN t2 ON t1.id=t2.id"),
            "select t1.col_2, t2.x3 from t1 join t2 on t1.id = t2.id"
        );
        differ("select col_1 from t", "select col_2 from t");
    }

    #[test]
    fn tables_and_columns_differ() {
        differ("select * from users where id = 1", "select * from orders where id = 1");
        differ("select * from users where id = 1", "select * from users where uid = 1");
        differ("select a from t", "select b from t");
        differ("select * from \"Users\"", "select * from users");
        differ("select * from t where a = 1", "select * from t where a > 1");
    }

    #[test]
    fn comments_whitespace_case_fold() {
        same(
            "SELECT /* hi /* nested */ still */ a\n\tFROM   T -- trailing\nWHERE b = 1;;",
            "select a from t where b = $1",
        );
        assert_eq!(norm("  select\n1 ;  "), "select $1");
        assert_eq!(norm("select/**/1"), "select $1");
        assert_eq!(norm("select 1; select 2;"), "select $1; select $2");
        assert_eq!(norm("SELECT \"MixedCase\".Col FROM \"MixedCase\""), "select \"MixedCase\".col from \"MixedCase\"");
        assert_eq!(norm("select count(*) from t"), "select count(*) from t");
        same("select count ( * ) from t", "select COUNT(*) FROM t");
        assert_eq!(norm("select x::int, a[1] from t"), "select x::int, a[$1] from t");
        same("select x :: int", "select x::int");
        // PostgreSQL only folds ASCII letters of unquoted identifiers in UTF-8 databases.
        assert_eq!(norm("select café, ÉTÉ from t"), "select café, ÉtÉ from t");
        assert_eq!(norm(""), "");
        assert_eq!(norm(" ;; -- only a comment"), "");
    }

    #[test]
    fn string_forms() {
        assert_eq!(norm("select 'it''s', 'a'"), "select $1, $2");
        assert_eq!(norm(r"select E'it\'s \\', 1"), "select $1, $2");
        assert_eq!(norm("select e'x''y'"), "select $1");
        assert_eq!(norm("select $$ a 'quoted' $ b $$, 1"), "select $1, $2");
        assert_eq!(norm("select $fn$ body $$ inner $$ $fn$ , 1"), "select $1, $2");
        assert_eq!(norm("select B'0101', X'ff', N'nat', U&'d\\0061t'"), "select $1, $2, $3, $4");
        assert_eq!(norm("select date '2020-01-01'"), "select date $1");
        assert_eq!(norm("select '--not a comment', '/* nor this'"), "select $1, $2");
        assert_eq!(norm("select \"a\"\"b\" from t"), "select \"a\"\"b\" from t");
        assert_eq!(norm("select a$b, $x from t"), "select a$b, $ x from t");
        same("select 'a;b'", "select 'c'");
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for s in [
            "select 'abc",
            "select E'abc\\",
            "select E'\\",
            "select \"abc",
            "select /* abc",
            "select /* /* */",
            "select $tag$ abc",
            "select $tag",
            "select $",
            "select 0x",
            "select 1e",
            "select 1e+",
            "select U&",
            "select U&'",
            "select -",
            "select x in (1,",
            "insert into t values (1,2),(",
            "select array[1,",
            "select --",
            "'",
            "\"",
            "$$",
            "e'",
            "é'",
        ] {
            let out = norm(s);
            assert!(!out.contains("  "), "{s:?} -> {out:?}");
            let _ = query_type(s);
        }
        assert_eq!(norm("select 'abc"), "select $1");
        assert_eq!(norm("select /* abc"), "select");
    }

    #[test]
    fn query_types() {
        use QueryType::*;
        let cases = [
            ("select 1", Select),
            ("SELECT 1", Select),
            ("  \n-- c\n/* a /* b */ */ ((SeLeCt 1))", Select),
            ("insert into t values (1)", Insert),
            ("UPDATE t set a = 1", Update),
            ("delete from t", Delete),
            ("with x as (select 1) select * from x", Select),
            ("WITH RECURSIVE x(n) AS (SELECT 1 UNION SELECT n+1 FROM x) SELECT * FROM x", Select),
            ("with x as (select 1), y as (select 2) insert into t select * from x", Insert),
            ("with d as (delete from t returning *) update u set a = 1", Update),
            ("with x as materialized (select 1) delete from t", Delete),
            ("with x as (select 1", Other),
            ("values (1)", Select),
            ("begin", Other),
            ("explain select 1", Other),
            ("", Other),
            ("/* unterminated select", Other),
            ("selectx 1", Other),
            ("123", Other),
        ];
        for (sql, want) in cases {
            assert_eq!(query_type(sql), want, "{sql:?}");
        }
        assert_eq!(Select.as_str(), "select");
        assert_eq!(Insert.as_str(), "insert");
        assert_eq!(Update.as_str(), "update");
        assert_eq!(Delete.as_str(), "delete");
        assert_eq!(Other.as_str(), "other");
    }

    #[test]
    fn fingerprint_is_stable() {
        // Pinned so that a change to the normal form or the hash is a deliberate, visible break
        // (fingerprints are exported and compared across restarts and proxy instances).
        let fp = fingerprint("SELECT * FROM users WHERE id = 42");
        assert_eq!(format!("{fp:016x}"), PINNED);
        assert_eq!(fingerprint(""), fmix64(FNV_OFFSET));
    }
    // Cross-checked independently: FNV-1a 64 of "select * from users where id = $1", then fmix64.
    const PINNED: &str = "76a1f47426e6302d";

    const CORPUS: &[&str] = &[
        "SELECT  * FROM Users WHERE id IN (1, 2, 3) AND name = 'bob' -- x",
        "insert into t (a, b) values (1, 'x'), (2, 'y') returning id",
        "UPDATE accounts SET balance = balance - 100.50 WHERE id = $1 AND \"Owner\" = E'o\\'neil'",
        "with x as (select * from t where a = any(array[1,2,3])) select count(*) from x",
        "select $body$ create function f() returns int as $$ select 1 $$ $body$",
        "SELECT a.b, c[1], d::text FROM s.t a JOIN u ON a.id=u.id WHERE x BETWEEN -5 AND 10;",
        "delete from t where ts < now() - interval '1 day' /* cleanup */",
        "select case when a > 0 then 'p' else 'n' end - 1 from t limit 10 offset 20",
        "select 0x1F, 0b101, 0o17, 1_000_000, 1.5e10, .5, 5., 'a' 'b'",
        "SELECT café FROM \"Ünïcode\" WHERE x ~* '^a' AND y @> '{1}' AND z !~~ 'q'",
    ];

    #[test]
    fn normal_form_is_idempotent_on_real_sql() {
        for sql in CORPUS {
            let once = norm(sql);
            let twice = norm(&once);
            assert_eq!(once, twice, "from {sql:?}");
        }
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn mutate(rng: &mut XorShift, base: &str) -> String {
        const ALPHABET: &[&str] = &[
            "'",
            "\"",
            "$",
            "$$",
            "$a$",
            "-",
            "--",
            "/*",
            "*/",
            "(",
            ")",
            "[",
            "]",
            ",",
            ";",
            "e'",
            "E'",
            "\\",
            "0x",
            "1",
            ".",
            "é",
            "€",
            "\u{1F600}",
            " ",
            "\n",
            "in (",
            "values (",
            "array[",
            "::",
            "U&'",
            "\0",
            "=-",
            "+",
        ];
        let mut s: String = base.to_string();
        for _ in 0..1 + rng.below(6) {
            let mut pos = rng.below(s.len() + 1);
            while !s.is_char_boundary(pos) {
                pos -= 1;
            }
            match rng.below(4) {
                0 => s.insert_str(pos, ALPHABET[rng.below(ALPHABET.len())]),
                1 => {
                    let mut end = (pos + rng.below(8)).min(s.len());
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    s.replace_range(pos..end, "");
                }
                2 => s.truncate(pos),
                _ => {
                    let mut end = (pos + rng.below(16)).min(s.len());
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    let dup = s[pos..end].to_string();
                    s.insert_str(pos, &dup);
                }
            }
        }
        s
    }

    #[test]
    fn random_inputs_never_panic_and_agree() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut out = String::new();
        let mut check = |s: &str| {
            let fp = normalize(s, &mut out);
            assert_eq!(fp, fingerprint(s), "input {s:?}");
            // Only the tail can hold verbatim input (an unterminated quoted identifier).
            assert!(!out.starts_with(' '), "input {s:?}");
            let _ = query_type(s);
        };
        for _ in 0..5000 {
            let len = rng.below(64);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    // Bias towards SQL-significant ASCII so the lexer's branches get exercised.
                    const SIG: &[u8] = b"'\"$-/*()[],;eEbBxXuU&\\0123456789.:=+<>@ \n_aZ";
                    if rng.below(3) == 0 {
                        rng.next() as u8
                    } else {
                        SIG[rng.below(SIG.len())]
                    }
                })
                .collect();
            check(&String::from_utf8_lossy(&bytes));
        }
        for _ in 0..20000 {
            let base = CORPUS[rng.below(CORPUS.len())];
            check(&mutate(&mut rng, base));
        }
    }

    #[test]
    fn pathological_inputs_stay_linear() {
        // Long tags and many near-miss closers, deep comment nesting and huge lists: each must
        // finish quickly (quadratic behaviour here would take seconds).
        let mut s = String::from("select $");
        s.push_str(&"a".repeat(20_000));
        s.push('$');
        for _ in 0..20_000 {
            s.push_str("$aaaa");
        }
        let _ = norm(&s);
        let _ = norm(&"/*".repeat(50_000));
        let mut list = String::from("select 1 where x in (");
        for i in 0..50_000 {
            list.push_str(&format!("{i},"));
        }
        list.push_str("y)");
        assert!(norm(&list).ends_with(", y)"));
        let _ = norm(&"in (".repeat(20_000));
        let _ = norm(&"- ".repeat(20_000));
    }

    #[test]
    fn keyword_table() {
        for kw in CLAUSE_KEYWORDS {
            assert_eq!(classify_word(kw.as_bytes()), Class::Keyword, "{kw}");
            assert_eq!(classify_word(kw.to_uppercase().as_bytes()), Class::Keyword, "{kw}");
        }
        assert_eq!(classify_word(b"In"), Class::KwIn);
        assert_eq!(classify_word(b"VALUES"), Class::KwValues);
        assert_eq!(classify_word(b"array"), Class::KwArray);
        for w in ["users", "selec", "selectx", "materialized_", "i", "", "countries"] {
            assert_eq!(classify_word(w.as_bytes()), Class::Ident, "{w}");
        }
    }

    #[test]
    fn hot_paths_do_not_allocate() {
        let sql = "SELECT a, b FROM t WHERE id IN (1, 2, 3) AND s = E'x\\'y' AND d = $tag$z$tag$";
        // The counter must see allocations at all for the zeros below to mean anything.
        let (allocs, _) = crate::observe::alloc_count::count(|| normalize(sql, &mut String::new()));
        assert!(allocs > 0);
        let (allocs, _) = crate::observe::alloc_count::count(|| fingerprint(sql));
        assert_eq!(allocs, 0);
        let (allocs, _) = crate::observe::alloc_count::count(|| query_type(sql));
        assert_eq!(allocs, 0);
        let mut out = String::with_capacity(sql.len() * 2);
        let (allocs, _) = crate::observe::alloc_count::count(|| normalize(sql, &mut out));
        assert_eq!(allocs, 0, "normalize allocated although `out` had room");
    }
}
