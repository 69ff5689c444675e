//! The play page in a real browser: two headless Chromium pages (a DM and a player)
//! against a cluster of 2 nodes and 2 routers, driven through the DevTools protocol
//! (`gs_tests::cdp`).
//!
//! create → start → join with a character → a state change by each is seen by the
//! other → the DM adds a monster and starts combat (the tracker shows on both), the
//! player attacks on its turn →
//! SIGKILL the router the player's page is connected to, while the player sends a
//! command and the DM changes the state → the player's page resumes through the other
//! router: the command took effect once, the DM's change arrived, and both pages saw
//! every version exactly once, in order → the turn moves on, seen live after the
//! resume. Screenshots (target/artifacts/browser-*.png) show the combat tracker.

use anyhow::{ensure, Context, Result};
use cluster::harness::{ClusterSpec, LocalCluster};
use gs_shared::auth::Role;
use gs_shared::membership::MemberKind;
use gs_tests::cdp::{artifacts_dir, Browser, Page};
use serde_json::Value;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_play_page_survives_its_router_dying() -> Result<()> {
    gs_tests::init_logging();
    // Fail first (and clearly) if there is no browser, before starting a cluster.
    let browser = Browser::launch().await?;
    let mut cluster = LocalCluster::start(ClusterSpec::test(2, 2)).await?;
    let result = run(&mut cluster, &browser).await;
    if result.is_err() {
        eprintln!("browser problems: {:#?}", browser.problems());
    }
    browser.close().await;
    gs_tests::finish_cluster(cluster, result).await
}

/// Every router serves the client module, its types and the play page, with their
/// content types and revalidation, and lists the routers (no browser needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_serve_the_client_module_and_the_play_page() -> Result<()> {
    gs_tests::init_logging();
    let cluster = LocalCluster::start(ClusterSpec::test(1, 2)).await?;
    let result = serve(&cluster).await;
    gs_tests::finish_cluster(cluster, result).await
}

async fn serve(cluster: &LocalCluster) -> Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let routers = cluster.router_urls();
    for base in &routers {
        for (path, ctype, needle) in [
            (
                "/client/gs-client.js",
                "text/javascript",
                "export class GameClient",
            ),
            (
                "/client/gs-client.d.ts",
                "application/typescript",
                "export declare class GameClient",
            ),
            (
                "/play/",
                "text/html",
                "<script type=\"module\" src=\"play.js\">",
            ),
            ("/play/play.js", "text/javascript", "/client/gs-client.js"),
            ("/play/play.css", "text/css", ".tracker"),
        ] {
            let r = http.get(format!("{base}{path}")).send().await?;
            ensure!(r.status() == 200, "{base}{path}: {}", r.status());
            let h = r.headers().clone();
            let ct = h["content-type"].to_str()?;
            ensure!(ct.starts_with(ctype), "{path}: content type {ct}");
            ensure!(h["cache-control"] == "no-cache", "{path}: cache-control");
            let etag = h["etag"].to_str()?.to_string();
            ensure!(r.text().await?.contains(needle), "{path} holds {needle:?}");
            let again = http
                .get(format!("{base}{path}"))
                .header("if-none-match", &etag)
                .send()
                .await?;
            ensure!(
                again.status() == 304,
                "{path} revalidates: {}",
                again.status()
            );
        }
        let r = http.get(format!("{base}/play")).send().await?;
        ensure!(
            r.status() == 301 && r.headers()["location"] == "/play/",
            "/play redirects"
        );
        let r = http.get(format!("{base}/play/nope.js")).send().await?;
        ensure!(r.status() == 404, "an unknown file: {}", r.status());
        let r = http
            .post(format!("{base}/play/play.js"))
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 405, "POST to a file: {}", r.status());
        // The routers each one knows: itself first, then the other.
        let deadline = std::time::Instant::now() + gs_tests::WAIT;
        loop {
            let list: Value = http
                .get(format!("{base}/client/routers"))
                .send()
                .await?
                .json()
                .await?;
            let list: Vec<String> = serde_json::from_value(list["routers"].clone())?;
            if list.len() == routers.len() {
                ensure!(&list[0] == base, "this router first: {list:?}");
                ensure!(routers.iter().all(|r| list.contains(r)), "{list:?}");
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "routers listed: {list:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// JSON-quotes a string for embedding in a JavaScript expression.
fn js(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Fills inputs (by element id) and submits a form, as a user would.
async fn submit(page: &Page<'_>, form: &str, fields: &[(&str, &str)]) -> Result<()> {
    let mut script = String::new();
    for (id, value) in fields {
        script.push_str(&format!(
            "document.getElementById({}).value = {};",
            js(id),
            js(value)
        ));
    }
    script.push_str(&format!(
        "document.getElementById({}).requestSubmit(); true",
        js(form)
    ));
    page.eval(&script).await?;
    Ok(())
}

async fn click(page: &Page<'_>, selector: &str) -> Result<()> {
    page.wait_for(
        &format!("{selector} visible"),
        &format!(
            "(() => {{ const b = document.querySelector({}); return !!b && b.offsetParent !== null; }})()",
            js(selector)
        ),
    )
    .await?;
    page.eval(&format!(
        "document.querySelector({}).click(); true",
        js(selector)
    ))
    .await?;
    Ok(())
}

/// The versions of the events a page applied, checked to be strictly consecutive.
async fn consecutive_versions(page: &Page<'_>) -> Result<Vec<u64>> {
    let v = page.eval("JSON.stringify(gsPlay.versions)").await?;
    let versions: Vec<u64> = serde_json::from_str(v.as_str().context("versions")?)?;
    for w in versions.windows(2) {
        ensure!(
            w[1] == w[0] + 1,
            "{}: events not consecutive: {} then {} (all: {versions:?})",
            page.name,
            w[0],
            w[1]
        );
    }
    Ok(versions)
}

/// How many state_update events touching `path` a page applied.
async fn updates_of(page: &Page<'_>, path: &str) -> Result<u64> {
    let n = page
        .eval(&format!(
            "gsPlay.events.filter(e => e.type === 'state_update' && (e.paths || []).includes({})).length",
            js(path)
        ))
        .await?;
    n.as_u64().context("count")
}

async fn run(cluster: &mut LocalCluster, browser: &Browser) -> Result<()> {
    let routers = cluster.router_urls();
    ensure!(routers.len() == 2, "two routers");
    let (r0, r1) = (routers[0].clone(), routers[1].clone());
    let dm_token = cluster.token(Uuid::new_v4(), Role::Dm);
    let player_token = cluster.token(Uuid::new_v4(), Role::Player);
    let shots = artifacts_dir();

    // The DM opens the play page on router 0 and creates a session.
    let dm = browser.new_page("dm page", 1100, 1400).await?;
    dm.goto(&format!("{r0}/play/#token={dm_token}")).await?;
    dm.wait_for("the page ready", "document.body.dataset.ready === 'true'")
        .await?;
    ensure!(
        dm.eval("location.hash").await? == "",
        "the token left the address bar"
    );
    dm.wait_for(
        "both routers known to the page (GET /client/routers)",
        "gsPlay.routers.length === 2",
    )
    .await?;
    submit(&dm, "create-form", &[("create-name", "Browser table")]).await?;
    dm.wait_for(
        "the DM connected",
        "gsPlay.client && gsPlay.client.status === 'open' && gsPlay.client.view && gsPlay.joinLink",
    )
    .await?;
    let join_link = dm.eval("gsPlay.joinLink").await?;
    let join_link = join_link.as_str().context("join link")?.to_string();
    let session = dm.eval("gsPlay.sessionId").await?;
    let session = session.as_str().context("session id")?.to_string();
    ensure!(join_link == format!("{r0}/play/?session={session}"));
    click(&dm, "button[data-cmd=session_start]").await?;
    dm.wait_for(
        "the session active",
        "document.getElementById('session-status').textContent === 'active'",
    )
    .await?;

    // The player opens the join link on router 1 and joins with a character.
    let player = browser.new_page("player page", 1100, 1400).await?;
    let link_on_r1 = join_link.replacen(&r0, &r1, 1);
    player
        .goto(&format!("{link_on_r1}#token={player_token}"))
        .await?;
    player
        .wait_for("the join form", "document.body.dataset.ready === 'true' && !document.getElementById('join-panel').hidden")
        .await?;
    submit(
        &player,
        "join-form",
        &[
            ("char-name", "Aria"),
            ("char-class", "Ranger"),
            ("char-hp", "24"),
            ("char-ac", "15"),
            ("char-dex", "3"),
        ],
    )
    .await?;
    player
        .wait_for(
            "the player connected through router 1",
            &format!(
                "gsPlay.client && gsPlay.client.status === 'open' && gsPlay.client.url === {}",
                js(&r1)
            ),
        )
        .await?;

    // Both see the character (the player's join) and its class (a state change).
    for page in [&dm, &player] {
        page.wait_for(
            "Aria (Ranger) in the characters table",
            "document.querySelector('#characters tbody').textContent.includes('Aria (Ranger)')",
        )
        .await?;
    }
    // A state change by each, seen by the other.
    submit(
        &player,
        "notes-form",
        &[("notes-input", "Aria scouts ahead")],
    )
    .await?;
    dm.wait_for(
        "the player's note on the DM's page",
        "document.getElementById('shared-notes').textContent === 'Aria scouts ahead'",
    )
    .await?;
    submit(&dm, "notes-form", &[("notes-input", "A goblin appears")]).await?;
    player
        .wait_for(
            "the DM's note on the player's page",
            "document.getElementById('shared-notes').textContent === 'A goblin appears'",
        )
        .await?;

    // The DM adds a monster and starts combat: the tracker shows on both pages.
    submit(
        &dm,
        "spawn-form",
        &[
            ("spawn-name", "Goblin"),
            ("spawn-hp", "7"),
            ("spawn-ac", "15"),
        ],
    )
    .await?;
    player
        .wait_for(
            "the goblin on the player's page",
            "document.querySelector('#characters tbody').textContent.includes('Goblin')",
        )
        .await?;
    click(&dm, "#combat-start").await?;
    for page in [&dm, &player] {
        page.wait_for(
            "the combat tracker: two creatures in order, one active",
            "document.querySelectorAll('#tracker li').length === 2 && document.querySelectorAll('#tracker li.active[aria-current=step]').length === 1 && document.getElementById('combat-summary').textContent.startsWith('Round 1')",
        )
        .await?;
    }
    // Only the DM has the DM's controls.
    ensure!(
        player
            .eval("['dm-lifecycle', 'dm-combat', 'spawn-form', 'join-link-box'].every(id => document.getElementById(id).offsetParent === null)")
            .await?
            == true,
        "the player's page shows no DM controls"
    );
    // The player declares an action on Aria's turn (the DM ends the goblin's first).
    let aria = player.eval("gsPlay.characterId").await?;
    let active = player
        .eval("gsPlay.client.view.game.play.combat.turn.character_id")
        .await?;
    if active != aria {
        click(&dm, "#end-turn").await?;
    }
    player
        .wait_for(
            "the player's action form on Aria's turn",
            "document.getElementById('actor-title').textContent === 'Your turn:' && document.getElementById('action-form').offsetParent !== null",
        )
        .await?;
    submit(
        &player,
        "action-form",
        &[
            ("action-type", "attack"),
            ("action-bonus", "6"),
            ("action-damage", "1d8+3"),
        ],
    )
    .await?;
    for page in [&dm, &player] {
        page.wait_for(
            "Aria's attack resolved",
            "gsPlay.events.some(e => e.type === 'action_resolve') && document.getElementById('log').textContent.includes(\"Aria's attack\")",
        )
        .await?;
    }
    dm.screenshot(&shots.join("browser-dm-combat.png")).await?;
    player
        .screenshot(&shots.join("browser-player-combat.png"))
        .await?;

    // Kill the router the player's page is connected to. While it is gone the player
    // sends a command and the DM (on the other router) changes the state.
    let before = player
        .eval("gsPlay.client.version")
        .await?
        .as_u64()
        .context("version")?;
    let victim = cluster
        .members
        .values()
        .find(|m| m.kind == MemberKind::Router && m.url == r1)
        .map(|m| m.id.clone())
        .context("router 1")?;
    cluster.kill(&victim).await?;
    player
        .eval(
            "window.outage = null; gsPlay.client.send('state_update', {changes: [{path: '/during_outage', value: 'sent while the router was down'}]}).then(a => window.outage = a, e => window.outage = {error: e.code}); true",
        )
        .await?;
    submit(&dm, "notes-form", &[("notes-input", "The goblin flees")]).await?;
    player
        .wait_for(
            "the player's page resumed through router 0",
            &format!(
                "gsPlay.client.status === 'open' && gsPlay.client.url === {} && gsPlay.client.stats.reconnects === 1",
                js(&r0)
            ),
        )
        .await?;
    player
        .wait_for(
            "the command sent during the outage acknowledged",
            "window.outage && window.outage.version",
        )
        .await?;
    let outage = player.eval("window.outage").await?;
    ensure!(outage.get("error").is_none(), "outage command: {outage}");
    player
        .wait_for(
            "the DM's change made during the outage",
            "document.getElementById('shared-notes').textContent === 'The goblin flees'",
        )
        .await?;
    dm.wait_for(
        "the player's outage command on the DM's page",
        "gsPlay.client.view.state.during_outage === 'sent while the router was down'",
    )
    .await?;

    // The turn moves on after the resume, seen live by both (the next living
    // creature's turn: Aria's again, in round 2, if her attack killed the goblin).
    let turn_before = player
        .eval("JSON.stringify([gsPlay.client.view.game.play.combat.round, gsPlay.client.view.game.play.combat.turn_number])")
        .await?;
    click(&dm, "#end-turn").await?;
    for page in [&dm, &player] {
        page.wait_for(
            "the next turn",
            &format!(
                "JSON.stringify([gsPlay.client.view.game.play.combat.round, gsPlay.client.view.game.play.combat.turn_number]) !== {turn_before} && document.querySelectorAll('#tracker li.active').length === 1"
            ),
        )
        .await?;
    }
    player
        .screenshot(&shots.join("browser-player-resumed.png"))
        .await?;
    player.resize(390, 844, true).await?;
    player
        .screenshot(&shots.join("browser-player-phone.png"))
        .await?;

    // Nothing lost, nothing repeated: both pages end at the same version, each saw
    // every version once and in order, the outage command took effect once.
    let dm_version = dm.eval("gsPlay.client.version").await?;
    player
        .wait_for(
            "the player at the DM's version",
            &format!("gsPlay.client.version === {dm_version}"),
        )
        .await?;
    let dm_versions = consecutive_versions(&dm).await?;
    let player_versions = consecutive_versions(&player).await?;
    ensure!(
        player_versions.contains(&before) && player_versions.contains(&(before + 1)),
        "the player's log runs through the outage ({before} → {}): {player_versions:?}",
        before + 1
    );
    ensure!(dm_versions.last() == player_versions.last());
    for page in [&dm, &player] {
        ensure!(
            updates_of(page, "/during_outage").await? == 1,
            "{}: the outage command applied exactly once",
            page.name
        );
    }
    for page in [&dm, &player] {
        let gaps = page.eval("gsPlay.client.stats.gaps").await?;
        ensure!(gaps == 0, "{}: the client repaired {gaps} gaps", page.name);
    }
    let problems = browser.problems();
    ensure!(problems.is_empty(), "page errors: {problems:?}");
    eprintln!(
        "browser test: screenshots in {}; player resumed at version {before}, both pages at {}",
        shots.display(),
        dm_versions.last().copied().unwrap_or(0)
    );
    Ok(())
}
