//! Reads: answered by the session task from committed state, after the core confirmed
//! the lock for the batch (state, sync, events, attach, presence, history).

use super::engine::render_stored;
use super::Session;
use crate::error::NodeError;
use gs_shared::auth::Role;
use gs_shared::protocol::{codes, WireError};
use gs_shared::rpc::{NodeReply, NodeRequest, RawEvent, ReplyBody, RequestBody, Resume};
use serde_json::{json, Value};
use uuid::Uuid;

/// Bytes of events in one reply (NATS caps a message at 1 MiB by default; the
/// largest single event, a `state_restored` with a whole document, stays well under).
const MAX_EVENTS_REPLY_BYTES: usize = 512 * 1024;

/// The first events of `events` that fit in [`MAX_EVENTS_REPLY_BYTES`] (at least one).
fn within_budget(events: impl Iterator<Item = RawEvent>) -> Vec<RawEvent> {
    let mut total = 0;
    let mut out = Vec::new();
    for e in events {
        total += e.json.as_str().len();
        if total > MAX_EVENTS_REPLY_BYTES && !out.is_empty() {
            break;
        }
        out.push(e);
    }
    out
}

fn not_member() -> NodeReply {
    NodeReply::err(WireError::new(codes::NOT_MEMBER, "join the session first"))
}

impl Session {
    pub(super) async fn read(&mut self, req: &NodeRequest) -> NodeReply {
        let user = req.caller.user_id;
        let admin = req.caller.role == Role::Admin;
        let member = admin || self.core.state().role_of(&user).is_some();
        match &req.body {
            RequestBody::Attach {
                conn_id,
                router_id,
                last_version,
                replay_limit,
            } => {
                self.attach(
                    user,
                    admin,
                    *conn_id,
                    router_id,
                    *last_version,
                    *replay_limit,
                )
                .await
            }
            RequestBody::GetState
            | RequestBody::Sync { .. }
            | RequestBody::EventsSince { .. }
            | RequestBody::Presence
            | RequestBody::History { .. }
                if !member =>
            {
                not_member()
            }
            RequestBody::GetState => NodeReply::Ok {
                body: ReplyBody::State {
                    view: self.core.view(),
                },
            },
            RequestBody::Sync { paths } => self.sync(paths.as_deref()),
            RequestBody::EventsSince { after, limit } => {
                match self.events_since(*after, *limit).await {
                    Ok(events) => NodeReply::Ok {
                        body: ReplyBody::Events {
                            events,
                            current: self.core.state().version,
                        },
                    },
                    Err(e) => NodeReply::err(e.to_wire()),
                }
            }
            RequestBody::Presence => self.presence(),
            RequestBody::History { before, limit } => self.history(*before, *limit).await,
            other => NodeReply::err(WireError::new(
                codes::BAD_REQUEST,
                format!("{} is not a read", other.op()),
            )),
        }
    }

    fn sync(&self, paths: Option<&[String]>) -> NodeReply {
        let mut view = self.core.view();
        if let Some(paths) = paths.filter(|p| !p.is_empty()) {
            let mut out = serde_json::Map::new();
            for p in paths {
                match gs_rules::pointer::get(&self.core.state().doc, p) {
                    Ok(v) => {
                        out.insert(p.clone(), v.cloned().unwrap_or(Value::Null));
                    }
                    Err(e) => {
                        return NodeReply::err(
                            WireError::new(
                                codes::INVALID_PATH,
                                format!("invalid path {p:?}: {}", e.reason),
                            )
                            .with_details(json!({"path": p})),
                        )
                    }
                }
            }
            view.state = Value::Object(out);
        }
        NodeReply::Ok {
            body: ReplyBody::State { view },
        }
    }

    async fn attach(
        &mut self,
        user: Uuid,
        admin: bool,
        conn_id: Uuid,
        router_id: &str,
        last_version: Option<u64>,
        replay_limit: u64,
    ) -> NodeReply {
        let Some(role) = self
            .core
            .state()
            .role_of(&user)
            .or(admin.then_some(gs_rules::SessionRole::Dm))
        else {
            return not_member();
        };
        self.connections
            .insert(conn_id, (user, router_id.to_string()));
        let (id, epoch) = (self.core.id(), self.core.epoch());
        self.ctx.cache.attach(id, epoch, conn_id, user);
        let version = self.core.state().version;
        let resume = match last_version {
            Some(lv) if lv <= version && version - lv <= replay_limit => {
                match self.events_since(lv, replay_limit).await {
                    // All of them fitted in one reply.
                    Ok(events)
                        if lv == version || events.last().is_some_and(|e| e.version == version) =>
                    {
                        Resume::Events { events }
                    }
                    Ok(_) => Resume::Full {
                        view: self.core.view(),
                    },
                    Err(e) => return NodeReply::err(e.to_wire()),
                }
            }
            _ => Resume::Full {
                view: self.core.view(),
            },
        };
        NodeReply::Ok {
            body: ReplyBody::Attached {
                session_role: role.as_str().to_string(),
                version,
                resume,
            },
        }
    }

    fn presence(&self) -> NodeReply {
        let mut count: std::collections::BTreeMap<Uuid, u32> = Default::default();
        for (user, _) in self.connections.values() {
            *count.entry(*user).or_default() += 1;
        }
        let players = count
            .into_iter()
            .map(|(player_id, connections)| gs_shared::rpc::Present {
                player_id,
                connections,
            })
            .collect();
        NodeReply::Ok {
            body: ReplyBody::Presence { players },
        }
    }

    async fn history(&self, before: Option<u64>, limit: u64) -> NodeReply {
        let limit = limit.clamp(1, 500);
        match self
            .ctx
            .store
            .events_before(self.core.id(), before, limit)
            .await
        {
            Ok(events) => {
                let next_before = (events.len() as u64 == limit)
                    .then(|| events.last().map(|e| e.seq))
                    .flatten();
                let entries = events.iter().map(crate::history::entry).collect();
                NodeReply::Ok {
                    body: ReplyBody::History {
                        entries,
                        next_before,
                    },
                }
            }
            Err(e) => NodeReply::err(e.to_wire()),
        }
    }

    /// Events after `after`, from memory when possible, else from the log; at most
    /// `limit` of them and [`MAX_EVENTS_REPLY_BYTES`] in all (at least one), so the
    /// reply fits in a NATS message: the asker asks again from where it ends.
    async fn events_since(&self, after: u64, limit: u64) -> Result<Vec<RawEvent>, NodeError> {
        let limit = limit.clamp(1, 10_000) as usize;
        if after >= self.core.state().version {
            return Ok(vec![]);
        }
        let recent = self.core.recent();
        if let Some(first) = recent.front() {
            if first.version <= after + 1 {
                return Ok(within_budget(
                    recent
                        .iter()
                        .filter(|e| e.version > after)
                        .take(limit)
                        .cloned(),
                ));
            }
        }
        let stored = self
            .ctx
            .store
            .events_after(self.core.id(), after, limit as u64)
            .await?;
        Ok(within_budget(stored.iter().map(render_stored)))
    }
}
