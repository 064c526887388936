-- Settle one reservation to the actual cost. Idempotent: an unknown (already settled)
-- reservation changes nothing. Windows that expired since the reservation are skipped
-- (their counters are gone; writing would recreate them without an expiry).
--
-- The same call records the answer for the near-duplicate loop tier: when `answer` (the
-- fingerprint of the generated text) is given, it is compared with the last answer for
-- this near-duplicate fingerprint; the same answer extends the streak (near_hits gets
-- this call), another starts a new one (near_hits holds only this call). reserve.lua
-- refuses the fingerprint once the streak within the window is full.
--
--- KEYS: reservations near_answer near_hits
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
  local window = tonumber(A.near_window_ms)
  if redis.call('GET', K.near_answer) ~= A.answer then
    redis.call('DEL', K.near_hits)
  end
  redis.call('SET', K.near_answer, A.answer, 'PX', window)
  redis.call('ZADD', K.near_hits, now_ms(), rid)
  redis.call('PEXPIRE', K.near_hits, window)
end
return {1, amount}
