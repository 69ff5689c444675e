//! Conditions and timed effects (SRD 5.1, appendix A).
//!
//! A character's `conditions` is a set. A condition is either placed directly (the DM,
//! a hub sync, dropping to 0 hit points) or imposed by an [`Effect`]: a record that
//! says who imposed it, whether it hangs on its source's concentration, and when it
//! expires. Ending an effect removes its condition unless another effect still imposes
//! the same condition on the same creature.
//!
//! # Mechanical effects implemented
//!
//! | condition | on its own attacks | attacks against it | saves | other |
//! |---|---|---|---|---|
//! | blinded | disadvantage | advantage | | |
//! | charmed | cannot attack its charmer | | | |
//! | deafened | | | | (none on attacks or saves) |
//! | frightened | disadvantage | | | cannot move closer to the source |
//! | grappled | | | | speed 0 |
//! | incapacitated | | | | no actions or reactions; ends concentration |
//! | invisible | advantage | disadvantage | | |
//! | paralyzed | | advantage; a hit within 5 ft is critical | fails Str/Dex | incapacitated, speed 0 |
//! | petrified | | advantage | fails Str/Dex | incapacitated, speed 0, resistant to all damage, immune to poisoned |
//! | poisoned | disadvantage | | | |
//! | prone | disadvantage | advantage within 5 ft, disadvantage beyond | | crawling costs double; standing up costs half the speed |
//! | restrained | disadvantage | advantage | disadvantage on Dex | speed 0 |
//! | stunned | | advantage | fails Str/Dex | incapacitated, speed 0 |
//! | unconscious | | advantage; a hit within 5 ft is critical | fails Str/Dex | incapacitated, speed 0, falls prone |
//! | dodging (Dodge action) | | disadvantage | advantage on Dex | until the start of its next turn; ends when incapacitated or at speed 0 |
//! | hidden (Hide action) | advantage | disadvantage | | ends after it attacks |
//! | dead | | | | cannot act or be targeted |
//!
//! "Dodging" and "hidden" are not SRD conditions but the states the Dodge and Hide
//! actions leave (SRD 5.1, "Actions in Combat"), modelled as conditions so that they
//! expire and show like one. Exhaustion is a level on the character (see
//! [`crate::character::Character::exhaustion`]).
//!
//! Rules kept after every event ([`crate::game::Game`]'s `settle`):
//!
//! * Dodge: "You lose this benefit if you are incapacitated or if your speed drops to
//!   0" (SRD 5.1, "Actions in Combat: Dodge").
//! * Grappled: "The condition ends if the grappler is incapacitated" (SRD 5.1, appendix
//!   A, "Grappled"); the grappler is the effect's source.
//!
//! Simplifications, on purpose: frightened imposes disadvantage whether or not the source
//! is in sight; a grapple does not end when the grappler moves away (dragging is the
//! DM's, with `place_character`).
//!
//! # Durations
//!
//! An effect may last `rounds` turn boundaries of a named creature: it ends at the
//! `rounds`-th start (or end) of that creature's turn after it was imposed. "Until the
//! start of your next turn" is `{rounds: 1, ends: "start", of: you}`. A duration in
//! minutes counts 10 rounds a minute (SRD 5.1, "Combat: The Order of Combat": a round is
//! 6 seconds). Durations tick only in combat; ending combat ends the effects measured
//! in rounds, while those measured in minutes outlast it (the DM ends them, or their
//! concentration does).
//!
//! # Save ends
//!
//! An effect may end on a saving throw the target repeats at the end of each of its
//! turns (`save_ends: {ability, dc}`; e.g. SRD 5.1 *hold person*: "At the end of each of
//! its turns, the target can make another Wisdom saving throw. On a success, the spell
//! ends on the target."). See [`crate::combat`].

use crate::types::Ability;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Blinded,
    Charmed,
    Deafened,
    Frightened,
    Grappled,
    Incapacitated,
    Invisible,
    Paralyzed,
    Petrified,
    Poisoned,
    Prone,
    Restrained,
    Stunned,
    Unconscious,
    /// The Dodge action, modelled as a condition so that it can expire like one.
    Dodging,
    /// A successful Hide action: unseen until it attacks or is found.
    Hidden,
    /// Not a 5e condition: a dead creature (0 hit points for a monster, three failed
    /// death saves or massive damage for a player character).
    Dead,
}

impl Condition {
    pub const ALL: [Condition; 17] = [
        Condition::Blinded,
        Condition::Charmed,
        Condition::Deafened,
        Condition::Frightened,
        Condition::Grappled,
        Condition::Incapacitated,
        Condition::Invisible,
        Condition::Paralyzed,
        Condition::Petrified,
        Condition::Poisoned,
        Condition::Prone,
        Condition::Restrained,
        Condition::Stunned,
        Condition::Unconscious,
        Condition::Dodging,
        Condition::Hidden,
        Condition::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Blinded => "blinded",
            Condition::Charmed => "charmed",
            Condition::Deafened => "deafened",
            Condition::Frightened => "frightened",
            Condition::Grappled => "grappled",
            Condition::Incapacitated => "incapacitated",
            Condition::Invisible => "invisible",
            Condition::Paralyzed => "paralyzed",
            Condition::Petrified => "petrified",
            Condition::Poisoned => "poisoned",
            Condition::Prone => "prone",
            Condition::Restrained => "restrained",
            Condition::Stunned => "stunned",
            Condition::Unconscious => "unconscious",
            Condition::Dodging => "dodging",
            Condition::Hidden => "hidden",
            Condition::Dead => "dead",
        }
    }

    /// Conditions that include "incapacitated": no actions, no reactions.
    pub fn incapacitates(self) -> bool {
        matches!(
            self,
            Condition::Incapacitated
                | Condition::Paralyzed
                | Condition::Petrified
                | Condition::Stunned
                | Condition::Unconscious
                | Condition::Dead
        )
    }

    /// Conditions under which a creature's speed is 0.
    pub fn stops_movement(self) -> bool {
        matches!(
            self,
            Condition::Grappled
                | Condition::Restrained
                | Condition::Paralyzed
                | Condition::Petrified
                | Condition::Stunned
                | Condition::Unconscious
                | Condition::Dead
        )
    }

    /// Conditions that make Strength and Dexterity saving throws fail automatically.
    pub fn fails_str_dex_saves(self) -> bool {
        matches!(
            self,
            Condition::Paralyzed
                | Condition::Petrified
                | Condition::Stunned
                | Condition::Unconscious
                | Condition::Dead
        )
    }
}

pub type Conditions = BTreeSet<Condition>;

/// Whether any condition in `set` is incapacitating.
pub fn incapacitated(set: &Conditions) -> bool {
    set.iter().any(|c| c.incapacitates())
}

/// The first condition in `set` that stops movement, if any.
pub fn movement_stopper(set: &Conditions) -> Option<Condition> {
    set.iter().copied().find(|c| c.stops_movement())
}

/// Why an attack roll has advantage and disadvantage, and whether a hit is critical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttackConditions {
    pub advantage: Vec<String>,
    pub disadvantage: Vec<String>,
    /// A hit is a critical hit (paralyzed or unconscious target within 5 ft).
    pub auto_critical: bool,
}

/// The effect of the attacker's and the target's conditions on an attack roll.
/// `distance` is in feet, `None` when either creature is off the map (then the
/// distance-dependent rules, prone and automatic criticals, assume melee range only
/// for a melee attack).
pub fn attack_conditions(
    attacker: &Conditions,
    target: &Conditions,
    distance: Option<u32>,
    melee: bool,
) -> AttackConditions {
    let mut out = AttackConditions::default();
    let adv = |out: &mut AttackConditions, why: &str| out.advantage.push(why.to_string());
    let dis = |out: &mut AttackConditions, why: &str| out.disadvantage.push(why.to_string());
    let within_5 = distance.map_or(melee, |d| d <= 5);
    for c in attacker {
        match c {
            Condition::Blinded => dis(&mut out, "attacker_blinded"),
            Condition::Frightened => dis(&mut out, "attacker_frightened"),
            Condition::Poisoned => dis(&mut out, "attacker_poisoned"),
            Condition::Prone => dis(&mut out, "attacker_prone"),
            Condition::Restrained => dis(&mut out, "attacker_restrained"),
            Condition::Invisible => adv(&mut out, "attacker_invisible"),
            Condition::Hidden => adv(&mut out, "attacker_hidden"),
            _ => {}
        }
    }
    for c in target {
        match c {
            Condition::Blinded => adv(&mut out, "target_blinded"),
            Condition::Paralyzed => adv(&mut out, "target_paralyzed"),
            Condition::Petrified => adv(&mut out, "target_petrified"),
            Condition::Restrained => adv(&mut out, "target_restrained"),
            Condition::Stunned => adv(&mut out, "target_stunned"),
            Condition::Unconscious => adv(&mut out, "target_unconscious"),
            Condition::Invisible => dis(&mut out, "target_invisible"),
            Condition::Dodging => dis(&mut out, "target_dodging"),
            Condition::Hidden => dis(&mut out, "target_hidden"),
            Condition::Prone if within_5 => adv(&mut out, "target_prone_within_5ft"),
            Condition::Prone => dis(&mut out, "target_prone_beyond_5ft"),
            _ => {}
        }
    }
    out.auto_critical = within_5
        && (target.contains(&Condition::Paralyzed) || target.contains(&Condition::Unconscious));
    out
}

/// How conditions change a saving throw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveConditions {
    /// The condition that makes the save fail without a roll.
    pub auto_fail: Option<Condition>,
    pub advantage: Vec<String>,
    pub disadvantage: Vec<String>,
}

pub fn save_conditions(saver: &Conditions, ability: Ability) -> SaveConditions {
    let mut out = SaveConditions::default();
    let str_dex = matches!(ability, Ability::Str | Ability::Dex);
    if str_dex {
        out.auto_fail = saver.iter().copied().find(|c| c.fails_str_dex_saves());
    }
    if ability == Ability::Dex {
        if saver.contains(&Condition::Restrained) {
            out.disadvantage.push("restrained".into());
        }
        if saver.contains(&Condition::Dodging) {
            out.advantage.push("dodging".into());
        }
    }
    out
}

/// Which boundary of a turn ends an effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Boundary {
    Start,
    End,
}

/// When a timed effect ends: at the `rounds`-th `ends` boundary of `of`'s turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duration {
    /// Boundaries left before the effect ends (at least 1).
    pub rounds: u32,
    pub ends: Boundary,
    pub of: Uuid,
    /// The duration was given in minutes (10 rounds each): the effect outlasts the
    /// combat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minutes: Option<u32>,
}

/// A saving throw the target repeats at the end of each of its turns; a success ends
/// the effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveEnds {
    pub ability: Ability,
    pub dc: i32,
    /// The effect is magical (a spell): Magic Resistance applies to the repeat save.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub magical: bool,
}

/// A condition imposed on a creature, with where it came from and when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    pub id: u64,
    pub target: Uuid,
    pub condition: Condition,
    /// The creature that imposed it (a charmed creature cannot attack its charmer;
    /// a frightened one cannot move closer to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Uuid>,
    /// The effect lasts while `source` keeps concentrating on `action_id`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concentration: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_ends: Option<SaveEnds>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cs: &[Condition]) -> Conditions {
        cs.iter().copied().collect()
    }

    /// One row per condition with an effect on attack rolls: (attacker's, target's,
    /// distance, melee) → (advantage?, disadvantage?, automatic critical?).
    #[test]
    fn attack_roll_table() {
        use Condition::*;
        type Row = (
            &'static [Condition],
            &'static [Condition],
            Option<u32>,
            bool,
            (bool, bool, bool),
        );
        let rows: &[Row] = &[
            (&[], &[], Some(5), true, (false, false, false)),
            (&[Blinded], &[], Some(5), true, (false, true, false)),
            (&[Frightened], &[], Some(5), true, (false, true, false)),
            (&[Poisoned], &[], Some(5), true, (false, true, false)),
            (&[Prone], &[], Some(5), true, (false, true, false)),
            (&[Restrained], &[], Some(5), true, (false, true, false)),
            (&[Invisible], &[], Some(5), true, (true, false, false)),
            (
                &[Deafened, Charmed, Grappled],
                &[],
                Some(5),
                true,
                (false, false, false),
            ),
            (&[], &[Blinded], Some(30), false, (true, false, false)),
            (&[], &[Paralyzed], Some(5), true, (true, false, true)),
            (&[], &[Paralyzed], Some(10), false, (true, false, false)),
            (&[], &[Unconscious], Some(5), true, (true, false, true)),
            (&[], &[Unconscious], Some(60), false, (true, false, false)),
            (&[], &[Petrified], Some(5), true, (true, false, false)),
            (&[], &[Restrained], Some(5), true, (true, false, false)),
            (&[], &[Stunned], Some(5), true, (true, false, false)),
            (&[], &[Invisible], Some(5), true, (false, true, false)),
            (&[], &[Dodging], Some(5), true, (false, true, false)),
            (&[], &[Prone], Some(5), true, (true, false, false)),
            (&[], &[Prone], Some(10), false, (false, true, false)),
            // Off the map: a melee attack is assumed to be within 5 ft.
            (&[], &[Prone], None, true, (true, false, false)),
            (&[], &[Prone], None, false, (false, true, false)),
            (
                &[],
                &[Deafened, Grappled, Poisoned, Frightened, Charmed],
                Some(5),
                true,
                (false, false, false),
            ),
        ];
        for (a, t, d, melee, (adv, dis, crit)) in rows {
            let got = attack_conditions(&set(a), &set(t), *d, *melee);
            assert_eq!(
                (
                    !got.advantage.is_empty(),
                    !got.disadvantage.is_empty(),
                    got.auto_critical
                ),
                (*adv, *dis, *crit),
                "attacker {a:?} target {t:?} at {d:?}: {got:?}"
            );
        }
    }

    #[test]
    fn save_table() {
        use Condition::*;
        for c in [Paralyzed, Stunned, Unconscious, Petrified] {
            assert_eq!(save_conditions(&set(&[c]), Ability::Str).auto_fail, Some(c));
            assert_eq!(save_conditions(&set(&[c]), Ability::Dex).auto_fail, Some(c));
            assert_eq!(save_conditions(&set(&[c]), Ability::Wis).auto_fail, None);
        }
        let r = save_conditions(&set(&[Restrained]), Ability::Dex);
        assert_eq!((r.auto_fail, r.disadvantage.len()), (None, 1));
        assert!(save_conditions(&set(&[Restrained]), Ability::Str)
            .disadvantage
            .is_empty());
        assert_eq!(
            save_conditions(&set(&[Dodging]), Ability::Dex)
                .advantage
                .len(),
            1
        );
        assert_eq!(
            save_conditions(&set(&[Poisoned, Blinded]), Ability::Dex),
            SaveConditions::default()
        );
    }

    #[test]
    fn incapacitation_and_speed() {
        use Condition::*;
        for c in Condition::ALL {
            let inc = matches!(
                c,
                Incapacitated | Paralyzed | Petrified | Stunned | Unconscious | Dead
            );
            assert_eq!(incapacitated(&set(&[c])), inc, "{c:?}");
            let stop = matches!(
                c,
                Grappled | Restrained | Paralyzed | Petrified | Stunned | Unconscious | Dead
            );
            assert_eq!(movement_stopper(&set(&[c])).is_some(), stop, "{c:?}");
        }
    }
}
