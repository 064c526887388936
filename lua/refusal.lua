-- Count one refusal the processor decided without a script (bad request, unknown model,
-- tool loop, draining, ...) in the caller's usage analytics. Written in the background
-- after the answer was sent (tokenfuse.state.analytics.RefusalRecorder); refusals that
-- reserve.lua decided are counted there, never here.
--
--- KEYS: limits
--- ARGV: prefix group reason ttl_minute ttl_hour ttl_day
-- limits: not read; it names the caller's slot (Redis Cluster routes the call by it).
-- group: "<provider>|<pool>|<model>"; reason: the refusal's code; ttl_*: retention (s).
analytics_add(analytics_buckets(A.prefix, now_ms(), A.ttl_minute, A.ttl_hour, A.ttl_day),
              A.group, {'r:' .. A.reason, 1})
return 1
