// The page's reading of a tool_call event (web/static/reply-parts.js `toolCallPiece`): the documented shape is
// taken, anything else is dropped rather than shown. Run with node's built-in runner: `node --test tests/js/`.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { test } from "node:test";

// Imported from its source as a data: module, as ndjson.test.mjs does (Debian 12's Node 18 would load a .js file
// without a package.json as CommonJS). The module touches the DOM only when a ReplyParts is used.
const source = await readFile(new URL("../../web/static/reply-parts.js", import.meta.url), "utf8");
const { toolCallPiece } = await import(`data:text/javascript;base64,${Buffer.from(source).toString("base64")}`);

test("the documented pieces are taken as they are", () => {
  assert.deepEqual(toolCallPiece({ index: 0, id: "call_1", name: "get_weather", arguments: "" }), {
    index: 0,
    id: "call_1",
    name: "get_weather",
    arguments: "",
  });
  assert.deepEqual(toolCallPiece({ type: "tool_call", seq: 3, index: 2, id: null, name: null, arguments: '{"a' }), {
    index: 2,
    id: null,
    name: null,
    arguments: '{"a',
  });
});

test("missing id, name and arguments are null, null and empty", () => {
  assert.deepEqual(toolCallPiece({ index: 1 }), { index: 1, id: null, name: null, arguments: "" });
});

for (const [label, data] of [
  ["null", null],
  ["a string", "call"],
  ["no index", { id: "x" }],
  ["a negative index", { index: -1 }],
  ["a fractional index", { index: 0.5 }],
  ["a string index", { index: "0" }],
  ["a number id", { index: 0, id: 5 }],
  ["an object name", { index: 0, name: { toString: "x" } }],
  ["object arguments", { index: 0, arguments: { city: "Paris" } }],
]) {
  test(`${label} is not a tool-call piece`, () => {
    assert.equal(toolCallPiece(data), null);
  });
}
