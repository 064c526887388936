-- Settle one reservation to the actual cost. Idempotent: an unknown (already settled)
-- reservation changes nothing. Windows that expired since the reservation are skipped
-- (their counters are gone; writing would recreate them without an expiry).
--
-- The same call records the answer for the near-duplicate loop tier: when `answer` (the
-- fingerprint of the generated text) is given, it is compared with the answer of the
-- current streak for this near-duplicate fingerprint (near_hits: a ZSET of
-- "<answer>|<rid>" scored by settle time; every member carries the streak's answer). The
-- same answer extends the streak, another starts a new one (near_hits then holds only this
-- call). reserve.lua refuses the fingerprint once the streak within the window is full.
--
--- KEYS: reservations near_hits
--- ARGV: prefix rid actual answer near_window_ms
-- actual: the cost (nano-USD, integer >= 0); answer: "" = none to record (a failed, cut
-- or released call, or the tier is off): the streak is left as it is.
-- Returns {1, reserved_amount} when settled, {0, 0} when there was nothing to settle.
local rid, actual = A.rid, tonumber(A.actual)

local rec = redis.call('HGET', K.reservations, rid)
if not rec then return {0, 0} end
redis.call('HDEL', K.reservations, rid)

local amount, _, ids = string.match(rec, '^(%d+)|(%d+)|(.*)$')
amount = tonumber(amount)
release(A.prefix, ids, amount, actual)

if A.answer ~= '' then
  local tag = A.answer .. '|'
  local now = now_ms()
  local last = redis.call('ZRANGE', K.near_hits, -1, -1)[1]
  if last and string.sub(last, 1, #tag) ~= tag then
    redis.call('DEL', K.near_hits)
  elseif last then  -- the streak goes on: calls older than the window leave it
    redis.call('ZREMRANGEBYSCORE', K.near_hits, '-inf', now - tonumber(A.near_window_ms))
  end
  redis.call('ZADD', K.near_hits, now, tag .. rid)
  redis.call('PEXPIRE', K.near_hits, A.near_window_ms)
end
return {1, amount}
