-- Drop a feed's stream whose next seqs JetStream no longer holds, so that the ingestor
-- can start it again at JetStream's first retained seq (`ingest_append` with `start`).
--
-- KEYS[1]      the feed's stream
-- ARGV[1]      the top (seq) the caller found; the stream is dropped only if its top is
--              still that (another ingestor may have restarted it already)
--
-- Returns 1 if the stream was dropped, 0 if its top had moved (or it was gone).
local stream = KEYS[1]
local expected = tonumber(ARGV[1])

if redis.call('EXISTS', stream) == 0 then
    return 0
end
local info = redis.call('XINFO', 'STREAM', stream)
for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
        if tonumber(string.match(info[i + 1], '^(%d+)-')) == expected then
            redis.call('DEL', stream)
            return 1
        end
        return 0
    end
end
return 0
