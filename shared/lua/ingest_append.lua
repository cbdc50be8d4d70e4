-- Append a batch of one feed's messages at the positions JetStream gave them, each once.
--
-- KEYS[1]      the feed's stream (entry id `<seq>-0`: the JetStream stream sequence)
-- KEYS[2]      the feed's meta hash (epoch, seq, first_seq, last_id)
-- KEYS[3..n]   per message, in the order of the messages in ARGV, the dedup hash that
--              holds its message id (one hash per block of seqs: Keys.dedup)
-- ARGV[1]      dedup TTL in seconds (the redelivery window), renewed at each write
-- ARGV[2]      epoch: the feed's JetStream stream creation time in ms
-- ARGV[3]      start: 0, or the seq at which a missing or empty stream may begin (a
--              rebuild after Redis lost the stream: what lies below is in PostgreSQL)
-- ARGV[4..]    per message, in seq order: seq, field count N, then N field/value strings,
--              the first pair `message_id`, <id> (codec.entry_fields, codec.malformed_fields)
--
-- The stream is contiguous: seq N is appended only right after seq N-1 (the top is the
-- stream's last-generated id, which trimming does not lower). A message is a duplicate
-- when its message id is in its dedup hash (HSETNX: SET NX per field, kept for the
-- redelivery window) or its seq is at or below the top (the second guard, which holds
-- after the hash expired or was evicted).
-- Returns, per message, {entry id, status}: 1 appended now, 0 a duplicate, -1 not
-- appended because seq N-1 is missing (a hole the caller fills from JetStream first; the
-- entry id is then the top's, `<top>-0`, and every later message of the batch is -1 too).
-- A newer epoch (the JetStream stream was recreated) deletes the old stream and meta; an
-- older one is refused with the error `STALE_EPOCH <current epoch>`. The meta hash's
-- seq/first_seq/last_id are written only while the stream exists (a hole reported for a
-- missing stream leaves them as they were); an empty stream whose meta hash was lost is
-- dropped (its top's epoch is unknown), so the caller rebuilds it.
local stream = KEYS[1]
local meta = KEYS[2]
local ttl = ARGV[1]
local epoch = ARGV[2]
local start = tonumber(ARGV[3])

local function top_of(key)
    if redis.call('EXISTS', key) == 0 then
        return 0
    end
    local info = redis.call('XINFO', 'STREAM', key)
    for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
            return tonumber(string.match(info[i + 1], '^(%d+)-'))
        end
    end
    return 0
end

local current = redis.call('HGET', meta, 'epoch')
if not current then
    -- The meta hash was lost (evicted): the newest entry's message id names its epoch.
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if #last > 0 then
        local fields = last[1][2]
        for i = 1, #fields, 2 do
            if fields[i] == 'message_id' then
                current = string.match(fields[i + 1], '^(.*)%.%d+$')
            end
        end
    elseif redis.call('EXISTS', stream) == 1 then
        -- An empty (trimmed) stream whose meta hash was lost: its top belongs to an epoch
        -- nothing names any more, and would turn a new epoch's first seqs into
        -- "duplicates". Dropped: the caller sees a missing stream and rebuilds it.
        redis.call('DEL', stream)
    end
end
if current and current ~= epoch then
    if tonumber(current) and tonumber(epoch) and tonumber(current) > tonumber(epoch) then
        return redis.error_reply('STALE_EPOCH ' .. current)
    end
    redis.call('DEL', stream, meta)
end

local top = top_of(stream)
local fresh = top == 0
if fresh and start > 0 then
    -- A new stream, or one Redis lost: it begins at `start` (or 1).
    top = start - 1
end
local floor = top

local results = {}
local arg = 4
local hole = false
for i = 3, #KEYS do
    local dedup = KEYS[i]
    local seq = tonumber(ARGV[arg])
    local count = tonumber(ARGV[arg + 1])
    if ARGV[arg + 2] ~= 'message_id' then
        return redis.error_reply('BAD_ARGS the first field of every message must be message_id')
    end
    local message_id = ARGV[arg + 3]
    local existing = redis.call('HGET', dedup, message_id)
    if existing and seq > top then
        -- The id outlived its entry (the stream was lost or evicted, the hash was not):
        -- the entry is not there, so the message is not a duplicate.
        redis.call('HDEL', dedup, message_id)
        existing = false
    end
    if existing then
        results[#results + 1] = {existing, 0}
    elseif seq <= top then
        results[#results + 1] = {seq .. '-0', 0}
    elseif hole or seq ~= top + 1 then
        hole = true
        results[#results + 1] = {top .. '-0', -1}
    else
        local fields = {'seq', seq}
        for j = arg + 2, arg + 1 + count do
            fields[#fields + 1] = ARGV[j]
        end
        -- XADD first: if it fails the script stops before the message is marked as seen.
        local id = redis.call('XADD', stream, seq .. '-0', unpack(fields))
        top = seq
        redis.call('HSETNX', dedup, message_id, id)
        redis.call('EXPIRE', dedup, ttl)
        results[#results + 1] = {id, 1}
    end
    arg = arg + 2 + count
end
if redis.call('EXISTS', stream) == 0 then
    -- Nothing appended to a missing stream (a hole, or only duplicates): what the meta
    -- says of the stream (seq, first_seq) stays as it was until the stream exists again.
    redis.call('HSET', meta, 'epoch', epoch)
    return results
end
if fresh then
    redis.call('HSET', meta, 'first_seq', floor + 1)
elseif redis.call('HEXISTS', meta, 'first_seq') == 0 then
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if #first > 0 then
        redis.call('HSET', meta, 'first_seq', string.match(first[1][1], '^(%d+)-'))
    else
        redis.call('HSET', meta, 'first_seq', top + 1)
    end
end
redis.call('HSET', meta, 'epoch', epoch, 'seq', top, 'last_id', top .. '-0')
return results
