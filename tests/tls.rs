//! TLS and authentication against a real PostgreSQL: psql with sslmode=require/verify-full through pgrelay,
//! plaintext refused under `require`, direct TLS, certificate reload, `[server_tls]` modes, SCRAM channel
//! binding (towards clients and on pgrelay's own login), cancel requests over TLS, and SCRAM passthrough with
//! only a verifier in the userlist. Certificates are made with openssl.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test CA and a server certificate it signed.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl not found");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes `<name>-ca.crt` and a server certificate for `san` (e.g. "DNS:localhost,IP:127.0.0.1") in `dir`.
fn make_certs(dir: &Path, name: &str, san: &str) -> Certs {
    make_certs_signed(dir, name, san, "-sha256")
}

/// Like `make_certs`, the server certificate signed with `digest` (e.g. "-sha384").
fn make_certs_signed(dir: &Path, name: &str, san: &str, digest: &str) -> Certs {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.crt");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        "/CN=pgrelay test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &args);
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    openssl(dir, &args);
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
            digest,
        ],
    );
    Certs { ca: dir.join(ca), cert: dir.join(crt), key: dir.join(key) }
}

fn tls_section(c: &Certs, mode: &str) -> String {
    format!("[tls]\nmode = \"{mode}\"\ncert = \"{}\"\nkey = \"{}\"\n", c.cert.display(), c.key.display())
}

/// psql through the relay with libpq environment settings (sslmode, sslrootcert, channel_binding...).
fn psql_env(port: u16, host: &str, env: &[(&str, &str)], sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", host, "-U", "postgres", "-d", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[test]
fn psql_require_and_verify_full_through_the_relay() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "relay", "DNS:localhost,IP:127.0.0.1");
    let relay = Relay::start(&pg, "", &tls_section(&c, "allow"));
    let ca = c.ca.to_str().unwrap();
    // sslmode=require: encrypted, certificate not checked.
    let info = psql_env(relay.port, "localhost", &[("PGSSLMODE", "require")], "\\conninfo").unwrap();
    assert!(info.contains("SSL connection"), "{info}");
    // verify-full against the test CA, by name and by IP address.
    for host in ["localhost", "127.0.0.1"] {
        let out = psql_env(
            relay.port,
            host,
            &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca)],
            "select 'through ' || current_user",
        )
        .unwrap();
        assert_eq!(out, "through postgres");
    }
    // The client list says TLS (while a TLS client is connected).
    let mut sleeper = Command::new("psql")
        .args(["-X", "-h", "localhost", "-U", "postgres", "-d", "postgres", "-c", "select pg_sleep(3)"])
        .arg("-p")
        .arg(relay.port.to_string())
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLMODE", "require")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let clients = Command::new("psql")
        .args(["-X", "-A", "-t", "-h", "localhost", "-U", "pgrelay", "-d", "pgrelay", "-c", "show clients"])
        .arg("-p")
        .arg(relay.port.to_string())
        .env("PGPASSWORD", "admin")
        .env("PGSSLMODE", "require")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&clients.stdout).contains("TLS"), "{clients:?}");
    let _ = sleeper.wait();
    // A different CA does not verify.
    let other = make_certs(tmp.path(), "other", "DNS:localhost");
    let e = psql_env(
        relay.port,
        "localhost",
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", other.ca.to_str().unwrap())],
        "select 1",
    )
    .unwrap_err();
    assert!(e.contains("certificate verify failed"), "{e}");
    // allow: plaintext still works.
    assert_eq!(psql_env(relay.port, "127.0.0.1", &[("PGSSLMODE", "disable")], "select 1").unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_refused_under_require() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "relay", "DNS:localhost,IP:127.0.0.1");
    let relay = Relay::start(&pg, "", &tls_section(&c, "require"));
    let e = psql_env(relay.port, "127.0.0.1", &[("PGSSLMODE", "disable")], "select 1").unwrap_err();
    assert!(e.contains("SSL required"), "{e}");
    let Err(e) = try_connect(&relay.url("postgres", PASSWORD)).await else { panic!("plaintext must be refused") };
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    assert_eq!(msg(&e), "SSL required");
    // The admin console too.
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-U", "pgrelay", "-d", "pgrelay", "-c", "show version"])
        .arg("-p")
        .arg(relay.port.to_string())
        .env("PGPASSWORD", "admin")
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Encrypted is fine.
    assert_eq!(psql_env(relay.port, "localhost", &[("PGSSLMODE", "require")], "select 1").unwrap(), "1");
}

#[test]
fn channel_binding_required_by_psql() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "relay", "DNS:localhost,IP:127.0.0.1");
    let relay = Relay::start(&pg, "", &tls_section(&c, "allow"));
    let ca = c.ca.to_str().unwrap();
    let env = [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca), ("PGCHANNELBINDING", "require")];
    assert_eq!(psql_env(relay.port, "localhost", &env, "select 7").unwrap(), "7");
    // A wrong password still fails with channel binding.
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-h", "localhost", "-U", "postgres", "-d", "postgres", "-c", "select 1"])
        .arg("-p")
        .arg(relay.port.to_string())
        .env("PGPASSWORD", "wrong")
        .envs(env)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"), "{out:?}");
    // Without TLS there is nothing to bind to: libpq refuses on its side.
    let e = psql_env(relay.port, "127.0.0.1", &[("PGSSLMODE", "disable"), ("PGCHANNELBINDING", "require")], "select 1")
        .unwrap_err();
    assert!(e.contains("channel binding"), "{e}");
}

fn test_tls_client(ca: &Path, alpn: Option<&[u8]>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in pgrelay::tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(a) = alpn {
        cfg.alpn_protocols = vec![a.to_vec()];
    }
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn read_msg<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let mut h = [0u8; 5];
    s.read_exact(&mut h).await.expect("message header");
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.expect("message body");
    (h[0], body)
}

/// Logs in with SCRAM (plain SCRAM-SHA-256, since the test client has no channel binding) and runs a query.
async fn login_and_query<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> Vec<String> {
    let mut out = BytesMut::new();
    pgrelay::protocol::startup_message(&mut out, &[("user", "postgres"), ("database", "postgres")]);
    s.write_all(&out).await.unwrap();
    let (t, body) = read_msg(s).await;
    assert_eq!(t, b'R');
    let mechs: Vec<String> =
        body[4..].split(|b| *b == 0).filter(|m| !m.is_empty()).map(|m| String::from_utf8_lossy(m).into()).collect();
    let mut scram = pgrelay::auth::ScramClient::new(pgrelay::auth::ScramCredential::Password(PASSWORD.into()));
    out.clear();
    pgrelay::protocol::sasl_initial_response(&mut out, "SCRAM-SHA-256", &scram.client_first());
    s.write_all(&out).await.unwrap();
    let (t, body) = read_msg(s).await;
    assert_eq!((t, &body[..4]), (b'R', &11i32.to_be_bytes()[..]));
    let fin = scram.server_first(&body[4..]).unwrap();
    out.clear();
    pgrelay::protocol::sasl_response(&mut out, &fin);
    s.write_all(&out).await.unwrap();
    let (t, body) = read_msg(s).await;
    assert_eq!((t, &body[..4]), (b'R', &12i32.to_be_bytes()[..]));
    scram.server_final(&body[4..]).unwrap();
    loop {
        let (t, _) = read_msg(s).await;
        if t == b'Z' {
            break;
        }
    }
    out.clear();
    pgrelay::protocol::query(&mut out, "select 'direct'");
    s.write_all(&out).await.unwrap();
    let mut row = None;
    loop {
        let (t, body) = read_msg(s).await;
        match t {
            b'D' => row = Some(String::from_utf8_lossy(&body[6..]).into_owned()),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(row.as_deref(), Some("direct"));
    mechs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_and_ssl_request_with_a_rustls_client() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "relay", "DNS:localhost,IP:127.0.0.1");
    let relay = Relay::start(&pg, "", &tls_section(&c, "require"));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // 1. Direct TLS (sslnegotiation=direct): ClientHello first, ALPN "postgresql".
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
    let mut s = test_tls_client(&c.ca, Some(b"postgresql")).connect(name.clone(), tcp).await.unwrap();
    let mechs = login_and_query(&mut s).await;
    assert_eq!(mechs, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], "PLUS is offered over TLS");

    // 2. Direct TLS without ALPN is closed after the handshake.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
    if let Ok(mut s) = test_tls_client(&c.ca, None).connect(name.clone(), tcp).await {
        let mut out = BytesMut::new();
        pgrelay::protocol::startup_message(&mut out, &[("user", "postgres"), ("database", "postgres")]);
        let _ = s.write_all(&out).await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("closed in time");
        assert!(r.is_err() || buf.is_empty(), "no protocol without ALPN: {buf:?}");
    }

    // 3. A different ALPN protocol fails the handshake.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
    assert!(test_tls_client(&c.ca, Some(b"http/1.1")).connect(name.clone(), tcp).await.is_err());

    // 4. SSLRequest then the handshake on exactly the following bytes.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.unwrap();
    assert_eq!(b[0], b'S');
    let mut s = test_tls_client(&c.ca, None).connect(name, tcp).await.unwrap();
    login_and_query(&mut s).await;
    let e = psql_env(relay.port, "127.0.0.1", &[("PGSSLMODE", "disable")], "select 1").unwrap_err();
    assert!(e.contains("SSL required"), "{e}");
}

/// Bytes after the SSLRequest, sent before the answer, are refused (CVE-2021-23214 class).
#[test]
fn data_after_ssl_request_is_refused() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "relay", "DNS:localhost");
    let relay = Relay::start(&pg, "", &tls_section(&c, "allow"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut pkt = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    pkt.extend_from_slice(b"\0\0\0\x2a\0\x03\0\0user\0postgres\0database\0postgres\0\0");
    s.write_all(&pkt).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert_eq!(buf.first(), Some(&b'E'), "{buf:?}");
    assert!(String::from_utf8_lossy(&buf).contains("unencrypted data after SSL request"));
    assert_eq!(psql_env(relay.port, "localhost", &[("PGSSLMODE", "require")], "select 1").unwrap(), "1");
}

#[test]
fn certificate_reloaded_on_sighup() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = make_certs(tmp.path(), "a", "DNS:localhost");
    let b = make_certs(tmp.path(), "b", "DNS:localhost");
    let live_cert = tmp.path().join("live.crt");
    let live_key = tmp.path().join("live.key");
    std::fs::copy(&a.cert, &live_cert).unwrap();
    std::fs::copy(&a.key, &live_key).unwrap();
    let live = Certs { ca: a.ca.clone(), cert: live_cert.clone(), key: live_key.clone() };
    let relay = Relay::start(&pg, "", &tls_section(&live, "require"));
    let verify = |ca: &Path| {
        psql_env(
            relay.port,
            "localhost",
            &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca.to_str().unwrap())],
            "select 1",
        )
    };
    assert_eq!(verify(&a.ca).unwrap(), "1");
    assert!(verify(&b.ca).is_err());
    std::fs::copy(&b.cert, &live_cert).unwrap();
    std::fs::copy(&b.key, &live_key).unwrap();
    relay.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while verify(&b.ca).is_err() {
        assert!(std::time::Instant::now() < deadline, "new certificate not served: {}", relay.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(verify(&a.ca).is_err());
    // A broken key file is a failed reload: the old certificate stays.
    std::fs::write(&live_key, "not a key").unwrap();
    relay.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(verify(&b.ca).unwrap(), "1");
    assert!(relay.log().contains("config reload failed"), "{}", relay.log());
}

/// Turns on ssl in the test PostgreSQL with the given certificate and key.
fn pg_ssl_on(pg: &Pg, c: &Certs) {
    let data = pg.data();
    std::fs::copy(&c.cert, data.join("server.crt")).unwrap();
    std::fs::copy(&c.key, data.join("server.key")).unwrap();
    for f in ["server.crt", "server.key"] {
        let p = data.join(f);
        assert!(Command::new("chown").arg("postgres:postgres").arg(&p).status().unwrap().success());
        assert!(Command::new("chmod").arg("600").arg(&p).status().unwrap().success());
    }
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
    writeln!(conf, "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'").unwrap();
    drop(conf);
    pg.restart();
}

fn server_tls(mode: &str, ca: &Path) -> String {
    format!("[server_tls]\nmode = \"{mode}\"\nca_file = \"{}\"\n", ca.display())
}

const SSL_IN_USE: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

#[test]
fn server_tls_modes() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    // The server's certificate names another host, so verify-full to 127.0.0.1 must fail and verify-ca pass.
    let c = make_certs(tmp.path(), "db", "DNS:db.example");
    let wrong = make_certs(tmp.path(), "wrong", "DNS:db.example");
    pg_ssl_on(&pg, &c);
    let through = |section: &str| {
        let relay = Relay::start(&pg, "server_connect_timeout = \"3s\"\nquery_wait_timeout = \"3s\"", section);
        let r = relay.psql("postgres", PASSWORD, "postgres", SSL_IN_USE);
        (r, relay.log())
    };
    for mode in ["prefer", "require", "verify-ca"] {
        let (r, log) = through(&server_tls(mode, &c.ca));
        assert_eq!(r.as_deref(), Ok("t"), "{mode}: {log}");
    }
    let (r, _) = through(&server_tls("disable", &c.ca));
    assert_eq!(r.as_deref(), Ok("f"));
    let (r, log) = through(&server_tls("verify-full", &c.ca));
    assert!(r.is_err(), "verify-full must check the name");
    assert!(log.contains("tls handshake with server"), "{log}");
    let (r, log) = through(&server_tls("verify-ca", &wrong.ca));
    assert!(r.is_err(), "verify-ca must check the chain");
    assert!(log.contains("tls handshake with server"), "{log}");

    // verify-full passes with a certificate for the address pgrelay dials.
    let good = make_certs(tmp.path(), "good", "DNS:localhost,IP:127.0.0.1");
    let pg2 = Pg::start();
    pg_ssl_on(&pg2, &good);
    let relay = Relay::start(&pg2, "", &server_tls("verify-full", &good.ca));
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", SSL_IN_USE).unwrap(), "t");
}

#[test]
fn server_tls_require_fails_without_server_ssl_and_prefer_falls_back() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "db", "DNS:localhost");
    let relay = Relay::start(&pg, "query_wait_timeout = \"3s\"", &server_tls("require", &c.ca));
    let e = relay.psql("postgres", PASSWORD, "postgres", "select 1").unwrap_err();
    assert!(e.contains("could not connect to server"), "{e}");
    assert!(relay.log().contains("server does not support SSL"), "{}", relay.log());
    let relay = Relay::start(&pg, "", &server_tls("prefer", &c.ca));
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", SSL_IN_USE).unwrap(), "f");
}

/// The userlist holds only PostgreSQL's SCRAM verifier: pgrelay logs in to the SCRAM-only server with the
/// ClientKey recovered from the client's proof, over TLS on both sides, with channel binding towards the client.
#[test]
fn scram_passthrough_with_only_a_verifier() {
    let pg = Pg::start();
    let verifier = pg.psql("select rolpassword from pg_authid where rolname = 'postgres'");
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "both", "DNS:localhost,IP:127.0.0.1");
    pg_ssl_on(&pg, &c);
    let tail = format!("{}\n{}", tls_section(&c, "require"), server_tls("verify-full", &c.ca));
    let relay = Relay::start(&pg, "", &tail);
    std::fs::write(relay.dir.path().join("userlist.txt"), format!("\"postgres\" \"{verifier}\"\n")).unwrap();
    // app.rs installs its SIGHUP handler after the port opens; a signal before that would end the process.
    std::thread::sleep(Duration::from_millis(1000));
    relay.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    let env =
        [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", c.ca.to_str().unwrap()), ("PGCHANNELBINDING", "require")];
    assert_eq!(psql_env(relay.port, "localhost", &env, SSL_IN_USE).unwrap(), "t");
    // A wrong password does not get in, and nothing secret reaches the log.
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-h", "localhost", "-U", "postgres", "-d", "postgres", "-c", "select 1"])
        .arg("-p")
        .arg(relay.port.to_string())
        .env("PGPASSWORD", "wrong")
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = relay.log();
    let stored_key = verifier.split('$').nth(2).and_then(|k| k.split(':').next()).unwrap();
    assert!(!log.contains(stored_key) && !log.contains(PASSWORD), "secret in log: {log}");
}

/// Replaces the test PostgreSQL's pg_hba.conf and reloads it.
fn set_pg_hba(pg: &Pg, lines: &str) {
    std::fs::write(pg.data().join("pg_hba.conf"), lines).unwrap();
    let out = Command::new("kill").arg("-HUP").arg(pg_postmaster_pid(pg)).status().unwrap();
    assert!(out.success());
    // The postmaster rereads the file on SIGHUP; give it a moment before the next connection.
    std::thread::sleep(Duration::from_millis(500));
}

fn pg_postmaster_pid(pg: &Pg) -> String {
    let pid = std::fs::read_to_string(pg.data().join("postmaster.pid")).unwrap();
    pid.lines().next().unwrap().trim().to_string()
}

/// pgrelay's own login binds to the TLS session. `channel_binding = "require"` gets in over TLS to a SCRAM
/// server, which proves SCRAM-SHA-256-PLUS was used (require accepts no other way in), and fails with an
/// error naming the reason against a server that lets pgrelay in otherwise. The certificate is signed with
/// SHA-384, so PostgreSQL only accepts the binding if pgrelay hashed it per RFC 5929 (SHA-384, not SHA-256).
#[test]
fn server_channel_binding() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs_signed(tmp.path(), "db", "DNS:localhost,IP:127.0.0.1", "-sha384");
    pg_ssl_on(&pg, &c);
    let extra = "server_connect_timeout = \"3s\"\nquery_wait_timeout = \"3s\"";
    let through = |mode: &str, cb: &str, pg: &Pg| {
        let section = format!("{}channel_binding = \"{cb}\"\n", server_tls(mode, &c.ca));
        let relay = Relay::start(pg, extra, &section);
        let r = relay.psql("postgres", PASSWORD, "postgres", SSL_IN_USE);
        (r, relay.log())
    };

    // 1. SCRAM over TLS: every policy gets in; require only with SCRAM-SHA-256-PLUS.
    for (mode, cb) in [("verify-full", "require"), ("require", "require"), ("require", "prefer"), ("prefer", "disable")]
    {
        let (r, log) = through(mode, cb, &pg);
        assert_eq!(r.as_deref(), Ok("t"), "{mode}/{cb}: {log}");
    }

    // 2. A server that lets pgrelay in without authenticating itself (trust), or asks for a cleartext
    //    password: require refuses before sending anything; prefer carries on.
    for (method, why) in [("trust", "let pgrelay in without channel binding"), ("password", "asked for a password")] {
        set_pg_hba(&pg, &format!("local all all trust\nhost all all 127.0.0.1/32 {method}\n"));
        let (r, log) = through("require", "require", &pg);
        let e = r.unwrap_err();
        assert!(e.contains("could not connect to server"), "{method}: {e}");
        assert!(log.contains(why), "{method}: {log}");
        let (r, log) = through("require", "prefer", &pg);
        assert_eq!(r.as_deref(), Ok("t"), "{method}: {log}");
    }

    // 3. Without TLS there is nothing to bind to: the error says so, and the client sees it.
    let plain = Pg::start();
    let (r, log) = through("prefer", "require", &plain);
    let e = r.unwrap_err();
    assert!(e.contains("channel_binding is require but the connection to the server is not TLS"), "{e}\n{log}");
    let (r, log) = through("prefer", "prefer", &plain);
    assert_eq!(r.as_deref(), Ok("f"), "{log}");

    // 4. require without any TLS towards the server is a config error.
    let relay_dir = tempfile::tempdir().unwrap();
    let cfg = relay_dir.path().join("proxy.toml");
    std::fs::write(&cfg, "[server_tls]\nchannel_binding = \"require\"\n[auth]\ntype = \"trust\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgrelay")).arg("check").arg("--config").arg(&cfg).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("server_tls.channel_binding"), "{text}");
}

const SSL_REQUEST_HEAD: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const CANCEL_HEAD: [u8; 8] = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];

/// A TCP forwarder to PostgreSQL that records the first 8 bytes of every connection made through it: enough
/// to tell an SSLRequest from a plaintext CancelRequest or StartupMessage. It only relays; PostgreSQL answers.
async fn recording_forwarder(to: u16) -> (u16, Arc<std::sync::Mutex<Vec<[u8; 8]>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                if inbound.read_exact(&mut head).await.is_err() {
                    return;
                }
                rec.lock().unwrap().push(head);
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else { return };
                if outbound.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, seen)
}

/// A client's cancel reaches a `hostssl`-only PostgreSQL over TLS. PostgreSQL handles a CancelRequest before
/// pg_hba, so it would honour a plaintext one too: the forwarder in between is what tells them apart, and it
/// must have seen only SSLRequests, including on the connection that carried the cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_goes_to_the_server_over_tls() {
    let pg = Pg::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "db", "DNS:localhost,IP:127.0.0.1");
    pg_ssl_on(&pg, &c);
    set_pg_hba(
        &pg,
        "local all all scram-sha-256\nhostnossl all all 0.0.0.0/0 reject\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
    );
    let (fwd, seen) = recording_forwarder(pg.port).await;
    for mode in ["prefer", "require", "verify-full"] {
        let relay = Relay::start_at(fwd, "", &server_tls(mode, &c.ca));
        let client = relay.connect().await;
        let token = client.cancel_token();
        let query = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await.map(|_| ()) });
        let started = std::time::Instant::now();
        while pg.psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'")
            != "1"
        {
            assert!(started.elapsed() < Duration::from_secs(10), "{mode}: query never started: {}", relay.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = seen.lock().unwrap().len();
        let t0 = std::time::Instant::now();
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), query).await.expect("cancelled in time").unwrap();
        let e = r.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{mode}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{mode}: cancel took {:?}", t0.elapsed());
        let heads = seen.lock().unwrap().clone();
        assert!(heads.len() > before, "{mode}: the cancel did not go through the forwarder");
        assert!(heads.iter().all(|h| *h == SSL_REQUEST_HEAD), "{mode}: plaintext towards the server: {heads:?}");
        seen.lock().unwrap().clear();
    }
}

/// What a one-shot local listener, standing in for the server on the cancel leg, received.
#[derive(Debug, PartialEq)]
enum Leg {
    /// The 16-byte CancelRequest arrived as the first bytes, in the clear.
    Plain(Vec<u8>),
    /// SSLRequest, answered 'N', then the CancelRequest in the clear.
    AfterN(Vec<u8>),
    /// SSLRequest, answered 'S', handshake, then the CancelRequest inside TLS.
    InTls(Vec<u8>),
    /// SSLRequest, answered 'N', then the connection closed.
    Refused,
}

/// Accepts one connection; answers an SSLRequest with `answer` ('S' = handshake with `acceptor`).
async fn cancel_leg(answer: u8, acceptor: Arc<pgrelay::tls::Acceptor>) -> (u16, tokio::task::JoinHandle<Leg>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut tcp, _) = l.accept().await.unwrap();
        let mut head = [0u8; 8];
        tcp.read_exact(&mut head).await.unwrap();
        if head != SSL_REQUEST_HEAD {
            let mut rest = [0u8; 8];
            tcp.read_exact(&mut rest).await.unwrap();
            return Leg::Plain([&head[..], &rest[..]].concat());
        }
        tcp.write_all(&[answer]).await.unwrap();
        let mut msg = vec![0u8; 16];
        if answer == b'S' {
            let mut s = acceptor.accept(tcp).await.unwrap();
            s.read_exact(&mut msg).await.unwrap();
            return Leg::InTls(msg);
        }
        match tcp.read_exact(&mut msg).await {
            Ok(_) => Leg::AfterN(msg),
            Err(_) => Leg::Refused,
        }
    });
    (port, task)
}

/// `send_cancel` per `[server_tls] mode`: plaintext with disable, TLS with require and verify-full (same
/// connector and server name as the server connections), `prefer` follows the server's 'S' or 'N', and
/// `require` sends nothing to a server that answers 'N'.
#[tokio::test]
async fn send_cancel_follows_server_tls_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let c = make_certs(tmp.path(), "leg", "DNS:localhost,IP:127.0.0.1");
    let acceptor = Arc::new(pgrelay::tls::Acceptor::load(&c.cert, &c.key).unwrap());
    let connector = |mode: &str| {
        let text = format!("{}\n[auth]\ntype = \"trust\"\n", server_tls(mode, &c.ca));
        let cfg = pgrelay::config::Config::parse(&text, Path::new("t.toml")).unwrap();
        pgrelay::tls::Connector::from_config(&cfg).unwrap()
    };
    let mut want = [0u8; 16];
    want[..8].copy_from_slice(&CANCEL_HEAD);
    want[8..12].copy_from_slice(&4242i32.to_be_bytes());
    want[12..].copy_from_slice(&(-7i32).to_be_bytes());
    let want = want.to_vec();
    let cases = [
        ("disable", b'S', Leg::Plain(want.clone())),
        ("prefer", b'S', Leg::InTls(want.clone())),
        ("prefer", b'N', Leg::AfterN(want.clone())),
        ("require", b'S', Leg::InTls(want.clone())),
        ("verify-full", b'S', Leg::InTls(want.clone())),
        ("require", b'N', Leg::Refused),
    ];
    for (mode, answer, expect) in cases {
        let (port, leg) = cancel_leg(answer, acceptor.clone()).await;
        let target = pgrelay::server::Target { host: "127.0.0.1".into(), port };
        let tls = connector(mode);
        let r = pgrelay::server::send_cancel(&target, tls.as_deref(), 4242, -7).await;
        assert_eq!(r.is_ok(), expect != Leg::Refused, "{mode}/{}: {r:?}", answer as char);
        let got = tokio::time::timeout(Duration::from_secs(5), leg).await.expect("leg done").unwrap();
        assert_eq!(got, expect, "{mode}/{}", answer as char);
    }
}
