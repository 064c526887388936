-- Record the outcome of a call made with a pool key and move its health accordingly.
--   2xx            -> closed, failures reset
--   429            -> open until retry-after (or the given default)
--   5xx / 529      -> open for base * 2^(consecutive failures - 1), capped
--   401 / 403      -> disabled until a probe succeeds or an operator re-enables it
-- Also counts requests by status, tokens and spend (nano-USD) per key.
--
--- KEYS: health
--- ARGV: status retry_after_ms base_cooldown_ms max_cooldown_ms tokens spend error
-- health: the key's health hash; retry_after_ms -1 = none; spend in nano-USD.
-- Returns {state, until_ms, state before}.
local hkey = K.health
local status, retry_after = tonumber(A.status), tonumber(A.retry_after_ms)
local base, cap = tonumber(A.base_cooldown_ms), tonumber(A.max_cooldown_ms)
local now = now_ms()
local before = redis.call('HGET', hkey, 'state') or 'closed'
redis.call('HINCRBY', hkey, 'status_' .. status, 1)
if tonumber(A.tokens) > 0 then redis.call('HINCRBY', hkey, 'tokens', A.tokens) end
if tonumber(A.spend) > 0 then redis.call('HINCRBY', hkey, 'spend', A.spend) end
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
  return {before, 0, before}  -- caller errors say nothing
end
redis.call('HSET', hkey, 'state', state, 'until', until_ms)
if state ~= 'closed' then
  redis.call('HSET', hkey, 'last_error', A.error, 'last_error_at', now)
end
return {state, until_ms, before}
