-- close.lua: close an open session from outside Diameter (inactivity timeout, administrator).
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] ses:{p}:<session-id>
-- KEYS[4] open:{p}           KEYS[5] cdr:{p}
-- ARGV[1] session id   ARGV[2] msisdn   ARGV[3] causeForRecClosing   ARGV[4] now_ms
-- Releases every reservation, writes the closing CDR record (numbered with the highest request number the
-- session has seen) and closes the session like a CCR-T would. Returns 1 when closed, 0 when the session
-- was not open (only a leftover open:{p} member is dropped).

local CLOSED_TTL_MS = 86400000

local sub_key, bal_key, ses_key, open_key, cdr_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local session_id, msisdn, cause, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if not is_int(now) then
  return redis.error_reply('ERR close: now_ms must be an integer')
end

local ses = call('HMGET', ses_key, 'state', 'msisdn', 'cdr', 'hi')
if ses[1] ~= 'open' then
  call('ZREM', open_key, session_id) -- a leftover member, if any
  return 0
end
if ses[2] ~= msisdn then
  return 0
end

local w = wallet(bal_key)
local held = {}
for _, field in ipairs(call('HKEYS', ses_key)) do
  if string.sub(field, 1, 2) == 'r:' then
    held[#held + 1] = field
  end
end
if #held > 0 then
  for _, value in ipairs(call('HMGET', ses_key, unpack_(held))) do
    release(w, value)
  end
  call('HDEL', ses_key, unpack_(held))
end
wsave(w)

local rec = record_parts(ses[3], session_id, tonumber(ses[4]) or 0, now)
close_record(cdr_key, rec, cause, call('HGET', sub_key, 'currency') or 'EUR')
call('ZREM', open_key, session_id)
call('HSET', ses_key, 'state', 'closed', 'closed', int(now), 'last', int(now))
call('PEXPIRE', ses_key, CLOSED_TTL_MS)
return 1
