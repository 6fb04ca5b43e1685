-- Add one gateway worker's flush batch for one tenant into the minute bucket hashes, at most once.
-- Layout: apimgmt/usage_buckets.py. Every key carries the tenant's hash tag (one Redis Cluster slot).
-- KEYS[1]: the worker's applied-batch marker; KEYS[2]: the tenant's dirty-minute index; KEYS[3..]: minute hashes.
-- ARGV[1]: batch number (increasing per worker); ARGV[2]: marker TTL (s); then, per minute hash in KEYS order:
--   minute (epoch s), number of buckets n, then n pairs of field and value ("r,e,bi,bo,ls,lm,us[,c,cus,mi,mo]",
--   integers; the WebSocket numbers at the end may be missing, on either side, and count as zeros).
-- Returns 1 when applied, 0 when this batch (or a later one of the worker) was applied before.
local batch = tonumber(ARGV[1])
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= batch then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
local a = 3
for k = 3, #KEYS do
  local minute = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    local field, add = ARGV[a], ARGV[a + 1]
    a = a + 2
    local old = redis.call('HGET', KEYS[k], field)
    if old then
      local x = {}
      for v in string.gmatch(old, '[^,]+') do x[#x + 1] = tonumber(v) end
      local i = 0
      for v in string.gmatch(add, '[^,]+') do
        i = i + 1
        v = tonumber(v)
        if i == 6 then
          if v > x[i] then x[i] = v end
        else
          x[i] = (x[i] or 0) + v
        end
      end
      for j = 1, #x do x[j] = string.format('%.0f', x[j]) end
      add = table.concat(x, ',')
    end
    redis.call('HSET', KEYS[k], field, add)
  end
  redis.call('ZADD', KEYS[2], minute, minute)
end
return 1
