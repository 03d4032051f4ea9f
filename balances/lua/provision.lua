-- provision.lua: create (or replace) one subscriber and its balances, atomically, with a ledger entry.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] ledger:{p}   KEYS[4] bexp:{p}
-- [KEYS[5] gmem:{p}:<group>: the members of the subscriber's group (the partition is the group's)]
-- ARGV[1] JSON {msisdn, imsi?, plan, status, currency, kind, credit_limit, group?, money,
--               allowances {bucket: units}, buckets [{id, amount, meta}], replace, now_ms}
-- Returns {code, old_imsi}: code 1 created, 2 replaced, 0 already exists (nothing changed).
-- The index keys (idx:msisdn, idx:imsi) live outside the partition; the caller sets them in the same
-- pipeline. Replacing rewrites the subscriber hash and sets the listed bucket balances (and the metadata of
-- the listed `buckets`); other buckets and the reservations of open sessions (the ':r' fields) are kept.
-- `allowances` are the spine's buckets (no metadata: the schedules name them); `buckets` carry metadata
-- (see the bucket layout in common.lua). A postpaid account (kind "postpaid") gets credit_limit in the
-- metadata of its money bucket. One ledger entry, type "provision", records what each bucket gained or lost
-- (b: {bucket: change}; amount: the money change).

local sub_key, bal_key, ledger_key, bexp_key, gmem_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local p = decode(ARGV[1])
if type(p.msisdn) ~= 'string' or type(p.plan) ~= 'string' or not is_int(p.money) or not is_int(p.now_ms) then
  return redis.error_reply('ERR provision: msisdn, plan, integer money and now_ms required')
end
local allowances = present(p.allowances) and p.allowances or {}
for bucket, units in pairs(allowances) do
  if type(bucket) ~= 'string' or not is_int(units) then
    return redis.error_reply('ERR provision: allowances must map bucket ids to integers')
  end
end
local buckets = present(p.buckets) and p.buckets or {}
for _, b in ipairs(buckets) do
  if type(b.id) ~= 'string' or not is_int(b.amount) or type(b.meta) ~= 'table' then
    return redis.error_reply('ERR provision: buckets need an id, an integer amount and metadata')
  end
end
local group = present(p.group) and p.group or ''
if group ~= '' and not gmem_key then
  return redis.error_reply('ERR provision: a group member needs the group key')
end
local limit = present(p.credit_limit) and p.credit_limit or 0
if not is_int(limit) or limit < 0 then
  return redis.error_reply('ERR provision: credit_limit must be a non-negative integer')
end

local exists = call('EXISTS', sub_key) == 1
local old_imsi = call('HGET', sub_key, 'imsi') or ''
if exists and not p.replace then
  return { 0, old_imsi }
end
call('DEL', sub_key)
call('HSET', sub_key, 'msisdn', p.msisdn, 'plan', p.plan, 'status', p.status or 'active',
  'currency', p.currency or 'EUR', 'kind', p.kind or 'prepaid')
if present(p.imsi) and p.imsi ~= '' then
  call('HSET', sub_key, 'imsi', p.imsi)
end
if group ~= '' then
  call('HSET', sub_key, 'group', group)
  call('SADD', gmem_key, p.msisdn)
end

local w = wallet(bal_key)
local changes = {} -- ordered {bucket, change}
local function set_balance(bucket, value)
  local change = value - (w.v[bucket] or 0)
  if change ~= 0 then
    changes[#changes + 1] = { bucket, change }
  end
  w.v[bucket] = value
  w.dirty[bucket] = true
end
set_balance('money', p.money)
local sorted = {}
for bucket in pairs(allowances) do
  sorted[#sorted + 1] = bucket
end
table.sort(sorted)
for _, bucket in ipairs(sorted) do
  set_balance(bucket, allowances[bucket])
end
local first_expiry = nil
local units = {} -- {bucket, unit} of the buckets with metadata, for the ledger
for _, b in ipairs(buckets) do
  set_balance(b.id, b.amount)
  units[#units + 1] = encode(b.id) .. ':' .. encode(b.meta.unit)
  wmeta(w, b.id, b.meta)
  local till = b.meta.valid_until
  if present(till) and (not first_expiry or till < first_expiry) then
    first_expiry = till
  end
end
-- postpaid: the money bucket may be drawn down to -credit_limit
local money_meta = w.m and w.m['money']
if p.kind == 'postpaid' then
  money_meta = meta_edit(w, 'money')
  money_meta.unit = 'money'
  money_meta.credit_limit = limit
elseif money_meta and present(money_meta.credit_limit) then
  meta_edit(w, 'money').credit_limit = nil
end
wsave(w)
if first_expiry then
  call('ZADD', bexp_key, 'LT', int(first_expiry), 'm:' .. p.msisdn)
end
if #changes > 0 then
  local money_change = 0
  for _, kv in ipairs(changes) do
    if kv[1] == 'money' then money_change = kv[2] end
  end
  local args = { 'type', 'provision', 'msisdn', p.msisdn, 'amount', int(money_change), 'reference', '',
    'time', int(p.now_ms), 'b', buckets_json(changes) }
  if #units > 0 then
    args[#args + 1] = 'u'
    args[#args + 1] = '{' .. concat(units, ',') .. '}'
  end
  call('XADD', ledger_key, '*', unpack_(args))
end
if exists then
  return { 2, old_imsi }
end
return { 1, old_imsi }
