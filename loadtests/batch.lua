-- wrk script: POST /v1/partner/segments/batch with USERS Zipf-drawn cookies per request.
--   wrk -s loadtests/batch.lua http://127.0.0.1:PORT -- COOKIES EXPONENT SEED USERS API_KEY
local n, s, logn, a, top, users, key = 10000000, 1.0, 0, 0, 0, 100, ""

function init(args)
  n = tonumber(args[1] or "10000000")
  s = tonumber(args[2] or "1.0")
  math.randomseed(tonumber(args[3] or "1"))
  users = tonumber(args[4] or "100")
  key = args[5] or ""
  logn = math.log(n + 1)
  a = 1 - s
  if math.abs(a) > 1e-9 then top = (n + 1) ^ a end
end

function rank()
  local u = math.random()
  local x
  if math.abs(a) < 1e-9 then x = math.exp(u * logn) else x = ((top - 1) * u + 1) ^ (1 / a) end
  local r = math.floor(x) - 1
  if r >= n then r = n - 1 end
  return r
end

function request()
  local parts = {}
  for i = 1, users do parts[i] = '{"id":"c' .. rank() .. '","id_type":"cookie"}' end
  local body = '{"users":[' .. table.concat(parts, ",") .. ']}'
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
  return wrk.format("POST", "/v1/partner/segments/batch", headers, body)
end
