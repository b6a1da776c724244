//! pgrelay: a PostgreSQL connection-pooling proxy.
//!
//! Map of the crate (arrows: what a module may use):
//! - [`app`]: supervisor — listeners, signals, janitor, drain. Uses everything below.
//! - [`client`]: one client session (startup, auth, relay loop) → [`pool`] → [`server`] → [`protocol`], [`auth`].
//! - [`admin`] / [`http`]: the admin console and the HTTP endpoint.
//! - [`health`]: DB health collector (pg_stat views, health score, warnings).
//! - [`routing`]: where each database lives (static host or Patroni leader).
//! - [`state`]: the `Arc<Shared>` handed to every task.
//! - [`tls`]: rustls acceptor (towards clients, reloadable) and connector (towards PostgreSQL).
//! - [`uds`]: Unix-socket streams to PostgreSQL, watched for readability only (no wake-up per consumed query).
//! - [`busypoll`]: optional busy polling of the runtime's I/O driver (`proxy.busy_poll`).
//! - [`config`], [`error`], [`observe`]: leaves anyone may use.

pub mod admin;
pub mod advisor;
pub mod app;
pub mod auth;
pub mod busypoll;
pub mod client;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
pub mod observe;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod routing;
pub mod server;
pub mod state;
pub mod tls;
pub mod uds;
