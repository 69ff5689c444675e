// gs-client.js: the Game Session Service's browser client (a dependency-free ES module).
//
// Served by every router at /client/gs-client.js (types: /client/gs-client.d.ts).
// Protocol: docs/protocol.md ("WebSocket", "Connecting and resuming", "Browser client").
//
//   import { GameClient } from "/client/gs-client.js";
//   const client = new GameClient({ urls: [location.origin], sessionId, token, sessionToken });
//   client.addEventListener("event", (e) => console.log(e.detail.type, e.detail.version));
//   await client.connect();
//   const { version } = await client.send("state_update", { changes: [{ path: "/x", value: 1 }] });
//
// What it does for its user:
// * connects with the tokens as query parameters (browsers cannot set headers);
// * gives every command an id, resolves send() on its ack, rejects on its error;
// * keeps the session view (state document, metadata, game) current: state_update
//   changes applied by JSON Pointer exactly as the server applies them, play events'
//   merge patches, roster and status events; on a sync it takes the server's view;
// * after a drop, reconnects round-robin over its router URLs with backoff, resumes
//   with ?last_version=, resends unanswered commands under the same ids (the server
//   applies each id once), and drops repeated events; events reach listeners exactly
//   once, in version order;
// * stops for good on a fatal refusal (4401/4403/4404 close codes, or, with routers
//   that still refuse before the upgrade, a REST probe answering 401/403/404).

/** Close codes after which reconnecting cannot help. */
export const FATAL_CLOSE_CODES = Object.freeze([4401, 4403, 4404]);
/** connection_error / REST error codes after which reconnecting cannot help. */
export const FATAL_ERROR_CODES = Object.freeze([
  "missing_token",
  "invalid_token",
  "token_expired",
  "wrong_session",
  "wrong_user",
  "not_member",
  "forbidden",
  "session_not_found",
  "bad_request",
]);

/** An error answer (`{"type":"error"}`, `connection_error`, or a REST error). */
export class GsError extends Error {
  constructor(code, message, details, id) {
    super(`${code}: ${message || code}`);
    this.name = "GsError";
    this.code = code;
    this.details = details || {};
    this.id = id ?? null;
  }
}

/** The version of a view, sync_response or connection_established: prefers the
 * numeric `version_number`, else `version` (a number, or the ICD's decimal string). */
export function versionOf(obj) {
  if (!obj || typeof obj !== "object") return undefined;
  if (typeof obj.version_number === "number") return obj.version_number;
  if (obj.version === undefined || obj.version === null) return undefined;
  const n = Number(obj.version);
  return Number.isFinite(n) ? n : undefined;
}

// --- JSON Pointer (RFC 6901), as node/rules/src/pointer.rs -------------------------

/** Splits a pointer into unescaped tokens; throws on a malformed one. */
export function parsePointer(path) {
  if (path === "") return [];
  if (typeof path !== "string" || path[0] !== "/") {
    throw new Error(`invalid JSON Pointer ${JSON.stringify(path)}`);
  }
  return path
    .slice(1)
    .split("/")
    .map((raw) => {
      if (/~[^01]|~$/.test(raw)) throw new Error(`invalid escape in ${JSON.stringify(path)}`);
      return raw.replace(/~1/g, "/").replace(/~0/g, "~");
    });
}

function arrayIndex(token) {
  if (token === "-") return null;
  if (!/^(0|[1-9][0-9]*)$/.test(token)) throw new Error(`${JSON.stringify(token)} is not an array index`);
  return Number(token);
}

function isObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

/** The value at `path`, or undefined. */
export function getPointer(doc, path) {
  let cur = doc;
  for (const t of parsePointer(path)) {
    if (isObject(cur)) {
      if (!Object.prototype.hasOwnProperty.call(cur, t)) return undefined;
      cur = cur[t];
    } else if (Array.isArray(cur)) {
      const i = arrayIndex(t);
      if (i === null || i >= cur.length) return undefined;
      cur = cur[i];
    } else return undefined;
  }
  return cur;
}

/** Sets `path` to `value` in `doc` (mutating it) and returns the document: missing
 * intermediate objects are created, `-` appends, `""` replaces the whole document. */
export function setPointer(doc, path, value) {
  const tokens = parsePointer(path);
  if (tokens.length === 0) return value;
  let cur = doc;
  for (const t of tokens.slice(0, -1)) {
    if (isObject(cur)) {
      if (!Object.prototype.hasOwnProperty.call(cur, t)) cur[t] = {};
      cur = cur[t];
    } else if (Array.isArray(cur)) {
      const i = arrayIndex(t);
      if (i === null || i >= cur.length) throw new Error(`no array element ${t} in ${path}`);
      cur = cur[i];
    } else throw new Error(`cannot descend into a scalar in ${path}`);
  }
  const last = tokens[tokens.length - 1];
  if (isObject(cur)) cur[last] = value;
  else if (Array.isArray(cur)) {
    const i = arrayIndex(last);
    if (i === null || i === cur.length) cur.push(value);
    else if (i < cur.length) cur[i] = value;
    else throw new Error(`index ${i} is past the end in ${path}`);
  } else throw new Error(`the parent of ${path} is not an object or array`);
  return doc;
}

/** Removes the value at `path` (which must exist) and returns the document. */
export function removePointer(doc, path) {
  const tokens = parsePointer(path);
  if (tokens.length === 0) throw new Error("the document root cannot be removed");
  let cur = doc;
  for (const t of tokens.slice(0, -1)) {
    if (isObject(cur) && Object.prototype.hasOwnProperty.call(cur, t)) cur = cur[t];
    else if (Array.isArray(cur)) {
      const i = arrayIndex(t);
      if (i === null || i >= cur.length) throw new Error(`no array element ${t} in ${path}`);
      cur = cur[i];
    } else throw new Error(`no member ${t} in ${path}`);
  }
  const last = tokens[tokens.length - 1];
  if (isObject(cur) && Object.prototype.hasOwnProperty.call(cur, last)) delete cur[last];
  else if (Array.isArray(cur)) {
    const i = arrayIndex(last);
    if (i === null || i >= cur.length) throw new Error(`no array element ${last} in ${path}`);
    cur.splice(i, 1);
  } else throw new Error(`no member ${last} in ${path}`);
  return doc;
}

/** JSON merge patch (RFC 7386): returns the patched value (`target` may be mutated). */
export function mergePatch(target, patch) {
  if (!isObject(patch)) return clone(patch);
  const out = isObject(target) ? target : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

function clone(v) {
  return v === undefined ? undefined : JSON.parse(JSON.stringify(v));
}

/** Applies one session event to a view `{state, metadata, game}` (mutating it), the
 * way the server's rules apply it. */
export function applyEvent(view, msg) {
  const d = msg.data || {};
  view.game = view.game || {};
  switch (msg.type) {
    case "state_update": {
      let doc = view.state || {};
      for (const c of d.changes || []) {
        if (c.op === "remove") doc = removePointer(doc, c.path);
        else if (Object.prototype.hasOwnProperty.call(c, "value")) doc = setPointer(doc, c.path, clone(c.value));
      }
      view.state = doc;
      if (d.metadata !== undefined && d.metadata !== null) view.metadata = clone(d.metadata);
      break;
    }
    case "state_restored":
      view.state = clone(d.doc) || {};
      view.metadata = clone(d.metadata) || {};
      break;
    case "player_joined": {
      const members = (view.game.members = view.game.members || {});
      const m = members[d.user_id] || { role: d.role, characters: [], joined_at: d.timestamp };
      if (d.character_id && !m.characters.includes(d.character_id)) m.characters.push(d.character_id);
      members[d.user_id] = m;
      break;
    }
    case "player_left":
      if (view.game.members) delete view.game.members[d.user_id];
      break;
    case "session_status_changed":
      view.game.status = d.status;
      break;
    default:
      break;
  }
  if (d.patch !== undefined && d.patch !== null) {
    view.game.play = mergePatch(view.game.play || {}, d.patch);
  }
  view.version = msg.version;
  if (d.timestamp) view.timestamp = d.timestamp;
  return view;
}

// --- the client --------------------------------------------------------------------

function wsBase(url) {
  return String(url)
    .replace(/\/+$/, "")
    .replace(/^https:/, "wss:")
    .replace(/^http:/, "ws:");
}

function httpBase(url) {
  return wsBase(url)
    .replace(/\/api\/v2\/sessions\/[^/]+\/ws$/, "")
    .replace(/^wss:/, "https:")
    .replace(/^ws:/, "http:");
}

function defaultId() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
    return globalThis.crypto.randomUUID();
  }
  // RFC 4122 v4 from Math.random (only where crypto.randomUUID is missing).
  return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, (c) => {
    const r = (Math.random() * 16) | 0;
    return (c === "x" ? r : (r & 0x3) | 0x8).toString(16);
  });
}

/**
 * A connection to one game session through any of the routers in `urls`.
 * Events (EventTarget, or `on(type, fn)`): `status`, `event`, `state`, `sync`,
 * `connection_error`, `error`, `message`. See gs-client.d.ts.
 */
export class GameClient extends EventTarget {
  constructor(opts) {
    super();
    if (!opts || !opts.sessionId) throw new TypeError("sessionId is required");
    const urls = (opts.urls && opts.urls.length ? opts.urls : [opts.url]).filter(Boolean);
    if (!urls.length) throw new TypeError("at least one router URL is required");
    this.urls = urls.map(String);
    this.sessionId = opts.sessionId;
    this.token = opts.token;
    this.sessionToken = opts.sessionToken;
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    this.fetch = opts.fetch === undefined ? globalThis.fetch : opts.fetch;
    this.newId = opts.newId || defaultId;
    this.random = opts.random || Math.random;
    this.setTimeout = opts.setTimeout || globalThis.setTimeout.bind(globalThis);
    this.clearTimeout = opts.clearTimeout || globalThis.clearTimeout.bind(globalThis);
    this.backoff = { initialMs: 250, maxMs: 8000, ...(opts.backoff || {}) };
    this.heartbeatMs = opts.heartbeatMs ?? 25000;
    this.staleMs = opts.staleMs ?? 75000;
    this.retryUnknownMax = opts.retryUnknownMax ?? 5;

    /** The session view: {state, metadata, game, version, timestamp}; null before the first sync. */
    this.view = null;
    /** The version of the last event applied (0 before the first sync). */
    this.version = 0;
    /** "idle" | "connecting" | "open" | "reconnecting" | "closed" | "ended" */
    this.status = "idle";
    /** Why the client stopped (a GsError), when status is "closed". */
    this.fatal = null;
    /** Counters: reconnects, duplicates dropped, gaps repaired, commands resent. */
    this.stats = { connects: 0, reconnects: 0, duplicates: 0, gaps: 0, resent: 0 };
    /** The router URL of the current (or last) connection. */
    this.url = null;
    this.connectionId = null;
    this.role = null;
    this.userId = null;

    this._urlIndex = opts.startIndex ? opts.startIndex % this.urls.length : 0;
    this._ws = null;
    this._attempt = 0;
    this._pending = new Map(); // id -> {type, data, resolve, reject, unknownRetries}
    this._quiet = new Set(); // ids of our heartbeats: their acks are not news
    this._timer = null;
    this._hbTimer = null;
    this._staleTimer = null;
    this._established = false;
    this._ready = null;
    this._closing = false;
  }

  /** Subscribes `fn(detail, event)` to `type`; returns the unsubscribe function. */
  on(type, fn) {
    const h = (e) => fn(e.detail, e);
    this.addEventListener(type, h);
    return () => this.removeEventListener(type, h);
  }

  /** The state document (what state_update edits). */
  get state() {
    return this.view ? this.view.state : undefined;
  }

  /** Connects; resolves once the session's state is in (sync or resume), rejects on a
   * fatal refusal. Later drops reconnect by themselves. */
  connect() {
    if (this.status === "closed" || this.status === "ended") {
      this.fatal = null;
      this._closing = false;
    }
    if (!this._ready) {
      let resolve, reject;
      const p = new Promise((res, rej) => {
        resolve = res;
        reject = rej;
      });
      p.catch(() => {});
      this._ready = { promise: p, resolve, reject };
    }
    if (!this._ws && !this._timer) this._open();
    return this._ready.promise;
  }

  /** Replaces the tokens used for the next connection (e.g. a fresh connection token
   * from POST …/join), without dropping the current one. */
  setTokens({ token, sessionToken }) {
    if (token) this.token = token;
    if (sessionToken) this.sessionToken = sessionToken;
  }

  /** Sends a command; resolves with the ack's data (`{version}`), rejects with a
   * GsError. Unanswered commands are sent again, under the same id, after a
   * reconnection. `opts.id` fixes the id (it must be unique per command). */
  send(type, data = {}, opts = {}) {
    if (this.status === "closed" || this.status === "ended") {
      return Promise.reject(this.fatal || new GsError("closed", "the client is closed"));
    }
    const id = opts.id || this.newId();
    return new Promise((resolve, reject) => {
      this._pending.set(id, { type, data, resolve, reject, unknownRetries: 0 });
      if (this._established) this._transmit(id);
    });
  }

  /** Number of commands awaiting their answer. */
  get pendingCount() {
    return this._pending.size;
  }

  /** Asks for the full state again (sync_request); resolves after the ack. */
  sync() {
    return this.send("sync_request", {});
  }

  /** Closes for good (no reconnect); pending commands are rejected. */
  close() {
    this._closing = true;
    this._stop(new GsError("closed", "closed by the application"), "closed");
  }

  // --- internals ---

  _setStatus(status, extra = {}) {
    this.status = status;
    this._emit("status", { status, url: this.url, attempt: this._attempt, ...extra });
  }

  _emit(type, detail) {
    let ev;
    if (typeof CustomEvent === "function") ev = new CustomEvent(type, { detail });
    else {
      // Node 18 has EventTarget and Event, but no global CustomEvent.
      ev = new Event(type);
      Object.defineProperty(ev, "detail", { value: detail });
    }
    this.dispatchEvent(ev);
  }

  _wsUrl(base) {
    const b = wsBase(base);
    const root = /\/ws$/.test(b) ? b : `${b}/api/v2/sessions/${encodeURIComponent(this.sessionId)}/ws`;
    const q = new URLSearchParams();
    if (this.token) q.set("token", this.token);
    if (this.sessionToken) q.set("session_token", this.sessionToken);
    if (this.view) q.set("last_version", String(this.version));
    return `${root}?${q.toString()}`;
  }

  _open() {
    this._timer = null;
    const base = this.urls[this._urlIndex];
    this.url = base;
    this._established = false;
    this._closeInfo = null;
    this._setStatus(this.stats.connects === 0 && this._attempt === 0 ? "connecting" : "reconnecting");
    let ws;
    try {
      ws = new this.WebSocket(this._wsUrl(base));
    } catch (e) {
      this._scheduleReconnect({ code: 0, reason: String(e) });
      return;
    }
    this._ws = ws;
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._bumpStale();
      let msg;
      try {
        msg = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return;
      }
      this._onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._onClose({ code: ev.code, reason: ev.reason || "" });
    };
    ws.onerror = () => {};
    ws.onopen = () => {
      if (this._ws === ws) this._bumpStale();
    };
  }

  _bumpStale() {
    if (this._staleTimer) this.clearTimeout(this._staleTimer);
    this._staleTimer = null;
    if (this.staleMs > 0) {
      const ws = this._ws;
      this._staleTimer = this.setTimeout(() => {
        // Nothing heard for too long (the server's heartbeat comes every 30 s): drop
        // this socket and resume elsewhere.
        if (this._ws === ws && ws) {
          this._onClose({ code: 4000, reason: "no traffic from the server" });
          try {
            ws.close(4000, "stale");
          } catch {
            /* already closed */
          }
        }
      }, this.staleMs);
    }
  }

  _clearTimers() {
    for (const t of ["_hbTimer", "_staleTimer", "_timer"]) {
      if (this[t]) this.clearTimeout(this[t]);
      this[t] = null;
    }
  }

  _transmit(id) {
    const p = this._pending.get(id);
    if (!p || !this._ws) return;
    try {
      this._ws.send(JSON.stringify({ id, type: p.type, data: p.data }));
    } catch {
      /* the close handler resends it */
    }
  }

  _heartbeat() {
    this._hbTimer = null;
    if (!this._established || !this._ws) return;
    const id = this.newId();
    this._quiet.add(id);
    try {
      this._ws.send(JSON.stringify({ id, type: "heartbeat", data: {} }));
    } catch {
      /* closing */
    }
    if (this.heartbeatMs > 0) this._hbTimer = this.setTimeout(() => this._heartbeat(), this.heartbeatMs);
  }

  _onMessage(msg) {
    this._emit("message", msg);
    switch (msg.type) {
      case "connection_established": {
        const d = msg.data || {};
        const resumed = this.stats.connects > 0;
        this._established = true;
        this.stats.connects += 1;
        if (resumed) this.stats.reconnects += 1;
        this._attempt = 0;
        this.connectionId = d.connection_id ?? null;
        this.role = d.session_role ?? null;
        this.userId = d.player_id ?? null;
        this._setStatus("open", { resumed, version: versionOf(d) });
        // Unanswered commands go again, in the order they were made, under their ids.
        for (const id of this._pending.keys()) {
          if (resumed) this.stats.resent += 1;
          this._transmit(id);
        }
        if (this.heartbeatMs > 0) {
          if (this._hbTimer) this.clearTimeout(this._hbTimer);
          this._hbTimer = this.setTimeout(() => this._heartbeat(), this.heartbeatMs);
        }
        // A resume (with last_version) brings only the missed events: ready now.
        if (this.view) this._resolveReady();
        break;
      }
      case "sync_response": {
        const d = msg.data || {};
        // A sync with paths answers a partial read; it does not replace the view.
        const pending = msg.id ? this._pending.get(msg.id) : null;
        const partial = pending && pending.data && Array.isArray(pending.data.paths) && pending.data.paths.length > 0;
        if (!partial) {
          const version = versionOf(d);
          this.view = {
            state: d.state || {},
            metadata: d.metadata || {},
            game: d.game || {},
            version,
            timestamp: d.timestamp,
          };
          this.version = version;
          this._emit("sync", { version, view: this.view });
          this._emit("state", { version, view: this.view, cause: "sync" });
          this._resolveReady();
        }
        break;
      }
      case "ack": {
        if (this._quiet.delete(msg.id)) break;
        const p = this._pending.get(msg.id);
        if (p) {
          this._pending.delete(msg.id);
          p.resolve(msg.data || {});
        }
        break;
      }
      case "error": {
        const e = msg.error || {};
        const err = new GsError(e.code, e.message, e.details, msg.id);
        if (this._quiet.delete(msg.id)) break;
        const p = msg.id ? this._pending.get(msg.id) : null;
        if (!p) {
          this._emit("error", err);
          break;
        }
        if (e.code === "service_unavailable" && err.details.outcome === "unknown" && p.unknownRetries < this.retryUnknownMax) {
          // It may have taken effect: asking again under the same id tells.
          p.unknownRetries += 1;
          this.setTimeout(() => this._established && this._transmit(msg.id), this._delay(p.unknownRetries));
          break;
        }
        this._pending.delete(msg.id);
        p.reject(err);
        break;
      }
      case "connection_error": {
        const e = msg.error || {};
        this._closeInfo = new GsError(e.code, e.message, e.details);
        this._emit("connection_error", this._closeInfo);
        break;
      }
      case "heartbeat":
        break;
      default:
        if (typeof msg.version === "number") this._onEvent(msg);
        break;
    }
  }

  _onEvent(msg) {
    if (!this.view) return; // before the first sync nothing can be applied
    if (msg.version <= this.version) {
      this.stats.duplicates += 1;
      return;
    }
    if (msg.version !== this.version + 1) {
      // The server promises no gaps; should one appear, take its state again.
      this.stats.gaps += 1;
      this.sync().catch(() => {});
      return;
    }
    try {
      applyEvent(this.view, msg);
    } catch (e) {
      this.stats.gaps += 1;
      this.version = msg.version;
      this.sync().catch(() => {});
      return;
    }
    this.version = msg.version;
    this._emit("event", msg);
    this._emit("state", { version: this.version, view: this.view, cause: msg.type, event: msg });
  }

  _resolveReady() {
    if (this._ready) {
      this._ready.resolve(this.view);
      this._ready = null;
    }
  }

  _onClose({ code, reason }) {
    const ws = this._ws;
    this._ws = null;
    const wasEstablished = this._established;
    this._established = false;
    if (this._hbTimer) this.clearTimeout(this._hbTimer);
    if (this._staleTimer) this.clearTimeout(this._staleTimer);
    this._hbTimer = this._staleTimer = null;
    this._quiet.clear();
    if (ws) {
      ws.onmessage = ws.onclose = ws.onopen = ws.onerror = null;
    }
    if (this._closing) return;
    const err = this._closeInfo;
    if (code === 1000 && this.view && this.view.game && this.view.game.status === "ended") {
      this._stop(new GsError("session_ended", "the session has ended"), "ended");
      return;
    }
    if (FATAL_CLOSE_CODES.includes(code) || (err && FATAL_ERROR_CODES.includes(err.code))) {
      this._stop(err || new GsError(`close_${code}`, reason || "refused"), "closed", code);
      return;
    }
    if (!wasEstablished && code === 1006 && this.fetch) {
      // Routers that refuse before the upgrade show a browser only 1006: ask the
      // REST API of the same router why (401/403/404 are fatal).
      this._probe().then((fatal) => {
        if (this._closing || this.status === "closed") return;
        if (fatal) this._stop(fatal, "closed", code);
        else this._scheduleReconnect({ code, reason });
      });
      return;
    }
    this._scheduleReconnect({ code, reason });
  }

  async _probe() {
    try {
      const url = `${httpBase(this.url)}/api/v2/sessions/${encodeURIComponent(this.sessionId)}/state`;
      const r = await this.fetch(url, { headers: { Authorization: `Bearer ${this.token}` } });
      if ([401, 403, 404].includes(r.status)) {
        let body = {};
        try {
          body = await r.json();
        } catch {
          /* not JSON */
        }
        const e = body.error || {};
        return new GsError(e.code || `http_${r.status}`, e.message || `HTTP ${r.status}`, e.details);
      }
    } catch {
      /* the router is unreachable: retry elsewhere */
    }
    return null;
  }

  _delay(attempt) {
    const base = Math.min(this.backoff.maxMs, this.backoff.initialMs * 2 ** Math.max(0, attempt - 1));
    // Full jitter on the upper half: spreads a crowd of clients of a dead router.
    return Math.round(base / 2 + (this.random() * base) / 2);
  }

  _scheduleReconnect({ code, reason }) {
    this._attempt += 1;
    this._urlIndex = (this._urlIndex + 1) % this.urls.length;
    const delay = this._attempt === 1 ? 0 : this._delay(this._attempt - 1);
    this._setStatus("reconnecting", { code, reason, delayMs: delay, next: this.urls[this._urlIndex] });
    this._timer = this.setTimeout(() => this._open(), delay);
  }

  _stop(err, status, code) {
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    this._established = false;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onopen = ws.onerror = null;
      try {
        ws.close(1000, "client closed");
      } catch {
        /* already closed */
      }
    }
    this.fatal = err;
    for (const [, p] of this._pending) p.reject(err);
    this._pending.clear();
    if (this._ready) {
      this._ready.reject(err);
      this._ready = null;
    }
    this._setStatus(status, { code, error: err });
  }
}
