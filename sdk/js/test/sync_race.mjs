// A live message that overtakes a `sync` (driven by engine/tests/js_sdk.rs, whose node keeps
// INBOX_N messages in bob's inbox and GROUP_N in group "club", with pages of 5). Bob starts
// from position 0 of both; his first `synced` (more: true) is held back, the test pushes one
// live message to each stream (on "PAGE" it sends them, then answers "PUSHED"), they reach
// the SDK, then the `synced`: the SDK must go on syncing from where the pages got to (not
// from the live seqs), hand every message over once, and never ack a seq it lacks anything
// up to. Prints one JSON line: {"ok": true, ...} or {"ok": false, "failures": [...]}.
import { createInterface } from "node:readline";
import { EtherTerminal } from "../ether-im.mjs";
import { check, facts, failures, finish } from "./verdict.mjs";

const INBOX_N = Number(process.env.INBOX_N);
const GROUP_N = Number(process.env.GROUP_N);


const stdinLines = [];
let lineWaiter = null;
createInterface({ input: process.stdin }).on("line", (l) => {
  stdinLines.push(l);
  if (lineWaiter) lineWaiter();
});
async function waitLine(expected) {
  while (!stdinLines.includes(expected)) await new Promise((r) => (lineWaiter = r));
}

/** Resolves when `pred()` holds, polling. */
async function until(pred, what, ms = 10000) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`never: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

// What reached the SDK (per stream: "inbox" or the group id) and what it acknowledged.
const received = { inbox: new Set(), club: new Set() };
const acks = { inbox: [], club: [] };
let heldSynced = null;
let syncedSeen = 0;

/** Everything of `stream` from 1 up to `seq` reached the SDK. */
const hasUpTo = (stream, seq) => Array.from({ length: seq }, (_, i) => i + 1).every((s) => received[stream].has(s));

/** A WebSocket that shows the test what goes both ways, and holds back the first `synced`. */
class Tap {
  constructor(url, protocol) {
    this.ws = new WebSocket(url, protocol);
    this.onmessage = this.onclose = this.onerror = null;
    this.ws.onmessage = (ev) => {
      const f = JSON.parse(ev.data);
      if (f.type === "msg") received[f.chat === "g:club" ? "club" : "inbox"].add(f.seq);
      if (f.type === "synced" && ++syncedSeen === 1) {
        heldSynced = () => this.onmessage?.(ev);
        console.log("PAGE");
        return;
      }
      this.onmessage?.(ev);
    };
    this.ws.onclose = (ev) => this.onclose?.(ev);
    this.ws.onerror = (ev) => this.onerror?.(ev);
  }
  get readyState() {
    return this.ws.readyState;
  }
  send(data) {
    const f = JSON.parse(data);
    if (f.type === "ack") {
      const stream = f.group ?? "inbox";
      acks[stream].push(f.seq);
      check(hasUpTo(stream, f.seq), `ack of ${stream} up to ${f.seq} sent without all of 1..${f.seq}`);
    }
    this.ws.send(data);
  }
  close(code, reason) {
    this.ws.close(code, reason);
  }
}

try {
  const bob = new EtherTerminal({
    url: process.env.ETHER_WS,
    token: process.env.TOKEN_BOB,
    device: "web",
    positions: { inbox_seq: 0, groups: { club: 0 } },
    WebSocket: Tap,
    reconnectMinMs: 50,
  });
  const got = { inbox: [], club: [] };
  let synced = 0;
  bob.addEventListener("message", (e) => got[e.detail.chat === "g:club" ? "club" : "inbox"].push(e.detail.seq));
  bob.addEventListener("synced", () => (synced += 1));
  bob.start();

  // The first page is in; its `synced` waits until both live messages reached the SDK.
  await waitLine("PUSHED");
  await until(() => received.inbox.has(INBOX_N + 1) && received.club.has(GROUP_N + 1), "the live messages");
  check(
    got.inbox.includes(INBOX_N + 1) && got.club.includes(GROUP_N + 1),
    "live messages are handed to the app at once, during the sync",
  );
  heldSynced();

  const all = (n) => Array.from({ length: n }, (_, i) => i + 1).join();
  const done = () =>
    synced > 0 && acks.inbox.at(-1) === INBOX_N + 1 && acks.club.at(-1) === GROUP_N + 1;
  await until(done, "caught up and acknowledged everything").catch((e) => failures.push(e.message));
  await new Promise((r) => setTimeout(r, 300)); // anything more (e.g. handed over twice)?
  facts.inbox = got.inbox;
  facts.club = got.club;
  facts.acks = acks;
  facts.positions = bob.positions;
  check([...got.inbox].sort((a, b) => a - b).join() === all(INBOX_N + 1), `inbox seqs, each once: ${got.inbox}`);
  check([...got.club].sort((a, b) => a - b).join() === all(GROUP_N + 1), `club seqs, each once: ${got.club}`);
  check(
    bob.positions.inbox_seq === INBOX_N + 1 && bob.positions.groups.club === GROUP_N + 1,
    `positions ${JSON.stringify(bob.positions)}`,
  );
  bob.close();
  await new Promise((r) => setTimeout(r, 200)); // the node saves the positions on close
  finish();
} catch (e) {
  finish(`exception: ${e.stack ?? e}`);
}
