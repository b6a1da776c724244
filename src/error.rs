//! Crate error type: which side failed (client, server, internal) and whether it was a plain hang-up.

use std::io;

use crate::protocol::ProtocolError;

/// An error on a client or server connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's socket failed or it broke the protocol.
    #[error("client: {0}")]
    Client(#[source] io::Error),
    #[error("client protocol: {0}")]
    ClientProtocol(#[from] ProtocolError),
    /// The server's socket failed.
    #[error("server: {0}")]
    Server(#[source] io::Error),
    /// The server sent something pgrelay cannot follow.
    #[error("server protocol: {0}")]
    ServerProtocol(String),
    /// The server refused us (ErrorResponse during login, or FATAL later).
    #[error("server said: {code} {message}")]
    ServerRefused { code: String, message: String },
    /// Authentication to or from pgrelay failed.
    #[error("auth: {0}")]
    Auth(String),
    /// A time limit ran out.
    #[error("timeout: {0}")]
    Timeout(&'static str),
    /// No server could be had for the client.
    #[error("pool: {0}")]
    Pool(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// True for a peer that simply went away: logged at debug, not as an error.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::Client(e) | Error::Server(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }

    /// True when the server side failed, so its connection must not be reused.
    pub fn is_server_side(&self) -> bool {
        matches!(self, Error::Server(_) | Error::ServerProtocol(_) | Error::ServerRefused { .. })
    }
}

/// Crate result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
