-- wrk script: POST a small chat completion to the mock, to measure its ceiling.
-- wrk -t2 -c64 -d5s -s loadtest/mock-llm/bench/chat.lua http://127.0.0.1:8000
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock-gpt","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello from wrk"}]}'
