-- common.lua: the prelude of the OCS function library (balances/scripts.py appends charge, event, topup,
-- provision and close as functions). Defined once when the library loads, shared by every call.
--
-- Rules for everything in balances/lua:
--  * Every key is passed in KEYS and carries one {pNNN} hash tag; no derived key names, no TIME
--    (the time is now_ms in ARGV), so a call runs in one Redis Cluster slot and replays identically.
--  * Integer arithmetic only. Lua numbers are doubles: exact below 2^53, which the rate-card checks
--    guarantee for every product computed here. Division goes through idiv(), which corrects the one-off
--    error a rounded double quotient can have.
--  * Numbers are never printed with tostring() or cjson.encode() (14 significant digits): int() and the
--    JSON writers below print integers exactly.
--  * Validate before the first write: Redis does not roll back a call that fails halfway.
--  * Read a hash once, change Lua tables, write once at the end: every redis.call costs about as much as
--    a page of Lua here, and this code runs for every CCR.

-- Standard functions as upvalues, bound on the first call of each function. A function's global variables
-- are reached through a protective metatable that costs a function call per access, and the library's top
-- level runs with almost nothing visible, so they cannot be bound at load time. capture() is defined
-- before the locals that shadow the globals, so its body still names the globals.
local function capture()
  return type, ipairs, pairs, tonumber, tostring, unpack, string, math, table, cjson, redis.call, next
end
local type, ipairs, pairs, tonumber, tostring, unpack, string, math, table, cjson, call, next
local fmt, floor, min, concat, encode, decode, null, unpack_, byte, strsub

local function bind()
  type, ipairs, pairs, tonumber, tostring, unpack, string, math, table, cjson, call, next = capture()
  fmt, floor, min, concat = string.format, math.floor, math.min, table.concat
  encode, decode, null, unpack_ = cjson.encode, cjson.decode, cjson.null, unpack
  byte, strsub = string.byte, string.sub
end

local function int(n)
  return fmt('%d', n)
end

local function present(v)
  return v ~= nil and v ~= null
end

local function is_int(v)
  return type(v) == 'number' and v == floor(v)
end

-- floor(a / b) for integers, b > 0, exact while a < 2^53
local function idiv(a, b)
  local q = floor(a / b)
  local r = a - q * b
  if r < 0 then
    q = q - 1
  elseif r >= b then
    q = q + 1
  end
  return q
end

local function ceil_div(a, b)
  local q = idiv(a, b)
  if q * b < a then
    q = q + 1
  end
  return q
end

-- ---- exact JSON writing --------------------------------------------------------------------------------

-- any decoded JSON value (the CDR context of a request); integers exact
local function jval(v)
  local t = type(v)
  if t == 'string' then
    return encode(v)
  elseif t == 'number' then
    if v == floor(v) and v > -9.2e18 and v < 9.2e18 then
      return int(v)
    end
    return fmt('%.17g', v)
  elseif t == 'boolean' then
    return v and 'true' or 'false'
  elseif t == 'table' then
    local parts = {}
    if #v > 0 then
      for i = 1, #v do
        parts[i] = jval(v[i])
      end
      return '[' .. concat(parts, ',') .. ']'
    end
    for k, x in pairs(v) do
      parts[#parts + 1] = encode(tostring(k)) .. ':' .. jval(x)
    end
    return '{' .. concat(parts, ',') .. '}'
  end
  return 'null'
end

-- an ordered {{bucket, amount}, ...} list as a JSON object
local function buckets_json(list)
  local p = {}
  for i, kv in ipairs(list) do
    p[i] = encode(kv[1]) .. ':' .. int(kv[2])
  end
  return '{' .. concat(p, ',') .. '}'
end

-- ---- outcomes (decoded by msgspec into balances.model.ChargeOutcome) ----------------------------------

local function mscc_json(o)
  local p = { '{"rating_group":', int(o.rating_group), ',"result_code":', int(o.result_code) }
  if present(o.service_id) then
    p[#p + 1] = ',"service_id":' .. int(o.service_id)
  end
  if o.granted then
    p[#p + 1] = ',"granted":' .. o.granted
  end
  if o.final_unit_action then
    p[#p + 1] = ',"final_unit_action":' .. int(o.final_unit_action)
  end
  p[#p + 1] = ',"amount":' .. int(o.amount)
  if o.reserved then
    p[#p + 1] = ',"reserved":' .. int(o.reserved)
  end
  if o.cost then
    p[#p + 1] = ',"cost":' .. int(o.cost)
  end
  if o.tariff_change_ms then
    p[#p + 1] = ',"tariff_change_ms":' .. int(o.tariff_change_ms)
  end
  if o.fair_usage then
    p[#p + 1] = ',"fair_usage":true'
  end
  p[#p + 1] = '}'
  return concat(p)
end

-- extra: optional table with check_balance_result / stale_plan / stale_group
local function outcome_json(result_code, msccs, end_to_end, extra)
  local p = { '{"result_code":', int(result_code) }
  if msccs and #msccs > 0 then
    local list = {}
    for i, o in ipairs(msccs) do
      list[i] = mscc_json(o)
    end
    p[#p + 1] = ',"msccs":[' .. concat(list, ',') .. ']'
  end
  if extra then
    if extra.check_balance_result then
      p[#p + 1] = ',"check_balance_result":' .. int(extra.check_balance_result)
    end
    if extra.stale_plan then
      p[#p + 1] = ',"stale_plan":' .. encode(extra.stale_plan)
    end
    if extra.stale_group then
      p[#p + 1] = ',"stale_group":' .. encode(extra.stale_group)
    end
  end
  p[#p + 1] = ',"end_to_end":' .. int(end_to_end) .. '}'
  return concat(p)
end

-- a stored outcome, re-sent unchanged except for the duplicate flag (string surgery keeps numbers exact)
local function as_duplicate(stored)
  return '{"duplicate":true,' .. string.sub(stored, 2)
end

-- ---- stored answers of a session (charge.lua: a:<request-number>) --------------------------------------
-- A session's answers are kept for duplicates in a compact positional form, a third of the outcome JSON:
--   [result_code, end_to_end, mscc, ...]   mscc = [rating_group, result_code, amount, reserved, granted,
--                                                  service_id, final_unit_action, tariff_change_ms, fair]
-- granted is the Units object (0: none), fair is 1 for fair_usage; trailing absent members are left out and
-- absent ones before a present one are null. A duplicate decodes it back to the outcome (integers below 2^53
-- survive the double round trip exactly: int() prints them).

local MSCC_OPTIONAL = { 'service_id', 'final_unit_action', 'tariff_change_ms' }
local GRANTED_FIELDS = { 'time', 'total', 'input', 'output', 'units' }

local function stored_answer(result_code, msccs, end_to_end)
  local p = { '[', int(result_code), ',', int(end_to_end) }
  for _, o in ipairs(msccs) do
    local m = { '[' .. int(o.rating_group), int(o.result_code), int(o.amount), int(o.reserved or 0),
      o.granted or '0' }
    local tail = { present(o.service_id) and int(o.service_id) or 'null',
      o.final_unit_action and int(o.final_unit_action) or 'null',
      o.tariff_change_ms and int(o.tariff_change_ms) or 'null', o.fair_usage and '1' or 'null' }
    local last = 0
    for i = 1, 4 do
      if tail[i] ~= 'null' then last = i end
    end
    for i = 1, last do
      m[#m + 1] = tail[i]
    end
    p[#p + 1] = ',' .. concat(m, ',') .. ']'
  end
  p[#p + 1] = ']'
  return concat(p)
end

-- the rating groups a stored answer names (either form: close.lua reads the last answer's)
local function stored_rating_groups(raw)
  local answer = decode(raw)
  local groups = {}
  if answer[1] ~= nil then
    for i = 3, #answer do
      groups[#groups + 1] = answer[i][1]
    end
  elseif type(answer.msccs) == 'table' then
    for i, m in ipairs(answer.msccs) do
      groups[i] = m.rating_group
    end
  end
  return groups
end

-- a stored answer re-sent as the outcome JSON with the duplicate flag (an answer stored as outcome JSON
-- by an earlier version is re-sent as it is)
local function stored_duplicate(raw)
  if byte(raw, 1) == 123 then -- '{'
    return as_duplicate(raw)
  end
  local a = decode(raw)
  local msccs = {}
  for i = 3, #a do
    local m = a[i]
    local o = { rating_group = m[1], result_code = m[2], amount = m[3], reserved = m[4] }
    if type(m[5]) == 'table' then
      local units = {}
      for _, key in ipairs(GRANTED_FIELDS) do
        if present(m[5][key]) then units[#units + 1] = '"' .. key .. '":' .. int(m[5][key]) end
      end
      o.granted = '{' .. concat(units, ',') .. '}'
    end
    for j, key in ipairs(MSCC_OPTIONAL) do
      if present(m[5 + j]) then o[key] = m[5 + j] end
    end
    if present(m[9]) and m[9] == 1 then o.fair_usage = true end
    msccs[#msccs + 1] = o
  end
  return '{"duplicate":true,' .. strsub(outcome_json(a[1], msccs, a[2]), 2)
end

-- ---- requests and rating schedules ---------------------------------------------------------------------

local UNIT_KINDS = { bytes = true, seconds = true, events = true }
local ROUNDING = { ['up'] = true, ['half-up'] = true, ['half-even'] = true, ['down'] = true }
local UNIT_FIELDS = { 'time', 'total', 'input', 'output', 'units' }
local UNIT_FIELD = { time = true, total = true, input = true, output = true, units = true }
-- the Units field a rating unit is priced and granted in (ratecards.schedule.PRICED_UNIT_TYPE)
local PRICED = { bytes = 'total', seconds = 'time', events = 'units' }

local function positive(v)
  return type(v) == 'number' and v > 0 and v == floor(v)
end

local function non_negative(v)
  return type(v) == 'number' and v >= 0 and v == floor(v)
end

local SCOPES = { report = true, session = true, day = true, week = true, month = true }
local EXTENDED_NUMBERS = { 'first_increment', 'setup_fee', 'minimum_charge', 'free_units', 'cap', 'fair_usage_units' }
local PERIODS = { day = true, week = true, month = true }

-- the extended pricing, fair-usage and requires-bucket fields (ratecards/pricing.py item 8): defaults for
-- what msgspec omits, checks, and s.ext = true when the extended pricing path applies (pricing.is_extended)
local function check_extended(s)
  for _, key in ipairs(EXTENDED_NUMBERS) do
    local v = s[key]
    if not present(v) then
      s[key] = 0
    elseif not non_negative(v) then
      return 'schedule ' .. key
    end
  end
  if not present(s.tiers) then s.tiers = {} end
  if not present(s.scope) then s.scope = 'report' end
  if not present(s.cap_period) then s.cap_period = '' end
  if not present(s.fair_usage_period) then s.fair_usage_period = '' end
  if not present(s.tariff) then s.tariff = '' end
  if not present(s.requires_bucket) then s.requires_bucket = false end
  if not present(s.id) then s.id = nil end
  if type(s.tiers) ~= 'table' or not SCOPES[s.scope] or type(s.tariff) ~= 'string' then
    return 'schedule tiers, scope or tariff'
  end
  local previous = 0
  for _, t in ipairs(s.tiers) do
    if type(t) ~= 'table' or not positive(t[1]) or t[1] <= previous or not non_negative(t[2])
      or not positive(t[3]) then
      return 'schedule tiers'
    end
    previous = t[1]
  end
  if s.cap > 0 and not PERIODS[s.cap_period] then return 'schedule cap_period' end
  if s.fair_usage_units > 0 and not PERIODS[s.fair_usage_period] then return 'schedule fair_usage_period' end
  if type(s.requires_bucket) ~= 'boolean' or (s.id ~= nil and type(s.id) ~= 'string') then
    return 'schedule requires_bucket or id'
  end
  s.ext = s.first_increment > 0 or s.setup_fee > 0 or s.minimum_charge > 0 or s.free_units > 0 or #s.tiers > 0
    or s.cap > 0 or s.scope ~= 'report'
  return nil
end

-- fills the defaults msgspec omits; an error text for a schedule the functions cannot apply
local function check_schedule(s)
  if type(s) ~= 'table' then
    return 'schedule missing'
  end
  if not present(s.money_bucket) then s.money_bucket = 'money' end
  if not present(s.allowances) then s.allowances = {} end
  if not present(s.final_unit_action) then s.final_unit_action = 0 end
  if not present(s.currency) then s.currency = 'EUR' end
  if not present(s.version) then s.version = '' end
  if not present(s.also_grant) then s.also_grant = {} end
  if not present(s.credit_control) then s.credit_control = true end
  if not present(s.barred) then s.barred = false end
  if not UNIT_KINDS[s.unit] or not ROUNDING[s.rounding] then return 'schedule unit or rounding' end
  if not (positive(s.increment) and positive(s.price_den) and positive(s.minor)) then
    return 'schedule increment, price_den or minor'
  end
  if not (non_negative(s.price_num) and non_negative(s.default_quota) and non_negative(s.max_quota)) then
    return 'schedule price_num, default_quota or max_quota'
  end
  if type(s.money_bucket) ~= 'string' or type(s.currency) ~= 'string' or type(s.version) ~= 'string' then
    return 'schedule money_bucket, currency or version'
  end
  for _, b in ipairs(s.allowances) do
    if type(b) ~= 'string' or b == s.money_bucket then return 'schedule allowances' end
  end
  if type(s.also_grant) ~= 'table' or type(s.credit_control) ~= 'boolean' or type(s.barred) ~= 'boolean' then
    return 'schedule also_grant, credit_control or barred'
  end
  for _, g in ipairs(s.also_grant) do
    if type(g) ~= 'table' or not UNIT_FIELD[g[1]] or not non_negative(g[2]) or not non_negative(g[3]) then
      return 'schedule also_grant'
    end
  end
  return check_extended(s)
end

local function check_units(u)
  if present(u) then
    if type(u) ~= 'table' then return true end
    for _, k in ipairs(UNIT_FIELDS) do
      local v = u[k]
      if v ~= nil and not non_negative(v) then return true end
    end
  end
  return false
end

-- the period keys (MsccCharge.periods) a schedule counts over
local function missing_period(s, periods)
  return (PERIODS[s.scope] and type(periods[s.scope]) ~= 'string')
    or (s.cap > 0 and type(periods[s.cap_period]) ~= 'string')
    or (s.fair_usage_units > 0 and type(periods[s.fair_usage_period]) ~= 'string')
end

-- ---- schedules named by id -----------------------------------------------------------------------------
-- A request's MSCC may carry its schedules in full (checked, then kept here by their id) or name them by id
-- alone ({"id": ...}, the usual case: the caller sends the full ones only after an answer with
-- need_schedules). The id is a hash of the content (balances.model.with_schedule_id), so a checked schedule
-- kept under it between calls (bounded, like the bucket metadata) never goes stale; sched:{p} (filed by
-- charge.lua when a reservation names one) is the second place to look. The tables are shared between calls:
-- check_schedule fills them once and nothing changes them afterwards.
local schedule_cache, schedules_cached, SCHEDULE_CACHE_MAX = {}, 0, 4096

local function cache_schedule(s)
  if schedule_cache[s.id] == nil then
    if schedules_cached >= SCHEDULE_CACHE_MAX then
      schedule_cache, schedules_cached = {}, 0
    end
    schedules_cached = schedules_cached + 1
  end
  schedule_cache[s.id] = s
end

-- the schedule a reference names (nil when neither kept nor on file in sched_key, or sched_key is nil); any
-- other value as it is (check_schedule judges it)
local function named_schedule(s, sched_key)
  if type(s) ~= 'table' or s.unit ~= nil or type(s.id) ~= 'string' then
    return s
  end
  local found = schedule_cache[s.id]
  if found == nil and sched_key then
    local raw = call('HGET', sched_key, s.id)
    if raw then
      local filed = decode(raw)
      if filed.id == s.id and not check_schedule(filed) then
        cache_schedule(filed)
        found = filed
      end
    end
  end
  return found
end

-- replaces the schedule references of a request by the schedules; false when one is not known here (the
-- caller answers need_schedules and the request comes again with them in full)
local function resolve_schedules(req, sched_key)
  if not present(req.msccs) then
    return true
  end
  for _, m in ipairs(req.msccs) do
    if type(m) == 'table' then
      local s = named_schedule(m.schedule, sched_key)
      if s == nil then return false end
      m.schedule = s
      if present(m.next_schedule) then
        s = named_schedule(m.next_schedule, sched_key)
        if s == nil then return false end
        m.next_schedule = s
      end
    end
  end
  return true
end

-- a schedule checked once: one named by reference is the kept (checked) table; a full one with an id is kept
local function checked_schedule(s)
  if type(s) == 'table' and s.id ~= nil and schedule_cache[s.id] == s then
    return nil
  end
  local err = check_schedule(s)
  if not err and s.id ~= nil then
    cache_schedule(s)
  end
  return err
end

local NEED_SCHEDULES = '{"result_code":0,"need_schedules":true}'

-- checks shared by charge and event requests (fills omitted defaults); an error text or nil
local function check_request(req)
  if type(req.session_id) ~= 'string' or type(req.msisdn) ~= 'string' or type(req.plan) ~= 'string' then
    return 'request ids'
  end
  if not non_negative(req.request_number) or not is_int(req.now_ms) then return 'request_number or now_ms' end
  if not present(req.msccs) then req.msccs = {} end
  if not present(req.context) then req.context = {} end
  if not present(req.end_to_end) then req.end_to_end = 0 end
  if not present(req.origin_host) then req.origin_host = '' end
  if not present(req.command_level) then req.command_level = false end
  if type(req.context) ~= 'table' or type(req.origin_host) ~= 'string' or not is_int(req.end_to_end) then
    return 'context, origin_host or end_to_end'
  end
  local keys = req.rating_keys
  if not present(keys) then
    req.rating_keys = {}
  elseif type(keys) ~= 'table' or (keys.plmn ~= nil and type(keys.plmn) ~= 'string')
    or (keys.destination ~= nil and type(keys.destination) ~= 'string') then
    return 'rating_keys'
  end
  for _, m in ipairs(req.msccs) do
    if not is_int(m.rating_group) then return 'rating_group' end
    if present(m.service_id) and not is_int(m.service_id) then return 'service_id' end
    if present(m.reporting_reason) and not is_int(m.reporting_reason) then return 'reporting_reason' end
    if check_units(m.used) or check_units(m.requested_units) or check_units(m.used_before)
      or check_units(m.used_after) or check_units(m.used_indeterminate) then
      return 'units'
    end
    local err = checked_schedule(m.schedule)
    if err then return err end
    if not present(m.periods) then m.periods = {} end
    if not present(m.next_periods) then m.next_periods = {} end
    if present(m.tariff_change_ms) then
      if not is_int(m.tariff_change_ms) then return 'tariff_change_ms' end
      if not present(m.next_schedule) then m.next_schedule = m.schedule end
    else
      m.tariff_change_ms = nil
      m.next_schedule = nil
    end
    if m.next_schedule and m.next_schedule ~= m.schedule then
      err = checked_schedule(m.next_schedule)
      if err then return 'next ' .. err end
    end
    if type(m.periods) ~= 'table' or type(m.next_periods) ~= 'table' then return 'periods' end
    if missing_period(m.schedule, m.periods) or (m.next_schedule and missing_period(m.next_schedule,
      m.next_periods)) then
      return 'periods (a period key the schedule counts over is missing)'
    end
  end
  return nil
end

-- ---- pricing (ratecards/pricing.py computes exactly the same) ------------------------------------------

-- the one rounding point: a raw micro-unit amount to a whole number of minor units
local function round_minor(a, minor, mode)
  if minor <= 1 then
    return a
  end
  local q = idiv(a, minor)
  local r = a - q * minor
  if r == 0 then
    return a
  end
  if mode == 'up' then
    q = q + 1
  elseif mode == 'half-up' then
    if 2 * r >= minor then q = q + 1 end
  elseif mode == 'half-even' then
    if 2 * r > minor or (2 * r == minor and q % 2 == 1) then q = q + 1 end
  end
  return q * minor
end

-- price of n whole increments, rounded
local function price_increments(s, n)
  if n <= 0 then
    return 0
  end
  return round_minor(ceil_div(n * s.price_num, s.price_den), s.minor, s.rounding)
end

-- price of a number of units: n = ceil(units / increment) increments
local function price_units(s, units)
  if units <= 0 then
    return 0
  end
  return price_increments(s, ceil_div(units, s.increment))
end

-- the largest k in [0, kmax] whose price fits in money (price is monotonic in k: binary search)
local function affordable_increments(s, money, kmax)
  if kmax <= 0 or money < 0 then
    return 0
  end
  if price_increments(s, kmax) <= money then
    return kmax
  end
  local lo, hi = 0, kmax
  while hi - lo > 1 do
    local mid = lo + idiv(hi - lo, 2)
    if price_increments(s, mid) <= money then
      lo = mid
    else
      hi = mid
    end
  end
  return lo
end

-- ---- extended pricing (ratecards/pricing.py, items 1-5: the same functions, the same integers) ----------

-- ceil(c × num / den) without forming c × num (pricing._price_count); r × num < 2^53 by the rate-card checks
local function price_count(c, num, den)
  local q = idiv(c, den)
  local r = c - q * den
  return q * num + ceil_div(r * num, den)
end

-- micro-units (before rounding) of n increments over the base price and the graduated tiers
local function raw_for_increments(s, n)
  if n <= 0 then
    return 0
  end
  local tiers = s.tiers
  if #tiers == 0 then
    return price_count(n, s.price_num, s.price_den)
  end
  local raw, start, num, den = 0, 0, s.price_num, s.price_den
  for _, t in ipairs(tiers) do
    if n <= t[1] then
      break
    end
    raw = raw + price_count(t[1] - start, num, den)
    start, num, den = t[1], t[2], t[3]
  end
  return raw + price_count(n - start, num, den)
end

-- C(U): the cumulative charge of U units counted from the start of the scope (pricing.amount_for_units)
local function cumulative_amount(s, units)
  if units <= s.free_units then
    return 0
  end
  local n = ceil_div(units - s.free_units, s.increment)
  if s.first_increment > 0 and n * s.increment < s.first_increment then
    n = idiv(s.first_increment, s.increment)
  end
  local raw = raw_for_increments(s, n)
  if raw < s.minimum_charge then
    raw = s.minimum_charge
  end
  return round_minor(raw + s.setup_fee, s.minor, s.rounding)
end

-- what a report of `units` costs after `used` units of the scope and `spent` micro-units of the cap period
-- (pricing.charge_for_usage): C(used + units) - C(used), at most what the cap leaves
local function charge_for_usage(s, units, used, spent)
  if units <= 0 then
    return 0
  end
  local a = cumulative_amount(s, used + units) - cumulative_amount(s, used)
  if s.cap > 0 then
    local room = s.cap - spent
    if room <= 0 then
      a = 0
    elseif room < a then
      a = room
    end
  end
  return a
end

-- ---- counters (pricing.py item 7) and rating views ------------------------------------------------------
-- use:{p}:<msisdn> holds per subscriber × rating group: '<rg>:<period key>' units of a day/week/month scope
-- priced in money, '<rg>:cap:<period key>' micro-units charged in the cap period, '<rg>:fu:<period key>'
-- every unit used (allowances too) in the fair-usage period. The key comes from Python (Rater.period_key);
-- writing a period's field deletes the same counter's older periods. The session scope counts in the
-- reservation ('c' in r:<rg>), carried over from grant to grant. Loaded on first use, saved once.

local function counters(key)
  return { key = key, v = nil, dirty = {} }
end

local function counter(cs, field)
  if not cs.v then
    cs.v = {}
    local flat = call('HGETALL', cs.key)
    for i = 1, #flat, 2 do
      cs.v[flat[i]] = tonumber(flat[i + 1])
    end
  end
  return cs.v[field] or 0
end

local function count(cs, field, delta)
  if delta ~= 0 then
    local before = counter(cs, field)
    cs.v[field] = before + delta
    cs.dirty[field] = true
  end
end

-- writes the changed counters; a counter's field of an older period than another of the same counter (same
-- '<rg>:[cap:|fu:]' prefix and key length, ISO keys compare as text) is deleted
local function counters_save(cs)
  if not next(cs.dirty) then
    return
  end
  local set, del, newest = {}, {}, {}
  for field in pairs(cs.v) do
    local cut = #field
    while cut > 0 and byte(field, cut) ~= 58 do cut = cut - 1 end -- the last ':'
    local counter_id = strsub(field, 1, cut) .. '#' .. int(#field)
    local best = newest[counter_id]
    if not best then
      newest[counter_id] = field
    elseif best < field then
      del[#del + 1] = best
      newest[counter_id] = field
    else
      del[#del + 1] = field
    end
  end
  for _, field in ipairs(del) do
    cs.dirty[field] = nil
  end
  for field in pairs(cs.dirty) do
    set[#set + 1] = field
    set[#set + 1] = int(cs.v[field])
  end
  if #set > 0 then
    call('HSET', cs.key, unpack_(set))
  end
  if #del > 0 then
    call('HDEL', cs.key, unpack_(del))
  end
end

-- A view rates units with one schedule at one set of period keys: {s, cs (counters), sess ({c = session
-- units}), uf / cf / ff (counter fields of the scope, the cap and fair usage, or nil)}
local function view_of(s, periods, rg, cs, sess)
  local v = { s = s, cs = cs, sess = sess }
  local r = int(rg)
  if PERIODS[s.scope] then v.uf = r .. ':' .. (periods[s.scope] or '') end
  if s.cap > 0 then v.cf = r .. ':cap:' .. (periods[s.cap_period] or '') end
  if s.fair_usage_units > 0 then v.ff = r .. ':fu:' .. (periods[s.fair_usage_period] or '') end
  return v
end

-- units of the scope rated before (pricing's used_before) and money charged in the cap period (spent_before)
local function view_used(v)
  if v.s.scope == 'session' then return v.sess.c end
  if v.uf then return counter(v.cs, v.uf) end
  return 0
end

-- what `units` priced in money cost under the view: the spine's price_units, or charge_for_usage
local function view_charge(v, units)
  local s = v.s
  if not s.ext then
    return price_units(s, units)
  end
  return charge_for_usage(s, units, view_used(v), v.cf and counter(v.cs, v.cf) or 0)
end

-- the largest k in [0, kmax] whose charge fits in money (charge monotone in k: binary search, as
-- pricing.affordable_usage)
local function view_affordable(v, money, kmax)
  local s = v.s
  if not s.ext then
    if s.price_num == 0 then return kmax end
    return affordable_increments(s, money, kmax)
  end
  if kmax <= 0 then
    return 0
  end
  local used, spent = view_used(v), v.cf and counter(v.cs, v.cf) or 0
  local full = charge_for_usage(s, kmax * s.increment, used, spent)
  if full <= money or full == 0 then
    return kmax
  end
  if money < 0 then
    return 0
  end
  local lo, hi = 0, kmax
  while hi - lo > 1 do
    local mid = lo + idiv(hi - lo, 2)
    if charge_for_usage(s, mid * s.increment, used, spent) <= money then
      lo = mid
    else
      hi = mid
    end
  end
  return lo
end

-- usage rated under the view: `units` priced in money (charged `amount`) advance the scope and cap counters
local function view_advance(v, units, amount)
  local s = v.s
  if units > 0 then
    if s.scope == 'session' then
      v.sess.c = v.sess.c + units
    elseif v.uf then
      count(v.cs, v.uf, units)
    end
  end
  if v.cf then
    count(v.cs, v.cf, amount)
  end
end

-- the units a grant may still take before the fair-usage limit of the views (nil: no limit)
local function fair_usage_room(views)
  local room = nil
  for _, v in ipairs(views) do
    if v.ff then
      local left = v.s.fair_usage_units - counter(v.cs, v.ff)
      if left < 0 then left = 0 end
      if not room or left < room then room = left end
    end
  end
  return room
end

-- a Units table read in the schedule's unit; nil when it holds no value of that unit
local function units_in(unit, u)
  if not present(u) then
    return nil
  end
  if unit == 'bytes' then
    if present(u.total) then return u.total end
    if present(u.input) or present(u.output) then
      return (present(u.input) and u.input or 0) + (present(u.output) and u.output or 0)
    end
    return nil
  elseif unit == 'seconds' then
    if present(u.time) then return u.time end
    return nil
  end
  if present(u.units) then return u.units end
  return nil
end

-- a granted Units object (JSON) in the schedule's unit
local function units_json(unit, n)
  return '{"' .. PRICED[unit] .. '":' .. int(n) .. '}'
end

-- the Units object (JSON) of a session grant: `granted` priced units, and each also_grant unit type at the
-- requested value (when the Requested-Service-Unit names it) or its default, at most its max, and in the
-- priced unit's dimension (input/output octets of a bytes rate) at most the priced grant
local function grant_json(s, granted, requested)
  if #s.also_grant == 0 then
    return units_json(s.unit, granted)
  end
  local p = { '"' .. PRICED[s.unit] .. '":' .. int(granted) }
  for _, g in ipairs(s.also_grant) do
    local kind, n = g[1], g[2]
    local asked = present(requested) and requested[kind]
    if asked and asked ~= null and asked > 0 then
      n = asked
    end
    n = min(n, g[3])
    if s.unit == 'bytes' and (kind == 'input' or kind == 'output') then
      n = min(n, granted)
    end
    p[#p + 1] = '"' .. kind .. '":' .. int(n)
  end
  return '{' .. concat(p, ',') .. '}'
end

-- ---- buckets -------------------------------------------------------------------------------------------
-- A balance hash (bal:{p}:<msisdn>, or grp:{p}:<group> for the buckets a sharing group's members share)
-- holds per bucket:
--   '<id>'             balance (money in micro-units, allowances in units), reservations included
--   '<id>:r'           reserved by open sessions (deleted at 0)
--   '<id>:m'           metadata JSON; absent for the spine's buckets (then the schedule names them:
--                      money_bucket, allowances). Keys: unit ('money', 'bytes', 'seconds', 'events' or a
--                      service-specific unit name, counted like events), priority (lower first; default
--                      100), valid_from / valid_until (epoch ms, [from, until)), services (rating groups;
--                      absent = every rating group priced in the unit), rollover {cap, into, validity_ms,
--                      rolled = carried so far}, credit_limit (money: may be drawn down to -limit),
--                      member_limits {msisdn: units} (shared buckets)
--   '<id>:c:<msisdn>'  shared buckets: units the member has used from it
--   '<id>:h:<msisdn>'  shared buckets: units the member's sessions hold now (deleted at 0)
-- A function reads each hash once into a wallet table, changes the table, and writes the changed fields
-- back once at the end (absolute values: the call is atomic).
-- A purse is what one subscriber can draw from: its wallet and, for a group member, the group's wallet.
-- A bucket reference ('ref') names a bucket of the purse: 'data' is the subscriber's, '@data' the group's.
-- Reservations ('r:<rg>' "b"), CDR "bucket" maps and ledger entries use refs.

local DEFAULT_PRIORITY = 100
local FOREVER = 9e15 -- later than any valid_until

-- Decoded metadata, by its JSON text: a pure function of the text, kept between calls (bounded) because the
-- same few texts are read on every charge. The tables are shared: never change one in place; meta_edit()
-- gives a private copy.
local meta_cache, meta_cached, META_CACHE_MAX = {}, 0, 20000

local function meta_of(raw)
  local meta = meta_cache[raw]
  if not meta then
    meta = decode(raw)
    if meta_cached >= META_CACHE_MAX then
      meta_cache, meta_cached = {}, 0
    end
    meta_cache[raw] = meta
    meta_cached = meta_cached + 1
  end
  return meta
end

local function wallet(key)
  local flat = call('HGETALL', key)
  local v, m = {}, nil
  for i = 1, #flat, 2 do
    local x = tonumber(flat[i + 1])
    if x then
      v[flat[i]] = x
    else -- '<id>:m'
      if not m then m = {} end
      m[strsub(flat[i], 1, -3)] = meta_of(flat[i + 1])
    end
  end
  return { key = key, v = v, m = m, dirty = {}, mdirty = nil }
end

local function wadd(w, field, delta)
  if delta ~= 0 then
    w.v[field] = (w.v[field] or 0) + delta
    w.dirty[field] = true
  end
end

local function wmeta(w, id, meta)
  if not w.m then w.m = {} end
  w.m[id] = meta
  if not w.mdirty then w.mdirty = {} end
  w.mdirty[id] = true
end

-- a bucket's metadata to change: a copy (nested tables copied too), registered as the wallet's and written
-- back by wsave; an empty table for a bucket without metadata
local function meta_edit(w, id)
  local old = w.m and w.m[id]
  local new = {}
  if old then
    for key, value in pairs(old) do
      if type(value) == 'table' then
        local copy = {}
        for k2, v2 in pairs(value) do copy[k2] = v2 end
        value = copy
      end
      new[key] = value
    end
  end
  wmeta(w, id, new)
  return new
end

-- removes a bucket with its reservation, metadata and member counters
local function wdrop(w, id)
  local prefix = id .. ':'
  local n = #prefix
  for field in pairs(w.v) do
    if field == id or string.sub(field, 1, n) == prefix then
      w.v[field] = nil
      w.dirty[field] = true
    end
  end
  if w.m and w.m[id] then
    wmeta(w, id, nil)
  end
end

local function wsave(w)
  if not w then return end
  local set, del = {}, {}
  for field in pairs(w.dirty) do
    local value = w.v[field]
    if value == nil or (value == 0 and (string.sub(field, -2) == ':r' or string.find(field, ':h:', 1, true))) then
      del[#del + 1] = field
    else
      set[#set + 1] = field
      set[#set + 1] = int(value)
    end
  end
  if w.mdirty then
    for id in pairs(w.mdirty) do
      local meta = w.m[id]
      if meta then
        set[#set + 1] = id .. ':m'
        set[#set + 1] = jval(meta)
      else
        del[#del + 1] = id .. ':m'
      end
    end
  end
  if #set > 0 then
    call('HSET', w.key, unpack_(set))
  end
  if #del > 0 then
    call('HDEL', w.key, unpack_(del))
  end
end

local function purse(own, grp, msisdn, group)
  return { own = own, grp = grp, msisdn = msisdn, group = group or '' }
end

-- what the purse may still draw from a bucket: balance - reserved (+ credit limit), within the member's limit
-- for a shared bucket; never below 0
local function available(p, ref)
  local w, id, shared = p.own, ref, false
  if byte(ref, 1) == 64 then -- '@': the group's
    w, id, shared = p.grp, strsub(ref, 2), true
    if not w then return 0 end
  end
  local v = w.v
  local a = (v[id] or 0) - (v[id .. ':r'] or 0)
  local m = w.m
  local meta = m and m[id]
  if meta then
    local limit = meta.credit_limit
    if limit and limit ~= null then
      a = a + limit
    end
    local limits = shared and meta.member_limits
    if limits and limits ~= null then
      local cap = limits[p.msisdn]
      if cap and cap ~= null then
        local left = cap - (v[id .. ':c:' .. p.msisdn] or 0) - (v[id .. ':h:' .. p.msisdn] or 0)
        if left < a then a = left end
      end
    end
  end
  if a < 0 then
    return 0
  end
  return a
end

-- reserve (amount > 0) or release (amount < 0)
local function hold(p, ref, amount)
  if byte(ref, 1) == 64 then
    local w, id = p.grp, strsub(ref, 2)
    if w then
      wadd(w, id .. ':r', amount)
      wadd(w, id .. ':h:' .. p.msisdn, amount)
    end
  else
    wadd(p.own, ref .. ':r', amount)
  end
end

-- debit (usage)
local function debit(p, ref, amount)
  if byte(ref, 1) == 64 then
    local w, id = p.grp, strsub(ref, 2)
    if w then
      wadd(w, id, -amount)
      wadd(w, id .. ':c:' .. p.msisdn, amount)
    end
  else
    wadd(p.own, ref, -amount)
  end
end

-- a session reservation ('r:<rg>' value: {"u": granted units, "b": {ref: amount}, "f": state, ...; see
-- charge.lua}) back to the purse; returns its final-units state (0 none, 1 final units granted under
-- REDIRECT/RESTRICT_ACCESS, 2 restricted: the final units are used, nothing held), what it held ({ref:
-- amount}, or nil) and the decoded reservation
local function release(p, raw)
  if raw then
    local r = decode(raw)
    for ref, amount in pairs(r.b) do
      hold(p, ref, -amount)
    end
    if r.f and r.f ~= null then
      return r.f, r.b, r
    end
    return 0, r.b, r
  end
  return 0, nil, nil
end

-- does a bucket with metadata serve rating group rg of schedule s? (validity is checked by the caller)
local function serves(meta, s, rg, own_id)
  local unit = meta.unit
  if unit == 'money' then
    if own_id == s.money_bucket then return true end
  elseif unit ~= s.unit and (s.unit ~= 'events' or UNIT_KINDS[unit]) then
    return false
  end
  local services = meta.services
  if services == nil or services == null then
    return true
  end
  for _, x in ipairs(services) do
    if x == rg then return true end
  end
  return false
end

local function before(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  if a[3] ~= b[3] then return a[3] < b[3] end
  if a[4] ~= b[4] then return a[4] < b[4] end
  return a[1] < b[1]
end

-- {ref, priority, valid_until, rank} entries sorted (an insertion sort: a subscriber has a handful of buckets)
-- into a list of refs
local function refs_of(list)
  for i = 2, #list do
    local e = list[i]
    local j = i - 1
    while j > 0 and before(e, list[j]) do
      list[j + 1] = list[j]
      j = j - 1
    end
    list[j + 1] = e
  end
  for i = 1, #list do
    list[i] = list[i][1]
  end
  return list
end

-- The buckets rating group rg draws from, in consumption order (priority, then earliest expiry, then the
-- schedule's order, the subscriber's own before the group's): {allow = refs, money = refs, grace = nil or
-- {ref: cap}}. Buckets outside their validity window are left out, except an expired bucket a released
-- reservation held (`held`, {ref: amount}): the grant was made while it was valid, so usage reported after
-- the expiry may still be paid from it, up to what was held (grace; never for a new grant).
local function sources(p, s, rg, now, held)
  local own, grp = p.own, p.grp
  if not own.m and not grp then -- the spine's buckets: the schedule says which
    return { allow = s.allowances, money = { s.money_bucket } }
  end
  local allow, money, grace = {}, {}, nil
  for i, id in ipairs(s.allowances) do
    if not (own.m and own.m[id]) then
      allow[#allow + 1] = { id, DEFAULT_PRIORITY, FOREVER, i }
    end
  end
  if not (own.m and own.m[s.money_bucket]) then
    money[1] = { s.money_bucket, DEFAULT_PRIORITY, FOREVER, 1e9 }
  end
  for pass = 1, 2 do
    local w = pass == 1 and own or grp
    if w and w.m then
      for id, meta in pairs(w.m) do
        if serves(meta, s, rg, pass == 1 and id) then
          local ref = pass == 1 and id or '@' .. id
          local from, till = meta.valid_from, meta.valid_until
          local usable = from == nil or from == null or from <= now
          if till == nil or till == null then
            till = FOREVER
          elseif usable and till <= now then
            local cap = held and held[ref]
            usable = cap ~= nil
            if usable then
              if not grace then grace = {} end
              grace[ref] = cap
            end
          end
          if usable then
            local priority = meta.priority
            if priority == nil or priority == null then priority = DEFAULT_PRIORITY end
            local e = { ref, priority, till, pass == 1 and 0 or 1e9 + 1 }
            if meta.unit == 'money' then
              money[#money + 1] = e
            else
              allow[#allow + 1] = e
            end
          end
        end
      end
    end
  end
  return { allow = refs_of(allow), money = refs_of(money), grace = grace }
end

-- what may be drawn from a source: its availability, for an expired bucket at most its grace, and nothing
-- from an expired bucket for a new grant
local function usable(p, src, ref, for_grant)
  local a = available(p, ref)
  local grace = src.grace
  if grace then
    grace = grace[ref]
    if grace then
      if for_grant then return 0 end
      if grace < a then return grace end
    end
  end
  return a
end

-- takes up to `want` units from the allowance buckets in order; returns the ordered {ref, units} list and
-- the units still wanted. `apply` debits them.
local function from_allowances(p, src, want, apply, for_grant)
  local rest = want
  local taken = {}
  for _, ref in ipairs(src.allow) do
    if rest <= 0 then
      break
    end
    local take = min(usable(p, src, ref, for_grant), rest)
    if take > 0 then
      taken[#taken + 1] = { ref, take }
      rest = rest - take
      if apply then
        debit(p, ref, take)
      end
    end
  end
  return taken, rest
end

-- money available to a rating group (all its money buckets)
local function money_available(p, src, for_grant)
  local total = 0
  for _, ref in ipairs(src.money) do
    total = total + usable(p, src, ref, for_grant)
  end
  return total
end

-- an amount of money split over the money buckets in order, each up to what it has; what they do not
-- cover goes to `overflow` (committed usage: it happened, the balance may go below its floor). Appends
-- {ref, amount} to `list`; `apply` debits.
local function from_money(p, src, amount, list, apply, for_grant, overflow)
  local left = amount
  local first = #list + 1
  for _, ref in ipairs(src.money) do
    if left <= 0 then
      break
    end
    local take = min(usable(p, src, ref, for_grant), left)
    if take > 0 then
      list[#list + 1] = { ref, take }
      left = left - take
      if apply then debit(p, ref, take) end
    end
  end
  if left > 0 and overflow then
    local merged = false
    for i = first, #list do
      if list[i][1] == overflow then
        list[i][2] = list[i][2] + left
        merged = true
      end
    end
    if not merged then
      list[#list + 1] = { overflow, left }
    end
    if apply then debit(p, overflow, left) end
    left = 0
  end
  return left
end

-- adds an ordered {ref, amount} list into another, merging refs already there (order of first appearance)
local function merge_taken(list, add)
  for _, kv in ipairs(add) do
    local merged = false
    for _, x in ipairs(list) do
      if x[1] == kv[1] then
        x[2] = x[2] + kv[2]
        merged = true
        break
      end
    end
    if not merged then
      list[#list + 1] = { kv[1], kv[2] }
    end
  end
end

-- committed usage of one part (a usage report, or one side of a Tariff-Time-Change): allowances first, the
-- rest priced in money by the dearest of the views (pricing.dearer_charge), whose scope and cap counters it
-- advances; its fair-usage counter counts every unit. Adds what was taken to `taken` (ordered {ref, amount}).
-- Returns the money amount and the view that priced it.
local function commit_part(p, views, src, units, taken)
  local got, rest = from_allowances(p, src, units, true, false)
  local v = views[1]
  local amount = view_charge(v, rest)
  for i = 2, #views do
    local a = view_charge(views[i], rest)
    if a > amount then
      v, amount = views[i], a
    end
  end
  view_advance(v, rest, amount)
  if v.ff then
    count(v.cs, v.ff, units)
  end
  if amount ~= 0 then
    from_money(p, src, amount, got, true, false, v.s.money_bucket)
  end
  merge_taken(taken, got)
  return amount, v
end

-- what a grant of `want` units would hold, allowances first then whole affordable increments of money
-- (none when allowance_only: a rating group served only from bundles); changes nothing. With several views
-- (a grant spanning a Tariff-Time-Change) the money part is what every one of them affords
-- (pricing.affordable_for_all), held at the dearest. Returns granted units, the ordered {ref, amount} list,
-- money amount, allowance units.
local function plan_grant(p, views, src, want, allowance_only)
  local held, left = from_allowances(p, src, want, false, true)
  local allowance_units = want - left
  local money_units, money = 0, 0
  local s = views[1].s
  if left <= 0 or allowance_only then
    money_units = 0
  elseif #views == 1 and not s.ext then -- the spine
    if s.price_num == 0 then
      money_units = left
    else
      local k = affordable_increments(s, money_available(p, src, true), ceil_div(left, s.increment))
      money_units = min(left, k * s.increment)
      money = price_increments(s, k)
    end
  else
    local avail = money_available(p, src, true)
    money_units = left
    for _, v in ipairs(views) do
      local inc = v.s.increment
      local units = min(left, view_affordable(v, avail, ceil_div(left, inc)) * inc)
      if units < money_units then money_units = units end
    end
    for _, v in ipairs(views) do
      local a = view_charge(v, money_units)
      if a > money then money = a end
    end
  end
  if money > 0 then
    from_money(p, src, money, held, false, true, nil)
  end
  return allowance_units + money_units, held, money, allowance_units
end

-- what an all-or-nothing debit of `units` would take (allowances first, none from money when
-- allowance_only): the ordered {ref, amount} list, the money amount, whether it fits in the available money,
-- and the units priced in money; changes nothing
local function plan_debit(p, v, src, units, allowance_only)
  local taken, rest = from_allowances(p, src, units, false, true)
  if allowance_only then
    return taken, 0, rest == 0, 0
  end
  local amount = view_charge(v, rest)
  local short = 0
  if amount > 0 then
    short = from_money(p, src, amount, taken, false, true, nil)
  end
  return taken, amount, short == 0, rest
end

-- does a live allowance bucket with units left serve the rating group? (requires_bucket)
local function has_allowance(p, src)
  for _, ref in ipairs(src.allow) do
    if usable(p, src, ref, true) > 0 then
      return true
    end
  end
  return false
end

-- ---- the ledger (XADD ledger:{pNNN}): every balance change, written by the function that makes it -------
-- Fields: type, msisdn ('' for a group's own entries), amount (signed change of `bucket`; usage: the money
-- amount of the records), reference, time, and when needed: bucket (absent = 'money'), b (JSON {ref: signed
-- change} when several buckets change: provision), r (usage: JSON {"<rating group>": {ref: signed change}}),
-- group (the group of '@' refs, or of a group's own entry), reason (adjustments), unit (of `bucket`, when it
-- has metadata) or u (JSON {bucket: unit}: provision), so the unit of a bucket is known after it is gone.

local function ledger_add(key, kind, msisdn, group, bucket, amount, reference, now, b, reason, unit)
  local args = { 'type', kind, 'msisdn', msisdn, 'amount', int(amount), 'reference', reference, 'time', int(now) }
  if bucket and bucket ~= 'money' then
    args[#args + 1] = 'bucket'
    args[#args + 1] = bucket
  end
  if unit and unit ~= null then
    args[#args + 1] = 'unit'
    args[#args + 1] = unit
  end
  if b then
    args[#args + 1] = 'b'
    args[#args + 1] = b
  end
  if group and group ~= '' then
    args[#args + 1] = 'group'
    args[#args + 1] = group
  end
  if reason and reason ~= '' then
    args[#args + 1] = 'reason'
    args[#args + 1] = reason
  end
  call('XADD', key, '*', unpack_(args))
end

-- the ledger entry of a request's usage records: type "usage", reference '<session-id>;<request-number>' (the
-- records' recordIds are '<reference>;<rating group>'), amount = their money amounts summed, r = JSON
-- {"<rating group>": {ref: -amount taken}}; group when a '@' ref is in it. debits: {rating group, money
-- amount, {ref, amount} list} per record.
local function usage_entry(key, msisdn, group, reference, debits, now)
  local order, by_rg, total, shared = {}, {}, 0, false
  for _, d in ipairs(debits) do -- a rating group twice in one request is one record id: merged
    local rg = d[1]
    local changes = by_rg[rg]
    if not changes then
      changes = { refs = {}, v = {} }
      by_rg[rg] = changes
      order[#order + 1] = rg
    end
    for _, kv in ipairs(d[3]) do
      local ref = kv[1]
      if not changes.v[ref] then
        changes.refs[#changes.refs + 1] = ref
        changes.v[ref] = 0
      end
      changes.v[ref] = changes.v[ref] - kv[2]
      if byte(ref, 1) == 64 then shared = true end
    end
    total = total + d[2]
  end
  local records = {}
  for i, rg in ipairs(order) do
    local changes, p = by_rg[rg], {}
    for j, ref in ipairs(changes.refs) do
      p[j] = encode(ref) .. ':' .. int(changes.v[ref])
    end
    records[i] = '"' .. int(rg) .. '":{' .. concat(p, ',') .. '}'
  end
  local r = '{' .. concat(records, ',') .. '}'
  if shared then
    call('XADD', key, '*', 'type', 'usage', 'msisdn', msisdn, 'amount', int(total), 'reference', reference,
      'time', int(now), 'r', r, 'group', group)
  else
    call('XADD', key, '*', 'type', 'usage', 'msisdn', msisdn, 'amount', int(total), 'reference', reference,
      'time', int(now), 'r', r)
  end
end

-- when the wallet's next bucket ends (its score in bexp:{p}), or nil: the earliest valid_until after now; a
-- bucket that has ended but is still held by a session (settle left it) is due again at the next sweep
local function next_expiry(w, now)
  local first = nil
  if w.m then
    for _, meta in pairs(w.m) do
      local till = meta.valid_until
      if till and till ~= null then
        if till <= now then till = now + 1 end
        if not first or till < first then first = till end
      end
    end
  end
  return first
end

-- Expiry and rollover of one wallet's buckets whose validity ended (valid_until <= now): the part nobody
-- holds (balance - reserved) leaves the bucket. With a rollover rule, up to its cap (less what earlier passes
-- carried) moves into the `into` bucket (default '<id>.rollover': created valid for the next period, the same
-- length as this one or validity_ms, same unit, priority and services), the rest is expired. A bucket with
-- nothing left and nothing held is removed. Buckets without a rollover rule go first, so a rollover bucket
-- of the previous period is expired before this period's carry arrives. Ledger: "expiry" (negative),
-- "rollover" out of the old bucket (negative, reference = the target) and into the target (positive,
-- reference = the old bucket). ctx: {ledger, bexp, now}; owner/group: the ledger's msisdn/group fields,
-- member: the bexp member ('m:<msisdn>' / 'g:<group>'). Returns the number of ledger entries written.
local function settle(w, ctx, owner, group, member)
  local m = w.m
  if not m then
    return 0
  end
  local now = ctx.now
  local due = nil
  for id, meta in pairs(m) do
    local till = meta.valid_until
    if till and till ~= null and till <= now then
      if not due then due = {} end
      local rolls = meta.rollover and meta.rollover ~= null
      due[#due + 1] = { id, rolls and 1 or 0, till }
    end
  end
  if not due then
    return 0
  end
  table.sort(due, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    if a[3] ~= b[3] then return a[3] < b[3] end
    return a[1] < b[1]
  end)
  local entries = 0
  local v = w.v
  for _, d in ipairs(due) do
    local id = d[1]
    local meta = m[id]
    local rest = (v[id] or 0) - (v[id .. ':r'] or 0)
    if rest > 0 then
      local rule = meta.rollover
      if rule and rule ~= null then
        local rolled = present(meta.rolled) and meta.rolled or 0
        local carry = min(rest, math.max((present(rule.cap) and rule.cap or 0) - rolled, 0))
        if carry > 0 then
          local target = present(rule.into) and rule.into or id .. '.rollover'
          local tm = m[target]
          local till = meta.valid_until
          if tm and present(tm.valid_until) and tm.valid_until <= now then
            target = target .. '.' .. int(till) -- the old one still holds reserved units
            tm = m[target]
          end
          if not tm then
            local length = rule.validity_ms
            if not present(length) and present(meta.valid_from) then
              length = till - meta.valid_from
            end
            tm = { unit = meta.unit, priority = meta.priority, services = meta.services, valid_from = till,
              member_limits = meta.member_limits }
            if present(length) and length > 0 then
              tm.valid_until = till + length
              call('ZADD', ctx.bexp, 'LT', int(tm.valid_until), member)
            end
            wmeta(w, target, tm)
          end
          wadd(w, id, -carry)
          wadd(w, target, carry)
          meta = meta_edit(w, id)
          meta.rolled = rolled + carry
          ledger_add(ctx.ledger, 'rollover', owner, group, id, -carry, target, now, nil, nil, meta.unit)
          ledger_add(ctx.ledger, 'rollover', owner, group, target, carry, id, now, nil, nil, tm.unit)
          entries = entries + 2
          rest = rest - carry
        end
      end
      if rest > 0 then
        wadd(w, id, -rest)
        ledger_add(ctx.ledger, 'expiry', owner, group, id, -rest, '', now, nil, nil, meta.unit)
        entries = entries + 1
      end
    end
    if (v[id] or 0) == 0 and (v[id .. ':r'] or 0) == 0 then
      wdrop(w, id)
    end
  end
  return entries
end

-- settles both wallets of a purse
local function settle_purse(p, ctx)
  local n = 0
  if p.own.m then
    n = settle(p.own, ctx, p.msisdn, nil, 'm:' .. p.msisdn)
  end
  if p.grp and p.grp.m then
    n = n + settle(p.grp, ctx, '', p.group, 'g:' .. p.group)
  end
  return n
end

-- ---- CDR records (XADD cdr:{pNNN} * r <json>; the CDR writer depends on this format) -------------------

-- Diameter Termination-Cause -> 3GPP 32.298 causeForRecClosing
local CLOSING_CAUSE = {
  [1] = 'normalRelease', [2] = 'abnormalRelease', [3] = 'abnormalRelease', [4] = 'managementIntervention',
  [5] = 'abnormalRelease', [6] = 'timeLimit', [7] = 'servingNodeChange', [8] = 'timeLimit',
}
local CONTEXT_FIELDS = { 'serviceContextId', 'chargingID', 'apn', 'servingNodePLMN', 'ratType', 'servedIMEISV' }

-- the members every record of a session shares but those the session hash has anyway (servedMSISDN,
-- sessionId, recordOpeningTime: record_parts adds them), rendered once at CCR-I and stored as the session's
-- 'cdr'; starts with ','
local function cdr_static(imsi, origin_host, ctx)
  if present(ctx.servedIMSI) then
    imsi = ctx.servedIMSI
  end
  local p = {}
  if present(imsi) and imsi then
    p[1] = ',"servedIMSI":' .. jval(imsi)
  end
  p[#p + 1] = ',"originHost":' .. encode(origin_host)
  for _, key in ipairs(CONTEXT_FIELDS) do
    local v = ctx[key]
    if present(v) then
      p[#p + 1] = ',"' .. key .. '":' .. jval(v)
    end
  end
  return concat(p)
end

-- what every record of one request shares: rec = {head = '{"recordId":"<sid>;<n>;', tail = the members
-- after recordType}; a record is head .. <rg or 'close'> .. '","recordType":"<type>"' .. tail .. <own members>.
-- `static` is cdr_static's text (a session written by an earlier version stored it with servedMSISDN,
-- sessionId and recordOpeningTime in it: used as it is); `opened` the session's creation (ms)
local function record_parts(static, msisdn, session_id, opened, n, now)
  local sid = encode(session_id)
  local id = strsub(sid, 1, -2) .. ';' .. int(n) .. ';'
  if byte(static, 1) == 44 then -- ','
    static = '"servedMSISDN":' .. encode(msisdn) .. static .. ',"sessionId":' .. sid .. ',"recordOpeningTime":'
      .. int(opened)
  end
  return {
    head = '{"recordId":' .. id,
    tail = ',"schemaVersion":1,' .. static .. ',"ccRequestNumber":' .. int(n) .. ',"recordTime":' .. int(now),
  }
end

-- the members of a rated record for the rating keys its schedule was chosen with (ChargeRequest.rating_keys,
-- or a reservation's "d" / "z"): "calledPartyAddress" (as received) and "ratingPlmn" (normalized MCC-MNC);
-- '' without keys
local function rating_keys_json(destination, plmn)
  local out = ''
  if present(destination) and destination ~= '' then out = ',"calledPartyAddress":' .. encode(destination) end
  if present(plmn) and plmn ~= '' then out = out .. ',"ratingPlmn":' .. encode(plmn) end
  return out
end

local function usage_json(u)
  local p = {}
  local v = u.time
  if v and v ~= null then p[#p + 1] = '"time":' .. int(v) end
  v = u.input
  if v and v ~= null then p[#p + 1] = '"octetsIn":' .. int(v) end
  v = u.output
  if v and v ~= null then p[#p + 1] = '"octetsOut":' .. int(v) end
  v = u.total
  if v and v ~= null then p[#p + 1] = '"octetsTotal":' .. int(v) end
  v = u.units
  if v and v ~= null then p[#p + 1] = '"units":' .. int(v) end
  return '{' .. concat(p, ',') .. '}'
end

-- the "bucketUnits" member of a record: the unit of each ref in `taken` (billing classifies by it). A bucket
-- with metadata has its unit; one without is the spine's: an allowance the schedule `s` names (the request's,
-- which chose the sources) is in the schedule's unit, any other is a money bucket. '' when nothing was taken.
local function bucket_units_json(p, s, taken)
  if #taken == 0 then
    return ''
  end
  local parts = {}
  for i, kv in ipairs(taken) do
    local ref = kv[1]
    local w, id = p.own, ref
    if byte(ref, 1) == 64 then -- '@': the group's
      w, id = p.grp, strsub(ref, 2)
    end
    local meta = w and w.m and w.m[id]
    local unit = meta and meta.unit
    if not present(unit) then
      unit = 'money'
      for _, a in ipairs(s.allowances) do
        if a == ref then
          unit = s.unit
          break
        end
      end
    end
    parts[i] = encode(ref) .. ':' .. encode(unit)
  end
  return ',"bucketUnits":{' .. concat(parts, ',') .. '}'
end

-- one usage / event / refund record for one MSCC; `usage` is a Units table; `taken` the ordered {ref, amount}
-- list (its units from the purse p: bucketUnits); `rated_at` and `keys`: when and with which rating keys
-- (rating_keys_json) the schedule that priced it was chosen (the grant's, or the request's own; rated_at nil:
-- unknown, omitted); `extra`: more members (JSON text starting with ',') or nil. A schedule of a named tariff
-- adds "tariff".
local function rated_record(cdr_key, record_type, rec, p, m, s, usage, amount, taken, rated_at, keys, extra)
  local rg = int(m.rating_group)
  local service, reason = '', ''
  if present(m.service_id) then
    service = ',"serviceIdentifier":' .. int(m.service_id)
  end
  if present(m.reporting_reason) then
    reason = ',"reportingReason":' .. int(m.reporting_reason)
  end
  call('XADD', cdr_key, '*', 'r', rec.head .. rg .. '","recordType":"' .. record_type .. '"' .. rec.tail
    .. ',"ratingGroup":' .. rg .. service .. ',"usage":' .. usage_json(usage) .. ',"amount":' .. int(amount)
    .. ',"currency":' .. encode(s.currency) .. ',"bucket":' .. buckets_json(taken)
    .. bucket_units_json(p, m.schedule, taken) .. ',"ratingVersion":' .. encode(s.version) .. reason
    .. ((s.tariff and s.tariff ~= '') and ',"tariff":' .. encode(s.tariff) or '') .. keys
    .. (rated_at and ',"ratedAt":' .. int(rated_at) or '') .. (extra or '') .. '}')
end

local function close_record(cdr_key, rec, cause, currency)
  call('XADD', cdr_key, '*', 'r', rec.head .. 'close","recordType":"close"' .. rec.tail
    .. ',"causeForRecClosing":' .. encode(cause) .. ',"amount":0,"currency":' .. encode(currency) .. '}')
end
