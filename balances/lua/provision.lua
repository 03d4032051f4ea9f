-- provision.lua: create (or replace) one subscriber and its balances, atomically.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>
-- ARGV[1] JSON {msisdn, imsi?, plan, status, currency, money, allowances {bucket: units}, replace}
-- Returns {code, old_imsi}: code 1 created, 2 replaced, 0 already exists (nothing changed).
-- The index keys (idx:msisdn, idx:imsi) live outside the partition; the caller sets them in the same
-- pipeline. Replacing rewrites the subscriber hash and sets the listed bucket balances; reservations held
-- by open sessions (the ':r' fields) are kept.

local sub_key, bal_key = KEYS[1], KEYS[2]
local p = decode(ARGV[1])
if type(p.msisdn) ~= 'string' or type(p.plan) ~= 'string' or not is_int(p.money) then
  return redis.error_reply('ERR provision: msisdn, plan and integer money required')
end
local allowances = present(p.allowances) and p.allowances or {}
for bucket, units in pairs(allowances) do
  if type(bucket) ~= 'string' or not is_int(units) then
    return redis.error_reply('ERR provision: allowances must map bucket ids to integers')
  end
end

local exists = call('EXISTS', sub_key) == 1
local old_imsi = call('HGET', sub_key, 'imsi') or ''
if exists and not p.replace then
  return { 0, old_imsi }
end
call('DEL', sub_key)
call('HSET', sub_key, 'msisdn', p.msisdn, 'plan', p.plan, 'status', p.status or 'active',
  'currency', p.currency or 'EUR')
if present(p.imsi) and p.imsi ~= '' then
  call('HSET', sub_key, 'imsi', p.imsi)
end
call('HSET', bal_key, 'money', int(p.money))
for bucket, units in pairs(allowances) do
  call('HSET', bal_key, bucket, int(units))
end
if exists then
  return { 2, old_imsi }
end
return { 1, old_imsi }
