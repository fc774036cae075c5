-- wrk script for bench_serving: POSTs the JSON bodies of a file (one per line) in turn, with an
-- optional bearer token, and prints the run's summary as one JSON line.
-- wrk -s serving_load.lua URL -- BODIES_FILE [TOKEN]
local requests = {}
local next_index = 0

function init(args)
  local headers = { ["Content-Type"] = "application/json" }
  if args[2] ~= nil and args[2] ~= "" then
    headers["Authorization"] = "Bearer " .. args[2]
  end
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("POST", nil, headers, line)
  end
  next_index = math.random(#requests) - 1
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
