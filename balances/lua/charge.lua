-- charge.lua: one session CCR (INITIAL 1 / UPDATE 2 / TERMINATION 3), atomically.
--
-- KEYS[1] sub:{p}:<msisdn>   KEYS[2] bal:{p}:<msisdn>   KEYS[3] ses:{p}:<session-id>
-- KEYS[4] open:{p}           KEYS[5] cdr:{p}            KEYS[6] ledger:{p}
-- KEYS[7] bexp:{p}           KEYS[8] use:{p}:<msisdn>   KEYS[9] sched:{p}
-- [KEYS[10] grp:{p}:<group>, when the request names the subscriber's group]
-- ARGV[1] the ChargeRequest as JSON; an MSCC's schedule and next_schedule may be {"id": ...} alone (common.lua
-- resolve_schedules)
-- Returns a ChargeOutcome as JSON; {"result_code":0,"need_schedules":true} (nothing read or written) when a
-- schedule named by id alone is not known here: the caller sends the request again with it in full.
--
-- Order: duplicate check -> subscriber checks -> session checks -> for each MSCC (release the rating
-- group's reservation, commit the used units, reserve the new grant) -> TERMINATION closes the session ->
-- store the answer under a:<request-number> (compact, common.lua stored_answer) and let old ones go -> last
-- activity. Reads happen up front (one HMGET of the session, one HGETALL of the balances, and of the group's
-- shared buckets for a member) and writes once at the end, apart from the CDR and ledger XADDs. The CDR
-- members that never change in a session are rendered at CCR-I and kept in the session as 'cdr' (common.lua
-- cdr_static: without servedMSISDN, sessionId and recordOpeningTime, which the session has as msisdn, its key
-- and created; the request's CDR context is not kept otherwise).
--
-- The session hash ses:{p}:<session-id>: msisdn, plan, state (open / closed), cdr, created, last (ms),
-- origin_host / origin_realm of the latest CCR, peer (the connected peer it came through, only when that is
-- not origin_host: readers take origin_host when it is absent), hi (the highest request number answered),
-- ak (the stored answers, below), a:<n> (a stored answer), r:<rg> (a rating group's reservation), and when
-- closed: closed (ms), closed_by (close.lua).
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
--  * Stored answers are kept by age and need, not by count: the last one (highest request number) and those
--    younger than ANSWER_KEEP_MS (60 s: a duplicate comes within the client's Tx timer plus a failover, and
--    RFC 4006 §5.1.2 lets a client send a CCR-U before the previous one is answered), at most ANSWERS_MAX.
--    The session's 'ak' lists them: '<forgotten>;<number>:<time ms>;<number>:<time>...' in the order they
--    were stored, forgotten being the highest number let go (-1: none). A request numbered at or below
--    `forgotten` that has no stored answer cannot be told apart from an old duplicate and is answered 5012
--    without changes. A session written before 'ak' existed counts as having kept its last 32 answers, of
--    unknown age.
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
--  * Pricing: spine schedules as before (common.lua price_units); extended ones (first increment, setup fee,
--    minimum charge, free units, tiers, cap, scope) by ratecards/pricing.py's functions, mirrored in
--    common.lua. Allowances are taken first; only units priced in money advance the scope / cap counters
--    (use:{p}:<msisdn> per period key from MsccCharge.periods; scope "session": "c" in the reservation).
--  * The reservation r:<rg> is {"u": units, "b": {ref: held}, "f": final-units state, "w": 1 when f comes
--    from fair usage, "c": session-scope units (kept without a grant too), "s": id of the schedule it was
--    granted with, "a": the time of that grant (ms), "d" / "z": the destination and PLMN of its rating keys
--    (when the request had them), "p": its period keys, and when the MSCC carried a Tariff-Time-Change "t":
--    the change (ms), "n" / "q": the next schedule id and its period keys}. Schedules are filed by id in
--    sched:{p} (HSET whenever a reservation written names one; content-addressed, so never stale).
--  * CDR usage records (common.lua rated_record) carry besides "bucket" its refs' units ("bucketUnits"), and
--    when and with which rating keys the schedule that rated the usage was chosen, so billing re-rates it
--    alike: "ratedAt", "calledPartyAddress", "ratingPlmn" = the reservation's "a", "d", "z" when its schedule
--    "s" rated it (the grant's: usage reported after a handover was used under the old network's grant),
--    else the request's now_ms and rating keys (ChargeRequest.rating_keys). A reservation written before "a"
--    existed gives no ratedAt (billing derives it) and the request's keys.
--  * Tariff-Time-Change: a grant with tariff_change_ms is held at the dearer of the two schedules (the units
--    both afford, at the higher charge) and answered with tariff_change_ms (only when units are granted).
--    Usage is rated with the reservation's schedules: used_before with "s", used_after with "n",
--    used_indeterminate at the dearer, `used` with "s" unless it is reported at or after "t" (then the
--    dearer); each part counts in its own periods. Without a reservation naming a schedule on file, the
--    request's schedule rates it. One CDR record per MSCC as before (usage = the parts summed, amount and
--    bucket the totals, so the ledger and `ocs audit` see one record); when usage is split or rated at the
--    dearer it lists "tariffParts": [{tariffChangeUsage, usage, amount, tariff, ratingVersion}].
--  * requires_bucket: a request for units that no live allowance with units left serves is answered 5030 in
--    its MSCC with final_unit_action = the schedule's, nothing granted or held; with a bundle, only the
--    bundle is granted (never money). Reported usage is charged as always; the session stays open.
--  * Fair usage (fair_usage_units per fair_usage_period, every unit used counted in use:{p}): a grant
--    stops at the period's limit; a grant cut there carries final_unit_action 2 (RESTRICT_ACCESS) and
--    fair_usage, and the final-units flow above follows (f 1, then f 2 with "w") until a request for units
--    finds room again (the next period).

local ANSWER_KEEP_MS = 60000 -- stored answers younger than this are kept for duplicates, besides the last one
local ANSWERS_MAX = 8 -- and at most this many per session, the last one included
local LEGACY_WINDOW = 32 -- a session written before 'ak' existed kept the last 32 answers
local RESTRICTED = '{"u":0,"b":{},"f":2}' -- a rating group whose final units are used (no units held)
local CLOSED_TTL_MS = 86400000 -- a closed session keeps its stored answers for a day

local sub_key, bal_key, ses_key, open_key, cdr_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ledger_key, bexp_key, use_key, sched_key, grp_key = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local req = decode(ARGV[1])

local rtype = req.request_type
if rtype ~= 1 and rtype ~= 2 and rtype ~= 3 then
  return redis.error_reply('ERR charge: request_type must be 1, 2 or 3')
end
if not resolve_schedules(req, sched_key) then
  return NEED_SCHEDULES -- a schedule named by id alone that is neither kept nor filed: sent again in full
end
local err = check_request(req)
if err then
  return redis.error_reply('ERR charge: invalid ' .. err)
end

local n, now, e2e = req.request_number, req.now_ms, req.end_to_end
local answer_field = 'a:' .. int(n)

-- the session fields this request needs: the fixed ones, its stored answer, its rating groups' reservations
local FIXED = 8
local wanted = { 'state', 'msisdn', 'cdr', 'hi', 'ak', 'peer', 'created', answer_field }
for _, m in ipairs(req.msccs) do
  wanted[#wanted + 1] = 'r:' .. int(m.rating_group)
end
local ses = call('HMGET', ses_key, unpack_(wanted))

-- 1. duplicate
if ses[FIXED] then
  return stored_duplicate(ses[FIXED])
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
local forgotten, stored = -1, '' -- the stored answers' 'ak': forgotten, and the ';<number>:<time>' entries
if rtype == 1 then
  if ses[1] then
    return outcome_json(5012, nil, e2e)
  end
  local static = cdr_static(sub[4], req.origin_host, req.context)
  ses_set = { 'msisdn', req.msisdn, 'plan', req.plan, 'state', 'open', 'cdr', static, 'created', int(now) }
  rec = record_parts(static, req.msisdn, req.session_id, now, n, now)
else
  if ses[1] ~= 'open' or ses[2] ~= req.msisdn then
    return outcome_json(5002, nil, e2e)
  end
  if ses[5] then
    local head
    head, stored = string.match(ses[5], '^(-?%d+)(.*)$')
    forgotten = tonumber(head)
  else -- written by an earlier version: its last 32 answers, of unknown age (time 0)
    forgotten = highest - LEGACY_WINDOW
    local numbers = {}
    for _, field in ipairs(call('HKEYS', ses_key)) do
      if strsub(field, 1, 2) == 'a:' then
        numbers[#numbers + 1] = tonumber(strsub(field, 3))
      end
    end
    table.sort(numbers)
    for i, number in ipairs(numbers) do
      numbers[i] = ';' .. int(number) .. ':0'
    end
    stored = concat(numbers)
  end
  if n <= forgotten then
    return outcome_json(5012, nil, e2e)
  end
  rec = record_parts(ses[3], req.msisdn, req.session_id, tonumber(ses[7]) or 0, n, now)
end
-- the gateway of the latest CCR (and the peer it came through, kept only when that is another host) owns the
-- session: RAR/ASR go there
if req.origin_host ~= '' or rtype == 1 then
  ses_set[#ses_set + 1] = 'origin_host'
  ses_set[#ses_set + 1] = req.origin_host
  ses_set[#ses_set + 1] = 'origin_realm'
  ses_set[#ses_set + 1] = req.origin_realm or ''
  local peer = present(req.peer) and req.peer or ''
  if peer ~= '' and peer ~= req.origin_host then
    ses_set[#ses_set + 1] = 'peer'
    ses_set[#ses_set + 1] = peer
  elseif ses[6] then
    ses_del[#ses_del + 1] = 'peer'
  end
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
local cs = counters(use_key) -- use:{p}:<msisdn>, read on first use
local filed = {} -- schedule id -> JSON to file under sched:{p} (named by a reservation written now)
local known = {} -- schedule id -> decoded schedule (false: not on file)
for _, m in ipairs(req.msccs) do
  if m.schedule.id then known[m.schedule.id] = m.schedule end
  if m.next_schedule and m.next_schedule.id then known[m.next_schedule.id] = m.next_schedule end
end
-- the schedule a reservation names: the request's own, or the one filed under sched:{p}; nil when unknown
local function schedule_by_id(id)
  if type(id) ~= 'string' then
    return nil
  end
  local s = known[id]
  if s == nil then -- (only what sched:{p} has: a reservation whose schedule is not on file is rated as asked)
    local raw = call('HGET', sched_key, id)
    s = false
    if raw then
      s = decode(raw)
      if check_schedule(s) then s = false end
    end
    known[id] = s
  end
  return s or nil
end
-- files a schedule a new reservation names, unless the reservation it replaces named it (then it is on file)
local function file_schedule(s, r)
  if s.id and not filed[s.id] and not (r and (r.s == s.id or r.n == s.id)) then
    filed[s.id] = jval(s)
  end
end
local PART_NAMES = { 'used', 'before', 'after', 'indeterminate' }
-- the request's rating keys: as CDR members, and as a reservation's "d" / "z" (the grant's keys)
local request_keys = rating_keys_json(req.rating_keys.destination, req.rating_keys.plmn)
local held_keys = ''
if present(req.rating_keys.destination) and req.rating_keys.destination ~= '' then
  held_keys = ',"d":' .. encode(req.rating_keys.destination)
end
if present(req.rating_keys.plmn) and req.rating_keys.plmn ~= '' then
  held_keys = held_keys .. ',"z":' .. encode(req.rating_keys.plmn)
end

local outcomes = {}
for i, m in ipairs(req.msccs) do
  local s = m.schedule
  local rg = m.rating_group
  local o = { rating_group = rg, service_id = m.service_id, result_code = 2001, amount = 0, reserved = 0 }
  local field = wanted[FIXED + i]
  local used = present(m.used)
  local split = present(m.used_before) or present(m.used_after) or present(m.used_indeterminate)
  local reports = used or split
  local held = reservations[field]
  -- an MSCC that reports nothing and asks for nothing leaves its reservation alone (the gateway still holds
  -- those units), unless the rating group is restricted: then it asks again (RFC 4006 §5.6.3)
  local idle = held and not reports and not m.requested and rtype ~= 3
    and not string.find(held, '"f":2', 1, true)
  -- (a) the old reservation goes back first: the used units are paid out of it
  local state, was, r = 0, nil, nil -- final-units state (see release in common.lua), what it held, the record
  if held and not idle then
    state, was, r = release(p, held)
    reservations[field] = false
  end
  local sess = { c = (r and present(r.c)) and r.c or 0 } -- units of a session-scope schedule so far
  local fair = r ~= nil and r.w == 1 -- the final-units state comes from the fair-usage policy
  local src = sources(p, s, rg, now, was)
  if src.grace then
    expired_held = true -- what an expired bucket held is back: what usage does not take expires below
  end
  -- (b) used units, rated with the schedule of the grant they were used under (r.s), the part after a
  -- Tariff-Time-Change (r.t) with the next one (r.n), UNIT_INDETERMINATE and usage without
  -- Tariff-Change-Usage reported after the change at the dearer; without a stored one, the request's
  if reports then
    local gs, gp, after = s, m.periods, nil
    local gone = r and schedule_by_id(r.s)
    local rated_at, keys = now, request_keys -- when and with which keys its schedule was chosen (the CDR's)
    if gone then
      gs, gp = gone, present(r.p) and r.p or m.periods
      if present(r.a) then -- the grant's (a reservation written before "a" says neither: the request's keys)
        rated_at, keys = r.a, rating_keys_json(r.d, r.z)
      else
        rated_at = nil
      end
    end
    local g = view_of(gs, gp, rg, cs, sess)
    local change = gone and present(r.t) and r.t or nil
    local ns = change and schedule_by_id(r.n)
    if ns then
      after = view_of(ns, present(r.q) and r.q or m.periods, rg, cs, sess)
    elseif gone then
      after = view_of(s, m.periods, rg, cs, sess)
    else
      after = g
    end
    local parts = {
      used and { m.used, (change and now >= change) and { g, after } or { g } } or false,
      present(m.used_before) and { m.used_before, { g } } or false,
      present(m.used_after) and { m.used_after, { after } } or false,
      present(m.used_indeterminate) and { m.used_indeterminate, { g, after } } or false,
    }
    local listed = (split or (parts[1] and #parts[1][2] > 1)) and {} or nil -- the record lists the parts
    local taken, amount, usage, rated = {}, 0, nil, nil
    for k = 1, 4 do
      local part = parts[k]
      if part then
        local a, v = commit_part(p, part[2], src, units_in(s.unit, part[1]) or 0, taken)
        amount = amount + a
        rated = rated or v.s
        if listed then
          listed[#listed + 1] = '{"tariffChangeUsage":"' .. PART_NAMES[k] .. '","usage":'
            .. usage_json(part[1]) .. ',"amount":' .. int(a) .. ',"tariff":' .. encode(v.s.tariff)
            .. ',"ratingVersion":' .. encode(v.s.version) .. '}'
        end
        if not usage then
          usage = part[1]
        else -- the record's usage is the sum of the parts
          local sum = {}
          for _, key in ipairs(UNIT_FIELDS) do
            local x, y = usage[key], part[1][key]
            if present(x) or present(y) then
              sum[key] = (present(x) and x or 0) + (present(y) and y or 0)
            end
          end
          usage = sum
        end
      end
    end
    o.amount = amount
    rated_record(cdr_key, 'usage', rec, p, m, rated, usage, amount, taken, rated_at, keys,
      listed and ',"tariffParts":[' .. concat(listed, ',') .. ']')
    if #taken > 0 then
      debits[#debits + 1] = { rg, amount, taken }
    end
  end
  -- (c) a new grant
  if rtype ~= 3 and not idle then
    if not s.credit_control then
      o.result_code = 4011
    elseif m.requested or (state == 2 and not reports) then
      if not active or s.barred then
        o.result_code = 4010
      elseif s.requires_bucket and not has_allowance(p, src) then
        -- served only from a bundle and none is left: 5030 with the final unit action (the shop), no money
        o.result_code = 5030
        o.final_unit_action = s.final_unit_action
      else
        local want = units_in(s.unit, m.requested_units)
        if not want or want == 0 then
          want = s.default_quota
        end
        want = math.min(want, s.max_quota)
        -- a grant spanning a Tariff-Time-Change is held at the dearer of the two schedules
        local change = m.tariff_change_ms
        local views = { view_of(s, m.periods, rg, cs, sess) }
        if change then
          views[2] = view_of(m.next_schedule, m.next_periods, rg, cs, sess)
        end
        -- fair usage: never past the period's limit
        local room = fair_usage_room(views)
        local capped = (room and room < want) and room or want
        local granted, holding, money, allowance_units = plan_grant(p, views, src, capped, s.requires_bucket)
        local cut = capped < want and granted == capped -- stopped by the fair-usage limit, not by credit
        if granted == 0 then
          if cut then
            o.final_unit_action, o.fair_usage = 2, true
            reservations[field] = '{"u":0,"b":{},"f":2,"w":1}'
          elseif s.final_unit_action ~= 0 then
            o.final_unit_action = s.final_unit_action
            reservations[field] = RESTRICTED
          else
            o.result_code = 4012
          end
        else
          for _, kv in ipairs(holding) do
            hold(p, kv[1], kv[2])
          end
          local flag = ''
          if cut then
            o.final_unit_action, o.fair_usage = 2, true
            flag = ',"f":1,"w":1'
          elseif granted < want then
            o.final_unit_action = s.final_unit_action
            if s.final_unit_action ~= 0 then
              flag = ',"f":1'
            end
          end
          -- the record: {"u", "b", "f", "w": 1 when fair usage set f, "c": session-scope units, "s": the
          -- schedule id, "a" / "d" / "z": the grant's time (ms), destination and PLMN, "p": its period keys,
          -- and with a Tariff-Time-Change "t" (ms), "n", "q": the next schedule id and period keys}
          local extra = ''
          if s.id then
            file_schedule(s, r)
            extra = ',"s":"' .. s.id .. '","a":' .. int(now) .. held_keys
            if next(m.periods) then extra = extra .. ',"p":' .. jval(m.periods) end
            if change and m.next_schedule.id then
              file_schedule(m.next_schedule, r)
              extra = extra .. ',"t":' .. int(change) .. ',"n":"' .. m.next_schedule.id .. '"'
              if next(m.next_periods) then extra = extra .. ',"q":' .. jval(m.next_periods) end
            end
          end
          if sess.c > 0 then
            extra = extra .. ',"c":' .. int(sess.c)
          end
          reservations[field] = '{"u":' .. int(granted) .. ',"b":' .. buckets_json(holding) .. flag .. extra .. '}'
          o.granted = grant_json(s, granted, m.requested_units)
          o.tariff_change_ms = change
          if money > 0 then
            o.reserved = money
          else
            o.reserved = allowance_units
          end
        end
      end
    elseif state ~= 0 and (s.final_unit_action ~= 0 or fair) then
      -- the final units are used up (or usage came while restricted): no grant, the action again
      if fair then
        o.final_unit_action, o.fair_usage = 2, true
        reservations[field] = '{"u":0,"b":{},"f":2,"w":1}'
      else
        o.final_unit_action = s.final_unit_action
        reservations[field] = RESTRICTED
      end
    end
  end
  -- the session-scope count survives the reservation (it is never refunded)
  if sess.c > 0 and not idle then
    local value = reservations[field]
    if not value then
      reservations[field] = '{"u":0,"b":{},"c":' .. int(sess.c) .. '}'
    elseif not string.find(value, '"c":', 1, true) then
      reservations[field] = strsub(value, 1, -2) .. ',"c":' .. int(sess.c) .. '}'
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
counters_save(cs)
if next(filed) then
  local set = {}
  for id, text in pairs(filed) do
    set[#set + 1] = id
    set[#set + 1] = text
  end
  call('HSET', sched_key, unpack_(set))
end

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
ses_set[#ses_set + 1] = stored_answer(result, outcomes, e2e)
ses_set[#ses_set + 1] = 'last'
ses_set[#ses_set + 1] = int(now)
ses_set[#ses_set + 1] = 'hi'
ses_set[#ses_set + 1] = int(math.max(highest, n))
-- the answers kept: the last one (highest number), and those younger than ANSWER_KEEP_MS, at most ANSWERS_MAX.
-- The entries are in the order they were stored, so by time: the old ones are at the front and only those are
-- looked at; a request numbered at or below one that is let go is answered 5012 (see Choices)
local top = math.max(highest, n)
stored = stored .. ';' .. int(n) .. ':' .. int(now)
local count = 0
for _ in string.gmatch(stored, ';') do count = count + 1 end
local last, pos = '', 1
while true do
  local from, to, number, at = string.find(stored, '^;(%d+):(%d+)', pos)
  if not from then break end
  number = tonumber(number)
  if number == top then
    last = strsub(stored, from, to) -- the last answer stays, wherever it is (the oldest of those kept)
  elseif now - tonumber(at) >= ANSWER_KEEP_MS or count > ANSWERS_MAX then
    ses_del[#ses_del + 1] = 'a:' .. int(number)
    if number > forgotten then forgotten = number end
    count = count - 1
  else
    break -- this one and all after it are young enough
  end
  pos = to + 1
end
ses_set[#ses_set + 1] = 'ak'
ses_set[#ses_set + 1] = int(forgotten) .. last .. strsub(stored, pos)
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
