-- topup.lua: credit money to a subscriber, idempotent by reference.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] ledger:{p}   [KEYS[4] tup:{p}:<reference>]
-- ARGV[1] msisdn   ARGV[2] amount (micro-units, > 0)   ARGV[3] reference ('' = none)   ARGV[4] now_ms
-- Returns JSON {"applied", "balance", "reference"} or {"unknown": true} when the subscriber does not exist.
-- With a reference, a second top-up with the same reference changes nothing and answers applied=false with
-- the current balance. Without one it always applies.

local sub_key, bal_key, ledger_key, tup_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local msisdn, amount, reference, now = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if not (is_int(amount) and amount > 0) or not is_int(now) then
  return redis.error_reply('ERR topup: amount must be a positive integer, now_ms an integer')
end
local ref_json = 'null'
if reference ~= '' then
  ref_json = jval(reference)
end

if tup_key then
  if call('EXISTS', tup_key) == 1 then
    local balance = tonumber(call('HGET', bal_key, 'money')) or 0
    return '{"applied":false,"balance":' .. int(balance) .. ',"reference":' .. ref_json .. '}'
  end
end
if call('EXISTS', sub_key) == 0 then
  return '{"unknown":true}'
end

local balance = call('HINCRBY', bal_key, 'money', ARGV[2])
call('XADD', ledger_key, '*', 'type', 'topup', 'msisdn', msisdn, 'amount', ARGV[2],
  'reference', reference, 'time', int(now))
local out = '{"applied":true,"balance":' .. int(balance) .. ',"reference":' .. ref_json .. '}'
if tup_key then
  call('SET', tup_key, out)
end
return out
