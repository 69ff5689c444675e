//! Saving throws, in one place for every rule that rolls one: an action's save, the
//! repeat save of a "save ends" effect, and the Constitution save that keeps
//! concentration (SRD 5.1, "Using Ability Scores: Saving Throws").
//!
//! A save is d20 + the ability modifier + the proficiency bonus if proficient, against
//! a DC; meeting it succeeds. What changes the roll:
//!
//! * conditions ([`crate::conditions::save_conditions`]): automatic failures of
//!   Strength and Dexterity saves, restrained and dodging on Dexterity saves;
//! * traits (`save_advantages` / `save_disadvantages` of the sheet): an ability,
//!   `magic` (Magic Resistance: "advantage on saving throws against spells and other
//!   magical effects") or `concentration` (War Caster);
//! * exhaustion level 3 or more: disadvantage on saving throws (SRD 5.1, appendix A);
//! * cover: +2 (half) or +5 (three-quarters) to Dexterity saves (SRD 5.1, "Combat:
//!   Cover").
//!
//! Any advantage and any disadvantage cancel out ([`Mode::from_sources`]).

use crate::character::{Ability, Character};
use crate::conditions::save_conditions;
use crate::dice::{Mode, Roller};
use crate::event::{ConcentrationCheck, SaveRoll};
use crate::terrain::Cover;

/// What bears on a saving throw besides the saver itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveContext {
    /// Against a spell or another magical effect.
    pub magical: bool,
    /// To keep concentration.
    pub concentration: bool,
    /// The saver's cover (counts for Dexterity saves only).
    pub cover: Cover,
}

/// Advantage and disadvantage sources of a save by `c`.
fn sources(c: &Character, ability: Ability, ctx: SaveContext) -> (Vec<String>, Vec<String>) {
    let why = save_conditions(&c.conditions, ability);
    let (mut adv, mut dis) = (why.advantage, why.disadvantage);
    for t in &c.save_advantages {
        if t.applies(ability, ctx.magical, ctx.concentration) {
            adv.push(format!("trait_{}", t.as_str()));
        }
    }
    for t in &c.save_disadvantages {
        if t.applies(ability, ctx.magical, ctx.concentration) {
            dis.push(format!("trait_{}", t.as_str()));
        }
    }
    if c.exhaustion >= 3 {
        dis.push("exhaustion".into());
    }
    (adv, dis)
}

/// Rolls `c`'s saving throw of `ability` against `dc` (or records its automatic
/// failure, without a roll). `purpose` names the roll in the record.
pub(crate) fn roll_save(
    dice: &mut Roller,
    purpose: &str,
    c: &Character,
    ability: Ability,
    dc: i32,
    ctx: SaveContext,
) -> SaveRoll {
    let auto_fail = save_conditions(&c.conditions, ability).auto_fail;
    let (advantage, disadvantage) = sources(c, ability, ctx);
    let cover = if ability == Ability::Dex {
        ctx.cover
    } else {
        Cover::None
    };
    let bonus = c.save_bonus(ability) + cover.bonus();
    let mode = Mode::from_sources(!advantage.is_empty(), !disadvantage.is_empty());
    let (d20, total, success) = match auto_fail {
        Some(_) => (None, None, false),
        None => {
            let r = dice.d20(purpose, Some(c.id), mode, bonus);
            (Some(r.kept), Some(r.total), r.total >= dc)
        }
    };
    SaveRoll {
        ability,
        dc,
        d20,
        bonus,
        total,
        mode,
        advantage,
        disadvantage,
        cover,
        auto_fail,
        success,
    }
}

/// The Constitution save a concentrating creature makes after taking `damage` (SRD 5.1,
/// "Spellcasting: Concentration"): DC 10 or half the damage, whichever is higher.
pub(crate) fn concentration_check(
    dice: &mut Roller,
    c: &Character,
    damage: u32,
) -> ConcentrationCheck {
    let dc = (damage.min(i32::MAX as u32) as i32 / 2).max(10);
    let ctx = SaveContext {
        concentration: true,
        ..Default::default()
    };
    let r = roll_save(dice, "concentration", c, Ability::Con, dc, ctx);
    ConcentrationCheck {
        dc,
        d20: r.d20.unwrap_or(0),
        total: r.total.unwrap_or(0),
        success: r.success,
        mode: r.mode,
        advantage: r.advantage,
        disadvantage: r.disadvantage,
    }
}
