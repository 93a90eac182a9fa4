-- The Redis-backed rate-limit engine's one server-side script (see tasks/limits/redis_engine.py; it is called through
-- tasks/limits/redis_script.py, which names every argument below).
--
-- One call does, atomically, everything a process has for one lane (model and endpoint) of one
-- shared identity: heartbeat, frees what dead processes held, applies releases, refunds, 429
-- slow-downs and the server's x-ratelimit-* headers, then grants as many of the waiting requests
-- as fit. A grant is a reservation: it may be up to `horizon` seconds ahead, and the reply says
-- how long each granted request waits before it goes. So processes never race for each token.
--
-- KEYS[1] lane hash: the two buckets (r_ requests, t_ tokens) and the learned limits
-- KEYS[2] lane flight hash: <process>:n and <process>:t (requests and tokens in flight), n and t totals
-- KEYS[3] identity flight hash: <process> requests in flight over every lane, n total
-- KEYS[4] identity process set: process -> heartbeat expiry (a sorted set)
-- KEYS[5] identity lane set: every lane flight hash, so a dead process's counts can be freed
--
-- ARGV: 1 process, 2 lease seconds, 3 max in flight, 4 requests per minute (-1: unlimited),
--   5 tokens per minute (-1: unlimited), 6 bucket depth in seconds, 7 horizon seconds, 8 which buckets start full ("r", "t", "rt" or "-"),
--   9 released requests, 10 released tokens, 11 refunded tokens, 12 slow requests (0/1),
--   13 slow tokens (0/1), 14..19 headers: limit, remaining, reset for requests then tokens
--   (-1: absent), 20 how many reservations this process holds that are not yet due,
--   21.. the token estimates of the requests waiting, head first.
--
-- Reply: {granted, wait, blocked, learned requests limit, learned tokens limit, share, delay 1,
-- delay 2, ...} as strings; blocked is "rate", "flight", "share" (this process holds its share of
-- reservations ahead) or "".

local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local process = ARGV[1]
local lease = tonumber(ARGV[2])
local max_in_flight = tonumber(ARGV[3])
local depth = tonumber(ARGV[6])
local horizon = tonumber(ARGV[7])
local start_full = ARGV[8]
local keep_seconds = 86400

-- Heartbeat, and free what expired processes held.
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
if #dead > 0 then
  local lanes = redis.call('SMEMBERS', KEYS[5])
  for _, gone in ipairs(dead) do
    for _, lane in ipairs(lanes) do
      local held = redis.call('HMGET', lane, gone .. ':n', gone .. ':t')
      local n, t = tonumber(held[1] or '0'), tonumber(held[2] or '0')
      if n ~= 0 or t ~= 0 then
        redis.call('HINCRBY', lane, 'n', -n)
        redis.call('HINCRBYFLOAT', lane, 't', -t)
        redis.call('HDEL', lane, gone .. ':n', gone .. ':t')
      end
    end
    local n = tonumber(redis.call('HGET', KEYS[3], gone) or '0')
    if n ~= 0 then
      redis.call('HINCRBY', KEYS[3], 'n', -n)
      redis.call('HDEL', KEYS[3], gone)
    end
    redis.call('ZREM', KEYS[4], gone)
  end
end
redis.call('ZADD', KEYS[4], now + lease, process)
redis.call('SADD', KEYS[5], KEYS[2])

-- Releases: never below what this process holds (its counts may have been freed as dead).
local mine = redis.call('HMGET', KEYS[2], process .. ':n', process .. ':t')
local my_n, my_t = tonumber(mine[1] or '0'), tonumber(mine[2] or '0')
local release_n = math.min(tonumber(ARGV[9]), my_n)
local release_t = math.min(tonumber(ARGV[10]), my_t)
if release_n < tonumber(ARGV[9]) then release_t = my_t end

-- The buckets.
local function load(prefix, limit_per_minute)
  if limit_per_minute < 0 then return nil end
  local rate = limit_per_minute / 60.0
  -- Shallow (see depth_seconds in redis_engine.py): reservations run ahead of the bucket as
  -- debt, so its depth is only what a lull can save up for the catch-up after it.
  local capacity = math.max(rate * depth, 1.0)
  local saved = redis.call('HMGET', KEYS[1], prefix .. 'level', prefix .. 'at', prefix .. 'pause')
  local full = string.find(start_full, string.sub(prefix, 1, 1), 1, true) ~= nil
  local level = tonumber(saved[1] or (full and capacity or 0))
  local at = tonumber(saved[2] or now)
  local pause = tonumber(saved[3] or '0')
  local start = math.max(at, pause)
  if now > start then level = level + (now - start) * rate end
  return {prefix = prefix, rate = rate, capacity = capacity, level = math.min(level, capacity),
          pause = pause, learned = tonumber(redis.call('HGET', KEYS[1], prefix .. 'learned') or '-1')}
end

local buckets = {load('r_', tonumber(ARGV[4])), load('t_', tonumber(ARGV[5]))}
local in_flight_lane = {tonumber(redis.call('HGET', KEYS[2], 'n') or '0') - release_n,
                        tonumber(redis.call('HGET', KEYS[2], 't') or '0') - release_t}
local refunds = {0, tonumber(ARGV[11])}
local slows = {ARGV[12] == '1', ARGV[13] == '1'}
for i = 1, 2 do
  local b = buckets[i]
  local limit, remaining, reset = tonumber(ARGV[11 + 3 * i]), tonumber(ARGV[12 + 3 * i]), tonumber(ARGV[13 + 3 * i])
  if limit > 0 then redis.call('HSET', KEYS[1], (i == 1 and 'r_' or 't_') .. 'learned', limit) end
  if b then
    if limit > 0 then b.learned = limit end
    b.level = math.min(b.capacity, b.level + refunds[i])
    if slows[i] then b.level = math.min(b.level, 0) end
    if remaining >= 0 then
      -- Never hold more than the server says remains, less what is on its way to it.
      b.level = math.min(b.level, remaining - in_flight_lane[i])
      if remaining <= in_flight_lane[i] and reset > 0 then b.pause = math.max(b.pause, now + reset) end
    end
  end
end

-- Grants, head of the line first, while the in-flight cap and the horizon allow.
local in_flight = tonumber(redis.call('HGET', KEYS[3], 'n') or '0') - release_n
-- A fair share: a process holds at most its part of a horizon's worth of reservations not yet
-- due, so the process that happens to call first cannot take every reservation while others wait.
local share = #ARGV
if buckets[1] then
  share = math.max(1, math.floor(horizon * buckets[1].rate / math.max(1, redis.call('ZCARD', KEYS[4]))))
end
local room = share - tonumber(ARGV[20])
local granted, granted_t = 0, 0
local delays = {}
local wait, blocked = 0, ''
for index = 21, #ARGV do
  local tokens = tonumber(ARGV[index])
  if in_flight >= max_in_flight then blocked = 'flight'; break end
  if granted >= room then blocked = 'share'; break end
  local delay = 0
  local amounts = {1, tokens}
  for i = 1, 2 do
    local b = buckets[i]
    if b then
      -- A request bigger than the whole bucket goes when the bucket is full, leaving it in debt.
      local needed = math.min(amounts[i], b.capacity) - b.level
      local d = math.max(0, b.pause - now) + math.max(0, needed) / b.rate
      if d > delay then delay = d end
    end
  end
  -- Blocked: ask again when the next request could go now, so that call reserves a whole horizon's worth.
  if delay > horizon then wait = delay; blocked = 'rate'; break end
  for i = 1, 2 do
    if buckets[i] then buckets[i].level = buckets[i].level - amounts[i] end
  end
  in_flight = in_flight + 1
  granted = granted + 1
  granted_t = granted_t + tokens
  delays[#delays + 1] = string.format('%.6f', delay)
end

-- Save.
for i = 1, 2 do
  local b = buckets[i]
  if b then
    redis.call('HSET', KEYS[1], b.prefix .. 'level', string.format('%.6f', b.level),
               b.prefix .. 'at', string.format('%.6f', now), b.prefix .. 'pause', string.format('%.6f', b.pause))
  end
end
local change_n, change_t = granted - release_n, granted_t - release_t
if change_n ~= 0 or change_t ~= 0 then
  redis.call('HINCRBY', KEYS[2], process .. ':n', change_n)
  redis.call('HINCRBYFLOAT', KEYS[2], process .. ':t', change_t)
  redis.call('HINCRBY', KEYS[2], 'n', change_n)
  redis.call('HINCRBYFLOAT', KEYS[2], 't', change_t)
  redis.call('HINCRBY', KEYS[3], process, change_n)
  redis.call('HINCRBY', KEYS[3], 'n', change_n)
end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], keep_seconds) end

local learned_r = buckets[1] and buckets[1].learned or tonumber(redis.call('HGET', KEYS[1], 'r_learned') or '-1')
local learned_t = buckets[2] and buckets[2].learned or tonumber(redis.call('HGET', KEYS[1], 't_learned') or '-1')
local reply = {tostring(granted), string.format('%.6f', wait), blocked, tostring(learned_r), tostring(learned_t),
               tostring(share)}
for _, d in ipairs(delays) do reply[#reply + 1] = d end
return reply
