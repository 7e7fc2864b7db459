// TypeScript declarations of the broadcastd client (src/index.js).

/** A message: what `message` listeners get, the frame exactly as parsed (shared by
 * all listeners of the channel: read it, do not modify it). */
export interface Message<T = unknown> {
  channel: string;
  /** 1 for the channel's first message, +1 for each one. */
  offset: number;
  data: T;
}

/** The daemon's answer to a subscribe (also for each reconnection). */
export interface SubscribedFrame {
  type: "subscribed";
  channel: string;
  /** The channel's latest position: the next message is offset + 1. */
  epoch: string;
  offset: number;
  /** Present when the subscribe resumed from a position. */
  recovered?: boolean;
  /** This connection's client id and user: in the first reply that can carry them. */
  client?: string;
  user?: string | null;
  /** In a namespace with join_leave: whether join and leave are sent on this channel
   * (false beyond its join_leave_max_subscribers). */
  join_leave?: boolean;
  /** Why it could not be recovered: "epoch", "too_old", "too_many", "disabled" or "position". */
  reason?: string;
  id?: number | string;
}

/** What `recovered` listeners get: a `subscribed` reply that says whether the
 * messages missed while disconnected were replayed. When `recovered` is false,
 * some may be lost: reload the state this channel feeds. */
export interface RecoveredFrame extends SubscribedFrame {
  recovered: boolean;
}

export interface MissedFrame {
  type: "missed";
  /** Absent under the drop_oldest policy (the connection's channels); present under conflate. */
  channel?: string;
  count: number;
}

export interface ResyncFrame {
  type: "resync";
  channel: string;
  epoch: string;
  offset: number;
  /** "gap" (messages lost) or "epoch" (the count restarted). */
  reason: string;
}

export interface ErrorFrame {
  type: "error";
  code: string;
  message: string;
  /** "subscribe", "connect" (a close follows), "auth", "refresh", ... */
  op?: string;
  id?: number | string;
}

export interface AuthenticatedFrame {
  type: "authenticated";
  user: string;
  /** This connection's client id. */
  client?: string;
  expires?: number;
  op?: string;
}

/** Another client subscribed to (`join`) or left (`leave`) the channel: a namespace
 * with join_leave. A client is not told its own join. */
export interface JoinLeaveFrame {
  type: "join" | "leave";
  channel: string;
  client: string;
  /** The token's `sub`; null for a connection without a token. */
  user: string | null;
}

/** One connection subscribed to a channel. */
export interface PresenceEntry {
  client: string;
  user: string | null;
  /** The id of the daemon node that holds the connection. */
  node: string;
  /** Unix seconds. */
  connected_at: number;
  /** The token's `info` claim, when it has one. */
  info?: unknown;
}

export interface PresenceFrame {
  type: "presence";
  channel: string;
  /** In client-id order, at most the daemon's presence.max_page. */
  clients: PresenceEntry[];
  /** The cursor of the next page; null on the last one. */
  next: string | null;
  id?: number | string;
}

export interface PresenceStatsFrame {
  type: "presence_stats";
  channel: string;
  clients: number;
  /** Distinct users among the clients (a connection without a token is no user). */
  users: number;
  id?: number | string;
}

/** What presence() and presenceStats() reject with: the daemon's refusal (`code`
 * not_subscribed, presence_not_allowed, presence_disabled, bad_command, ...), or
 * "network" when no answer came (not connected, or the connection ended first), or
 * "one_way" when the connection is a Server-Sent Events stream, which carries no commands. */
export declare class BroadcastError extends Error {
  readonly code: string;
  /** The daemon's error reply; null for "network" and "one_way". */
  readonly frame: ErrorFrame | null;
}

export interface ExpiringFrame {
  type: "expiring";
  expires: number;
}

export type State = "connecting" | "connected" | "disconnected" | "closed";

/** The transport of a connection. */
export type Transport = "websocket" | "sse";

/** Given with every state but "closed" after close(): `transport` with "connecting"
 * and "connected"; the rest also when a connection ended. */
export interface StateDetail {
  /** The connection's (or attempt's) transport. */
  transport?: Transport;
  /** The close code (0 when the client gave up on the connection itself; 4002 or
   * 4003 when the daemon refused the token of the first frame, as it closes a
   * connection whose URL token it refuses; on SSE, the code of the daemon's last
   * `event: close`, or 1006 when the stream ended without one or was refused). */
  code?: number;
  reason?: string;
  /** Milliseconds until the next attempt, when one is planned. */
  delay?: number;
}

/** Why getToken() is called. */
export type TokenReason = "connect" | "expiring" | "expired" | "invalid" | "required";

export type Since = { epoch: string; offset: number } | { last: number };

export interface ClientOptions {
  /** A subscriber JWT. Sent as the connection's first frame, `{"op": "auth"}`;
   * every channel is subscribed once the daemon accepts it (`authenticated`). */
  token?: string;
  /** Give the token in the URL (`?token=`) instead, with the channels, saving a round
   * trip. URLs are kept where tokens should not be: browser consoles (a failed
   * WebSocket prints its URL), proxies and access logs. Default false. */
  tokenInUrl?: boolean;
  /** Called for a (new) token: before connecting without one, on an `expiring`
   * event (then sent as a refresh), and after a close with 4001, 4002 or 4003 or
   * the refusal of the first frame's token ("expired" for token_expired, else
   * "invalid"). Without it such a close or refusal ends the client ("closed"). */
  getToken?: (reason: TokenReason) => string | Promise<string>;
  /** Upper bound of the reconnection delay in ms (default 20000). */
  maxBackoff?: number;
  /** Bound of the first reconnection delay in ms, doubled at each failure (default 500). */
  minBackoff?: number;
  /** A connection must stay up this long (ms) for the backoff to start over (default 10000). */
  stableAfter?: number;
  /** Give up on a handshake (and the acceptance of the token sent first) after this long
   * (ms, default 10000). */
  connectTimeout?: number;
  /** Ping after this long (ms) without a frame; a second silent interval drops the
   * connection (default 25000; 0: never). */
  pingInterval?: number;
  /** The WebSocket class when there is none in globalThis (Node.js < 22: the ws package's). */
  WebSocket?: unknown;
  /** "auto" (default): WebSocket, falling back to Server-Sent Events after
   * `fallbackAfter` WebSocket attempts in a row that never opened, as long as no
   * WebSocket has opened yet; the client keeps to whichever transport opened first
   * (until close()). "websocket" or "sse": that one only. */
  transport?: "auto" | Transport;
  /** WebSocket attempts that never opened before "auto" tries SSE (default 2). */
  fallbackAfter?: number;
  /** The fetch() that reads SSE streams (default globalThis.fetch). */
  fetch?: unknown;
}

export interface SubscribeOptions {
  /** Resume after a position (a stored `sub.position`), or start with the last N messages kept. */
  since?: Since;
}

declare class Emitter {
  /** Remove a listener added with on(). */
  off(event: string, listener: (...args: any[]) => void): this;
}

export declare class Subscription<T = unknown> extends Emitter {
  readonly client: BroadcastClient;
  readonly channel: string;
  readonly state: "subscribing" | "subscribed" | "unsubscribed";
  /** The epoch of the channel's count; null until the first `subscribed`. */
  readonly epoch: string | null;
  /** The offset of the last message delivered (or the channel's, when subscribed). */
  readonly offset: number;
  /** {epoch, offset} to store and give back as `since` later; null before the first `subscribed`. */
  readonly position: { epoch: string; offset: number } | null;

  on(event: "message", listener: (message: Message<T>) => void): this;
  on(event: "subscribed", listener: (reply: SubscribedFrame) => void): this;
  on(event: "recovered", listener: (reply: RecoveredFrame) => void): this;
  on(event: "missed", listener: (event: MissedFrame) => void): this;
  on(event: "resync", listener: (event: ResyncFrame) => void): this;
  on(event: "error", listener: (error: ErrorFrame) => void): this;
  /** Another client came or went (a namespace with join_leave; only with a listener). */
  on(event: "join" | "leave", listener: (event: JoinLeaveFrame) => void): this;

  /** Leave the channel. */
  unsubscribe(): void;
  /** client.presence(this channel, cursor). */
  presence(cursor?: string | null): Promise<PresenceFrame>;
  /** client.presenceStats(this channel). */
  presenceStats(): Promise<PresenceStatsFrame>;
}

export declare class BroadcastClient extends Emitter {
  constructor(url: string, options?: ClientOptions);
  /** The daemon's URL (channels and since are added to it, and the token with `tokenInUrl`). */
  readonly url: string;
  readonly state: State;
  /** Every current subscription. */
  readonly subscriptions: Subscription[];
  /** This connection's client id, from the daemon's first reply (what presence entries
   * and the server API name it by); null until then, new at each reconnection. */
  readonly clientId: string | null;
  /** The token's user (`sub`), as the daemon told it; null without a token. */
  readonly user: string | null;
  /** The transport of the current connection, or of the next attempt while there is none. */
  readonly transport: Transport;

  /** Start connecting (the socket opens once a channel is subscribed; with a token,
   * the state is "connected" once the daemon has accepted it). */
  connect(): this;
  /** Close with 1000 and stop reconnecting; subscriptions are kept for a later connect(). */
  close(): this;
  /** Subscribe to a channel; throws if it is already subscribed. */
  subscribe<T = unknown>(channel: string, options?: SubscribeOptions): Subscription<T>;
  getSubscription(channel: string): Subscription | undefined;
  /** Use this token from now on (a refresh on the open connection, the first frame of the next). */
  setToken(token: string): this;
  /** A page of who subscribes to `channel` (subscribed on this connection, in a namespace
   * with presence_for_subscribers); give `next` as `cursor` for the next page. On SSE
   * it rejects with code "one_way": a stream carries no commands. */
  presence(channel: string, cursor?: string | null): Promise<PresenceFrame>;
  /** How many clients and distinct users subscribe to `channel`. */
  presenceStats(channel: string): Promise<PresenceStatsFrame>;

  on(event: "state", listener: (state: State, detail?: StateDetail) => void): this;
  /** Every channel's recovery outcome (also told to its subscription). */
  on(event: "recovered", listener: (reply: RecoveredFrame) => void): this;
  on(event: "missed", listener: (event: MissedFrame) => void): this;
  on(event: "resync", listener: (event: ResyncFrame) => void): this;
  /** Error replies (any channel's too), and failures of getToken() or of JSON parsing. */
  on(event: "error", listener: (error: ErrorFrame | Error) => void): this;
  on(event: "authenticated", listener: (reply: AuthenticatedFrame) => void): this;
  on(event: "expiring", listener: (event: ExpiringFrame) => void): this;
  /** Every channel's join and leave events (also told to its subscription). */
  on(event: "join" | "leave", listener: (event: JoinLeaveFrame) => void): this;
}

export default BroadcastClient;
