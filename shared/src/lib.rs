//! Shared library of the Game Session Service.
//!
//! # Layout
//!
//! * [`config`]: layered configuration (defaults < file < `GS_*` environment).
//! * [`alloc`]: the settings of the binaries' allocator (mimalloc).
//! * [`auth`]: access tokens and session (connection) tokens.
//! * [`protocol`]: the client wire protocol: envelopes, error codes, rendering.
//! * [`rpc`]: the router ↔ node contract over NATS, and subject names.
//! * [`event_batch`]: a commit's events on NATS, owner → routers (one message each).
//! * [`ring`]: placement of sessions on nodes (consistent hashing, sans-IO).
//! * [`membership`]: the live-member table fed by heartbeats (sans-IO).
//! * [`cluster_view`]: the membership runtime (heartbeats over NATS, ring changes, departures).
//! * [`keys`]: Redis key names and the ICD's TTLs.
//! * [`db`]: creating the database, migrations, the connection pool.
//! * [`connect`]: connecting to NATS and Redis at start-up.
//! * [`primary`]: the primary Redis (limits, cache keys): one instance or a cluster.
//! * [`forward`]: requests to a session's owner, retried across failovers.
//! * [`telemetry`]: logging, metrics recorder, shutdown signal.

pub mod alloc;
pub mod auth;
pub mod cluster_view;
pub mod config;
pub mod connect;
pub mod db;
pub mod event_batch;
pub mod forward;
pub mod keys;
pub mod membership;
pub mod primary;
pub mod protocol;
pub mod replies;
pub mod request_batch;
pub mod ring;
pub mod rpc;
pub mod telemetry;

pub use config::Config;
