//! Content and characters from the other services (issue 12), as rules.
//!
//! The node asks the Character, LLM and Image services over the Message Hub; the
//! rules never wait for them. What they decide:
//!
//! * **Joins** ([`SessionState::with_service_sheet`]): with
//!   [`Policy::sheets_from_service`] on, a player cannot declare a sheet (the DM
//!   still can); the Character Service's answer (`JoinRequest::lookup`) decides
//!   whether the joining user owns the character (`not_your_character` otherwise)
//!   and what sheet it enters play with. No answer in time: it enters play
//!   `pending`, a stand-in filled in by [`Command::CharacterFill`] (or a hub
//!   `character.state.changed`) as a `character_updated`.
//! * **Requests** (`narrate`, `monster_decide`, `map_request`, the DM's): an event
//!   saying what was asked (`narration_requested`, `map_requested`), committed like
//!   any other; the node sends the request once it is committed.
//! * **Answers** (internal commands, decided with the system's `ctx.admin`): the
//!   service's answer becomes an event (`narration`, `map_updated`) or, after the
//!   deadline, a failure (`narration_failed`, `map_failed`), so everything a client
//!   sees is in the log, ordered and replayed like the rest.

use crate::character::{Character, CharacterChanges};
use crate::command::{
    CharacterLookup, Command, Ctx, Grid, JoinRequest, MAX_GRID, MAX_NARRATION_CHARS,
    MAX_PROMPT_CHARS,
};
use crate::error::{codes, Result, RuleError};
use crate::event::{
    CharacterUpdated, Event, MapRequested, MapUpdated, Narration, NarrationRequested, ServiceFailed,
};
use crate::game::Scratch;
use crate::state::{Policy, SessionState};
use serde_json::{json, Value};
use uuid::Uuid;

/// `ServiceFailed::what` of a monster's action the rules refused after its narration
/// (the request is answered by then: this failure is not a second answer).
pub const MONSTER_ACTION: &str = "monster_action";

/// The stand-in sheet of a character whose sheet has not arrived.
fn pending_sheet() -> Value {
    json!({"name": "(pending)", "max_hp": 1, "ac": 10, "pending": true})
}

fn forbidden(message: &str) -> RuleError {
    RuleError::new(codes::FORBIDDEN_FOR_ROLE, message)
}

fn check_text(field: &str, text: &str) -> Result<()> {
    if text.trim().is_empty() || text.chars().count() > MAX_PROMPT_CHARS {
        return Err(RuleError::new(
            codes::INVALID_PAYLOAD,
            format!("{field} must be 1 to {MAX_PROMPT_CHARS} characters"),
        ));
    }
    Ok(())
}

fn check_grid(g: Grid) -> Result<()> {
    if g.width == 0 || g.height == 0 || g.width > MAX_GRID || g.height > MAX_GRID {
        return Err(RuleError::new(
            codes::INVALID_PAYLOAD,
            format!("grid sides must be 1 to {MAX_GRID} squares"),
        ));
    }
    Ok(())
}

impl Policy {
    /// Whether `ctx` may put a sheet of its own in a join.
    fn may_declare_sheet(self, dm: bool) -> bool {
        !self.sheets_from_service || dm
    }
}

impl SessionState {
    /// The join as the rules decide it, given the Character Service's answer: the
    /// service's sheet (or a pending stand-in) replaces the client's; a character
    /// another user owns is refused.
    pub(crate) fn with_service_sheet(&self, ctx: &Ctx, j: &JoinRequest) -> Result<JoinRequest> {
        let dm = self.is_dm(ctx);
        if j.character.is_some() && !self.policy.may_declare_sheet(dm) {
            return Err(forbidden(
                "character sheets come from the Character Service; only the DM declares one",
            ));
        }
        let (Some(id), Some(lookup)) = (j.character_id, &j.lookup) else {
            return Ok(j.clone());
        };
        let mut j = j.clone();
        let in_play = self.game.characters.contains_key(&id);
        match lookup {
            CharacterLookup::Found { owner_id, sheet } => {
                if *owner_id != ctx.user_id && !dm {
                    return Err(RuleError::new(
                        codes::NOT_YOUR_CHARACTER,
                        "the Character Service says another user owns that character",
                    )
                    .with_details(json!({ "character_id": id })));
                }
                if j.character.is_none() && !in_play {
                    j.character = Some(sheet.clone());
                }
            }
            CharacterLookup::NotFound if !in_play && j.character.is_none() => {
                return Err(RuleError::new(
                    codes::CHARACTER_NOT_FOUND,
                    "the Character Service does not know that character",
                )
                .with_details(json!({ "character_id": id })));
            }
            CharacterLookup::NotFound => {}
            CharacterLookup::Unavailable { .. } => {
                if j.character.is_none() && !in_play {
                    j.character = Some(pending_sheet());
                }
            }
        }
        Ok(j)
    }

    /// Requests to the LLM and Image services and their answers.
    pub(crate) fn decide_service(&self, ctx: &Ctx, cmd: &Command) -> Result<Vec<Event>> {
        self.require_member(ctx)?;
        if self.status == crate::Status::Ended {
            return Err(RuleError::new(
                codes::SESSION_ENDED,
                "the session has ended",
            ));
        }
        let (by, timestamp) = (ctx.user_id, ctx.timestamp.clone());
        match cmd {
            Command::Narrate { .. }
            | Command::MonsterDecide { .. }
            | Command::MapRequest { .. } => {
                if !self.is_dm(ctx) {
                    return Err(forbidden("only the DM asks for narration and maps"));
                }
                self.decide_request(ctx, cmd)
            }
            _ if !ctx.admin => Err(forbidden("service answers are internal to the service")),
            // An answer to a request answered already (by the node that asked before
            // the session moved, and again by its new owner): nothing to do.
            Command::NarrationDone { request_id, .. } | Command::MapDone { request_id, .. }
                if !self.open_requests.contains_key(request_id) =>
            {
                Ok(vec![])
            }
            Command::ServiceFailed {
                request_id, what, ..
            } if what != MONSTER_ACTION && !self.open_requests.contains_key(request_id) => {
                Ok(vec![])
            }
            Command::NarrationDone {
                request_id,
                text,
                character_id,
                action,
            } => Ok(vec![Event::Narration(Narration {
                request_id: *request_id,
                text: text.chars().take(MAX_NARRATION_CHARS).collect(),
                character_id: *character_id,
                action: action.clone(),
                by,
                timestamp,
            })]),
            Command::MapDone {
                request_id,
                url,
                asset_id,
                grid,
            } => self.decide_map_done(ctx, *request_id, url, asset_id.clone(), *grid),
            Command::ServiceFailed {
                request_id,
                what,
                reason,
            } => {
                let failed = ServiceFailed {
                    request_id: *request_id,
                    reason: reason.chars().take(MAX_PROMPT_CHARS).collect(),
                    by,
                    timestamp,
                };
                Ok(vec![if what == "map" {
                    Event::MapFailed(failed)
                } else {
                    Event::NarrationFailed(failed)
                }])
            }
            Command::CharacterFill {
                character_id,
                owner_id,
                sheet,
            } => self.decide_fill(ctx, *character_id, *owner_id, sheet),
            other => Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                format!("{} is not a service command", other.kind()),
            )),
        }
    }

    /// `narrate`, `monster_decide`, `map_request`: what was asked, as an event.
    fn decide_request(&self, ctx: &Ctx, cmd: &Command) -> Result<Vec<Event>> {
        let (by, timestamp, request_id) = (ctx.user_id, ctx.timestamp.clone(), ctx.command_id);
        Ok(vec![match cmd {
            Command::Narrate { prompt, context } => {
                check_text("prompt", prompt)?;
                Event::NarrationRequested(NarrationRequested {
                    request_id,
                    request_type: "narrate".into(),
                    prompt: Some(prompt.clone()),
                    character_id: None,
                    context: context.clone(),
                    by,
                    timestamp,
                })
            }
            Command::MonsterDecide {
                character_id,
                prompt,
            } => {
                if let Some(p) = prompt {
                    check_text("prompt", p)?;
                }
                self.game.character(*character_id)?;
                Event::NarrationRequested(NarrationRequested {
                    request_id,
                    request_type: "monster_decide".into(),
                    prompt: prompt.clone(),
                    character_id: Some(*character_id),
                    context: None,
                    by,
                    timestamp,
                })
            }
            Command::MapRequest { description, grid } => {
                check_text("description", description)?;
                check_grid(*grid)?;
                Event::MapRequested(MapRequested {
                    request_id,
                    description: description.clone(),
                    grid: *grid,
                    by,
                    timestamp,
                })
            }
            _ => unreachable!("decide_request is given requests"),
        }])
    }

    fn decide_map_done(
        &self,
        ctx: &Ctx,
        request_id: Uuid,
        url: &str,
        asset_id: Option<String>,
        grid: Grid,
    ) -> Result<Vec<Event>> {
        if url.is_empty() || url.len() > 2048 || url.chars().any(char::is_control) {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "a map URL is 1 to 2048 characters",
            ));
        }
        let mut s = Scratch::new(&self.game);
        let mut map = json!({"request_id": request_id, "url": url, "grid": grid});
        if let Some(a) = &asset_id {
            // Never a null: a merge patch would read it as "remove".
            map["asset_id"] = json!(a);
        }
        s.g.map = Some(map);
        Ok(vec![Event::MapUpdated(MapUpdated {
            request_id,
            url: url.to_string(),
            asset_id,
            grid,
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }

    /// The sheet of a pending character arrived: it replaces the stand-in (keeping
    /// its square), if the member it is bound to owns it.
    fn decide_fill(&self, ctx: &Ctx, id: Uuid, owner: Uuid, sheet: &Value) -> Result<Vec<Event>> {
        let current = self.game.character(id)?;
        if !current.pending {
            return Ok(vec![]); // filled already (or by a hub event): nothing to do
        }
        let bound = self
            .members
            .iter()
            .any(|(u, m)| *u == owner && m.characters.contains(&id));
        if !bound {
            return Err(RuleError::new(
                codes::NOT_YOUR_CHARACTER,
                "the Character Service says another user owns that character",
            )
            .with_details(json!({ "character_id": id, "owner_id": owner })));
        }
        let mut c = Character::from_sheet(id, sheet, true)?;
        c.position = current.position;
        let mut s = Scratch::new(&self.game);
        s.g.characters.insert(id, c);
        let changes = CharacterChanges::from_hub(sheet).unwrap_or_default();
        Ok(vec![Event::CharacterUpdated(CharacterUpdated {
            character_id: id,
            changes,
            source: "character_service".into(),
            effects_ended: vec![],
            concentration_check: None,
            rolls: s.rolls(),
            by: ctx.user_id,
            patch: s.patch(),
            timestamp: ctx.timestamp.clone(),
        })])
    }
}

/// A one-line description of a service event (the audit log's `summary`).
pub fn summary(event: &Event) -> String {
    match event {
        Event::NarrationRequested(e) => format!("{} asked of the LLM Service", e.request_type),
        Event::Narration(e) => format!("narration ({} characters)", e.text.chars().count()),
        Event::NarrationFailed(e) => format!("narration failed: {}", e.reason),
        Event::MapRequested(e) => format!("map asked ({}×{})", e.grid.width, e.grid.height),
        Event::MapUpdated(e) => format!("map updated: {}", e.url),
        Event::MapFailed(e) => format!("map failed: {}", e.reason),
        other => other.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::JoinRequest;
    use crate::state::OpenRequest;
    use crate::Status;

    const T: &str = "2026-01-01T00:00:00.000Z";

    fn ctx(user: Uuid, admin: bool) -> Ctx {
        Ctx {
            user_id: user,
            admin,
            command_id: Uuid::new_v4(),
            timestamp: T.into(),
        }
    }

    /// An active session of `dm` with sheets from the Character Service.
    fn session() -> (SessionState, Uuid) {
        let (id, dm) = (Uuid::new_v4(), Uuid::new_v4());
        let mut s = SessionState::empty(id);
        s.apply(&SessionState::creation(
            id,
            Uuid::new_v4(),
            "t".into(),
            json!({}),
            dm,
            T.into(),
        ));
        s.policy.sheets_from_service = true;
        (s, dm)
    }

    fn run(s: &mut SessionState, c: &Ctx, cmd: &Command) -> Result<Vec<Event>> {
        let events = s.decide(c, cmd)?;
        for e in &events {
            s.apply(e);
        }
        Ok(events)
    }

    fn join(c: Uuid, sheet: Option<Value>, lookup: Option<CharacterLookup>) -> Command {
        Command::Join(JoinRequest {
            character_id: Some(c),
            character: sheet,
            lookup,
            ..Default::default()
        })
    }

    fn found(owner: Uuid) -> Option<CharacterLookup> {
        Some(CharacterLookup::Found {
            owner_id: owner,
            sheet: json!({"name": "Aria", "max_hp": 24, "ac": 15}),
        })
    }

    #[test]
    fn joins_with_the_character_services_answer() {
        let unavailable = || {
            Some(CharacterLookup::Unavailable {
                reason: "timeout".into(),
            })
        };
        let own_sheet = Some(json!({"max_hp": 300, "ac": 30}));
        // (who joins: owner / other / dm, lookup, own sheet) → error code or the
        // character's (name, pending) in play.
        type Case = (
            &'static str,
            Option<CharacterLookup>,
            Option<Value>,
            std::result::Result<(&'static str, bool), &'static str>,
        );
        let owner = Uuid::new_v4();
        let cases: Vec<Case> = vec![
            ("owner", found(owner), None, Ok(("Aria", false))),
            ("other", found(owner), None, Err(codes::NOT_YOUR_CHARACTER)),
            ("dm", found(owner), None, Ok(("Aria", false))),
            (
                "owner",
                Some(CharacterLookup::NotFound),
                None,
                Err(codes::CHARACTER_NOT_FOUND),
            ),
            ("owner", unavailable(), None, Ok(("(pending)", true))),
            (
                "owner",
                found(owner),
                own_sheet.clone(),
                Err(codes::FORBIDDEN_FOR_ROLE),
            ),
            ("dm", found(owner), own_sheet, Ok(("character", false))),
        ];
        for (i, (who, lookup, sheet, want)) in cases.into_iter().enumerate() {
            let (mut s, dm) = session();
            let user = match who {
                "owner" => owner,
                "dm" => dm,
                _ => Uuid::new_v4(),
            };
            let c = Uuid::new_v4();
            let version = s.version;
            let got = run(&mut s, &ctx(user, false), &join(c, sheet, lookup));
            match want {
                Ok((name, pending)) => {
                    got.unwrap_or_else(|e| panic!("case {i}: {e:?}"));
                    let ch = &s.game.characters[&c];
                    assert_eq!((ch.name.as_str(), ch.pending), (name, pending), "case {i}");
                    assert!(s.members[&user].characters.contains(&c), "case {i}");
                }
                Err(code) => {
                    assert_eq!(got.unwrap_err().code, code, "case {i}");
                    assert_eq!(s.version, version, "case {i}: a refusal changed nothing");
                }
            }
        }
    }

    #[test]
    fn a_pending_character_is_filled_once_by_its_owner() {
        let (mut s, _dm) = session();
        let (owner, c) = (Uuid::new_v4(), Uuid::new_v4());
        let pending = Some(CharacterLookup::Unavailable {
            reason: "timeout".into(),
        });
        run(&mut s, &ctx(owner, false), &join(c, None, pending)).unwrap();
        let fill = |by: Uuid| Command::CharacterFill {
            character_id: c,
            owner_id: by,
            sheet: json!({"name": "Borin", "max_hp": 31, "ac": 17}),
        };
        let system = ctx(Uuid::nil(), true);
        // Not for a client, nor for another owner.
        assert_eq!(
            run(&mut s, &ctx(owner, false), &fill(owner))
                .unwrap_err()
                .code,
            codes::FORBIDDEN_FOR_ROLE
        );
        assert_eq!(
            run(&mut s, &system, &fill(Uuid::new_v4()))
                .unwrap_err()
                .code,
            codes::NOT_YOUR_CHARACTER
        );
        let events = run(&mut s, &system, &fill(owner)).unwrap();
        assert!(
            matches!(&events[..], [Event::CharacterUpdated(e)] if e.source == "character_service")
        );
        let ch = &s.game.characters[&c];
        assert_eq!(
            (ch.name.as_str(), ch.max_hp, ch.ac, ch.pending),
            ("Borin", 31, 17, false)
        );
        // A second answer (a retry) changes nothing.
        assert!(run(&mut s, &system, &fill(owner)).unwrap().is_empty());
    }

    #[test]
    fn requests_and_answers() {
        let (mut s, dm) = session();
        let player = Uuid::new_v4();
        run(
            &mut s,
            &ctx(player, false),
            &Command::Join(JoinRequest::default()),
        )
        .unwrap();
        let grid = Grid {
            width: 30,
            height: 20,
        };
        let narrate = Command::Narrate {
            prompt: "the cave".into(),
            context: None,
        };
        let cases: Vec<(Uuid, bool, Command, std::result::Result<&str, &str>)> = vec![
            (dm, false, narrate.clone(), Ok("narration_requested")),
            (player, false, narrate, Err(codes::FORBIDDEN_FOR_ROLE)),
            (
                dm,
                false,
                Command::Narrate {
                    prompt: " ".into(),
                    context: None,
                },
                Err(codes::INVALID_PAYLOAD),
            ),
            (
                dm,
                false,
                Command::MonsterDecide {
                    character_id: Uuid::new_v4(),
                    prompt: None,
                },
                Err(codes::UNKNOWN_CHARACTER),
            ),
            (
                dm,
                false,
                Command::MapRequest {
                    description: "a forest".into(),
                    grid,
                },
                Ok("map_requested"),
            ),
            (
                dm,
                false,
                Command::MapRequest {
                    description: "x".into(),
                    grid: Grid {
                        width: 0,
                        height: 5,
                    },
                },
                Err(codes::INVALID_PAYLOAD),
            ),
            (
                dm,
                false,
                Command::NarrationDone {
                    request_id: Uuid::nil(),
                    text: "x".into(),
                    character_id: None,
                    action: None,
                },
                Err(codes::FORBIDDEN_FOR_ROLE),
            ),
            (
                Uuid::nil(),
                true,
                Command::NarrationDone {
                    request_id: Uuid::nil(),
                    text: "Dust falls.".into(),
                    character_id: None,
                    action: None,
                },
                Ok("narration"),
            ),
            (
                Uuid::nil(),
                true,
                Command::ServiceFailed {
                    request_id: Uuid::nil(),
                    what: "narration".into(),
                    reason: "timeout".into(),
                },
                Ok("narration_failed"),
            ),
            (
                Uuid::nil(),
                true,
                Command::ServiceFailed {
                    request_id: Uuid::nil(),
                    what: "map".into(),
                    reason: "timeout".into(),
                },
                Ok("map_failed"),
            ),
            (
                Uuid::nil(),
                true,
                Command::MapDone {
                    request_id: Uuid::nil(),
                    url: "https://maps.example/a.png".into(),
                    asset_id: None,
                    grid,
                },
                Ok("map_updated"),
            ),
            (
                Uuid::nil(),
                true,
                Command::MapDone {
                    request_id: Uuid::nil(),
                    url: "".into(),
                    asset_id: None,
                    grid,
                },
                Err(codes::INVALID_PAYLOAD),
            ),
        ];
        for (i, (user, admin, cmd, want)) in cases.into_iter().enumerate() {
            if admin {
                // Each answer answers an open request (see the test below for others).
                open(&mut s, Uuid::nil());
            }
            let got = run(&mut s, &ctx(user, admin), &cmd).map(|e| e[0].kind());
            match want {
                Ok(kind) => assert_eq!(
                    got.unwrap_or_else(|e| panic!("case {i}: {e:?}")),
                    kind,
                    "case {i}"
                ),
                Err(code) => assert_eq!(got.unwrap_err().code, code, "case {i}"),
            }
        }
        assert_eq!(
            s.game.map.as_ref().unwrap()["url"],
            "https://maps.example/a.png"
        );
        // An ended session takes no more.
        s.status = Status::Ended;
        let narrate = Command::Narrate {
            prompt: "late".into(),
            context: None,
        };
        assert_eq!(
            run(&mut s, &ctx(dm, false), &narrate).unwrap_err().code,
            codes::SESSION_ENDED
        );
    }

    /// An open LLM request with id `id`, as its `narration_requested` would leave it.
    fn open(s: &mut SessionState, id: Uuid) {
        s.open_requests.insert(
            id,
            OpenRequest::Llm(NarrationRequested {
                request_id: id,
                request_type: "narrate".into(),
                prompt: Some("p".into()),
                character_id: None,
                context: None,
                by: Uuid::nil(),
                timestamp: T.into(),
            }),
        );
    }

    #[test]
    fn a_request_stays_open_until_answered_once() {
        let (mut s, dm) = session();
        let system = ctx(Uuid::nil(), true);
        let asked = ctx(dm, false);
        let narrate = Command::Narrate {
            prompt: "the crypt".into(),
            context: None,
        };
        run(&mut s, &asked, &narrate).unwrap();
        let map = Command::MapRequest {
            description: "a forest".into(),
            grid: Grid {
                width: 3,
                height: 3,
            },
        };
        let map_ctx = ctx(dm, false);
        run(&mut s, &map_ctx, &map).unwrap();
        assert_eq!(s.open_requests.len(), 2, "both requests are open");
        assert!(matches!(
            s.open_requests[&asked.command_id],
            OpenRequest::Llm(_)
        ));
        // Snapshots keep them.
        let stored: SessionState =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(stored.open_requests, s.open_requests);
        let done = Command::NarrationDone {
            request_id: asked.command_id,
            text: "Dust falls.".into(),
            character_id: None,
            action: None,
        };
        assert_eq!(run(&mut s, &system, &done).unwrap()[0].kind(), "narration");
        // A second answer (the old owner's and the new owner's): nothing happens.
        assert!(run(&mut s, &system, &done).unwrap().is_empty());
        let late_failure = Command::ServiceFailed {
            request_id: asked.command_id,
            what: "narration".into(),
            reason: "timeout".into(),
        };
        assert!(run(&mut s, &system, &late_failure).unwrap().is_empty());
        // A monster's refused action after its narration is still told.
        let refused = Command::ServiceFailed {
            request_id: asked.command_id,
            what: MONSTER_ACTION.into(),
            reason: "the monster's action was refused".into(),
        };
        assert_eq!(
            run(&mut s, &system, &refused).unwrap()[0].kind(),
            "narration_failed"
        );
        // The map request is still open; its failure closes it, once.
        let failed = Command::ServiceFailed {
            request_id: map_ctx.command_id,
            what: "map".into(),
            reason: "timeout".into(),
        };
        assert_eq!(
            run(&mut s, &system, &failed).unwrap()[0].kind(),
            "map_failed"
        );
        assert!(s.open_requests.is_empty());
        assert!(run(&mut s, &system, &failed).unwrap().is_empty());
    }
}
