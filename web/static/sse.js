/**
 * Server-Sent Events read from a stream of bytes, such as fetch's `response.body`, for the page's SSE transport
 * when the relay wants an API key: EventSource cannot send an Authorization header, fetch can.
 *
 * `SSEParser` follows the event stream interpretation of WHATWG HTML §9.2.6: UTF-8 with an optional leading BOM,
 * lines ended by CRLF, LF or CR (a CR at the end of one chunk may pair with an LF at the start of the next), `:`
 * comments skipped, one optional space after the colon removed, `data` lines joined with LF, an `id` with a NUL
 * ignored, and an event dispatched at a blank line only if it had data. `readSSEItems` turns the relay's events
 * into the objects its NDJSON framing sends (`{type, seq, ...}`), so one reader serves both transports.
 *
 * No DOM and no fetch here: the page (app.js) and node's test runner (tests/js/sse.test.mjs) both import it.
 */

/** A stream the relay would not send: an event whose data is not a JSON object. */
export class SSEError extends Error {
  constructor(message) {
    super(message);
    this.name = "SSEError";
  }
}

export class SSEParser {
  #decoder = new TextDecoder("utf-8"); // strips a leading BOM, keeps a split character for the next chunk
  #carry = "";
  #data = [];
  #event = "";
  #id = null;

  /** The events that `chunk` (a Uint8Array of UTF-8, or a string) completes: `{type, data, id}` each. */
  push(chunk) {
    const text = typeof chunk === "string" ? chunk : this.#decoder.decode(chunk, { stream: true });
    return this.#lines(this.#carry + text, false);
  }

  /** The end of the stream. An event without its blank line is discarded (§9.2.6: "incomplete"). */
  end() {
    return this.#lines(this.#carry + this.#decoder.decode(), true);
  }

  #lines(text, final) {
    const events = [];
    let start = 0;
    for (let i = 0; i < text.length; i += 1) {
      const c = text[i];
      if (c !== "\n" && c !== "\r") continue;
      // A CR as the last character may be the first half of a CRLF split between chunks: wait for the next one.
      if (c === "\r" && i === text.length - 1 && !final) break;
      this.#line(text.slice(start, i), events);
      if (c === "\r" && text[i + 1] === "\n") i += 1;
      start = i + 1;
    }
    this.#carry = text.slice(start);
    if (final) this.#carry = ""; // a last line without its end belongs to an event never dispatched
    return events;
  }

  #line(line, events) {
    if (line === "") {
      if (this.#data.length) events.push({ type: this.#event || "message", data: this.#data.join("\n"), id: this.#id });
      this.#data = [];
      this.#event = "";
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") this.#data.push(value);
    else if (name === "event") this.#event = value;
    else if (name === "id" && !value.includes("\0")) this.#id = value;
    // retry and unknown fields: nothing for this reader
  }
}

/** `{type, data, id}` for each event of a stream of bytes (an async iterable of Uint8Array). */
export async function* readSSE(body) {
  const parser = new SSEParser();
  for await (const chunk of body) yield* parser.push(chunk);
  yield* parser.end();
}

/**
 * The relay's SSE events as its NDJSON objects: a default event is `{type: "delta", ...data}`, a named one
 * `{type: name, ...data}`; `seq` is the number after the slash of the event's id (`<stream-id>/<seq>`).
 */
export async function* readSSEItems(body) {
  for await (const event of readSSE(body)) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      data = null;
    }
    if (typeof data !== "object" || data === null || Array.isArray(data)) {
      throw new SSEError(`the data of a "${event.type}" event is not a JSON object`);
    }
    const seq = Number((event.id ?? "").split("/")[1]);
    yield { ...data, type: event.type === "message" ? "delta" : event.type, seq: Number.isInteger(seq) ? seq : null };
  }
}
