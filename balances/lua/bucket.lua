-- bucket.lua: operator changes to one balance hash (a subscriber's or a group's), each with its ledger entry.
--
-- KEYS[1] bal:{p}:<msisdn> or grp:{p}:<group>   KEYS[2] ledger:{p}   KEYS[3] bexp:{p}
-- KEYS[4] sub:{p}:<msisdn> for a subscriber's wallet (it must belong to an existing subscriber)
-- [last KEYS: ref:{p}:<kind>:<reference> when ARGV says idempotent: the stored answer of the operation]
-- ARGV[1] JSON {op, msisdn ('' for a group), group ('' for a subscriber), now_ms, idempotent, and per op:
--   settle:  expire and roll over the buckets whose validity ended (common.lua settle); keeps bexp:{p} right
--   credit:  bucket, amount >= 0, meta (the bucket's metadata; null keeps what it has), kind (the ledger type:
--            "credit", or e.g. "purchase", "renewal"), reference: adds to a valid bucket (or creates it),
--            after settling expired ones
--   adjust:  bucket, amount (signed, non-zero), reason, reference: an "adjustment" entry; the bucket must
--            exist (the money bucket always does)
--   limit:   bucket, member, limit (null: none): a member's limit on a shared bucket (no ledger entry)}
-- Returns JSON: {"applied": true|false, "balance": n, "entries": n} ({"applied": false, ...} = the reference
-- was used before: nothing changed, the stored answer), {"unknown": true} (no such subscriber) or
-- {"error": text} (nothing changed).

local wallet_key, ledger_key, bexp_key = KEYS[1], KEYS[2], KEYS[3]
local a = decode(ARGV[1])
local now = a.now_ms
if not is_int(now) or type(a.op) ~= 'string' then
  return redis.error_reply('ERR bucket: op and now_ms required')
end
local msisdn = present(a.msisdn) and a.msisdn or ''
local group = present(a.group) and a.group or ''
local sub_key = msisdn ~= '' and KEYS[4] or nil
local ref_key = a.idempotent == true and KEYS[#KEYS] or nil
local member = msisdn ~= '' and 'm:' .. msisdn or 'g:' .. group

if ref_key then
  local stored = call('GET', ref_key)
  if stored then
    return '{"applied":false,' .. string.sub(stored, 17)
  end
end
if sub_key and call('EXISTS', sub_key) == 0 then
  return '{"unknown":true}'
end

local function fail(text)
  return '{"error":' .. encode(text) .. '}'
end

local w = wallet(wallet_key)
local ctx = { ledger = ledger_key, bexp = bexp_key, now = now }
local entries = settle(w, ctx, msisdn, group, member)
local bucket = a.bucket
local op = a.op

if op == 'credit' or op == 'adjust' or op == 'limit' then
  if type(bucket) ~= 'string' or bucket == '' then
    return fail('bucket required')
  end
end
if op == 'credit' then
  local amount = a.amount
  if not is_int(amount) or amount < 0 then
    return fail('a credit is a non-negative integer')
  end
  local meta = present(a.meta) and a.meta or nil
  local old = w.m and w.m[bucket]
  if old and present(old.valid_until) and old.valid_until <= now then
    return fail('bucket ' .. bucket .. ' has expired and is still held by open sessions; use another id')
  end
  if meta then
    if old and present(old.rolled) then
      meta.rolled = old.rolled
    end
    wmeta(w, bucket, meta)
  elseif w.v[bucket] == nil and not old then
    return fail('a new bucket needs its metadata')
  end
  wadd(w, bucket, amount)
  w.dirty[bucket] = true -- a new bucket of 0 is written too
  if not w.v[bucket] then w.v[bucket] = 0 end
  if amount ~= 0 then
    local unit = w.m and w.m[bucket] and w.m[bucket].unit
    ledger_add(ledger_key, present(a.kind) and a.kind or 'credit', msisdn, group, bucket, amount,
      present(a.reference) and a.reference or '', now, nil, a.reason, unit)
    entries = entries + 1
  end
elseif op == 'adjust' then
  local amount = a.amount
  if not is_int(amount) or amount == 0 then
    return fail('an adjustment is a non-zero integer')
  end
  if w.v[bucket] == nil and bucket ~= 'money' then
    return fail('no bucket ' .. bucket)
  end
  wadd(w, bucket, amount)
  w.dirty[bucket] = true
  local unit = w.m and w.m[bucket] and w.m[bucket].unit
  ledger_add(ledger_key, 'adjustment', msisdn, group, bucket, amount, present(a.reference) and a.reference or '',
    now, nil, present(a.reason) and a.reason or '', unit)
  entries = entries + 1
elseif op == 'limit' then
  local meta = w.m and w.m[bucket]
  if not meta or group == '' then
    return fail('member limits apply to a group\'s shared buckets')
  end
  if type(a.member) ~= 'string' or (present(a.limit) and not (is_int(a.limit) and a.limit >= 0)) then
    return fail('member and a non-negative integer limit (or null) required')
  end
  meta = meta_edit(w, bucket)
  local limits = present(meta.member_limits) and meta.member_limits or {}
  if present(a.limit) then
    limits[a.member] = a.limit
  else
    limits[a.member] = nil
  end
  meta.member_limits = limits
elseif op ~= 'settle' then
  return redis.error_reply('ERR bucket: unknown op ' .. op)
end
wsave(w)
local first = next_expiry(w, now)
if first then
  call('ZADD', bexp_key, int(first), member)
else
  call('ZREM', bexp_key, member)
end
local out = '{"applied":true,"balance":' .. int(bucket and w.v[bucket] or 0) .. ',"entries":' .. int(entries) .. '}'
if ref_key and op ~= 'settle' then
  call('SET', ref_key, out)
end
return out
