//! Help, Hide and Ready: the actions that set up what comes next (SRD 5.1, "Combat:
//! Actions in Combat"). They are declared with `action_declare` like any action and
//! resolved here, on the [`Resolution`] of [`crate::actions`].
//!
//! * **Help** (`targets: [ally]`, `details.against: enemy`): "the next attack roll
//!   your ally makes against that creature before the start of your next turn has
//!   advantage" ([`crate::encounter::HelpGiven`]); the enemy must be within 5 ft of the
//!   helper (`out_of_range`, when both are on the grid). Without `against`, the help
//!   is with a task: the ally's next ability check has advantage (the rules roll one:
//!   Hide's).
//! * **Hide**: "you make a Dexterity (Stealth) check in an attempt to hide": d20 +
//!   `details.bonus` (the Stealth bonus; default the Dexterity modifier) against
//!   `details.dc` (the DM's: the highest passive Perception of those looking; default
//!   10 + the highest Wisdom modifier among hostile creatures able to act). Success
//!   imposes `hidden`: attacks against it have disadvantage, its attacks advantage,
//!   until it attacks (or the DM removes it: found). Exhaustion (level 1+) gives
//!   disadvantage on the check. *Simplified:* whether the creature can hide at all
//!   (heavily obscured, out of sight) is the DM's call before the roll.
//! * **Ready** (`details.action`: `attack`, `save`, `heal` or `other`;
//!   `details.trigger`: text): takes the action now; when the trigger occurs, the
//!   creature releases it with its reaction: an `action_declare` of that type with
//!   `details.cost: "reaction"` and `details.readied: true` (one attack, even with
//!   Extra Attack). It lapses at the start of the creature's next turn. A readied spell
//!   (`details.spell: true`) is held with concentration: the concentration starts now,
//!   and if it breaks before the release, the spell is lost. *Simplified:* a readied
//!   move is not modelled (the DM moves the creature).

use crate::actions::{bad, Resolution};
use crate::character::{Ability, Concentration};
use crate::command::{ActionType, Cost};
use crate::conditions::Condition;
use crate::dice::Mode;
use crate::encounter::{HelpGiven, Readied};
use crate::error::{codes, Result, RuleError};
use crate::event::{CheckRoll, Outcome};
use serde_json::json;
use uuid::Uuid;

/// Longest text of a readied action's trigger.
pub const MAX_TRIGGER: usize = 100;

impl Resolution {
    /// Help: records the help on the helper's participant.
    pub(crate) fn help(&mut self, ally: Uuid) -> Result<Vec<Outcome>> {
        let against = self.details.against;
        if let Some(enemy) = against {
            let e = self.s.g.character(enemy)?;
            if e.is_dead() || enemy == ally || enemy == self.actor {
                return Err(RuleError::new(
                    codes::INVALID_TARGET,
                    "help is against another living creature than the ally and the helper",
                ));
            }
            if let Some(d) = self.s.g.distance(self.actor, enemy).filter(|d| *d > 5) {
                return Err(RuleError::new(
                    codes::OUT_OF_RANGE,
                    "the creature helped against must be within 5 ft of the helper",
                )
                .with_details(json!({ "target_id": enemy, "distance": d, "range": 5 })));
            }
        }
        let actor = self.actor;
        let combat = self.s.g.combat.as_mut().expect("acting in combat");
        let p = combat.participants.get_mut(&actor).expect("a participant");
        p.help = Some(HelpGiven { ally, against });
        Ok(vec![])
    }

    /// Hide: a Dexterity (Stealth) check; success imposes `hidden`.
    pub(crate) fn hide(&mut self) -> Outcome {
        let me = self.s.g.characters[&self.actor].clone();
        let dc = self.details.dc.unwrap_or_else(|| {
            let watchers = self
                .s
                .g
                .characters
                .values()
                .filter(|c| c.side != me.side && !c.incapacitated());
            10 + watchers.map(|c| c.abilities.wis).max().unwrap_or(0)
        });
        let bonus = self.details.bonus.unwrap_or(me.abilities.dex);
        let (mut advantage, mut disadvantage) = (vec![], vec![]);
        if self.details.advantage {
            advantage.push("declared".to_string());
        }
        if self.take_help(None) {
            advantage.push("helped".into());
        }
        if self.details.disadvantage {
            disadvantage.push("declared".to_string());
        }
        if me.exhaustion >= 1 {
            disadvantage.push("exhaustion".into());
        }
        let mode = Mode::from_sources(!advantage.is_empty(), !disadvantage.is_empty());
        let d20 = self.s.dice.d20("check", Some(self.actor), mode, bonus);
        let success = d20.total >= dc;
        let mut outcome = Resolution::outcome(self.actor);
        if success {
            self.s.ch(self.actor).add_condition(Condition::Hidden);
            outcome.conditions.push(Condition::Hidden);
        }
        outcome
            .effects
            .push(if success { "hidden" } else { "not_hidden" }.into());
        outcome.check = Some(CheckRoll {
            ability: Ability::Dex,
            skill: "stealth".into(),
            dc,
            d20: d20.kept,
            bonus,
            total: d20.total,
            mode,
            advantage,
            disadvantage,
            success,
        });
        self.finish(&mut outcome);
        outcome
    }

    /// Ready: records the readied action (and holds a readied spell with
    /// concentration).
    pub(crate) fn ready(&mut self, cost: Cost) -> Result<Vec<Outcome>> {
        debug_assert_eq!(cost, Cost::Action, "checked when declared");
        let action = self
            .details
            .action
            .filter(|a| {
                matches!(
                    a,
                    ActionType::Attack | ActionType::Save | ActionType::Heal | ActionType::Other
                )
            })
            .ok_or_else(|| {
                bad("details.action is the readied action: attack, save, heal or other")
            })?;
        let trigger = self
            .details
            .trigger
            .clone()
            .filter(|t| !t.trim().is_empty() && t.chars().count() <= MAX_TRIGGER)
            .ok_or_else(|| bad(format!("details.trigger is 1 to {MAX_TRIGGER} characters")))?;
        let spell = self.details.spell;
        if spell {
            // "holding onto the spell's magic requires concentration"
            self.s.g.end_concentration(self.actor);
            let name = self
                .details
                .name
                .clone()
                .unwrap_or_else(|| "readied spell".into());
            self.s.ch(self.actor).concentration = Some(Concentration {
                action_id: self.action_id,
                name,
            });
        }
        let (actor, action_id) = (self.actor, self.action_id);
        let combat = self.s.g.combat.as_mut().expect("acting in combat");
        let p = combat.participants.get_mut(&actor).expect("a participant");
        p.readied = Some(Readied {
            action_id,
            action_type: action,
            trigger,
            spell,
        });
        Ok(vec![])
    }
}
