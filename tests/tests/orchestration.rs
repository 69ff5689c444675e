//! Service orchestration through the Message Hub (issue 12), end to end: the real
//! binaries, RabbitMQ, and the stand-ins of the Character, Campaign, LLM and Image
//! services (`cluster::stand_ins`, in-process so each test sets their delay, silence
//! and failures).
//!
//! * characters come from the Character Service: owned → in play with its sheet; not
//!   owned → `403 not_your_character`; unknown → `404 character_not_found`; a player's
//!   own sheet is refused; a slow service → `pending`, filled in later by a
//!   `character_updated`; HP changes go out as `session.character.changed`;
//! * membership: a non-member cannot create or join (`403 not_in_campaign`);
//! * narration and maps: `narrate` → `narration` to every client in order, in the log
//!   across an owner failover; a silent LLM → `narration_failed` after the deadline,
//!   play goes on; `map_request` → `map_updated` with the URL; `monster_decide` →
//!   the LLM's action through the rules (refused outside combat → `narration_failed`);
//! * the breaker: an LLM failing every request opens it, then requests fail fast
//!   until a probe succeeds;
//! * the round trip under the bench load (20 sessions × 5 clients), printed.
//!
//! Figures (round trips) are printed, not asserted against tight bounds.

use anyhow::{ensure, Context, Result};
use cluster::client::{Api, TokenStyle, TrackedClient};
use cluster::harness::{ClusterSpec, LocalCluster};
use cluster::stand_ins::{Behaviour, Fixture, StandIns};
use gs_shared::auth::Role;
use gs_tests::rabbit::Rabbit;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Bound of every wait for something that should happen quickly.
const WAIT: Duration = Duration::from_secs(10);

/// A cluster with the stand-ins, membership required and character lookups on; a
/// campaign whose DM created a session.
struct Orchestra {
    cluster: LocalCluster,
    stand_ins: StandIns,
    campaign: Uuid,
    dm_token: String,
    session: String,
    session_token: String,
}

impl Orchestra {
    async fn start(
        nodes: usize,
        tune: impl FnOnce(&mut gs_shared::config::Config),
    ) -> Result<Orchestra> {
        gs_tests::init_logging();
        let mut spec = ClusterSpec::test(nodes, 1);
        spec.base.campaign.require_membership = true;
        spec.base.services.character_lookup = true;
        tune(&mut spec.base);
        let cluster = LocalCluster::start(spec).await?;
        let fixture = Fixture::load(&Fixture::default_dir())?;
        let stand_ins = StandIns::start(
            &cluster.base.rabbitmq.url,
            &cluster.base.rabbitmq.inbound_exchange,
            fixture,
            7,
        )
        .await?;
        let campaign = Uuid::new_v4();
        let dm = Uuid::new_v4();
        stand_ins.fixture(|f| f.add_member(campaign, dm, "dm"));
        let dm_token = cluster.token(dm, Role::Dm);
        let created = api(&cluster, &dm_token)
            .call(
                reqwest::Method::POST,
                "/api/v2/sessions",
                Some(&json!({"campaign_id": campaign, "name": "orchestra", "settings": {}})),
            )
            .await?
            .ok()?;
        let field = |n: &str| {
            created[n]
                .as_str()
                .map(str::to_string)
                .context(n.to_string())
        };
        Ok(Orchestra {
            session: field("session_id")?,
            session_token: field("connection_token")?,
            cluster,
            stand_ins,
            campaign,
            dm_token,
        })
    }

    /// A user of the campaign (a player) with a token.
    fn member(&self) -> (Uuid, String) {
        let user = Uuid::new_v4();
        self.stand_ins
            .fixture(|f| f.add_member(self.campaign, user, "player"));
        (user, self.cluster.token(user, Role::Player))
    }

    /// A character of `owner` in the Character Service.
    fn character(&self, owner: Uuid, name: &str, max_hp: u32) -> Uuid {
        let id = Uuid::new_v4();
        let sheet = json!({"name": name, "max_hp": max_hp, "ac": 14, "speed": 30});
        self.stand_ins
            .fixture(|f| f.add_character(id, owner, sheet));
        id
    }

    async fn join(&self, token: &str, body: Value) -> Result<cluster::client::Answer> {
        api(&self.cluster, token)
            .call(
                reqwest::Method::POST,
                &format!("/api/v2/sessions/{}/join", self.session),
                Some(&body),
            )
            .await
    }

    async fn connect(&self, name: &str, token: &str, session_token: &str) -> Result<TrackedClient> {
        let ws = cluster::client::ws_connect(
            &self.cluster.router_ws_urls()[0],
            &self.session,
            token,
            session_token,
            None,
            TokenStyle::Headers,
            None,
        )
        .await?;
        let c = TrackedClient::new(name, ws, true, None);
        c.wait_for("the initial state", WAIT, |v| v.syncs > 0)
            .await?;
        Ok(c)
    }

    async fn play(&self) -> Result<Value> {
        let state = api(&self.cluster, &self.dm_token)
            .get_state(&self.session)
            .await?;
        Ok(state["game"]["play"].clone())
    }

    async fn stored(&self, kind: &str) -> Result<i64> {
        let pg = self.cluster.pg().await?;
        let sid: Uuid = self.session.parse()?;
        Ok(pg
            .query_one(
                "SELECT count(*) FROM session_events WHERE session_id = $1 AND event_type = $2",
                &[&sid, &kind],
            )
            .await?
            .get(0))
    }
}

fn api(cluster: &LocalCluster, token: &str) -> Api {
    Api::new(cluster.http(), &cluster.router_urls()[0], token)
}

/// The data of the events of `kind` a client received, in order.
fn events_of(c: &TrackedClient, kind: &str) -> Vec<Value> {
    c.with_view(|v| {
        v.frames
            .iter()
            .filter(|f| f["type"] == kind)
            .map(|f| json!({"version": f["version"], "data": f["data"]}))
            .collect()
    })
}

fn millis_between(a: &Value, b: &Value) -> Option<i64> {
    let t = |v: &Value| chrono::DateTime::parse_from_rfc3339(v["data"]["timestamp"].as_str()?).ok();
    Some((t(b)? - t(a)?).num_milliseconds())
}

async fn finish(o: Orchestra, result: Result<()>) -> Result<()> {
    if result.is_err() {
        o.cluster.dump_logs(60);
    }
    o.stand_ins.stop().await;
    gs_tests::finish_cluster(o.cluster, result).await
}

#[tokio::test]
async fn characters_and_membership_come_from_their_services() -> Result<()> {
    let o = Orchestra::start(1, |_| {}).await?;
    let result = characters_and_membership(&o).await;
    finish(o, result).await
}

async fn characters_and_membership(o: &Orchestra) -> Result<()> {
    // Owned: in play with the service's sheet.
    let (aria_owner, aria_token) = o.member();
    let aria = o.character(aria_owner, "Aria", 24);
    let joined = o.join(&aria_token, json!({"character_id": aria})).await?;
    ensure!(
        joined.status == 200,
        "owner's join: {} {}",
        joined.status,
        joined.body
    );
    let play = o.play().await?;
    let c = &play["characters"][aria.to_string()];
    ensure!(
        c["name"] == "Aria" && c["max_hp"] == 24 && c["ac"] == 14,
        "{c}"
    );
    ensure!(c.get("pending").is_none(), "{c}");

    // Not owned, unknown, a sheet of one's own: refused, nothing changes.
    let (_, thief_token) = o.member();
    let version = api(&o.cluster, &o.dm_token).get_state(&o.session).await?["version"].clone();
    let r = o.join(&thief_token, json!({"character_id": aria})).await?;
    ensure!(
        (r.status, r.code()) == (403, "not_your_character"),
        "{} {}",
        r.status,
        r.body
    );
    let r = o
        .join(&thief_token, json!({"character_id": Uuid::new_v4()}))
        .await?;
    ensure!(
        (r.status, r.code()) == (404, "character_not_found"),
        "{} {}",
        r.status,
        r.body
    );
    let (cheat_owner, cheat_token) = o.member();
    let cheat = o.character(cheat_owner, "Modest", 8);
    let r = o
        .join(
            &cheat_token,
            json!({"character_id": cheat, "character": {"max_hp": 300, "ac": 30}}),
        )
        .await?;
    ensure!(
        (r.status, r.code()) == (422, "forbidden_for_role"),
        "{} {}",
        r.status,
        r.body
    );
    let after = api(&o.cluster, &o.dm_token).get_state(&o.session).await?["version"].clone();
    ensure!(
        after == version,
        "refused joins changed the session: {version} → {after}"
    );

    // Membership: an outsider can neither join nor create.
    let outsider = o.cluster.token(Uuid::new_v4(), Role::Player);
    let r = o.join(&outsider, json!({})).await?;
    ensure!(
        (r.status, r.code()) == (403, "not_in_campaign"),
        "{} {}",
        r.status,
        r.body
    );
    let outsider_dm = o.cluster.token(Uuid::new_v4(), Role::Dm);
    let r = api(&o.cluster, &outsider_dm)
        .call(
            reqwest::Method::POST,
            "/api/v2/sessions",
            Some(&json!({"campaign_id": o.campaign, "name": "not mine", "settings": {}})),
        )
        .await?;
    ensure!(
        (r.status, r.code()) == (403, "not_in_campaign"),
        "{} {}",
        r.status,
        r.body
    );

    pending_then_filled(o).await?;
    hp_changes_go_to_the_character_service(o, aria).await
}

/// The Character Service slower than the deadline: the join succeeds at once with the
/// character `pending`; its sheet arrives later as `character_updated`.
async fn pending_then_filled(o: &Orchestra) -> Result<()> {
    let dm = o.connect("dm", &o.dm_token, &o.session_token).await?;
    let (owner, token) = o.member();
    let borin = o.character(owner, "Borin", 31);
    o.stand_ins.set(
        "character",
        Behaviour {
            delay: Duration::from_millis(900),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let r = o.join(&token, json!({"character_id": borin})).await?;
    let join_ms = started.elapsed().as_millis();
    ensure!(
        r.status == 200,
        "join with a slow Character Service: {} {}",
        r.status,
        r.body
    );
    let play = o.play().await?;
    let c = &play["characters"][borin.to_string()];
    ensure!(c["pending"] == true, "not pending: {c}");
    dm.wait_for("character_updated of the pending character", WAIT, |v| {
        v.frames.iter().any(|f| {
            f["type"] == "character_updated" && f["data"]["character_id"] == borin.to_string()
        })
    })
    .await?;
    let filled_ms = started.elapsed().as_millis();
    let play = o.play().await?;
    let c = &play["characters"][borin.to_string()];
    ensure!(
        c["name"] == "Borin" && c["max_hp"] == 31 && c.get("pending").is_none(),
        "{c}"
    );
    println!("slow Character Service (900 ms): join answered in {join_ms} ms (pending), sheet in play after {filled_ms} ms");
    o.stand_ins.set("character", Behaviour::default());
    Ok(())
}

/// A DM's change of hit points is published as `session.character.changed`.
async fn hp_changes_go_to_the_character_service(o: &Orchestra, aria: Uuid) -> Result<()> {
    let rabbit = Rabbit::connect(&o.cluster.base.rabbitmq).await?;
    let tap = rabbit.tap_outbound().await?;
    let mut dm = o.connect("dm2", &o.dm_token, &o.session_token).await?;
    let id = dm
        .send(
            "character_update",
            json!({"character_id": aria, "changes": {"hp": 11}}),
        )
        .await?;
    ensure!(
        dm.wait_answer(id, WAIT).await?.is_ok(),
        "character_update refused"
    );
    let got = rabbit
        .drain_until(&tap, WAIT, |all| {
            all.iter()
                .any(|m| m.routing_key == "session.character.changed")
        })
        .await?;
    let m = got
        .iter()
        .find(|m| m.routing_key == "session.character.changed")
        .context("no session.character.changed")?
        .json();
    ensure!(
        m["character_id"] == aria.to_string()
            && m["details"]["hp"] == 11
            && m["change_type"] == "character_updated",
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn narration_and_maps_arrive_as_events() -> Result<()> {
    let mut o = Orchestra::start(2, |_| {}).await?;
    let result = narration_and_maps(&mut o).await;
    finish(o, result).await
}

async fn narration_and_maps(o: &mut Orchestra) -> Result<()> {
    let (_, token) = o.member();
    let joined = o.join(&token, json!({})).await?.ok()?;
    let st = joined["connection_token"]
        .as_str()
        .context("connection_token")?;
    let mut dm = o.connect("dm", &o.dm_token, &o.session_token).await?;
    let player = o.connect("player", &token, st).await?;

    // narrate → narration_requested, then narration, to every client, in order.
    let mut round_trips = vec![];
    for i in 0..5 {
        let id = dm
            .send("narrate", json!({"prompt": format!("the cave, part {i}")}))
            .await?;
        ensure!(dm.wait_answer(id, WAIT).await?.is_ok(), "narrate refused");
        let n = i + 1;
        for c in [&dm, &player] {
            c.wait_for("the narration", WAIT, |v| {
                v.frames.iter().filter(|f| f["type"] == "narration").count() >= n
            })
            .await?;
        }
        let (req, ans) = (
            events_of(&dm, "narration_requested"),
            events_of(&dm, "narration"),
        );
        round_trips.extend(millis_between(&req[i], &ans[i]));
    }
    for c in [&dm, &player] {
        let asked = events_of(c, "narration_requested");
        let told = events_of(c, "narration");
        ensure!(
            asked.len() == 5 && told.len() == 5,
            "{}: {} / {}",
            c.name,
            asked.len(),
            told.len()
        );
        for (a, t) in asked.iter().zip(&told) {
            ensure!(
                a["data"]["request_id"] == t["data"]["request_id"],
                "answers out of order"
            );
            ensure!(
                t["version"].as_u64() > a["version"].as_u64(),
                "narration before its request"
            );
            ensure!(
                !t["data"]["text"].as_str().unwrap_or("").is_empty(),
                "empty narration"
            );
        }
        ensure!(
            c.view().gaps == 0 && c.view().duplicates == 0,
            "{}: gaps or duplicates",
            c.name
        );
    }
    round_trips.sort();
    println!("narrate round trip (requested → narration, event timestamps): {round_trips:?} ms");

    // map_request → map_updated with the URL; the play state shows the map.
    let id = dm
        .send(
            "map_request",
            json!({"description": "a forest clearing", "grid": {"width": 30, "height": 20}}),
        )
        .await?;
    ensure!(
        dm.wait_answer(id, WAIT).await?.is_ok(),
        "map_request refused"
    );
    player
        .wait_for("map_updated", WAIT, |v| {
            v.frames.iter().any(|f| f["type"] == "map_updated")
        })
        .await?;
    let map = events_of(&player, "map_updated").remove(0);
    let url = map["data"]["url"].as_str().unwrap_or("");
    ensure!(url.starts_with("https://maps.example/"), "{map}");
    ensure!(
        map["data"]["grid"] == json!({"width": 30, "height": 20}),
        "{map}"
    );
    ensure!(
        o.play().await?["map"]["url"] == url,
        "the map is not in the play state"
    );

    // monster_decide: the LLM's action goes through the rules; outside combat they
    // refuse it, which ends in narration_failed (the action is never forced in).
    let gob = Uuid::new_v4();
    let id = dm
        .send(
            "spawn_character",
            json!({"character_id": gob, "sheet": {"name": "Gob", "max_hp": 7, "ac": 15}}),
        )
        .await?;
    ensure!(dm.wait_answer(id, WAIT).await?.is_ok(), "spawn refused");
    let id = dm
        .send("monster_decide", json!({"character_id": gob}))
        .await?;
    ensure!(
        dm.wait_answer(id, WAIT).await?.is_ok(),
        "monster_decide refused"
    );
    player
        .wait_for("the monster's narration and its refusal", WAIT, |v| {
            v.frames.iter().any(|f| f["type"] == "narration_failed")
        })
        .await?;
    let told = events_of(&player, "narration").remove(5);
    ensure!(
        told["data"]["character_id"] == gob.to_string()
            && told["data"]["action"]["action_type"].is_string(),
        "{told}"
    );
    let refused = events_of(&player, "narration_failed").remove(0);
    ensure!(
        refused["data"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("refused"),
        "{refused}"
    );
    ensure!(
        refused["data"]["request_id"] == told["data"]["request_id"],
        "{refused}"
    );

    // A silent LLM: narration_failed after the deadline; play goes on meanwhile.
    o.stand_ins.set(
        "llm",
        Behaviour {
            silent: true,
            ..Default::default()
        },
    );
    let id = dm
        .send("narrate", json!({"prompt": "nobody answers"}))
        .await?;
    ensure!(dm.wait_answer(id, WAIT).await?.is_ok(), "narrate refused");
    let upd = dm
        .send(
            "state_update",
            json!({"changes": [{"path": "/scene", "value": "goes on"}]}),
        )
        .await?;
    ensure!(
        dm.wait_answer(upd, WAIT).await?.is_ok(),
        "play blocked by a silent LLM"
    );
    player
        .wait_for("narration_failed", WAIT, |v| {
            v.frames
                .iter()
                .filter(|f| f["type"] == "narration_failed")
                .count()
                > 1
        })
        .await?;
    let failed = events_of(&player, "narration_failed").remove(1);
    let asked = events_of(&player, "narration_requested").remove(6);
    let waited = millis_between(&asked, &failed).unwrap_or(-1);
    ensure!(
        waited >= 350,
        "narration_failed before the deadline: {waited} ms"
    );
    ensure!(
        failed["data"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("timeout"),
        "{failed}"
    );
    println!("silent LLM: narration_failed {waited} ms after the request (deadline 400 ms)");
    o.stand_ins.set("llm", Behaviour::default());
    drop(player);
    dm.close().await;
    narration_survives_failover(o).await
}

/// The narrations are in the log: after the owner is killed, the next owner serves
/// them (a fresh client's sync) and narrates on.
async fn narration_survives_failover(o: &mut Orchestra) -> Result<()> {
    let before = o.stored("narration").await?;
    ensure!(before == 6, "stored narrations: {before}");
    let owners = gs_tests::owners(&o.cluster, std::slice::from_ref(&o.session)).await?;
    let owner = owners.keys().next().context("no owner")?.clone();
    o.cluster.kill(&owner).await?;
    let mut dm = o.connect("dm-after", &o.dm_token, &o.session_token).await?;
    let id = dm
        .send("narrate", json!({"prompt": "after the failover"}))
        .await?;
    ensure!(
        dm.wait_answer(id, Duration::from_secs(20)).await?.is_ok(),
        "narrate after failover"
    );
    dm.wait_for("a narration from the new owner", WAIT, |v| {
        v.frames.iter().any(|f| f["type"] == "narration")
    })
    .await?;
    let history = api(&o.cluster, &o.dm_token)
        .call(
            reqwest::Method::GET,
            &format!("/api/v2/sessions/{}/history?limit=100", o.session),
            None,
        )
        .await?
        .ok()?;
    let narrations = history.to_string().matches("\"narration\"").count();
    ensure!(
        o.stored("narration").await? == before + 1,
        "narrations lost across the failover"
    );
    println!(
        "failover of {owner}: {before} narrations kept, a new one served ({narrations} in history)"
    );
    Ok(())
}

/// A request whose asker dies before the answer: the next owner finds it open in the
/// log and asks again, so the narration still arrives, once.
#[tokio::test]
async fn an_unanswered_request_is_asked_again_by_the_next_owner() -> Result<()> {
    // A deadline long enough that the first owner is killed while it still waits.
    let mut o = Orchestra::start(2, |c| c.services.llm_deadline_ms = 8000).await?;
    let result = asked_again(&mut o).await;
    finish(o, result).await
}

async fn asked_again(o: &mut Orchestra) -> Result<()> {
    let mut dm = o.connect("dm", &o.dm_token, &o.session_token).await?;
    o.stand_ins.set(
        "llm",
        Behaviour {
            silent: true,
            ..Default::default()
        },
    );
    let id = dm.send("narrate", json!({"prompt": "the vault"})).await?;
    ensure!(dm.wait_answer(id, WAIT).await?.is_ok(), "narrate refused");
    // The owner has asked (the LLM stand-in took the request and keeps silent).
    tokio::time::timeout(WAIT, async {
        while o.stand_ins.served("llm") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("the owner never asked the LLM Service")?;
    let owners = gs_tests::owners(&o.cluster, std::slice::from_ref(&o.session)).await?;
    let owner = owners.keys().next().context("no owner")?.clone();
    o.stand_ins.set("llm", Behaviour::default());
    let killed = Instant::now();
    o.cluster.kill(&owner).await?;
    let request = id.to_string();
    dm.wait_for(
        "the narration, from the next owner",
        Duration::from_secs(30),
        |v| {
            v.frames
                .iter()
                .any(|f| f["type"] == "narration" && f["data"]["request_id"] == request)
        },
    )
    .await?;
    let after_ms = killed.elapsed().as_millis();
    let frames = |kind: &str| {
        events_of(&dm, kind)
            .iter()
            .filter(|d| d["data"]["request_id"] == request)
            .count()
    };
    ensure!(
        frames("narration") == 1,
        "narrations: {}",
        frames("narration")
    );
    ensure!(frames("narration_failed") == 0, "the request failed");
    ensure!(o.stored("narration").await? == 1, "stored narrations");
    ensure!(o.stored("narration_failed").await? == 0, "stored failures");
    println!(
        "owner {owner} killed while the LLM Service held its request: the next owner asked again, \
         narration {after_ms} ms after the kill ({} requests taken)",
        o.stand_ins.served("llm")
    );
    Ok(())
}

#[tokio::test]
async fn the_breaker_fails_fast_until_a_probe_succeeds() -> Result<()> {
    let o = Orchestra::start(1, |c| c.services.breaker_cool_down_ms = 1500).await?;
    let result = breaker(&o).await;
    finish(o, result).await
}

async fn breaker(o: &Orchestra) -> Result<()> {
    let mut dm = o.connect("dm", &o.dm_token, &o.session_token).await?;
    o.stand_ins.set(
        "llm",
        Behaviour {
            error_rate: 1.0,
            ..Default::default()
        },
    );
    let threshold = o.cluster.base.services.breaker_failure_threshold as usize;
    let mut waits = vec![];
    for i in 0..threshold + 3 {
        let id = dm
            .send("narrate", json!({"prompt": format!("try {i}")}))
            .await?;
        ensure!(dm.wait_answer(id, WAIT).await?.is_ok(), "narrate refused");
        dm.wait_for("narration_failed", WAIT, |v| {
            v.frames
                .iter()
                .filter(|f| f["type"] == "narration_failed")
                .count()
                > i
        })
        .await?;
        let asked = events_of(&dm, "narration_requested");
        let failed = events_of(&dm, "narration_failed");
        waits.push((
            millis_between(&asked[i], &failed[i]).unwrap_or(-1),
            failed[i]["data"]["reason"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ));
    }
    let served_open = o.stand_ins.served("llm");
    let fast: Vec<_> = waits.iter().skip(threshold).collect();
    for (ms, reason) in &fast {
        ensure!(
            reason.contains("breaker: open"),
            "not failed fast: {reason}"
        );
        ensure!(*ms < 300, "a fast failure took {ms} ms");
    }
    println!(
        "breaker: failures before opening {:?} ms; while open (no request sent) {:?} ms, request → narration_failed",
        waits.iter().take(threshold).map(|w| w.0).collect::<Vec<_>>(),
        fast.iter().map(|w| w.0).collect::<Vec<_>>()
    );
    // Nothing was sent while open.
    ensure!(
        o.stand_ins.served("llm") == served_open,
        "requests sent while the breaker was open"
    );

    // The service recovers; after the cool-down a probe goes out and succeeds.
    o.stand_ins.set("llm", Behaviour::default());
    let deadline = Instant::now() + WAIT;
    loop {
        let n = events_of(&dm, "narration").len();
        // Counted before sending: a fast failure can arrive with the ack.
        let before = events_of(&dm, "narration_failed").len();
        let id = dm.send("narrate", json!({"prompt": "probe"})).await?;
        ensure!(dm.wait_answer(id, WAIT).await?.is_ok(), "narrate refused");
        dm.wait_for("an answer", WAIT, |v| {
            let told = v.frames.iter().filter(|f| f["type"] == "narration").count();
            let failed = v
                .frames
                .iter()
                .filter(|f| f["type"] == "narration_failed")
                .count();
            told > n || failed > before
        })
        .await?;
        if events_of(&dm, "narration").len() > n {
            break;
        }
        ensure!(Instant::now() < deadline, "the breaker never closed");
        // Still open: wait for the cool-down (bounded by `deadline`).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// The round trip through the hub (request committed → answer committed, from the
/// events' timestamps) while 20 sessions × 5 clients play at the bench's rate (one
/// change per client every 100 ms). Printed for BENCHMARKS.md; asserted: every request
/// answered, none failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_under_bench_load() -> Result<()> {
    let o = Orchestra::start(3, |c| {
        // The load's sessions belong to random campaigns and play without characters.
        c.campaign.require_membership = false;
        c.services.character_lookup = false;
    })
    .await?;
    let result = round_trip_under_load(&o).await;
    finish(o, result).await
}

async fn round_trip_under_load(o: &Orchestra) -> Result<()> {
    use cluster::load::{self, percentiles, Target};
    const REQUESTS: usize = 60;
    let target = Target::of(&o.cluster);
    let (_ids, clients) = load::setup(&target, 20, 5, None).await?;
    let running = load::start(
        clients,
        Duration::from_millis(100),
        Duration::from_secs(15),
        None,
    );
    let warm = Instant::now();
    running
        .progress
        .wait("every session served", Duration::from_secs(30), |p| {
            (0..20).all(|s| p.acked_since(s, warm))
        })
        .await?;
    let mut dm = o.connect("dm", &o.dm_token, &o.session_token).await?;
    for i in 0..REQUESTS {
        let id = dm
            .send("narrate", json!({"prompt": format!("under load {i}")}))
            .await?;
        ensure!(dm.wait_answer(id, WAIT).await?.is_ok(), "narrate refused");
        dm.wait_for("the answer", WAIT, |v| {
            let done = |k: &str| v.frames.iter().filter(|f| f["type"] == k).count();
            done("narration") + done("narration_failed") > i
        })
        .await?;
    }
    let acks = running.progress.acks();
    let (_, records) = running.stop().await?;
    let asked = events_of(&dm, "narration_requested");
    let told = events_of(&dm, "narration");
    let failed = events_of(&dm, "narration_failed").len();
    let rt: Vec<f64> = asked
        .iter()
        .zip(&told)
        .filter_map(|(a, t)| millis_between(a, t).map(|ms| ms as f64))
        .collect();
    let p = percentiles(rt);
    println!(
        "hub round trip under 20 sessions × 5 clients ({} load commands acked, {} records): {} requests, p50 {} ms, p95 {} ms, p99 {} ms, max {} ms; {failed} failed",
        acks,
        records.len(),
        p.count,
        p.p50,
        p.p95,
        p.p99,
        p.max
    );
    ensure!(
        failed == 0 && told.len() == REQUESTS,
        "{failed} failed, {} answered",
        told.len()
    );
    Ok(())
}
