"""The queue's conditional writes as Redis Lua scripts: each runs atomically on the server.

Every change of a job's state is one script, so a check and the write it guards can never be
separated by another client (submit's budget and idempotency check, an attempt's fencing token,
reclaim's liveness test), and each costs one round trip. The same text runs on a real Redis and
on the embedded fakeredis (with ``lupa``); ``app.jobs.queue`` calls them from the synchronous
worker client and from the API's asyncio client alike.

Keys are derived inside the scripts from the job id (``attn:job:{id}`` ...), which ties the queue
to a single Redis node or a Sentinel-managed primary (not Redis Cluster).

A job's record and inputs carry no TTL while it is queued or running; ``finish`` (the one way a job
ends) sets the TTL of the record, its outputs and its idempotency key, deletes the inputs, counts
the ending, returns the job's share of the submit budget and publishes the id on ``attn:done``.
"""

from __future__ import annotations

__all__ = ["SCRIPTS"]

_PRELUDE = r"""
local PREFIX = 'attn:'
local GROUP = 'workers'
local function jkey(id) return PREFIX .. 'job:' .. id end
local function skey(op) return PREFIX .. 'stream:' .. op end
local function ikey(id, n) return PREFIX .. 'in:' .. id .. ':' .. n end
local function okey(id, n) return PREFIX .. 'out:' .. id .. ':' .. n end
local function split(s)
  local t = {}
  if s then for w in string.gmatch(s, '%S+') do t[#t + 1] = w end end
  return t
end
local function is_terminal(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end
local function drop_entry(op, entry)
  redis.call('XACK', skey(op), GROUP, entry)
  redis.call('XDEL', skey(op), entry)
end
local function add_entry(id, op)
  local stream = skey(op)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
  local e = redis.call('XADD', stream, '*', 'id', id)
  redis.call('HSET', jkey(id), 'entry', e)
  return e
end
-- End a job: status, error, TTLs, inputs dropped, counters, budget, notification.
local function finish(id, status, code, message, now, ttl)
  local key = jkey(id)
  local r = redis.call('HMGET', key, 'op', 'input_names', 'output_names', 'idem', 'bytes')
  redis.call('HSET', key, 'status', status, 'finished_at', now)
  if code then redis.call('HSET', key, 'error_code', code, 'error_message', message) end
  redis.call('EXPIRE', key, ttl)
  for _, n in ipairs(split(r[2])) do redis.call('DEL', ikey(id, n)) end
  for _, n in ipairs(split(r[3])) do redis.call('EXPIRE', okey(id, n), ttl) end
  if r[4] and r[4] ~= '' then redis.call('EXPIRE', r[4], ttl) end
  redis.call('HINCRBY', PREFIX .. 'stats', (r[1] or '?') .. ':' .. status, 1)
  redis.call('HINCRBY', PREFIX .. 'budget', 'jobs', -1)
  redis.call('HINCRBY', PREFIX .. 'budget', 'bytes', -tonumber(r[5] or '0'))
  redis.call('PUBLISH', PREFIX .. 'done', id)
end
-- The attempt holding `token` is the job's current, running one.
local function current(id, token)
  local r = redis.call('HMGET', jkey(id), 'token', 'status')
  return r[1] and tonumber(r[1]) == tonumber(token) and r[2] == 'running', r[1]
end
"""

# ARGV: now, id, op, params, inputs_meta, input_names, bytes, max_jobs, max_bytes, idem_key,
#       digest, owner, then one blob per input name (same order).
_SUBMIT = r"""
local now, id, op = ARGV[1], ARGV[2], ARGV[3]
local idem, digest = ARGV[10], ARGV[11]
-- A retried call (its first reply was lost) finds its own job: submit is idempotent by id.
if redis.call('EXISTS', jkey(id)) == 1 then return {'ok', id} end
if idem ~= '' then
  local ex = redis.call('HMGET', idem, 'job', 'digest')
  if ex[1] then
    if ex[2] == digest then return {'replay', ex[1]} end
    return {'conflict', ex[1]}
  end
end
local b = redis.call('HMGET', PREFIX .. 'budget', 'jobs', 'bytes')
local jobs, used, size = tonumber(b[1] or '0'), tonumber(b[2] or '0'), tonumber(ARGV[7])
if jobs + 1 > tonumber(ARGV[8]) then return {'busy_jobs', tostring(jobs)} end
if used + size > tonumber(ARGV[9]) then return {'busy_bytes', tostring(used)} end
for i, n in ipairs(split(ARGV[6])) do redis.call('SET', ikey(id, n), ARGV[12 + i]) end
redis.call('HSET', jkey(id), 'id', id, 'op', op, 'status', 'queued', 'attempts', 0, 'token', 0,
  'created_at', now, 'params', ARGV[4], 'inputs', ARGV[5], 'input_names', ARGV[6],
  'bytes', size, 'owner', ARGV[12], 'idem', idem)
add_entry(id, op)
redis.call('HINCRBY', PREFIX .. 'budget', 'jobs', 1)
redis.call('HINCRBY', PREFIX .. 'budget', 'bytes', size)
redis.call('HINCRBY', PREFIX .. 'stats', op .. ':queued', 1)
if idem ~= '' then redis.call('HSET', idem, 'job', id, 'digest', digest) end
return {'ok', id}
"""

# ARGV: id, owner ('' = any), with_outputs ('1'/'0'). Returns {fields..., outputs...} or {}.
_GET = r"""
local key = jkey(ARGV[1])
local flat = redis.call('HGETALL', key)
if #flat == 0 then return {} end
local rec = {}
for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
if ARGV[2] ~= '' and rec.owner ~= ARGV[2] then return {} end
local outs = {}
if ARGV[3] == '1' and rec.status == 'succeeded' then
  for _, n in ipairs(split(rec.output_names)) do
    local v = redis.call('GET', okey(ARGV[1], n))
    if not v then v = '' ; rec.outputs_missing = '1' end
    outs[#outs + 1] = n
    outs[#outs + 1] = v
  end
end
return {flat, outs, rec.outputs_missing or '0'}
"""

# ARGV: id, owner, now, ttl. Queued -> cancelled now; running -> flagged. Returns {'ok'|'missing'}.
_CANCEL = r"""
local id = ARGV[1]
local r = redis.call('HMGET', jkey(id), 'status', 'op', 'entry', 'owner')
if not r[1] or (ARGV[2] ~= '' and r[4] ~= ARGV[2]) then return {'missing'} end
if r[1] == 'queued' then
  redis.call('HSET', jkey(id), 'cancel', 1)
  if r[3] then drop_entry(r[2], r[3]) end
  finish(id, 'cancelled', 'cancelled', 'the job was cancelled', ARGV[3], ARGV[4])
elseif r[1] == 'running' then
  redis.call('HSET', jkey(id), 'cancel', 1)
end
return {'ok'}
"""

# ARGV: op, entry, id, worker, now, max_attempts, ttl. Begins an attempt, or ends the entry when
# the job must not run. Returns {'run', token, attempt, params, inputs_meta, name, blob, ...} or
# {outcome}.
_START = r"""
local op, entry, id, worker, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = jkey(id)
local flat = redis.call('HGETALL', key)
if #flat == 0 then drop_entry(op, entry) return {'gone'} end
local r = {}
for i = 1, #flat, 2 do r[flat[i]] = flat[i + 1] end
if is_terminal(r.status) then drop_entry(op, entry) return {'ended'} end
if r.entry ~= entry then drop_entry(op, entry) return {'duplicate'} end
if r.cancel == '1' then
  drop_entry(op, entry)
  finish(id, 'cancelled', 'cancelled', 'the job was cancelled', now, ARGV[7])
  return {'cancelled'}
end
local attempts = tonumber(r.attempts or '0')
if attempts >= tonumber(ARGV[6]) then
  drop_entry(op, entry)
  local code = r.error_code
  if not code or code == '' then code = 'max_attempts' end
  finish(id, 'failed', code, 'failed after ' .. attempts .. ' attempts; last error: ' ..
    ((r.error_message and r.error_message ~= '') and r.error_message or 'unknown'), now, ARGV[7])
  return {'failed'}
end
local out = {}
for _, n in ipairs(split(r.input_names)) do
  local v = redis.call('GET', ikey(id, n))
  if not v then
    drop_entry(op, entry)
    finish(id, 'failed', 'inputs_lost', 'input ' .. n .. ' is missing from Redis (its data ' ..
      'was lost); submit the job again', now, ARGV[7])
    return {'failed'}
  end
  out[#out + 1] = n
  out[#out + 1] = v
end
local attempt = redis.call('HINCRBY', key, 'attempts', 1)
local token = redis.call('HINCRBY', key, 'token', 1)
redis.call('HSET', key, 'status', 'running', 'started_at', now, 'worker', worker,
  'progress_done', 0, 'progress_total', 0)
return {'run', tostring(token), tostring(attempt), r.params or '{}', r.inputs or '{}', out}
"""

# ARGV: op, entry, holder, self, idle_ms, lease_ms. Decides about one pending entry: leave it
# ('alive'), drop it (its job ended or moved on), or put its job back on the stream.
_RECLAIM = r"""
local op, entry, holder, me = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local stream = skey(op)
local got = redis.call('XRANGE', stream, entry, entry)
if #got == 0 then redis.call('XACK', stream, GROUP, entry) return {'acked'} end
local f = got[1][2]
local id = nil
for i = 1, #f, 2 do if f[i] == 'id' then id = f[i + 1] end end
if not id then drop_entry(op, entry) return {'acked'} end
local key = jkey(id)
local r = redis.call('HMGET', key, 'status', 'entry', 'worker', 'attempts')
if not r[1] or is_terminal(r[1]) or r[2] ~= entry then drop_entry(op, entry) return {'dropped'} end
local reason = nil
if holder == me then reason = 'orphan'
elseif redis.call('EXISTS', PREFIX .. 'lease:' .. holder) == 0 then reason = 'worker_lost'
elseif r[1] == 'running' and r[3] ~= holder then reason = 'orphan'
elseif r[1] == 'queued' and tonumber(ARGV[5]) > tonumber(ARGV[6]) then reason = 'orphan'
end
if not reason then return {'alive'} end
drop_entry(op, entry)
redis.call('HINCRBY', key, 'token', 1)
redis.call('HSET', key, 'status', 'queued', 'worker', '')
if r[1] == 'running' then
  if reason == 'worker_lost' then
    redis.call('HSET', key, 'error_code', 'worker_lost', 'error_message',
      'the worker running attempt ' .. (r[4] or '?') .. ' stopped renewing its lease')
  else
    redis.call('HSET', key, 'error_code', 'interrupted', 'error_message',
      'attempt ' .. (r[4] or '?') .. ' was interrupted (its worker lost contact with Redis)')
  end
end
add_entry(id, op)
return {'requeued', reason}
"""

# ARGV: id, token, done, total. Returns {'ok', cancel} or {'stale', current}.
_PROGRESS = r"""
local ok, cur = current(ARGV[1], ARGV[2])
if not ok then return {'stale', cur or ''} end
redis.call('HSET', jkey(ARGV[1]), 'progress_done', ARGV[3], 'progress_total', ARGV[4])
return {'ok', redis.call('HGET', jkey(ARGV[1]), 'cancel') or '0'}
"""

# ARGV: id, token, op, entry, now, ttl, summary, outputs_meta, output_names, progress_done,
# progress_total, then one blob per output name. The compute's last progress is recorded here
# (the worker makes no round trip for the last block), and so is a cancel asked while the
# attempt ran: the result is then discarded and the job ends cancelled. Returns {'ok'},
# {'cancelled'} or {'stale', current}. The first write may grow memory (SET/HSET), so that a
# Redis at maxmemory refuses the whole script before it changes anything (Redis checks OOM at
# a script's first write only): the worker retries it until it lands.
_SUCCEED = r"""
local id = ARGV[1]
local ok, cur = current(id, ARGV[2])
if not ok then return {'stale', cur or ''} end
local function record_progress()
  if tonumber(ARGV[11]) > 0 then
    redis.call('HSET', jkey(id), 'progress_done', ARGV[10], 'progress_total', ARGV[11])
  end
end
if redis.call('HGET', jkey(id), 'cancel') == '1' then
  record_progress()
  drop_entry(ARGV[3], ARGV[4])
  finish(id, 'cancelled', 'cancelled', 'the job was cancelled', ARGV[5], ARGV[6])
  return {'cancelled'}
end
for i, n in ipairs(split(ARGV[9])) do
  redis.call('SET', okey(id, n), ARGV[11 + i], 'EX', ARGV[6])
end
redis.call('HSET', jkey(id), 'summary', ARGV[7], 'outputs', ARGV[8], 'output_names', ARGV[9],
  'error_code', '', 'error_message', '')
record_progress()
drop_entry(ARGV[3], ARGV[4])
finish(id, 'succeeded', nil, nil, ARGV[5], ARGV[6])
return {'ok'}
"""

# ARGV: id, token, op, entry, now, ttl, code, message, final ('1'/'0').
_FAIL = r"""
local id = ARGV[1]
local ok, cur = current(id, ARGV[2])
if not ok then return {'stale', cur or ''} end
drop_entry(ARGV[3], ARGV[4])
if ARGV[9] == '1' then
  finish(id, 'failed', ARGV[7], ARGV[8], ARGV[5], ARGV[6])
  return {'failed'}
end
redis.call('HINCRBY', jkey(id), 'token', 1)
redis.call('HSET', jkey(id), 'status', 'queued', 'worker', '', 'error_code', ARGV[7],
  'error_message', ARGV[8])
add_entry(id, ARGV[3])
return {'queued'}
"""

# ARGV: id, token, op, entry, now, ttl.
_CANCELLED = r"""
local id = ARGV[1]
local ok, cur = current(id, ARGV[2])
if not ok then return {'stale', cur or ''} end
drop_entry(ARGV[3], ARGV[4])
finish(id, 'cancelled', 'cancelled', 'the job was cancelled', ARGV[5], ARGV[6])
return {'ok'}
"""

# ARGV: id, token, op, entry. Graceful stop: back on the stream, the attempt not counted.
_HAND_BACK = r"""
local id = ARGV[1]
local ok, cur = current(id, ARGV[2])
if not ok then return {'stale', cur or ''} end
drop_entry(ARGV[3], ARGV[4])
redis.call('HINCRBY', jkey(id), 'token', 1)
redis.call('HINCRBY', jkey(id), 'attempts', -1)
redis.call('HSET', jkey(id), 'status', 'queued', 'worker', '')
add_entry(id, ARGV[3])
return {'ok'}
"""

_STATUS = r"""
local now_ms = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local stream = 'attn:stream:' .. ARGV[i]
  local len = redis.call('XLEN', stream)
  local ok, p = pcall(redis.call, 'XPENDING', stream, 'workers')
  local held, group = 0, 0
  if ok then held = p[1] ; group = 1 end
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  local age = 0
  if #first > 0 then
    local ms = tonumber(string.match(first[1][1], '^(%d+)'))
    age = now_ms - ms
  end
  out[#out + 1] = {len, held, age, group}
end
local members = redis.call('SMEMBERS', 'attn:workers')
local live = {}
for _, w in ipairs(members) do
  if redis.call('EXISTS', 'attn:lease:' .. w) == 1 then live[#live + 1] = w
  else redis.call('SREM', 'attn:workers', w) end
end
return {redis.call('HGETALL', 'attn:stats'), out, live}
"""

_PRUNE = r"""
local stream = 'attn:stream:' .. ARGV[1]
local ok, cons = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, 'workers')
if not ok then return 0 end
local n = 0
for _, c in ipairs(cons) do
  local name, pending = nil, nil
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
  end
  if name and name ~= ARGV[2] and tonumber(pending) == 0
      and redis.call('EXISTS', 'attn:lease:' .. name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, 'workers', name)
    n = n + 1
  end
end
return n
"""


# Read-only and maintenance scripts: no prelude needed.
_PLAIN = {"status": _STATUS, "prune": _PRUNE}

SCRIPTS: dict[str, str] = {
    name: _PRELUDE + body
    for name, body in {
        "submit": _SUBMIT,
        "get": _GET,
        "cancel": _CANCEL,
        "start": _START,
        "reclaim": _RECLAIM,
        "progress": _PROGRESS,
        "succeed": _SUCCEED,
        "fail": _FAIL,
        "cancelled": _CANCELLED,
        "hand_back": _HAND_BACK,
    }.items()
} | _PLAIN
