-- charge.lua: one session CCR (INITIAL 1 / UPDATE 2 / TERMINATION 3), atomically.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] ses:{p}:<session-id>
-- KEYS[4] open:{p}           KEYS[5] cdr:{p}            KEYS[6] ledger:{p}
-- KEYS[7] bexp:{p}           [KEYS[8] grp:{p}:<group>, when the request names the subscriber's group]
-- ARGV[1] the ChargeRequest as JSON
-- Returns a ChargeOutcome as JSON.
--
-- Order: duplicate check -> subscriber checks -> session checks -> for each MSCC (release the rating
-- group's reservation, commit the used units, reserve the new grant) -> TERMINATION closes the session ->
-- store the outcome under a:<request-number> -> last activity. Reads happen up front (one HMGET of the
-- session, one HGETALL of the balances, and of the group's shared buckets for a member) and writes once at
-- the end, apart from the CDR and ledger XADDs. The CDR members that never change in a session are rendered
-- at CCR-I and kept in the session as 'cdr'.
--
-- Buckets (common.lua): each rating group draws from the buckets that serve it, allowances before money, in
-- priority then expiry order; ended buckets are settled (expired, or rolled over) before the MSCCs, and
-- again after them when a released reservation had held one (or the session closes). The usage records of the request that took something from a bucket get one ledger "usage" entry
-- (reference = '<session-id>;<request-number>', r = what each record, by rating group, took from each
-- bucket) in this same call.
--
-- Choices:
--  * Answers that change nothing (5030, 4010 on CCR-I, 5002, 5012, stale plan) are not stored: a
--    retransmission recomputes the same answer because nothing changed.
--  * CCR-I for a session id that already exists (open or closed) and has no stored answer for this request
--    number is answered 5012 UNABLE_TO_COMPLY and changes nothing: never a second reservation for a session.
--  * The last WINDOW answers are kept; a request numbered at or below (highest - WINDOW) that has no stored
--    answer cannot be told apart from an old duplicate and is answered 5012 without changes.
--  * Subscriber status: "active" charges; "barred" and "suspended" (and any status this code does not know)
--    get CCR-I 4010 at command level, and CCR-U commits the used units and answers 4010 in each MSCC that
--    asks for units; "terminated" gets CCR-I 5030 (like an unknown subscriber), and CCR-U commits the used
--    units, answers 5030 at command level and closes the session. CCR-T is always processed (usage happened).
--  * The caller names the subscriber's group (req.group, from the index); a different one on record is
--    answered like a stale plan (stale_plan + stale_group, 5012) so the caller refreshes and retries.
--  * An RSU with no value in the schedule's unit, or a zero value, means the default quota.
--  * Quota control per rating group (the schedule): credit_control = false answers 4011 with no quota and
--    records reported usage at amount 0; barred answers 4010 to a request for units (usage still charged).
--  * Final units: a grant smaller than asked carries final_unit_action. Under TERMINATE a later request
--    for units gets 4012. Under REDIRECT / RESTRICT_ACCESS (RFC 4006 §5.6.2-3) the reservation remembers
--    it (f = 1); the report of the used final units (USU, no RSU) is debited and answered with the
--    final_unit_action and no grant, and the rating group stays restricted (f = 2, no units held); a later
--    MSCC with an RSU, or with neither RSU nor USU while restricted, is a new request for units: granted
--    when money arrived, else answered with the final_unit_action and no grant again (result 2001). The
--    same answer goes to a request for units that finds nothing to grant, also at CCR-I.
--  * An MSCC with neither USU nor RSU leaves the rating group's reservation as it is (answered 2001, nothing
--    else), unless the group is restricted: then it is the request for units of RFC 4006 §5.6.3.
--  * command_level (a plain RFC 4006 client, units outside MSCC): the one MSCC's result is the command's,
--    and a command-level failure closes the session (RFC 4006 §7: CCR-I/U not successfully processed).
--  * A stale plan is answered with stale_plan set and result 5012 (in case a caller ignores stale_plan).

local WINDOW = 32
local RESTRICTED = '{"u":0,"b":{},"f":2}' -- a rating group whose final units are used (no units held)
local CLOSED_TTL_MS = 86400000 -- a closed session keeps its stored answers for a day

local sub_key, bal_key, ses_key, open_key, cdr_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ledger_key, bexp_key, grp_key = KEYS[6], KEYS[7], KEYS[8]
local req = decode(ARGV[1])

local rtype = req.request_type
if rtype ~= 1 and rtype ~= 2 and rtype ~= 3 then
  return redis.error_reply('ERR charge: request_type must be 1, 2 or 3')
end
local err = check_request(req)
if err then
  return redis.error_reply('ERR charge: invalid ' .. err)
end

local n, now, e2e = req.request_number, req.now_ms, req.end_to_end
local answer_field = 'a:' .. int(n)

-- the session fields this request needs: the fixed ones, its stored answer, its rating groups' reservations
local FIXED = 5
local wanted = { 'state', 'msisdn', 'cdr', 'hi', answer_field }
for _, m in ipairs(req.msccs) do
  wanted[#wanted + 1] = 'r:' .. int(m.rating_group)
end
local ses = call('HMGET', ses_key, unpack_(wanted))

-- 1. duplicate
if ses[5] then
  return as_duplicate(ses[5])
end

-- 2. subscriber
local sub = call('HMGET', sub_key, 'msisdn', 'plan', 'status', 'imsi', 'currency', 'group')
if not sub[1] then
  return outcome_json(5030, nil, e2e)
end
local group = sub[6] or ''
if sub[2] ~= req.plan or group ~= (present(req.group) and req.group or '') or (group ~= '' and not grp_key) then
  return outcome_json(5012, nil, e2e, { stale_plan = sub[2] or '', stale_group = group })
end
local active = sub[3] == 'active'
local terminated = sub[3] == 'terminated'
if rtype == 1 and terminated then
  return outcome_json(5030, nil, e2e)
end
if rtype == 1 and not active then
  return outcome_json(4010, nil, e2e)
end

-- 3. session
local ses_set = {} -- field, value, field, value ... written with one HSET at the end
local ses_del = {}
local rec -- what the CDR records of this request share
local highest = tonumber(ses[4]) or -1
if rtype == 1 then
  if ses[1] then
    return outcome_json(5012, nil, e2e)
  end
  local ctx_json = jval(req.context) -- an empty table is written as {}
  local static = cdr_static(req.msisdn, sub[4], req.session_id, req.origin_host, req.context, now)
  ses_set = { 'msisdn', req.msisdn, 'plan', req.plan, 'state', 'open', 'ctx', ctx_json, 'cdr', static,
    'created', int(now) }
  rec = record_parts(static, req.session_id, n, now)
else
  if ses[1] ~= 'open' or ses[2] ~= req.msisdn then
    return outcome_json(5002, nil, e2e)
  end
  if n <= highest - WINDOW then
    return outcome_json(5012, nil, e2e)
  end
  rec = record_parts(ses[3], req.session_id, n, now)
end
-- the gateway of the latest CCR (and the peer it came through) owns the session: RAR/ASR go there
if req.origin_host ~= '' or rtype == 1 then
  ses_set[#ses_set + 1] = 'origin_host'
  ses_set[#ses_set + 1] = req.origin_host
  ses_set[#ses_set + 1] = 'origin_realm'
  ses_set[#ses_set + 1] = req.origin_realm or ''
  ses_set[#ses_set + 1] = 'peer'
  ses_set[#ses_set + 1] = req.peer or req.origin_host
end

-- 4. the MSCCs, in order, between two settlements of expired buckets
local p = purse(wallet(bal_key), group ~= '' and wallet(grp_key) or nil, req.msisdn, group)
local ctx = { ledger = ledger_key, bexp = bexp_key, now = now }
local metadata = p.own.m or p.grp
if metadata then
  settle_purse(p, ctx)
end
local debits = {} -- {rating group, money amount, {ref, amount} list} for the ledger
local expired_held = false
local reservations = {} -- 'r:<rg>' -> value to store (false: none)
local existed = {} -- 'r:<rg>' -> true when the session hash has it now
for i in ipairs(req.msccs) do
  local field = wanted[FIXED + i]
  if reservations[field] == nil then
    reservations[field] = ses[FIXED + i]
    existed[field] = ses[FIXED + i] ~= false
  end
end
local outcomes = {}
for i, m in ipairs(req.msccs) do
  local s = m.schedule
  local o = { rating_group = m.rating_group, service_id = m.service_id, result_code = 2001, amount = 0,
    reserved = 0 }
  local field = wanted[FIXED + i]
  local used = present(m.used)
  local held = reservations[field]
  -- an MSCC that reports nothing and asks for nothing leaves its reservation alone (the gateway still holds
  -- those units), unless the rating group is restricted: then it asks again (RFC 4006 §5.6.3)
  local idle = held and not used and not m.requested and rtype ~= 3 and not string.find(held, '"f":2', 1, true)
  -- (a) the old reservation goes back first: the used units are paid out of it
  local state, was = 0, nil -- final-units state of the rating group (see release in common.lua), what it held
  if held and not idle then
    state, was = release(p, held)
    reservations[field] = false
  end
  local src = sources(p, s, m.rating_group, now, was)
  if src.grace then
    expired_held = true -- what an expired bucket held is back: what usage does not take expires below
  end
  -- (b) used units
  if used then
    local amount, taken = commit_usage(p, s, src, units_in(s.unit, m.used) or 0)
    o.amount = amount
    rated_record(cdr_key, 'usage', rec, m, s, m.used, amount, taken)
    if #taken > 0 then
      debits[#debits + 1] = { m.rating_group, amount, taken }
    end
  end
  -- (c) a new grant
  if rtype ~= 3 and not idle then
    if not s.credit_control then
      o.result_code = 4011
    elseif m.requested or (state == 2 and not used) then
      if not active or s.barred then
        o.result_code = 4010
      else
        local want = units_in(s.unit, m.requested_units)
        if not want or want == 0 then
          want = s.default_quota
        end
        want = math.min(want, s.max_quota)
        local granted, held, money, allowance_units = plan_grant(p, s, src, want)
        if granted == 0 then
          if s.final_unit_action ~= 0 then
            o.final_unit_action = s.final_unit_action
            reservations[field] = RESTRICTED
          else
            o.result_code = 4012
          end
        else
          for _, kv in ipairs(held) do
            hold(p, kv[1], kv[2])
          end
          local flag = ''
          if granted < want then
            o.final_unit_action = s.final_unit_action
            if s.final_unit_action ~= 0 then
              flag = ',"f":1'
            end
          end
          reservations[field] = '{"u":' .. int(granted) .. ',"b":' .. buckets_json(held) .. flag .. '}'
          o.granted = grant_json(s, granted, m.requested_units)
          if money > 0 then
            o.reserved = money
          else
            o.reserved = allowance_units
          end
        end
      end
    elseif state ~= 0 and s.final_unit_action ~= 0 then
      -- the final units are used up (or usage came while restricted): no grant, the action again
      o.final_unit_action = s.final_unit_action
      reservations[field] = RESTRICTED
    end
  end
  outcomes[i] = o
end

-- a plain RFC 4006 client hears its one MSCC's result at command level; a failure there ends the session
local result = 2001
if req.command_level and outcomes[1] and outcomes[1].result_code ~= 2001 then
  result = outcomes[1].result_code
end
if terminated and rtype == 2 then
  result = 5030 -- the subscriber is gone: the used units are charged, the session ends
end
local closing = rtype == 3 or result ~= 2001

-- 5. TERMINATION (or a command-level failure) releases what other rating groups still hold and closes the
-- session
if closing then
  local others = {}
  for _, field in ipairs(call('HKEYS', ses_key)) do
    if string.sub(field, 1, 2) == 'r:' and reservations[field] == nil then
      others[#others + 1] = field
    end
  end
  if #others > 0 then
    local values = call('HMGET', ses_key, unpack_(others))
    for i, field in ipairs(others) do
      release(p, values[i])
      reservations[field] = false
      existed[field] = true
    end
  end
  for field, value in pairs(reservations) do
    if value then -- granted in this request: a CCR-T grants nothing, so only by a repeated rating group
      release(p, value)
      reservations[field] = false
    end
  end
  local cause = CLOSING_CAUSE[req.termination_cause] or 'normalRelease'
  if rtype ~= 3 then
    cause = result == 4011 and 'normalRelease' or (terminated and 'managementIntervention' or 'abnormalRelease')
  end
  close_record(cdr_key, rec, cause, sub[5] or 'EUR')
  call('ZREM', open_key, req.session_id)
  ses_set[#ses_set + 1] = 'state'
  ses_set[#ses_set + 1] = 'closed'
  ses_set[#ses_set + 1] = 'closed'
  ses_set[#ses_set + 1] = int(now)
end
if #debits > 0 then
  usage_entry(ledger_key, req.msisdn, group, req.session_id .. ';' .. int(n), debits, now)
end
if metadata and (expired_held or closing) then
  settle_purse(p, ctx)
end
wsave(p.own)
wsave(p.grp)

-- the answer, stored for duplicates, and the last activity
local out = outcome_json(result, outcomes, e2e)
for field, value in pairs(reservations) do
  if value then
    ses_set[#ses_set + 1] = field
    ses_set[#ses_set + 1] = value
  elseif existed[field] then
    ses_del[#ses_del + 1] = field
  end
end
ses_set[#ses_set + 1] = answer_field
ses_set[#ses_set + 1] = out
ses_set[#ses_set + 1] = 'last'
ses_set[#ses_set + 1] = int(now)
ses_set[#ses_set + 1] = 'hi'
ses_set[#ses_set + 1] = int(math.max(highest, n))
if n >= WINDOW then
  ses_del[#ses_del + 1] = 'a:' .. int(n - WINDOW)
end
if #ses_del > 0 then
  call('HDEL', ses_key, unpack_(ses_del))
end
call('HSET', ses_key, unpack_(ses_set))
if closing then
  call('PEXPIRE', ses_key, CLOSED_TTL_MS)
else
  call('ZADD', open_key, int(now), req.session_id)
end
return out
