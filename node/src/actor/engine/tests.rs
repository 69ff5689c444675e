//! Table tests of the session core: each case feeds inputs (requests, commit results,
//! lease events, time) and compares every output, summarised as text, with what it
//! expects. A small fake log stands in for the store: it keeps what was committed,
//! and answers look-ups, reloads and rollbacks from it. No services, no tokio.

use super::*;
use gs_shared::protocol::RawJson;
use gs_shared::rpc::Caller;
use std::collections::BTreeMap;

const SID: Uuid = Uuid::from_u128(0x5e55);
const DM: Uuid = Uuid::from_u128(0xd0);
const PLAYER: Uuid = Uuid::from_u128(0xb1);
const OUTSIDER: Uuid = Uuid::from_u128(0x0f);
const IDLE: Duration = Duration::from_secs(600);

fn cmd(n: u32) -> Uuid {
    Uuid::from_u128(0xc000 + n as u128)
}

/// A request of a case: reply tag first, then the command number where it has one.
#[derive(Clone, Copy)]
enum Rq {
    /// The DM sets `/k{cmd}`.
    Upd(u32, u32),
    /// The same, acknowledged by the event (`Gs-Ack`).
    UpdEv(u32, u32),
    /// `Upd` by someone else.
    UpdBy(u32, u32, Uuid),
    /// `Upd` with an invalid JSON Pointer.
    BadPath(u32, u32),
    /// `Upd` whose deadline has passed.
    Late(u32, u32),
    /// The DM saves the document (`POST /state`).
    Save(u32, u32),
    SaveBy(u32, u32, Uuid),
    Join(u32, u32, Uuid),
    /// `session_start`, `session_end` by the DM.
    Start(u32, u32),
    End(u32, u32),
    /// The DM rolls back to a version.
    Rollback(u32, u32, u64),
    RollbackBy(u32, u32, u64, Uuid),
    /// A retried create by the creator.
    Create(u32),
    Get(u32),
    /// The DM spawns character `cmd(1000)` (7 hit points).
    Spawn(u32, u32),
    /// The DM sets that character's hit points to 7 (changes nothing), acknowledged
    /// by the event if there were one.
    NoopEv(u32, u32),
    Detach(u32),
    Touch(u32),
}

/// What the environment does next.
enum In {
    Batch(Vec<Rq>),
    /// The log answers the pending look-up.
    Verified,
    VerifyErr,
    /// The pending commit's result.
    Ok,
    Fenced,
    Failed,
    /// The commit landed but its reply was lost.
    FailedLanded,
    /// The lease lapsed.
    LeaseLost,
    Confirm(bool),
    ConfirmErr,
    /// The log answers the pending rollback's past state.
    Past,
    /// The log answers the reload.
    Reloaded,
    ReloadErr,
    ReadDone,
    /// Time passes (seconds), then a tick (`connections`: some client attached).
    Tick(u64, bool),
    /// Time passes (seconds), no input.
    Wait(u64),
    Stop(Stop, Vec<Rq>),
}

struct Case {
    name: &'static str,
    /// `dedupe_window`, `snapshot_every`, state saves per minute.
    window: usize,
    snapshot_every: u64,
    saves_per_min: u32,
    steps: Vec<(In, Vec<&'static str>)>,
    /// The state's version at the end.
    version: u64,
}

fn case(name: &'static str, steps: Vec<(In, Vec<&'static str>)>, version: u64) -> Case {
    Case {
        name,
        window: 100,
        snapshot_every: 1000,
        saves_per_min: 0,
        steps,
        version,
    }
}

/// The fake store: what was committed.
struct Log {
    states: BTreeMap<u64, SessionState>,
    /// Committed command ids with their versions, oldest first.
    commands: Vec<(Uuid, u64)>,
}

struct Harness {
    core: SessionCore<u32>,
    window: usize,
    now: Now,
    log: Log,
    pending: Option<CommitItem>,
    verifying: Vec<Uuid>,
    out: Vec<Output<u32>>,
}

fn initial_state() -> SessionState {
    let ev = SessionState::creation(
        SID,
        Uuid::nil(),
        "table".into(),
        json!({"dice_seed": 7}),
        DM,
        "2026-01-01T00:00:00.000Z".into(),
    );
    let mut state = SessionState::empty(SID);
    state.apply(&ev);
    state
}

fn event(version: u64) -> RawEvent {
    RawEvent {
        version,
        json: format!("{{\"version\":{version}}}").into(),
    }
}

impl Harness {
    fn new(c: &Case) -> Harness {
        let mut cfg = CoreConfig::new(&Config::default());
        cfg.dedupe_window = c.window;
        cfg.snapshot_every = c.snapshot_every;
        cfg.state_saves_per_min = c.saves_per_min;
        cfg.joins_per_min = 0;
        cfg.idle_passivate = IDLE;
        cfg.recent_events = 8;
        let now = Now {
            at: Instant::now(),
            wall: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        };
        let state = initial_state();
        let rec = Recovered {
            state: state.clone(),
            recent: vec![event(1)],
            commands: Vec::new(),
            complete: true,
        };
        Harness {
            core: SessionCore::new(SID, 1, cfg, rec, now.at),
            window: c.window,
            now,
            log: Log {
                states: BTreeMap::from([(1, state)]),
                commands: Vec::new(),
            },
            pending: None,
            verifying: Vec::new(),
            out: Vec::new(),
        }
    }

    fn request(&self, rq: Rq) -> Envelope<u32> {
        let upd = |n: u32, path: String| RequestBody::Command {
            command_id: cmd(n),
            kind: "state_update".into(),
            data: RawJson::of(&json!({"changes": [{"path": path, "value": n}]})),
            ack_by_event: false,
        };
        let command = |n: u32, kind: &str, data: Value| RequestBody::Command {
            command_id: cmd(n),
            kind: kind.into(),
            data: RawJson::of(&data),
            ack_by_event: false,
        };
        let save = |n: u32| RequestBody::SaveState {
            command_id: cmd(n),
            state: json!({"saved": n}),
            metadata: json!({}),
        };
        let (reply, user, body, late) = match rq {
            Rq::Upd(r, n) => (r, DM, upd(n, format!("/k{n}")), false),
            Rq::UpdEv(r, n) => {
                let mut body = upd(n, format!("/k{n}"));
                if let RequestBody::Command { ack_by_event, .. } = &mut body {
                    *ack_by_event = true;
                }
                (r, DM, body, false)
            }
            Rq::UpdBy(r, n, user) => (r, user, upd(n, format!("/k{n}")), false),
            Rq::BadPath(r, n) => (r, DM, upd(n, "no-slash".into()), false),
            Rq::Late(r, n) => (r, DM, upd(n, format!("/k{n}")), true),
            Rq::Save(r, n) => (r, DM, save(n), false),
            Rq::SaveBy(r, n, user) => (r, user, save(n), false),
            Rq::Join(r, n, user) => {
                let body = RequestBody::Join {
                    command_id: cmd(n),
                    data: json!({}),
                    lookup: None,
                };
                (r, user, body, false)
            }
            Rq::Start(r, n) => (r, DM, command(n, "session_start", json!({})), false),
            Rq::End(r, n) => (r, DM, command(n, "session_end", json!({})), false),
            Rq::Rollback(r, n, to) => (r, DM, rollback(n, to), false),
            Rq::RollbackBy(r, n, to, user) => (r, user, rollback(n, to), false),
            Rq::Create(r) => {
                let body = RequestBody::Create {
                    campaign_id: Uuid::nil(),
                    name: "table".into(),
                    settings: json!({}),
                };
                (r, DM, body, false)
            }
            Rq::Get(r) => (r, DM, RequestBody::GetState, false),
            Rq::Spawn(r, n) => {
                let data = json!({"character_id": cmd(1000), "sheet": {"max_hp": 7, "ac": 15}});
                (r, DM, command(n, "spawn_character", data), false)
            }
            Rq::NoopEv(r, n) => {
                let data = json!({"character_id": cmd(1000), "changes": {"hp": 7}});
                let mut body = command(n, "character_update", data);
                if let RequestBody::Command { ack_by_event, .. } = &mut body {
                    *ack_by_event = true;
                }
                (r, DM, body, false)
            }
            Rq::Detach(r) => (r, DM, RequestBody::Detach { conn_id: cmd(0) }, false),
            Rq::Touch(r) => (r, DM, RequestBody::Touch { conn_id: cmd(0) }, false),
        };
        let deadline = self.now.wall_ms() + if late { 0 } else { 5_000 };
        let req = NodeRequest {
            session_id: SID,
            caller: Caller {
                user_id: user,
                role: Role::Player,
            },
            body,
            deadline_ms: Some(if late { deadline - 1_000 } else { deadline }),
        };
        Envelope { req, reply }
    }

    fn recovered(&self) -> Recovered {
        let (&version, state) = self.log.states.last_key_value().unwrap();
        let commands: Vec<(Uuid, u64)> = self
            .log
            .commands
            .iter()
            .rev()
            .take(self.window)
            .copied()
            .collect();
        Recovered {
            state: state.clone(),
            recent: vec![event(version)],
            complete: self.log.commands.len() < self.window,
            commands,
        }
    }

    /// Records the pending commit in the log.
    fn land(&mut self) {
        let item = self.pending.take().expect("a commit is pending");
        // The log replays what it stores, as recovery does.
        let mut state = self.log.states.last_key_value().unwrap().1.clone();
        for row in &item.events {
            if let Some(c) = row.command_id {
                self.log.commands.push((c, row.seq));
            }
            let data = serde_json::from_str(&row.data_json).unwrap();
            state.apply(&Event::from_parts(&row.kind, data).unwrap());
            assert_eq!(state.version, row.seq);
            self.log.states.insert(row.seq, state.clone());
        }
    }

    fn input(&mut self, i: In) -> Option<Input<u32>> {
        Some(match i {
            In::Batch(rqs) => Input::Batch(rqs.into_iter().map(|r| self.request(r)).collect()),
            In::Verified => {
                let found = self
                    .log
                    .commands
                    .iter()
                    .filter(|(c, _)| self.verifying.contains(c))
                    .copied()
                    .collect();
                Input::Verified(Ok(found))
            }
            In::VerifyErr => Input::Verified(Err(WireError::new(
                codes::SERVICE_UNAVAILABLE,
                "the log is unreachable",
            ))),
            In::Ok => {
                self.land();
                Input::Committed(Committed::Ok)
            }
            In::FailedLanded => {
                self.land();
                Input::Committed(Committed::Failed("reply lost".into()))
            }
            In::Fenced => Input::Committed(Committed::Fenced),
            In::Failed => {
                self.pending = None;
                Input::Committed(Committed::Failed("connection reset".into()))
            }
            In::LeaseLost => Input::LeaseLost,
            In::Confirm(ok) => Input::LeaseConfirmed(Ok(ok)),
            In::ConfirmErr => Input::LeaseConfirmed(Err("redis is down".into())),
            In::Past => Input::Past(Ok(self.past())),
            In::Reloaded => Input::Reloaded(Ok(self.recovered())),
            In::ReloadErr => Input::Reloaded(Err("the log is unreachable".into())),
            In::ReadDone => Input::ReadDone,
            In::Tick(secs, connections) => {
                self.advance(secs);
                Input::Tick { connections }
            }
            In::Wait(secs) => {
                self.advance(secs);
                return None;
            }
            In::Stop(reason, rqs) => Input::Stop {
                reason,
                queued: rqs.into_iter().map(|r| self.request(r)).collect(),
            },
        })
    }

    /// The state at the version of the pending `LoadPast`.
    fn past(&self) -> SessionState {
        let to = self
            .loading_past()
            .expect("a rollback waits for its past state");
        let (_, s) = self.log.states.range(..=to).next_back().unwrap();
        s.clone()
    }

    fn loading_past(&self) -> Option<u64> {
        match &self.core.wait {
            Wait::Past { to_version, .. } => Some(*to_version),
            _ => None,
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now.at += Duration::from_secs(secs);
        self.now.wall += chrono::Duration::seconds(secs as i64);
    }

    /// Feeds one input and summarises the outputs.
    fn step(&mut self, i: In) -> Vec<String> {
        let Some(input) = self.input(i) else {
            return Vec::new();
        };
        self.core.step(input, self.now, &mut self.out);
        let out = std::mem::take(&mut self.out);
        out.into_iter().map(|o| self.summary(o)).collect()
    }

    fn summary(&mut self, o: Output<u32>) -> String {
        match o {
            Output::Verify(ids) => {
                let n = ids.len();
                self.verifying = ids;
                format!("verify {n}")
            }
            Output::Commit(item) => {
                let seqs: Vec<u64> = item.events.iter().map(|r| r.seq).collect();
                let snap = item.snapshot.as_ref().map(|s| format!(" snap {}", s.seq));
                self.pending = Some(item);
                format!("commit {seqs:?}{}", snap.unwrap_or_default())
            }
            Output::ConfirmLease => "confirm".into(),
            Output::LoadPast(v) => format!("past {v}"),
            Output::Reload => "reload".into(),
            Output::Read(env) => format!("{}:read", env.reply),
            Output::Publish { events, acks } => {
                let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
                let acked: Vec<u64> = acks.iter().map(|(i, _)| events[*i].version).collect();
                if acked.is_empty() {
                    format!("publish {versions:?}")
                } else {
                    format!("publish {versions:?} acks {acked:?}")
                }
            }
            Output::Republish(ev) => format!("republish {}", ev.version),
            Output::RefreshCaches { status_changed } => if status_changed {
                "caches status"
            } else {
                "caches"
            }
            .into(),
            Output::Detach(_) => "detach".into(),
            Output::Touch(_) => "touch".into(),
            Output::Reattach { .. } => "reattach".into(),
            Output::Answer(r, reply) => format!("{r}:{}", answer(&reply)),
            Output::NotOwner(r) => format!("{r}:not_owner"),
            Output::Stop(s) => format!("stop {s:?}"),
            Output::Snapshot(item) => format!("snapshot {}", item.snapshot.unwrap().seq),
            Output::Release => "release".into(),
            Output::HubStopped {
                owner_epoch,
                version,
            } => match owner_epoch {
                Some(e) => format!("hub owner {e} v{version}"),
                None => format!("hub v{version}"),
            },
        }
    }
}

fn rollback(n: u32, to: u64) -> RequestBody {
    RequestBody::Command {
        command_id: cmd(n),
        kind: "rollback".into(),
        data: RawJson::of(&json!({ "to_version": to })),
        ack_by_event: false,
    }
}

fn answer(reply: &NodeReply) -> String {
    match reply {
        NodeReply::Ok { body } => match body {
            ReplyBody::Ack {
                version,
                duplicate: false,
            } => format!("ack v{version}"),
            ReplyBody::Ack {
                version,
                duplicate: true,
            } => format!("dup v{version}"),
            ReplyBody::Joined { version, .. } => format!("joined v{version}"),
            ReplyBody::Created { version, .. } => format!("created v{version}"),
            ReplyBody::Done => "done".into(),
            _ => "ok".into(),
        },
        NodeReply::Err { error, .. } => {
            let unknown = error.details["outcome"] == "unknown";
            format!("{}{}", error.code, if unknown { " unknown" } else { "" })
        }
    }
}

/// The table itself: one entry per case, read top to bottom; long because it is data
/// (splitting it would only scatter the cases).
fn cases() -> Vec<Case> {
    use super::Stop as Why;
    use In::*;
    use Rq::*;
    vec![
        case(
            "a batch is committed once, then published, then acknowledged",
            vec![
                (Batch(vec![Upd(1, 1), Upd(2, 2)]), vec!["commit [2, 3]"]),
                (Ok, vec!["publish [2, 3]", "caches", "1:ack v2", "2:ack v3"]),
            ],
            3,
        ),
        case(
            "an ack carried by the event needs no reply",
            vec![
                (Batch(vec![UpdEv(1, 1), Upd(2, 2)]), vec!["commit [2, 3]"]),
                (Ok, vec!["publish [2, 3] acks [2]", "caches", "2:ack v3"]),
            ],
            3,
        ),
        case(
            "a command that changes nothing is answered by reply, even if its event was to carry the ack",
            vec![
                (Batch(vec![Spawn(1, 1), NoopEv(2, 2), UpdEv(3, 3)]), vec!["commit [2, 3]"]),
                (Ok, vec!["publish [2, 3] acks [3]", "caches", "1:ack v2", "2:ack v2"]),
            ],
            3,
        ),
        case(
            "a duplicate inside the batch is answered with the original version",
            vec![
                (Batch(vec![Upd(1, 1), Upd(2, 1)]), vec!["commit [2]"]),
                (Ok, vec!["publish [2]", "caches", "1:ack v2", "2:dup v2"]),
            ],
            2,
        ),
        case(
            "a duplicate inside the window is answered from memory, no commit",
            vec![
                (Batch(vec![UpdEv(1, 1)]), vec!["commit [2]"]),
                (Ok, vec!["publish [2] acks [2]", "caches"]),
                (Batch(vec![UpdEv(2, 1)]), vec!["2:dup v2"]),
            ],
            2,
        ),
        Case {
            window: 1,
            ..case(
                "a duplicate outside the window fails its commit, then is verified against the log",
                vec![
                    (Batch(vec![Upd(1, 1)]), vec!["commit [2]"]),
                    (Ok, vec!["publish [2]", "caches", "1:ack v2"]),
                    (Batch(vec![Upd(2, 2)]), vec!["commit [3]"]),
                    (Ok, vec!["publish [3]", "caches", "2:ack v3"]),
                    // Command 1 left the window: taken for new, refused by the log.
                    (Batch(vec![Upd(3, 1)]), vec!["commit [4]"]),
                    (Failed, vec!["3:service_unavailable unknown", "reload"]),
                    (Reloaded, vec!["republish 3"]),
                    // The retry is looked up, and answered with the original version.
                    (Batch(vec![Upd(4, 1)]), vec!["verify 1"]),
                    (Verified, vec!["4:dup v2"]),
                ],
                3,
            )
        },
        Case {
            window: 1,
            ..case(
                "an expired command already applied is answered with its version",
                vec![
                    (Batch(vec![Upd(1, 1), Upd(2, 2)]), vec!["commit [2, 3]"]),
                    (Ok, vec!["publish [2, 3]", "caches", "1:ack v2", "2:ack v3"]),
                    (Batch(vec![Late(3, 1), Late(4, 9)]), vec!["verify 2"]),
                    (Verified, vec!["3:dup v2", "4:deadline_exceeded"]),
                ],
                3,
            )
        },
        case(
            "an expired new command is refused, not applied",
            vec![
                (
                    Batch(vec![Late(1, 1), Get(2)]),
                    vec!["1:deadline_exceeded", "confirm"],
                ),
                (Confirm(true), vec!["2:read"]),
                (ReadDone, vec![]),
            ],
            1,
        ),
        Case {
            window: 1,
            ..case(
                "a failed commit acks nothing, rolls the state back, makes ids verifiable",
                vec![
                    (Batch(vec![Upd(1, 1), Upd(2, 2)]), vec!["commit [2, 3]"]),
                    (Ok, vec!["publish [2, 3]", "caches", "1:ack v2", "2:ack v3"]),
                    (Batch(vec![Upd(3, 3), Upd(4, 4)]), vec!["commit [4, 5]"]),
                    (
                        Failed,
                        vec![
                            "3:service_unavailable unknown",
                            "4:service_unavailable unknown",
                            "reload",
                        ],
                    ),
                    (Reloaded, vec!["republish 3"]),
                    // Misses are looked up in the log for a while.
                    (Batch(vec![Upd(5, 3)]), vec!["verify 1"]),
                    (Verified, vec!["commit [4]"]),
                    (Ok, vec!["publish [4]", "caches", "5:ack v4"]),
                    // The verification period ends.
                    (Tick(61, true), vec![]),
                    (Batch(vec![Upd(6, 4)]), vec!["commit [5]"]),
                ],
                5,
            )
        },
        case(
            "a failed commit that landed: the retry finds its version after the reload",
            vec![
                (Batch(vec![Upd(1, 1)]), vec!["commit [2]"]),
                (
                    FailedLanded,
                    vec!["1:service_unavailable unknown", "reload"],
                ),
                (Reloaded, vec!["republish 2"]),
                (Batch(vec![Upd(2, 1)]), vec!["2:dup v2"]),
            ],
            2,
        ),
        case(
            "a failed commit whose reload fails stops the session as failed",
            vec![
                (
                    Batch(vec![Upd(1, 1), Get(2), Upd(3, 3)]),
                    vec!["commit [2]"],
                ),
                (Failed, vec!["1:service_unavailable unknown", "reload"]),
                (
                    ReloadErr,
                    vec![
                        "2:service_unavailable",
                        "3:service_unavailable",
                        "stop Failed",
                    ],
                ),
                (
                    Stop(Why::Failed, vec![Upd(4, 4)]),
                    vec!["release", "hub v2", "4:service_unavailable"],
                ),
            ],
            2,
        ),
        case(
            "a fenced commit: not_owner to everyone waiting, nothing acked, stop",
            vec![
                (
                    Batch(vec![Upd(1, 1), Get(2), Upd(3, 2)]),
                    vec!["commit [2]"],
                ),
                (
                    Fenced,
                    vec!["1:not_owner", "2:not_owner", "3:not_owner", "stop Fenced"],
                ),
                (Batch(vec![Upd(4, 4)]), vec!["4:not_owner"]),
                (
                    Stop(Why::Fenced, vec![Upd(5, 5)]),
                    vec!["hub v2", "5:not_owner"],
                ),
            ],
            2,
        ),
        case(
            "a lease lost mid-batch, before its commit: not_owner, stop",
            vec![
                (Batch(vec![Upd(1, 1), Upd(2, 2)]), vec!["commit [2, 3]"]),
                (
                    LeaseLost,
                    vec!["1:not_owner", "2:not_owner", "stop LeaseLost"],
                ),
                (Stop(Why::LeaseLost, vec![]), vec!["hub v3"]),
            ],
            3,
        ),
        case(
            "a lease lost between batches refuses the next batch",
            vec![
                (LeaseLost, vec!["stop LeaseLost"]),
                (
                    Batch(vec![Upd(1, 1), Get(2)]),
                    vec!["1:not_owner", "2:not_owner"],
                ),
            ],
            1,
        ),
        case(
            "reads wait for the pending commit and confirm the lock once per batch",
            vec![
                (Batch(vec![Upd(1, 1), Get(2), Get(3)]), vec!["commit [2]"]),
                (Ok, vec!["publish [2]", "caches", "1:ack v2", "confirm"]),
                (Confirm(true), vec!["2:read"]),
                (ReadDone, vec!["3:read"]),
                (ReadDone, vec![]),
                (Batch(vec![Get(4)]), vec!["confirm"]),
            ],
            2,
        ),
        case(
            "a read whose lock check fails stops the session",
            vec![
                (Batch(vec![Get(1), Upd(2, 1)]), vec!["confirm"]),
                (
                    Confirm(false),
                    vec!["1:not_owner", "2:not_owner", "stop LeaseLost"],
                ),
            ],
            1,
        ),
        case(
            "a read whose lock check errs is refused; the batch goes on",
            vec![
                (Batch(vec![Get(1), Upd(2, 1)]), vec!["confirm"]),
                (ConfirmErr, vec!["1:service_unavailable", "commit [2]"]),
                (Ok, vec!["publish [2]", "caches", "2:ack v2"]),
            ],
            2,
        ),
        case(
            "a rollback commits what precedes it, then decides on the past state",
            vec![
                (
                    Batch(vec![Upd(1, 1), Rollback(2, 2, 1), Upd(3, 3)]),
                    vec!["commit [2]"],
                ),
                (Ok, vec!["publish [2]", "caches", "1:ack v2", "past 1"]),
                (Past, vec!["commit [3, 4]"]),
                (Ok, vec!["publish [3, 4]", "caches", "2:ack v3", "3:ack v4"]),
                (Batch(vec![Rollback(4, 2, 1)]), vec!["4:dup v3"]),
            ],
            4,
        ),
        case(
            "a rollback the rules refuse changes nothing",
            vec![
                (
                    Batch(vec![
                        RollbackBy(1, 1, 1, OUTSIDER),
                        Rollback(2, 2, 5),
                        Upd(3, 3),
                    ]),
                    vec!["1:not_member", "commit [2]"],
                ),
                (
                    Ok,
                    vec!["publish [2]", "caches", "2:invalid_version", "3:ack v2"],
                ),
            ],
            2,
        ),
        case(
            "rule refusals inside a batch change nothing; the rest is applied",
            vec![
                (
                    Batch(vec![
                        Upd(1, 1),
                        UpdBy(2, 2, OUTSIDER),
                        BadPath(3, 3),
                        Upd(4, 4),
                    ]),
                    vec!["commit [2, 3]"],
                ),
                (
                    Ok,
                    vec![
                        "publish [2, 3]",
                        "caches",
                        "1:ack v2",
                        "2:not_member",
                        "3:invalid_path",
                        "4:ack v3",
                    ],
                ),
                // A refused id is not remembered: sent again validly, it applies.
                (Batch(vec![Upd(5, 2)]), vec!["commit [4]"]),
            ],
            4,
        ),
        Case {
            saves_per_min: 2,
            ..case(
                "the session's save quota counts allowed saves only, per minute",
                vec![
                    (
                        Batch(vec![
                            SaveBy(1, 1, OUTSIDER),
                            Save(2, 2),
                            Save(3, 3),
                            Save(4, 4),
                        ]),
                        vec!["commit [2, 3]"],
                    ),
                    (
                        Ok,
                        vec![
                            "publish [2, 3]",
                            "caches",
                            "1:not_member",
                            "2:ack v2",
                            "3:ack v3",
                            "4:rate_limited",
                        ],
                    ),
                    (Wait(61), vec![]),
                    (Batch(vec![Save(5, 4)]), vec!["commit [4]"]),
                ],
                4,
            )
        },
        case(
            "joins are answered with the view; a repeated join confirms the lock",
            vec![
                (Batch(vec![Join(1, 1, PLAYER)]), vec!["commit [2]"]),
                (Ok, vec!["publish [2]", "caches", "1:joined v2"]),
                (Batch(vec![Join(2, 1, PLAYER)]), vec!["confirm"]),
                (Confirm(true), vec!["2:joined v2"]),
            ],
            2,
        ),
        case(
            "a retried create is answered after a lock check",
            vec![
                (Batch(vec![Create(1), Upd(2, 1)]), vec!["commit [2]"]),
                (
                    Ok,
                    vec!["publish [2]", "caches", "1:created v1", "2:ack v2"],
                ),
                (Batch(vec![Create(3)]), vec!["confirm"]),
                (Confirm(false), vec!["3:not_owner", "stop LeaseLost"]),
            ],
            2,
        ),
        case(
            "detach and touch act at once and are answered in order",
            vec![
                (
                    Batch(vec![Detach(1), Upd(2, 1), Touch(3)]),
                    vec!["detach", "touch", "commit [2]"],
                ),
                (
                    Ok,
                    vec!["publish [2]", "caches", "1:done", "2:ack v2", "3:done"],
                ),
            ],
            2,
        ),
        case(
            "an expired new command does not hold up the rest of its batch",
            vec![
                (Batch(vec![Late(1, 1), Upd(2, 2)]), vec!["commit [2]"]),
                (
                    Ok,
                    vec!["publish [2]", "caches", "1:deadline_exceeded", "2:ack v2"],
                ),
            ],
            2,
        ),
        Case {
            window: 1,
            ..case(
                "a look-up error (window incomplete) answers the whole batch",
                vec![
                    (Batch(vec![Upd(1, 1), Upd(2, 2)]), vec!["commit [2, 3]"]),
                    (Ok, vec!["publish [2, 3]", "caches", "1:ack v2", "2:ack v3"]),
                    (Batch(vec![Late(3, 1), Upd(4, 4)]), vec!["verify 1"]),
                    (
                        VerifyErr,
                        vec!["3:service_unavailable", "4:service_unavailable"],
                    ),
                ],
                3,
            )
        },
        case(
            "the session's last event stops it after answering; later requests are redirected",
            vec![
                (Batch(vec![End(1, 1), Get(2)]), vec!["commit [2]"]),
                (
                    Ok,
                    vec![
                        "publish [2]",
                        "caches status",
                        "1:ack v2",
                        "2:not_owner",
                        "stop Idle",
                    ],
                ),
                (
                    Stop(Why::Idle, vec![Upd(3, 3)]),
                    vec!["snapshot 2", "release", "hub owner 1 v2", "3:not_owner"],
                ),
            ],
            2,
        ),
        case(
            "stop with queued requests (handoff): unlock first, then redirect each",
            vec![
                (Batch(vec![Start(1, 1)]), vec!["commit [2]"]),
                (Ok, vec!["publish [2]", "caches status", "1:ack v2"]),
                (
                    Stop(Why::Handoff, vec![Upd(2, 2), Get(3)]),
                    vec!["release", "hub owner 1 v2", "2:not_owner", "3:not_owner"],
                ),
            ],
            2,
        ),
        case(
            "stop on shutdown writes no snapshot",
            vec![(
                Stop(Why::Shutdown, vec![Join(1, 1, PLAYER)]),
                vec!["release", "hub owner 1 v1", "1:not_owner"],
            )],
            1,
        ),
        case(
            "an idle session passivates with a snapshot; one with clients does not",
            vec![
                (Batch(vec![Upd(1, 1)]), vec!["commit [2]"]),
                (Ok, vec!["publish [2]", "caches", "1:ack v2"]),
                (Tick(601, true), vec![]),
                (Tick(1, false), vec!["stop Idle"]),
                (
                    Stop(Why::Idle, vec![]),
                    vec!["snapshot 2", "release", "hub owner 1 v2"],
                ),
            ],
            2,
        ),
        case(
            "activity keeps a session from passivating",
            vec![
                (Wait(590), vec![]),
                (Batch(vec![Get(1)]), vec!["confirm"]),
                (Confirm(true), vec!["1:read"]),
                (ReadDone, vec![]),
                (Tick(20, false), vec![]),
                (Tick(600, false), vec!["stop Idle"]),
                (
                    Stop(Why::Idle, vec![]),
                    vec!["snapshot 1", "release", "hub owner 1 v1"],
                ),
            ],
            1,
        ),
        Case {
            snapshot_every: 2,
            ..case(
                "a commit crossing a multiple of snapshot_every carries a snapshot",
                vec![
                    (Batch(vec![Upd(1, 1)]), vec!["commit [2] snap 2"]),
                    (Ok, vec!["publish [2]", "caches", "1:ack v2"]),
                    (Batch(vec![Upd(2, 2)]), vec!["commit [3]"]),
                    (Ok, vec!["publish [3]", "caches", "2:ack v3"]),
                    (
                        Batch(vec![Upd(3, 3), Upd(4, 4)]),
                        vec!["commit [4, 5] snap 5"],
                    ),
                ],
                5,
            )
        },
    ]
}

#[test]
fn session_core_table() {
    let cases = cases();
    assert!(cases.len() >= 22, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let mut h = Harness::new(&c);
        let name = c.name;
        let version = c.version;
        for (i, (input, expected)) in c.steps.into_iter().enumerate() {
            let got = h.step(input);
            if got != expected {
                failures.push(format!(
                    "{name}: step {i}: expected {expected:?}\n    got {got:?}"
                ));
                break;
            }
        }
        if h.core.state().version != version {
            failures.push(format!(
                "{name}: version {} (expected {version})",
                h.core.state().version
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_failed_commit_restores_the_logged_state() {
    let c = case("", vec![], 1);
    let mut h = Harness::new(&c);
    h.step(In::Batch(vec![Rq::Upd(1, 1)]));
    assert!(h.core.state().doc.get("k1").is_some(), "applied in memory");
    h.step(In::Failed);
    h.step(In::Reloaded);
    assert_eq!(h.core.state().version, 1);
    assert!(h.core.state().doc.get("k1").is_none(), "rolled back");
}

#[test]
fn a_rollback_restores_the_past_document() {
    let c = case("", vec![], 1);
    let mut h = Harness::new(&c);
    h.step(In::Batch(vec![Rq::Upd(1, 1), Rq::Upd(2, 2)]));
    h.step(In::Ok);
    h.step(In::Batch(vec![Rq::Rollback(3, 3, 2)]));
    h.step(In::Past);
    h.step(In::Ok);
    let doc = &h.core.state().doc;
    assert_eq!(doc.get("k1"), Some(&json!(1)));
    assert!(doc.get("k2").is_none(), "{doc}");
}
