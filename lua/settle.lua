-- Settle one reservation to the actual cost. Idempotent: an unknown (already settled)
-- reservation changes nothing. Windows that expired since the reservation are skipped
-- (their counters are gone; writing would recreate them without an expiry).
--
--- KEYS: reservations
--- ARGV: prefix rid actual
-- actual: the cost (nano-USD, integer >= 0).
-- Returns {1, reserved_amount} when settled, {0, 0} when there was nothing to settle.
local rid, actual = A.rid, tonumber(A.actual)

local rec = redis.call('HGET', K.reservations, rid)
if not rec then return {0, 0} end
redis.call('HDEL', K.reservations, rid)

local amount, _, ids = string.match(rec, '^(%d+)|(%d+)|(.*)$')
amount = tonumber(amount)
release(A.prefix, ids, amount, actual)
return {1, amount}
