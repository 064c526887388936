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
-- The same call writes the usage analytics (analytics = 1; 0: off, or a released call that
-- was never forwarded) to the caller's minute, hour and day buckets: spend, one request,
-- its error status, tokens by kind, latency and time to first byte (histogram bin chosen
-- by the caller), and the cut of a stream tokenfuse ended (counted as a refusal).
--
--- KEYS: reservations near_hits
--- ARGV: prefix rid actual answer near_window_ms analytics group status latency_ms latency_bin ttft_ms ttft_bin t_in t_out t_cache_read t_cache_write t_reasoning cut ttl_minute ttl_hour ttl_day
-- actual: the cost (nano-USD, integer >= 0); answer: "" = none to record (a failed, cut
-- or released call, or the tier is off): the streak is left as it is.
-- group: "<provider>|<pool>|<model>"; latency_ms / ttft_ms -1 = not known; cut: the
-- reason a stream was cut ("" = not cut); ttl_*: retention after the period (s).
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
if A.analytics == '1' then
  local f = {'n', 1}
  local function add(metric, n)
    n = tonumber(n)
    if n ~= 0 then f[#f + 1] = metric; f[#f + 1] = n end
  end
  add('$', actual)
  if tonumber(A.status) >= 400 then add('e:' .. A.status, 1) end
  add('ti', A.t_in); add('to', A.t_out); add('tr', A.t_cache_read)
  add('tw', A.t_cache_write); add('tx', A.t_reasoning)
  if tonumber(A.latency_ms) >= 0 then  -- a histogram's count is the sum of its bins
    add('l:' .. A.latency_bin, 1); add('ls', A.latency_ms)
  end
  if tonumber(A.ttft_ms) >= 0 then
    add('f:' .. A.ttft_bin, 1); add('fs', A.ttft_ms)
  end
  if A.cut ~= '' then add('r:stream_cut_' .. A.cut, 1) end
  analytics_add(analytics_buckets(A.prefix, now_ms(), A.ttl_minute, A.ttl_hour, A.ttl_day),
                A.group, f)
end
return {1, amount}
