// The play page: a DM creates a session and shares its join link; players join with a
// character; everyone sees the session live. Plain ES module, no build step: it uses
// only the client module (/client/gs-client.js) and the public REST API, so it is also
// the client module's example.
//
// URL: /play/?session=<id>[&routers=<url>,<url>]#token=<access token>
// The access token comes from the #token= fragment (never sent to a server by the
// browser) or the token field, and is kept in this tab's sessionStorage only.
import { GameClient, GsError } from "/client/gs-client.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TOKEN_KEY = "gs-play-token";

const page = {
  token: null,
  claims: null,
  routers: [location.origin],
  sessionId: params.get("session"),
  client: null,
  /** Versions of the events applied, in order (the log, in full). */
  versions: [],
  /** Events applied, `{version, type, update_id?, paths?}`. */
  events: [],
  joinLink: null,
  characterId: null,
};
// For tests and the curious: the page's state, the client included.
window.gsPlay = page;

// --- tokens -----------------------------------------------------------------------

function decodeClaims(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return null;
  }
}

function useToken(t) {
  const claims = decodeClaims(t);
  if (!claims || !claims.sub) {
    showError(new GsError("invalid_token", "that is not a JWT access token"));
    return false;
  }
  page.token = t;
  page.claims = claims;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("whoami").textContent = `Signed in as ${claims.sub} (role ${claims.role || "?"}).`;
  return true;
}

// --- REST (this page's own router: the API does not answer cross-origin calls) ------

async function api(method, path, body) {
  const r = await fetch(`${location.origin}${path}`, {
    method,
    headers: { Authorization: `Bearer ${page.token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = json.error || {};
    throw new GsError(e.code || `http_${r.status}`, e.message || r.statusText, e.details);
  }
  return json;
}

async function loadRouters() {
  const extra = (params.get("routers") || "").split(",").map((s) => s.trim()).filter(Boolean);
  try {
    const r = await fetch(`${location.origin}/client/routers`);
    const j = await r.json();
    extra.push(...(j.routers || []));
  } catch {
    /* this router alone, then */
  }
  for (const u of extra) if (!page.routers.includes(u)) page.routers.push(u);
}

// --- UI helpers ----------------------------------------------------------------------

function showError(e) {
  const el = $("error");
  el.textContent = e ? `${e.code || "error"}: ${e.message}` : "";
  el.hidden = !e;
}

function show(id, on) {
  $(id).hidden = !on;
}

let bannerTimer = null;
function banner(text, kind) {
  const b = $("banner");
  clearTimeout(bannerTimer);
  b.textContent = text;
  b.dataset.kind = kind || "info";
  b.hidden = !text;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) e.append(c);
  return e;
}

const short = (id) => (id ? String(id).slice(0, 8) : "?");

function play() {
  return (page.client && page.client.view && page.client.view.game.play) || {};
}

function charName(id) {
  const c = (play().characters || {})[id];
  return c && c.name ? c.name : short(id);
}

function myCharacters() {
  const g = page.client && page.client.view ? page.client.view.game : {};
  const m = (g.members || {})[page.claims.sub];
  return m ? m.characters || [] : [];
}

function isDm() {
  const c = page.client;
  return !!c && (c.role === "dm" || page.claims.role === "admin");
}

/** One line for the event log. */
function summary(ev) {
  const d = ev.data || {};
  switch (ev.type) {
    case "session_created":
      return `session created: ${d.name || ""}`;
    case "player_joined":
      return `${short(d.user_id)} joined as ${d.role}${d.character_id ? ` with ${charName(d.character_id)}` : ""}`;
    case "player_left":
      return `${short(d.user_id)} left`;
    case "session_status_changed":
      return `session: ${d.previous} → ${d.status}`;
    case "state_update":
      return `${short(d.user_id)} changed ${(d.changes || []).map((c) => c.path || "/").join(", ")}`;
    case "character_spawned":
      return `${d.name || charName(d.character_id)} entered play`;
    case "combat_started":
      return `combat started (${(d.participants || []).length} participants)`;
    case "initiative_roll":
      return `${charName(d.character_id)} rolled initiative ${d.roll ?? ""}`;
    case "turn_change":
      return `round ${d.round ?? "?"}: ${charName(d.active_character)}'s turn${d.surprised ? " (surprised)" : ""}`;
    case "action_declare":
      return `${charName(d.character_id)} declares ${d.action_type}${(d.targets || []).length ? ` on ${d.targets.map(charName).join(", ")}` : ""}`;
    case "action_resolve":
      return `${charName(d.character_id)}'s ${d.action_type || "action"}: ${(d.outcomes || [])
        .map((o) => `${charName(o.target_id)} ${(o.effects || []).join("/")}${o.damage && o.damage.total ? `, ${o.damage.total} damage` : ""}`)
        .join("; ")}`;
    case "combat_ended":
      return "combat ended";
    default:
      return ev.type.replace(/_/g, " ");
  }
}

// --- rendering -----------------------------------------------------------------------

function render() {
  const c = page.client;
  if (!c || !c.view) return;
  const g = c.view.game || {};
  const p = g.play || {};
  $("session-name").textContent = g.name ? `— ${g.name}` : "";
  $("session-status").textContent = g.status || "?";
  $("session-version").textContent = String(c.version);
  $("session-role").textContent = `${c.role || "?"} (${short(page.claims.sub)})`;
  $("session-router").textContent = c.url || "–";
  const dm = isDm();
  show("join-link-box", dm && !!page.joinLink);
  show("dm-lifecycle", dm);
  show("dm-combat", dm);
  show("spawn-form", dm);
  $("join-link").value = page.joinLink || "";

  // Presence: the members, their roles and characters.
  const ul = $("presence");
  ul.replaceChildren();
  for (const [uid, m] of Object.entries(g.members || {})) {
    const me = uid === page.claims.sub;
    const names = (m.characters || []).map(charName).join(", ");
    ul.append(
      el("li", { class: me ? "me" : "" },
        el("span", { class: `role role-${m.role}`, text: m.role }),
        ` ${short(uid)}${me ? " (you, " + c.status + ")" : ""}${names ? " — " + names : ""}`),
    );
  }

  // Characters.
  const tbody = $("characters").querySelector("tbody");
  tbody.replaceChildren();
  for (const [id, ch] of Object.entries(p.characters || {})) {
    const cls = ((c.view.state.party || {})[id] || {}).class;
    tbody.append(
      el("tr", { "data-character": id },
        el("th", { scope: "row", text: `${ch.name || short(id)}${cls ? ` (${cls})` : ""}` }),
        el("td", { text: `${ch.hp ?? "?"}/${ch.max_hp ?? "?"}${ch.temp_hp ? ` +${ch.temp_hp}` : ""}` }),
        el("td", { text: String(ch.ac ?? "?") }),
        el("td", { text: (ch.conditions || []).join(", ") || "—" })),
    );
  }

  // Combat tracker.
  const combat = p.combat;
  const tracker = $("tracker");
  tracker.replaceChildren();
  $("combat-card").dataset.active = combat ? "true" : "false";
  if (!combat) {
    $("combat-summary").textContent = "No combat.";
  } else {
    const active = combat.turn && combat.turn.character_id;
    $("combat-summary").textContent = combat.order && combat.order.length
      ? `Round ${combat.round}, ${charName(active)}'s turn.`
      : "Rolling initiative…";
    const ids = combat.order && combat.order.length ? combat.order : Object.keys(combat.participants || {});
    for (const id of ids) {
      const ch = (p.characters || {})[id] || {};
      const part = (combat.participants || {})[id] || {};
      const init = part.initiative && part.initiative.total;
      const li = el("li", { class: id === active ? "active" : "", "data-character": id, "aria-current": id === active ? "step" : false },
        el("span", { class: "init", text: init === undefined ? "–" : String(init), title: "initiative" }),
        el("span", { class: "who", text: `${id === active ? "▶ " : ""}${ch.name || short(id)}` }),
        el("span", { class: "hp", text: `HP ${ch.hp ?? "?"}/${ch.max_hp ?? "?"}` }),
        el("span", { class: "conds", text: (ch.conditions || []).join(", ") }));
      tracker.append(li);
    }
  }

  // The action form: for the active creature's controller (or the DM).
  const active = combat && combat.turn && combat.turn.character_id;
  const mine = active && (dm || myCharacters().includes(active));
  show("action-form", !!mine);
  if (mine) {
    $("actor-title").textContent = myCharacters().includes(active) ? "Your turn:" : "Acting for";
    $("actor-name").textContent = charName(active);
    const sel = $("action-target");
    const keep = sel.value;
    sel.replaceChildren();
    for (const id of combat.order || []) {
      if (id !== active) sel.append(el("option", { value: id, text: charName(id) }));
    }
    if (keep) sel.value = keep;
  }

  // Shared notes and the document.
  $("shared-notes").textContent = typeof c.view.state.notes === "string" ? c.view.state.notes : "(none yet)";
  $("state-json").textContent = JSON.stringify(c.view.state, null, 2);
}

function appendLog(ev) {
  const log = $("log");
  log.append(el("li", { "data-version": String(ev.version) },
    el("span", { class: "v", text: `v${ev.version}` }), ` ${summary(ev)}`));
  while (log.children.length > 200) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
}

// --- the connection ----------------------------------------------------------------------

async function start(sessionId, connectionToken) {
  page.sessionId = sessionId;
  const url = new URL(location.href);
  url.searchParams.set("session", sessionId);
  url.hash = "";
  history.replaceState(null, "", url);
  const client = new GameClient({
    urls: page.routers,
    sessionId,
    token: page.token,
    sessionToken: connectionToken,
    backoff: { initialMs: 200, maxMs: 4000 },
  });
  page.client = client;
  client.on("status", (d) => {
    $("conn-status").textContent = d.status;
    $("conn-status").dataset.status = d.status;
    if (d.status === "reconnecting") {
      banner(`Connection lost${d.code ? ` (${d.code})` : ""} — reconnecting${d.next ? ` via ${d.next}` : ""}…`, "warn");
    } else if (d.status === "open" && d.resumed) {
      banner(`Reconnected via ${d.url}.`, "ok");
      bannerTimer = setTimeout(() => banner(""), 4000);
    } else if (d.status === "open") {
      banner("");
    } else if (d.status === "closed" || d.status === "ended") {
      banner(d.status === "ended" ? "The session has ended." : `Disconnected: ${d.error ? d.error.message : "closed"}`, "error");
    }
    render();
  });
  client.on("event", (ev) => {
    page.versions.push(ev.version);
    const d = ev.data || {};
    page.events.push({
      version: ev.version,
      type: ev.type,
      update_id: d.update_id,
      paths: ev.type === "state_update" ? (d.changes || []).map((c) => c.path) : undefined,
    });
    appendLog(ev);
  });
  client.on("sync", () => render());
  client.on("state", () => render());
  client.on("error", (e) => showError(e));
  client.on("connection_error", (e) => showError(e));
  show("token-panel", false);
  show("create-panel", false);
  show("join-panel", false);
  show("table", true);
  await client.connect();
  render();
}

/** Sends a command; shows its error, if any. */
async function command(type, data) {
  try {
    const ack = await page.client.send(type, data);
    showError(null);
    return ack;
  } catch (e) {
    showError(e);
    return null;
  }
}

// --- flows -----------------------------------------------------------------------------

async function createSession(name) {
  const created = await api("POST", "/api/v2/sessions", {
    campaign_id: crypto.randomUUID(),
    name,
  });
  page.joinLink = `${location.origin}/play/?session=${created.session_id}`;
  await start(created.session_id, created.connection_token);
}

async function joinSession() {
  const role = $("join-role").value;
  const body = {};
  let party = null;
  if (role === "observer") body.role = "observer";
  if (role === "player") {
    page.characterId = crypto.randomUUID();
    body.character_id = page.characterId;
    body.character = {
      name: $("char-name").value.trim(),
      max_hp: Number($("char-hp").value),
      ac: Number($("char-ac").value),
      abilities: { dex: Number($("char-dex").value) || 0 },
      speed: Number($("char-speed").value) || 30,
    };
    party = { name: body.character.name, class: $("char-class").value, player: page.claims.sub };
  }
  const joined = await api("POST", `/api/v2/sessions/${page.sessionId}/join`, body);
  if (joined.session_role === "dm") page.joinLink = `${location.origin}/play/?session=${page.sessionId}`;
  await start(page.sessionId, joined.connection_token);
  if (party) {
    // The class is not a rules field: it goes into the shared state document.
    await command("state_update", { changes: [{ path: `/party/${page.characterId}`, value: party }] });
  }
}

function wire() {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (useToken($("token-input").value.trim())) route();
  });
  $("create-form").addEventListener("submit", (e) => {
    e.preventDefault();
    createSession($("create-name").value.trim()).catch(showError);
  });
  $("open-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("open-id").value.trim();
    if (!id) return;
    page.sessionId = id;
    route();
  });
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("join-button").disabled = true;
    joinSession()
      .catch(showError)
      .finally(() => ($("join-button").disabled = false));
  });
  $("copy-link").addEventListener("click", () => {
    $("join-link").select();
    navigator.clipboard && navigator.clipboard.writeText($("join-link").value).catch(() => {});
  });
  for (const b of document.querySelectorAll("button[data-cmd]")) {
    b.addEventListener("click", () => command(b.dataset.cmd, {}));
  }
  $("combat-start").addEventListener("click", () => {
    const chars = play().characters || {};
    const participants = Object.keys(chars).filter((id) => !(chars[id].conditions || []).includes("dead"));
    command("combat_start", { participants });
  });
  $("end-turn").addEventListener("click", () => command("end_turn", {}));
  $("action-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const combat = play().combat;
    if (!combat || !combat.turn) return;
    const type = $("action-type").value;
    const data = { character_id: combat.turn.character_id, action_type: type, details: {} };
    if (type === "attack") {
      data.targets = [$("action-target").value];
      data.details = {
        name: "weapon",
        attack_bonus: Number($("action-bonus").value) || 0,
        damage: $("action-damage").value.trim(),
        damage_type: "slashing",
      };
    }
    command("action_declare", data);
  });
  $("spawn-form").addEventListener("submit", (e) => {
    e.preventDefault();
    command("spawn_character", {
      character_id: crypto.randomUUID(),
      sheet: { name: $("spawn-name").value.trim(), max_hp: Number($("spawn-hp").value), ac: Number($("spawn-ac").value) },
    });
  });
  $("notes-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("notes-input").value;
    command("state_update", { changes: [{ path: "/notes", value }] }).then((ack) => {
      if (ack) $("notes-input").value = "";
    });
  });
}

/** Which panel: token, then create (no session) or join (a session). */
function route() {
  show("token-panel", !page.token);
  if (!page.token) return;
  show("create-panel", !page.sessionId);
  show("join-panel", !!page.sessionId);
  if (page.sessionId && (page.claims.role === "dm" || page.claims.role === "admin")) {
    // A DM's token: most likely the session's DM coming back.
    $("join-role").value = "none";
  }
}

async function main() {
  wire();
  const frag = new URLSearchParams(location.hash.slice(1));
  const t = frag.get("token") || sessionStorage.getItem(TOKEN_KEY);
  if (frag.get("token")) history.replaceState(null, "", location.pathname + location.search);
  if (t) useToken(t);
  await loadRouters();
  route();
  document.body.dataset.ready = "true";
}

main().catch(showError);
