-- event.lua: one EVENT request (CC-Request-Type 4), atomically, by Requested-Action.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] evt:{p}:<session-id>:<request-number>
-- KEYS[4] cdr:{p}            KEYS[5] ledger:{p}         KEYS[6] bexp:{p}
-- KEYS[7] use:{p}:<msisdn>   [KEYS[8] grp:{p}:<group>, when the request names the subscriber's group]
-- ARGV[1] the ChargeRequest as JSON (request_type 4, requested_action set); schedules may be named by id alone
-- Returns a ChargeOutcome as JSON, or {"result_code":0,"need_schedules":true} like charge.lua.
--
-- Units of an MSCC: its requested units in the schedule's unit, else its used units, else the schedule's
-- default quota (no max_quota cap: an event is priced as asked).
--  DIRECT_DEBITING (0): allowances first, then money (the buckets that serve the rating group, as in
--                       charge.lua); all or nothing per MSCC: 4012 and no debit when the rest does not fit
--                       in the available money. One "event" CDR record per debit, and one ledger "usage" entry
--                       for the request (as in charge.lua).
--  REFUND_ACCOUNT (1):  credits the full money price of the units to the schedule's money bucket; ledger
--                       "refund" entry and a "refund" CDR record with the negative amount (MsccOutcome.amount
--                       is negative too), both with the same record id.
--  CHECK_BALANCE (2):   check_balance_result 0 when each MSCC, on its own, could be debited, else 1.
--                       Writes nothing (beyond settling ended buckets, as every action does).
--  PRICE_ENQUIRY (3):   MsccOutcome.cost = the money price of the units (allowances ignored). Writes nothing.
-- Extended pricing (ratecards/pricing.py) applies to the money part: an event is a report of its own (scope
-- "session" counts the one event), day/week/month scopes and caps count in use:{p}:<msisdn> with the period
-- keys of MsccCharge.periods, advanced by DIRECT_DEBITING (PRICE_ENQUIRY prices with them, changes nothing;
-- REFUND_ACCOUNT credits C(units) of the event alone). A schedule with requires_bucket debits only from
-- allowances: 5030 when none serves the rating group, 4012 when they do not cover the units.
-- A rating group outside credit control (schedule credit_control = false) is answered 4011 for every action;
-- a DIRECT_DEBITING of it is recorded as an "event" CDR record at amount 0. A barred rating group (schedule
-- barred) is answered 4010 for DIRECT_DEBITING.
-- Every processed answer (all four actions) is stored under evt:... for TTL_MS for duplicates; answers
-- that change nothing (5030, 4010, stale plan) are not. A barred or suspended subscriber gets 4010 for
-- DIRECT_DEBITING, a terminated one 5030 for every action. Expired buckets are settled first.
-- CDR records carry "bucketUnits", the request's rating keys and "ratedAt" = now_ms (as charge.lua's).

local TTL_MS = 300000

local sub_key, bal_key, evt_key, cdr_key, ledger_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local bexp_key, use_key, grp_key = KEYS[6], KEYS[7], KEYS[8]
local req = decode(ARGV[1])

if req.request_type ~= 4 then
  return redis.error_reply('ERR event: request_type must be 4')
end
local action = req.requested_action
if action ~= 0 and action ~= 1 and action ~= 2 and action ~= 3 then
  return redis.error_reply('ERR event: requested_action must be 0..3')
end
if not resolve_schedules(req, nil) then
  return NEED_SCHEDULES -- a schedule named by id alone that is not kept here: sent again in full
end
local err = check_request(req)
if err then
  return redis.error_reply('ERR event: invalid ' .. err)
end
local e2e, now = req.end_to_end, req.now_ms

local stored = call('GET', evt_key)
if stored then
  return as_duplicate(stored)
end

local sub = call('HMGET', sub_key, 'msisdn', 'plan', 'status', 'imsi', 'currency', 'group')
if not sub[1] or sub[3] == 'terminated' then
  return outcome_json(5030, nil, e2e)
end
local group = sub[6] or ''
if sub[2] ~= req.plan or group ~= (present(req.group) and req.group or '') or (group ~= '' and not grp_key) then
  return outcome_json(5012, nil, e2e, { stale_plan = sub[2] or '', stale_group = group })
end
if action == 0 and sub[3] ~= 'active' then
  return outcome_json(4010, nil, e2e)
end

local rec = record_parts(cdr_static(sub[4], req.origin_host, req.context), req.msisdn, req.session_id, now,
  req.request_number, now)
local keys = rating_keys_json(req.rating_keys.destination, req.rating_keys.plmn) -- the records' rating keys

local function usage_of(unit, units)
  if unit == 'bytes' then
    return { total = units }
  elseif unit == 'seconds' then
    return { time = units }
  end
  return { units = units }
end

local p = purse(wallet(bal_key), group ~= '' and wallet(grp_key) or nil, req.msisdn, group)
local ctx = { ledger = ledger_key, bexp = bexp_key, now = now }
if p.own.m or p.grp then
  settle_purse(p, ctx)
end
local cs = counters(use_key)
local outcomes = {}
local enough = true
local debits = {} -- {rating group, money amount, {ref, amount} list} for the ledger
for i, m in ipairs(req.msccs) do
  local s = m.schedule
  local o = { rating_group = m.rating_group, service_id = m.service_id, result_code = 2001, amount = 0 }
  local units = units_in(s.unit, m.requested_units)
  if not units or units == 0 then
    units = units_in(s.unit, m.used)
  end
  if not units or units == 0 then
    units = s.default_quota
  end
  local v = view_of(s, m.periods, m.rating_group, cs, { c = 0 })
  if not s.credit_control then
    o.result_code = 4011
    if action == 0 then
      rated_record(cdr_key, 'event', rec, p, m, s, usage_of(s.unit, units), 0, {}, now, keys)
    end
  elseif action == 0 and s.barred then
    o.result_code = 4010
  elseif action == 0 then
    local src = sources(p, s, m.rating_group, now, nil)
    local taken, amount, fits, priced = plan_debit(p, v, src, units, s.requires_bucket)
    if s.requires_bucket and not has_allowance(p, src) then
      o.result_code = 5030
      o.final_unit_action = s.final_unit_action
    elseif fits then
      for _, kv in ipairs(taken) do
        debit(p, kv[1], kv[2])
      end
      view_advance(v, priced, amount)
      if v.ff then
        count(cs, v.ff, units)
      end
      o.amount = amount
      o.granted = units_json(s.unit, units)
      rated_record(cdr_key, 'event', rec, p, m, s, usage_of(s.unit, units), amount, taken, now, keys)
      if #taken > 0 then
        debits[#debits + 1] = { m.rating_group, amount, taken }
      end
    else
      o.result_code = 4012
    end
  elseif action == 1 then
    local amount = s.ext and charge_for_usage(s, units, 0, 0) or price_units(s, units)
    if amount > 0 then
      wadd(p.own, s.money_bucket, amount)
      ledger_add(ledger_key, 'refund', req.msisdn, nil, s.money_bucket, amount,
        req.session_id .. ';' .. int(req.request_number) .. ';' .. int(m.rating_group), now)
    end
    o.amount = -amount
    rated_record(cdr_key, 'refund', rec, p, m, s, usage_of(s.unit, units), -amount,
      { { s.money_bucket, -amount } }, now, keys)
  elseif action == 2 then
    local src = sources(p, s, m.rating_group, now, nil)
    local _, _, fits = plan_debit(p, v, src, units, s.requires_bucket)
    if not fits or (s.requires_bucket and not has_allowance(p, src)) then
      enough = false
    end
  else
    o.cost = view_charge(v, units)
  end
  outcomes[i] = o
end

local extra = nil
if action == 2 then
  extra = { check_balance_result = enough and 0 or 1 }
end
if #debits > 0 then
  usage_entry(ledger_key, req.msisdn, group, req.session_id .. ';' .. int(req.request_number), debits, now)
end
wsave(p.own)
wsave(p.grp)
counters_save(cs)
local out = outcome_json(2001, outcomes, e2e, extra)
call('SET', evt_key, out, 'PX', TTL_MS)
return out
