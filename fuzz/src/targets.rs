//! The fuzz targets as plain functions over bytes, shared by the libFuzzer binaries (fuzz_targets/) and the
//! stable `cargo test` smoke run (tests/fuzz_smoke.rs in the main crate). Each must return without panicking
//! for any input; the asserts state invariants the parsers promise.

use bytes::BytesMut;
use pgrelay::auth::{self, ScramClient, ScramCredential, ScramServer, Secret};
use pgrelay::observe::{self, fingerprint};
use pgrelay::{prepared, protocol};

/// Frame decoder: walks a byte stream frame by frame as the relay and the login reader do.
pub fn frame_header(data: &[u8]) {
    let max = match data.first() {
        Some(b) if b & 1 == 1 => 4096,
        _ => 1 << 30,
    };
    let mut r = data.get(1..).unwrap_or_default();
    while let Ok(Some((t, len))) = protocol::frame_header(r, max) {
        assert!(len >= 5 && len - 1 <= max, "frame_header returned length {len} for max {max}");
        if r.len() < len {
            break;
        }
        let body = &r[5..len];
        match t {
            b'E' | b'N' => {
                let _ = protocol::parse_error_fields(body);
            }
            b'Q' => {
                let _ = protocol::query_text(body);
            }
            b'C' => {
                let _ = observe::tag_rows(body);
            }
            _ => {
                let mut b = body;
                while protocol::take_cstr(&mut b).is_some() {}
                let _ = protocol::take_i32(&mut b);
                let _ = protocol::take_i16(&mut b);
            }
        }
        r = &r[len..];
    }
}

/// Startup packet parser: length check, then the body.
pub fn startup(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    match protocol::startup_len([data[0], data[1], data[2], data[3]]) {
        Ok(len) => {
            assert!((8..=protocol::MAX_STARTUP_LEN).contains(&len));
            let body = &data[4..data.len().min(len)];
            let _ = protocol::parse_startup(body);
        }
        Err(_) => {
            let _ = protocol::parse_startup(&data[4..]);
        }
    }
}

fn split3(data: &[u8]) -> (u8, &[u8], &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return (0, &[], &[]) };
    let cut = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
    (sel, &rest[..cut], rest.get(cut + 1..).unwrap_or_default())
}

/// SCRAM message parsers and both state machines, fed attacker-controlled messages.
pub fn scram(data: &[u8]) {
    let _ = auth::parse_client_first(data);
    let _ = auth::parse_client_final(data);
    let _ = auth::parse_server_first(data);
    let _ = auth::parse_server_final(data);
    let _ = Secret::parse(&String::from_utf8_lossy(data));
    let (sel, first, second) = split3(data);
    // Server side: pgrelay authenticating a hostile client (with and without channel binding).
    // RFC 7677's verifier for "pencil": a stored verifier costs no PBKDF2 per input, keeping the target fast.
    let secret = Secret::parse(
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
    );
    if let Ok(mut server) = ScramServer::with_nonce(&secret, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0") {
        let mech = if sel & 1 == 1 {
            server = server.with_channel_binding(&[7u8; 32]);
            auth::SCRAM_SHA_256_PLUS
        } else {
            auth::SCRAM_SHA_256
        };
        if server.client_first_with(mech, first).is_ok() {
            if server.client_final(second).is_ok() {
                assert!(server.is_authenticated() && server.client_key().is_some());
            }
        } else {
            assert!(server.client_final(second).is_err(), "final accepted after a failed first");
        }
    }
    let mut mock = ScramServer::mock("user", b"instance");
    if mock.client_first(first).is_ok() {
        assert!(mock.client_final(second).is_err(), "a mock exchange must never succeed");
    }
    // Client side: pgrelay logging in to a hostile server.
    let cred = if sel & 2 == 2 {
        ScramCredential::Keys { client_key: [1; 32], server_key: [2; 32] }
    } else {
        ScramCredential::Password("pencil".into())
    };
    if let Ok(mut client) = ScramClient::with_nonce(cred, "rOprNGfwEbeRWgbNEkqO") {
        // Keep PBKDF2 cheap: a hostile server may ask for up to 10M iterations, which is allowed but slow.
        let cheap = auth::parse_server_first(first).map(|f| f.iterations <= 64).unwrap_or(true);
        if cheap && client.server_first(first).is_ok() {
            let _ = client.server_final(second);
        }
    }
}

/// Fingerprint normaliser: single pass over arbitrary SQL text.
pub fn fingerprint(data: &[u8]) {
    let sql = String::from_utf8_lossy(data);
    let mut out = String::new();
    let h = fingerprint::normalize(&sql, &mut out);
    assert_eq!(h, fingerprint::fingerprint(&sql), "normalize and fingerprint disagree");
    let _ = fingerprint::query_type(&sql);
}

/// Prepared-statement handling: Parse identity, Bind rewriting, session-command classification and the
/// slow-query parameter decoder, over a sequence of messages.
pub fn prepared(data: &[u8]) {
    let (_, a, b) = split3(data);
    let _ = prepared::from_parse(a, |_| 0, 0);
    let sql = String::from_utf8_lossy(a);
    let _ = prepared::classify(&sql);
    let _ = prepared::advisory(&sql);
    let mut out = BytesMut::new();
    if prepared::rewrite_bind(&mut out, b, &prepared::server_name(42)) {
        // A rewritten Bind is one well-framed message.
        let hdr = protocol::frame_header(&out, usize::MAX).ok().flatten();
        assert_eq!(hdr, Some((b'B', out.len())), "rewrite_bind framed badly");
    }
    let types = observe::parse_param_types(a);
    let _ = observe::bind_params(b, &types);
    let _ = observe::bind_params(b, &[16, 20, 21, 23, 25, 700, 701, 1700, 2950, 1114, 1184, 1082]);
}
