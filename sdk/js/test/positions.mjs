// The JS SDK's positions against a scripted node (no real one: a fake WebSocket), for what a
// real node cannot be made to do on cue (driven by engine/tests/js_sdk.rs): a `sync` whose
// pages skip purged seqs (retention), and a gap among live messages. Prints one JSON line:
// {"ok": true, ...} or {"ok": false, "failures": [...]}.
import { EtherTerminal } from "../ether-im.mjs";
import { check, facts, failures, finish } from "./verdict.mjs";


/** The fake connection: what the SDK sends lands in `sent`; `feed` plays node frames. */
let ws = null;
class FakeWebSocket {
  constructor() {
    this.readyState = 1;
    this.sent = [];
    ws = this;
    setTimeout(() => this.feed({ type: "welcome", user: "bob", device: "web", session: "1", heartbeat_s: 30, inbox_seq: 20, groups: { team: 6 } }));
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
  take() {
    const out = this.sent.filter((f) => f.type !== "ping");
    this.sent = [];
    return out;
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const msg = (seq, group) => ({
  type: "msg",
  id: `${group ?? "inbox"}-${seq}`,
  chat: group ? `g:${group}` : "u:ann",
  from: "ann",
  seq,
  kind: "text",
  body: { text: `${seq}` },
  ts: 1,
});
const range = (a, b, group) => Array.from({ length: b - a + 1 }, (_, i) => msg(a + i, group));
const show = (frames) => JSON.stringify(frames);

try {
  const t = new EtherTerminal({
    url: "ws://fake",
    token: "t",
    device: "web",
    positions: { inbox_seq: 0, groups: { team: 0 } },
    WebSocket: FakeWebSocket,
  });
  const got = [];
  let synced = 0;
  t.addEventListener("message", (e) => got.push(e.detail.id));
  t.addEventListener("synced", () => (synced += 1));
  t.start();
  await tick(5);
  let out = ws.take();
  check(show(out) === show([{ type: "sync", inbox_seq: 0, groups: { team: 0 } }]), `first sync: ${show(out)}`);

  // 1. Inbox 1..9 purged: the first page is 10..14 (room for 5), and live 21 overtakes it.
  //    Everything before 10 is gone, so the next sync goes on from 14, and 14 is acked.
  ws.feed(...range(10, 12), msg(21), ...range(13, 14), { type: "synced", inbox_seq: 20, groups: { team: 6 }, more: true });
  await tick();
  out = ws.take();
  check(show(out) === show([{ type: "ack", seq: 14 }, { type: "sync", inbox_seq: 14, groups: { team: 0 } }]), `after page 1: ${show(out)}`);

  // 2. Pages go on (15..19, then 20 and the group, whose 1..2 are purged): the last page
  //    (more: false) moves every stream to its head and over the live 21.
  ws.feed(...range(15, 19), { type: "synced", inbox_seq: 21, groups: { team: 6 }, more: true });
  await tick();
  out = ws.take();
  check(show(out) === show([{ type: "ack", seq: 19 }, { type: "sync", inbox_seq: 19, groups: { team: 0 } }]), `after page 2: ${show(out)}`);
  ws.feed(msg(20), msg(21), ...range(3, 6, "team"), { type: "synced", inbox_seq: 21, groups: { team: 6 }, more: false });
  await tick();
  out = ws.take();
  check(
    show(out) === show([{ type: "ack", seq: 21 }, { type: "ack", group: "team", seq: 6 }]),
    `after the last page: ${show(out)}`,
  );
  check(synced === 1, `one synced event (${synced})`);
  check(t.positions.inbox_seq === 21 && t.positions.groups.team === 6, `positions ${show(t.positions)}`);

  // 3. A live gap (22 lost on the way): 23 is handed over, not acked; after a moment a sync
  //    fetches what is missing, and then 23 is acked.
  ws.feed(msg(23));
  await tick();
  out = ws.take();
  check(out.length === 0, `nothing acked past a gap: ${show(out)}`);
  await tick(1200);
  out = ws.take();
  check(show(out) === show([{ type: "sync", inbox_seq: 21, groups: { team: 6 } }]), `a sync fetches the gap: ${show(out)}`);
  ws.feed(msg(22), msg(23), { type: "synced", inbox_seq: 23, groups: { team: 6 }, more: false });
  await tick();
  out = ws.take();
  check(show(out) === show([{ type: "ack", seq: 23 }]), `acked once the gap is filled: ${show(out)}`);

  const want = [...range(10, 12), msg(21), ...range(13, 20), ...range(3, 6, "team"), msg(23), msg(22)].map((m) => m.id);
  check(show(got) === show(want), `every message once: ${show(got)}`);
  facts.got = got;
  facts.positions = t.positions;
  t.close();
} catch (e) {
  failures.push(`exception: ${e.stack ?? e}`);
}
finish();
