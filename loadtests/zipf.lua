-- wrk script: GET /v1/users/c<rank>/segments, rank drawn from the load tests' Zipf law
-- (the same inverse distribution function as loadtests/datagen.py zipf_ranks).
--   wrk -s loadtests/zipf.lua http://127.0.0.1:PORT -- COOKIES EXPONENT SEED
local n, s, logn, a, top = 10000000, 1.0, 0, 0, 0

function init(args)
  n = tonumber(args[1] or "10000000")
  s = tonumber(args[2] or "1.0")
  math.randomseed(tonumber(args[3] or "1"))
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
  return wrk.format("GET", "/v1/users/c" .. rank() .. "/segments")
end
