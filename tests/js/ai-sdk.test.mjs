// The AI SDK (`ai` npm package) reading the relay's UI message stream (POST /api/ui-chat), with its own state
// machine: `AbstractChat` with `DefaultChatTransport` (what `useChat` runs, without React), and
// `readUIMessageStream`. The relay runs as a process around the scripted provider (tests/scripted_relay.py).
// Run with node's built-in runner: `node --test tests/js/` (after `npm ci` in tests/js).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  AbstractChat,
  DefaultChatTransport,
  lastAssistantMessageIsCompleteWithToolCalls,
  readUIMessageStream,
} from "ai";
import { consoleWarnings, startScriptedRelay } from "./relay.mjs";

let relay;

before(async () => {
  relay = await startScriptedRelay();
});

after(async () => {
  await relay?.stop();
});

/** The state a framework binding (@ai-sdk/react's useChat) keeps, in plain memory. */
class MemoryChatState {
  constructor(messages = []) {
    this.messages = messages;
    this.status = "ready";
    this.error = undefined;
  }
  pushMessage(message) {
    this.messages = [...this.messages, message];
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  }
  snapshot(thing) {
    return structuredClone(thing);
  }
}

class Chat extends AbstractChat {
  constructor({ messages, ...init }) {
    super({ ...init, state: new MemoryChatState(messages) });
  }
}

let chats = 0;
function newChat(options = {}) {
  chats += 1;
  return new Chat({
    id: options.id ?? `chat-${process.pid}-${chats}`,
    transport: new DefaultChatTransport({ api: `${relay.base}/api/ui-chat`, ...options.transport }),
    ...options.init,
  });
}

/** Send `text` as a user message; returns the chat after the SDK's state machine has taken the whole reply. */
async function ask(text, options = {}) {
  const chat = newChat(options);
  const warnings = await consoleWarnings(() => chat.sendMessage({ text }));
  assert.deepEqual(warnings, [], "the SDK printed no warning");
  return chat;
}

/** The assistant message's parts without the fields the SDK leaves undefined. */
function parts(chat) {
  const reply = chat.messages.at(-1);
  assert.equal(reply.role, "assistant");
  return JSON.parse(JSON.stringify(reply.parts));
}

describe("ai npm package: Chat with DefaultChatTransport", () => {
  test("a text reply is one text part", async () => {
    const chat = await ask("text");
    assert.equal(chat.status, "ready");
    assert.deepEqual(parts(chat), [{ type: "step-start" }, { type: "text", text: "Hello, wörld 🦀", state: "done" }]);
  });

  test("a reasoning reply is a reasoning part, then the text", async () => {
    const chat = await ask("reasoning");
    assert.deepEqual(parts(chat), [
      { type: "step-start" },
      { type: "reasoning", id: "r1", text: "The user asks for 2 + 2.", state: "done" },
      { type: "text", text: "It is 4.", state: "done" },
    ]);
  });

  test("a tool call ends as a tool part with its parsed input", async () => {
    const calls = [];
    const chat = await ask("tool", { init: { onToolCall: ({ toolCall }) => calls.push(toolCall) } });
    assert.equal(chat.status, "ready");
    assert.deepEqual(parts(chat), [
      { type: "step-start" },
      { type: "text", text: "Let me look.", state: "done" },
      {
        type: "tool-get_weather",
        toolCallId: "call_weather_1",
        state: "input-available",
        input: { city: "Paris" },
      },
    ]);
    assert.equal(calls.length, 1);
    assert.equal(calls[0].toolName, "get_weather");
  });

  // The second request carries the tool part with its output, which the relay sends on as a `tool` message.
  test("a tool call round trip: the tool's output is sent back and answered", async () => {
    let chat;
    chat = newChat({
      init: {
        sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
        onToolCall: ({ toolCall }) => {
          // Not awaited, as the SDK's docs say: the output is added once the tool call's part exists.
          chat.addToolOutput({ tool: toolCall.toolName, toolCallId: toolCall.toolCallId, output: { sky: "sunny" } });
        },
      },
    });
    const warnings = await consoleWarnings(async () => {
      await chat.sendMessage({ text: "tool" });
      const deadline = Date.now() + 10_000;
      while (!(chat.status === "ready" && JSON.stringify(chat.messages).includes("It is sunny in Paris.")))
        if (Date.now() > deadline) throw new Error(`no answer: ${chat.status} ${JSON.stringify(chat.messages)}`);
        else await new Promise((resolve) => setTimeout(resolve, 20));
    });
    assert.deepEqual(warnings, []);
    assert.deepEqual(
      parts(chat).map((p) => [p.type, p.text ?? p.state]),
      [
        ["step-start", undefined],
        ["text", "Let me look."],
        ["tool-get_weather", "output-available"],
        ["step-start", undefined],
        ["text", "It is sunny in Paris."],
      ],
    );
  });

  test("heartbeats between the parts are skipped by the SDK's parser", async () => {
    const chat = await ask("quiet");
    assert.equal(chat.status, "ready");
    assert.deepEqual(parts(chat), [{ type: "step-start" }, { type: "text", text: "ab", state: "done" }]);
  });

  test("a refusal is shown as text", async () => {
    const chat = await ask("refusal");
    assert.deepEqual(parts(chat), [
      { type: "step-start" },
      { type: "text", text: "I can't help with that.", state: "done" },
    ]);
  });

  test("a failure mid-reply keeps what came and puts the chat in error", async () => {
    const errors = [];
    const chat = await ask("error", { init: { onError: (error) => errors.push(error.message) } });
    assert.equal(chat.status, "error");
    assert.equal(chat.error.message, "the model provider failed");
    assert.deepEqual(errors, ["the model provider failed"]);
    assert.deepEqual(parts(chat), [{ type: "step-start" }, { type: "text", text: "Partial answer", state: "done" }]);
  });

  test("a failure before the reply is the relay's JSON error, thrown by the transport", async () => {
    const chat = await ask("error-first", { init: { onError: () => {} } });
    assert.equal(chat.status, "error");
    assert.deepEqual(JSON.parse(chat.error.message), {
      error: { type: "upstream_error", message: "the model provider failed" },
    });
  });

  test("a refused request (an unknown field) says which field", async () => {
    const chat = await ask("text", { transport: { body: { frobnicate: true } }, init: { onError: () => {} } });
    assert.equal(chat.status, "error");
    assert.match(chat.error.message, /unknown field: '?frobnicate/);
  });

  test("resume: a reload finds the chat's running reply and replays it whole", async () => {
    const id = `chat-resume-${process.pid}`;
    const first = newChat({ id });
    const sending = first.sendMessage({ text: "slow" });
    // Leave (as a reload does) once some of the reply has arrived.
    while (!(first.messages.at(-1)?.role === "assistant" && first.messages.at(-1).parts.some((p) => p.text)))
      await new Promise((resolve) => setTimeout(resolve, 10));
    await first.stop();
    await sending;
    const user = first.messages[0];
    const second = newChat({ id, init: { messages: [user] } });
    const warnings = await consoleWarnings(() => second.resumeStream());
    assert.deepEqual(warnings, []);
    const expected = Array.from({ length: 40 }, (_, i) => `${i} `).join("");
    assert.equal(second.messages.length, 2);
    assert.deepEqual(parts(second), [{ type: "step-start" }, { type: "text", text: expected, state: "done" }]);
    // The reply has ended: nothing more to resume (204), so the chat stays as it is.
    const third = newChat({ id, init: { messages: [user] } });
    await third.resumeStream();
    assert.deepEqual(third.messages, [user]);
  });
});

describe("ai npm package: readUIMessageStream", () => {
  test("the UI message snapshots of a reasoning reply end in the same parts", async () => {
    const transport = new DefaultChatTransport({ api: `${relay.base}/api/ui-chat` });
    const stream = await transport.sendMessages({
      chatId: "read-ui-message-stream",
      messages: [{ id: "u1", role: "user", parts: [{ type: "text", text: "reasoning" }] }],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: undefined,
    });
    let last;
    for await (const message of readUIMessageStream({ stream, terminateOnError: true })) last = message;
    assert.deepEqual(
      last.parts.map((p) => [p.type, p.text]),
      [
        ["step-start", undefined],
        ["reasoning", "The user asks for 2 + 2."],
        ["text", "It is 4."],
      ],
    );
  });
});
