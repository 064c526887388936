-- Pick the next provider key of a pool: weighted round robin over the usable keys,
-- atomic across processor replicas (one counter per pool).
-- A key is usable when enabled and its health is 'closed', or its cooldown has passed
-- ('half_open': one trial request at a time; its outcome closes or reopens it).
--
--- KEYS: keys round_robin
--- ARGV: prefix held
-- keys         hash key_id -> "weight|enabled(1/0)|label"
-- round_robin  round-robin counter
-- prefix: the pool's key prefix; held: comma-separated key ids this processor holds
-- secrets for.
-- Returns {1, key_id} or {0, earliest_recovery_ms_from_now (-1 = none known)}.
local prefix = A.prefix
local held = {}
for id in string.gmatch(A.held, '[^,]+') do held[id] = true end
local now = now_ms()

local members = redis.call('HGETALL', K.keys)
local ids, meta = {}, {}
for i = 1, #members, 2 do
  ids[#ids + 1] = members[i]
  meta[members[i]] = members[i + 1]
end
table.sort(ids)  -- a stable order for every replica

local slots, earliest = {}, -1
for _, id in ipairs(ids) do
  local weight, enabled = string.match(meta[id], '^(%d+)|(%d)|')
  if enabled == '1' and held[id] then
    local h = redis.call('HMGET', prefix .. LAYOUT.pool_health .. id, 'state', 'until', 'trial')
    local state, until_ms = h[1] or 'closed', tonumber(h[2]) or 0
    local usable = false
    if state == 'closed' then
      usable = true
    elseif state ~= 'disabled' and until_ms <= now then
      usable = (tonumber(h[3]) or 0) <= now  -- no other trial in flight
    end
    if usable then
      for _ = 1, math.max(1, tonumber(weight)) do slots[#slots + 1] = id end
    elseif state ~= 'disabled' then
      local wait = math.max(0, until_ms - now)
      if earliest < 0 or wait < earliest then earliest = wait end
    end
  end
end
if #slots == 0 then
  return {0, earliest}
end
local turn = redis.call('INCR', K.round_robin)
local id = slots[(turn - 1) % #slots + 1]
local hkey = prefix .. LAYOUT.pool_health .. id
local state = redis.call('HGET', hkey, 'state')
if state and state ~= 'closed' then
  redis.call('HSET', hkey, 'state', 'half_open', 'trial', now + 30000)
end
redis.call('HINCRBY', hkey, 'requests', 1)
return {1, id}
