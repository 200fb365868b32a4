// Ether-IM terminal SDK for browsers and Node.js: one ES module, no dependencies, on the
// standard WebSocket API (browsers; Node.js 22+, or 20 with --experimental-websocket).
//
// It speaks the `ether.v1.json` terminal protocol (docs: README, "The terminal protocol") and
// does what every terminal must do, so an app only handles messages:
// - connects (the token may be a function, called on every connect, to refresh it) and keeps
//   the connection: heartbeats, reconnects with jittered backoff, honours `reconnect {after_ms}`
//   when a node drains, stops for good on `kicked` (whatever close follows it); gives up a
//   connection that gets no `welcome` within `welcomeTimeoutMs` (10 s) and tries again; the
//   backoff resets only after a connection stayed up `stableAfterMs` (10 s), so a node closing
//   terminals right after `welcome` is not hammered;
// - after every `welcome`, catches up with `sync` (page by page) from the positions it has
//   acknowledged, so nothing is missed across disconnects; acknowledges what it received
//   (cumulative `ack` per stream, never past a seq it has not received: a live message that
//   overtakes a sync is handed to the app at once but acknowledged only once the sync got to
//   it) and hands each message to the app once (deduplicated by id: delivery is at least
//   once);
// - sends with a `cid` and resolves when the node answers `sent` (the message is durable), or
//   rejects with the node's `error`; a send still unanswered when the connection drops is sent
//   again after reconnecting with the same `cid`, which the node deduplicates; sends still
//   unanswered when the node closes for good (kicked) are rejected then;
// - marks chats read, also while offline: the last `read` of each chat goes once it is back;
// - sends a `sync` the node refused (`rate_limited`, `unavailable`) again after a moment.
//
//   import { EtherTerminal } from "./ether-im.mjs";
//   const t = new EtherTerminal({ url: "ws://127.0.0.1:9000", token: jwt, device: "web-1" });
//   t.addEventListener("message", (e) => console.log(e.detail.chat, e.detail.body));
//   t.start();
//   const { id, seq } = await t.send("bob", "text", { text: "hi" });

/** An `error` frame or a failed send: `code` is the API's error code (`invalid_body`, ...);
 * `of` the type of the frame the node refused (`sync`, `read`, `ack`, `send`, `ping`), when
 * the node says (nodes of earlier versions do not). */
export class EtherError extends Error {
  constructor(code, message, ref, of) {
    super(`${code}: ${message}`);
    this.name = "EtherError";
    this.code = code;
    this.ref = ref;
    this.of = of;
  }
}

/** Close codes after which a terminal must not reconnect on its own. */
const FINAL_CLOSE_CODES = new Set([4001, 1008]);
/** Ids remembered to drop messages delivered again. */
const SEEN_MAX = 10000;
/** How long a gap in a stream (a seq missing before one received live) may last before a
 * `sync` fetches it (live messages of a cluster may come slightly out of order). */
const GAP_WAIT_MS = 1000;
/** How long after a refused `sync` (`rate_limited` or `unavailable`) it is sent again. */
const SYNC_RETRY_MS = 1000;
/** A connection that stayed up this long resets the reconnect backoff; one closed sooner
 * (say a node closing every terminal right after `welcome`) backs off further each time. */
const STABLE_AFTER_MS = 10000;

function randomCid() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * One terminal (one device of one user). Events (`addEventListener`): `message` (a `msg`
 * frame, new to this terminal), `receipt`, `read_sync`, `welcome`, `synced` (caught up after
 * a `welcome` found it behind), `kicked`, `error` (an `error` frame not tied to a send),
 * `state` (`connecting`, `online`, `offline`, `closed`).
 */
export class EtherTerminal extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.url client port base URL, e.g. `ws://127.0.0.1:9000`
   * @param {string | (() => string | Promise<string>)} o.token terminal JWT, or a function
   * @param {string} [o.device] device id (default `web`)
   * @param {string} [o.platform] `web`, `ios`, `android`, `desktop` or `other` (default `web`)
   * @param {{inbox_seq: number, groups: Object<string, number>}} [o.positions] what this
   *   device already has (e.g. kept from a previous run); default: what the node says this
   *   device acknowledged, or else the current heads (history is on the REST API); a group
   *   missing from them (joined while away) is synced from its start
   * @param {number} [o.reconnectMinMs] first reconnect delay (default 500)
   * @param {number} [o.reconnectMaxMs] longest reconnect delay (default 30000)
   * @param {number} [o.sendTimeoutMs] how long a send waits for `sent` (default 15000)
   * @param {typeof WebSocket} [o.WebSocket] WebSocket implementation (default the global)
   */
  constructor(o) {
    super();
    this.url = o.url.replace(/\/+$/, "");
    this.token = o.token;
    this.device = o.device ?? "web";
    this.platform = o.platform ?? "web";
    this.reconnectMinMs = o.reconnectMinMs ?? 500;
    this.reconnectMaxMs = o.reconnectMaxMs ?? 30000;
    this.sendTimeoutMs = o.sendTimeoutMs ?? 15000;
    /** How long a connection may take to get its `welcome` before it is given up and tried
     * again (a node that accepts but never answers, a proxy holding the upgrade). */
    this.welcomeTimeoutMs = o.welcomeTimeoutMs ?? 10000;
    this.stableAfterMs = o.stableAfterMs ?? STABLE_AFTER_MS;
    this.WebSocketImpl = o.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocketImpl) throw new Error("no WebSocket implementation: pass { WebSocket }");
    /** Acknowledged positions: `inbox_seq` and one per group. Each one is a seq this terminal
     * has everything of up to (what it acknowledges): a `sync` goes on from there. */
    this.positions = o.positions
      ? { inbox_seq: o.positions.inbox_seq ?? 0, groups: { ...(o.positions.groups ?? {}) } }
      : null;
    // Per stream (`null`: the inbox, else a group id): seqs received past a gap (live
    // messages that overtook a sync), held until what comes before them arrives; and those
    // seqs once the position passed them (the sync brings them again: dropped).
    this._ahead = new Map(); // stream -> Set of seqs
    this._overtaken = new Map(); // stream -> Set of seqs
    this._syncing = null; // the `sync` being answered: { inbox_seq, groups, low: Map stream -> seq }
    this._gapCheck = false;
    this.welcome = null;
    this._state = "idle";
    this._ws = null;
    this._wanted = false;
    this._attempt = 0;
    this._kicked = false; // a `kicked` frame came: no reconnecting on our own
    this._timers = new Set();
    this._pending = new Map(); // cid -> { frame, resolve, reject, timer }
    this._seen = new Set();
    this._seenOrder = [];
    this._ackDue = null; // { inbox: seq|null, groups: Map }
    this._reads = new Map(); // chat -> seq: reads asked for while offline, sent after `welcome`
    this._lastFrameAt = 0;
  }

  /** `idle`, `connecting`, `online`, `offline` (will reconnect) or `closed`. */
  get state() {
    return this._state;
  }

  /** Connects, and keeps connecting until `close()` (or a kick). */
  start() {
    this._wanted = true;
    this._kicked = false;
    if (!this._ws) this._connect();
  }

  /** Disconnects and stays disconnected (e.g. the page is hidden) until `resume()`. */
  suspend() {
    this._wanted = false;
    this._drop(1000, "suspended");
    this._setState("offline");
  }

  /** Connects again after `suspend()` and catches up with everything missed meanwhile. */
  resume() {
    this.start();
  }

  /** Closes for good; pending sends are rejected. */
  close() {
    this._wanted = false;
    this._drop(1000, "closed");
    this._rejectPending("terminal closed");
    this._setState("closed");
  }

  /** Rejects every send still waiting for `sent`. */
  _rejectPending(why) {
    for (const [cid, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new EtherError("unavailable", why, cid));
    }
    this._pending.clear();
  }

  /** Sends to a user; resolves `{id, seq, ts}` once durable. */
  send(to, kind, body, { cid } = {}) {
    return this._sendFrame({ type: "send", cid: cid ?? randomCid(), to, kind, body });
  }

  /** Sends to a group this user is a member of; resolves `{id, seq, ts}` once durable. */
  sendGroup(group, kind, body, { cid } = {}) {
    return this._sendFrame({ type: "send", cid: cid ?? randomCid(), group, kind, body });
  }

  /** Marks `chat` (`u:<user>` or `g:<group>`) read up to `seq` (the peer gets a receipt). */
  read(chat, seq) {
    // Offline: the latest read of each chat goes once the connection is back.
    if (!this._write({ type: "read", chat, seq })) this._reads.set(chat, Math.max(this._reads.get(chat) ?? 0, seq));
  }

  // ---- connection ------------------------------------------------------------------------

  async _connect() {
    this._setState("connecting");
    let token;
    try {
      token = typeof this.token === "function" ? await this.token() : this.token;
    } catch (e) {
      this._emit("error", new EtherError("unauthorized", `token: ${e}`));
      return this._retry();
    }
    if (!this._wanted) return;
    const q = new URLSearchParams({ token, device: this.device, platform: this.platform });
    let ws;
    try {
      ws = new this.WebSocketImpl(`${this.url}/ws?${q}`, "ether.v1.json");
    } catch (e) {
      // A URL the WebSocket API refuses (bad syntax, a blocked port): trying again cannot help.
      this._wanted = false;
      this._emit("error", new EtherError("invalid_url", `cannot open ${this.url}/ws: ${e}`));
      this._setState("closed");
      return;
    }
    this._ws = ws;
    let welcomed = false;
    let welcomedAt = 0;
    this._later(this.welcomeTimeoutMs, () => {
      if (welcomed || this._ws !== ws) return;
      // No `welcome`: given up (its close event, if any, is ignored) and tried again.
      this._ws = null;
      ws.onclose = ws.onmessage = null;
      try {
        ws.close(1000, "no welcome");
      } catch {}
      this._stopTimers();
      this._emit("error", new EtherError("unavailable", `no welcome within ${this.welcomeTimeoutMs} ms`));
      this._setState("offline");
      this._retry();
    });
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return; // JSON frames only on this subprotocol
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      this._lastFrameAt = Date.now();
      if (frame.type === "welcome" && !welcomed) {
        welcomed = true;
        welcomedAt = Date.now();
      }
      this._onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._stopTimers();
      this._ackDue = null; // what was not acknowledged comes again after `sync`
      if (!this._wanted) return;
      // A `kicked` frame says it even when the close that follows is not 4001 (a proxy or a
      // broken connection turns it into 1006): reconnecting would kick the newer device.
      if (FINAL_CLOSE_CODES.has(ev.code) || this._kicked) {
        // Kicked (4001: replaced by a newer connection of this device, or by the business),
        // or refused for bad frames (1008): reconnecting would not help, and the sends still
        // waiting for `sent` would never be sent again.
        this._wanted = false;
        this._rejectPending(`connection closed for good (${ev.code})`);
        this._setState("closed");
        return;
      }
      this._setState("offline");
      if (welcomed && Date.now() - welcomedAt >= this.stableAfterMs) this._attempt = 0;
      this._retry(this._reconnectAfter);
      this._reconnectAfter = undefined;
    };
    ws.onerror = () => {}; // onclose follows
  }

  _retry(afterMs) {
    if (!this._wanted) return;
    const backoff = Math.min(this.reconnectMaxMs, this.reconnectMinMs * 2 ** this._attempt);
    this._attempt += 1;
    const delay = afterMs ?? backoff / 2 + Math.random() * (backoff / 2);
    this._later(delay, () => {
      if (this._wanted && !this._ws) this._connect();
    });
  }

  _drop(code, reason) {
    const ws = this._ws;
    this._ws = null;
    this._stopTimers();
    if (ws && ws.readyState <= 1) ws.close(code, reason);
  }

  _write(frame) {
    if (this._ws && this._ws.readyState === 1 && this._state === "online") {
      this._ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  // ---- frames ----------------------------------------------------------------------------

  _onFrame(f) {
    switch (f.type) {
      case "welcome":
        return this._onWelcome(f);
      case "msg":
        return this._onMsg(f);
      case "synced":
        return this._onSynced(f);
      case "sent": {
        const p = this._pending.get(f.cid);
        if (p) {
          this._pending.delete(f.cid);
          clearTimeout(p.timer);
          p.resolve({ id: f.id, seq: f.seq, ts: f.ts });
        }
        return;
      }
      case "error": {
        const p = f.ref != null ? this._pending.get(f.ref) : undefined;
        const err = new EtherError(f.code, f.message, f.ref, f.of);
        if (p) {
          this._pending.delete(f.ref);
          clearTimeout(p.timer);
          p.reject(err);
        } else {
          // Without a `ref`: a refused `sync`, `read` or `ack` (`of` says which). A refused
          // `sync` goes again in a moment; a node without `of` may have refused the one being
          // answered (if it did not, it answers that one is being answered, and it goes again).
          const maybeSync = f.of === "sync" || f.of == null;
          if (this._syncing && maybeSync && (f.code === "rate_limited" || f.code === "unavailable")) {
            this._syncRefused();
          }
          this._emit("error", err);
        }
        return;
      }
      case "receipt":
      case "read_sync":
        return this._emit(f.type, f);
      case "kicked":
        this._kicked = true;
        return this._emit("kicked", f);
      case "reconnect":
        this._reconnectAfter = f.after_ms;
        return;
      default:
        return; // pong, and frames of later versions
    }
  }

  _onWelcome(w) {
    this.welcome = w;
    if (!this.positions) {
      const d = w.delivered;
      this.positions = d
        ? { inbox_seq: d.inbox_seq, groups: { ...d.groups } }
        : { inbox_seq: w.inbox_seq, groups: { ...w.groups } };
    }
    // A group not in the positions (joined while away, or none of it was ever acknowledged):
    // what was posted in it is synced from its start (a new device, without positions, starts
    // at every head above). A position past a group's head belongs to an earlier group of
    // that id (dissolved, then created again: a new stream from seq 1): start that one over.
    for (const [g, head] of Object.entries(w.groups)) {
      if (!(g in this.positions.groups)) this.positions.groups[g] = 0;
      else if (this.positions.groups[g] > head) {
        this.positions.groups[g] = 0;
        this._ahead.delete(g);
      }
    }
    // A new connection: no sync of an earlier one is being answered any more.
    this._syncing = null;
    this._gapCheck = false;
    this._overtaken.clear();
    this._setState("online");
    this._emit("welcome", w);
    this._startHeartbeat(w.heartbeat_s);
    const behind =
      w.inbox_seq > this.positions.inbox_seq ||
      Object.entries(w.groups).some(([g, head]) => head > (this.positions.groups[g] ?? 0));
    if (behind) this._sync();
    // Sends not yet answered go again: the node answers a repeated cid with the first result.
    for (const p of this._pending.values()) this._write(p.frame);
    // Reads asked for while offline.
    const reads = this._reads;
    this._reads = new Map();
    for (const [chat, seq] of reads) this.read(chat, seq);
  }

  _sync() {
    const from = { inbox_seq: this.positions.inbox_seq, groups: { ...this.positions.groups } };
    if (this._write({ type: "sync", ...from })) this._syncing = { ...from, low: new Map() };
  }

  /** The `sync` being answered may have been refused: sent again later, from the positions,
   * unless its `synced` (or another connection) came meanwhile. */
  _syncRefused() {
    const refused = this._syncing;
    this._later(SYNC_RETRY_MS, () => {
      if (this._syncing !== refused) return;
      this._syncing = null;
      this._sync();
    });
  }

  _onSynced(s) {
    const answered = this._syncing;
    this._syncing = null;
    if (answered) this._skipPurged(answered, s);
    this._flushAcks();
    if (s.more) return this._sync(); // on from the positions: where the pages got to
    this._overtaken.clear(); // every one of them came again by now
    if (this._ahead.size > 0) this._gapCheckLater(); // live ones past what was stored then
    this._emit("synced", s); // caught up with everything stored
  }

  /**
   * Moves positions past the seqs that a `sync` answer shows are no longer stored (purged
   * by retention: pages skip them). After the last page (`more: false`) everything of a
   * stream it named up to its head was sent. After another page, only the first stream the
   * node was behind on surely had room in it: the first seq of that stream received since
   * (page or live: a live message is never below the page's first) was the first stored.
   */
  _skipPurged(answered, s) {
    const streams = [[null, answered.inbox_seq, s.inbox_seq]];
    for (const g of Object.keys(answered.groups).sort()) streams.push([g, answered.groups[g], s.groups?.[g]]);
    for (const [stream, from, head] of streams) {
      if (head === undefined || head <= from) continue; // not a member, or nothing was due
      let to = head;
      if (s.more) {
        const low = answered.low.get(stream);
        to = low !== undefined && low <= head ? low - 1 : from;
      }
      if (this._advance(stream, to)) this._ackLater(stream, this._pos(stream));
      if (s.more) return;
    }
  }

  _pos(stream) {
    return stream === null ? this.positions.inbox_seq : (this.positions.groups[stream] ?? 0);
  }

  /** Moves `stream`'s position up to `seq`, then over the held seqs that follow it; true if
   * it moved. */
  _advance(stream, seq) {
    const before = this._pos(stream);
    let pos = Math.max(before, seq);
    const ahead = this._ahead.get(stream);
    if (ahead) {
      // While a sync is answered, its pages may bring again the held seqs passed now.
      let overtaken = this._syncing ? this._overtaken.get(stream) : null;
      if (this._syncing && !overtaken) this._overtaken.set(stream, (overtaken = new Set()));
      for (const s of ahead) if (s <= pos) ahead.delete(s);
      while (ahead.delete(pos + 1)) {
        pos += 1;
        overtaken?.add(pos);
      }
      if (ahead.size === 0) this._ahead.delete(stream);
    }
    if (pos === before) return false;
    if (stream === null) this.positions.inbox_seq = pos;
    else this.positions.groups[stream] = pos;
    return true;
  }

  _gapCheckLater() {
    if (this._gapCheck) return;
    this._gapCheck = true;
    this._later(GAP_WAIT_MS, () => {
      this._gapCheck = false;
      if (this._ahead.size > 0 && !this._syncing) this._sync();
    });
  }

  _onMsg(m) {
    if (m.chat === "broadcast") {
      // Not stored, no seq, no ack; deduplicated by id like any message.
      if (this._remember(m.id)) this._emit("message", m);
      return;
    }
    const group = m.chat.startsWith("g:") ? m.chat.slice(2) : null;
    // A group joined since the welcome starts at its first message (history: REST API).
    if (group !== null && !(group in this.positions.groups)) this.positions.groups[group] = m.seq - 1;
    const pos = this._pos(group);
    let again = this._overtaken.get(group)?.delete(m.seq) ?? false;
    if (this._syncing && m.seq > pos) {
      const low = this._syncing.low.get(group);
      if (low === undefined || m.seq < low) this._syncing.low.set(group, m.seq);
    }
    if (m.seq === pos + 1) {
      this._advance(group, m.seq);
      this._ackLater(group, this._pos(group));
    } else if (m.seq <= pos) {
      // Acknowledge what arrived (cumulative), even a duplicate: it is how resends stop.
      this._ackLater(group, m.seq);
    } else {
      // Past a gap (a live message that overtook the sync, or one lost on the way): handed to
      // the app, but acknowledged only once everything before it is here (a cumulative ack
      // past the gap would say the missing ones were received, and the node would never send
      // them again).
      let ahead = this._ahead.get(group);
      if (!ahead) this._ahead.set(group, (ahead = new Set()));
      again = ahead.has(m.seq) || again;
      ahead.add(m.seq);
      if (!this._syncing) this._gapCheckLater();
    }
    if (again || !this._remember(m.id)) return;
    this._emit("message", m);
  }

  /** Remembers a message id; false if it was seen already. */
  _remember(id) {
    if (this._seen.has(id)) return false;
    this._seen.add(id);
    this._seenOrder.push(id);
    if (this._seenOrder.length > SEEN_MAX) this._seen.delete(this._seenOrder.shift());
    return true;
  }

  // ---- acks and heartbeats ---------------------------------------------------------------

  _ackLater(group, seq) {
    if (!this._ackDue) {
      this._ackDue = { inbox: null, groups: new Map() };
      queueMicrotask(() => this._flushAcks());
    }
    if (group === null) this._ackDue.inbox = Math.max(this._ackDue.inbox ?? 0, seq);
    else this._ackDue.groups.set(group, Math.max(this._ackDue.groups.get(group) ?? 0, seq));
  }

  _flushAcks() {
    const due = this._ackDue;
    this._ackDue = null;
    if (!due) return;
    if (due.inbox !== null) this._write({ type: "ack", seq: due.inbox });
    for (const [group, seq] of due.groups) this._write({ type: "ack", group, seq });
  }

  _startHeartbeat(heartbeatS) {
    const everyMs = Math.max(1000, (heartbeatS || 30) * 500);
    const check = () => {
      if (!this._ws) return;
      if (Date.now() - this._lastFrameAt > everyMs * 4) {
        // Silent for two heartbeat periods: the connection is dead even if nobody said so.
        const ws = this._ws;
        this._ws = null;
        this._stopTimers();
        ws.onclose = null;
        try {
          ws.close(4000, "heartbeat timeout");
        } catch {
          /* already closed */
        }
        this._setState("offline");
        return this._retry();
      }
      this._write({ type: "ping" });
      this._later(everyMs, check);
    };
    this._later(everyMs, check);
  }

  // ---- sends -----------------------------------------------------------------------------

  _sendFrame(frame) {
    return new Promise((resolve, reject) => {
      if (this._state === "closed") return reject(new EtherError("unavailable", "terminal closed", frame.cid));
      if (this._pending.has(frame.cid)) return reject(new EtherError("conflict", "cid already pending", frame.cid));
      const timer = setTimeout(() => {
        this._pending.delete(frame.cid);
        reject(new EtherError("unavailable", `no answer within ${this.sendTimeoutMs} ms`, frame.cid));
      }, this.sendTimeoutMs);
      this._pending.set(frame.cid, { frame, resolve, reject, timer });
      this._write(frame); // offline: it goes after the next welcome
    });
  }

  // ---- plumbing --------------------------------------------------------------------------

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
  }

  _stopTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
  }

  _setState(s) {
    if (this._state === s) return;
    this._state = s;
    this._emit("state", s);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
