-- Read-only view of one caller's budget: limit, spent, reserved and reset per window.
-- KEYS[1]  tf:{<id>}:b limits hash.  ARGV[1..6] default limits (-1 = none).
-- Returns {now_ms, killed(0/1), has_own(0/1), {name, limit(-1 = none), spent, reserved, ends}...}
local limits_key = KEYS[1]
local prefix = string.sub(limits_key, 1, -3)
local now = now_ms()
local own = redis.call('HGETALL', limits_key)
local limits = {}
for i = 1, #own, 2 do limits[own[i]] = tonumber(own[i + 1]) end
local has_own = 0
for _, name in ipairs(WINDOW_NAMES) do
  if limits[name] then has_own = 1 end
end
local out = {now, limits['killed'] and 1 or 0, has_own}
for i, w in ipairs(windows_at(math.floor(now / 1000))) do
  local limit = limits[w.name]
  if has_own == 0 then
    local d = tonumber(ARGV[i])
    if d and d >= 0 then limit = d end
  end
  local c = redis.call('HMGET', window_key(prefix, w.id), 's', 'r')
  out[#out + 1] = {w.name, limit or -1, tonumber(c[1]) or 0, tonumber(c[2]) or 0, w.ends}
end
return out
