-- Pre-call decision: check every budget window of one caller and reserve the estimate.
-- All or nothing: either every window gets the reservation or none does.
--
-- KEYS[1]  tf:{<id>}:b      limits hash (fields minute..total, nano-USD; 'killed')
-- KEYS[2]  tf:{<id>}:rs     open reservations hash: rid -> "amount|ts_ms|window ids..."
-- ARGV[1]  reservation id    ARGV[2] estimate (nano-USD, integer >= 0)
-- ARGV[3..8] default limits per window (nano-USD, -1 = none) for callers without their own
--
-- Returns {1, rid, now_ms} when reserved, or
--         {0, reason, window, limit, used, reset_epoch_s} when refused.
local limits_key, res_key = KEYS[1], KEYS[2]
local prefix = string.sub(limits_key, 1, -3)
local rid, estimate = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local sec = math.floor(now / 1000)

local own = redis.call('HGETALL', limits_key)
local limits = {}
for i = 1, #own, 2 do limits[own[i]] = tonumber(own[i + 1]) end
if limits['killed'] then
  return {0, 'killed', 'total', 0, 0, 0}
end
local has_own = false
for _, name in ipairs(WINDOW_NAMES) do
  if limits[name] then has_own = true end
end
if not has_own then
  for i, name in ipairs(WINDOW_NAMES) do
    local d = tonumber(ARGV[2 + i])
    if d and d >= 0 then limits[name] = d end
  end
end

local wins = windows_at(sec)
local keys = {}
for i, w in ipairs(wins) do
  keys[i] = window_key(prefix, w.id)
  local limit = limits[w.name]
  if limit then
    local c = redis.call('HMGET', keys[i], 's', 'r')
    local used = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
    if used + estimate > limit then
      return {0, 'budget_exceeded', w.name, limit, used, w.ends}
    end
  end
end

local ids = {}
for i, w in ipairs(wins) do
  redis.call('HINCRBY', keys[i], 'r', estimate)
  if w.ends > 0 then redis.call('EXPIREAT', keys[i], w.ends) end
  ids[i] = w.id
end
redis.call('HSET', res_key, rid, estimate .. '|' .. now .. '|' .. table.concat(ids, ','))
return {1, rid, now}
