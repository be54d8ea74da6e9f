// The official `openai` Node SDK (tests/peers/openai-node) against agentq's
// /v1/chat/completions: one call waited for, one streamed, one refused. Run by
// tests/tests/openai_chat.rs with AGENTQ_BASE_URL (the api's http://host:port/v1); prints one
// JSON line for the Rust side, which checks the task records and the mock's call counts.
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const require = createRequire(new URL("../peers/openai-node/package.json", import.meta.url));
const openai = require("openai");
const OpenAI = openai.OpenAI ?? openai.default ?? openai;

const client = new OpenAI({ baseURL: process.env.AGENTQ_BASE_URL, apiKey: "sk-anything" });

const { data: r, response } = await client.chat.completions
  .create({ model: "mock-gpt", messages: [{ role: "user", content: "node sdk hello" }] })
  .withResponse();
const taskId = response.headers.get("x-agentq-task-id");
assert.equal(r.object, "chat.completion");
assert.equal(r.id, `chatcmpl-${taskId}`);
assert.equal(r.choices[0].message.content, "echo: node sdk hello");
assert.equal(r.choices[0].finish_reason, "stop");

const stream = await client.chat.completions.create({
  model: "mock-gpt",
  messages: [{ role: "user", content: "node sdk streams these few words [[stream_rate:100]]" }],
  stream: true,
});
let text = "";
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  text += chunk.choices[0]?.delta?.content ?? "";
}

let refused = null;
try {
  await client.chat.completions.create({ model: "mock-gpt", messages: [], temperature: 9 });
} catch (e) {
  assert.ok(e instanceof OpenAI.BadRequestError, `not a BadRequestError: ${e}`);
  refused = { status: e.status, param: e.param ?? e.error?.param };
}
assert.ok(refused, "an invalid request was accepted");

console.log(JSON.stringify({ task_id: taskId, text, chunks, refused }));
