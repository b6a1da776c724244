//! A minimal PostgreSQL frontend for tests that need exact control of the extended protocol (statement names,
//! message order, where the Syncs go). Replies are normalised so a relay's stream can be compared with PostgreSQL's.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One backend message, reduced to what must be identical between pgrelay and PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    ParameterDescription(Vec<u32>),
    /// Column names and type OIDs.
    RowDescription(Vec<(String, u32)>),
    DataRow(Vec<Option<String>>),
    CommandComplete(String),
    EmptyQuery,
    PortalSuspended,
    /// SQLSTATE only: messages name statements and may differ in wording.
    Error(String),
    Ready(u8),
}

pub struct Wire {
    stream: TcpStream,
    rbuf: BytesMut,
    out: BytesMut,
    /// Error messages seen, for assertion output.
    pub last_error: String,
    /// Asynchronous notifications received (channel, payload).
    pub notifications: Vec<(String, String)>,
}

fn cstr(b: &mut &[u8]) -> String {
    let n = b.iter().position(|&c| c == 0).expect("nul-terminated string");
    let s = String::from_utf8_lossy(&b[..n]).into_owned();
    *b = &b[n + 1..];
    s
}

impl Wire {
    /// Connects as postgres/secret to database postgres (SCRAM-SHA-256) and waits for ReadyForQuery.
    pub async fn connect(port: u16) -> Wire {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        let mut w = Wire {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            out: BytesMut::new(),
            last_error: String::new(),
            notifications: Vec::new(),
        };
        let params = b"user\0postgres\0database\0postgres\0\0";
        w.out.put_i32(8 + params.len() as i32);
        w.out.put_i32(196608);
        w.out.put_slice(params);
        w.send().await;
        let mut scram = pgrelay::auth::ScramClient::new(pgrelay::auth::ScramCredential::Password("secret".into()));
        loop {
            let (t, body) = w.read_msg().await;
            match t {
                b'R' => {
                    let mut b = &body[..];
                    match b.get_i32() {
                        0 => {}
                        10 => {
                            let first = scram.client_first();
                            let mech = b"SCRAM-SHA-256\0";
                            w.out.put_u8(b'p');
                            w.out.put_i32((4 + mech.len() + 4 + first.len()) as i32);
                            w.out.put_slice(mech);
                            w.out.put_i32(first.len() as i32);
                            w.out.put_slice(&first);
                            w.send().await;
                        }
                        11 => {
                            let fin = scram.server_first(b).expect("scram server-first");
                            w.out.put_u8(b'p');
                            w.out.put_i32((4 + fin.len()) as i32);
                            w.out.put_slice(&fin);
                            w.send().await;
                        }
                        12 => scram.server_final(b).expect("scram server-final"),
                        other => panic!("unexpected auth request {other}"),
                    }
                }
                b'E' => panic!("login failed: {:?}", String::from_utf8_lossy(&body)),
                b'Z' => return w,
                _ => {}
            }
        }
    }

    async fn read_msg(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.rbuf.len() >= 5 {
                let len = u32::from_be_bytes(self.rbuf[1..5].try_into().unwrap()) as usize;
                if self.rbuf.len() > len {
                    let t = self.rbuf[0];
                    let body = self.rbuf[5..1 + len].to_vec();
                    self.rbuf.advance(1 + len);
                    return (t, body);
                }
            }
            let n = self.stream.read_buf(&mut self.rbuf).await.expect("read");
            assert!(n > 0, "connection closed by the other side");
        }
    }

    fn msg(&mut self, t: u8, body: &[u8]) {
        self.out.put_u8(t);
        self.out.put_i32(4 + body.len() as i32);
        self.out.put_slice(body);
    }

    pub fn parse(&mut self, name: &str, sql: &str, types: &[u32]) {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.push(0);
        b.extend_from_slice(&(types.len() as i16).to_be_bytes());
        for t in types {
            b.extend_from_slice(&t.to_be_bytes());
        }
        self.msg(b'P', &b);
    }

    /// Bind with text-format parameters and results.
    pub fn bind(&mut self, portal: &str, stmt: &str, params: &[Option<&str>]) {
        let mut b = Vec::new();
        b.extend_from_slice(portal.as_bytes());
        b.push(0);
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        self.msg(b'B', &b);
    }

    pub fn describe_statement(&mut self, name: &str) {
        let mut b = vec![b'S'];
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        self.msg(b'D', &b);
    }

    pub fn describe_portal(&mut self, name: &str) {
        let mut b = vec![b'P'];
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        self.msg(b'D', &b);
    }

    pub fn execute(&mut self, portal: &str, max_rows: i32) {
        let mut b = Vec::new();
        b.extend_from_slice(portal.as_bytes());
        b.push(0);
        b.extend_from_slice(&max_rows.to_be_bytes());
        self.msg(b'E', &b);
    }

    pub fn close_statement(&mut self, name: &str) {
        let mut b = vec![b'S'];
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        self.msg(b'C', &b);
    }

    pub fn sync(&mut self) {
        self.msg(b'S', &[]);
    }

    pub fn flush(&mut self) {
        self.msg(b'H', &[]);
    }

    pub fn query(&mut self, sql: &str) {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        self.msg(b'Q', &b);
    }

    pub async fn send(&mut self) {
        let out = self.out.split();
        self.stream.write_all(&out).await.expect("write");
    }

    /// Sends what is buffered and reads replies until `readies` ReadyForQuery messages have arrived.
    pub async fn roundtrip(&mut self, readies: usize) -> Vec<Reply> {
        self.send().await;
        self.replies(readies, false).await
    }

    /// Sends what is buffered and reads replies up to the first ErrorResponse (a pipeline not yet ended by a Sync).
    pub async fn until_error(&mut self) -> Vec<Reply> {
        self.send().await;
        self.replies(usize::MAX, true).await
    }

    async fn replies(&mut self, readies: usize, until_error: bool) -> Vec<Reply> {
        let mut replies = Vec::new();
        let mut seen = 0;
        while seen < readies {
            let (t, body) = self.read_msg().await;
            let mut b = &body[..];
            let r = match t {
                b'1' => Reply::ParseComplete,
                b'2' => Reply::BindComplete,
                b'3' => Reply::CloseComplete,
                b'n' => Reply::NoData,
                b'I' => Reply::EmptyQuery,
                b's' => Reply::PortalSuspended,
                b't' => {
                    let n = b.get_i16();
                    Reply::ParameterDescription((0..n).map(|_| b.get_u32()).collect())
                }
                b'T' => {
                    let n = b.get_i16();
                    let mut cols = Vec::new();
                    for _ in 0..n {
                        let name = cstr(&mut b);
                        b.advance(6);
                        let oid = b.get_u32();
                        b.advance(8);
                        cols.push((name, oid));
                    }
                    Reply::RowDescription(cols)
                }
                b'D' => {
                    let n = b.get_i16();
                    let mut vals = Vec::new();
                    for _ in 0..n {
                        let len = b.get_i32();
                        if len < 0 {
                            vals.push(None);
                        } else {
                            vals.push(Some(String::from_utf8_lossy(&b[..len as usize]).into_owned()));
                            b.advance(len as usize);
                        }
                    }
                    Reply::DataRow(vals)
                }
                b'C' => Reply::CommandComplete(cstr(&mut b)),
                b'E' => {
                    let mut code = String::new();
                    let mut message = String::new();
                    while !b.is_empty() && b[0] != 0 {
                        let f = b[0];
                        b.advance(1);
                        let v = cstr(&mut b);
                        match f {
                            b'C' => code = v,
                            b'M' => message = v,
                            _ => {}
                        }
                    }
                    self.last_error = format!("{code}: {message}");
                    Reply::Error(code)
                }
                b'Z' => {
                    seen += 1;
                    Reply::Ready(b[0])
                }
                b'A' => {
                    b.advance(4);
                    let ch = cstr(&mut b);
                    let payload = cstr(&mut b);
                    self.notifications.push((ch, payload));
                    continue;
                }
                _ => continue, // NoticeResponse, ParameterStatus
            };
            let stop = until_error && matches!(r, Reply::Error(_));
            replies.push(r);
            if stop {
                break;
            }
        }
        replies
    }

    /// Runs one simple query and returns its replies.
    pub async fn simple(&mut self, sql: &str) -> Vec<Reply> {
        self.query(sql);
        self.roundtrip(1).await
    }
}

/// Shorthand for a one-column data row.
pub fn row1(v: &str) -> Reply {
    Reply::DataRow(vec![Some(v.to_string())])
}

/// The replies to Parse, Bind, Execute and Sync of a query that returns the one value `v`, outside a transaction.
pub fn parsed_one_row(v: &str) -> Vec<Reply> {
    vec![
        Reply::ParseComplete,
        Reply::BindComplete,
        row1(v),
        Reply::CommandComplete("SELECT 1".into()),
        Reply::Ready(b'I'),
    ]
}
