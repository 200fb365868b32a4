// The JS SDK against a scripted node (a fake WebSocket, as in positions.mjs), one case per
// run: `node audit.mjs <case>` (driven by engine/tests/sdk_audit.rs). Each case is something
// a real node does that the SDK once handled wrong. Prints one JSON line: {"ok": true, ...}
// or {"ok": false, "failures": [...]}.
import { EtherTerminal, EtherError } from "../ether-im.mjs";
import { check, facts, failures, finish } from "./verdict.mjs";

/** Every fake connection the SDK opened, the last one last. */
const conns = [];
/** The `welcome` each new connection gets (set by the case). */
let nextWelcome = null;

const welcome = (inbox_seq, groups, delivered) => ({
  type: "welcome",
  user: "bob",
  device: "web",
  session: String(conns.length),
  heartbeat_s: 30,
  inbox_seq,
  groups,
  ...(delivered ? { delivered } : {}),
});

class FakeWebSocket {
  constructor() {
    this.readyState = 1;
    this.sent = [];
    conns.push(this);
    const w = nextWelcome;
    setTimeout(() => w && this.feed(w));
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close() {
    this.readyState = 3;
  }
  feed(...frames) {
    for (const f of frames) this.onmessage?.({ data: JSON.stringify(f) });
  }
  /** The node closes the connection (or it just breaks: 1006). */
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
  take() {
    const out = this.sent.filter((f) => f.type !== "ping");
    this.sent = [];
    return out;
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const last = () => conns[conns.length - 1];
const show = (x) => JSON.stringify(x);
const msg = (seq, group, id) => ({
  type: "msg",
  id: id ?? `${group ?? "inbox"}-${seq}`,
  chat: group ? `g:${group}` : "u:ann",
  from: "ann",
  seq,
  kind: "text",
  body: { text: `${seq}` },
  ts: 1,
});

function terminal(positions, options = {}) {
  const t = new EtherTerminal({
    url: "ws://fake",
    token: "t",
    device: "web",
    reconnectMinMs: 10,
    reconnectMaxMs: 20,
    sendTimeoutMs: 20000,
    positions,
    WebSocket: FakeWebSocket,
    ...options,
  });
  t.got = [];
  t.errors = [];
  t.addEventListener("message", (e) => t.got.push(e.detail.id));
  t.addEventListener("error", (e) => t.errors.push(e.detail.code));
  return t;
}

const cases = {
  /** A `sync` the node refuses (`rate_limited`: too many syncs and reads; `unavailable`: the
   * store is overloaded) is sent again: the SDK must not wait for a `synced` that never comes. */
  async sync_refused_is_retried() {
    nextWelcome = welcome(5, {});
    const t = terminal({ inbox_seq: 0, groups: {} });
    let synced = 0;
    t.addEventListener("synced", () => (synced += 1));
    t.start();
    await tick(5);
    let out = last().take();
    check(show(out) === show([{ type: "sync", inbox_seq: 0, groups: {} }]), `first sync: ${show(out)}`);
    last().feed({ type: "error", code: "rate_limited", message: "over limits.terminal_requests_per_s: slow down, try again in 50 ms" });
    const end = Date.now() + 5000;
    while (Date.now() < end && !last().sent.some((f) => f.type === "sync")) await tick(20);
    out = last().take();
    check(show(out) === show([{ type: "sync", inbox_seq: 0, groups: {} }]), `the refused sync is sent again: ${show(out)}`);
    last().feed(msg(1), msg(2), msg(3), msg(4), msg(5), { type: "synced", inbox_seq: 5, groups: {}, more: false });
    await tick();
    check(synced === 1, `caught up (${synced} synced events)`);
    check(t.got.length === 5, `every message once: ${show(t.got)}`);
    check(t.errors.includes("rate_limited"), `the error is still told to the app: ${show(t.errors)}`);
    facts.positions = t.positions;
    t.close();
  },

  /** An error naming another frame (`of`: a refused `read`) while a `sync` is answered does
   * not send the sync again (it would be refused as one already being answered); one naming
   * the `sync` does. */
  async only_a_refused_sync_is_sent_again() {
    nextWelcome = welcome(2, {});
    const t = terminal({ inbox_seq: 0, groups: {} });
    t.start();
    await tick(5);
    let out = last().take();
    check(show(out) === show([{ type: "sync", inbox_seq: 0, groups: {} }]), `first sync: ${show(out)}`);
    last().feed({ type: "error", code: "rate_limited", message: "slow down", of: "read" });
    await tick(1500); // past the SDK's 1 s retry delay of a refused sync
    out = last().take().filter((f) => f.type === "sync");
    check(out.length === 0, `a refused read sends no sync: ${show(out)}`);
    last().feed({ type: "error", code: "rate_limited", message: "slow down", of: "sync" });
    const end = Date.now() + 5000;
    while (Date.now() < end && !last().sent.some((f) => f.type === "sync")) await tick(20);
    out = last().take().filter((f) => f.type === "sync");
    check(show(out) === show([{ type: "sync", inbox_seq: 0, groups: {} }]), `the refused sync is sent again: ${show(out)}`);
    last().feed(msg(1), msg(2), { type: "synced", inbox_seq: 2, groups: {}, more: false });
    await tick();
    check(t.got.length === 2, `every message once: ${show(t.got)}`);
    check(show(t.errors) === show(["rate_limited", "rate_limited"]), `both errors told to the app: ${show(t.errors)}`);
    facts.positions = t.positions;
    t.close();
  },

  /** A `read` while the connection is down reaches the node once it is back (receipts, unread
   * counts), instead of being dropped in silence. */
  async read_while_offline_is_sent_after_reconnecting() {
    nextWelcome = welcome(3, {});
    const t = terminal({ inbox_seq: 3, groups: {} });
    t.start();
    await tick(5);
    check(t.state === "online", `online (${t.state})`);
    last().take();
    last().drop(1006);
    check(t.state === "offline", `offline (${t.state})`);
    const first = last();
    t.read("u:ann", 2);
    t.read("u:ann", 3);
    const end = Date.now() + 5000;
    while (Date.now() < end && (last() === first || t.state !== "online")) await tick(10);
    await tick(5);
    const out = last().take().filter((f) => f.type === "read");
    check(show(out) === show([{ type: "read", chat: "u:ann", seq: 3 }]), `the read after reconnecting: ${show(out)}`);
    t.close();
  },

  /** A group the user was added to while the device was away (not in its positions): what
   * was posted in it meanwhile is synced, not skipped. */
  async group_joined_while_away_is_synced() {
    nextWelcome = welcome(2, {});
    const t = terminal();
    t.start();
    await tick(5);
    check(show(t.positions) === show({ inbox_seq: 2, groups: {} }), `a new device starts at the heads: ${show(t.positions)}`);
    last().take();
    last().drop(1006);
    // Away: added to "club", where 3 messages are posted.
    nextWelcome = welcome(2, { club: 3 });
    const first = last();
    const end = Date.now() + 5000;
    while (Date.now() < end && (last() === first || t.state !== "online")) await tick(10);
    await tick(5);
    const out = last().take();
    check(show(out) === show([{ type: "sync", inbox_seq: 2, groups: { club: 0 } }]), `the club is synced: ${show(out)}`);
    last().feed(msg(1, "club"), msg(2, "club"), msg(3, "club"), { type: "synced", inbox_seq: 2, groups: { club: 3 }, more: false });
    await tick();
    check(show(t.got) === show(["club-1", "club-2", "club-3"]), `the club's messages: ${show(t.got)}`);
    t.close();
  },

  /** Sends waiting for `sent` when the node closes for good (4001 kicked, 1008) are rejected
   * then, not left hanging until their timeout. */
  async pending_sends_fail_on_a_final_close() {
    nextWelcome = welcome(0, {});
    const t = terminal({ inbox_seq: 0, groups: {} });
    t.start();
    await tick(5);
    const p = t.send("ann", "text", { text: "hi" }, { cid: "c-1" });
    let outcome = "pending";
    p.then(
      () => (outcome = "resolved"),
      (e) => (outcome = e instanceof EtherError ? `rejected ${e.code}` : `rejected ${e}`),
    );
    last().feed({ type: "kicked", reason: "replaced" });
    last().drop(4001);
    await tick(50);
    check(t.state === "closed", `closed for good (${t.state})`);
    check(outcome.startsWith("rejected"), `the pending send: ${outcome}`);
    facts.outcome = outcome;
    t.close();
  },

  /** A broadcast (`chat: "broadcast"`, no seq) that comes twice is handed over once. */
  async broadcasts_are_deduplicated_by_id() {
    nextWelcome = welcome(0, {});
    const t = terminal({ inbox_seq: 0, groups: {} });
    t.start();
    await tick(5);
    const b = { type: "msg", id: "b-1", chat: "broadcast", from: "system", seq: 0, kind: "text", body: { text: "x" }, ts: 1 };
    last().feed(b, b);
    await tick();
    check(show(t.got) === show(["b-1"]), `the broadcast once: ${show(t.got)}`);
    const out = last().take();
    check(out.length === 0, `no ack for a broadcast: ${show(out)}`);
    t.close();
  },
};

Object.assign(cases, {
  /** A `kicked` frame followed by an abnormal close (1006: a proxy, a broken connection) is as
   * final as a 4001: reconnecting would kick the device's newer connection in turn. */
  async kicked_then_abnormal_close_stays_closed() {
    nextWelcome = welcome(0, {});
    const t = terminal({ inbox_seq: 0, groups: {} });
    t.start();
    await tick(5);
    check(t.state === "online", `online (${t.state})`);
    last().feed({ type: "kicked", reason: "replaced by a newer connection of this device" });
    last().drop(1006);
    await tick(100);
    check(t.state === "closed", `closed for good (${t.state})`);
    check(conns.length === 1, `no reconnect: ${conns.length} connections`);
    t.close();
  },

  /** A node that accepts the connection but never sends `welcome` is given up after
   * `welcomeTimeoutMs` and tried again, instead of leaving the terminal connecting forever. */
  async no_welcome_is_given_up_and_retried() {
    nextWelcome = null;
    const t = terminal({ inbox_seq: 0, groups: {} }, { welcomeTimeoutMs: 50 });
    t.start();
    await tick(5);
    check(conns.length === 1 && t.state === "connecting", `connecting (${t.state})`);
    nextWelcome = welcome(0, {});
    const end = Date.now() + 5000;
    while (Date.now() < end && t.state !== "online") await tick(10);
    check(t.state === "online", `online on a later connection (${t.state}, ${conns.length} connections)`);
    check(conns.length >= 2, `tried again: ${conns.length} connections`);
    check(t.errors.includes("unavailable"), `the app is told: ${show(t.errors)}`);
    t.close();
  },

  /** A URL the WebSocket API refuses throws in its constructor: an `error` event and the
   * terminal closed, not an unhandled rejection and a terminal stuck connecting. */
  async a_refused_url_closes_with_an_error() {
    class Refusing {
      constructor(url) {
        throw new SyntaxError(`invalid URL ${url}`);
      }
    }
    const t = terminal({ inbox_seq: 0, groups: {} }, { WebSocket: Refusing });
    t.start();
    await tick(50);
    check(t.state === "closed", `closed (${t.state})`);
    check(show(t.errors) === show(["invalid_url"]), `told once: ${show(t.errors)}`);
    t.close();
  },

  /** A node that closes every connection right after its `welcome` (a slow-consumer loop, a
   * node refusing the user) is reconnected to with a growing backoff: the backoff reset at
   * every `welcome` had each terminal reconnect at the shortest delay, forever. */
  async the_backoff_grows_when_connections_close_right_after_welcome() {
    nextWelcome = welcome(0, {});
    const t = terminal({ inbox_seq: 0, groups: {} }, { reconnectMinMs: 10, reconnectMaxMs: 640 });
    const opened = [];
    t.addEventListener("welcome", () => {
      opened.push(Date.now());
      const ws = last();
      setTimeout(() => ws.drop(4002));
    });
    t.start();
    const end = Date.now() + 5000;
    while (Date.now() < end && opened.length < 7) await tick(10);
    t.close();
    const gaps = opened.slice(1).map((at, i) => at - opened[i]);
    facts.gaps = gaps;
    check(gaps.length >= 6, `7 connections: ${show(gaps)}`);
    // Attempt k waits 5..10 ms x 2^k: the 6th reconnect waits at least 160 ms.
    check(gaps[5] >= 150, `the backoff grew: ${show(gaps)}`);
  },
});

const name = process.argv[2];
try {
  if (!cases[name]) throw new Error(`no case ${name}: ${Object.keys(cases).join(", ")}`);
  await cases[name]();
} catch (e) {
  failures.push(`exception: ${e.stack ?? e}`);
}
finish();
