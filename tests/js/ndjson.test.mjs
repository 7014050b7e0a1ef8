// The NDJSON line splitter of the page (web/static/ndjson.js), fed with adversarial chunkings.
// Run with node's built-in runner: `node --test tests/js/`.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { describe, test } from "node:test";

// ndjson.js is an ES module served to browsers as a plain .js file, with no package.json beside it. Node 20.19+
// detects its module syntax, but Debian 12's Node 18 would load it as CommonJS, so import its source as a module.
const source = await readFile(new URL("../../web/static/ndjson.js", import.meta.url), "utf8");
const { NDJSONError, NDJSONLineSplitter, parseLine, readNDJSON } = await import(
  `data:text/javascript;base64,${Buffer.from(source).toString("base64")}`
);

const encoder = new TextEncoder();

// What the relay sends: deltas with multi-byte characters (2, 3 and 4 bytes in UTF-8), braces and escaped line
// breaks inside strings, then the done line.
const OBJECTS = [
  { type: "delta", content: "Hello" },
  { type: "delta", content: " wörld" },
  { type: "delta", content: " 你好" },
  { type: "delta", content: " 🦀🎉" },
  { type: "delta", content: ' a "}" and a {brace} and \\n' },
  { type: "delta", content: "line one\nline two\r\n" },
  { type: "delta", content: "\u2028 separators \u2029 are not line breaks" },
  { type: "ping" },
  { type: "done", finish_reason: "stop", usage: { prompt_tokens: 3, completion_tokens: 7, total_tokens: 10 } },
];
const WIRE = encoder.encode(OBJECTS.map((o) => `${JSON.stringify(o)}\n`).join(""));

/** Split `bytes` at the given offsets. */
function cut(bytes, offsets) {
  const chunks = [];
  let start = 0;
  for (const end of [...offsets, bytes.length]) {
    chunks.push(bytes.subarray(start, end));
    start = end;
  }
  return chunks;
}

function splitAll(chunks) {
  const splitter = new NDJSONLineSplitter();
  const lines = [];
  for (const chunk of chunks) lines.push(...splitter.push(chunk));
  lines.push(...splitter.end());
  return lines;
}

function parsedAll(chunks) {
  return splitAll(chunks).map(parseLine);
}

/** A small deterministic PRNG (mulberry32), so a failing random chunking can be replayed. */
function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
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

describe("NDJSONLineSplitter", () => {
  test("the whole stream in one chunk", () => {
    assert.deepEqual(parsedAll([WIRE]), OBJECTS);
  });

  test("every byte its own chunk (splits every multi-byte character)", () => {
    const chunks = Array.from(WIRE, (byte) => Uint8Array.of(byte));
    assert.deepEqual(parsedAll(chunks), OBJECTS);
  });

  test("one cut at every possible offset", () => {
    for (let offset = 0; offset <= WIRE.length; offset++) {
      assert.deepEqual(parsedAll(cut(WIRE, [offset])), OBJECTS, `cut at byte ${offset}`);
    }
  });

  test("two cuts inside one 4-byte character", () => {
    const crab = WIRE.indexOf(0xf0); // the first byte of 🦀
    assert.ok(crab > 0);
    assert.deepEqual(parsedAll(cut(WIRE, [crab + 1, crab + 2, crab + 3])), OBJECTS);
  });

  test("random chunkings, seeded", () => {
    for (let seed = 1; seed <= 300; seed++) {
      const next = random(seed);
      const offsets = [];
      for (let at = 0; at < WIRE.length; at += 1 + Math.floor(next() * 24)) offsets.push(at);
      assert.deepEqual(parsedAll(cut(WIRE, offsets)), OBJECTS, `seed ${seed}`);
    }
  });

  test("several objects and a part of the next in one chunk", () => {
    const first = WIRE.indexOf(0x0a, WIRE.indexOf(0x0a) + 1) + 5; // two lines and five bytes of the third
    const splitter = new NDJSONLineSplitter();
    assert.deepEqual(splitter.push(WIRE.subarray(0, first)).map(parseLine), OBJECTS.slice(0, 2));
    const rest = splitter.push(WIRE.subarray(first));
    assert.deepEqual([...rest, ...splitter.end()].map(parseLine), OBJECTS.slice(2));
  });

  test("a chunk without a line break returns nothing until the line ends", () => {
    const splitter = new NDJSONLineSplitter();
    assert.deepEqual(splitter.push(encoder.encode('{"type":"delta","con')), []);
    assert.deepEqual(splitter.push(encoder.encode('tent":"}"}')), []);
    assert.deepEqual(splitter.push(encoder.encode("\n")), ['{"type":"delta","content":"}"}']);
  });

  test("a chunk that ends right after a line break leaves nothing behind", () => {
    const splitter = new NDJSONLineSplitter();
    assert.deepEqual(splitter.push(encoder.encode('{"a":1}\n')), ['{"a":1}']);
    assert.deepEqual(splitter.end(), []);
  });

  test("CRLF line ends, and CR LF split across chunks", () => {
    const chunks = [encoder.encode('{"a":1}\r'), encoder.encode('\n{"b":2}\r\n')];
    assert.deepEqual(parsedAll(chunks), [{ a: 1 }, { b: 2 }]);
  });

  test("blank lines are skipped", () => {
    assert.deepEqual(splitAll([encoder.encode('\n\n{"a":1}\n  \n\r\n{"b":2}\n\n')]), ['{"a":1}', '{"b":2}']);
  });

  test("the last line needs no newline", () => {
    assert.deepEqual(parsedAll([encoder.encode('{"a":1}\n{"b"'), encoder.encode(":2}")]), [{ a: 1 }, { b: 2 }]);
  });

  test("a stream cut inside a character ends with U+FFFD, not silence", () => {
    const crab = encoder.encode('{"c":"🦀"}');
    const lines = splitAll([crab.subarray(0, 7)]); // '{"c":"' and 2 of the crab's 4 bytes
    assert.deepEqual(lines, ['{"c":"\uFFFD']);
    assert.throws(() => parseLine(lines[0]), NDJSONError);
  });

  test("strings are accepted as chunks too", () => {
    const splitter = new NDJSONLineSplitter();
    assert.deepEqual(splitter.push('{"a":"ü"}\n{"b'), ['{"a":"ü"}']);
    assert.deepEqual(splitter.push('":2}\n'), ['{"b":2}']);
  });

  test("what the per-chunk JSON.parse of tutorials gets wrong", () => {
    // Two objects in one chunk, and one object over two chunks: neither chunk parses on its own.
    const chunks = [encoder.encode('{"type":"delta","content":"a"}\n{"type":"delta",'), encoder.encode('"content":"b"}\n')];
    assert.throws(() => JSON.parse(new TextDecoder().decode(chunks[0])));
    assert.deepEqual(parsedAll(chunks), [
      { type: "delta", content: "a" },
      { type: "delta", content: "b" },
    ]);
  });
});

describe("parseLine", () => {
  test("quotes the start of a line that is not JSON", () => {
    assert.throws(() => parseLine("{not json"), (err) => err instanceof NDJSONError && err.line === "{not json");
    const long = `<${"x".repeat(200)}`;
    assert.throws(() => parseLine(long), (err) => err.message.endsWith("…") && err.message.length < 140);
  });
});

describe("readNDJSON", () => {
  test("yields the objects of a byte stream, whatever its chunking", async () => {
    const next = random(7);
    const offsets = [];
    for (let at = 0; at < WIRE.length; at += 1 + Math.floor(next() * 9)) offsets.push(at);
    assert.deepEqual(await collect(readNDJSON(streamOf(cut(WIRE, offsets)))), OBJECTS);
  });

  test("leaving the loop early cancels the stream", async () => {
    let cancelled = false;
    const stream = new ReadableStream({
      pull(controller) {
        controller.enqueue(encoder.encode('{"type":"delta","content":"x"}\n'));
      },
      cancel() {
        cancelled = true;
      },
    });
    for await (const item of readNDJSON(stream)) {
      assert.equal(item.content, "x");
      break;
    }
    assert.ok(cancelled);
    assert.equal(stream.locked, false);
  });

  test("a line that is not JSON is an NDJSONError", async () => {
    const stream = streamOf([encoder.encode('{"type":"delta","content":"a"}\n<html>\n')]);
    const seen = [];
    await assert.rejects(async () => {
      for await (const item of readNDJSON(stream)) seen.push(item);
    }, NDJSONError);
    assert.deepEqual(seen, [{ type: "delta", content: "a" }]);
  });

  test("an error of the stream (an abort) reaches the reader", async () => {
    const stream = new ReadableStream({
      start(controller) {
        controller.enqueue(encoder.encode('{"type":"delta","content":"a"}\n{"type"'));
        controller.error(new DOMException("The user aborted a request.", "AbortError"));
      },
    });
    await assert.rejects(collect(readNDJSON(stream)), { name: "AbortError" });
  });
});
