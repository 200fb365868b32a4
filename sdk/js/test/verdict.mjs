// What every SDK test script shares: failed checks gathered, facts noted, and one JSON verdict
// line printed at the end ({"ok": true, ...} or {"ok": false, "failures": [...]}), with the
// exit status to match. A script that does not finish in 30 s fails as timed out.
export const failures = [];
export const facts = {};

export function check(cond, what) {
  if (!cond) failures.push(what);
}

const deadline = setTimeout(() => finish("timed out"), 30000);

export function finish(fatal) {
  clearTimeout(deadline);
  if (fatal) failures.push(fatal);
  console.log(JSON.stringify({ ok: failures.length === 0, failures, facts }));
  process.exit(failures.length === 0 ? 0 : 1);
}
