-- Pre-call decision, all in one atomic call: kill switch, loop guard (cooldown + true
-- sliding window per request fingerprint), velocity breaker, then every budget window.
-- Only a request that passes everything is counted (loop hit, velocity) and reserved.
-- The grant is the desired amount, or less when the budget cannot cover it but can cover
-- the minimum (streams start with what fits and extend).
--
-- KEYS[1] tf:{<id>}:b   limits hash (minute..total nano-USD, 'killed')
-- KEYS[2] tf:{<id>}:rs  open reservations: rid -> "amount|touched_ms|window ids"
-- KEYS[3] tf:{<id>}:lp:<fp>  ZSET of this fingerprint's forwarded requests (score = ms)
-- KEYS[4] tf:{<id>}:lc:<fp>  cooldown after a loop block (hit count, PEXPIRE = cooldown)
-- KEYS[5] tf:{<id>}:vel      ZSET of the caller's forwarded requests in the last minute
-- ARGV[1] rid  ARGV[2] desired  ARGV[3] minimum  ARGV[4..9] default limits (-1 = none)
-- ARGV[10] loop max hits (0 = off)  ARGV[11] loop window ms  ARGV[12] cooldown ms
-- ARGV[13] velocity max per minute (0 = off)  ARGV[14] threshold percent (0 = off)
--
-- Returns one of
--   {1, granted, now_ms, crossed}        crossed = "day,month" windows that just crossed
--                                        the threshold for the first time this window
--   {0, 'budget_exceeded', window, limit, used, reset_epoch_s, first_in_window(0/1)}
--   {0, 'killed', 'total', 0, 0, 0, 0}
--   {0, 'loop', hit_count, retry_after_ms}     {0, 'velocity', count, retry_after_ms}
local limits_key, res_key, fp_key, cool_key, vel_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5]
local prefix = string.sub(limits_key, 1, -3)
local rid, desired, minimum = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_hits, window_ms, cooldown_ms = tonumber(ARGV[10]), tonumber(ARGV[11]),
  tonumber(ARGV[12])
local velocity_max, threshold = tonumber(ARGV[13]), tonumber(ARGV[14])
local now = now_ms()

local limits, killed = read_limits(limits_key, ARGV, 4)
if killed then
  return {0, 'killed', 'total', 0, 0, 0, 0}
end

if max_hits > 0 then
  local cooling = redis.call('PTTL', cool_key)
  if cooling > 0 then
    return {0, 'loop', redis.call('INCR', cool_key), cooling}
  end
  redis.call('ZREMRANGEBYSCORE', fp_key, '-inf', now - window_ms)
  local hits = redis.call('ZCARD', fp_key) + 1
  if hits > max_hits then
    redis.call('SET', cool_key, hits, 'PX', cooldown_ms)
    return {0, 'loop', hits, cooldown_ms}
  end
end

if velocity_max > 0 then
  redis.call('ZREMRANGEBYSCORE', vel_key, '-inf', now - 60000)
  local count = redis.call('ZCARD', vel_key)
  if count >= velocity_max then
    local oldest = redis.call('ZRANGE', vel_key, 0, 0, 'WITHSCORES')
    return {0, 'velocity', count + 1, math.max(1, tonumber(oldest[2]) + 60000 - now)}
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
      local marker = prefix .. ':wx:' .. w.id
      local first = redis.call('SET', marker, 1, 'NX', 'EXAT',
        w.ends > 0 and w.ends or math.floor(now / 1000) + 86400 * 3650) and 1 or 0
      return {0, 'budget_exceeded', w.name, limit, used[i], w.ends, first}
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
    local marker = prefix .. ':wt:' .. w.id
    if redis.call('SET', marker, 1, 'NX', 'EXAT',
        w.ends > 0 and w.ends or math.floor(now / 1000) + 86400 * 3650) then
      crossed[#crossed + 1] = w.name
    end
  end
end
redis.call('HSET', res_key, rid, grant .. '|' .. now .. '|' .. table.concat(ids, ','))
if max_hits > 0 then
  redis.call('ZADD', fp_key, now, rid)
  redis.call('PEXPIRE', fp_key, window_ms)
end
if velocity_max > 0 then
  redis.call('ZADD', vel_key, now, rid)
  redis.call('PEXPIRE', vel_key, 60000)
end
return {1, grant, now, table.concat(crossed, ',')}
