// Unit tests of web/gs-client.js under the Node test runner (`node --test web/test/`).
// The WebSocket is a fake injected into the client (the client's own unit test);
// the real thing is exercised against the real cluster by tests/tests/browser.rs.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  GameClient,
  GsError,
  applyEvent,
  getPointer,
  mergePatch,
  parsePointer,
  removePointer,
  setPointer,
  versionOf,
} from "../gs-client.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    FakeSocket.all.push(this);
  }
  send(s) {
    if (this.closed) throw new Error("closed");
    this.sent.push(JSON.parse(s));
  }
  close(code, reason) {
    this.closed = { code, reason };
  }
  // --- the "server" side ---
  open() {
    this.onopen && this.onopen({});
  }
  receive(msg) {
    this.onmessage && this.onmessage({ data: JSON.stringify(msg) });
  }
  drop(code = 1006, reason = "") {
    this.closed = { code, reason };
    this.onclose && this.onclose({ code, reason });
  }
  established(version, extra = {}) {
    this.open();
    this.receive({
      type: "connection_established",
      data: { session_id: "s1", player_id: "u1", connection_id: `c${FakeSocket.all.length}`, session_role: "dm", version, ...extra },
    });
  }
}

/** Timers the test runs by hand (no real waiting). */
function manualTimers() {
  let next = 1;
  const due = new Map();
  return {
    setTimeout: (fn, ms) => {
      const id = next++;
      due.set(id, { fn, ms });
      return id;
    },
    clearTimeout: (id) => due.delete(id),
    /** Runs every timer shorter than `maxMs` now due (not heartbeats/stale ones). */
    run(maxMs = 60000) {
      for (const [id, t] of [...due]) {
        if (t.ms <= maxMs) {
          due.delete(id);
          t.fn();
        }
      }
    },
    pending: () => [...due.values()].map((t) => t.ms),
  };
}

function seededRandom(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

function makeClient(extra = {}) {
  FakeSocket.all = [];
  const timers = manualTimers();
  let n = 0;
  const client = new GameClient({
    urls: ["http://r1:1", "http://r2:2"],
    sessionId: "s1",
    token: "T",
    sessionToken: "S",
    WebSocket: FakeSocket,
    fetch: null,
    newId: () => `id-${++n}`,
    random: seededRandom(7),
    setTimeout: timers.setTimeout,
    clearTimeout: timers.clearTimeout,
    ...extra,
  });
  return { client, timers, last: () => FakeSocket.all[FakeSocket.all.length - 1] };
}

const view = (version, state = {}, extra = {}) => ({
  type: "sync_response",
  id: null,
  data: { state, metadata: {}, game: { status: "created", members: {}, play: { characters: {} } }, version, timestamp: "t", ...extra },
});

// Connects `client` and brings it up to version 1 (with `state`); the open socket.
async function connected(client, last, state = {}) {
  const ready = client.connect();
  const ws = last();
  ws.established(1);
  ws.receive(view(1, state));
  await ready;
  return ws;
}

test("pointers behave as the server's (RFC 6901, objects created, '-' appends)", () => {
  assert.deepEqual(parsePointer("/a~1b/c~0d"), ["a/b", "c~d"]);
  assert.throws(() => parsePointer("a"));
  assert.throws(() => parsePointer("/a~2"));
  let doc = {};
  doc = setPointer(doc, "/characters/aria/hp", 17);
  assert.deepEqual(doc, { characters: { aria: { hp: 17 } } });
  doc = setPointer(doc, "/log", []);
  doc = setPointer(doc, "/log/-", "a");
  doc = setPointer(doc, "/log/1", "b");
  doc = setPointer(doc, "/log/0", "A");
  assert.deepEqual(doc.log, ["A", "b"]);
  assert.throws(() => setPointer(doc, "/log/5", "x"));
  assert.throws(() => setPointer(doc, "/log/01", "x"));
  assert.throws(() => setPointer({ a: [] }, "/a/0/x", 1), "missing array elements are not created");
  assert.deepEqual(setPointer({}, "/nope/0/x", 1), { nope: { 0: { x: 1 } } });
  assert.throws(() => setPointer({ a: 1 }, "/a/b", 1), "no descent into a scalar");
  assert.equal(getPointer(doc, "/characters/aria/hp"), 17);
  assert.equal(getPointer(doc, "/missing/x"), undefined);
  doc = removePointer(doc, "/log/0");
  assert.deepEqual(doc.log, ["b"]);
  assert.throws(() => removePointer(doc, "/nope"));
  assert.deepEqual(setPointer(doc, "", { fresh: true }), { fresh: true });
  doc = setPointer(doc, "/n", null);
  assert.equal(getPointer(doc, "/n"), null);
});

test("merge patches follow RFC 7386", () => {
  const t = { a: 1, b: { c: 2, d: 3 }, e: [1] };
  assert.deepEqual(mergePatch(t, { a: null, b: { c: 5, d: null }, e: [2], f: { g: 1 } }), { b: { c: 5 }, e: [2], f: { g: 1 } });
  assert.equal(mergePatch({ a: 1 }, 3), 3);
});

test("versions: numeric, the ICD's decimal string, or version_number beside it", () => {
  assert.equal(versionOf({ version: 7 }), 7);
  assert.equal(versionOf({ version: "42" }), 42);
  assert.equal(versionOf({ version: "42", version_number: 42 }), 42);
  assert.equal(versionOf({ version_number: 9, version: "x" }), 9);
  assert.equal(versionOf({}), undefined);
});

test("events apply as the server applies them", () => {
  const v = { state: {}, metadata: {}, game: { status: "created", members: {}, play: {} }, version: 1 };
  applyEvent(v, { type: "state_update", version: 2, data: { changes: [{ path: "/a/b", value: 1 }, { path: "/l", value: [] }, { path: "/l/-", value: "x" }] } });
  applyEvent(v, { type: "state_update", version: 3, data: { changes: [{ path: "/a/b", op: "remove", previous: 1 }] } });
  assert.deepEqual(v.state, { a: {}, l: ["x"] });
  applyEvent(v, { type: "state_update", version: 4, data: { changes: [{ path: "", value: { map: "cellar" } }], metadata: { by: "dm" } } });
  assert.deepEqual(v.state, { map: "cellar" });
  assert.deepEqual(v.metadata, { by: "dm" });
  applyEvent(v, { type: "player_joined", version: 5, data: { user_id: "u2", role: "player", character_id: "c2", patch: { characters: { c2: { name: "Aria", hp: 10 } } }, timestamp: "t5" } });
  assert.deepEqual(v.game.members.u2, { role: "player", characters: ["c2"], joined_at: "t5" });
  assert.equal(v.game.play.characters.c2.hp, 10);
  applyEvent(v, { type: "session_status_changed", version: 6, data: { status: "active", previous: "created" } });
  assert.equal(v.game.status, "active");
  applyEvent(v, { type: "action_resolve", version: 7, data: { patch: { characters: { c2: { hp: 4 } }, combat: { round: 1 } } } });
  assert.equal(v.game.play.characters.c2.hp, 4);
  assert.equal(v.game.play.characters.c2.name, "Aria");
  applyEvent(v, { type: "combat_ended", version: 8, data: { patch: { combat: null } } });
  assert.equal(v.game.play.combat, undefined);
  applyEvent(v, { type: "player_left", version: 9, data: { user_id: "u2" } });
  assert.equal(v.game.members.u2, undefined);
  assert.equal(v.version, 9);
});

test("connects with the tokens as query parameters and takes the server's state", async () => {
  const { client, last } = makeClient();
  const ready = client.connect();
  const ws = last();
  const u = new URL(ws.url);
  assert.equal(u.protocol, "ws:");
  assert.equal(u.pathname, "/api/v2/sessions/s1/ws");
  assert.equal(u.searchParams.get("token"), "T");
  assert.equal(u.searchParams.get("session_token"), "S");
  assert.equal(u.searchParams.get("last_version"), null);
  ws.established(3);
  ws.receive(view("3", { hello: "world" }, { version_number: 3 }));
  const v = await ready;
  assert.equal(v.state.hello, "world");
  assert.equal(client.version, 3);
  assert.equal(client.status, "open");
  assert.equal(client.role, "dm");
});

test("send resolves on the ack and rejects on the error reply", async () => {
  const { client, last } = makeClient();
  const ws = await connected(client, last);
  const ok = client.send("state_update", { changes: [{ path: "/x", value: 1 }] });
  const bad = client.send("combat_start", { participants: [] });
  assert.deepEqual(ws.sent.map((m) => [m.id, m.type]), [["id-1", "state_update"], ["id-2", "combat_start"]]);
  ws.receive({ type: "state_update", version: 2, data: { update_id: "id-1", changes: [{ path: "/x", value: 1 }] } });
  ws.receive({ type: "ack", id: "id-1", data: { version: 2 } });
  ws.receive({ type: "error", id: "id-2", error: { code: "invalid_payload", message: "empty", details: { field: "participants" } } });
  assert.deepEqual(await ok, { version: 2 });
  await assert.rejects(bad, (e) => e instanceof GsError && e.code === "invalid_payload" && e.details.field === "participants");
  assert.equal(client.state.x, 1);
  assert.equal(client.pendingCount, 0);
});

test("a drop resumes on the next router with last_version and resends unanswered commands under the same id", async () => {
  const { client, timers, last } = makeClient();
  const statuses = [];
  client.on("status", (d) => statuses.push(d.status));
  const seen = [];
  client.on("event", (e) => seen.push(e.version));
  let ws = await connected(client, last);
  const answered = client.send("state_update", { changes: [{ path: "/a", value: 1 }] });
  const lost = client.send("state_update", { changes: [{ path: "/b", value: 2 }] });
  ws.receive({ type: "state_update", version: 2, data: { changes: [{ path: "/a", value: 1 }] } });
  ws.receive({ type: "ack", id: "id-1", data: { version: 2 } });
  await answered;
  ws.drop(1006);
  assert.equal(client.status, "reconnecting");
  timers.run(10000);
  ws = last();
  assert.equal(FakeSocket.all.length, 2);
  const u = new URL(ws.url);
  assert.equal(u.host, "r2:2", "round-robin to the other router");
  assert.equal(u.searchParams.get("last_version"), "2");
  ws.established(3);
  assert.deepEqual(ws.sent.filter((m) => m.type !== "heartbeat").map((m) => m.id), ["id-2"], "the unanswered command, same id");
  // The first copy had been applied: its event is replayed, a repeat is dropped, the ack is the original.
  ws.receive({ type: "state_update", version: 3, data: { changes: [{ path: "/b", value: 2 }] } });
  ws.receive({ type: "state_update", version: 3, data: { changes: [{ path: "/b", value: 2 }] } });
  ws.receive({ type: "state_update", version: 2, data: { changes: [{ path: "/a", value: 1 }] } });
  ws.receive({ type: "ack", id: "id-2", data: { version: 3 } });
  assert.deepEqual(await lost, { version: 3 });
  assert.deepEqual(seen, [2, 3]);
  assert.equal(client.stats.duplicates, 2);
  assert.equal(client.stats.reconnects, 1);
  assert.equal(client.stats.resent, 1);
  assert.deepEqual(client.state, { a: 1, b: 2 });
  assert.deepEqual(statuses, ["connecting", "open", "reconnecting", "reconnecting", "open"]);
});

test("backoff grows, stays bounded and keeps rotating the routers", () => {
  const { client, timers, last } = makeClient({ backoff: { initialMs: 100, maxMs: 1000 } });
  client.connect();
  const hosts = [];
  const delays = [];
  client.on("status", (d) => d.delayMs !== undefined && delays.push(d.delayMs));
  for (let i = 0; i < 8; i++) {
    hosts.push(new URL(last().url).host);
    last().drop(1006);
    timers.run(10000);
  }
  assert.deepEqual(hosts, ["r1:1", "r2:2", "r1:1", "r2:2", "r1:1", "r2:2", "r1:1", "r2:2"]);
  assert.equal(delays[0], 0, "the first retry goes to the other router at once");
  for (const d of delays) assert.ok(d <= 1000, `delay ${d} bounded`);
  assert.ok(delays[6] >= 500, "grown to the cap's upper half");
  assert.equal(client.status, "reconnecting");
});

test("a fatal close (4401/4403/4404) stops: no reconnect, pending commands rejected", async () => {
  for (const [code, err] of [[4401, "invalid_token"], [4403, "not_member"], [4404, "session_not_found"]]) {
    const { client, timers, last } = makeClient();
    const ready = client.connect();
    const pending = client.send("heartbeat");
    const ws = last();
    ws.open();
    ws.receive({ type: "connection_error", error: { code: err, message: "no" } });
    ws.drop(code);
    timers.run();
    await assert.rejects(ready, (e) => e.code === err);
    await assert.rejects(pending, (e) => e.code === err);
    assert.equal(client.status, "closed");
    assert.equal(FakeSocket.all.length, 1, `no reconnect after ${code}`);
  }
});

test("a retryable connection_error (4429, 4503) reconnects with backoff", async () => {
  const { client, timers, last } = makeClient();
  const ready = client.connect();
  const errors = [];
  client.on("connection_error", (e) => errors.push(e.code));
  let ws = last();
  ws.open();
  ws.receive({ type: "connection_error", error: { code: "rate_limited", message: "slow down" } });
  ws.drop(4429);
  timers.run(10000);
  ws = last();
  ws.open();
  ws.receive({ type: "connection_error", error: { code: "service_unavailable", message: "later" } });
  ws.drop(4503);
  timers.run(10000);
  ws = last();
  ws.established(5);
  ws.receive(view(5));
  await ready;
  assert.deepEqual(errors, ["rate_limited", "service_unavailable"]);
  assert.equal(FakeSocket.all.length, 3);
});

test("a refusal before the upgrade (browser sees 1006) is explained by a REST probe", async () => {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push([url, init.headers.Authorization]);
    return { status: 401, json: async () => ({ error: { code: "invalid_token", message: "bad signature" } }) };
  };
  const { client, last } = makeClient({ fetch });
  const ready = client.connect();
  last().drop(1006);
  await assert.rejects(ready, (e) => e.code === "invalid_token");
  assert.deepEqual(calls, [["http://r1:1/api/v2/sessions/s1/state", "Bearer T"]]);
  assert.equal(client.status, "closed");
  assert.equal(FakeSocket.all.length, 1);
});

test("a 1006 whose probe finds nothing wrong (router down) is retried elsewhere", async () => {
  const fetch = async () => {
    throw new Error("connection refused");
  };
  const { client, timers, last } = makeClient({ fetch });
  client.connect();
  last().drop(1006);
  await new Promise((r) => setImmediate(r));
  timers.run(10000);
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(new URL(last().url).host, "r2:2");
});

test("the end of the session closes the client for good", async () => {
  const { client, last } = makeClient();
  const ws = await connected(client, last);
  ws.receive({ type: "session_status_changed", version: 2, data: { status: "ended", previous: "created" } });
  ws.drop(1000);
  assert.equal(client.status, "ended");
  assert.equal(FakeSocket.all.length, 1);
  await assert.rejects(client.send("heartbeat"), (e) => e.code === "session_ended");
});

test("a gap asks for the state again; a full sync_response replaces the view", async () => {
  const { client, last } = makeClient();
  const ws = await connected(client, last, { old: true });
  ws.receive({ type: "state_update", version: 5, data: { changes: [{ path: "/x", value: 1 }] } });
  const req = ws.sent.find((m) => m.type === "sync_request");
  assert.ok(req, "sync_request sent");
  ws.receive({ ...view(5, { fresh: true }), id: req.id });
  ws.receive({ type: "ack", id: req.id, data: { version: 5 } });
  assert.equal(client.version, 5);
  assert.deepEqual(client.state, { fresh: true });
  assert.equal(client.stats.gaps, 1);
});

test("service_unavailable with outcome unknown is asked again under the same id", async () => {
  const { client, timers, last } = makeClient();
  const ws = await connected(client, last);
  const p = client.send("end_turn", {});
  ws.receive({ type: "error", id: "id-1", error: { code: "service_unavailable", message: "owner moving", details: { outcome: "unknown" } } });
  timers.run(10000);
  assert.deepEqual(ws.sent.filter((m) => m.type === "end_turn").map((m) => m.id), ["id-1", "id-1"]);
  ws.receive({ type: "ack", id: "id-1", data: { version: 2 } });
  assert.deepEqual(await p, { version: 2 });
});

test("heartbeats go out on schedule and their acks are not reported", async () => {
  const { client, timers, last } = makeClient({ heartbeatMs: 100 });
  const ws = await connected(client, last);
  const errors = [];
  client.on("error", (e) => errors.push(e));
  timers.run(100);
  const hb = ws.sent.filter((m) => m.type === "heartbeat");
  assert.equal(hb.length, 1);
  ws.receive({ type: "ack", id: hb[0].id, data: { version: 1 } });
  assert.equal(errors.length, 0);
  assert.equal(client.pendingCount, 0);
});

test("a silent server is dropped and the client resumes elsewhere", async () => {
  const { client, timers, last } = makeClient({ staleMs: 500, heartbeatMs: 0 });
  const ws = await connected(client, last);
  timers.run(500); // the stale timer fires: reconnect scheduled (delay 0)
  timers.run(0);
  assert.equal(ws.closed.code, 4000);
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(new URL(last().url).searchParams.get("last_version"), "1");
});

test("close() stops everything and rejects what is pending", async () => {
  const { client, last } = makeClient();
  client.connect();
  const p = client.send("heartbeat");
  client.close();
  await assert.rejects(p, (e) => e.code === "closed");
  assert.equal(client.status, "closed");
  assert.ok(last().closed);
});
