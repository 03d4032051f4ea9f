-- billshock.lua: bill-shock notifications for one ledger entry of one subscriber (ocs/billshock.py reads the
-- ledger with a consumer group and calls this once per entry). Applies the entry's effect on the notification
-- state, emits each threshold's notification once, and acknowledges the entry, all in this one call.
--
-- KEYS[1] ledger:{p}   KEYS[2] bal:{p}:<msisdn>   KEYS[3] bshock:{p}:<msisdn>   KEYS[4] notified:{p}:<msisdn>
-- KEYS[5] notify:{p}
-- ARGV[1] JSON {group, consumer, id (the ledger entry id), msisdn, time (the entry's, ms), credit (bool: the
--   entry's positive changes are credits: every type but usage and refund), changes [[bucket, change], ...]
--   (the subscriber's own buckets), spend (micro-units the entry spent), period ('2026-11-23' / '2026-11'),
--   percents [80, 100], spend_thresholds [micro-units, ...]}
-- Returns JSON {"applied": bool, "events": [notify stream ids]}; applied false: the entry is not pending on
-- `consumer` (another consumer claimed it, or it was acknowledged): nothing changed.
--
-- Exactly once: the entry's effect (credited and spend counters) is applied only while the entry is pending on
-- this consumer, and the XACK in the same call ends that; a notification is emitted only when its field in
-- notified:{p}:<msisdn> is new (HSETNX), in the same call as its XADD.
--
-- State (bshock:{p}:<msisdn>): 'cr:<bucket>' units credited to the bucket since it appeared (sum of the credits'
-- positive changes), 'period' the newest spend period seen, 'spend:<period>' micro-units spent in it.
-- Used share of an allowance bucket = (credited - balance) / credited, with the bucket's committed balance now
-- (reservations are not used). A bucket that is gone (expired, removed) loses its counter and its fields.

local ledger_key, bal_key, state_key, notified_key, notify_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local a = decode(ARGV[1])
if type(a.group) ~= 'string' or type(a.consumer) ~= 'string' or type(a.id) ~= 'string'
    or type(a.msisdn) ~= 'string' or not is_int(a.time) or not is_int(a.spend) or type(a.changes) ~= 'table'
    or type(a.percents) ~= 'table' or type(a.spend_thresholds) ~= 'table' or type(a.period) ~= 'string' then
  return redis.error_reply('ERR billshock: group, consumer, id, msisdn, time, changes, spend, period, percents '
    .. 'and spend_thresholds required')
end

local pending = call('XPENDING', ledger_key, a.group, a.id, a.id, 1)
if #pending == 0 or pending[1][2] ~= a.consumer then
  return '{"applied":false,"events":[]}'
end

local events = {}
local function emit(field, fields)
  if call('HSETNX', notified_key, field, a.id) == 1 then
    events[#events + 1] = encode(call('XADD', notify_key, '*', 'msisdn', a.msisdn, 'time', int(a.time),
      'ledger', a.id, unpack_(fields)))
  end
end

-- used >= percent% of credited, exactly and without the product percent * credited (bytes can be large)
local function reached(used, credited, percent)
  local q = idiv(credited, 100)
  local r = credited - q * 100
  return used >= percent * q + ceil_div(percent * r, 100)
end

for _, c in ipairs(a.changes) do
  local bucket, change = c[1], c[2]
  local raw = call('HGET', bal_key, bucket)
  if not raw then
    call('HDEL', state_key, 'cr:' .. bucket)
    for _, percent in ipairs(a.percents) do
      call('HDEL', notified_key, 'allowance:' .. bucket .. ':' .. int(percent))
    end
  else
    local meta_raw = call('HGET', bal_key, bucket .. ':m')
    local unit = meta_raw and decode(meta_raw).unit or nil
    if bucket ~= 'money' and unit ~= 'money' then
      local credited
      if a.credit and change > 0 then
        credited = call('HINCRBY', state_key, 'cr:' .. bucket, int(change))
      else
        credited = tonumber(call('HGET', state_key, 'cr:' .. bucket) or '0')
      end
      if credited > 0 then
        local used = credited - tonumber(raw)
        for _, percent in ipairs(a.percents) do
          if reached(used, credited, percent) then
            emit('allowance:' .. bucket .. ':' .. int(percent), { 'kind', 'allowance', 'bucket', bucket,
              'threshold', int(percent), 'used', int(used), 'credited', int(credited),
              'unit', present(unit) and unit or '' })
          end
        end
      end
    end
  end
end

if a.spend > 0 and a.period ~= '' then
  local last = call('HGET', state_key, 'period')
  if not last or a.period >= last then -- an entry of a period already over is not counted
    if last ~= a.period then
      if last then
        call('HDEL', state_key, 'spend:' .. last)
        for _, threshold in ipairs(a.spend_thresholds) do
          call('HDEL', notified_key, 'spend:' .. last .. ':' .. int(threshold))
        end
      end
      call('HSET', state_key, 'period', a.period)
    end
    local spent = call('HINCRBY', state_key, 'spend:' .. a.period, int(a.spend))
    for _, threshold in ipairs(a.spend_thresholds) do
      if spent >= threshold then
        emit('spend:' .. a.period .. ':' .. int(threshold), { 'kind', 'spend', 'period', a.period,
          'threshold', int(threshold), 'spent', int(spent) })
      end
    end
  end
end

call('XACK', ledger_key, a.group, a.id)
return '{"applied":true,"events":[' .. concat(events, ',') .. ']}'
