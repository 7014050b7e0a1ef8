/**
 * NDJSON (one JSON value per line) from a stream of bytes, such as fetch's `response.body`.
 *
 * Network chunks have nothing to do with lines: one chunk may end inside a JSON object, hold several objects, or
 * split a multi-byte UTF-8 character in two. So the bytes go through one `TextDecoder` in streaming mode (it keeps
 * an incomplete character until the next chunk completes it) and the text through a carry-over buffer that keeps
 * the unfinished last line. Calling `JSON.parse` on each chunk, or cutting at the first "}", fails on all three.
 *
 * No DOM and no fetch here: the page (app.js) and node's test runner (tests/js/ndjson.test.mjs) both import it.
 */

/** A line that is not JSON: the stream is not NDJSON, or it was cut. */
export class NDJSONError extends Error {
  constructor(message, line) {
    super(message);
    this.name = "NDJSONError";
    this.line = line;
  }
}

/**
 * Splits chunks into complete lines. Feed it with `push(chunk)`, then call `end()` once the stream is over.
 * Lines come back without their terminator (LF or CRLF); blank lines are skipped.
 */
export class NDJSONLineSplitter {
  #decoder = new TextDecoder("utf-8");
  #carry = "";

  /** The lines that `chunk` (a Uint8Array of UTF-8, or a string) completes, in order. */
  push(chunk) {
    const text = typeof chunk === "string" ? chunk : this.#decoder.decode(chunk, { stream: true });
    const lastBreak = text.lastIndexOf("\n");
    if (lastBreak === -1) {
      this.#carry += text;
      return [];
    }
    const lines = (this.#carry + text.slice(0, lastBreak)).split("\n");
    this.#carry = text.slice(lastBreak + 1);
    return nonBlank(lines);
  }

  /** The end of the stream: what is left (a last line needs no newline), and the decoder's held bytes. */
  end() {
    const rest = this.#carry + this.#decoder.decode();
    this.#carry = "";
    return nonBlank([rest]);
  }
}

function nonBlank(lines) {
  const out = [];
  for (const line of lines) {
    const bare = line.endsWith("\r") ? line.slice(0, -1) : line;
    if (bare.trim() !== "") out.push(bare);
  }
  return out;
}

/** One line as a JSON value, or an `NDJSONError` that quotes the start of the line. */
export function parseLine(line) {
  try {
    return JSON.parse(line);
  } catch {
    const shown = line.length > 80 ? `${line.slice(0, 80)}…` : line;
    throw new NDJSONError(`a line of the stream is not JSON: ${shown}`, line);
  }
}

/**
 * The JSON values of a `ReadableStream` of bytes, one per line, as they arrive.
 * Leaving the loop early (`break`, `return`, an exception) cancels the stream, which closes the connection.
 */
export async function* readNDJSON(stream) {
  const reader = stream.getReader();
  const splitter = new NDJSONLineSplitter();
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (const line of splitter.push(value)) yield parseLine(line);
    }
    finished = true;
    for (const line of splitter.end()) yield parseLine(line);
  } finally {
    if (!finished) await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}
