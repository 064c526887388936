-- Mid-stream decision: grow an open reservation before more tokens are forwarded.
-- Checked against the limits of the windows the reservation was made in; grants the
-- desired amount or less (down to the minimum); refuses when the key is killed, the
-- reservation is gone (settled or reaped) or no window can cover the minimum.
--
--- KEYS: limits reservations
--- ARGV: prefix rid desired minimum default_minute default_hour default_day default_week default_month default_total
-- Returns {1, granted} or {0, reason, window, limit, used, reset_epoch_s}.
local prefix, rid = A.prefix, A.rid
local desired, minimum = tonumber(A.desired), tonumber(A.minimum)

local rec = redis.call('HGET', K.reservations, rid)
if not rec then
  return {0, 'reservation_gone', 'total', 0, 0, 0}
end
local limits, killed = read_limits(K.limits, A)
if killed then
  return {0, 'killed', 'total', 0, 0, 0}
end
local amount, _, ids = string.match(rec, '^(%d+)|(%d+)|(.*)$')

local live = {}
local grant = desired
for id in string.gmatch(ids, '[^,]+') do
  local key = window_key(prefix, id)
  if id == 't' or redis.call('EXISTS', key) == 1 then
    live[#live + 1] = key
    local limit = limits[window_name(id)]
    if limit then
      local c = redis.call('HMGET', key, 's', 'r')
      local used = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
      if used + minimum > limit then
        local ttl = redis.call('TTL', key)
        local ends = ttl > 0 and math.floor(now_ms() / 1000) + ttl or 0
        return {0, 'budget_exceeded', window_name(id), limit, used, ends}
      end
      grant = math.min(grant, limit - used)
    end
  end
end
for _, key in ipairs(live) do
  redis.call('HINCRBY', key, 'r', grant)
end
redis.call('HSET', K.reservations, rid,
  (tonumber(amount) + grant) .. '|' .. now_ms() .. '|' .. ids)
return {1, grant}
