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
  return type, ipairs, pairs, tonumber, tostring, unpack, string, math, table, cjson, redis.call
end
local type, ipairs, pairs, tonumber, tostring, unpack, string, math, table, cjson, call
local fmt, floor, min, concat, encode, decode, null, unpack_

local function bind()
  type, ipairs, pairs, tonumber, tostring, unpack, string, math, table, cjson, call = capture()
  fmt, floor, min, concat = string.format, math.floor, math.min, table.concat
  encode, decode, null, unpack_ = cjson.encode, cjson.decode, cjson.null, unpack
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
  p[#p + 1] = '}'
  return concat(p)
end

-- extra: optional table with check_balance_result / stale_plan
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
  end
  p[#p + 1] = ',"end_to_end":' .. int(end_to_end) .. '}'
  return concat(p)
end

-- a stored outcome, re-sent unchanged except for the duplicate flag (string surgery keeps numbers exact)
local function as_duplicate(stored)
  return '{"duplicate":true,' .. string.sub(stored, 2)
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
  return nil
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
  for _, m in ipairs(req.msccs) do
    if not is_int(m.rating_group) then return 'rating_group' end
    if present(m.service_id) and not is_int(m.service_id) then return 'service_id' end
    if present(m.reporting_reason) and not is_int(m.reporting_reason) then return 'reporting_reason' end
    if check_units(m.used) or check_units(m.requested_units) then return 'units' end
    local err = check_schedule(m.schedule)
    if err then return err end
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
-- A function reads the bal: hash once into a wallet table, changes the table, and writes the changed fields
-- back once at the end (absolute values: the call is atomic). Fields: '<bucket>' = balance,
-- '<bucket>:r' = reserved; a reservation that drops to 0 is deleted.

local function wallet(key)
  local flat = call('HGETALL', key)
  local v = {}
  for i = 1, #flat, 2 do
    v[flat[i]] = tonumber(flat[i + 1])
  end
  return { key = key, v = v, dirty = {} }
end

local function wadd(w, field, delta)
  if delta ~= 0 then
    w.v[field] = (w.v[field] or 0) + delta
    w.dirty[field] = true
  end
end

-- balance - reserved of a bucket, never below 0
local function available(w, bucket)
  local a = (w.v[bucket] or 0) - (w.v[bucket .. ':r'] or 0)
  if a < 0 then
    return 0
  end
  return a
end

local function wsave(w)
  local set, del = {}, {}
  for field in pairs(w.dirty) do
    local value = w.v[field]
    if value == 0 and string.sub(field, -2) == ':r' then
      del[#del + 1] = field
    else
      set[#set + 1] = field
      set[#set + 1] = int(value)
    end
  end
  if #set > 0 then
    call('HSET', w.key, unpack_(set))
  end
  if #del > 0 then
    call('HDEL', w.key, unpack_(del))
  end
end

-- a session reservation ('r:<rg>' value: {"u": granted units, "b": {bucket: amount}, "f": state}) back to
-- the wallet; returns its final-units state: 0 none, 1 final units granted under REDIRECT/RESTRICT_ACCESS,
-- 2 restricted (the final units are used: no reservation, the gateway redirects or restricts the user)
local function release(w, raw)
  if raw then
    local r = decode(raw)
    for bucket, amount in pairs(r.b) do
      wadd(w, bucket .. ':r', -amount)
    end
    if r.f and r.f ~= null then
      return r.f
    end
  end
  return 0
end

-- takes up to `want` units from the allowance buckets in order (available units only); returns the ordered
-- {bucket, units} list and the units still wanted. `apply` debits them from the wallet.
local function from_allowances(w, s, want, apply)
  local rest = want
  local taken = {}
  for _, bucket in ipairs(s.allowances) do
    if rest <= 0 then
      break
    end
    local take = min(available(w, bucket), rest)
    if take > 0 then
      taken[#taken + 1] = { bucket, take }
      rest = rest - take
      if apply then
        wadd(w, bucket, -take)
      end
    end
  end
  return taken, rest
end

-- committed usage: allowances first, the rest priced in money (which may go negative: usage happened).
-- Returns the money amount and the ordered {bucket, amount} list of what was taken.
local function commit_usage(w, s, units)
  local taken, rest = from_allowances(w, s, units, true)
  local amount = price_units(s, rest)
  if amount ~= 0 then
    wadd(w, s.money_bucket, -amount)
    taken[#taken + 1] = { s.money_bucket, amount }
  end
  return amount, taken
end

-- what a grant of `want` units would hold, allowances first then whole affordable increments of money;
-- changes nothing. Returns granted units, the ordered {bucket, amount} list, money amount, allowance units.
local function plan_grant(w, s, want)
  local held, left = from_allowances(w, s, want, false)
  local allowance_units = want - left
  local money_units, money = 0, 0
  if left > 0 then
    if s.price_num == 0 then
      money_units = left
    else
      local k = affordable_increments(s, available(w, s.money_bucket), ceil_div(left, s.increment))
      money_units = min(left, k * s.increment)
      money = price_increments(s, k)
    end
  end
  if money > 0 then
    held[#held + 1] = { s.money_bucket, money }
  end
  return allowance_units + money_units, held, money, allowance_units
end

-- what an all-or-nothing debit of `units` would take (allowances first): the ordered {bucket, amount} list,
-- the money amount and whether it fits in the available money; changes nothing
local function plan_debit(w, s, units)
  local taken, rest = from_allowances(w, s, units, false)
  local amount = price_units(s, rest)
  if amount > 0 then
    taken[#taken + 1] = { s.money_bucket, amount }
  end
  return taken, amount, amount <= available(w, s.money_bucket)
end

-- ---- CDR records (XADD cdr:{pNNN} * r <json>; the CDR writer depends on this format) -------------------

-- Diameter Termination-Cause -> 3GPP 32.298 causeForRecClosing
local CLOSING_CAUSE = {
  [1] = 'normalRelease', [2] = 'abnormalRelease', [3] = 'abnormalRelease', [4] = 'managementIntervention',
  [5] = 'abnormalRelease', [6] = 'timeLimit', [7] = 'servingNodeChange', [8] = 'timeLimit',
}
local CONTEXT_FIELDS = { 'serviceContextId', 'chargingID', 'apn', 'servingNodePLMN', 'ratType', 'servedIMEISV' }

-- the members every record of a session shares, rendered once (at CCR-I; stored as the session's 'cdr')
local function cdr_static(msisdn, imsi, session_id, origin_host, ctx, opened)
  if present(ctx.servedIMSI) then
    imsi = ctx.servedIMSI
  end
  local p = { '"servedMSISDN":', encode(msisdn) }
  if present(imsi) and imsi then
    p[#p + 1] = ',"servedIMSI":' .. jval(imsi)
  end
  p[#p + 1] = ',"sessionId":' .. encode(session_id) .. ',"originHost":' .. encode(origin_host)
  for _, key in ipairs(CONTEXT_FIELDS) do
    local v = ctx[key]
    if present(v) then
      p[#p + 1] = ',"' .. key .. '":' .. jval(v)
    end
  end
  p[#p + 1] = ',"recordOpeningTime":' .. int(opened)
  return concat(p)
end

-- what every record of one request shares: rec = {head = '{"recordId":"<sid>;<n>;', tail = the members
-- after recordType}; a record is head .. <rg or 'close'> .. '","recordType":"<type>"' .. tail .. <own members>
local function record_parts(static, session_id, n, now)
  local id = encode(session_id .. ';' .. int(n) .. ';')
  return {
    head = '{"recordId":' .. string.sub(id, 1, -2),
    tail = ',"schemaVersion":1,' .. static .. ',"ccRequestNumber":' .. int(n) .. ',"recordTime":' .. int(now),
  }
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

-- one usage / event / refund record for one MSCC; `usage` is a Units table
local function rated_record(cdr_key, record_type, rec, m, s, usage, amount, taken)
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
    .. ',"currency":' .. encode(s.currency) .. ',"bucket":' .. buckets_json(taken) .. ',"ratingVersion":'
    .. encode(s.version) .. reason .. '}')
end

local function close_record(cdr_key, rec, cause, currency)
  call('XADD', cdr_key, '*', 'r', rec.head .. 'close","recordType":"close"' .. rec.tail
    .. ',"causeForRecClosing":' .. encode(cause) .. ',"amount":0,"currency":' .. encode(currency) .. '}')
end
