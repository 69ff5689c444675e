//! The other services of the platform, asked over the Message Hub (issue 12): the
//! Character Service (`character.get`), the Campaign Service (`campaign.membership`),
//! the LLM Service (`llm.request`) and the Image Service (`image.request`). The
//! request/response mechanics (deadline, retries, breaker, metrics) are
//! [`crate::hub::rpc`]; this module is what the session service asks and what it does
//! with the answers. See `docs/message-hub.md`, "Orchestration".
//!
//! Nothing here runs in a session's task, and the session core stays pure:
//!
//! * **Before** a create or a join enters its session ([`admit`], a task beside the
//!   node's request loop): the membership check (`403 not_in_campaign`) and the
//!   character lookup, whose answer travels with the join into the rules
//!   (`JoinRequest::lookup`: owned, not owned, unknown, or no answer → `pending`).
//! * **After** a commit ([`after_commit`], called by the session task with the rows it
//!   just committed): a `narration_requested`, `map_requested` or pending join starts
//!   a task that calls the service and hands the answer (or the failure at the
//!   deadline) back to the session's owner as an internal command, over NATS like a
//!   hub event (its id is the command id: applied once, and to whichever node owns
//!   the session by then). So answers are committed, ordered and replayed like any
//!   other event.

use crate::hub::rpc::{Answer, CallError, ClientOptions, ServiceClient};
use crate::store::EventRow;
use crate::NodeCtx;
use gs_rules::event::{MapRequested, NarrationRequested};
use gs_rules::services::MONSTER_ACTION;
use gs_rules::state::OpenRequest;
use gs_rules::SessionState;
use gs_shared::auth::Role;
use gs_shared::config::{ms, Config};
use gs_shared::protocol::{codes, WireError};
use gs_shared::rpc::{NodeRequest, RequestBody};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Hub event kind of an internal command (a service's answer) for a session.
pub const SERVICE_COMMAND: &str = "service.command";
/// How long handing an answer to the session's owner may take (across failovers).
const APPLY_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between background asks for a pending character's sheet.
const PENDING_PAUSE: Duration = Duration::from_millis(250);

/// The request/response client's settings from the configuration.
pub fn client_options(cfg: &Config) -> ClientOptions {
    let s = &cfg.services;
    let exchange = if s.exchange.is_empty() {
        cfg.rabbitmq.inbound_exchange.clone()
    } else {
        s.exchange.clone()
    };
    let mut o = ClientOptions::new(exchange);
    o.deadline = ms(s.deadline_ms);
    o.attempt_timeout = ms(s.attempt_timeout_ms);
    o.retry_backoff = ms(s.retry_backoff_ms);
    o.max_attempts = s.max_attempts;
    o.breaker.failure_threshold = s.breaker_failure_threshold;
    o.breaker.cool_down = ms(s.breaker_cool_down_ms);
    o
}

/// Whether a request must ask other services before it enters its session (and this
/// node is the one to ask: the session's place on the ring).
pub fn needs_admission(ctx: &NodeCtx, req: &NodeRequest) -> bool {
    let s = &ctx.cfg;
    let asks = match &req.body {
        RequestBody::Create { .. } => s.campaign.require_membership,
        RequestBody::Join { data, .. } => {
            s.campaign.require_membership
                || (s.services.character_lookup && character_of(data).is_some())
        }
        _ => false,
    };
    asks && ctx.cluster.owner(&req.session_id).as_deref() == Some(ctx.id.as_str())
}

fn character_of(data: &Value) -> Option<Uuid> {
    data.get("character_id")?.as_str()?.parse().ok()
}

/// The checks and lookups of a create or join: the request to dispatch (a join
/// carrying the Character Service's answer), or the refusal.
pub async fn admit(ctx: &Arc<NodeCtx>, mut req: NodeRequest) -> Result<NodeRequest, WireError> {
    let (sid, user) = (req.session_id, req.caller.user_id);
    let check_members = ctx.cfg.campaign.require_membership && req.caller.role != Role::Admin;
    match &mut req.body {
        RequestBody::Create { campaign_id, .. } if check_members => {
            membership(ctx, sid, *campaign_id, user).await?;
        }
        RequestBody::Join { data, lookup, .. } => {
            let character = character_of(data).filter(|_| ctx.cfg.services.character_lookup);
            let members = async {
                if !check_members {
                    return Ok(());
                }
                match ctx.store.session_campaign(sid).await {
                    Ok(Some(campaign)) => membership(ctx, sid, campaign, user).await,
                    // No such session: the session's owner says so.
                    Ok(None) => Ok(()),
                    Err(e) => Err(e.to_wire()),
                }
            };
            let sheet = async {
                match character {
                    Some(c) => Some(lookup_character(ctx, sid, c, user).await),
                    None => None,
                }
            };
            let (members, sheet) = tokio::join!(members, sheet);
            members?;
            *lookup = sheet;
        }
        _ => {}
    }
    Ok(req)
}

fn client(ctx: &NodeCtx) -> Result<ServiceClient, CallError> {
    ctx.hub
        .services()
        .ok_or_else(|| CallError::Hub("the Message Hub is not connected".into()))
}

/// `campaign.membership`: is `user` in `campaign` (as player or DM)?
async fn membership(ctx: &NodeCtx, sid: Uuid, campaign: Uuid, user: Uuid) -> Result<(), WireError> {
    let details = json!({"campaign_id": campaign, "user_id": user});
    let answer = match client(ctx) {
        Ok(c) => c.call("campaign", "membership", Some(sid), details).await,
        Err(e) => Err(e),
    };
    let not_in = || {
        WireError::new(
            codes::NOT_IN_CAMPAIGN,
            "the Campaign Service does not list you in this session's campaign",
        )
        .with_details(json!({ "campaign_id": campaign }))
    };
    match answer {
        Ok(a) if a.details.get("member").and_then(Value::as_bool) == Some(true) => Ok(()),
        Ok(_) => Err(not_in()),
        Err(e @ CallError::Refused { .. }) if e.code() == "not_found" => Err(not_in()),
        // Unknown is not "yes": refused honestly, and retryable.
        Err(e) => Err(WireError::new(
            codes::SERVICE_UNAVAILABLE,
            format!("the Campaign Service could not be asked: {e}"),
        )
        .with_details(e.details())),
    }
}

/// `character.get`, as the rules take it (`gs_rules::command::CharacterLookup`).
async fn lookup_character(ctx: &NodeCtx, sid: Uuid, character: Uuid, user: Uuid) -> Value {
    let details = json!({"character_id": character, "user_id": user});
    let answer = match client(ctx) {
        Ok(c) => c.call("character", "get", Some(sid), details).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(a) => match found(&a) {
            Some(v) => v,
            None => json!({"status": "unavailable", "reason": "unreadable answer"}),
        },
        Err(e @ CallError::Refused { .. })
            if matches!(e.code().as_str(), "not_found" | "character_not_found") =>
        {
            json!({"status": "not_found"})
        }
        Err(e) => json!({"status": "unavailable", "reason": e.to_string()}),
    }
}

/// `{"status": "found", owner_id, sheet}` from an answer `{owner_id, sheet}`.
fn found(a: &Answer) -> Option<Value> {
    let owner: Uuid = a.details.get("owner_id")?.as_str()?.parse().ok()?;
    let sheet = a.details.get("sheet").filter(|s| s.is_object())?;
    Some(json!({"status": "found", "owner_id": owner, "sheet": sheet}))
}

/// Starts what a commit asks of other services (see the module docs).
pub fn after_commit(ctx: &Arc<NodeCtx>, session: Uuid, rows: &[EventRow]) {
    for row in rows {
        let kind = row.kind.as_str();
        if !matches!(
            kind,
            "narration_requested" | "map_requested" | "player_joined"
        ) {
            continue;
        }
        let ctx = ctx.clone();
        match kind {
            "narration_requested" => {
                let Ok(ev) = serde_json::from_str::<NarrationRequested>(&row.data_json) else {
                    continue;
                };
                tokio::spawn(async move { narrate(&ctx, session, ev).await });
            }
            "map_requested" => {
                let Ok(ev) = serde_json::from_str::<MapRequested>(&row.data_json) else {
                    continue;
                };
                tokio::spawn(async move { draw_map(&ctx, session, ev).await });
            }
            _ => {
                let Some((character, user)) = pending_join(&row.data_json) else {
                    continue;
                };
                tokio::spawn(async move { fill_pending(&ctx, session, character, user).await });
            }
        }
    }
}

/// What a new owner of `session` asks again: the requests the log shows unanswered
/// (their asker may have died with the previous owner; an answer that arrives twice
/// is a no-op) and the sheets of characters still `pending`.
pub fn resume(ctx: &Arc<NodeCtx>, session: Uuid, state: &SessionState) {
    for request in state.open_requests.values().cloned() {
        let ctx = ctx.clone();
        match request {
            OpenRequest::Llm(ev) => tokio::spawn(async move { narrate(&ctx, session, ev).await }),
            OpenRequest::Image(ev) => {
                tokio::spawn(async move { draw_map(&ctx, session, ev).await })
            }
        };
    }
    for (user, member) in &state.members {
        for character in &member.characters {
            if state
                .game
                .characters
                .get(character)
                .is_some_and(|c| c.pending)
            {
                let (ctx, character, user) = (ctx.clone(), *character, *user);
                tokio::spawn(async move { fill_pending(&ctx, session, character, user).await });
            }
        }
    }
}

/// The character and user of a join that put a character in play `pending`.
fn pending_join(data_json: &str) -> Option<(Uuid, Uuid)> {
    if !data_json.contains("\"pending\"") {
        return None;
    }
    let v: Value = serde_json::from_str(data_json).ok()?;
    if v["character"]["pending"] != true {
        return None;
    }
    Some((
        v["character_id"].as_str()?.parse().ok()?,
        v["user_id"].as_str()?.parse().ok()?,
    ))
}

/// Calls `service` within `deadline_ms`; the answer or why not.
async fn ask(
    ctx: &NodeCtx,
    service: &str,
    session: Uuid,
    details: Value,
    deadline_ms: u64,
) -> Result<Answer, CallError> {
    let deadline = Instant::now() + ms(deadline_ms);
    client(ctx)?
        .call_until(service, "request", Some(session), details, deadline)
        .await
}

/// `narrate` / `monster_decide` → `llm.request` → `narration` (and the monster's
/// action through the rules), or `narration_failed` at the deadline.
async fn narrate(ctx: &Arc<NodeCtx>, session: Uuid, ev: NarrationRequested) {
    let started = Instant::now();
    let details = json!({
        "request_type": ev.request_type, "prompt": ev.prompt,
        "character_id": ev.character_id, "context": ev.context,
    });
    let answer = ask(
        ctx,
        "llm",
        session,
        details,
        ctx.cfg.services.llm_deadline_ms,
    )
    .await;
    let command = match &answer {
        Ok(a) => json!({"type": "narration_done", "data": {
            "request_id": ev.request_id,
            "text": a.details.get("text").and_then(Value::as_str).unwrap_or_default(),
            "character_id": ev.character_id,
            "action": a.details.get("action"),
        }}),
        Err(e) => failed(ev.request_id, "narration", &e.to_string()),
    };
    let applied = apply(ctx, session, command).await;
    round_trip("llm", started, applied.is_ok());
    let action = answer.ok().and_then(|a| a.details.get("action").cloned());
    if let (Some(character), Some(Value::Object(mut action))) = (ev.character_id, action) {
        // The monster's decision, declared through the rules like the DM's would be.
        action.insert("character_id".into(), json!(character));
        let declare = json!({"type": "action_declare", "data": action});
        if let Err(e) = apply(ctx, session, declare).await {
            let reason = format!("the monster's action was refused: {}", e.message);
            let refused = failed(ev.request_id, MONSTER_ACTION, &reason);
            let _ = apply(ctx, session, refused).await;
        }
    }
}

/// `map_request` → `image.request` → `map_updated` with the URL, or `map_failed`.
async fn draw_map(ctx: &Arc<NodeCtx>, session: Uuid, ev: MapRequested) {
    let started = Instant::now();
    let details = json!({"description": ev.description, "grid": ev.grid});
    let answer = ask(
        ctx,
        "image",
        session,
        details,
        ctx.cfg.services.image_deadline_ms,
    )
    .await;
    let url = answer.as_ref().ok().and_then(|a| {
        a.details
            .get("url")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let command = match (&answer, url) {
        (Ok(a), Some(url)) => json!({"type": "map_done", "data": {
            "request_id": ev.request_id, "url": url,
            "asset_id": a.details.get("asset_id").and_then(Value::as_str),
            "grid": a.details.get("grid").filter(|g| g.is_object()).cloned()
                .unwrap_or_else(|| json!(ev.grid)),
        }}),
        (Ok(_), None) => failed(ev.request_id, "map", "the answer has no url"),
        (Err(e), _) => failed(ev.request_id, "map", &e.to_string()),
    };
    let applied = apply(ctx, session, command).await;
    round_trip("image", started, applied.is_ok());
}

/// Keeps asking for a pending character's sheet (for `services.pending_retry_ms`),
/// and fills it in when it arrives.
async fn fill_pending(ctx: &Arc<NodeCtx>, session: Uuid, character: Uuid, user: Uuid) {
    let until = Instant::now() + ms(ctx.cfg.services.pending_retry_ms);
    let details = json!({"character_id": character, "user_id": user});
    while Instant::now() < until {
        let answer = match client(ctx) {
            Ok(c) => {
                c.call_until("character", "get", Some(session), details.clone(), until)
                    .await
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(a) => {
                let Some(found) = found(&a) else { return };
                let command = json!({"type": "character_fill", "data": {
                    "character_id": character, "owner_id": found["owner_id"],
                    "sheet": found["sheet"],
                }});
                if let Err(e) = apply(ctx, session, command).await {
                    tracing::info!(%session, %character, error = %e.message, "pending character not filled");
                }
                return;
            }
            Err(CallError::Refused { details, .. }) => {
                tracing::info!(%session, %character, %details, "pending character: the Character Service refused");
                return;
            }
            Err(_) => {
                tokio::time::sleep(PENDING_PAUSE.min(until - Instant::now().min(until))).await
            }
        }
    }
}

fn failed(request_id: Uuid, what: &str, reason: &str) -> Value {
    json!({"type": "service_failed", "data": {
        "request_id": request_id, "what": what, "reason": reason,
    }})
}

/// Hands an internal command to the session's owner (whichever node it is now), as
/// the system, under a fresh command id (retried with that id: applied once).
async fn apply(ctx: &NodeCtx, session: Uuid, command: Value) -> Result<(), WireError> {
    let forwarder = ctx.forwarder(APPLY_DEADLINE);
    let body = RequestBody::HubEvent {
        event_id: Uuid::new_v4(),
        kind: SERVICE_COMMAND.into(),
        payload: command,
    };
    let result = forwarder.request(session, crate::SYSTEM, body).await;
    if let Err(e) = &result {
        tracing::info!(%session, code = %e.code, error = %e.message, "a service's answer was not applied");
    }
    result.map(|_| ())
}

/// `gs_node_orchestration_seconds{service}`: request sent → answer committed.
fn round_trip(service: &'static str, started: Instant, applied: bool) {
    if applied {
        metrics::histogram!("gs_node_orchestration_seconds", "service" => service)
            .record(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_join_is_recognised() {
        let (c, u) = (Uuid::new_v4(), Uuid::new_v4());
        let pending = json!({"user_id": u, "role": "player", "character_id": c,
            "character": {"name": "(pending)", "max_hp": 1, "ac": 10, "pending": true}});
        assert_eq!(pending_join(&pending.to_string()), Some((c, u)));
        let normal = json!({"user_id": u, "role": "player", "character_id": c,
            "character": {"name": "A", "max_hp": 9, "ac": 12}});
        assert_eq!(pending_join(&normal.to_string()), None);
    }
}
