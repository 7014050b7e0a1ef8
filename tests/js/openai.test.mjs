// The official `openai` npm package against the relay's OpenAI-compatible endpoint (/v1), over real sockets.
// The relay runs as a process around the scripted provider (tests/scripted_relay.py): each prompt plays a script.
// Run with node's built-in runner: `node --test tests/js/` (after `npm ci` in tests/js).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { consoleWarnings, startScriptedRelay } from "./relay.mjs";

let relay;
let client;
const MODEL = "llm-relay-demo";

before(async () => {
  relay = await startScriptedRelay();
  // The relay has no API keys here: the SDK's Authorization is sent and ignored (never forwarded upstream).
  client = new OpenAI({ baseURL: `${relay.base}/v1`, apiKey: "sk-client-key", maxRetries: 0 });
});

after(async () => {
  await relay?.stop();
});

const user = (content) => [{ role: "user", content }];

async function streamed(prompt, extra = {}) {
  const stream = await client.chat.completions.create({ model: MODEL, messages: user(prompt), stream: true, ...extra });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

describe("openai npm package: chat.completions", () => {
  test("a streamed reply: role first, the text in order, the finish reason, the usage chunk", async () => {
    const warnings = await consoleWarnings(async () => {
      const chunks = await streamed("text", { stream_options: { include_usage: true } });
      assert.equal(chunks[0].choices[0].delta.role, "assistant");
      assert.equal(new Set(chunks.map((c) => c.id)).size, 1);
      assert.ok(chunks[0].id.startsWith("chatcmpl-"));
      assert.ok(chunks.every((c) => c.object === "chat.completion.chunk" && c.model === MODEL));
      const text = chunks.map((c) => c.choices[0]?.delta.content ?? "").join("");
      assert.equal(text, "Hello, wörld 🦀");
      assert.equal(chunks.at(-2).choices[0].finish_reason, "stop");
      assert.deepEqual(chunks.at(-1).choices, []);
      assert.deepEqual(chunks.at(-1).usage, { prompt_tokens: 9, completion_tokens: 4, total_tokens: 13 });
    });
    assert.deepEqual(warnings, []);
  });

  test("without include_usage there is no usage chunk", async () => {
    const chunks = await streamed("text");
    assert.ok(chunks.every((c) => c.choices.length === 1 && c.usage === undefined));
  });

  test("a reply that is not streamed is the assembled chat.completion", async () => {
    const completion = await client.chat.completions.create({ model: MODEL, messages: user("text") });
    assert.equal(completion.object, "chat.completion");
    assert.equal(completion.choices[0].message.content, "Hello, wörld 🦀");
    assert.equal(completion.choices[0].finish_reason, "stop");
    assert.equal(completion.usage.total_tokens, 13);
  });

  test("reasoning arrives as reasoning_content, before the answer", async () => {
    const chunks = await streamed("reasoning");
    const reasoning = chunks.map((c) => c.choices[0]?.delta.reasoning_content ?? "").join("");
    assert.equal(reasoning, "The user asks for 2 + 2.");
    assert.equal(chunks.map((c) => c.choices[0]?.delta.content ?? "").join(""), "It is 4.");
    const completion = await client.chat.completions.create({ model: MODEL, messages: user("reasoning") });
    assert.equal(completion.choices[0].message.reasoning_content, "The user asks for 2 + 2.");
  });

  test("a tool call streams as tool_calls pieces the SDK's stream helper assembles", async () => {
    const runner = client.chat.completions.stream({ model: MODEL, messages: user("tool") });
    const final = await runner.finalChatCompletion();
    const message = final.choices[0].message;
    assert.equal(final.choices[0].finish_reason, "tool_calls");
    assert.equal(message.content, "Let me look.");
    assert.equal(message.tool_calls.length, 1);
    assert.equal(message.tool_calls[0].id, "call_weather_1");
    assert.equal(message.tool_calls[0].function.name, "get_weather");
    assert.deepEqual(JSON.parse(message.tool_calls[0].function.arguments), { city: "Paris" });
  });

  // The second request carries `tools`, the assistant message and a `tool` message. The assistant message is sent
  // without the `refusal: null` the SDK returns on it: the request allowlist (chat_request.py) refuses that field.
  test("a tool call round trip with a tool message", async () => {
    const tools = [
      {
        type: "function",
        function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } },
      },
    ];
    const messages = user("tool");
    const first = await client.chat.completions.create({ model: MODEL, messages, tools });
    const message = first.choices[0].message;
    messages.push({ role: message.role, content: message.content, tool_calls: message.tool_calls }, {
      role: "tool",
      tool_call_id: message.tool_calls[0].id,
      content: JSON.stringify({ sky: "sunny" }),
    });
    const second = await client.chat.completions.create({ model: MODEL, messages, tools });
    assert.equal(second.choices[0].message.content, "It is sunny in Paris.");
  });

  test("a refusal streams as refusal, not as content", async () => {
    const completion = await client.chat.completions.create({ model: MODEL, messages: user("refusal") });
    assert.equal(completion.choices[0].message.refusal, "I can't help with that.");
    assert.equal(completion.choices[0].message.content, null);
  });

  test("a failure mid-stream is raised as an APIError with the relay's message", async () => {
    const seen = [];
    await assert.rejects(
      async () => {
        const stream = await client.chat.completions.create({ model: MODEL, messages: user("error"), stream: true });
        for await (const chunk of stream) seen.push(chunk.choices[0]?.delta.content ?? "");
      },
      (err) => err instanceof OpenAI.APIError && err.message.includes("the model provider failed"),
    );
    assert.equal(seen.join(""), "Partial answer");
  });

  test("a failure before the first token is an HTTP error the SDK maps to its type", async () => {
    await assert.rejects(
      client.chat.completions.create({ model: MODEL, messages: user("error-first"), stream: true }),
      (err) => err instanceof OpenAI.InternalServerError && err.status === 502 && err.code === "upstream_error",
    );
  });

  test("heartbeats between the events are skipped by the SDK's parser", async () => {
    const raw = await fetch(`${relay.base}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: MODEL, messages: user("quiet"), stream: true }),
    });
    const wire = await raw.text();
    assert.match(wire, /\n\n: ping\n\n/, "the relay sent heartbeats between the chunks");
    assert.doesNotMatch(wire, /^(id|retry|event):/m);
    const chunks = await streamed("quiet");
    assert.equal(chunks.map((c) => c.choices[0]?.delta.content ?? "").join(""), "ab");
    assert.equal(chunks.at(-1).choices[0].finish_reason, "stop");
  });

  test("a refused request is a BadRequestError naming what to change", async () => {
    await assert.rejects(
      client.chat.completions.create({ model: "gpt-pricey", messages: user("text") }),
      (err) => err instanceof OpenAI.BadRequestError && err.type === "invalid_request_error" && /model/.test(err.message),
    );
    await assert.rejects(
      client.chat.completions.create({ model: MODEL, messages: user("text"), frobnicate: 1 }),
      (err) => err instanceof OpenAI.BadRequestError && /frobnicate/.test(err.message),
    );
  });

  test("models lists the models a request may name", async () => {
    const ids = [];
    for await (const model of client.models.list()) ids.push(model.id);
    assert.deepEqual(ids, [MODEL, `${MODEL}-reasoner`]);
  });
});
