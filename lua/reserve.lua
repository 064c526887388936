-- Pre-call decision: check every budget window of one caller and reserve an amount.
-- All or nothing across windows. The grant is the desired amount, or less when the budget
-- cannot cover it but can cover the minimum (streams start with what fits and extend).
--
-- KEYS[1]  tf:{<id>}:b      limits hash (fields minute..total, nano-USD; 'killed')
-- KEYS[2]  tf:{<id>}:rs     open reservations hash: rid -> "amount|touched_ms|window ids"
-- ARGV[1]  reservation id   ARGV[2] desired (nano-USD)   ARGV[3] minimum (nano-USD)
-- ARGV[4..9] default limits per window (nano-USD, -1 = none) for callers without their own
--
-- Returns {1, granted, now_ms} when reserved, or
--         {0, reason, window, limit, used, reset_epoch_s} when refused.
local limits_key, res_key = KEYS[1], KEYS[2]
local prefix = string.sub(limits_key, 1, -3)
local rid, desired, minimum = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()

local limits, killed = read_limits(limits_key, ARGV, 4)
if killed then
  return {0, 'killed', 'total', 0, 0, 0}
end

local wins = windows_at(math.floor(now / 1000))
local keys = {}
local grant = desired
for i, w in ipairs(wins) do
  keys[i] = window_key(prefix, w.id)
  local limit = limits[w.name]
  if limit then
    local c = redis.call('HMGET', keys[i], 's', 'r')
    local used = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
    if used + minimum > limit then
      return {0, 'budget_exceeded', w.name, limit, used, w.ends}
    end
    grant = math.min(grant, limit - used)
  end
end

local ids = {}
for i, w in ipairs(wins) do
  redis.call('HINCRBY', keys[i], 'r', grant)
  if w.ends > 0 then redis.call('EXPIREAT', keys[i], w.ends) end
  ids[i] = w.id
end
redis.call('HSET', res_key, rid, grant .. '|' .. now .. '|' .. table.concat(ids, ','))
return {1, grant, now}
