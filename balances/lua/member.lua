-- member.lua: a subscriber's status, account kind and group membership.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>
-- [KEYS[3] grp:{p}:<group>   KEYS[4] gmem:{p}:<group>: join and leave]
-- ARGV[1] JSON {op, and per op:
--   status:  status: active | barred | suspended | terminated (the charge and event functions enforce it)
--   account: kind: prepaid | postpaid, credit_limit (micro-units >= 0; postpaid: the money bucket may be
--            drawn down to -credit_limit, and grants are limited by credit_limit + balance)
--   join:    group: the subscriber must be in no group (the caller checked the partition is the group's)
--   leave:   group: refused while the subscriber's sessions hold units of the group's shared buckets}
-- Returns JSON {"old": previous value} or {"unknown": true} or {"error": text}; nothing changes on an error.
-- None of these is a balance change: no ledger entry.

local sub_key, bal_key, grp_key, gmem_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local a = decode(ARGV[1])
local STATUSES = { active = true, barred = true, suspended = true, terminated = true }

local function fail(text)
  return '{"error":' .. encode(text) .. '}'
end

local sub = call('HMGET', sub_key, 'msisdn', 'status', 'kind', 'group')
if not sub[1] then
  return '{"unknown":true}'
end
local group = sub[4] or ''

if a.op == 'status' then
  if not STATUSES[a.status] then
    return fail('status must be active, barred, suspended or terminated')
  end
  call('HSET', sub_key, 'status', a.status)
  return '{"old":' .. encode(sub[2] or '') .. '}'
elseif a.op == 'account' then
  local limit = present(a.credit_limit) and a.credit_limit or 0
  if (a.kind ~= 'prepaid' and a.kind ~= 'postpaid') or not is_int(limit) or limit < 0 then
    return fail('kind must be prepaid or postpaid, credit_limit a non-negative integer')
  end
  if a.kind == 'prepaid' and limit ~= 0 then
    return fail('a prepaid account has no credit limit')
  end
  local raw = call('HGET', bal_key, 'money:m')
  local meta = raw and decode(raw) or nil
  if a.kind == 'postpaid' then
    meta = meta or { unit = 'money' }
    meta.credit_limit = limit
  elseif meta then
    meta.credit_limit = nil
  end
  if meta then
    call('HSET', bal_key, 'money:m', jval(meta))
  end
  call('HSET', sub_key, 'kind', a.kind)
  return '{"old":' .. encode(sub[3] or 'prepaid') .. '}'
elseif a.op == 'join' then
  if type(a.group) ~= 'string' or a.group == '' or not gmem_key then
    return redis.error_reply('ERR member: join needs the group and its keys')
  end
  if group == a.group then
    return '{"old":' .. encode(group) .. '}'
  end
  if group ~= '' then
    return fail('the subscriber is in group ' .. group .. '; it must leave it first')
  end
  call('HSET', sub_key, 'group', a.group)
  call('SADD', gmem_key, sub[1])
  return '{"old":""}'
elseif a.op == 'leave' then
  if type(a.group) ~= 'string' or not grp_key or not gmem_key then
    return redis.error_reply('ERR member: leave needs the group and its keys')
  end
  if group ~= a.group then
    return fail('the subscriber is not in group ' .. a.group)
  end
  local suffix = ':h:' .. sub[1]
  local flat = call('HGETALL', grp_key)
  for i = 1, #flat, 2 do
    local field = flat[i]
    if string.sub(field, -#suffix) == suffix and tonumber(flat[i + 1]) ~= 0 then
      return fail('the subscriber\'s sessions hold units of the group\'s buckets; close them first')
    end
  end
  call('HDEL', sub_key, 'group')
  call('SREM', gmem_key, sub[1])
  return '{"old":' .. encode(group) .. '}'
end
return redis.error_reply('ERR member: unknown op ' .. tostring(a.op))
