-- Settle one reservation to the actual cost. Idempotent: an unknown (already settled)
-- reservation changes nothing. Windows that expired since the reservation are skipped
-- (their counters are gone; writing would recreate them without an expiry).
--
-- KEYS[1]  tf:{<id>}:rs   open reservations hash
-- ARGV[1]  reservation id   ARGV[2] actual cost (nano-USD, integer >= 0)
-- Returns {1, reserved_amount} when settled, {0, 0} when there was nothing to settle.
local res_key = KEYS[1]
local prefix = string.sub(res_key, 1, -4)
local rid, actual = ARGV[1], tonumber(ARGV[2])

local rec = redis.call('HGET', res_key, rid)
if not rec then return {0, 0} end
redis.call('HDEL', res_key, rid)

local amount, _, ids = string.match(rec, '^(%d+)|(%d+)|(.*)$')
amount = tonumber(amount)
release(prefix, ids, amount, actual)
return {1, amount}
