//! Terrain of the battle map: difficult terrain and cover, square by square.
//!
//! The DM marks squares (`terrain_set`, event `terrain_changed`); the marks live in the
//! play state (`terrain`, keyed `"x,y"`), so clients see them in `game.play` of every
//! view (`GET /state`, `sync_response`) and follow them through event patches like the
//! rest of the play state.
//!
//! * **Difficult terrain** (SRD 5.1, "Movement and Position: Difficult Terrain"): "every
//!   foot of movement in difficult terrain costs 1 extra foot". A step *into* a
//!   difficult square costs 10 ft instead of 5 (15 ft while crawling: the extra costs
//!   add up). Another creature's space counts as difficult terrain too (same section),
//!   see [`crate::movement`].
//! * **Cover** (SRD 5.1, "Combat: Cover"): half cover gives +2 to AC and Dexterity saving
//!   throws, three-quarters cover +5; only the most protective degree applies. A
//!   creature standing on a square marked with cover has that cover against every
//!   attack and Dexterity save aimed at it. *Simplified:* the grid knows no walls or
//!   lines of sight, so the mark stands for "whatever is there protects whoever stands
//!   here"; an action may declare the cover it meets instead (`details.cover`, `none`
//!   included), e.g. for creatures in the way. Total cover is not modelled (the target
//!   simply cannot be targeted; the DM refuses the action).

use crate::character::Pos;
use crate::error::{codes, Result, RuleError};
use serde::{Deserialize, Serialize};

/// Most squares marked on one map.
pub const MAX_TERRAIN_SQUARES: usize = 10_000;
/// Most squares in one `terrain_set`.
pub const MAX_TERRAIN_CHANGES: usize = 1_000;

/// Degrees of cover, least protective first (so `max` is the one that applies).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Cover {
    #[default]
    None,
    /// +2 to AC and Dexterity saving throws.
    Half,
    /// +5 to AC and Dexterity saving throws.
    ThreeQuarters,
}

impl Cover {
    /// The bonus to AC and to Dexterity saving throws.
    pub fn bonus(self) -> i32 {
        match self {
            Cover::None => 0,
            Cover::Half => 2,
            Cover::ThreeQuarters => 5,
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Cover::None
    }
}

/// What a marked square holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Terrain {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub difficult: bool,
    #[serde(default, skip_serializing_if = "Cover::is_none")]
    pub cover: Cover,
}

impl Terrain {
    /// An unmarked square.
    pub fn is_plain(&self) -> bool {
        !self.difficult && self.cover.is_none()
    }
}

/// One square of a `terrain_set`: its new marks (none at all clears the square).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerrainSquare {
    pub x: i32,
    pub y: i32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub difficult: bool,
    #[serde(default, skip_serializing_if = "Cover::is_none")]
    pub cover: Cover,
}

impl TerrainSquare {
    pub fn pos(&self) -> Pos {
        Pos {
            x: self.x,
            y: self.y,
        }
    }

    pub fn terrain(&self) -> Terrain {
        Terrain {
            difficult: self.difficult,
            cover: self.cover,
        }
    }
}

/// The key of a square in the play state's `terrain` map: `"x,y"`.
pub fn key(p: Pos) -> String {
    format!("{},{}", p.x, p.y)
}

/// Checks the squares of a `terrain_set`: some (unless clearing), not too many, on
/// the grid, each once.
pub fn check_squares(squares: &[TerrainSquare], clear: bool) -> Result<()> {
    let bad = |m: String| RuleError::new(codes::INVALID_PAYLOAD, m);
    if squares.is_empty() && !clear {
        return Err(bad("`squares` is empty (or send `clear: true`)".into()));
    }
    if squares.len() > MAX_TERRAIN_CHANGES {
        return Err(bad(format!(
            "at most {MAX_TERRAIN_CHANGES} squares per terrain_set"
        )));
    }
    for (i, sq) in squares.iter().enumerate() {
        if !sq.pos().in_bounds() {
            return Err(bad(format!(
                "grid coordinates are within ±{}",
                crate::character::MAX_COORD
            )));
        }
        if squares[..i].iter().any(|o| o.pos() == sq.pos()) {
            return Err(bad(format!("square ({}, {}) is listed twice", sq.x, sq.y)));
        }
    }
    Ok(())
}
