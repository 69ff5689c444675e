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
//! * [`pointer`]: JSON Pointer (RFC 6901) on the state document.
//! * [`game`]: rules-managed play (characters, combat, dice).
//! * [`error`]: [`RuleError`] and its stable codes.

pub mod command;
pub mod error;
pub mod event;
pub mod game;
pub mod pointer;
pub mod state;

pub use command::{Command, Ctx};
pub use error::{RuleError, Result};
pub use event::Event;
pub use state::{SessionRole, SessionState, Status};
