// The JS SDK against a real node (driven by engine/tests/js_sdk.rs, which starts the node,
// passes its address and tokens in the environment, and pushes API messages when asked on
// stdout). Prints one JSON line: {"ok": true, ...} or {"ok": false, "failures": [...]}.
//
//   ETHER_WS=ws://127.0.0.1:9000 TOKEN_ANN=.. TOKEN_BOB=.. node --experimental-websocket scenario.mjs
import { createInterface } from "node:readline";
import { EtherTerminal, EtherError } from "../ether-im.mjs";
import { check, facts, failures, finish } from "./verdict.mjs";



const lines = createInterface({ input: process.stdin });
const stdinLines = [];
let lineWaiter = null;
lines.on("line", (l) => {
  stdinLines.push(l);
  if (lineWaiter) lineWaiter();
});
async function waitLine(expected) {
  while (!stdinLines.includes(expected)) await new Promise((r) => (lineWaiter = r));
}

const EVENTS = ["message", "receipt", "state", "welcome", "synced"];

/** Resolves when `pred()` holds, checking on every event of `t` (and now). */
function until(t, pred, what) {
  return new Promise((resolve, reject) => {
    if (pred()) return resolve();
    const timer = setTimeout(() => reject(new Error(`never: ${what}`)), 10000);
    const on = () => {
      if (pred()) {
        clearTimeout(timer);
        for (const ev of EVENTS) t.removeEventListener(ev, on);
        resolve();
      }
    };
    for (const ev of EVENTS) t.addEventListener(ev, on);
  });
}

function terminal(token, device) {
  const t = new EtherTerminal({ url: process.env.ETHER_WS, token, device, platform: "web", reconnectMinMs: 50 });
  t.got = [];
  t.receipts = [];
  t.addEventListener("message", (e) => t.got.push(e.detail));
  t.addEventListener("receipt", (e) => t.receipts.push(e.detail));
  return t;
}

try {
  const ann = terminal(process.env.TOKEN_ANN, "web");
  // Bob's token comes from a function (called on every connect, as an app refreshes it).
  let bobTokenCalls = 0;
  const bob = terminal(() => {
    bobTokenCalls += 1;
    return process.env.TOKEN_BOB;
  }, "web");
  ann.start();
  bob.start();
  await until(ann, () => ann.state === "online", "ann online");
  await until(bob, () => bob.state === "online", "bob online");

  // 1. Twenty sends, answered once durable; bob gets them in order, ann her own copies.
  const sent = await Promise.all(
    Array.from({ length: 20 }, (_, i) => ann.send("bob", "text", { text: `t${i}` })),
  );
  check(new Set(sent.map((s) => s.id)).size === 20, "20 distinct ids");
  await until(bob, () => bob.got.length >= 20, "bob has 20");
  const fromAnn = bob.got.filter((m) => m.chat === "u:ann");
  check(
    fromAnn.map((m) => m.body.text).join() === sent.map((_, i) => `t${i}`).join(),
    `bob got t0..t19 in order: ${fromAnn.map((m) => m.body.text)}`,
  );
  check(fromAnn.every((m, i) => i === 0 || m.seq === fromAnn[i - 1].seq + 1), "seqs without gaps");
  await until(ann, () => ann.got.filter((m) => m.chat === "u:bob").length >= 20, "ann's own copies");

  // 2. Bob reads; ann gets the receipt.
  const last = fromAnn[fromAnn.length - 1];
  bob.read("u:ann", last.seq);
  await until(ann, () => ann.receipts.length >= 1, "a receipt");
  check(ann.receipts[0].up_to === last.id && ann.receipts[0].by === "bob", `receipt ${JSON.stringify(ann.receipts[0])}`);

  // 3. Bob goes away; ann sends 5 and the business 10 (the Rust side, on our signal); bob
  //    comes back and catches up: everything, once, in order.
  bob.suspend();
  check(bob.state === "offline", `suspended bob is offline (${bob.state})`);
  const offline = await Promise.all(Array.from({ length: 5 }, (_, i) => ann.send("bob", "text", { text: `o${i}` })));
  console.log("SUSPENDED");
  await waitLine("PUSHED");
  const before = bob.got.length;
  bob.resume();
  await until(bob, () => bob.got.length >= before + 15, "bob caught up with 15");
  const caught = bob.got.slice(before);
  check(caught.length === 15, `15 new messages after resume, got ${caught.length}`);
  const caughtAnn = caught.filter((m) => m.chat === "u:ann").map((m) => m.id);
  check(caughtAnn.join() === offline.map((s) => s.id).join(), "ann's offline sends, in order");
  const caughtMax = caught.filter((m) => m.chat === "u:max").map((m) => m.body.text);
  check(caughtMax.join() === Array.from({ length: 10 }, (_, i) => `api${i}`).join(), `the API's 10: ${caughtMax}`);
  check(new Set(bob.got.map((m) => m.id)).size === bob.got.length, "no message handed over twice");
  check(bobTokenCalls >= 2, `the token function is called on every connect (${bobTokenCalls})`);
  check(bob.state === "online", "bob online again");

  // 4. Bad sends reject with the node's error; a repeated cid answers the first message.
  try {
    await ann.send("no such user!", "text", { text: "x" });
    failures.push("a send to a bad user id resolved");
  } catch (e) {
    check(e instanceof EtherError && e.code === "invalid_body", `bad id: ${e}`);
  }
  try {
    await ann.send("bob", "text", { txt: "typo" });
    failures.push("a send with a bad body resolved");
  } catch (e) {
    check(e instanceof EtherError && e.code === "invalid_body" && /text/.test(e.message), `bad body: ${e}`);
  }
  const first = await ann.send("bob", "text", { text: "once" }, { cid: "fixed-cid-1" });
  const again = await ann.send("bob", "text", { text: "once" }, { cid: "fixed-cid-1" });
  check(first.id === again.id && first.seq === again.seq, "a repeated cid answers with the first message");
  await until(bob, () => bob.got.some((m) => m.body.text === "once"), "bob got 'once'");
  await new Promise((r) => setTimeout(r, 300));
  check(bob.got.filter((m) => m.body.text === "once").length === 1, "the repeated cid stored nothing new");

  // 5. Messages that come again (here the app rewinds its positions, so `sync` replays the
  //    whole inbox) are acknowledged but not handed to the app twice.
  const had = bob.got.length;
  let replayed = false;
  bob.addEventListener("synced", () => (replayed = true));
  bob.suspend();
  bob.positions.inbox_seq = 0;
  bob.resume();
  await until(bob, () => replayed, "the rewound inbox replayed");
  check(bob.got.length === had, `replayed messages handed over again (${bob.got.length} vs ${had})`);

  // 6. A group id dissolved and created again is a new stream from seq 1: bob's position of
  //    the old one (here 999) is past the new head, so he starts it over and gets all three.
  bob.suspend();
  bob.positions.groups.club = 999;
  console.log("GROUP");
  await waitLine("GROUPED");
  bob.resume();
  await until(bob, () => bob.got.filter((m) => m.chat === "g:club").length >= 3, "the new club's 3 messages");
  const club = bob.got.filter((m) => m.chat === "g:club").map((m) => m.body.text);
  check(club.join() === "c0,c1,c2", `the new club's messages, in order: ${club}`);

  facts.bob_received = bob.got.length;
  facts.ann_received = ann.got.length;
  ann.close();
  bob.close();
  check(ann.state === "closed", "closed");
  finish();
} catch (e) {
  finish(String(e && e.stack ? e.stack : e));
}
