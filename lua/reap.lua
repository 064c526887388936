-- Charge orphaned reservations as spent: reservations not touched (reserved or extended)
-- for longer than the TTL belong to a processor that died or lost its stream. Atomic and
-- idempotent, so any number of processor replicas may run it on the same caller.
--
--- KEYS: reservations
--- ARGV: prefix ttl analytics ttl_minute ttl_hour ttl_day
-- ttl in ms. Returns {reaped_count, charged_nano}. analytics = 1: the charge is also
-- written to the usage analytics (as spend of an unknown model, provider and pool).
local ttl = tonumber(A.ttl)
local now = now_ms()
local count, charged = 0, 0
local all = redis.call('HGETALL', K.reservations)
for i = 1, #all, 2 do
  local amount, touched, ids = string.match(all[i + 1], '^(%d+)|(%d+)|(.*)$')
  if tonumber(touched) + ttl < now then
    amount = tonumber(amount)
    release(A.prefix, ids, amount, amount)  -- charged as spent: the wallet is protected
    redis.call('HDEL', K.reservations, all[i])
    count = count + 1
    charged = charged + amount
  end
end
if A.analytics == '1' and charged > 0 then
  analytics_add(analytics_buckets(A.prefix, now, A.ttl_minute, A.ttl_hour, A.ttl_day),
                '||', {'$', charged})
end
return {count, charged}
