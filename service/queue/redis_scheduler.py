"""The fair scheduler of distributed mode (service.scheduling's order, kept in Redis so that it
is one order whichever gateway admits and whichever worker reads).

Admission puts a request's jobs in the model's waiting room, as bundles (the jobs of one prompt:
never split), instead of in the streams. Jobs are released from the waiting room into the
streams, in the scheduler's order, only while the streams hold less than the ready workers'
room (their announced concurrency: what their engines run and hold): at admission, and by each
worker's fetch before it reads. So the streams hold only what the engines can take now, and what
waits beyond that waits in the scheduler's order; released jobs are routed as before (prefix
affinity), and from then on delivered, reclaimed and dead-lettered by the streams' machinery.

    rmserve:{<model>}:sched              hash: waiting (jobs), seq, active:<level> (the round
                                         robin of tenants, JSON), deficit:<level>:<tenant>,
                                         weight:<tenant>, blocked:<level> (seconds the class
                                         waited behind a higher one's work), clock
    rmserve:{<model>}:bundles            hash: <id> (the jobs' payloads, JSON), <id>:m (tenant,
                                         level, deadline, prefix key, size)
    rmserve:{<model>}:tenants            set of the tenants that have had jobs waiting
    rmserve:{<model>}:wait:<l>:<tenant>  sorted set: the tenant's bundles of class l, by
                                         deadline (ids are zero-padded arrival numbers)
    rmserve:{<model>}:age:<l>            sorted set: bundles of class l > 0 by the class's blocked
                                         clock when they entered it (ageing: after starvation_s
                                         behind higher work they move up a class)

Every key is declared in KEYS: the wait keys of every tenant the set names, and of the tenant
being admitted (see redis_streams.UNDECLARED).
"""

from __future__ import annotations

from rmserve.service.scheduling import PRIORITIES, QUANTUM


def sched_key(prefix: str) -> str:
    return f"{prefix}:sched"


def bundles_key(prefix: str) -> str:
    return f"{prefix}:bundles"


def sched_tenants_key(prefix: str) -> str:
    return f"{prefix}:tenants"


def age_key(prefix: str, level: int) -> str:
    return f"{prefix}:age:{level}"


def wait_key(prefix: str, level: int, tenant: str) -> str:
    return f"{prefix}:wait:{level}:{tenant}"


def fixed_keys(prefix: str) -> list[str]:
    """The scheduler's keys every script declares (after the caller's own)."""
    ages = [age_key(prefix, level) for level in range(1, len(PRIORITIES))]
    return [sched_key(prefix), bundles_key(prefix), sched_tenants_key(prefix), *ages]


def tenant_keys(prefix: str, tenant: str) -> list[str]:
    return [wait_key(prefix, level, tenant) for level in range(len(PRIORITIES))]


# Needs _DECLARED (declared, undeclared). `S` is the scheduler of one model:
# S = sched_of(prefix, starvation_s).
SCHED = f"""
local QUANTUM, LEVELS = {QUANTUM}, {len(PRIORITIES)}
local function sched_of(prefix, starvation)
  local S = {{prefix = prefix, sched = prefix .. ':sched', bundles = prefix .. ':bundles',
    tenants = prefix .. ':tenants', starvation = starvation, age = {{}}}}
  for level = 1, LEVELS - 1 do S.age[level] = prefix .. ':age:' .. level end
  return S
end
local function wait_of(S, level, tenant)
  return S.prefix .. ':wait:' .. level .. ':' .. tenant
end
-- The keys the scheduler may touch (for the undeclared check), with `extra` tenants.
local function sched_needs(S, extra)
  local needed, seen = {{}}, {{}}
  local tenants = redis.call('SMEMBERS', S.tenants)
  for _, t in ipairs(extra) do tenants[#tenants + 1] = t end
  for level = 0, LEVELS - 1 do  -- the round robins name them too (even if the set lost one)
    local raw = redis.call('HGET', S.sched, 'active:' .. level)
    if raw then
      for _, t in ipairs(cjson.decode(raw)) do tenants[#tenants + 1] = t end
    end
  end
  for _, t in ipairs(tenants) do
    if not seen[t] then
      seen[t] = true
      for level = 0, LEVELS - 1 do needed[#needed + 1] = wait_of(S, level, t) end
    end
  end
  return needed
end
local function sched_waiting(S)
  return tonumber(redis.call('HGET', S.sched, 'waiting') or '0')
end
local function active_of(S, level)
  local raw = redis.call('HGET', S.sched, 'active:' .. level)
  if not raw then return {{}} end
  return cjson.decode(raw)
end
local function set_active(S, level, active)
  if #active == 0 then
    redis.call('HDEL', S.sched, 'active:' .. level)
  else
    redis.call('HSET', S.sched, 'active:' .. level, cjson.encode(active))
  end
end
local function weight_of(S, tenant)
  return tonumber(redis.call('HGET', S.sched, 'weight:' .. tenant) or '1')
end
-- A tenant's first waiting bundle of a class: at the back of the round robin, one quantum of
-- credit.
local function activate(S, level, tenant)
  local active = active_of(S, level)
  active[#active + 1] = tenant
  set_active(S, level, active)
  redis.call('HSET', S.sched, 'deficit:' .. level .. ':' .. tenant,
    QUANTUM * weight_of(S, tenant))
end
local function deactivate(S, level, tenant)
  local active, kept = active_of(S, level), {{}}
  for _, t in ipairs(active) do if t ~= tenant then kept[#kept + 1] = t end end
  set_active(S, level, kept)
  redis.call('HDEL', S.sched, 'deficit:' .. level .. ':' .. tenant)
end
local function blocked_of(S, level)
  return tonumber(redis.call('HGET', S.sched, 'blocked:' .. level) or '0')
end
-- Run the ageing clocks of the classes below one with work, up to `now` (service.scheduling).
local function sched_tick(S, now)
  local last = tonumber(redis.call('HGET', S.sched, 'clock') or '')
  if last and now > last then
    local above = false
    for level = 0, LEVELS - 1 do
      if above then
        redis.call('HINCRBYFLOAT', S.sched, 'blocked:' .. level, now - last)
      end
      above = above or redis.call('HEXISTS', S.sched, 'active:' .. level) == 1
    end
  end
  if not last or now > last then redis.call('HSET', S.sched, 'clock', now) end
end
local function enter(S, id, meta)
  local key = wait_of(S, meta.l, meta.t)
  if redis.call('EXISTS', key) == 0 then activate(S, meta.l, meta.t) end
  redis.call('ZADD', key, meta.d, id)
  if meta.l > 0 then redis.call('ZADD', S.age[meta.l], blocked_of(S, meta.l), id) end
end
local function leave(S, id, meta)
  local key = wait_of(S, meta.l, meta.t)
  redis.call('ZREM', key, id)
  if meta.l > 0 then redis.call('ZREM', S.age[meta.l], id) end
  if redis.call('EXISTS', key) == 0 then deactivate(S, meta.l, meta.t) end
end
-- A bundle into the waiting room: payloads (job JSON), tenant, level, weight, deadline, key.
local function sched_add(S, payloads, tenant, level, weight, deadline, key, now)
  local id = string.format('%016d', redis.call('HINCRBY', S.sched, 'seq', 1))
  redis.call('HSET', S.sched, 'weight:' .. tenant, weight)
  redis.call('SADD', S.tenants, tenant)
  local meta = {{t = tenant, l = level, d = deadline, k = key, n = #payloads}}
  redis.call('HSET', S.bundles, id, cjson.encode(payloads), id .. ':m', cjson.encode(meta))
  redis.call('HINCRBY', S.sched, 'waiting', #payloads)
  sched_tick(S, now)
  enter(S, id, meta)
end
-- Bundles that waited starvation_s behind higher classes move up one.
local function sched_age(S, now)
  sched_tick(S, now)
  for level = 1, LEVELS - 1 do
    local old = redis.call('ZRANGEBYSCORE', S.age[level], '-inf',
      blocked_of(S, level) - S.starvation, 'LIMIT', 0, 256)
    for _, id in ipairs(old) do
      local meta = cjson.decode(redis.call('HGET', S.bundles, id .. ':m'))
      leave(S, id, meta)
      meta.l = level - 1
      redis.call('HSET', S.bundles, id .. ':m', cjson.encode(meta))
      enter(S, id, meta)
    end
  end
end
-- The next bundle: by class, then the tenant in front of the round robin while its credit
-- covers its first bundle (by deadline), else it goes to the back with a quantum more.
local sched_next
sched_next = function(S)
  for level = 0, LEVELS - 1 do
    local active = active_of(S, level)
    if #active > 0 then
      local rotated = false
      while #active > 0 do
        local tenant = active[1]
        local head = redis.call('ZRANGE', wait_of(S, level, tenant), 0, 0)[1]
        local raw = head and redis.call('HGET', S.bundles, head .. ':m')
        if not raw then
          -- Inconsistent (e.g. part of Redis's data lost): forget the entry, never fail.
          if head then
            redis.call('ZREM', wait_of(S, level, tenant), head)
          else
            deactivate(S, level, tenant)
            table.remove(active, 1)
          end
          return sched_next(S)
        end
        local meta = cjson.decode(raw)
        local field = 'deficit:' .. level .. ':' .. tenant
        local deficit = tonumber(redis.call('HGET', S.sched, field) or '0')
        if deficit >= meta.n then
          if rotated then set_active(S, level, active) end
          return head, meta
        end
        redis.call('HSET', S.sched, field, deficit + QUANTUM * weight_of(S, tenant))
        table.insert(active, table.remove(active, 1))
        rotated = true
      end
    end
  end
  -- Nothing waits: a count left over by an inconsistency must not hold admissions back.
  redis.call('HSET', S.sched, 'waiting', 0)
  return nil, nil
end
-- Take a bundle out of the waiting room: its payloads.
local function sched_take(S, id, meta)
  redis.call('HINCRBYFLOAT', S.sched, 'deficit:' .. meta.l .. ':' .. meta.t, -meta.n)
  leave(S, id, meta)
  local payloads = cjson.decode(redis.call('HGET', S.bundles, id))
  redis.call('HDEL', S.bundles, id, id .. ':m')
  redis.call('HINCRBY', S.sched, 'waiting', -meta.n)
  return payloads
end
"""
