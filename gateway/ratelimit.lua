-- Check and count every window of every policy that applies to one request, atomically, on Redis's clock.
-- KEYS[i]: the counter of window i (all share the tenant hash tag, so this runs unchanged on Redis Cluster).
-- ARGV, five per window: kind (1 = GCRA, 2 = calendar counter), limit, p1, p2, shadow ("1" or "0").
--   GCRA:     p1 = emission interval (µs), p2 = tolerance (µs) = capacity * interval
--   calendar: p1 = window end (epoch ms), p2 unused
-- Returns {blocked, over_1, remaining_1, reset_ms_1, over_2, ...}. A blocked request changes nothing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local result = {0}
local blocked = 0
local writes = {}
for i = 1, #KEYS do
  local base = (i - 1) * 5
  local kind = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local p1 = tonumber(ARGV[base + 3])
  local p2 = tonumber(ARGV[base + 4])
  local shadow = ARGV[base + 5] == '1'
  local over, remaining, reset_ms
  if kind == 1 then
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + p1
    if new_tat - now > p2 then
      over = 1
      remaining = 0
      reset_ms = math.ceil((new_tat - now - p2) / 1000)
    else
      over = 0
      remaining = math.floor((p2 - (new_tat - now)) / p1)
      reset_ms = math.ceil((new_tat - now) / 1000)
      writes[#writes + 1] = {1, KEYS[i], new_tat}
    end
  else
    local count = tonumber(redis.call('GET', KEYS[i]) or '0')
    reset_ms = math.max(p1 - now_ms, 1)
    if count + 1 > limit then
      over = 1
      remaining = 0
    else
      over = 0
      remaining = limit - count - 1
    end
    if over == 0 or shadow then
      writes[#writes + 1] = {2, KEYS[i], p1}
    end
  end
  if over == 1 and not shadow then blocked = 1 end
  result[#result + 1] = over
  result[#result + 1] = remaining
  result[#result + 1] = reset_ms
end
if blocked == 0 then
  for _, w in ipairs(writes) do
    if w[1] == 1 then
      redis.call('SET', w[2], string.format('%.0f', w[3]), 'PX', math.ceil((w[3] - now) / 1000) + 1000)
    else
      redis.call('INCR', w[2])
      redis.call('PEXPIREAT', w[2], w[3] + 60000)
    end
  end
end
result[1] = blocked
return result
