// Ether-IM admin dashboard. Served by the node itself; no libraries, no network access
// beyond this origin. Polls /admin/v1/stats and /admin/v1/connections every second with
// the admin token (sessionStorage, or a #token=... fragment) and draws canvas charts.
'use strict';

(function () {
  const TOKEN_KEY = 'ether.admin.token';
  const POLL_MS = 1000;
  const WINDOW_S = 120; // seconds of history on the time charts, at most
  const WINDOW_MIN_S = 20; // ...and at least (the window grows with the data until WINDOW_S)
  const HISTORY_MAX = 600; // points kept, whatever the poll rate
  const COLORS = ['#2563eb', '#16a34a', '#d97706', '#dc2626', '#7c3aed', '#0891b2'];

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let inFlight = false;
  let polls = 0;
  let prev = null; // {t, totals, shards} of the previous poll, for rates
  const history = []; // {t, conns, accepted, deliveries, acks, ackP50, ackP99, pushP50, pushP99}
  let lastStats = null;
  let lastShardRates = [];

  // ---- formatting -----------------------------------------------------------------------

  function fmtInt(n) {
    const s = String(Math.round(n));
    return s.replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  }
  function fmtRate(r) {
    if (r === null || !isFinite(r)) return '-';
    if (r >= 100) return fmtInt(r);
    if (r >= 10) return r.toFixed(1);
    return r.toFixed(2);
  }
  function fmtLatency(s, count) {
    if (count === 0 || !isFinite(s)) return '-';
    if (s < 0.001) return Math.round(s * 1e6) + '\u00b5s';
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + 'ms';
    return s.toFixed(2) + 's';
  }
  function fmtBytes(n) {
    if (n < 1024) return n + ' B';
    const units = ['KiB', 'MiB', 'GiB', 'TiB'];
    let v = n / 1024;
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(1) + ' ' + units[i];
  }
  function fmtAge(secs) {
    secs = Math.max(0, Math.floor(secs));
    if (secs < 60) return secs + 's';
    if (secs < 3600) return Math.floor(secs / 60) + 'm' + String(secs % 60).padStart(2, '0') + 's';
    if (secs < 86400) return Math.floor(secs / 3600) + 'h' + String(Math.floor(secs % 3600 / 60)).padStart(2, '0') + 'm';
    return Math.floor(secs / 86400) + 'd' + String(Math.floor(secs % 86400 / 3600)).padStart(2, '0') + 'h';
  }
  function fmtClock(ms) {
    const d = new Date(ms);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map((x) => String(x).padStart(2, '0')).join(':');
  }

  // ---- auth -----------------------------------------------------------------------------

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return ''; }
  }
  function setToken(t) {
    try {
      if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage disabled: the token lives only in memory below */ }
    memoryToken = t;
  }
  let memoryToken = '';

  function tokenFromFragment() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (!m) return '';
    // Drop the token from the address bar and history.
    history_replace();
    try { return decodeURIComponent(m[1]); } catch (e) { return m[1]; }
  }
  function history_replace() {
    try { window.history.replaceState(null, '', location.pathname + location.search); } catch (e) { /* ignore */ }
  }

  function showLogin(message) {
    stop();
    document.body.dataset.state = 'login';
    $('dash').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    setStatus('signed out', 'idle');
    $('token').focus();
  }

  function start() {
    $('login').hidden = true;
    $('dash').hidden = false;
    $('logout').hidden = false;
    document.body.dataset.state = 'connecting';
    setStatus('connecting', 'idle');
    stop();
    poll();
    timer = setInterval(poll, POLL_MS);
  }
  function stop() {
    if (timer !== null) { clearInterval(timer); timer = null; }
  }

  // ---- polling --------------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function getJSON(path) {
    const t = token() || memoryToken;
    const resp = await fetch(path, {
      headers: { 'Authorization': 'Bearer ' + t, 'Accept': 'application/json' },
      cache: 'no-store',
      credentials: 'omit',
    });
    if (resp.status === 401) throw new Unauthorized('the node refused this token');
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      const msg = body && body.error ? body.error.code + ': ' + body.error.message : 'HTTP ' + resp.status;
      throw new Error(msg);
    }
    return body;
  }

  async function poll() {
    if (inFlight) return;
    inFlight = true;
    try {
      const [stats, conns] = await Promise.all([
        getJSON('/admin/v1/stats'),
        getJSON('/admin/v1/connections?limit=20&closed=20&' + $('conn-sort').value),
      ]);
      polls++;
      document.body.dataset.polls = String(polls);
      document.body.dataset.state = 'live';
      update(stats, conns, Date.now());
      if (stats.node.draining) setStatus('draining', 'warn'); else setStatus('live', 'ok');
    } catch (e) {
      if (e instanceof Unauthorized) {
        setToken('');
        showLogin('Wrong or expired token: ' + e.message + '.');
      } else {
        document.body.dataset.state = 'error';
        setStatus('unreachable: ' + (e && e.message ? e.message : e), 'bad');
      }
    } finally {
      inFlight = false;
    }
  }

  function setStatus(text, cls) {
    $('status-text').textContent = text;
    $('status-dot').className = 'dot ' + cls;
  }

  // ---- model ----------------------------------------------------------------------------

  function rate(now, before, key, dt) {
    if (!before || dt <= 0) return 0;
    const d = now[key] - before[key];
    return d > 0 ? d / dt : 0; // a counter that went back (restart) counts as 0
  }

  function update(stats, conns, t) {
    const totals = stats.totals;
    const dt = prev ? (t - prev.t) / 1000 : 0;
    // Rates need two polls: the first one has none (null: not drawn, shown as '-').
    const first = !prev || dt <= 0;
    const rates = {
      accepted: first ? null : rate(totals, prev.totals, 'messages_accepted', dt),
      deliveries: first ? null : rate(totals, prev.totals, 'deliveries', dt),
      acks: first ? null : rate(totals, prev.totals, 'acks', dt),
      resends: first ? null : rate(totals, prev.totals, 'resends', dt),
    };
    const prevShards = new Map(((prev && prev.shards) || []).map((s) => [s.shard, s]));
    lastShardRates = stats.shards.map((s) => ({
      shard: s.shard,
      accepted: rate(s, prevShards.get(s.shard), 'messages_accepted', dt),
      deliveries: rate(s, prevShards.get(s.shard), 'deliveries', dt),
      acks: rate(s, prevShards.get(s.shard), 'acks', dt),
    }));
    prev = { t: t, totals: totals, shards: stats.shards };
    lastStats = stats;

    history.push({
      t: t,
      conns: totals.connections,
      accepted: rates.accepted,
      deliveries: rates.deliveries,
      acks: rates.acks,
      ackP50: totals.ack_latency.p50,
      ackP99: totals.ack_latency.p99,
      pushP50: totals.push_latency.p50,
      pushP99: totals.push_latency.p99,
    });
    while (history.length > HISTORY_MAX) history.shift();

    const n = stats.node;
    $('node').textContent = n.id + ' \u00b7 v' + n.version + ' \u00b7 up ' + fmtAge(n.uptime_s) +
      ' \u00b7 ' + stats.shards.length + ' shard' + (stats.shards.length === 1 ? '' : 's');

    $('kpi-connections').textContent = fmtInt(totals.connections);
    $('kpi-parked').textContent = fmtInt(totals.parked_connections || 0) + ' parked (idle)';
    $('kpi-accepted').textContent = fmtRate(rates.accepted);
    $('kpi-deliveries').textContent = fmtRate(rates.deliveries);
    $('kpi-acks').textContent = fmtRate(rates.acks);
    $('kpi-resends').textContent = fmtRate(rates.resends);
    $('kpi-ack-p99').textContent = fmtLatency(totals.ack_latency.p99, totals.ack_latency.count);
    $('kpi-push-p99').textContent = fmtLatency(totals.push_latency.p99, totals.push_latency.count);
    $('kpi-outbound').textContent = fmtBytes(totals.outbound_bytes_queued);

    renderShardTable(stats);
    renderReasons(totals.closes, stats.storage);
    renderEvents(stats.events);
    renderCluster(stats.cluster);
    renderConnections(conns, t);
    renderCloses(conns.recent_closes);
    drawAll();
  }

  // ---- tables (built with textContent only: ids come from terminals) ---------------------

  function table(el, headers, rows, numeric) {
    el.textContent = '';
    const thead = el.createTHead().insertRow();
    headers.forEach((h, i) => {
      const th = document.createElement('th');
      th.textContent = h;
      if (numeric[i]) th.className = 'num';
      thead.appendChild(th);
    });
    const body = el.createTBody();
    if (rows.length === 0) {
      const cell = body.insertRow().insertCell();
      cell.colSpan = headers.length;
      cell.className = 'muted';
      cell.textContent = 'none';
      return;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      row.forEach((v, i) => {
        const td = tr.insertCell();
        if (v && typeof v === 'object') {
          const span = document.createElement('span');
          span.className = v.cls;
          span.textContent = v.text;
          td.appendChild(span);
        } else {
          td.textContent = v;
        }
        if (numeric[i]) td.className = 'num';
      });
    }
  }

  function renderShardTable(stats) {
    const rates = new Map(lastShardRates.map((r) => [r.shard, r]));
    const rows = stats.shards.map((s) => {
      const r = rates.get(s.shard) || { accepted: 0, deliveries: 0, acks: 0 };
      return [s.shard, fmtInt(s.connections), fmtRate(r.accepted), fmtRate(r.deliveries), fmtRate(r.acks),
        fmtInt(s.mesh_queue_depth), fmtBytes(s.outbound_bytes_queued),
        fmtLatency(s.ack_latency.p99, s.ack_latency.count), fmtLatency(s.push_latency.p99, s.push_latency.count),
        fmtInt(s.auth_failures)];
    });
    table($('shards-table'),
      ['Shard', 'Conns', 'Acc/s', 'Dlv/s', 'Ack/s', 'Mesh q', 'Out queued', 'Ack p99', 'Push p99', 'Auth fail'],
      rows, [false, true, true, true, true, true, true, true, true, true]);
  }

  function reasonBadge(reason) {
    return { text: reason, cls: 'badge r-' + String(reason).replace(/[^a-z_]/g, '') };
  }

  function renderReasons(closes, storage) {
    const rows = Object.entries(closes || {})
      .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))
      .map(([reason, n]) => [reasonBadge(reason), fmtInt(n)]);
    table($('reasons-table'), ['Reason', 'Closed'], rows, [false, true]);
    const st = $('storage');
    if (storage) {
      st.textContent = 'Storage: ' + fmtInt(storage.batches) + ' batches, ' + fmtInt(storage.ops) +
        ' ops, queue ' + fmtInt(storage.queue_depth) + ', batch p50 ' + Math.round(storage.batch_size.p50) +
        ', commit p99 ' + fmtLatency(storage.commit_latency.p99, storage.commit_latency.count);
    } else {
      st.textContent = 'Storage: no local store.';
    }
  }

  function renderEvents(events) {
    const el = $('events');
    if (!events) {
      el.textContent = 'Webhook: none configured.';
      return;
    }
    const role = events.dispatching ? 'delivering' : 'standing by (another node delivers)';
    let text = 'Webhook ' + events.webhook_url + ': ' + role + ', ' + fmtInt(events.events_sent) + ' events in ' +
      fmtInt(events.batches_sent) + ' batches, ' + fmtInt(events.failures) + ' failed attempts';
    if (events.consecutive_failures > 0) {
      text += ', FAILING (' + fmtInt(events.consecutive_failures) + ' in a row: ' + (events.last_error || '?') + ')';
    }
    el.textContent = text + '.';
    el.className = events.consecutive_failures > 0 ? 'warn' : 'muted';
  }

  function renderCluster(cluster) {
    const el = $('cluster');
    if (!cluster) {
      el.textContent = 'Cluster: standalone node.';
      el.className = 'muted';
      return;
    }
    const age = Math.max(cluster.out_ok_age_ms, cluster.in_ok_age_ms) / 1000;
    let text = 'Cluster node ' + cluster.node_id + ': bus read ' + fmtInt(cluster.own_entries_read) + ' own + ' +
      fmtInt(cluster.shared_entries_read) + ' shared, published ' + fmtInt(cluster.published_routed) + ' routed (' +
      fmtInt(cluster.routed_appends) + ' appends) + ' + fmtInt(cluster.published_shared) + ' shared, queue ' +
      fmtInt(cluster.queue_depth) + ', Redis answered ' + age.toFixed(1) + ' s ago';
    if (cluster.dropped > 0 || cluster.redis_errors > 0) {
      text += ', ' + fmtInt(cluster.dropped) + ' dropped, ' + fmtInt(cluster.redis_errors) + ' Redis errors';
    }
    el.textContent = text + '.';
    el.className = age > 10 ? 'warn' : 'muted';
  }

  function renderConnections(conns, now) {
    $('conn-total').textContent = conns.connections.length + ' of ' + fmtInt(conns.total) +
      ' (sort ' + conns.sort + ' ' + conns.order + ')';
    const rows = conns.connections.map((c) => [c.user, c.device, c.platform, c.shard, c.remote,
      fmtAge((now - c.since_ms) / 1000), fmtAge((now - c.last_activity_ms) / 1000), fmtInt(c.unacked),
      fmtBytes(c.queued_bytes)]);
    table($('conns-table'), ['User', 'Device', 'Platform', 'Shard', 'Remote', 'Age', 'Idle', 'Unacked', 'Queued'],
      rows, [false, false, false, true, false, true, true, true, true]);
  }

  function renderCloses(closes) {
    const rows = (closes || []).map((c) => [fmtClock(c.closed_ms), c.user, c.device, c.platform, c.shard,
      c.remote, fmtAge((c.closed_ms - c.since_ms) / 1000), reasonBadge(c.reason)]);
    table($('closes-table'), ['Closed', 'User', 'Device', 'Platform', 'Shard', 'Remote', 'Lasted', 'Reason'],
      rows, [false, false, false, false, true, false, true, false]);
  }

  // ---- charts (plain canvas) ------------------------------------------------------------

  function setup(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(100, canvas.clientWidth);
    const h = Math.max(80, canvas.clientHeight);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = '11px system-ui, -apple-system, "Segoe UI", sans-serif';
    return { ctx: ctx, w: w, h: h };
  }

  // A "nice" axis maximum: 1, 2, 2.5 or 5 times a power of ten, at least `v`.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // An axis maximum for whole counts: below 20 a multiple of 4, so the 4 gridlines fall on
  // whole numbers; above, as niceMax.
  function countMax(v) {
    return v < 20 ? Math.max(4, Math.ceil(v / 4) * 4) : niceMax(v);
  }

  // The time window: the data seen so far, at least WINDOW_MIN_S, at most WINDOW_S.
  function timeWindow(now) {
    const span = history.length ? (now - history[0].t) / 1000 : 0;
    const win = Math.min(WINDOW_S, Math.max(WINDOW_MIN_S, Math.ceil(span / 10) * 10));
    const step = [5, 10, 15, 30, 60].find((s) => win / s <= 6) || 60;
    return { win: win, step: step };
  }

  function axisFmt(fmt) {
    return (v) => (v === 0 ? '0' : fmt(v));
  }

  function legend(ctx, x0, items) {
    let lx = x0;
    ctx.textAlign = 'left';
    ctx.textBaseline = 'middle';
    for (const it of items) {
      ctx.strokeStyle = it.color;
      ctx.fillStyle = it.color;
      if (it.bar) {
        ctx.fillRect(lx, 6, 12, 10);
      } else {
        ctx.lineWidth = 2;
        ctx.setLineDash(it.dash ? [4, 3] : []);
        ctx.beginPath(); ctx.moveTo(lx, 11); ctx.lineTo(lx + 14, 11); ctx.stroke();
        ctx.setLineDash([]);
      }
      ctx.fillStyle = '#374151';
      ctx.fillText(it.label, lx + 18, 11);
      lx += 30 + ctx.measureText(it.label).width;
    }
  }

  function lineChart(canvas, series, fmt, counts) {
    const { ctx, w, h } = setup(canvas);
    const pad = { l: 56, r: 12, t: 24, b: 20 };
    const now = history.length ? history[history.length - 1].t : Date.now();
    const { win, step } = timeWindow(now);
    const t0 = now - win * 1000;
    const pts = history.filter((p) => p.t >= t0);
    let max = 0;
    for (const s of series) for (const p of pts) max = Math.max(max, s.get(p) || 0);
    max = counts ? countMax(max * 1.1) : niceMax(max * 1.1);
    const x = (t) => pad.l + (w - pad.l - pad.r) * (t - t0) / (win * 1000);
    const y = (v) => h - pad.b - (h - pad.t - pad.b) * (v / max);
    const yfmt = axisFmt(fmt);

    ctx.strokeStyle = '#e5e7eb';
    ctx.fillStyle = '#6b7280';
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (let i = 0; i <= 4; i++) {
      const v = max * i / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
      ctx.fillText(yfmt(v), pad.l - 6, yy);
    }
    ctx.textBaseline = 'top';
    for (let s = win; s >= 0; s -= step) {
      ctx.textAlign = s === 0 ? 'right' : (s === win ? 'left' : 'center');
      ctx.fillText(s === 0 ? 'now' : '-' + s + 's', x(now - s * 1000), h - pad.b + 5);
    }

    legend(ctx, pad.l, series.map((s, i) => {
      let last = null;
      for (let j = pts.length - 1; j >= 0 && last === null; j--) last = s.get(pts[j]);
      return {
        color: s.color || COLORS[i % COLORS.length],
        dash: s.dash,
        label: s.name + (last === null ? '' : ' ' + fmt(last)),
      };
    }));

    series.forEach((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      const drawn = pts.filter((p) => s.get(p) !== null && s.get(p) !== undefined);
      if (drawn.length === 0) return;
      if (s.fill && drawn.length > 1) {
        ctx.fillStyle = color;
        ctx.globalAlpha = 0.10;
        ctx.beginPath();
        ctx.moveTo(x(drawn[0].t), y(0));
        drawn.forEach((p) => ctx.lineTo(x(p.t), y(s.get(p))));
        ctx.lineTo(x(drawn[drawn.length - 1].t), y(0));
        ctx.closePath();
        ctx.fill();
        ctx.globalAlpha = 1;
      }
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.lineJoin = 'round';
      ctx.setLineDash(s.dash ? [5, 4] : []);
      ctx.beginPath();
      drawn.forEach((p, j) => {
        if (j === 0) ctx.moveTo(x(p.t), y(s.get(p))); else ctx.lineTo(x(p.t), y(s.get(p)));
      });
      ctx.stroke();
      ctx.setLineDash([]);
      const lastP = drawn[drawn.length - 1];
      ctx.fillStyle = color;
      ctx.beginPath();
      ctx.arc(x(lastP.t), y(s.get(lastP)), 3, 0, 2 * Math.PI);
      ctx.fill();
    });
  }

  function shardChart(canvas) {
    const { ctx, w, h } = setup(canvas);
    if (!lastStats) return;
    const shards = lastStats.shards;
    const rates = new Map(lastShardRates.map((r) => [r.shard, r]));
    const pad = { l: 56, r: 10, t: 22, b: 34 };
    const max = countMax(Math.max(1, ...shards.map((s) => s.connections)) * 1.1);
    const y = (v) => h - pad.b - (h - pad.t - pad.b) * (v / max);
    ctx.strokeStyle = '#e5e7eb';
    ctx.fillStyle = '#6b7280';
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (let i = 0; i <= 4; i++) {
      const yy = Math.round(y(max * i / 4)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
      ctx.fillText(fmtInt(max * i / 4), pad.l - 6, yy);
    }
    legend(ctx, pad.l, [{ color: COLORS[0], bar: true, label: 'connections (bars), accepted/s (below)' }]);
    const n = Math.max(1, shards.length);
    const slot = (w - pad.l - pad.r) / n;
    const bw = Math.max(4, Math.min(56, slot * 0.6));
    shards.forEach((s, i) => {
      const cx = pad.l + slot * (i + 0.5);
      const top = y(s.connections);
      ctx.fillStyle = COLORS[0];
      ctx.fillRect(cx - bw / 2, top, bw, h - pad.b - top);
      ctx.fillStyle = '#111827';
      ctx.textAlign = 'center';
      ctx.textBaseline = 'bottom';
      ctx.fillText(fmtInt(s.connections), cx, top - 2);
      ctx.textBaseline = 'top';
      ctx.fillStyle = '#374151';
      ctx.fillText('shard ' + s.shard, cx, h - pad.b + 4);
      const r = rates.get(s.shard);
      ctx.fillStyle = '#6b7280';
      ctx.fillText(fmtRate(r ? r.accepted : 0) + '/s', cx, h - pad.b + 18);
    });
  }

  function drawAll() {
    lineChart($('chart-connections'), [
      { name: 'connections', get: (p) => p.conns, fill: true },
    ], fmtInt, true);
    lineChart($('chart-rates'), [
      { name: 'accepted', get: (p) => p.accepted },
      { name: 'deliveries', get: (p) => p.deliveries },
      { name: 'acks', get: (p) => p.acks },
    ], fmtRate);
    const lat = (v) => fmtLatency(v, 1);
    lineChart($('chart-latency'), [
      { name: 'ack p50', get: (p) => p.ackP50, color: COLORS[0], dash: true },
      { name: 'ack p99', get: (p) => p.ackP99, color: COLORS[0] },
      { name: 'push p50', get: (p) => p.pushP50, color: COLORS[2], dash: true },
      { name: 'push p99', get: (p) => p.pushP99, color: COLORS[2] },
    ], lat);
    shardChart($('chart-shards'));
  }

  // ---- wiring ---------------------------------------------------------------------------

  function init() {
    $('login-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = $('token').value.trim();
      if (!t) return;
      setToken(t);
      $('token').value = '';
      start();
    });
    $('logout').addEventListener('click', () => {
      setToken('');
      showLogin('Signed out.');
    });
    $('conn-sort').addEventListener('change', () => { if (timer !== null) poll(); });
    window.addEventListener('resize', () => { if (lastStats) drawAll(); });
    const fromFragment = tokenFromFragment();
    if (fromFragment) setToken(fromFragment);
    if (token() || memoryToken) start(); else showLogin('');
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
