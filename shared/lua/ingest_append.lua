-- Append a batch of messages to one feed's stream, each exactly once.
--
-- KEYS[1]      the feed's stream
-- KEYS[2]      the feed's meta hash (epoch, seq, last_id, broker_seq)
-- KEYS[3..n]   one dedup key per message, in the order of the messages in ARGV
-- ARGV[1]      dedup key TTL in seconds (longer than any redelivery window)
-- ARGV[2]      epoch to record if the feed has none yet (a new or reset stream)
-- ARGV[3..]    per message: broker_seq, field count N, then N field/value strings
--
-- A message whose dedup key is unset is XADDed with `seq` (the feed's counter + 1) in
-- front of its fields; a message seen before is not appended again. Returns, per
-- message, {entry id, 1 if appended now or 0 if it was a duplicate}.
local stream = KEYS[1]
local meta = KEYS[2]
local ttl = ARGV[1]
local new_epoch = ARGV[2]

redis.call('HSETNX', meta, 'epoch', new_epoch)
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local top = tonumber(redis.call('HGET', meta, 'broker_seq') or '0')

local results = {}
local arg = 3
for i = 3, #KEYS do
    local dedup = KEYS[i]
    local broker_seq = tonumber(ARGV[arg])
    local count = tonumber(ARGV[arg + 1])
    local existing = redis.call('GET', dedup)
    if existing then
        results[#results + 1] = {existing, 0}
    else
        local fields = {'seq', seq + 1}
        for j = arg + 2, arg + 1 + count do
            fields[#fields + 1] = ARGV[j]
        end
        -- XADD first: if it fails the script stops before this message is marked
        -- as seen or counted, so its redelivery appends it with no gap in seq.
        local id = redis.call('XADD', stream, '*', unpack(fields))
        seq = seq + 1
        if broker_seq > top then
            top = broker_seq
        end
        redis.call('SET', dedup, id, 'NX', 'EX', ttl)
        redis.call('HSET', meta, 'seq', seq, 'last_id', id, 'broker_seq', top)
        results[#results + 1] = {id, 1}
    end
    arg = arg + 2 + count
end
return results
