//! The game rules of a session, as a pure, sans-IO core.
//!
//! No clock, no I/O, no global random number generator: commands come in with a
//! [`Ctx`] (who, when, which command id), events and errors come out. The node's
//! session actor is the only caller that changes state, and replaying the stored
//! events from the start reproduces exactly the state the live actor reached.
//!
//! # Layout
//!
//! * [`command`]: what clients ask ([`Command`], [`Ctx`]).
//! * [`event`]: what happened ([`Event`]); the stored and broadcast unit.
//! * [`state`]: [`SessionState`] with `decide` (command → events) and `apply`
//!   (event → state); lifecycle, roster and the state document.
//! * [`pointer`](mod@pointer): JSON Pointer (RFC 6901) on the state document.
//! * [`limits`]: bounds on the state document (depth, sizes, width), checked by
//!   `decide`.
//! * [`game`]: rules-managed play state ([`game::Game`]): how play commands are
//!   decided on a scratch copy and applied as merge patches ([`patch`]).
//! * [`character`]: characters in play, sheets, hit points, damage, healing.
//! * [`conditions`]: the 5e conditions, their mechanical effects, timed effects.
//! * [`combat`]: initiative, turn order, rounds, action economy, turn boundaries (the
//!   rules; the data of a running combat is [`encounter`], below [`game`]).
//! * [`actions`]: attacks, saving throws, damage, healing, concentration.
//! * [`tactics`]: the Help, Hide and Ready actions.
//! * [`saves`]: saving throws (conditions, traits, exhaustion, cover).
//! * [`movement`]: the grid, step-by-step movement, opportunity attacks.
//! * [`terrain`]: difficult terrain and cover on the battle map.
//! * [`services`]: characters from the Character Service (joins, pending sheets),
//!   narration and maps from the LLM and Image services, as rules.
//! * [`dice`]: the seeded counter-based dice and dice expressions.
//! * [`history`]: audit-log entries.
//! * [`error`]: [`RuleError`] (the service's one wire error type, `gs_wire`) and its
//!   stable codes.
//! * [`types`]: plain data the modules share (roles, lifecycle status, abilities,
//!   action types and costs); it imports nothing else of the crate, so the modules
//!   above import each other without circles.
//!
//! Imports go one way (a test, `tests/layers.rs`, finds any circle): plain data at
//! the bottom ([`types`], then `character`, `conditions`, `dice`, `terrain`,
//! [`encounter`]), the descriptions ([`command`], [`event`]) above it, then [`game`],
//! then the rules that change play (`combat`, `actions`, `movement`, `tactics`) and
//! [`state`] on top.
//!
//! The wire contract of play (every message and event) is `docs/protocol.md`, part
//! "Game messages"; `docs/rules.md` maps each SRD 5.1 rule to its code and scenario
//! test (`tests/scenarios.rs`).

pub mod actions;
pub mod character;
pub mod combat;
pub mod command;
pub mod conditions;
pub mod dice;
pub mod encounter;
pub mod error;
pub mod event;
pub mod game;
pub mod history;
pub mod limits;
pub mod movement;
pub mod patch;
/// JSON Pointer paths into the state document: part of the wire contract, so they
/// live in `gs_wire` (clients such as the cluster tool use them without the rules).
pub use gs_wire::pointer;
pub mod saves;
pub mod services;
pub mod state;
pub mod tactics;
pub mod terrain;
pub mod types;

pub use command::{Command, Ctx};
pub use error::{Result, RuleError};
pub use event::Event;
pub use history::audit_entry;
pub use state::{SessionRole, SessionState, Status};

#[cfg(test)]
mod tests;
