-- wrk script for the kv-put workload: every request overwrites the same key
-- with a value that no earlier request used.
--
-- The value must change: SQLite does not rewrite a page whose bytes stay the
-- same, so overwriting a key with its own value commits nothing, and skips
-- the fsync that a real write pays.
--
-- run.sh sets, for both servers alike:
--   BINDINGS_PUT_PATH    the request target up to `value=`
--   BINDINGS_VALUE_BYTES the length of every value (at least the unique
--                        prefix, `t<thread>-<n>-`)

local path = os.getenv("BINDINGS_PUT_PATH") or error("BINDINGS_PUT_PATH is not set")
local value_bytes = tonumber(os.getenv("BINDINGS_VALUE_BYTES") or "64")

local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

local n = 0
function request()
    n = n + 1
    local unique = string.format("t%d-%d-", tid or 0, n)
    local value = unique .. string.rep("v", value_bytes - #unique)
    return wrk.format("GET", path .. value)
end
