//! Hostile input against a real pgrelay process: every case must end in an ErrorResponse or a closed socket
//! within a bounded time, with no panic, the process still alive and still serving a normal client.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;

/// Every relay here gives up on silent clients quickly and has a small packet limit.
const HOSTILE: &str = "client_login_timeout = \"2s\"\nmax_packet_size = 4096\nmax_client_conn = 3000";

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to relay");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// One typed message, or `None` at EOF / reset.
fn read_msg(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    assert!((4..1 << 24).contains(&len), "relay sent a silly length {len}");
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).ok()?;
    Some((h[0], body))
}

/// Reads until an ErrorResponse (returns its text) or a closed socket (returns ""), failing after 5 s.
fn error_or_close(s: &mut TcpStream) -> String {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(6), "neither an error nor a close in time");
        match read_msg(s) {
            None => {
                // A read timeout is not a close.
                assert!(start.elapsed() < Duration::from_secs(5), "socket neither answered nor closed");
                return String::new();
            }
            Some((b'E', body)) => return String::from_utf8_lossy(&body).into_owned(),
            Some(_) => {}
        }
    }
}

/// The process is alive and a normal client still gets an answer.
fn still_serving(relay: &mut Relay) {
    let child = relay.child.as_mut().expect("running");
    assert!(child.try_wait().unwrap().is_none(), "pgrelay exited: {}", relay.log());
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", "select 1").unwrap(), "1");
    assert!(!relay.log().contains("panicked"), "{}", relay.log());
}

fn startup_packet(user: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    pgrelay::protocol::startup_message(&mut out, &[("user", user), ("database", "postgres")]);
    out.to_vec()
}

/// Logs in as `postgres` with SCRAM over a raw socket; returns it after the first ReadyForQuery.
fn raw_login(port: u16) -> TcpStream {
    let mut s = connect(port);
    s.write_all(&startup_packet("postgres")).unwrap();
    let (t, _) = read_msg(&mut s).expect("auth request");
    assert_eq!(t, b'R');
    let mut scram = pgrelay::auth::ScramClient::new(pgrelay::auth::ScramCredential::Password(PASSWORD.into()));
    let mut out = BytesMut::new();
    pgrelay::protocol::sasl_initial_response(&mut out, "SCRAM-SHA-256", &scram.client_first());
    s.write_all(&out).unwrap();
    let (_, body) = read_msg(&mut s).expect("SASLContinue");
    let fin = scram.server_first(&body[4..]).unwrap();
    out.clear();
    pgrelay::protocol::sasl_response(&mut out, &fin);
    s.write_all(&out).unwrap();
    loop {
        let (t, _) = read_msg(&mut s).expect("login");
        if t == b'Z' {
            return s;
        }
    }
}

fn frame(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Runs `select 1` on a logged-in raw socket.
fn raw_select_1(s: &mut TcpStream) {
    s.write_all(&frame(b'Q', b"select 1\0")).unwrap();
    let mut row = false;
    loop {
        let (t, _) = read_msg(s).expect("query answer");
        row |= t == b'D';
        if t == b'Z' {
            break;
        }
    }
    assert!(row);
}

#[test]
fn startup_packets_with_silly_lengths() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, HOSTILE, "");
    for len in [0u32, 3, 7, 10_001, 1 << 31, u32::MAX] {
        let mut s = connect(relay.port);
        s.write_all(&len.to_be_bytes()).unwrap();
        s.write_all(&[0, 3, 0, 0]).unwrap();
        let e = error_or_close(&mut s);
        assert!(e.is_empty() || e.contains("invalid startup packet"), "{len}: {e}");
    }
    // A length of 8 that is no known request: a bad protocol version.
    let mut s = connect(relay.port);
    s.write_all(&[0, 0, 0, 8, 0x12, 0x34, 0x56, 0x78]).unwrap();
    assert!(error_or_close(&mut s).contains("unsupported frontend protocol"));
    // A direct TLS ClientHello (PostgreSQL 17 sslnegotiation=direct) while TLS is not configured: closed, logged.
    let mut s = connect(relay.port);
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00]).unwrap();
    assert_eq!(error_or_close(&mut s), "", "a TLS record must get a close, not an answer");
    assert!(relay.log().contains("direct TLS handshake but TLS is not configured"), "{}", relay.log());
    still_serving(&mut relay);
}

#[test]
fn truncated_frames_then_close() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, HOSTILE, "");
    // Startup packet announcing 100 bytes, 20 sent, then the client goes away.
    let mut s = connect(relay.port);
    let mut p = 100u32.to_be_bytes().to_vec();
    p.extend_from_slice(&[0, 3, 0, 0, b'u', b's', b'e', b'r', 0, b'p', b'o', b's', b't', b'g', b'r', b'e']);
    s.write_all(&p).unwrap();
    drop(s);
    // SASLInitialResponse cut short.
    let mut s = connect(relay.port);
    s.write_all(&startup_packet("postgres")).unwrap();
    let _ = read_msg(&mut s);
    s.write_all(&[b'p', 0, 0, 0, 50, b'S', b'C']).unwrap();
    drop(s);
    // After login: a Query header promising 1000 bytes, 10 sent, then close.
    for _ in 0..5 {
        let mut s = raw_login(relay.port);
        s.write_all(&[b'Q', 0, 0, 3, 232, b's', b'e', b'l', b'e', b'c', b't', b' ', b'1', 0, 0]).unwrap();
        drop(s);
    }
    // The same inside an open transaction.
    let mut s = raw_login(relay.port);
    s.write_all(&frame(b'Q', b"begin\0")).unwrap();
    while read_msg(&mut s).expect("begin").0 != b'Z' {}
    s.write_all(&[b'P', 0, 0, 0, 200, 0]).unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    still_serving(&mut relay);
}

#[test]
fn length_beyond_max_packet_size_and_below_four() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, HOSTILE, "");
    for len in [5000u32, 1 << 30, u32::MAX, 3, 0] {
        let mut s = raw_login(relay.port);
        let mut m = vec![b'Q'];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(b"select 1\0");
        s.write_all(&m).unwrap();
        let e = error_or_close(&mut s);
        assert!(e.is_empty() || e.contains("08P01") || e.contains("max_packet_size"), "{len}: {e}");
    }
    // A big but allowed message still works.
    let mut s = raw_login(relay.port);
    let q = format!("select '{}' is not null\0", "x".repeat(3000));
    s.write_all(&frame(b'Q', q.as_bytes())).unwrap();
    while read_msg(&mut s).expect("answer").0 != b'Z' {}
    still_serving(&mut relay);
}

#[test]
fn unknown_message_types() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, HOSTILE, "");
    for t in [b'z', 0u8, 0xff, b'R', b'T'] {
        let mut s = raw_login(relay.port);
        s.write_all(&frame(t, b"hello\0")).unwrap();
        s.write_all(&frame(b'S', b"")).unwrap();
        // An error (from pgrelay or PostgreSQL) or a close; if the session survives, it still works.
        let e = error_or_close(&mut s);
        if !e.is_empty() {
            if let Some((b'Z', _)) = read_msg(&mut s) {
                raw_select_1(&mut s);
            }
        }
    }
    still_serving(&mut relay);
}

#[test]
fn garbage_after_a_valid_startup_packet() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, HOSTILE, "");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        let mut p = startup_packet("postgres");
        for _ in 0..(50 + round * 37) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            p.push(seed as u8);
        }
        let mut s = connect(relay.port);
        s.write_all(&p).unwrap();
        error_or_close(&mut s);
    }
    still_serving(&mut relay);
}

#[test]
fn silent_client_is_closed_by_client_login_timeout() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, "client_login_timeout = \"1s\"", "");
    let start = Instant::now();
    let mut silent = connect(relay.port);
    let mut buf = Vec::new();
    let _ = silent.read_to_end(&mut buf);
    let took = start.elapsed();
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
    // Half a startup packet is no better.
    let start = Instant::now();
    let mut slow = connect(relay.port);
    slow.write_all(&[0, 0, 0, 40, 0, 3]).unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(start.elapsed() < Duration::from_millis(2500));
    still_serving(&mut relay);
}

fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn two_thousand_half_open_connections() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, "client_login_timeout = \"20s\"\nmax_client_conn = 3000", "");
    let pid = relay.child.as_ref().unwrap().id();
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", "select 1").unwrap(), "1");
    let before = vm_rss_kb(pid);
    let mut socks = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        s.write_all(&[0, 0, 0]).unwrap();
        socks.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", "select 2").unwrap(), "2");
    assert!(start.elapsed() < Duration::from_secs(3), "normal client slowed to {:?}", start.elapsed());
    let during = vm_rss_kb(pid);
    eprintln!("VmRSS before {before} kB, with 2000 half-open connections {during} kB");
    assert!(during < before + 150 * 1024, "RSS grew from {before} kB to {during} kB");
    drop(socks);
    still_serving(&mut relay);
}

/// Malformed SASLInitialResponse / SASLResponse messages get a FATAL and a close, never a panic.
#[test]
fn scram_with_malformed_attributes() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, HOSTILE, "");
    let initial = |mech: &str, data: &[u8]| {
        let mut out = BytesMut::new();
        pgrelay::protocol::sasl_initial_response(&mut out, mech, data);
        out.to_vec()
    };
    let mut bad_first: Vec<Vec<u8>> = vec![
        initial("SCRAM-SHA-1", b"n,,n=,r=abc"),
        initial("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"),
        initial("SCRAM-SHA-256", b""),
        initial("SCRAM-SHA-256", b"x,,n=,r=abc"),
        initial("SCRAM-SHA-256", b"n,a=admin,n=,r=abc"),
        initial("SCRAM-SHA-256", b"n,,r=abc"),
        initial("SCRAM-SHA-256", b"n,,n=,r="),
        initial("SCRAM-SHA-256", b"n,,n=,r=a\x01b"),
        initial("SCRAM-SHA-256", b"n,,n=,r=abc,m=ext"),
        initial("SCRAM-SHA-256", b"n,,n=,r=abc,r=def"),
        initial("SCRAM-SHA-256", b"p=tls-unique,,n=,r=abc"),
        initial("SCRAM-SHA-256", "n,,n=\u{fffd}=2C,r=abc".as_bytes()),
        initial("SCRAM-SHA-256", b"n,,n=,r=abc\0junk"),
        initial("SCRAM-SHA-256", &vec![b'a'; 9000]),
    ];
    // Length field disagreeing with the data, and a negative one.
    let mut m = initial("SCRAM-SHA-256", b"n,,n=,r=abc");
    let at = m.len() - 11 - 4;
    m[at..at + 4].copy_from_slice(&1000i32.to_be_bytes());
    bad_first.push(m.clone());
    m[at..at + 4].copy_from_slice(&(-5i32).to_be_bytes());
    bad_first.push(m);
    bad_first.push(frame(b'p', b"SCRAM-SHA-256"));
    bad_first.push(frame(b'Q', b"select 1\0"));
    for (i, msg) in bad_first.iter().enumerate() {
        let mut s = connect(relay.port);
        s.write_all(&startup_packet("postgres")).unwrap();
        let (t, _) = read_msg(&mut s).expect("auth request");
        assert_eq!(t, b'R');
        s.write_all(msg).unwrap();
        let e = error_or_close(&mut s);
        assert!(!e.is_empty(), "case {i}: expected an ErrorResponse");
        assert!(read_msg(&mut s).is_none(), "case {i}: socket must close after the error");
    }
    // A good first message, then malformed finals.
    type Final = Box<dyn Fn(&str) -> Vec<u8>>;
    let finals: Vec<Final> = vec![
        Box::new(|_| b"c=biws,r=wrongnonce,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_vec()),
        Box::new(|n| format!("c=biws,r={n},p=!!!notbase64").into_bytes()),
        Box::new(|n| format!("c=biws,r={n}").into_bytes()),
        Box::new(|n| format!("c=eSws,r={n},p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").into_bytes()),
        Box::new(|n| format!("r={n},c=biws,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").into_bytes()),
        Box::new(|n| format!("c=biws,r={n},p=AAAA").into_bytes()),
        Box::new(|_| Vec::new()),
        Box::new(|_| vec![0xff; 300]),
    ];
    for (i, f) in finals.iter().enumerate() {
        let mut s = connect(relay.port);
        s.write_all(&startup_packet("postgres")).unwrap();
        read_msg(&mut s).expect("auth request");
        s.write_all(&initial("SCRAM-SHA-256", b"n,,n=,r=clientnonce")).unwrap();
        let (_, body) = read_msg(&mut s).expect("SASLContinue");
        let server_first = String::from_utf8_lossy(&body[4..]).into_owned();
        let nonce = server_first.strip_prefix("r=").and_then(|r| r.split(',').next()).unwrap().to_string();
        let mut out = BytesMut::new();
        pgrelay::protocol::sasl_response(&mut out, &f(&nonce));
        s.write_all(&out).unwrap();
        let e = error_or_close(&mut s);
        assert!(e.contains("28P01") || e.contains("08P01") || e.is_empty(), "final {i}: {e}");
    }
    still_serving(&mut relay);
}

/// An unknown user gets the same SCRAM exchange as a known one and fails only at the proof.
#[test]
fn unknown_user_cannot_be_told_from_a_wrong_password() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, HOSTILE, "");
    let attempt = |user: &str| -> (Vec<u8>, String) {
        let mut s = connect(relay.port);
        s.write_all(&startup_packet(user)).unwrap();
        let (t, sasl) = read_msg(&mut s).expect("auth request");
        assert_eq!(t, b'R');
        let mut scram = pgrelay::auth::ScramClient::new(pgrelay::auth::ScramCredential::Password("wrong".into()));
        let mut out = BytesMut::new();
        pgrelay::protocol::sasl_initial_response(&mut out, "SCRAM-SHA-256", &scram.client_first());
        s.write_all(&out).unwrap();
        let (t, body) = read_msg(&mut s).expect("SASLContinue");
        assert_eq!(t, b'R');
        let server_first = String::from_utf8_lossy(&body[4..]).into_owned();
        let salt = server_first.split(',').nth(1).unwrap().to_string();
        let fin = scram.server_first(&body[4..]).unwrap();
        out.clear();
        pgrelay::protocol::sasl_response(&mut out, &fin);
        s.write_all(&out).unwrap();
        let e = error_or_close(&mut s);
        assert!(e.contains("28P01") && e.contains("password authentication failed"), "{user}: {e}");
        (sasl, salt)
    };
    let (known_sasl, _) = attempt("postgres");
    let (unknown_sasl, salt1) = attempt("nobody");
    let (_, salt2) = attempt("nobody");
    assert_eq!(known_sasl, unknown_sasl, "same mechanisms offered");
    assert_eq!(salt1, salt2, "an unknown user's salt is stable, like a real one");
    still_serving(&mut relay);
}

fn bind(params: u16, values: usize) -> Vec<u8> {
    let mut b = vec![0u8, 0u8]; // portal "", statement ""
    b.extend_from_slice(&0u16.to_be_bytes()); // no format codes
    b.extend_from_slice(&params.to_be_bytes());
    for _ in 0..values {
        b.extend_from_slice(&(-1i32).to_be_bytes()); // NULL
    }
    b.extend_from_slice(&0u16.to_be_bytes()); // no result formats
    frame(b'B', &b)
}

#[test]
fn bind_with_65535_parameters_and_a_bogus_count() {
    let pg = Pg::start();
    let mut relay = Relay::start(&pg, "client_login_timeout = \"2s\"", "");
    // 65535 NULL parameters for a statement that takes none: PostgreSQL's error, then the session goes on.
    let mut s = raw_login(relay.port);
    let mut m = frame(b'P', b"\0select 1\0\0\0");
    m.extend(bind(65535, 65535));
    m.extend(frame(b'E', b"\0\0\0\0\0"));
    m.extend(frame(b'S', b""));
    s.write_all(&m).unwrap();
    let e = error_or_close(&mut s);
    assert!(e.contains("65535") || e.contains("08P01"), "{e}");
    while read_msg(&mut s).expect("ReadyForQuery").0 != b'Z' {}
    raw_select_1(&mut s);
    // A count of 1000 with no values behind it; and 65535 parameters for a statement that has them.
    for m in [bind(1000, 0), bind(65535, 3)] {
        let mut s = raw_login(relay.port);
        let mut all = frame(b'P', b"\0select 1\0\0\0");
        all.extend(m);
        all.extend(frame(b'S', b""));
        s.write_all(&all).unwrap();
        let e = error_or_close(&mut s);
        assert!(!e.is_empty(), "expected an error");
    }
    let mut s = raw_login(relay.port);
    // A statement that declares 65535 int4 parameters and returns the last one.
    let mut body = b"\0select $65535\0".to_vec();
    body.extend_from_slice(&65535u16.to_be_bytes());
    for _ in 0..65535 {
        body.extend_from_slice(&23u32.to_be_bytes());
    }
    let mut all = frame(b'P', &body);
    let mut b = vec![0u8, 0u8, 0, 0];
    b.extend_from_slice(&65535u16.to_be_bytes());
    for i in 0..65535u32 {
        let v = i.to_string();
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    b.extend_from_slice(&0u16.to_be_bytes());
    all.extend(frame(b'B', &b));
    all.extend(frame(b'E', b"\0\0\0\0\0"));
    all.extend(frame(b'S', b""));
    s.write_all(&all).unwrap();
    let mut got = None;
    loop {
        match read_msg(&mut s).expect("answer") {
            (b'D', body) => got = Some(String::from_utf8_lossy(&body[6..]).into_owned()),
            (b'E', body) => panic!("{}", String::from_utf8_lossy(&body)),
            (b'Z', _) => break,
            _ => {}
        }
    }
    assert_eq!(got.as_deref(), Some("65534"));
    still_serving(&mut relay);
}
