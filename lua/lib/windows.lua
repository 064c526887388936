-- Shared prelude, prepended to every script by tokenfuse.state.scripts (Lua has no
-- include), after LAYOUT (the key suffixes of tokenfuse.state.keys) and before the
-- script's named KEYS (K.<name>) and ARGV (A.<name>).
-- Budget windows are UTC calendar windows computed from the Redis clock, so every
-- processor replica agrees on them. A window is {name, key suffix, end (epoch s)}.

local function days_from_civil(y, m, d)
  -- Howard Hinnant's algorithm, integer arithmetic only.
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- Window names, as the limits hash and the default_<window> arguments name them.
local WINDOW_NAMES = {'minute', 'hour', 'day', 'week', 'month', 'total'}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Returns a list of {name=, id=, ends=} (ends in epoch seconds; 0 = never).
local function windows_at(sec)
  local day = math.floor(sec / 86400)
  local minute = math.floor(sec / 60)
  local hour = math.floor(sec / 3600)
  -- 1970-01-01 is a Thursday; ISO weeks start on Monday (day -3).
  local week = math.floor((day + 3) / 7)
  local y, m = civil_from_days(day)
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return {
    {name = 'minute', id = 'mi' .. minute, ends = (minute + 1) * 60},
    {name = 'hour', id = 'h' .. hour, ends = (hour + 1) * 3600},
    {name = 'day', id = 'd' .. day, ends = (day + 1) * 86400},
    {name = 'week', id = 'w' .. week, ends = (week * 7 + 4) * 86400},
    {name = 'month', id = 'mo' .. (y * 100 + m), ends = days_from_civil(ny, nm, 1) * 86400},
    {name = 'total', id = 't', ends = 0},
  }
end

-- Counter hash of one window: fields s (spent) and r (reserved), integer nano-USD.
local function window_key(prefix, id)
  return prefix .. LAYOUT.window .. id
end

-- Window name of a window id ('mi123' -> 'minute', 'mo202611' -> 'month', 't' -> 'total').
local function window_name(id)
  local two = string.sub(id, 1, 2)
  if two == 'mi' then return 'minute' end
  if two == 'mo' then return 'month' end
  local one = string.sub(id, 1, 1)
  if one == 'h' then return 'hour' end
  if one == 'd' then return 'day' end
  if one == 'w' then return 'week' end
  return 'total'
end

-- The caller's limits: its own, or (when it has none) the defaults passed as the
-- arguments default_minute .. default_total (-1 = none).
-- Returns limits-by-window-name, whether the kill flag is set, whether it has its own.
local function read_limits(limits_key, args)
  local own = redis.call('HGETALL', limits_key)
  local limits = {}
  for i = 1, #own, 2 do limits[own[i]] = tonumber(own[i + 1]) end
  local killed = limits['killed'] ~= nil
  local has_own = false
  for _, name in ipairs(WINDOW_NAMES) do
    if limits[name] then has_own = true end
  end
  if not has_own then
    for _, name in ipairs(WINDOW_NAMES) do
      local d = tonumber(args['default_' .. name])
      if d and d >= 0 then limits[name] = d end
    end
  end
  return limits, killed, has_own
end

-- Release a reservation: take `amount` out of 'reserved' and add `actual` to 'spent' in
-- every window it was made in that still exists (an expired window is not recreated).
local function release(prefix, ids, amount, actual)
  for id in string.gmatch(ids, '[^,]+') do
    local key = window_key(prefix, id)
    if id == 't' or redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'r', -amount)
      redis.call('HINCRBY', key, 's', actual)
    end
  end
end

-- Usage analytics (tokenfuse.state.analytics): the caller's minute, hour and day bucket
-- hashes at `now` (ms), each with the epoch second it expires at (the end of its period
-- plus its retention, seconds: `ttl_minute`, `ttl_hour`, `ttl_day`).
local function analytics_buckets(prefix, now, ttl_minute, ttl_hour, ttl_day)
  local sec = math.floor(now / 1000)
  local m, h, d = math.floor(sec / 60), math.floor(sec / 3600), math.floor(sec / 86400)
  return {
    {prefix .. LAYOUT.analytics_minute .. m, (m + 1) * 60 + tonumber(ttl_minute)},
    {prefix .. LAYOUT.analytics_hour .. h, (h + 1) * 3600 + tonumber(ttl_hour)},
    {prefix .. LAYOUT.analytics_day .. d, (d + 1) * 86400 + tonumber(ttl_day)},
  }
end

-- Add to every bucket: `fields` is a flat list metric, n, metric, n (every n > 0); a field
-- is "<metric>|<group>" (group: "<provider>|<pool>|<model>"). The expiry is set when the
-- first field is new in a bucket (its value is then n): a bucket's first write is always
-- one, and later calls skip the command (the time is the same absolute one anyway).
local function analytics_add(buckets, group, fields)
  local names = {}
  for i = 1, #fields, 2 do names[i] = fields[i] .. '|' .. group end
  for _, b in ipairs(buckets) do
    local key = b[1]
    local first = redis.call('HINCRBY', key, names[1], fields[2])
    for i = 3, #fields, 2 do redis.call('HINCRBY', key, names[i], fields[i + 1]) end
    if first == fields[2] then redis.call('EXPIREAT', key, b[2]) end
  end
end
