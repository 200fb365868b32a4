-- The Redis backend's data model and every op (`OPS.<name>`), run atomically by Redis.
-- Owns: the layout of every key under the prefix ARGV[1]. Must not touch: any key outside the
-- prefix. Each op's script is this file followed by `return OPS.<name>()` (see mod.rs); an op
-- checks everything it needs before its first write, so a refused op writes nothing, and runs
-- a command that can fail (XADD to the events stream) before the writes that matter: Redis
-- keeps what a failing script wrote.
--
-- Replies: {'ok', ...} on success, {'<error kind>', message} on refusal, where the kind is
-- one of not_found, forbidden, conflict, limit, invalid.
--
-- Message ids arrive as 20-digit zero-padded decimal strings ("pid") and are never turned
-- into Lua numbers (doubles). Seqs, counters and limits are numbers below 2^52 (mod.rs clamps).
--
-- Keys (P = prefix):
--   P users              set    every user name seen (a peer must exist for SetRead u:<peer>)
--   P ih:<user>          string inbox head (INCR); never reset, so purged seqs are not reused
--   P ib:<user>          zset   inbox positions: score seq, member "<pid>|<o>|<peer>", o = 1 when
--                               the owner sent it (outgoing or to oneself), 0 when received
--   P m:<pid>            hash   message: t (u|g), ts, from, to | gid, seq, fseq, kind, body, cid
--   P msgq               list   every stored pid in the order stored (about time order): retention
--   P msgs               zset   the same before msgq (score 0, lexical = id order); only purged
--   P cid:<from>         hash   cid -> pid (idempotency of the sender's single chats); rows of
--                               group messages stored before group cids were scoped are left
--                               here, read by no group lookup (a retry straddling the upgrade
--                               is stored again: accepted), dropped by the purge of their message
--   P cidg:<from>        hash   "<gid>|<cid>" -> pid (idempotency of the sender's posts to one
--                               group: the same cid in another group is another message)
--   P rd:<user>          hash   read positions: "u:<peer>" | "g:<gid>" -> seq; and "j:<gid>" ->
--                               the group's head when the user joined it (absent: 0): what came
--                               before is history, not unread, not counted in read counts
--   P dl:<user>          hash   delivery positions: "<device>|i" | "<device>|g:<gid>" -> seq
--   P gid                string group number counter; a recreated name gets a new number
--   P gi:<name>          string group name -> gid (live groups only)
--   P gr:<gid>           hash   name, title, owner, created
--   P gm:<gid>           zset   members, score 0 (lexical order: ListMembers' cursor)
--   P ug:<user>          zset   the user's groups: score and member gid
--   P gh:<gid>           string group log head (INCR); deleted with the group
--   P gl:<gid>           zset   group log: score seq, member "<pid>|<from>"
--                               (a dissolved group's log is left to retention)
--   P revoked            hash   "<user>|<device>" (device '' = every device) -> ms: terminal
--                               tokens issued before it are refused
--   P obseq              string outbox seq counter (never reused)
--   P ob                 zset   outbox seqs, score = member = seq
--   P ev:<seq>           hash   ts, kind, data
--   P obdropped          string events the outbox cap (events.outbox_max) dropped, in total
local call = redis.call
local P = ARGV[1]
local SCAN_MAX = 20000 -- keep in step with sqlite::SCAN_ITEMS_MAX
local CHUNK = 256
local MAXSEQ = 4503599627370496 -- 2^52: "no bound" for seqs
local OUTBOX_TRIM_STEP = 1000 -- keep in step with op::OUTBOX_TRIM_STEP

local OPS = {}

local function k(a, b)
  if b then
    return P .. a .. b
  end
  return P .. a
end

local function num(v)
  if v then
    return tonumber(v) or 0
  end
  return 0
end

local function fmt(x)
  return string.format('%d', x)
end

local function pos_id(m)
  return string.sub(m, 1, 20)
end

local function inbox_out(m)
  return string.sub(m, 22, 22) == '1'
end

local function inbox_peer(m)
  return string.sub(m, 24)
end

local function group_from(m)
  return string.sub(m, 22)
end

local function is_user(u)
  return call('SISMEMBER', k('users'), u) == 1
end

local function is_member(gid, user)
  return call('ZSCORE', k('gm:', gid), user) ~= false
end

-- Visits positions of zset `key` with lo < seq < hi, ascending or descending, at most `max`
-- of them; `visit(seq, member)` returns false to stop. Returns whether it stopped early.
local function scan(key, lo, hi, asc, max, chunk, visit)
  local seen = 0
  while true do
    local rows
    if asc then
      rows = call('ZRANGEBYSCORE', key, '(' .. fmt(lo), '(' .. fmt(hi), 'WITHSCORES', 'LIMIT', 0, chunk)
    else
      rows = call('ZREVRANGEBYSCORE', key, '(' .. fmt(hi), '(' .. fmt(lo), 'WITHSCORES', 'LIMIT', 0, chunk)
    end
    for i = 1, #rows, 2 do
      if seen >= max then
        return true
      end
      seen = seen + 1
      local seq = tonumber(rows[i + 1])
      if not visit(seq, rows[i]) then
        return true
      end
      if asc then
        lo = seq
      else
        hi = seq
      end
    end
    if #rows < 2 * chunk then
      return false
    end
    chunk = CHUNK
  end
end

-- A page of positions in (lo, hi) kept by `keep` (nil: all), as the SQLite backend pages:
-- {head, more, scanned_to, entries}.
local function page(key, head, lo, hi, asc, limit, keep, entry)
  local items = {}
  local chunk = CHUNK
  if keep == nil and limit + 1 < CHUNK then
    chunk = limit + 1
  end
  local last_seen
  local stopped = scan(key, lo, hi, asc, SCAN_MAX, chunk, function(seq, m)
    if keep == nil or keep(m) then
      items[#items + 1] = { seq, m }
      if #items > limit then
        return false
      end
    end
    last_seen = seq
    return true
  end)
  local extra = #items > limit
  local scanned_to
  if asc then
    scanned_to = lo
  else
    scanned_to = math.min(hi, head + 1)
  end
  local entries = {}
  for i = 1, math.min(#items, limit) do
    scanned_to = items[i][1]
    local e = entry(items[i][1], items[i][2])
    if e then
      entries[#entries + 1] = e
    end
  end
  local more = 1
  if stopped and not extra and last_seen then
    -- The scan budget ran out: go on past every position looked at, kept or not.
    scanned_to = last_seen
  end
  if not extra and not stopped then
    more = 0
    if asc then
      scanned_to = math.max(math.min(hi - 1, head), lo)
    else
      scanned_to = lo + 1
    end
  end
  return { head, more, scanned_to, entries }
end

local function msg_entry(seq, pid, chat)
  local f = call('HMGET', k('m:', pid), 'ts', 'from', 'kind', 'body', 'cid')
  if not f[1] then
    return nil
  end
  return { seq, chat, pid, f[1], f[2], f[3], f[4], f[5] or '' }
end

local function inbox_entry(seq, m)
  return msg_entry(seq, pos_id(m), 'u:' .. inbox_peer(m))
end

local function group_entry(name)
  return function(seq, m)
    return msg_entry(seq, pos_id(m), 'g:' .. name)
  end
end

local function inbox_head(user)
  return num(call('GET', k('ih:', user)))
end

local function group_head(gid)
  return num(call('GET', k('gh:', gid)))
end

-- The user's live groups in gid order: {{gid, name}, ...}.
local function user_groups(user)
  local out = {}
  for _, gid in ipairs(call('ZRANGE', k('ug:', user), 0, -1)) do
    local name = call('HGET', k('gr:', gid), 'name')
    if name then
      out[#out + 1] = { gid, name }
    end
  end
  return out
end

-- {inbox_seq, name1, head1, name2, head2, ...}
local function heads(user)
  local r = { inbox_head(user) }
  for _, g in ipairs(user_groups(user)) do
    r[#r + 1] = g[2]
    r[#r + 1] = group_head(g[1])
  end
  return r
end

-- Where a sender's cid is kept: its single chats share one space (gid nil); each group it
-- posts to has its own. Returns the hash key and field.
local function cid_at(from, cid, gid)
  if gid then
    return k('cidg:', from), gid .. '|' .. cid
  end
  return k('cid:', from), cid
end

-- The first message a sender sent with this cid in this scope (gid: that group; nil: single
-- chats), if still stored: its hash fields.
local function find_cid(from, cid, gid)
  if cid == '' then
    return nil
  end
  local key, field = cid_at(from, cid, gid)
  local pid = call('HGET', key, field)
  if not pid then
    return nil
  end
  local f = call('HMGET', k('m:', pid), 't', 'ts', 'seq', 'fseq', 'from', 'cid', 'gid')
  if not f[1] or f[5] ~= from or f[6] ~= cid then
    return nil
  end
  -- In `cid:` a group message's row from before group cids were scoped: not this scope.
  if (gid and (f[1] ~= 'g' or f[7] ~= gid)) or (not gid and f[1] ~= 'u') then
    return nil
  end
  return { pid = pid, t = f[1], ts = f[2], seq = num(f[3]), fseq = f[4] }
end

-- Users never seen are not counted (as SQLite, which only counts known users).
local function check_groups_per_user(users, max)
  for _, u in ipairs(users) do
    local n = call('ZCARD', k('ug:', u))
    if n >= max and is_user(u) then
      return { 'limit', 'groups per user: ' .. u .. ' is already in ' .. n .. ' groups' }
    end
  end
  return nil
end

local function add_member(gid, u)
  call('ZADD', k('gm:', gid), 0, u)
  call('ZADD', k('ug:', u), gid, gid)
  call('SADD', k('users'), u)
  local head = group_head(gid)
  if head > 0 then
    call('HSET', k('rd:', u), 'j:' .. gid, fmt(head))
  end
end

-- ---- ops -----------------------------------------------------------------------------------

-- The internal id of a public group id, or the `not_found` reply to return.
local function need_gid(group)
  local gid = call('GET', k('gi:', group))
  if not gid then
    return nil, { 'not_found', 'group ' .. group }
  end
  return gid
end

-- One message to a user (append and each of append_many): its reply.
local function append(pid, ts, from, to, kind, body, cid)
  local first = find_cid(from, cid, nil)
  if first then
    local fseq = -1
    if first.fseq then
      fseq = num(first.fseq)
    end
    return { 'ok', first.pid, first.ts, first.seq, fseq, 1 }
  end
  if call('EXISTS', k('m:', pid)) == 1 then
    return { 'conflict', 'message id exists' }
  end
  -- A user joins `users` with the first position of their inbox (nothing ever leaves it), so
  -- later messages skip the SADD.
  local rseq = call('INCR', k('ih:', to))
  if rseq == 1 then
    call('SADD', k('users'), to)
  end
  local sseq = -1
  local o = '1'
  if from ~= to then
    sseq = call('INCR', k('ih:', from))
    o = '0'
    if sseq == 1 then
      call('SADD', k('users'), from)
    end
  end
  -- One HSET with every field of the message.
  local fields = { 't', 'u', 'ts', ts, 'from', from, 'to', to, 'seq', rseq, 'kind', kind, 'body', body }
  if sseq >= 0 then
    fields[#fields + 1] = 'fseq'
    fields[#fields + 1] = sseq
  end
  if cid ~= '' then
    fields[#fields + 1] = 'cid'
    fields[#fields + 1] = cid
  end
  call('HSET', k('m:', pid), unpack(fields))
  if sseq >= 0 then
    call('ZADD', k('ib:', from), sseq, pid .. '|1|' .. to)
  end
  call('ZADD', k('ib:', to), rseq, pid .. '|' .. o .. '|' .. from)
  if cid ~= '' then
    call('HSET', k('cid:', from), cid, pid)
  end
  call('RPUSH', k('msgq'), pid)
  return { 'ok', pid, ts, rseq, sseq, 0 }
end

-- ARGV: P, pid, ts, from, to, kind, body, cid ('' = none)
function OPS.append()
  return append(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
end

-- Several messages in one call (consecutive Append ops of a batch, in order: a later one sees
-- the earlier ones, its cid included). ARGV: P, then pid, ts, from, to, kind, body, cid for
-- each. Returns {'ok', reply1, reply2, ...}, each reply as append's (a refusal refuses only
-- its own message).
function OPS.append_many()
  local out = { 'ok' }
  for i = 2, #ARGV, 7 do
    local a = ARGV
    out[#out + 1] = append(a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5], a[i + 6])
  end
  return out
end

-- One message to a group (append_group and each of append_group_many): its reply.
local function append_group(pid, ts, from, group, system, kind, body, cid)
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  -- A retry answers the first result even if the sender has left the group since: the cid
  -- is looked up before membership, in this group's scope (gids are never reused, so a group
  -- recreated under the same name is another scope).
  local first = find_cid(from, cid, gid)
  if first then
    return { 'ok', first.pid, first.ts, first.seq, 1 }
  end
  if not system and not is_member(gid, from) then
    return { 'forbidden', from .. ' is not a member' }
  end
  if call('EXISTS', k('m:', pid)) == 1 then
    return { 'conflict', 'message id exists' }
  end
  local seq = call('INCR', k('gh:', gid))
  local fields = { 't', 'g', 'ts', ts, 'from', from, 'gid', gid, 'seq', seq, 'kind', kind, 'body', body }
  if cid ~= '' then
    fields[#fields + 1] = 'cid'
    fields[#fields + 1] = cid
  end
  call('HSET', k('m:', pid), unpack(fields))
  call('ZADD', k('gl:', gid), seq, pid .. '|' .. from)
  if cid ~= '' then
    local key, field = cid_at(from, cid, gid)
    call('HSET', key, field, pid)
  end
  call('RPUSH', k('msgq'), pid)
  call('SADD', k('users'), from)
  return { 'ok', pid, ts, seq, 0 }
end

-- ARGV: P, pid, ts, from, group, system ('1'|'0'), kind, body, cid
function OPS.append_group()
  return append_group(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1', ARGV[7], ARGV[8], ARGV[9])
end

-- Several group messages in one call (consecutive AppendGroup ops of a batch, in order).
-- ARGV: P, then pid, ts, from, group, system, kind, body, cid for each. Returns {'ok', reply1,
-- reply2, ...}, each reply as append_group's (a refusal refuses only its own message).
function OPS.append_group_many()
  local out = { 'ok' }
  for i = 2, #ARGV, 8 do
    local a = ARGV
    out[#out + 1] = append_group(a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4] == '1', a[i + 5], a[i + 6], a[i + 7])
  end
  return out
end

-- ARGV: P, user, after, limit
function OPS.read_inbox()
  local user, after, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  if not is_user(user) then
    return { 'ok', { 0, 0, 0, {} } }
  end
  return { 'ok', page(k('ib:', user), inbox_head(user), after, MAXSEQ, true, limit, nil, inbox_entry) }
end

-- ARGV: P, group, after, limit
function OPS.read_group()
  local group, after, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  return { 'ok', page(k('gl:', gid), group_head(gid), after, MAXSEQ, true, limit, nil, group_entry(group)) }
end

-- ARGV: P, user, inbox_after, limit, then (group, after) pairs in name order
function OPS.sync()
  local user, after, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local hl = heads(user)
  if not is_user(user) then
    return { 'ok', hl, 0, {} }
  end
  local gh = {}
  for i = 2, #hl, 2 do
    gh[hl[i]] = hl[i + 1]
  end
  local p = page(k('ib:', user), hl[1], after, MAXSEQ, true, limit, nil, inbox_entry)
  local more = p[2] == 1
  local entries = p[4]
  for i = 5, #ARGV, 2 do
    local g, ga = ARGV[i], tonumber(ARGV[i + 1])
    local h = gh[g]
    if #entries >= limit then
      if h and h > ga then
        more = true
      end
    elseif h then
      local gid = call('GET', k('gi:', g))
      if not gid then
        return { 'not_found', 'group ' .. g }
      end
      local q = page(k('gl:', gid), h, ga, MAXSEQ, true, limit - #entries, nil, group_entry(g))
      if q[2] == 1 then
        more = true
      end
      for _, e in ipairs(q[4]) do
        entries[#entries + 1] = e
      end
    end
  end
  local m = 0
  if more then
    m = 1
  end
  return { 'ok', hl, m, entries }
end

-- ARGV: P, user
function OPS.heads()
  return { 'ok', heads(ARGV[2]) }
end

-- ARGV: P, user, chat kind ('' | 'bad' | 'u' | 'g'), chat id, lo, hi, asc, limit
function OPS.history()
  local user, ck, cid = ARGV[2], ARGV[3], ARGV[4]
  local lo, hi, asc, limit = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1', tonumber(ARGV[8])
  if not is_user(user) then
    return { 'ok', { 0, 0, 0, {} } }
  end
  local ib = k('ib:', user)
  if ck == '' then
    return { 'ok', page(ib, inbox_head(user), lo, hi, asc, limit, nil, inbox_entry) }
  elseif ck == 'u' then
    if not is_user(cid) then
      return { 'ok', { inbox_head(user), 0, 0, {} } }
    end
    local keep = function(m)
      return inbox_peer(m) == cid
    end
    return { 'ok', page(ib, inbox_head(user), lo, hi, asc, limit, keep, inbox_entry) }
  elseif ck == 'g' then
    local gid = call('GET', k('gi:', cid))
    if not gid then
      return { 'not_found', 'group ' .. cid }
    end
    if not is_member(gid, user) then
      return { 'forbidden', user .. ' is not a member' }
    end
    return { 'ok', page(k('gl:', gid), group_head(gid), lo, hi, asc, limit, nil, group_entry(cid)) }
  end
  return { 'invalid', 'chat: expected u:<user> or g:<group>' }
end

-- ARGV: P, group, lo, hi, asc, limit
function OPS.group_history()
  local group, lo, hi, asc, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  return { 'ok', page(k('gl:', gid), group_head(gid), lo, hi, asc, limit, nil, group_entry(group)) }
end

-- One delivery position (set_delivered and each of set_delivered_many): its reply.
local function set_delivered(user, device, group, seq)
  local chat, head
  if group == '' then
    chat, head = 'i', inbox_head(user)
  else
    local gid = call('GET', k('gi:', group))
    if not gid then
      return { 'not_found', 'group ' .. group }
    end
    -- Acks of a member removed meanwhile: its positions went with it and must not come back.
    if not is_member(gid, user) then
      return { 'forbidden', user .. ' is not a member of ' .. group }
    end
    chat, head = 'g:' .. gid, group_head(gid)
  end
  local field = device .. '|' .. chat
  local prev = num(call('HGET', k('dl:', user), field))
  local new = math.max(math.min(seq, head), prev)
  if new > prev then
    call('HSET', k('dl:', user), field, new)
  end
  call('SADD', k('users'), user)
  return { 'ok', prev, new }
end

-- ARGV: P, user, device, group ('' = inbox), seq
function OPS.set_delivered()
  return set_delivered(ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
end

-- Several positions in one call (consecutive SetDelivered ops of a batch, in order).
-- ARGV: P, then user, device, group, seq for each. Returns {'ok', reply1, reply2, ...}, each
-- reply as set_delivered's (a refusal refuses only its own position).
function OPS.set_delivered_many()
  local out = { 'ok' }
  for i = 2, #ARGV, 4 do
    out[#out + 1] = set_delivered(ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]))
  end
  return out
end

-- ARGV: P, user, device
function OPS.get_delivered()
  local user, device = ARGV[2], ARGV[3]
  local pre = device .. '|'
  local all = call('HGETALL', k('dl:', user))
  local out = { 0 }
  for i = 1, #all, 2 do
    local f = all[i]
    if string.sub(f, 1, #pre) == pre then
      local chat = string.sub(f, #pre + 1)
      if chat == 'i' then
        out[1] = num(all[i + 1])
      elseif string.sub(chat, 1, 2) == 'g:' then
        local name = call('HGET', k('gr:', string.sub(chat, 3)), 'name')
        if name then
          out[#out + 1] = name
          out[#out + 1] = num(all[i + 1])
        end
      end
    end
  end
  return { 'ok', out }
end

-- After a write that added `added` events to the outbox: deletes the oldest past `max`
-- (events.outbox_max), at most `added + OUTBOX_TRIM_STEP` of them (an outbox already far past
-- the cap shrinks over several writes instead of holding Redis in one long call), and counts
-- them in `obdropped`. The newest are kept: they are the most useful to a business catching up.
local function trim_outbox(max, added)
  local excess = call('ZCARD', k('ob')) - max
  if excess <= 0 then
    return
  end
  excess = math.min(excess, added + OUTBOX_TRIM_STEP)
  local seqs = call('ZRANGE', k('ob'), 0, excess - 1)
  for _, s in ipairs(seqs) do
    call('DEL', k('ev:', s))
  end
  call('ZREMRANGEBYRANK', k('ob'), 0, excess - 1)
  call('INCRBY', k('obdropped'), #seqs)
end

-- One event: a new outbox seq, appended to the events stream (stream ~= '') and kept in the
-- outbox (`keep`: someone fetches and acks it), as the engine's configuration asks. Returns
-- the seq. The caller trims the outbox (`trim_outbox`) after its events. The stream first:
-- XADD is the one write that can fail (the key holds another type), and a failed script keeps
-- what it wrote before the failure (Redis has no rollback), so it must come before any write
-- that matters (only the seq counter has moved then: a seq is skipped, never reused).
local function add_event(stream, stream_len, keep, ts, kind, data)
  local s = call('INCR', k('obseq'))
  if stream ~= '' then
    call('XADD', stream, 'MAXLEN', '~', stream_len, '*', 'event_id', s, 'type', kind, 'ts', ts, 'data', data)
  end
  if keep then
    call('HSET', k('ev:', s), 'ts', ts, 'kind', kind, 'data', data)
    call('ZADD', k('ob'), s, s)
  end
  return s
end

-- ARGV: P, user, chat kind ('u' | 'g'), chat id, seq, emit ('1'|'0'), now_ms, then the event's
-- destinations as outbox_append's: events stream ('' = none), its approximate length, keep in
-- the outbox ('1'|'0'), the outbox's cap
function OPS.set_read()
  local user, ck, cid, seq, emit, now = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7]
  local key, stream, head, peer
  if ck == 'u' then
    if not is_user(cid) then
      return { 'not_found', 'user ' .. cid }
    end
    key, stream, head, peer = 'u:' .. cid, k('ib:', user), inbox_head(user), cid
  else
    local gid = call('GET', k('gi:', cid))
    if not gid then
      return { 'not_found', 'group ' .. cid }
    end
    if not is_member(gid, user) then
      return { 'forbidden', user .. ' is not a member' }
    end
    key, stream, head = 'g:' .. gid, k('gl:', gid), group_head(gid)
  end
  local prev = num(call('HGET', k('rd:', user), key))
  local new = math.max(math.min(seq, head), prev)
  local moved = new > prev
  local up_to = ''
  if new > 0 then
    scan(stream, 0, new + 1, false, SCAN_MAX, CHUNK, function(_, m)
      if peer == nil or inbox_peer(m) == peer then
        up_to = pos_id(m)
        return false
      end
      return true
    end)
  end
  if moved then
    -- The event before the position (see add_event: its stream write may fail).
    if emit then
      -- serde_json's object layout (keys sorted); ids need no escaping.
      local u = 'null'
      if up_to ~= '' then
        u = '"' .. (string.gsub(up_to, '^0+', '')) .. '"'
      end
      local chat = ck .. ':' .. cid
      local data = '{"chat":"' .. chat .. '","seq":' .. fmt(new) .. ',"up_to":' .. u .. ',"user":"' .. user .. '"}'
      add_event(ARGV[8], ARGV[9], ARGV[10] == '1', now, 'message.read', data)
      if ARGV[10] == '1' then
        trim_outbox(tonumber(ARGV[11]), 1)
      end
    end
    call('HSET', k('rd:', user), key, new)
  end
  call('SADD', k('users'), user)
  local mv = 0
  if moved then
    mv = 1
  end
  return { 'ok', prev, new, up_to, mv }
end

-- ARGV: P, user
function OPS.unread()
  local user = ARGV[2]
  local out = {}
  if not is_user(user) then
    return { 'ok', out }
  end
  local reads = {}
  local all = call('HGETALL', k('rd:', user))
  for i = 1, #all, 2 do
    reads[all[i]] = num(all[i + 1])
  end
  local counts, order = {}, {}
  -- Newest first; a chat stops counting at its read position.
  scan(k('ib:', user), 0, MAXSEQ, false, SCAN_MAX, CHUNK, function(seq, m)
    if not inbox_out(m) then
      local peer = inbox_peer(m)
      if seq > (reads['u:' .. peer] or 0) then
        if not counts[peer] then
          counts[peer] = 0
          order[#order + 1] = peer
        end
        counts[peer] = counts[peer] + 1
      end
    end
    return true
  end)
  for _, peer in ipairs(order) do
    out[#out + 1] = 'u:' .. peer
    out[#out + 1] = counts[peer]
  end
  for _, g in ipairs(user_groups(user)) do
    local n = 0
    local from = math.max(reads['g:' .. g[1]] or 0, reads['j:' .. g[1]] or 0)
    scan(k('gl:', g[1]), from, MAXSEQ, false, SCAN_MAX, CHUNK, function(_, m)
      if group_from(m) ~= user then
        n = n + 1
      end
      return true
    end)
    if n > 0 then
      out[#out + 1] = 'g:' .. g[2]
      out[#out + 1] = n
    end
  end
  return { 'ok', out }
end

-- ARGV: P, events stream ('' = none), its approximate length, keep in the outbox ('1'|'0'),
-- the outbox's cap, then (ts, kind, data) triples
function OPS.outbox_append()
  local first, last, n = 0, 0, 0
  local stream, stream_len, keep, max = ARGV[2], ARGV[3], ARGV[4] == '1', tonumber(ARGV[5])
  for i = 6, #ARGV, 3 do
    local s = add_event(stream, stream_len, keep, ARGV[i], ARGV[i + 1], ARGV[i + 2])
    if first == 0 then
      first = s
    end
    last = s
    n = n + 1
  end
  if keep then
    trim_outbox(max, n)
  end
  return { 'ok', first, last }
end

-- ARGV: P. {events held, events dropped by the cap in total}
function OPS.outbox_stats()
  return { 'ok', call('ZCARD', k('ob')), num(call('GET', k('obdropped'))) }
end

-- ARGV: P, after, limit
function OPS.outbox_fetch()
  local after, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
  local out = {}
  for _, s in ipairs(call('ZRANGEBYSCORE', k('ob'), '(' .. fmt(after), '+inf', 'LIMIT', 0, limit)) do
    local f = call('HMGET', k('ev:', s), 'ts', 'kind', 'data')
    if f[1] then
      out[#out + 1] = { tonumber(s), f[1], f[2], f[3] }
    end
  end
  return { 'ok', out }
end

-- ARGV: P, through
function OPS.outbox_ack()
  local through = tonumber(ARGV[2])
  local seqs = call('ZRANGEBYSCORE', k('ob'), '-inf', fmt(through))
  for _, s in ipairs(seqs) do
    call('DEL', k('ev:', s))
  end
  call('ZREMRANGEBYSCORE', k('ob'), '-inf', fmt(through))
  return { 'ok', #seqs }
end

-- ARGV: P, id ('' = generate), candidate1..4, title, owner, created, groups_per_user_max,
-- then every member (owner first, deduplicated)
function OPS.create_group()
  local id = ARGV[2]
  local title, owner, created, gpu_max = ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10])
  local users = {}
  for i = 11, #ARGV do
    users[#users + 1] = ARGV[i]
  end
  local e = check_groups_per_user(users, gpu_max)
  if e then
    return e
  end
  local name
  if id ~= '' then
    if call('EXISTS', k('gi:', id)) == 1 then
      return { 'conflict', 'group ' .. id .. ' exists' }
    end
    name = id
  else
    for i = 3, 6 do
      if call('EXISTS', k('gi:', ARGV[i])) == 0 then
        name = ARGV[i]
        break
      end
    end
    if not name then
      return { 'conflict', 'generated group ids all taken' }
    end
  end
  local gid = call('INCR', k('gid'))
  call('SET', k('gi:', name), gid)
  call('HSET', k('gr:', gid), 'name', name, 'title', title, 'owner', owner, 'created', created)
  for _, u in ipairs(users) do
    add_member(gid, u)
  end
  return { 'ok', name }
end

-- ARGV: P, group
function OPS.get_group()
  local group = ARGV[2]
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  local f = call('HMGET', k('gr:', gid), 'title', 'owner', 'created')
  return { 'ok', f[1] or '', f[2] or '', f[3] or '0', call('ZCARD', k('gm:', gid)), group_head(gid) }
end

-- Forgets every device's delivery position of `chat` ('g:<gid>') for `u`.
local function forget_delivered(u, chat)
  local suffix = '|' .. chat
  for _, f in ipairs(call('HKEYS', k('dl:', u))) do
    if #f > #suffix and string.sub(f, -#suffix) == suffix then
      call('HDEL', k('dl:', u), f)
    end
  end
end

-- ARGV: P, group
function OPS.dissolve_group()
  local group = ARGV[2]
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  local chat = 'g:' .. gid
  for _, u in ipairs(call('ZRANGE', k('gm:', gid), 0, -1)) do
    call('ZREM', k('ug:', u), gid)
    call('HDEL', k('rd:', u), chat, 'j:' .. gid)
    forget_delivered(u, chat)
  end
  -- The head goes too: nothing names the group's number any more (a recreated name gets a
  -- new one), and the log is read only by retention, which empties it (an empty log is no key).
  call('DEL', k('gm:', gid), k('gr:', gid), k('gi:', group), k('gh:', gid))
  return { 'ok' }
end

-- ARGV: P, group, members_max, groups_per_user_max, then the users (deduplicated)
function OPS.add_members()
  local group, members_max, gpu_max = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  local count = call('ZCARD', k('gm:', gid))
  local new = {}
  for i = 5, #ARGV do
    if not is_member(gid, ARGV[i]) then
      new[#new + 1] = ARGV[i]
    end
  end
  if count + #new > members_max then
    return { 'limit', 'members: at most ' .. fmt(members_max) }
  end
  local e = check_groups_per_user(new, gpu_max)
  if e then
    return e
  end
  for _, u in ipairs(new) do
    add_member(gid, u)
  end
  return { 'ok', #new }
end

-- ARGV: P, group, user
function OPS.remove_member()
  local group, user = ARGV[2], ARGV[3]
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  if call('ZREM', k('gm:', gid), user) == 0 then
    return { 'ok', 0 }
  end
  call('ZREM', k('ug:', user), gid)
  call('HDEL', k('rd:', user), 'g:' .. gid, 'j:' .. gid)
  forget_delivered(user, 'g:' .. gid)
  return { 'ok', 1 }
end

-- ARGV: P, group, cursor ('' = start), limit
function OPS.list_members()
  local group, cursor, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  local from = '-'
  if cursor ~= '' then
    from = '(' .. cursor
  end
  local names = call('ZRANGEBYLEX', k('gm:', gid), from, '+', 'LIMIT', 0, limit + 1)
  local next_cursor = ''
  if #names > limit then
    names[#names] = nil
    next_cursor = names[#names]
  end
  return { 'ok', names, next_cursor }
end

-- Whether decimal `a` is above decimal `b` (both without leading zeros): compared as text, so
-- a time past 2^53 is exact (a Lua number is a double).
local function dec_above(a, b)
  return #a > #b or (#a == #b and a > b)
end

-- ARGV: P, user, device ('' = every device), before_ms (decimal, at most i64::MAX). Never
-- moves back; a first revocation is kept whatever its time (as SQLite keeps it). Answers the
-- time in force, as decimal text.
function OPS.revoke_tokens()
  local field = ARGV[2] .. '|' .. ARGV[3]
  local before = ARGV[4]
  local cur = call('HGET', k('revoked'), field)
  if not cur or dec_above(before, cur) then
    call('HSET', k('revoked'), field, before)
    cur = before
  end
  return { 'ok', cur }
end

-- ARGV: P
function OPS.revocations()
  return { 'ok', call('HGETALL', k('revoked')) }
end

-- ARGV: P, user
function OPS.groups_of()
  local out = {}
  for _, g in ipairs(user_groups(ARGV[2])) do
    out[#out + 1] = g[2]
  end
  return { 'ok', out }
end

-- ARGV: P, group, pid
function OPS.group_reads()
  local group, pid = ARGV[2], ARGV[3]
  local gid, missing = need_gid(group)
  if not gid then
    return missing
  end
  local f = call('HMGET', k('m:', pid), 't', 'gid', 'seq', 'from')
  if f[1] ~= 'g' or f[2] ~= gid then
    return { 'not_found', 'message' }
  end
  local seq, from, chat = tonumber(f[3]), f[4], 'g:' .. gid
  local members, read = 0, 0
  for _, u in ipairs(call('ZRANGE', k('gm:', gid), 0, -1)) do
    if u ~= from then
      local pos = call('HMGET', k('rd:', u), chat, 'j:' .. gid)
      -- Members who joined after the message was posted are not counted.
      if num(pos[2]) < seq then
        members = members + 1
        if num(pos[1]) >= seq then
          read = read + 1
        end
      end
    end
  end
  return { 'ok', read, members }
end

-- ARGV: P, older_than_ms, max_rows
function OPS.purge()
  local cutoff, max_rows = tonumber(ARGV[2]), tonumber(ARGV[3])
  -- Deletes one message and its positions; false when it is younger than the cutoff.
  local function purge_one(pid)
    local mk = k('m:', pid)
    local f = call('HMGET', mk, 'ts', 't', 'from', 'to', 'gid', 'seq', 'fseq', 'cid')
    if f[1] and num(f[1]) >= cutoff then
      return false
    end
    if f[2] == 'u' then
      call('ZREMRANGEBYSCORE', k('ib:', f[4]), f[6], f[6])
      if f[7] then
        call('ZREMRANGEBYSCORE', k('ib:', f[3]), f[7], f[7])
      end
    elseif f[2] == 'g' then
      call('ZREMRANGEBYSCORE', k('gl:', f[5]), f[6], f[6])
    end
    if f[8] then
      -- A group message's own row, and the one it has in `cid:` if stored before group cids
      -- were scoped.
      if f[2] == 'g' then
        local key, field = cid_at(f[3], f[8], f[5])
        if call('HGET', key, field) == pid then
          call('HDEL', key, field)
        end
      end
      if call('HGET', k('cid:', f[3]), f[8]) == pid then
        call('HDEL', k('cid:', f[3]), f[8])
      end
    end
    call('DEL', mk)
    return true
  end
  local deleted, stopped = 0, false
  -- Messages stored before msgq existed, in id order.
  local old = call('ZRANGEBYLEX', k('msgs'), '-', '+', 'LIMIT', 0, max_rows)
  for _, pid in ipairs(old) do
    if not purge_one(pid) then
      stopped = true
      break
    end
    call('ZREM', k('msgs'), pid)
    deleted = deleted + 1
  end
  if not stopped and deleted < max_rows then
    -- Then the list, oldest first; it is in the order stored, so a message a little younger
    -- than one after it only stops this run early (the next run takes it).
    local pids = call('LRANGE', k('msgq'), 0, max_rows - deleted - 1)
    local gone = 0
    for _, pid in ipairs(pids) do
      if not purge_one(pid) then
        stopped = true
        break
      end
      gone = gone + 1
    end
    if gone > 0 then
      call('LTRIM', k('msgq'), gone, -1)
    end
    deleted = deleted + gone
  end
  local more = 0
  if not stopped and deleted == max_rows then
    more = 1
  end
  return { 'ok', deleted, more }
end
