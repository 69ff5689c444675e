//! The authoritative state of one session and its two functions:
//!
//! * [`SessionState::decide`]: command → events, or a [`RuleError`]; reads only.
//! * [`SessionState::apply`]: event → new state; cannot fail, makes no choices.
//!
//! The node's actor calls `decide`, commits the events, then `apply`s them; recovery
//! and replay call only `apply`. Maps are `BTreeMap`s so that serialisation (snapshots,
//! views) is deterministic.

use crate::command::{Command, Ctx, JoinRequest, StateUpdate, MAX_CHANGES};
use crate::error::{codes, Result, RuleError};
use crate::event::{AppliedChange, Event, StateRestored};
use crate::game::{Actor, Game};
use crate::limits::{self, DocLimits, SizeCache};
use crate::pointer;
use crate::types::ChangeOp;
pub use crate::types::{SessionRole, Status};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub role: SessionRole,
    /// Characters this member controls.
    #[serde(default)]
    pub characters: Vec<Uuid>,
    pub joined_at: String,
}

/// A request to another service that has no answer in the log yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "service", rename_all = "snake_case")]
pub enum OpenRequest {
    Llm(crate::event::NarrationRequested),
    Image(crate::event::MapRequested),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SessionState {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub name: String,
    pub status: Status,
    pub created_by: Uuid,
    pub settings: Value,
    pub members: BTreeMap<Uuid, Member>,
    /// The state document, edited by `state_update` (JSON Pointer changes).
    pub doc: Value,
    /// Metadata saved with `POST /state`.
    pub metadata: Value,
    /// Rules-managed play state: characters, combat, dice.
    pub game: Game,
    /// Number of events applied = the session version.
    pub version: u64,
    /// Timestamp of the last event.
    pub updated_at: String,
    /// Requests to the LLM and Image services committed and not answered yet (no
    /// `narration`, `narration_failed`, `map_updated` or `map_failed` for their
    /// `request_id`): a new owner asks again for each, and a second answer to one is
    /// a no-op. Stored with snapshots; absent from older ones (none open).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub open_requests: BTreeMap<Uuid, OpenRequest>,
    /// Bounds on the state document, checked by `decide` (set by the node from its
    /// configuration; not stored).
    #[serde(skip)]
    pub limits: DocLimits,
    /// The document's serialised size, kept up to date by `apply` once measured.
    #[serde(skip)]
    doc_size: SizeCache,
    /// How the session works with the other services (set by the node from its
    /// configuration; not stored).
    #[serde(skip)]
    pub policy: Policy,
}

/// The node's configuration as the rules need it (not stored: a replay decides
/// nothing, so it cannot depend on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// Character sheets come from the Character Service: a player cannot declare one
    /// (the DM still can); a join's `character_id` is checked against the service's
    /// owner (`JoinRequest::lookup`).
    pub sheets_from_service: bool,
}

impl SessionState {
    /// The document's size as kept (measuring it when unknown).
    #[cfg(test)]
    pub(crate) fn doc_size_for_tests(&self) -> usize {
        self.doc_size.get_or_measure(&self.doc)
    }

    /// The state before its first event.
    pub fn empty(id: Uuid) -> Self {
        SessionState {
            id,
            doc: Value::Object(Map::new()),
            metadata: Value::Object(Map::new()),
            settings: Value::Object(Map::new()),
            ..Default::default()
        }
    }

    /// The first event of a session.
    pub fn creation(
        id: Uuid,
        campaign_id: Uuid,
        name: String,
        settings: Value,
        created_by: Uuid,
        timestamp: String,
    ) -> Event {
        Event::SessionCreated {
            session_id: id,
            campaign_id,
            name,
            settings,
            created_by,
            timestamp,
        }
    }

    /// The session role of `user`, if a member.
    pub fn role_of(&self, user: &Uuid) -> Option<SessionRole> {
        self.members.get(user).map(|m| m.role)
    }

    /// The DM's powers: the session's DM, or an admin.
    pub fn is_dm(&self, ctx: &Ctx) -> bool {
        ctx.admin || self.role_of(&ctx.user_id) == Some(SessionRole::Dm)
    }

    /// Refuses non-members (admins pass).
    pub fn require_member(&self, ctx: &Ctx) -> Result<Option<SessionRole>> {
        match self.role_of(&ctx.user_id) {
            Some(r) => Ok(Some(r)),
            None if ctx.admin => Ok(None),
            None => Err(RuleError::new(
                codes::NOT_MEMBER,
                "join the session before acting in it",
            )),
        }
    }

    /// Decides a command. Reads only; the events returned are applied after commit.
    pub fn decide(&self, ctx: &Ctx, cmd: &Command) -> Result<Vec<Event>> {
        match cmd {
            Command::StateUpdate(u) => self.decide_state_update(ctx, u),
            Command::SaveState { state, metadata } => self.decide_save(ctx, state, metadata),
            Command::Join(j) => self.decide_join(ctx, j),
            Command::Leave {} => {
                self.require_member(ctx)?;
                if self.role_of(&ctx.user_id).is_none() {
                    return Err(RuleError::new(codes::NOT_MEMBER, "not a member"));
                }
                Ok(vec![Event::PlayerLeft {
                    user_id: ctx.user_id,
                    timestamp: ctx.timestamp.clone(),
                }])
            }
            Command::SessionStart {} => self.transition(ctx, &[Status::Created], Status::Active),
            Command::SessionPause {} => self.transition(ctx, &[Status::Active], Status::Paused),
            Command::SessionResume {} => self.transition(ctx, &[Status::Paused], Status::Active),
            Command::SessionEnd {} => self.transition(
                ctx,
                &[Status::Created, Status::Active, Status::Paused],
                Status::Ended,
            ),
            Command::CharacterSync { .. } => {
                // Internal: the node applies a Message Hub event with a system ctx.
                if !ctx.admin {
                    return Err(RuleError::new(
                        codes::FORBIDDEN_FOR_ROLE,
                        "character_sync is internal to the service",
                    ));
                }
                self.require_not_ended()?;
                self.game.decide(&self.actor(ctx), ctx, cmd)
            }
            Command::Narrate { .. }
            | Command::MonsterDecide { .. }
            | Command::MapRequest { .. }
            | Command::NarrationDone { .. }
            | Command::MapDone { .. }
            | Command::ServiceFailed { .. }
            | Command::CharacterFill { .. } => self.decide_service(ctx, cmd),
            Command::Rollback { to_version } => {
                self.check_rollback(ctx, *to_version)?;
                Err(RuleError::new(
                    codes::ROLLBACK_NEEDS_HISTORY,
                    "a rollback is decided by SessionState::decide_rollback with the past state",
                ))
            }
            play => self.decide_play(ctx, play),
        }
    }

    /// Play commands: members only, observers watch; setting up characters needs a
    /// session that has not ended, everything else an active one.
    fn decide_play(&self, ctx: &Ctx, cmd: &Command) -> Result<Vec<Event>> {
        let role = self.require_member(ctx)?;
        if role == Some(SessionRole::Observer) {
            return Err(RuleError::new(
                codes::FORBIDDEN_FOR_ROLE,
                "observers watch; they do not play",
            ));
        }
        self.require_not_ended()?;
        let setup = matches!(
            cmd,
            Command::SpawnCharacter { .. }
                | Command::CharacterUpdate { .. }
                | Command::PlaceCharacter { .. }
                | Command::TerrainSet { .. }
        );
        if !setup && self.status != Status::Active {
            return Err(RuleError::new(
                codes::SESSION_NOT_ACTIVE,
                format!("the session is {}, not active", self.status.as_str()),
            )
            .with_details(json!({ "status": self.status })));
        }
        self.game.decide(&self.actor(ctx), ctx, cmd)
    }

    /// The sender as the rules see it: DM powers and controlled characters.
    pub fn actor(&self, ctx: &Ctx) -> Actor {
        Actor {
            user: ctx.user_id,
            dm: self.is_dm(ctx),
            controls: self
                .members
                .get(&ctx.user_id)
                .map(|m| m.characters.clone())
                .unwrap_or_default(),
        }
    }

    /// The checks of a rollback that need no history: the DM, a session not ended, and
    /// 1 ≤ `to_version` < the current version. The node calls it before replaying the
    /// log up to `to_version` (so a refused rollback costs no replay).
    pub fn check_rollback(&self, ctx: &Ctx, to_version: u64) -> Result<()> {
        self.require_member(ctx)?;
        if !self.is_dm(ctx) {
            return Err(RuleError::new(
                codes::FORBIDDEN_FOR_ROLE,
                "only the DM rolls the session back",
            ));
        }
        self.require_not_ended()?;
        if to_version == 0 || to_version >= self.version {
            return Err(RuleError::new(
                codes::INVALID_VERSION,
                format!(
                    "to_version must be between 1 and {} (the current version is {})",
                    self.version.saturating_sub(1),
                    self.version
                ),
            )
            .with_details(json!({ "to_version": to_version, "version": self.version })));
        }
        Ok(())
    }

    /// Decides a rollback to `to_version`, given `past`: this session's state at that
    /// version (replayed by the node from the log). Emits `state_restored`, which
    /// restores the state document, its metadata and the play state (characters,
    /// effects, combat) of `past`. Members and the lifecycle status stay as they are
    /// now; characters bound by current members that were not yet in play stay in
    /// play; the dice counter and effect ids keep growing (no roll repeats). History is
    /// never erased: the rollback is one more event.
    pub fn decide_rollback(
        &self,
        ctx: &Ctx,
        to_version: u64,
        past: &SessionState,
    ) -> Result<Vec<Event>> {
        self.check_rollback(ctx, to_version)?;
        if past.version != to_version || past.id != self.id {
            return Err(RuleError::new(
                codes::INVALID_VERSION,
                "the past state given is not this session at to_version",
            )
            .with_details(json!({ "to_version": to_version, "past_version": past.version })));
        }
        let keep: Vec<Uuid> = self
            .members
            .values()
            .flat_map(|m| m.characters.iter().copied())
            .collect();
        let restored = self.game.restored(&past.game, &keep);
        Ok(vec![Event::StateRestored(StateRestored {
            to_version,
            doc: past.doc.clone(),
            metadata: past.metadata.clone(),
            by: ctx.user_id,
            patch: self.game.patch_to(&restored),
            timestamp: ctx.timestamp.clone(),
        })])
    }

    /// [`apply`](Self::apply), taking the event: a state update's values move into
    /// the document instead of being copied (the owner's path for every command).
    pub fn apply_owned(&mut self, mut event: Event) {
        let Event::StateUpdate {
            changes, metadata, ..
        } = &mut event
        else {
            return self.apply(&event);
        };
        let mut size = self.doc_size.known();
        for c in changes.iter_mut() {
            let value = c.value.take().map(Cow::Owned);
            self.apply_change(c.op, &c.path, value, &mut size);
        }
        self.doc_size.set(size);
        if let Some(m) = metadata.take() {
            self.metadata = m;
        }
        self.applied(&event);
    }

    /// One change of a decided state update; `size` is the document's size while it is
    /// known (kept up to date, or forgotten).
    fn apply_change(
        &mut self,
        op: ChangeOp,
        path: &str,
        value: Option<Cow<'_, Value>>,
        size: &mut Option<usize>,
    ) {
        let delta_of = match (op, &value) {
            (ChangeOp::Remove, _) => Some(None),
            (ChangeOp::Set, Some(v)) => Some(Some(v.as_ref())),
            (ChangeOp::Set, None) => None,
        };
        if let (Some(n), Some(new)) = (*size, delta_of) {
            *size = limits::size_delta(&self.doc, path, new)
                .ok()
                .and_then(|(d, _)| n.checked_add_signed(d));
        }
        let r = match (op, value) {
            (ChangeOp::Remove, _) => pointer::remove(&mut self.doc, path).map(|_| ()),
            (ChangeOp::Set, Some(v)) => {
                pointer::set(&mut self.doc, path, v.into_owned()).map(|_| ())
            }
            (ChangeOp::Set, None) => Ok(()),
        };
        debug_assert!(r.is_ok(), "a decided change failed to apply: {r:?}");
    }

    /// Applies one event. Never fails: events were validated when decided.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::SessionCreated {
                session_id,
                campaign_id,
                name,
                settings,
                created_by,
                timestamp,
            } => {
                self.id = *session_id;
                self.campaign_id = *campaign_id;
                self.name = name.clone();
                self.settings = settings.clone();
                self.created_by = *created_by;
                self.status = Status::Created;
                self.members.insert(
                    *created_by,
                    Member {
                        role: SessionRole::Dm,
                        characters: vec![],
                        joined_at: timestamp.clone(),
                    },
                );
                self.game = Game::new(*session_id, settings);
            }
            Event::StateUpdate {
                changes, metadata, ..
            } => {
                let mut size = self.doc_size.known();
                for c in changes {
                    let value = c.value.as_ref().map(Cow::Borrowed);
                    self.apply_change(c.op, &c.path, value, &mut size);
                }
                self.doc_size.set(size);
                if let Some(m) = metadata {
                    self.metadata = m.clone();
                }
            }
            Event::PlayerJoined {
                user_id,
                role,
                character_id,
                timestamp,
                ..
            } => {
                let m = self.members.entry(*user_id).or_insert_with(|| Member {
                    role: *role,
                    characters: vec![],
                    joined_at: timestamp.clone(),
                });
                if let Some(c) = character_id {
                    if !m.characters.contains(c) {
                        m.characters.push(*c);
                    }
                }
            }
            Event::PlayerLeft { user_id, .. } => {
                self.members.remove(user_id);
            }
            Event::SessionStatusChanged { status, .. } => {
                self.status = *status;
            }
            Event::StateRestored(e) => {
                self.doc = e.doc.clone();
                self.doc_size.set(None);
                self.metadata = e.metadata.clone();
            }
            Event::NarrationRequested(e) => {
                self.open_requests
                    .insert(e.request_id, OpenRequest::Llm(e.clone()));
            }
            Event::MapRequested(e) => {
                self.open_requests
                    .insert(e.request_id, OpenRequest::Image(e.clone()));
            }
            Event::Narration(e) => {
                self.open_requests.remove(&e.request_id);
            }
            Event::MapUpdated(e) => {
                self.open_requests.remove(&e.request_id);
            }
            Event::NarrationFailed(e) | Event::MapFailed(e) => {
                self.open_requests.remove(&e.request_id);
            }
            // Play events change only the play state (below).
            _ => {}
        }
        self.applied(event);
    }

    /// What every applied event does last: the play state follows it, the version
    /// moves on.
    fn applied(&mut self, event: &Event) {
        self.game.apply(event);
        self.version += 1;
        self.updated_at = event.timestamp().to_string();
    }

    fn decide_state_update(&self, ctx: &Ctx, u: &StateUpdate) -> Result<Vec<Event>> {
        let role = self.require_member(ctx)?;
        if role == Some(SessionRole::Observer) {
            return Err(RuleError::new(
                codes::FORBIDDEN_FOR_ROLE,
                "observers cannot change the session state",
            ));
        }
        self.require_not_ended()?;
        if u.changes.is_empty() {
            return Err(RuleError::new(codes::INVALID_PAYLOAD, "`changes` is empty"));
        }
        if u.changes.len() > MAX_CHANGES {
            return Err(RuleError::new(
                codes::TOO_MANY_CHANGES,
                format!("at most {MAX_CHANGES} changes per update"),
            ));
        }
        // Validate against a scratch copy only when changes can see each other's effect.
        let mut scratch: Option<Value> = (u.changes.len() > 1).then(|| self.doc.clone());
        let mut applied = Vec::with_capacity(u.changes.len());
        let mut size = self.doc_size.get_or_measure(&self.doc);
        for (i, c) in u.changes.iter().enumerate() {
            let doc = scratch.as_ref().unwrap_or(&self.doc);
            size = self.check_limits(i, doc, c, size)?;
            let previous = pointer::get(doc, &c.path)
                .map_err(|e| path_error(i, e))?
                .cloned();
            if let Some(expected) = &c.previous {
                let actual = previous.clone().unwrap_or(Value::Null);
                if &actual != expected {
                    return Err(RuleError::new(
                        codes::CONFLICT,
                        format!("{} is not the expected `previous` value", c.path),
                    )
                    .with_details(json!({
                        "index": i, "path": c.path, "expected": expected, "actual": actual
                    })));
                }
            }
            match c.op {
                ChangeOp::Set => {
                    let Some(v) = &c.value else {
                        return Err(RuleError::new(
                            codes::INVALID_PAYLOAD,
                            format!(
                                "change {i}: `value` is required (use op \"remove\" to delete)"
                            ),
                        ));
                    };
                    match scratch.as_mut() {
                        Some(doc) => {
                            pointer::set(doc, &c.path, v.clone()).map_err(|e| path_error(i, e))?;
                        }
                        None => pointer::check_set(&self.doc, &c.path, v)
                            .map_err(|e| path_error(i, e))?,
                    }
                    applied.push(AppliedChange {
                        path: c.path.clone(),
                        value: Some(v.clone()),
                        previous,
                        op: ChangeOp::Set,
                    });
                }
                ChangeOp::Remove => {
                    if c.value.is_some() {
                        return Err(RuleError::new(
                            codes::INVALID_PAYLOAD,
                            format!("change {i}: a removal takes no `value`"),
                        ));
                    }
                    let reason = if c.path.is_empty() {
                        Some("the document root cannot be removed")
                    } else if previous.is_none() {
                        Some("nothing to remove")
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        return Err(path_error(
                            i,
                            pointer::PathError {
                                path: c.path.clone(),
                                reason: reason.into(),
                            },
                        ));
                    }
                    if let Some(doc) = scratch.as_mut() {
                        pointer::remove(doc, &c.path).map_err(|e| path_error(i, e))?;
                    }
                    applied.push(AppliedChange {
                        path: c.path.clone(),
                        value: None,
                        previous,
                        op: ChangeOp::Remove,
                    });
                }
            }
        }
        Ok(vec![Event::StateUpdate {
            update_id: ctx.command_id,
            user_id: ctx.user_id,
            changes: applied,
            metadata: None,
            timestamp: ctx.timestamp.clone(),
        }])
    }

    /// The document's bounds for change `i` of an update, against `doc` (the document
    /// as the earlier changes left it) of `size` bytes; returns the size after it.
    fn check_limits(
        &self,
        i: usize,
        doc: &Value,
        c: &crate::command::Change,
        size: usize,
    ) -> Result<usize> {
        let at = |e: RuleError| {
            let mut details = e.details.clone();
            details["index"] = json!(i);
            RuleError {
                message: format!("change {i}: {}", e.message),
                details,
                ..e
            }
        };
        let l = &self.limits;
        let tokens = l.check_path(&c.path).map_err(at)?;
        let value = match c.op {
            ChangeOp::Set => c.value.as_ref(),
            ChangeOp::Remove => None,
        };
        let value_len = match value {
            Some(v) => Some(l.check_value(tokens, v).map_err(at)?),
            None => None,
        };
        // Malformed paths and missing parents are reported by the change itself.
        let Ok((delta, members)) = limits::size_delta_of(doc, &c.path, value, value_len) else {
            return Ok(size);
        };
        if members > l.max_keys_per_object {
            return Err(at(limits::exceeded(
                "max_keys_per_object",
                l.max_keys_per_object,
                members,
                format!(
                    "an object may have at most {} members",
                    l.max_keys_per_object
                ),
            )));
        }
        let after = size.saturating_add_signed(delta);
        if delta > 0 {
            l.check_document(after).map_err(at)?;
        }
        Ok(after)
    }

    fn decide_save(&self, ctx: &Ctx, state: &Value, metadata: &Value) -> Result<Vec<Event>> {
        self.require_member(ctx)?;
        if !self.is_dm(ctx) {
            return Err(RuleError::new(
                codes::FORBIDDEN_FOR_ROLE,
                "only the DM can replace the session state",
            ));
        }
        self.require_not_ended()?;
        if !state.is_object() {
            return Err(RuleError::new(
                codes::INVALID_PAYLOAD,
                "`state` must be an object",
            ));
        }
        let l = &self.limits;
        l.check_shape(0, state)?;
        l.check_document(limits::json_len(state))?;
        l.check_value(1, metadata)?;
        Ok(vec![Event::StateUpdate {
            update_id: ctx.command_id,
            user_id: ctx.user_id,
            changes: vec![AppliedChange {
                path: String::new(),
                value: Some(state.clone()),
                previous: None,
                op: ChangeOp::Set,
            }],
            metadata: Some(if metadata.is_null() {
                json!({})
            } else {
                metadata.clone()
            }),
            timestamp: ctx.timestamp.clone(),
        }])
    }

    fn decide_join(&self, ctx: &Ctx, j: &JoinRequest) -> Result<Vec<Event>> {
        self.require_not_ended()?;
        let j = &self.with_service_sheet(ctx, j)?;
        let existing = self.role_of(&ctx.user_id);
        let role = match (existing, j.role) {
            (Some(r), _) => r,
            (None, Some(SessionRole::Dm)) => {
                return Err(RuleError::new(
                    codes::FORBIDDEN_FOR_ROLE,
                    "the DM role belongs to the session's creator",
                ))
            }
            (None, Some(r)) => r,
            (None, None) => SessionRole::Player,
        };
        if let Some(c) = j.character_id {
            if role == SessionRole::Observer {
                return Err(RuleError::new(
                    codes::FORBIDDEN_FOR_ROLE,
                    "observers do not control characters",
                ));
            }
            if let Some((owner, _)) = self
                .members
                .iter()
                .find(|(u, m)| **u != ctx.user_id && m.characters.contains(&c))
            {
                return Err(RuleError::new(
                    codes::CHARACTER_TAKEN,
                    "that character is controlled by another member",
                )
                .with_details(json!({ "character_id": c, "controlled_by": owner })));
            }
        }
        let already = existing.is_some()
            && j.character_id
                .is_none_or(|c| self.members[&ctx.user_id].characters.contains(&c))
            && j.character.is_none();
        if already {
            return Ok(vec![]); // joining again changes nothing
        }
        self.game.check_join(ctx, j)?;
        let mut joined = Event::PlayerJoined {
            user_id: ctx.user_id,
            role,
            character_id: j.character_id,
            character: j.character.clone(),
            patch: Value::Null,
            timestamp: ctx.timestamp.clone(),
        };
        // The play state after the join, as a patch (what clients merge).
        let mut after = self.game.clone();
        after.apply(&joined);
        let diff = self.game.patch_to(&after);
        if let Event::PlayerJoined { patch, .. } = &mut joined {
            *patch = diff;
        }
        Ok(vec![joined])
    }

    fn transition(&self, ctx: &Ctx, from: &[Status], to: Status) -> Result<Vec<Event>> {
        self.require_member(ctx)?;
        if !self.is_dm(ctx) {
            return Err(RuleError::new(
                codes::FORBIDDEN_FOR_ROLE,
                "only the DM changes the session's status",
            ));
        }
        if !from.contains(&self.status) {
            let code = if self.status == Status::Ended {
                codes::SESSION_ENDED
            } else {
                codes::INVALID_TRANSITION
            };
            return Err(RuleError::new(
                code,
                format!("cannot go from {} to {}", self.status.as_str(), to.as_str()),
            )
            .with_details(json!({"status": self.status, "requested": to})));
        }
        Ok(vec![Event::SessionStatusChanged {
            status: to,
            previous: self.status,
            by: ctx.user_id,
            timestamp: ctx.timestamp.clone(),
        }])
    }

    fn require_not_ended(&self) -> Result<()> {
        if self.status == Status::Ended {
            return Err(RuleError::new(
                codes::SESSION_ENDED,
                "the session has ended",
            ));
        }
        Ok(())
    }

    /// The rules-managed part clients see (`game` in views). The dice seed is left
    /// out (of `settings` too): whoever knows it can predict every roll.
    pub fn game_view(&self) -> Value {
        let mut settings = self.settings.clone();
        if let Value::Object(m) = &mut settings {
            m.remove("dice_seed");
        }
        json!({
            "session_id": self.id,
            "campaign_id": self.campaign_id,
            "name": self.name,
            "status": self.status,
            "created_by": self.created_by,
            "settings": settings,
            "members": self.members,
            "play": self.game.view(),
        })
    }
}

fn path_error(index: usize, e: pointer::PathError) -> RuleError {
    RuleError::new(
        codes::INVALID_PATH,
        format!("change {index}: invalid path {:?}: {}", e.path, e.reason),
    )
    .with_details(json!({"index": index, "path": e.path, "reason": e.reason}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(user: Uuid) -> Ctx {
        Ctx {
            user_id: user,
            admin: false,
            command_id: Uuid::new_v4(),
            timestamp: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    /// A session created by `dm`, with `player` joined.
    fn session() -> (SessionState, Uuid, Uuid) {
        let (id, dm, player) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut s = SessionState::empty(id);
        s.apply(&SessionState::creation(
            id,
            Uuid::new_v4(),
            "t".into(),
            json!({}),
            dm,
            "t0".into(),
        ));
        for e in s
            .decide(&ctx(player), &Command::Join(JoinRequest::default()))
            .unwrap()
        {
            s.apply(&e);
        }
        (s, dm, player)
    }

    fn update(changes: Value) -> Command {
        Command::from_client("state_update", json!({ "changes": changes })).unwrap()
    }

    fn run(s: &mut SessionState, c: &Ctx, cmd: &Command) -> Result<()> {
        for e in s.decide(c, cmd)? {
            s.apply(&e);
        }
        Ok(())
    }

    #[test]
    fn state_update_table() {
        let (mut s, _dm, p) = session();
        run(
            &mut s,
            &ctx(p),
            &update(json!([{"path": "/hp", "value": 10}])),
        )
        .unwrap();
        let cases: Vec<(Value, Option<&str>)> = vec![
            (json!([{"path": "/hp", "value": 9, "previous": 10}]), None),
            (
                json!([{"path": "/hp", "value": 1, "previous": 10}]),
                Some(codes::CONFLICT),
            ),
            (
                json!([{"path": "hp", "value": 1}]),
                Some(codes::INVALID_PATH),
            ),
            (
                json!([{"path": "/hp/deeper", "value": 1}]),
                Some(codes::INVALID_PATH),
            ),
            (
                json!([{"path": "/a~2", "value": 1}]),
                Some(codes::INVALID_PATH),
            ),
            (json!([{"path": "/x"}]), Some(codes::INVALID_PAYLOAD)),
            (json!([]), Some(codes::INVALID_PAYLOAD)),
            (
                json!([{"path": "/nope", "op": "remove"}]),
                Some(codes::INVALID_PATH),
            ),
            (json!([{"path": "", "value": 3}]), Some(codes::INVALID_PATH)),
            // All or nothing: the second change fails, so the first is not applied.
            (
                json!([{"path": "/mp", "value": 1}, {"path": "/hp", "value": 0, "previous": 99}]),
                Some(codes::CONFLICT),
            ),
            // Later changes see earlier ones.
            (
                json!([{"path": "/list", "value": []}, {"path": "/list/-", "value": "a"}]),
                None,
            ),
            (
                json!([{"path": "/null_guard", "value": 1, "previous": null}]),
                None,
            ),
        ];
        for (changes, want) in cases {
            let before = s.clone();
            let got = run(&mut s, &ctx(p), &update(changes.clone()));
            match want {
                None => assert!(got.is_ok(), "{changes}: {got:?}"),
                Some(code) => {
                    assert_eq!(got.unwrap_err().code, code, "{changes}");
                    assert_eq!(s, before, "a refused command changed the state");
                }
            }
        }
        assert_eq!(s.doc, json!({"hp": 9, "list": ["a"], "null_guard": 1}));
    }

    #[test]
    fn roles_and_membership() {
        let (mut s, dm, p) = session();
        let stranger = Uuid::new_v4();
        let up = update(json!([{"path": "/x", "value": 1}]));
        assert_eq!(
            run(&mut s, &ctx(stranger), &up).unwrap_err().code,
            codes::NOT_MEMBER
        );
        let obs = Uuid::new_v4();
        run(
            &mut s,
            &ctx(obs),
            &Command::Join(JoinRequest {
                role: Some(SessionRole::Observer),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(
            run(&mut s, &ctx(obs), &up).unwrap_err().code,
            codes::FORBIDDEN_FOR_ROLE
        );
        // Only the DM saves the whole state or changes the lifecycle.
        let save = Command::SaveState {
            state: json!({"fresh": 1}),
            metadata: json!({"note": "x"}),
        };
        assert_eq!(
            run(&mut s, &ctx(p), &save).unwrap_err().code,
            codes::FORBIDDEN_FOR_ROLE
        );
        run(&mut s, &ctx(dm), &save).unwrap();
        assert_eq!(s.doc, json!({"fresh": 1}));
        assert_eq!(s.metadata, json!({"note": "x"}));
        assert_eq!(
            run(&mut s, &ctx(p), &Command::SessionStart {})
                .unwrap_err()
                .code,
            codes::FORBIDDEN_FOR_ROLE
        );
    }

    #[test]
    fn lifecycle_transitions() {
        let (mut s, dm, p) = session();
        let d = ctx(dm);
        assert_eq!(
            run(&mut s, &d, &Command::SessionPause {}).unwrap_err().code,
            codes::INVALID_TRANSITION
        );
        run(&mut s, &d, &Command::SessionStart {}).unwrap();
        run(&mut s, &d, &Command::SessionPause {}).unwrap();
        run(&mut s, &d, &Command::SessionResume {}).unwrap();
        run(&mut s, &d, &Command::SessionEnd {}).unwrap();
        assert_eq!(s.status, Status::Ended);
        for cmd in [
            Command::SessionStart {},
            Command::SessionResume {},
            Command::SessionEnd {},
        ] {
            assert_eq!(
                run(&mut s, &d, &cmd).unwrap_err().code,
                codes::SESSION_ENDED
            );
        }
        assert_eq!(
            run(
                &mut s,
                &ctx(p),
                &update(json!([{"path": "/x", "value": 1}]))
            )
            .unwrap_err()
            .code,
            codes::SESSION_ENDED
        );
    }

    #[test]
    fn joins_are_idempotent_and_characters_exclusive() {
        let (mut s, _dm, p) = session();
        let v = s.version;
        run(&mut s, &ctx(p), &Command::Join(JoinRequest::default())).unwrap();
        assert_eq!(s.version, v, "joining again is a no-op");
        let c = Uuid::new_v4();
        let with_char = Command::Join(JoinRequest {
            character_id: Some(c),
            ..Default::default()
        });
        run(&mut s, &ctx(p), &with_char).unwrap();
        assert_eq!(s.members[&p].characters, vec![c]);
        let other = Uuid::new_v4();
        assert_eq!(
            run(&mut s, &ctx(other), &with_char).unwrap_err().code,
            codes::CHARACTER_TAKEN
        );
        let dm_grab = Command::Join(JoinRequest {
            role: Some(SessionRole::Dm),
            ..Default::default()
        });
        assert_eq!(
            run(&mut s, &ctx(other), &dm_grab).unwrap_err().code,
            codes::FORBIDDEN_FOR_ROLE
        );
    }

    #[test]
    fn a_join_with_a_character_carries_its_play_patch() {
        let (s, _dm, _p) = session();
        let user = Uuid::new_v4();
        let c = Uuid::new_v4();
        let join = Command::Join(JoinRequest {
            character_id: Some(c),
            character: Some(json!({"name": "Aria", "max_hp": 12, "ac": 14})),
            ..Default::default()
        });
        let events = s.decide(&ctx(user), &join).unwrap();
        let patch = events[0]
            .patch()
            .expect("a join that adds a character has a patch");
        // A client merging the patch into its play state gets the server's.
        let mut client = serde_json::to_value(&s.game).unwrap();
        crate::patch::merge(&mut client, patch);
        let mut after = s.clone();
        after.apply(&events[0]);
        assert_eq!(client, serde_json::to_value(&after.game).unwrap());
        assert!(after.game.characters.contains_key(&c));
        // A join without a character has none.
        let plain = s
            .decide(&ctx(Uuid::new_v4()), &Command::Join(JoinRequest::default()))
            .unwrap();
        assert!(plain[0].patch().is_none());
    }

    #[test]
    fn replay_reproduces_state_and_snapshot_round_trips() {
        let (mut s, dm, p) = session();
        let mut log = vec![];
        let cmds = [
            (dm, Command::SessionStart {}),
            (p, update(json!([{"path": "/a", "value": {"b": [1]}}]))),
            (p, update(json!([{"path": "/a/b/-", "value": 2}]))),
            (p, update(json!([{"path": "/a/b/0", "op": "remove"}]))),
        ];
        let start = s.clone();
        for (u, c) in &cmds {
            for e in s.decide(&ctx(*u), c).unwrap() {
                s.apply(&e);
                log.push(e);
            }
        }
        let mut replay = start;
        for e in &log {
            let (k, d) = e.to_parts();
            replay.apply(&Event::from_parts(&k, d).unwrap());
        }
        assert_eq!(replay, s);
        let snap = serde_json::to_value(&s).unwrap();
        assert_eq!(serde_json::from_value::<SessionState>(snap).unwrap(), s);
        assert_eq!(s.doc, json!({"a": {"b": [2]}}));
    }

    /// The owner applies its events by value; the result is the same as applying them
    /// by reference (replay), size cache included.
    #[test]
    fn applying_an_event_by_value_is_applying_it_by_reference() {
        let (mut by_ref, dm, p) = session();
        let mut by_value = by_ref.clone();
        let cmds = [
            (dm, Command::SessionStart {}),
            (
                p,
                update(json!([{"path": "/a", "value": {"b": [1], "c": "x"}}])),
            ),
            (
                p,
                update(json!([{"path": "/a/b/-", "value": 2}, {"path": "/d", "value": null}])),
            ),
            (p, update(json!([{"path": "/a/c", "op": "remove"}]))),
            (dm, Command::SessionPause {}),
        ];
        for (u, c) in &cmds {
            for e in by_ref.decide(&ctx(*u), c).unwrap() {
                by_ref.apply(&e);
                by_value.apply_owned(e);
            }
        }
        assert_eq!(by_value, by_ref);
        assert_eq!(by_value.doc, json!({"a": {"b": [1, 2]}, "d": null}));
        assert_eq!(
            by_value.doc_size_for_tests(),
            limits::json_len(&by_value.doc)
        );
    }
}
