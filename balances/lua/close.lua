-- close.lua: close an open session from outside Diameter: supervision timeout (Tcc), a restarted peer, an
-- RAA/ASA saying the gateway does not know the session, an administrator.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] ses:{p}:<session-id>
-- KEYS[4] open:{p}           KEYS[5] cdr:{p}            [KEYS[6] subses:{p}:<msisdn>]
-- [KEYS[7] grp:{p}:<group>: the subscriber's group, whose shared buckets its reservations may hold]
-- ARGV[1] session id   ARGV[2] msisdn   ARGV[3] causeForRecClosing   ARGV[4] now_ms
-- [ARGV[5] conditions, JSON, each optional; checked here, atomically, so that two OCS processes noticing the
--  same thing close a session once, and a session that was active meanwhile is not closed:
--    "before": ms          close only if the last activity is earlier (a restarted peer's old sessions)
--    "origin_host": host   close only if the latest CCR came from this Origin-Host
--    "tcc": {"min", "max", "default": ms, "vt": {"<rating group>": seconds}}
--                          close only if silent for Tcc = 2 x the largest Validity-Time of the rating groups
--                          the session holds quota for or named in its last answer, within [min, max];
--                          "default" when none of them has a Validity-Time]
-- Releases every reservation, writes the closing CDR record (numbered with the highest request number the
-- session has seen) and closes the session like a CCR-T would.
-- Returns {1} closed; {0} not open, or a condition other than tcc does not hold (a leftover open:{p} member
-- is dropped); {2, due_ms} open but not silent for its Tcc yet.

local CLOSED_TTL_MS = 86400000

local sub_key, bal_key, ses_key, open_key, cdr_key, subses_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6]
local grp_key = KEYS[7]
local session_id, msisdn, cause, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if not is_int(now) then
  return redis.error_reply('ERR close: now_ms must be an integer')
end
local cond = {}
if ARGV[5] and ARGV[5] ~= '' then
  cond = decode(ARGV[5])
end

local ses = call('HMGET', ses_key, 'state', 'msisdn', 'cdr', 'hi', 'last', 'origin_host', 'created')
if ses[1] ~= 'open' then
  call('ZREM', open_key, session_id) -- a leftover member, if any
  if subses_key then
    call('SREM', subses_key, session_id)
  end
  return { 0 }
end
if ses[2] ~= msisdn then
  return { 0 }
end
local last = tonumber(ses[5]) or 0
if present(cond.before) and last >= cond.before then
  return { 0 }
end
if present(cond.origin_host) and string.lower(ses[6] or '') ~= string.lower(cond.origin_host) then
  return { 0 }
end

local fields = call('HKEYS', ses_key)
local held = {}
for _, field in ipairs(fields) do
  if string.sub(field, 1, 2) == 'r:' then
    held[#held + 1] = field
  end
end

if present(cond.tcc) then
  local t = cond.tcc
  local by_rg = present(t.vt) and t.vt or {}
  local vt = 0
  local function consider(rg)
    local v = by_rg[rg]
    if present(v) and v > vt then
      vt = v
    end
  end
  for _, field in ipairs(held) do
    consider(string.sub(field, 3))
  end
  local stored = call('HGET', ses_key, 'a:' .. int(tonumber(ses[4]) or 0))
  if stored then
    for _, rg in ipairs(stored_rating_groups(stored)) do
      consider(int(rg))
    end
  end
  local tcc = t.default
  if vt > 0 then
    tcc = math.max(t.min, math.min(t.max, 2 * vt * 1000))
  end
  if now - last < tcc then
    return { 2, last + tcc }
  end
end

local p = purse(wallet(bal_key), grp_key and wallet(grp_key) or nil, msisdn, '')
if #held > 0 then
  for _, value in ipairs(call('HMGET', ses_key, unpack_(held))) do
    release(p, value)
  end
  call('HDEL', ses_key, unpack_(held))
end
wsave(p.own)
wsave(p.grp)

local rec = record_parts(ses[3], msisdn, session_id, tonumber(ses[7]) or 0, tonumber(ses[4]) or 0, now)
close_record(cdr_key, rec, cause, call('HGET', sub_key, 'currency') or 'EUR')
call('ZREM', open_key, session_id)
if subses_key then
  call('SREM', subses_key, session_id)
end
call('HSET', ses_key, 'state', 'closed', 'closed', int(now), 'last', int(now), 'closed_by', cause)
call('PEXPIRE', ses_key, CLOSED_TTL_MS)
return { 1 }
