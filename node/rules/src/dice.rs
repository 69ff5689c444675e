//! Dice: a seeded, counter-based random number generator and dice expressions.
//!
//! # Why counter-based
//!
//! `decide` takes `&self`, so it cannot advance a generator kept in the state. Instead
//! the n-th random number of a session is a pure function of `(seed, n)`
//! (splitmix64's mixer applied to `seed + (n + 1) · γ`). `decide` starts a [`Roller`]
//! at the session's counter, draws what it needs, and records every roll plus the new
//! counter in the event it emits; `apply` copies the counter into the state. Replaying
//! the log therefore never re-rolls, and the next live roll continues the stream.
//!
//! The seed comes from `settings.dice_seed` (a u64) when the session was created with
//! one, else from the session id. Whoever knows the seed and the counter can predict
//! the rolls, so the seed is never shown in views or audit entries.
//!
//! # Expressions
//!
//! `NdS`, `NdS+M`, `NdS-M`, `dS` (one die) and a flat `M`, with 1 ≤ N ≤ [`MAX_DICE`],
//! S one of [`SIDES`] and |M| ≤ [`MAX_MODIFIER`]. Anything else is `invalid_dice`.

use crate::error::{codes, Result, RuleError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Most dice in one expression (a critical hit may double it).
pub const MAX_DICE: u32 = 100;
/// The dice a table uses.
pub const SIDES: &[u32] = &[2, 3, 4, 6, 8, 10, 12, 20, 100];
/// Largest flat modifier of an expression.
pub const MAX_MODIFIER: i32 = 1000;

/// splitmix64's output function: a bijective 64-bit mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `counter`-th 64-bit number of the stream keyed by `seed`.
pub fn draw(seed: u64, counter: u64) -> u64 {
    mix(seed.wrapping_add(counter.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// The dice seed of a session: `settings.dice_seed` if present, else derived from the id.
pub fn session_seed(session_id: Uuid, settings: &Value) -> u64 {
    match settings.get("dice_seed").and_then(Value::as_u64) {
        Some(seed) => seed,
        None => {
            let (hi, lo) = session_id.as_u64_pair();
            mix(hi ^ mix(lo))
        }
    }
}

/// A parsed dice expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dice {
    /// Number of dice; 0 for a flat number.
    pub count: u32,
    pub sides: u32,
    pub modifier: i32,
}

impl Dice {
    pub const D20: Dice = Dice {
        count: 1,
        sides: 20,
        modifier: 0,
    };

    /// Parses `2d6+3`, `1d8`, `3d4-1`, `d20` or `5`.
    pub fn parse(text: &str) -> Result<Dice> {
        let bad = |why: &str| {
            RuleError::new(codes::INVALID_DICE, format!("invalid dice {text:?}: {why}"))
                .with_details(serde_json::json!({ "dice": text }))
        };
        let s: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let s = s.to_ascii_lowercase();
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let number = |t: &str| -> Option<u32> {
            (!t.is_empty() && t.len() <= 6 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse().ok())
                .flatten()
        };
        let Some(d) = s.find('d') else {
            // A flat number, possibly signed.
            let (neg, digits) = match s.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, s.strip_prefix('+').unwrap_or(&s)),
            };
            let n = number(digits).ok_or_else(|| bad("expected NdS+M or a number"))? as i32;
            if n > MAX_MODIFIER {
                return Err(bad("modifier too large"));
            }
            return Ok(Dice {
                count: 0,
                sides: 0,
                modifier: if neg { -n } else { n },
            });
        };
        let count = match &s[..d] {
            "" => 1,
            c => number(c).ok_or_else(|| bad("bad number of dice"))?,
        };
        let rest = &s[d + 1..];
        let split = rest.find(['+', '-']).unwrap_or(rest.len());
        let sides = number(&rest[..split]).ok_or_else(|| bad("bad number of sides"))?;
        let modifier = if split == rest.len() {
            0
        } else {
            let m = number(&rest[split + 1..]).ok_or_else(|| bad("bad modifier"))?;
            if m > MAX_MODIFIER as u32 {
                return Err(bad("modifier too large"));
            }
            if rest.as_bytes()[split] == b'-' {
                -(m as i32)
            } else {
                m as i32
            }
        };
        if count == 0 || count > MAX_DICE {
            return Err(bad(&format!("between 1 and {MAX_DICE} dice")));
        }
        if !SIDES.contains(&sides) {
            return Err(bad(&format!("dice have {SIDES:?} sides")));
        }
        Ok(Dice {
            count,
            sides,
            modifier,
        })
    }

    /// The same expression with twice the dice (a critical hit).
    pub fn doubled(self) -> Dice {
        Dice {
            count: self.count * 2,
            ..self
        }
    }
}

impl std::fmt::Display for Dice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return write!(f, "{}", self.modifier);
        }
        write!(f, "{}d{}", self.count, self.sides)?;
        match self.modifier {
            0 => Ok(()),
            m if m > 0 => write!(f, "+{m}"),
            m => write!(f, "{m}"),
        }
    }
}

/// How a d20 is rolled: two dice keeping the higher (advantage) or lower (disadvantage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Normal,
    Advantage,
    Disadvantage,
}

impl Mode {
    /// Any source of advantage and any of disadvantage cancel out, however many of each.
    pub fn from_sources(advantage: bool, disadvantage: bool) -> Mode {
        match (advantage, disadvantage) {
            (true, false) => Mode::Advantage,
            (false, true) => Mode::Disadvantage,
            _ => Mode::Normal,
        }
    }
}

/// One recorded roll, as it appears in events and audit entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roll {
    /// `initiative`, `attack`, `damage`, `save`, `heal`, `death_save`, `concentration`.
    pub purpose: String,
    /// The creature the roll is for (attacker, saver, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub character_id: Option<Uuid>,
    /// The expression: `1d20`, `2d20kh1` (advantage), `2d20kl1`, `2d6+3`.
    pub dice: String,
    pub faces: Vec<u32>,
    pub modifier: i32,
    pub total: i32,
    /// Reported by a client (`settings.allow_client_rolls`), not rolled by the server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client: bool,
}

/// A d20 roll: the faces, the kept face, the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct D20 {
    pub kept: u32,
    pub total: i32,
}

/// Draws dice from `(seed, counter)` and records every roll.
#[derive(Debug, Clone)]
pub struct Roller {
    seed: u64,
    counter: u64,
    rolls: Vec<Roll>,
}

impl Roller {
    pub fn new(seed: u64, counter: u64) -> Self {
        Roller {
            seed,
            counter,
            rolls: vec![],
        }
    }

    /// The counter after the draws so far (stored by the event).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The rolls recorded since the last call.
    pub fn take_rolls(&mut self) -> Vec<Roll> {
        std::mem::take(&mut self.rolls)
    }

    /// One fair die: rejection sampling keeps every face equally likely.
    pub fn die(&mut self, sides: u32) -> u32 {
        let sides = u64::from(sides.max(1));
        let zone = u64::MAX - (u64::MAX % sides);
        loop {
            let x = draw(self.seed, self.counter);
            self.counter += 1;
            if x < zone {
                return (x % sides) as u32 + 1;
            }
        }
    }

    /// Rolls an expression; returns the total (which may be negative).
    pub fn roll(&mut self, purpose: &str, who: Option<Uuid>, dice: Dice) -> i32 {
        let faces: Vec<u32> = (0..dice.count).map(|_| self.die(dice.sides)).collect();
        let total = faces.iter().map(|&f| f as i32).sum::<i32>() + dice.modifier;
        self.rolls.push(Roll {
            purpose: purpose.into(),
            character_id: who,
            // The dice without the modifier ("2d6"; "0" for a flat number).
            dice: Dice {
                modifier: 0,
                ..dice
            }
            .to_string(),
            faces,
            modifier: dice.modifier,
            total,
            client: false,
        });
        total
    }

    /// Rolls a d20 (two with advantage or disadvantage) and adds `modifier`.
    pub fn d20(&mut self, purpose: &str, who: Option<Uuid>, mode: Mode, modifier: i32) -> D20 {
        let first = self.die(20);
        let (faces, kept, dice) = match mode {
            Mode::Normal => (vec![first], first, "1d20"),
            Mode::Advantage => {
                let second = self.die(20);
                (vec![first, second], first.max(second), "2d20kh1")
            }
            Mode::Disadvantage => {
                let second = self.die(20);
                (vec![first, second], first.min(second), "2d20kl1")
            }
        };
        let total = kept as i32 + modifier;
        self.rolls.push(Roll {
            purpose: purpose.into(),
            character_id: who,
            dice: dice.into(),
            faces,
            modifier,
            total,
            client: false,
        });
        D20 { kept, total }
    }

    /// Records a d20 a client reported (no draw from the stream).
    pub fn reported_d20(
        &mut self,
        purpose: &str,
        who: Option<Uuid>,
        face: u32,
        modifier: i32,
    ) -> D20 {
        let total = face as i32 + modifier;
        self.rolls.push(Roll {
            purpose: purpose.into(),
            character_id: who,
            dice: "1d20".into(),
            faces: vec![face],
            modifier,
            total,
            client: true,
        });
        D20 { kept: face, total }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_table() {
        let ok = [
            ("2d6+3", (2, 6, 3)),
            ("1d8", (1, 8, 0)),
            ("3d4-1", (3, 4, -1)),
            ("d20", (1, 20, 0)),
            (" 2D10 + 1 ", (2, 10, 1)),
            ("5", (0, 0, 5)),
            ("-2", (0, 0, -2)),
            ("100d100", (100, 100, 0)),
        ];
        for (text, (count, sides, modifier)) in ok {
            assert_eq!(
                Dice::parse(text).unwrap(),
                Dice {
                    count,
                    sides,
                    modifier
                },
                "{text}"
            );
        }
        for text in [
            "",
            "d",
            "2d",
            "0d6",
            "101d6",
            "2d7",
            "2d6+",
            "2d6+x",
            "2d6++1",
            "1d6+1001",
            "abc",
            "2x6",
            "1d20+1d4",
            "-",
            "99999999999d6",
        ] {
            assert_eq!(
                Dice::parse(text).unwrap_err().code,
                codes::INVALID_DICE,
                "{text:?}"
            );
        }
        assert_eq!(Dice::parse("3d4-1").unwrap().to_string(), "3d4-1");
        assert_eq!(Dice::parse("2d6").unwrap().doubled().to_string(), "4d6");
    }

    #[test]
    fn rolls_are_a_pure_function_of_seed_and_counter() {
        let mut a = Roller::new(42, 0);
        let mut b = Roller::new(42, 0);
        let xs: Vec<u32> = (0..100).map(|_| a.die(20)).collect();
        let ys: Vec<u32> = (0..100).map(|_| b.die(20)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| (1..=20).contains(&x)));
        // Resuming from a counter continues the same stream.
        let mut c = Roller::new(42, 50);
        assert_eq!(c.die(20), xs[50]);
        // Another seed gives another stream.
        let mut d = Roller::new(43, 0);
        let zs: Vec<u32> = (0..100).map(|_| d.die(20)).collect();
        assert_ne!(xs, zs);
    }

    #[test]
    fn dice_are_roughly_fair() {
        let mut r = Roller::new(7, 0);
        let mut counts = [0u32; 6];
        for _ in 0..6000 {
            counts[r.die(6) as usize - 1] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn advantage_keeps_higher_and_disadvantage_lower() {
        let mut r = Roller::new(1, 0);
        for _ in 0..50 {
            let a = r.d20("attack", None, Mode::Advantage, 3);
            let roll = r.take_rolls().pop().unwrap();
            assert_eq!(a.kept, *roll.faces.iter().max().unwrap());
            assert_eq!(a.total, a.kept as i32 + 3);
            let d = r.d20("attack", None, Mode::Disadvantage, 0);
            let roll = r.take_rolls().pop().unwrap();
            assert_eq!(d.kept, *roll.faces.iter().min().unwrap());
            assert_eq!(roll.dice, "2d20kl1");
        }
        assert_eq!(Mode::from_sources(true, true), Mode::Normal);
        assert_eq!(Mode::from_sources(true, false), Mode::Advantage);
        assert_eq!(Mode::from_sources(false, true), Mode::Disadvantage);
    }

    #[test]
    fn seed_from_settings_or_id() {
        let id = Uuid::from_u128(5);
        assert_eq!(session_seed(id, &json!({"dice_seed": 9})), 9);
        assert_eq!(session_seed(id, &json!({})), session_seed(id, &json!({})));
        assert_ne!(
            session_seed(id, &json!({})),
            session_seed(Uuid::from_u128(6), &json!({}))
        );
    }
}
