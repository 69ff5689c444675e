//! Scenario tests of the play rules, driven through `SessionState::decide`/`apply`
//! exactly as the node drives them. Dice are seeded; where a test needs particular
//! faces it *rigs* the dice counter to a point of the stream that yields them
//! ([`harness::Table::rig`]), which keeps the dice real.

mod actions;
mod combat;
mod conditions;
mod harness;
mod layers;
mod movement;
mod property;
mod scenarios;
mod session;
