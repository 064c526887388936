-- Read-only view of one caller's budget: limit, spent, reserved and reset per window.
--
--- KEYS: limits
--- ARGV: prefix default_minute default_hour default_day default_week default_month default_total
-- Returns {now_ms, killed(0/1), has_own(0/1), {name, limit(-1 = none), spent, reserved, ends}...}
local now = now_ms()
local limits, killed, has_own = read_limits(K.limits, A)
local out = {now, killed and 1 or 0, has_own and 1 or 0}
for _, w in ipairs(windows_at(math.floor(now / 1000))) do
  local c = redis.call('HMGET', window_key(A.prefix, w.id), 's', 'r')
  out[#out + 1] = {w.name, limits[w.name] or -1, tonumber(c[1]) or 0, tonumber(c[2]) or 0, w.ends}
end
return out
