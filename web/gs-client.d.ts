// Type declarations of gs-client.js (served at /client/gs-client.d.ts).
// Protocol: docs/protocol.md.

/** Close codes after which the client does not reconnect. */
export declare const FATAL_CLOSE_CODES: readonly number[];
/** Error codes after which the client does not reconnect. */
export declare const FATAL_ERROR_CODES: readonly string[];

/** An `error` reply, a `connection_error`, or a REST error. */
export declare class GsError extends Error {
  constructor(code: string, message?: string, details?: Record<string, unknown>, id?: string | null);
  readonly code: string;
  readonly details: Record<string, unknown>;
  /** The command id the error answers, if any. */
  readonly id: string | null;
}

/** The session view: what `GET /state` and `sync_response` carry, kept current. */
export interface SessionView {
  /** The state document edited by `state_update`. */
  state: Record<string, unknown>;
  metadata: Record<string, unknown>;
  /** The rules-managed part: status, members, settings, play (characters, combat…). */
  game: GameView;
  version: number;
  timestamp?: string;
}

export interface GameView {
  session_id?: string;
  name?: string;
  status?: "created" | "active" | "paused" | "ended";
  created_by?: string;
  settings?: Record<string, unknown>;
  members?: Record<string, { role: "dm" | "player" | "observer"; characters: string[]; joined_at: string }>;
  play?: {
    characters?: Record<string, Record<string, unknown>>;
    combat?: {
      id: string;
      round: number;
      turn_number: number;
      order: string[];
      participants: Record<string, Record<string, unknown>>;
      turn?: { character_id: string; [k: string]: unknown };
      [k: string]: unknown;
    };
    [k: string]: unknown;
  };
  [k: string]: unknown;
}

/** A session event (`state_update`, `player_joined`, `action_resolve`, …). */
export interface SessionEvent {
  type: string;
  version: number;
  data: Record<string, unknown>;
}

export interface Ack {
  version: number;
  [k: string]: unknown;
}

export type Status = "idle" | "connecting" | "open" | "reconnecting" | "closed" | "ended";

export interface StatusDetail {
  status: Status;
  /** The router URL in use (or just lost). */
  url: string | null;
  /** Reconnection attempts since the last successful connection. */
  attempt: number;
  /** Close code of the connection just lost, if any. */
  code?: number;
  reason?: string;
  /** Delay before the next attempt (ms), when reconnecting. */
  delayMs?: number;
  /** The router the next attempt goes to. */
  next?: string;
  /** Whether an `open` continues an earlier connection (resume). */
  resumed?: boolean;
  /** Why the client stopped, when `closed`/`ended`. */
  error?: GsError;
}

export interface StateDetail {
  version: number;
  view: SessionView;
  /** "sync", or the type of the event applied. */
  cause: string;
  event?: SessionEvent;
}

export interface GameClientEvents {
  status: StatusDetail;
  /** Every session event, once, in version order, after it was applied to the view. */
  event: SessionEvent;
  state: StateDetail;
  sync: { version: number; view: SessionView };
  connection_error: GsError;
  /** An error reply that answers no pending command. */
  error: GsError;
  /** Every message received, raw. */
  message: Record<string, unknown>;
}

export interface GameClientOptions {
  /** Router base URLs (`http(s)://host:port` or `ws(s)://…`), or full `…/ws` URLs; tried round-robin. */
  urls?: string[];
  /** One URL, when `urls` is not given. */
  url?: string;
  sessionId: string;
  /** The access token (JWT). */
  token: string;
  /** The connection token from `POST /sessions` or `POST …/join`. */
  sessionToken: string;
  /** Index into `urls` of the first router to try (default 0). */
  startIndex?: number;
  /** Reconnect backoff (defaults 250 ms doubling to 8 s, jittered). */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Client heartbeat interval (default 25 s; 0 = none). */
  heartbeatMs?: number;
  /** Drop a connection silent this long and resume elsewhere (default 75 s; 0 = never). */
  staleMs?: number;
  /** Times a `service_unavailable` with `outcome: "unknown"` is asked again under the same id (default 5). */
  retryUnknownMax?: number;
  /** Injection points (tests): WebSocket class, fetch (null: no REST probe), ids, randomness, timers. */
  WebSocket?: new (url: string) => WebSocket;
  fetch?: typeof fetch | null;
  newId?: () => string;
  random?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
}

export declare class GameClient extends EventTarget {
  constructor(opts: GameClientOptions);
  readonly urls: string[];
  readonly sessionId: string;
  /** The session view (null before the first sync). */
  readonly view: SessionView | null;
  /** The state document. */
  readonly state: Record<string, unknown> | undefined;
  /** The version of the last event applied. */
  readonly version: number;
  readonly status: Status;
  readonly fatal: GsError | null;
  readonly stats: { connects: number; reconnects: number; duplicates: number; gaps: number; resent: number };
  /** The router URL of the current (or last) connection. */
  readonly url: string | null;
  readonly connectionId: string | null;
  readonly role: string | null;
  readonly userId: string | null;
  readonly pendingCount: number;

  /** Resolves with the view once the state is in; rejects on a fatal refusal. */
  connect(): Promise<SessionView>;
  /** Sends a command; resolves on its ack, rejects with a GsError on its error. */
  send(type: string, data?: Record<string, unknown>, opts?: { id?: string }): Promise<Ack>;
  /** Asks for the full state again. */
  sync(): Promise<Ack>;
  /** Tokens for the next connection. */
  setTokens(tokens: { token?: string; sessionToken?: string }): void;
  /** Closes for good. */
  close(): void;
  /** Subscribes; returns the unsubscribe function. */
  on<K extends keyof GameClientEvents>(type: K, fn: (detail: GameClientEvents[K], event: CustomEvent) => void): () => void;
}

/** The version of a view/sync/established message: `version_number`, else Number(`version`). */
export declare function versionOf(obj: unknown): number | undefined;
export declare function parsePointer(path: string): string[];
export declare function getPointer(doc: unknown, path: string): unknown;
export declare function setPointer<T>(doc: T, path: string, value: unknown): T;
export declare function removePointer<T>(doc: T, path: string): T;
export declare function mergePatch(target: unknown, patch: unknown): unknown;
export declare function applyEvent(view: SessionView, event: SessionEvent): SessionView;
