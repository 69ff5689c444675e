//! Local cluster launcher, operator CLI and test harness of the Game Session Service.
//!
//! # Layout
//!
//! * [`harness`]: [`harness::LocalCluster`], real `gs-node`/`gs-router` processes with
//!   generated configs in a private namespace; kill, pause, resume, add nodes.
//! * [`bench`]: `cluster bench`, the load generator and its report.
//! * [`client`]: REST and WebSocket clients that check what they receive.
//! * [`load`]: a workload of many sessions and clients (chaos tests, `bench`).
//! * [`scale`]: `cluster scale` and `cluster restart --rolling`: plans (sans-IO) and
//!   their execution on the harness or on the processes of `cluster up`.
//! * [`front`]: a front door for the routers (a TCP forwarder, as a load balancer),
//!   so clients survive every router being replaced.
//! * [`nats_cluster`]: a local NATS cluster joined by routes.
//! * [`stand_ins`]: stand-ins of the Character, Campaign, LLM and Image services on
//!   the real RabbitMQ, answering from a fixture directory (`cluster stand-ins`,
//!   started by `cluster up`; in-process in the tests).
//! * [`tls`]: self-signed development certificates.
//! * [`state`]: the state file of `cluster up` (`.cluster/state.json`), read by the
//!   other commands.

pub mod bench;
pub mod client;
pub mod front;
pub mod harness;
pub mod load;
pub mod nats_cluster;
pub mod scale;
pub mod stand_ins;
pub mod state;
pub mod tls;
