-- Read-only view of one caller's budget: limit, spent, reserved and reset per window.
-- KEYS[1]  tf:{<id>}:b limits hash.  ARGV[1..6] default limits (-1 = none).
-- Returns {now_ms, killed(0/1), has_own(0/1), {name, limit(-1 = none), spent, reserved, ends}...}
local limits_key = KEYS[1]
local prefix = string.sub(limits_key, 1, -3)
local now = now_ms()
local limits, killed, has_own = read_limits(limits_key, ARGV, 1)
local out = {now, killed and 1 or 0, has_own and 1 or 0}
for _, w in ipairs(windows_at(math.floor(now / 1000))) do
  local c = redis.call('HMGET', window_key(prefix, w.id), 's', 'r')
  out[#out + 1] = {w.name, limits[w.name] or -1, tonumber(c[1]) or 0, tonumber(c[2]) or 0, w.ends}
end
return out
