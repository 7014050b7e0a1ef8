// The page's SSE reader for fetch (web/static/sse.js): the WHATWG examples, the relay's own frames cut at every
// byte, line endings split between chunks, and the mapping to the NDJSON objects app.js reads.
// Run with node's built-in runner: `node --test tests/js/`.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { describe, test } from "node:test";

// Imported from its source as a module, as ndjson.test.mjs does (Node 18 would load a .js file as CommonJS).
const source = await readFile(new URL("../../web/static/sse.js", import.meta.url), "utf8");
const { SSEError, SSEParser, readSSE, readSSEItems } = await import(
  `data:text/javascript;base64,${Buffer.from(source).toString("base64")}`
);

const encoder = new TextEncoder();

function parseAll(chunks) {
  const parser = new SSEParser();
  const events = [];
  for (const chunk of chunks) events.push(...parser.push(chunk));
  events.push(...parser.end());
  return events;
}

function streamOf(chunks) {
  return new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
}

async function collect(iterable) {
  const out = [];
  for await (const item of iterable) out.push(item);
  return out;
}

// What the relay sends for a resumable stream (server/framing.py SSEFraming): the opening block with a retry
// hint, a comment heartbeat, deltas with multi-byte characters and an escaped line break, reasoning, then done.
const ID = "3f0c5e1a9b7d42c68e2f1a0b9c8d7e6f";
const RELAY =
  `retry: 3000\nevent: stream\nid: ${ID}/0\ndata: {"stream_id":"${ID}"}\n\n` +
  `id: ${ID}/1\ndata: {"content":"Hello wörld 你好 🦀"}\n\n` +
  ": ping\n\n" +
  `id: ${ID}/2\nevent: reasoning\ndata: {"content":"line one\\nline two"}\n\n` +
  `id: ${ID}/3\nevent: done\ndata: {"finish_reason":"stop"}\n\n`;
const RELAY_ITEMS = [
  { stream_id: ID, type: "stream", seq: 0 },
  { content: "Hello wörld 你好 🦀", type: "delta", seq: 1 },
  { content: "line one\nline two", type: "reasoning", seq: 2 },
  { finish_reason: "stop", type: "done", seq: 3 },
];

describe("the WHATWG examples (HTML §9.2.6)", () => {
  test("example 1: data lines joined, a comment skipped, the last event without its blank line discarded", () => {
    const text = "data: YHOO\ndata: +2\ndata: 10\n\n: test stream\n\ndata: first event\nid: 1\n\ndata:second";
    assert.deepEqual(parseAll([text]), [
      { type: "message", data: "YHOO\n+2\n10", id: null },
      { type: "message", data: "first event", id: "1" },
    ]);
  });

  test("example 2: an empty id resets the last event id, and it stays for later events", () => {
    const text = "data: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n";
    assert.deepEqual(parseAll([text]), [
      { type: "message", data: "first event", id: "1" },
      { type: "message", data: "second event", id: "" },
      { type: "message", data: " third event", id: "" },
    ]);
  });

  test("example 3: a field without a colon; only one space is removed", () => {
    assert.deepEqual(parseAll(["data\n\ndata\ndata\n\ndata:\n"]), [
      { type: "message", data: "", id: null },
      { type: "message", data: "\n", id: null },
    ]);
  });

  test("example 4: with and without the space after the colon", () => {
    assert.deepEqual(parseAll(["data:test\n\ndata: test\n\n"]), [
      { type: "message", data: "test", id: null },
      { type: "message", data: "test", id: null },
    ]);
  });
});

describe("line endings and chunks", () => {
  test("CRLF, CR and LF end lines; a BOM at the start is not part of the first field", () => {
    const text = "\uFEFFevent: a\r\ndata: 1\r\rdata: 2\n\n";
    assert.deepEqual(parseAll([encoder.encode(text)]), [
      { type: "a", data: "1", id: null },
      { type: "message", data: "2", id: null },
    ]);
  });

  test("a CRLF split between two chunks is one line end, not an empty line", () => {
    assert.deepEqual(parseAll(["data: a\r", "\ndata: b\r\n\r\n"]), [{ type: "message", data: "a\nb", id: null }]);
  });

  test("an id with a NUL is ignored", () => {
    assert.deepEqual(parseAll(["id: 7\n\ndata: x\nid: a\0b\n\n"]), [{ type: "message", data: "x", id: "7" }]);
  });

  test("the relay's stream cut at every byte reads the same", () => {
    const bytes = encoder.encode(RELAY);
    const whole = parseAll([bytes]);
    assert.equal(whole.length, 4);
    for (let at = 1; at < bytes.length; at += 1) {
      assert.deepEqual(parseAll([bytes.subarray(0, at), bytes.subarray(at)]), whole, `cut at ${at}`);
    }
    assert.deepEqual(
      parseAll(Array.from(bytes, (byte) => Uint8Array.of(byte))),
      whole,
      "one byte at a time",
    );
  });
});

describe("readSSEItems: the relay's events as NDJSON objects", () => {
  test("the relay's frames map to the types and seqs of its NDJSON framing", async () => {
    const bytes = encoder.encode(RELAY);
    const chunks = [bytes.subarray(0, 50), bytes.subarray(50, 51), bytes.subarray(51)];
    assert.deepEqual(await collect(readSSEItems(streamOf(chunks))), RELAY_ITEMS);
  });

  test("an error event keeps its error object", async () => {
    const text = `id: ${ID}/4\nevent: error\ndata: {"error":{"type":"upstream_error","message":"m"}}\n\n`;
    assert.deepEqual(await collect(readSSEItems(streamOf([encoder.encode(text)]))), [
      { error: { type: "upstream_error", message: "m" }, type: "error", seq: 4 },
    ]);
  });

  for (const data of ["not json", "[1,2]", "42", "null", '"text"']) {
    test(`data that is not a JSON object is an SSEError: ${data}`, async () => {
      const stream = streamOf([encoder.encode(`id: ${ID}/1\ndata: ${data}\n\n`)]);
      await assert.rejects(collect(readSSEItems(stream)), SSEError);
    });
  }

  test("readSSE yields what the parser dispatches", async () => {
    assert.deepEqual(await collect(readSSE(streamOf([encoder.encode("data: a\n\n")]))), [
      { type: "message", data: "a", id: null },
    ]);
  });
});
