-- Pre-call decision, all in one atomic call: kill switch, loop guard (exact tier: cooldown
-- + true sliding window per request fingerprint; near-duplicate tier: cooldown + the streak
-- of identical answers settle.lua recorded for the near-duplicate fingerprint), velocity
-- breaker, then every budget window. Only a request that passes everything is counted
-- (loop hit, velocity) and reserved. A block (either tier) empties both tiers' counts of
-- this request, so after the cooldown it starts from zero (retry-after is the truth).
-- The grant is the desired amount, or less when the budget cannot cover it but can cover
-- the minimum (streams start with what fits and extend).
--
--- KEYS: limits reservations loop_hits loop_cooldown near_hits near_cooldown velocity
--- ARGV: prefix rid desired minimum default_minute default_hour default_day default_week default_month default_total loop_max_hits loop_window_ms loop_cooldown_ms near_max_hits near_window_ms near_cooldown_ms velocity_max threshold_percent analytics group ttl_minute ttl_hour ttl_day
-- limits        limits hash (minute..total nano-USD, 'killed')
-- reservations  open reservations: rid -> "amount|touched_ms|window ids"
-- loop_hits     ZSET of this fingerprint's forwarded requests (score = ms)
-- loop_cooldown cooldown after a loop block (hit count, PEXPIRE = cooldown)
-- near_hits     ZSET of the settled calls of the near-duplicate fingerprint whose answers
--               repeated the streak's answer (settle.lua; score = ms)
-- near_cooldown cooldown after a near-duplicate block
-- velocity      ZSET of the caller's forwarded requests in the last minute
-- prefix: the caller's key prefix; default_*: limits for a caller without its own
-- (-1 = none); loop_max_hits 0 = exact tier off; near_max_hits 0 = near-duplicate tier
-- off; velocity_max 0 = off;
-- threshold_percent 0 = no threshold alerts.
-- analytics 1: every refusal is counted in the caller's usage analytics (by the code the
-- client gets, under group "<provider>|<pool>|<model>"; ttl_*: retention, s), so the
-- processor does not count these again.
--
-- Returns one of
--   {1, granted, now_ms, crossed}        crossed = "day,month" windows that just crossed
--                                        the threshold for the first time this window
--   {0, 'budget_exceeded', window, limit, used, reset_epoch_s, first_in_window(0/1)}
--   {0, 'killed', 'total', 0, 0, 0, 0}
--   {0, 'duplicate_reservation', 'total', 0, 0, 0, 0}   rid is already open: never overwritten
--   {0, 'loop', hit_count, retry_after_ms}     {0, 'near_loop', hit_count, retry_after_ms}
--   {0, 'velocity', count, retry_after_ms}
local prefix, rid = A.prefix, A.rid
local desired, minimum = tonumber(A.desired), tonumber(A.minimum)
local max_hits, window_ms = tonumber(A.loop_max_hits), tonumber(A.loop_window_ms)
local cooldown_ms = tonumber(A.loop_cooldown_ms)
local near_max = tonumber(A.near_max_hits)
local velocity_max, threshold = tonumber(A.velocity_max), tonumber(A.threshold_percent)
local now = now_ms()

-- The code the client gets for each refusal (tokenfuse.policy.refusals).
local CODES = {budget_exceeded = 'budget_exceeded', killed = 'killed',
               duplicate_reservation = 'state_store_unavailable',
               loop = 'recursive_loop_detected', near_loop = 'near_duplicate_loop_detected',
               velocity = 'velocity_limit_exceeded'}
local function refused(answer)
  if A.analytics == '1' then
    analytics_add(analytics_buckets(prefix, now, A.ttl_minute, A.ttl_hour, A.ttl_day),
                  A.group, {'r:' .. CODES[answer[2]], 1})
  end
  return answer
end

if redis.call('HEXISTS', K.reservations, rid) == 1 then
  return refused({0, 'duplicate_reservation', 'total', 0, 0, 0, 0})
end
local limits, killed = read_limits(K.limits, A)
if killed then
  return refused({0, 'killed', 'total', 0, 0, 0, 0})
end

if max_hits > 0 then
  local cooling = redis.call('PTTL', K.loop_cooldown)
  if cooling > 0 then
    return refused({0, 'loop', redis.call('INCR', K.loop_cooldown), cooling})
  end
  redis.call('ZREMRANGEBYSCORE', K.loop_hits, '-inf', now - window_ms)
  local hits = redis.call('ZCARD', K.loop_hits) + 1
  if hits > max_hits then
    redis.call('SET', K.loop_cooldown, hits, 'PX', cooldown_ms)
    redis.call('DEL', K.loop_hits, K.near_hits)
    return refused({0, 'loop', hits, cooldown_ms})
  end
end

if near_max > 0 then
  local cooling = redis.call('PTTL', K.near_cooldown)
  if cooling > 0 then
    return refused({0, 'near_loop', redis.call('INCR', K.near_cooldown), cooling})
  end
  -- settle.lua trims the streak when it grows; here only the calls in the window count
  local hits = redis.call('ZCOUNT', K.near_hits, now - tonumber(A.near_window_ms), '+inf') + 1
  if hits > near_max then
    local near_cooldown_ms = tonumber(A.near_cooldown_ms)
    redis.call('SET', K.near_cooldown, hits, 'PX', near_cooldown_ms)
    redis.call('DEL', K.near_hits, K.loop_hits)
    return refused({0, 'near_loop', hits, near_cooldown_ms})
  end
end

if velocity_max > 0 then
  redis.call('ZREMRANGEBYSCORE', K.velocity, '-inf', now - 60000)
  local count = redis.call('ZCARD', K.velocity)
  if count >= velocity_max then
    local oldest = redis.call('ZRANGE', K.velocity, 0, 0, 'WITHSCORES')
    return refused({0, 'velocity', count + 1, math.max(1, tonumber(oldest[2]) + 60000 - now)})
  end
end

local wins = windows_at(math.floor(now / 1000))
local keys, used = {}, {}
local grant = desired
for i, w in ipairs(wins) do
  keys[i] = window_key(prefix, w.id)
  local limit = limits[w.name]
  if limit then
    local c = redis.call('HMGET', keys[i], 's', 'r')
    used[i] = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
    if used[i] + minimum > limit then
      local marker = prefix .. LAYOUT.exceeded_mark .. w.id
      local first = redis.call('SET', marker, 1, 'NX', 'EXAT',
        w.ends > 0 and w.ends or math.floor(now / 1000) + 86400 * 3650) and 1 or 0
      return refused({0, 'budget_exceeded', w.name, limit, used[i], w.ends, first})
    end
    grant = math.min(grant, limit - used[i])
  end
end

local ids, crossed = {}, {}
for i, w in ipairs(wins) do
  redis.call('HINCRBY', keys[i], 'r', grant)
  if w.ends > 0 then redis.call('EXPIREAT', keys[i], w.ends) end
  ids[i] = w.id
  local limit = limits[w.name]
  if threshold > 0 and limit and limit > 0 and (used[i] + grant) * 100 >= limit * threshold then
    local marker = prefix .. LAYOUT.threshold_mark .. w.id
    if redis.call('SET', marker, 1, 'NX', 'EXAT',
        w.ends > 0 and w.ends or math.floor(now / 1000) + 86400 * 3650) then
      crossed[#crossed + 1] = w.name
    end
  end
end
redis.call('HSET', K.reservations, rid, grant .. '|' .. now .. '|' .. table.concat(ids, ','))
if max_hits > 0 then
  redis.call('ZADD', K.loop_hits, now, rid)
  redis.call('PEXPIRE', K.loop_hits, window_ms)
end
if velocity_max > 0 then
  redis.call('ZADD', K.velocity, now, rid)
  redis.call('PEXPIRE', K.velocity, 60000)
end
return {1, grant, now, table.concat(crossed, ',')}
