-- catalog.lua: the product catalog's money movements on one subscriber (ocs/catalog.py decides what, this
-- applies it atomically): buying an add-on, starting / renewing / changing a plan's period, promotion bonuses.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] ledger:{p}   KEYS[4] bexp:{p}   KEYS[5] renew:{p}
-- KEYS[6] cdr:{p}   [KEYS[7] ref:{p}:<op>:<reference>: the stored answer of a purchase or bonus with that reference]
-- ARGV[1] JSON {op, msisdn, now_ms, and per op:
--   purchase: name (the add-on), price (micro-units >= 0), plans (products it may be bought on; [] = any),
--             repeatable, buckets [{id, amount, meta}], bonuses, reference
--   period:   mode "start" (first period of a new product), "renew" (the next period: the record's
--             period_end must be `expect_end`, else nothing happens) or "change" (another product from now:
--             the buckets the old product's periods granted end now), product, rating_plan, start, end, fee
--             (micro-units >= 0), buckets [{id, amount, meta}], bonuses, suspend_unpaid (renew: a prepaid
--             subscriber who cannot pay is suspended until a later renewal can)
--   bonus:    bonuses, reference}
-- A bonus is {name, once, buckets [{id, amount, meta}]}: `once` bonuses are granted once per subscriber
-- (sub field 'promo:<name>' counts the grants).
-- Bucket ids are the catalog's; an id already in the wallet gets a suffix '.2', '.3', ... so every purchase
-- and period has its own bucket with its own validity (and a period's expiry/rollover never meets the next's).
-- The fee and the price come out of the 'money' bucket: balance - reserved (+ credit_limit) must cover them.
-- One ledger entry per call and kind ("purchase", "renewal", "promotion"), b = every bucket's change.
-- A purchase or period that writes its ledger entry also writes a fee record (recordType "fee") to cdr:{p},
-- in the same call: billing invoices it (postpaid) or shows it as paid (prepaid); the ledger entry names it
-- (field `cdr` = its recordId) so `ocs audit` matches the two. See fee_record below and docs/catalog.md.
-- Returns JSON {"applied": bool, "status": text, "buckets": [ids], "bonuses": [names], "balance": money,
-- "old_plan": text} or {"unknown": true} or {"error": text, "code": text}; an error changes nothing.
-- "applied": false with "status" "not-due" (renew: already renewed) or "unpaid" (renew: suspended or still
-- waiting for money); "duplicate": true with the stored answer when the reference was used before.

local sub_key, bal_key, ledger_key, bexp_key, renew_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local cdr_key, ref_key = KEYS[6], KEYS[7]
local a = decode(ARGV[1])
local now = a.now_ms
if not is_int(now) or type(a.op) ~= 'string' or type(a.msisdn) ~= 'string' then
  return redis.error_reply('ERR catalog: op, msisdn and now_ms required')
end
local msisdn = a.msisdn
local member = 'm:' .. msisdn

local function fail(code, text)
  return '{"error":' .. encode(text) .. ',"code":' .. encode(code) .. '}'
end

local function check_buckets(list)
  if not present(list) then return {} end
  for _, b in ipairs(list) do
    if type(b.id) ~= 'string' or not is_int(b.amount) or b.amount < 0 or type(b.meta) ~= 'table' then
      return nil
    end
  end
  return list
end

if ref_key then
  local stored = call('GET', ref_key)
  if stored then
    return '{"duplicate":true,' .. string.sub(stored, string.find(stored, ',', 1, true) + 1)
  end
end
local sub = call('HMGET', sub_key, 'msisdn', 'plan', 'status', 'kind', 'product', 'period_end', 'suspended_for',
  'imsi', 'currency')
if not sub[1] then
  return '{"unknown":true}'
end
local status, product = sub[3] or 'active', sub[5] or ''

local buckets = check_buckets(a.buckets)
local bonuses = present(a.bonuses) and a.bonuses or {}
if not buckets then
  return redis.error_reply('ERR catalog: buckets need an id, a non-negative integer amount and metadata')
end
for _, bonus in ipairs(bonuses) do
  if type(bonus.name) ~= 'string' or not check_buckets(bonus.buckets) then
    return redis.error_reply('ERR catalog: a bonus needs a name and valid buckets')
  end
end

local w = wallet(bal_key)
local ctx = { ledger = ledger_key, bexp = bexp_key, now = now }
local changes = {} -- ordered {bucket, change} of this call's main entry
local units = {}
local created = {}

local function fresh_id(base)
  local id, n = base, 1
  while w.v[id] ~= nil or (w.m and w.m[id]) do
    n = n + 1
    id = base .. '.' .. int(n)
  end
  return id
end

local function grant(list, into, unit_list, names)
  for _, b in ipairs(list) do
    local id = fresh_id(b.id)
    wmeta(w, id, b.meta)
    w.v[id] = b.amount
    w.dirty[id] = true
    into[#into + 1] = { id, b.amount }
    unit_list[#unit_list + 1] = encode(id) .. ':' .. encode(b.meta.unit)
    names[#names + 1] = id
  end
end

local function money_available()
  local v = w.v
  local left = (v['money'] or 0) - (v['money:r'] or 0)
  local meta = w.m and w.m['money']
  if meta and present(meta.credit_limit) then
    left = left + meta.credit_limit
  end
  return left
end

-- `record_id`: the fee record that stands behind the entry (ledger field `cdr`), nil for none
local function write_entry(kind, list, unit_list, reference, record_id)
  if #list == 0 then return end
  local money = 0
  for _, kv in ipairs(list) do
    if kv[1] == 'money' then money = kv[2] end
  end
  local args = { 'type', kind, 'msisdn', msisdn, 'amount', int(money), 'reference', reference, 'time', int(now),
    'b', buckets_json(list) }
  if #unit_list > 0 then
    args[#args + 1] = 'u'
    args[#args + 1] = '{' .. concat(unit_list, ',') .. '}'
  end
  if record_id then
    args[#args + 1] = 'cdr'
    args[#args + 1] = record_id
  end
  call('XADD', ledger_key, '*', unpack_(args))
end

-- The fee record of a purchase or a plan period: what the money bucket paid ("bucket", as a usage record's:
-- taken amounts, with "bucketUnits") and what the call granted ("granted", "grantedUnits"), the catalog item
-- and the ledger entry's type and reference. recordId 'fee;<msisdn>;<now_ms>;<n>' (n counts the subscriber's
-- fee records: unique even for two calls in one millisecond). Written only with its ledger entry (a call
-- that changes no bucket writes neither). fields: JSON members after "item" (',"periodStart":...').
local function fee_record(fee_type, item, price, grants, grant_units, ledger_type, reference, fields)
  local record_id = 'fee;' .. msisdn .. ';' .. int(now) .. ';' .. int(call('HINCRBY', sub_key, 'fee_records', 1))
  local taken = {}
  if price > 0 then taken[1] = { 'money', price } end
  local imsi = sub[8]
  call('XADD', cdr_key, '*', 'r', '{"recordId":' .. encode(record_id) .. ',"recordType":"fee","schemaVersion":1'
    .. ',"servedMSISDN":' .. encode(msisdn) .. ((imsi and imsi ~= '') and ',"servedIMSI":' .. encode(imsi) or '')
    .. ',"recordTime":' .. int(now) .. ',"feeType":' .. encode(fee_type) .. ',"item":' .. encode(item) .. fields
    .. ',"amount":' .. int(price) .. ',"currency":' .. encode(sub[9] or 'EUR') .. ',"bucket":' .. buckets_json(taken)
    .. bucket_units_json({ own = w }, { allowances = {} }, taken) .. ',"granted":' .. buckets_json(grants)
    .. ',"grantedUnits":{' .. concat(grant_units, ',') .. '},"ledgerType":' .. encode(ledger_type)
    .. ',"ledgerReference":' .. encode(reference) .. '}')
  return record_id
end

-- the bonuses still due (a `once` bonus the subscriber had is skipped); granted after the main change
local granted_bonuses = {}
local function grant_bonuses(reference)
  for _, bonus in ipairs(bonuses) do
    local field = 'promo:' .. bonus.name
    local had = tonumber(call('HGET', sub_key, field) or '0')
    if not (bonus.once == true and had > 0) then
      local list, unit_list, names = {}, {}, {}
      grant(bonus.buckets, list, unit_list, names)
      write_entry('promotion', list, unit_list, bonus.name .. ';' .. reference)
      call('HINCRBY', sub_key, field, 1)
      granted_bonuses[#granted_bonuses + 1] = bonus.name
    end
  end
end

local function strings_json(list)
  local p = {}
  for i, s in ipairs(list) do p[i] = encode(s) end
  return '[' .. concat(p, ',') .. ']'
end

local function answer(applied, state, extra)
  local first = next_expiry(w, now)
  if first then
    call('ZADD', bexp_key, int(first), member)
  end
  return '{"applied":' .. (applied and 'true' or 'false') .. ',"status":' .. encode(state)
    .. ',"buckets":' .. strings_json(created) .. ',"bonuses":' .. strings_json(granted_bonuses)
    .. ',"balance":' .. int(w.v['money'] or 0) .. (extra or '') .. '}'
end

if a.op == 'purchase' then
  local price = a.price
  if not is_int(price) or price < 0 or type(a.name) ~= 'string' or type(a.reference) ~= 'string' then
    return redis.error_reply('ERR catalog: purchase needs name, reference and an integer price')
  end
  if status == 'terminated' then
    return fail('status', 'subscriber ' .. msisdn .. ' is terminated')
  end
  local plans = present(a.plans) and a.plans or {}
  if #plans > 0 then
    local ok = false
    for _, name in ipairs(plans) do
      if name == product then ok = true end
    end
    if not ok then
      return fail('eligible', 'add-on ' .. a.name .. ' is not offered on ' ..
        (product ~= '' and 'plan ' .. product or 'a subscriber without a catalog plan'))
    end
  end
  local field = 'addon:' .. a.name
  if a.repeatable ~= true and tonumber(call('HGET', sub_key, field) or '0') > 0 then
    return fail('repeat', 'add-on ' .. a.name .. ' can be bought once and ' .. msisdn .. ' has it')
  end
  if price > money_available() then -- the money bucket never expires: settling first changes nothing here
    return fail('funds', 'the balance does not cover the price of ' .. a.name)
  end
  settle(w, ctx, msisdn, nil, member)
  if price > 0 then
    wadd(w, 'money', -price)
    changes[1] = { 'money', -price }
  end
  grant(buckets, changes, units, created)
  wsave(w)
  local reference = a.name .. ';' .. a.reference
  if #changes > 0 then
    local grants = {}
    for i = (price > 0 and 2 or 1), #changes do grants[#grants + 1] = changes[i] end
    write_entry('purchase', changes, units, reference, fee_record('addon', a.name, price, grants, units, 'purchase',
      reference, ',"purchaseReference":' .. encode(a.reference)))
  end
  call('HINCRBY', sub_key, field, 1)
  grant_bonuses(a.reference)
  wsave(w)
  local out = answer(true, 'bought')
  if ref_key then call('SET', ref_key, out) end
  return out
elseif a.op == 'bonus' then
  if type(a.reference) ~= 'string' then
    return redis.error_reply('ERR catalog: bonus needs a reference')
  end
  settle(w, ctx, msisdn, nil, member)
  grant_bonuses(a.reference)
  wsave(w)
  local out = answer(#granted_bonuses > 0, 'granted')
  if ref_key then call('SET', ref_key, out) end
  return out
elseif a.op ~= 'period' then
  return redis.error_reply('ERR catalog: unknown op ' .. a.op)
end

-- ---- period: start, renew, change ----------------------------------------------------------------------
local mode, fee, start, finish = a.mode, a.fee, a.start, a.finish
if not is_int(fee) or fee < 0 or not is_int(start) or not is_int(finish) or finish <= start
  or type(a.product) ~= 'string' or type(a.rating_plan) ~= 'string' then
  return redis.error_reply('ERR catalog: period needs product, rating_plan, integer fee, start < finish')
end
if status == 'terminated' then
  call('ZREM', renew_key, msisdn)
  return fail('status', 'subscriber ' .. msisdn .. ' is terminated')
end
local old_plan = sub[2] or ''
local renewal_ref = a.product .. ';' .. int(start)
if mode == 'renew' then
  if not is_int(a.expect_end) then
    return redis.error_reply('ERR catalog: renew needs expect_end')
  end
  if product ~= a.product or tostring(sub[6] or '') ~= int(a.expect_end) then
    return answer(false, 'not-due')
  end
elseif mode ~= 'start' and mode ~= 'change' then
  return redis.error_reply('ERR catalog: unknown period mode ' .. tostring(mode))
end
local prepaid = (sub[4] or 'prepaid') ~= 'postpaid'
if prepaid and fee > money_available() then
  if mode ~= 'renew' then
    return fail('funds', 'the balance does not cover the fee of plan ' .. a.product)
  end
  if a.suspend_unpaid == true and status == 'active' then
    call('HSET', sub_key, 'status', 'suspended', 'suspended_for', 'renewal')
  end
  return answer(false, 'unpaid')
end
settle(w, ctx, msisdn, nil, member)
if mode == 'change' and w.m then
  -- the old product's period allowances end now (units carried over by rollover are kept); a bucket still held
  -- by a session keeps the held part until it is released
  for id, meta in pairs(w.m) do
    if present(meta.source) and meta.source == 'plan' and (not present(meta.valid_until) or meta.valid_until > now) then
      local edited = meta_edit(w, id)
      edited.valid_until = now
      edited.rollover = nil
    end
  end
  settle(w, ctx, msisdn, nil, member)
end
if fee > 0 then
  wadd(w, 'money', -fee)
  changes[1] = { 'money', -fee }
end
grant(buckets, changes, units, created)
wsave(w)
if #changes > 0 then
  local grants = {}
  for i = (fee > 0 and 2 or 1), #changes do grants[#grants + 1] = changes[i] end
  write_entry('renewal', changes, units, renewal_ref, fee_record('plan', a.product, fee, grants, units, 'renewal',
    renewal_ref, ',"ratingPlan":' .. encode(a.rating_plan) .. ',"periodMode":' .. encode(mode) .. ',"periodStart":'
    .. int(start) .. ',"periodEnd":' .. int(finish)))
end
call('HSET', sub_key, 'plan', a.rating_plan, 'product', a.product, 'period_start', int(start),
  'period_end', int(finish))
if present(a.anchor) then
  call('HSET', sub_key, 'anchor', int(a.anchor))
end
if sub[7] == 'renewal' then
  call('HDEL', sub_key, 'suspended_for')
  if status == 'suspended' then
    call('HSET', sub_key, 'status', 'active')
    status = 'active'
  end
end
call('ZADD', renew_key, int(finish), msisdn)
grant_bonuses(renewal_ref)
wsave(w)
return answer(true, mode, ',"old_plan":' .. encode(old_plan) .. ',"subscriber_status":' .. encode(status))
