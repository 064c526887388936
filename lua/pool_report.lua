-- Record the outcome of a call made with a pool key and move its health accordingly.
--   2xx            -> closed, failures reset
--   429            -> open until retry-after (or the given default)
--   5xx / 529      -> open for base * 2^(consecutive failures - 1), capped
--   401 / 403      -> disabled until a probe succeeds or an operator re-enables it
-- Also counts requests by status, tokens and spend (nano-USD) per key.
--
-- KEYS[1] tfp:{<pool>}:h:<key_id>
-- ARGV[1] http status  ARGV[2] retry-after ms (-1 = none)  ARGV[3] base cooldown ms
-- ARGV[4] max cooldown ms  ARGV[5] tokens  ARGV[6] spend nano  ARGV[7] error text
-- Returns {state, until_ms}.
local hkey = KEYS[1]
local status, retry_after = tonumber(ARGV[1]), tonumber(ARGV[2])
local base, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
redis.call('HINCRBY', hkey, 'status_' .. status, 1)
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', hkey, 'tokens', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', hkey, 'spend', ARGV[6]) end
redis.call('HDEL', hkey, 'trial')

local state, until_ms = 'closed', 0
if status >= 200 and status < 300 then
  redis.call('HSET', hkey, 'failures', 0)
elseif status == 401 or status == 403 then
  state = 'disabled'
elseif status == 429 then
  state, until_ms = 'open', now + (retry_after >= 0 and retry_after or base)
elseif status >= 500 then
  local failures = redis.call('HINCRBY', hkey, 'failures', 1)
  local wait = math.min(cap, base * 2 ^ (failures - 1))
  if retry_after >= 0 then wait = math.max(wait, retry_after) end
  state, until_ms = 'open', now + wait
else
  return {redis.call('HGET', hkey, 'state') or 'closed', 0}  -- caller errors say nothing
end
redis.call('HSET', hkey, 'state', state, 'until', until_ms)
if state ~= 'closed' then
  redis.call('HSET', hkey, 'last_error', ARGV[7], 'last_error_at', now)
end
return {state, until_ms}
