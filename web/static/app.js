/**
 * The llm-relay chat page: a reference client for both transports of `/api/chat`.
 *
 * - EventSource: `GET /api/chat?prompt=...&resume=1`, Server-Sent Events. The first event, `stream`, names the
 *   stream; deltas are default `message` events, the end is `event: done`, a failure is `event: error` with JSON.
 *   On either terminal event the page calls `close()`. A lost connection is left to the browser: it reconnects
 *   with `Last-Event-ID` and the relay resumes the same reply after the last event it delivered.
 * - fetch NDJSON: `POST /api/chat` with the conversation so far and `"resume": true`, one JSON object per line,
 *   read with `readNDJSON` (ndjson.js). On a network error the page resumes with
 *   `GET /api/streams/{id}?after=<last seq>` (the response's `X-Stream-Id` names the stream).
 * - Stop sends `DELETE /api/streams/{id}`, which cancels the generation (and the upstream request) at once,
 *   then closes the connection.
 * - With API keys (`settings.authRequired`), every request carries `Authorization: Bearer <key>` (key.js), and
 *   the SSE transport is a fetch read with sse.js instead of EventSource, which cannot send that header.
 *
 * Model output is only ever inserted as text (Text nodes, textContent), never parsed as HTML.
 * The server's settings arrive as a JSON data block (`#relay-settings`), rendered by server/page.py.
 */

import { authHeaders, loadKey, saveKey } from "./key.js";
import { NDJSONError, readNDJSON } from "./ndjson.js";
import { SSEError, readSSEItems } from "./sse.js";

import { ReplyParts, toolCallPiece } from "./reply-parts.js"; // reasoning, tool calls, refusals

const settings = JSON.parse(document.getElementById("relay-settings").textContent);
const CHAT_URL = new URL(`${settings.apiBase}/chat`, document.baseURI);
const streamURL = (id) => new URL(`${settings.apiBase}/streams/${encodeURIComponent(id)}`, document.baseURI);
/** How often, and after how long, fetch mode tries to resume a stream whose connection was lost. */
const RESUME_ATTEMPTS = 5;
const RESUME_DELAY_MS = 500;
// With API keys, SSE is read with fetch: EventSource cannot send the Authorization header (key.js, sse.js).
const TRANSPORTS = { sse: settings.authRequired ? "SSE (fetch)" : "EventSource", ndjson: "fetch NDJSON" };
const ACCEPT = { sse: "text/event-stream", ndjson: "application/x-ndjson" };

const $ = (id) => document.getElementById(id);
const view = {
  transcript: $("transcript"),
  emptyHint: $("empty-hint"),
  form: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  status: $("status"),
  transport: $("stat-transport"),
  ttft: $("stat-ttft"),
  tokens: $("stat-tokens"),
  rate: $("stat-rate"),
  state: $("stat-state"),
};

/**
 * `text` as well-formed Unicode: each lone UTF-16 surrogate becomes U+FFFD. A JavaScript string may hold one (a
 * script, an odd paste, a reply that carried one); URLs and TextEncoder replace it this way already, but
 * JSON.stringify sends it as a `\ud800` escape, which the server refuses (400). Kept in the conversation, it would
 * fail every later fetch turn, so both the prompt and the history go through here.
 */
function wellFormed(text) {
  if (typeof text.toWellFormed === "function") return text.toWellFormed();
  return text.replace(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, "\uFFFD");
}

/** Finished turns as {role, content}: what fetch mode sends, so a second question sees the first answer. */
const history = [];
/** The AbortController of the reply being streamed, or null. */
let active = null;
/** Bumped by "New chat", so that a reply still finishing does not join the new conversation. */
let conversation = 0;

// -- transports ------------------------------------------------------------------------------------------------
// Each streams one reply into `sink.delta(text)` and resolves with its outcome, one of:
//   {kind: "done", finish_reason, usage}     the reply is complete
//   {kind: "stopped"}                        the user pressed Stop
//   {kind: "error", error: {type, message}}  the server reported an error (in-band, or as an HTTP refusal)
//   {kind: "connection-error", message}      no answer from the server: network, refusal EventSource hides
// `sink.reconnecting(bool)` says when the connection was lost and the page is resuming the stream.
// `sink.reasoning(text)`, `sink.toolCall({index, id, name, arguments})` and `sink.refusal(text)` take the other
// parts of a reply.

/** The reply's other parts, by SSE event name / NDJSON type, from the event's parsed JSON into `sink`. */
const PARTS = {
  reasoning: (sink, data) => typeof data.content === "string" && sink.reasoning(data.content),
  refusal: (sink, data) => typeof data.content === "string" && sink.refusal(data.content),
  tool_call: (sink, data) => {
    const piece = toolCallPiece(data);
    if (piece) sink.toolCall(piece);
  },
};

/** Whether `kind` is one of the reply's other parts; if so, `data` went to `sink`. */
function forwardParts(kind, data, sink) {
  const forward = Object.hasOwn(PARTS, kind) ? PARTS[kind] : null;
  if (forward && data !== null && typeof data === "object") forward(sink, data);
  return forward !== null;
}

/** Stop the stream on the server (cancels the upstream request at once); best effort. */
function stopOnServer(streamId) {
  if (!streamId) return;
  fetch(streamURL(streamId), { method: "DELETE", headers: authHeaders() }).catch(() => {});
}

function errorFrom(data) {
  try {
    const { error } = JSON.parse(data);
    if (error && typeof error.type === "string") return { type: error.type, message: String(error.message ?? "") };
  } catch {
    // fall through: not the documented shape
  }
  return { type: "protocol_error", message: "the server sent an error this page cannot read" };
}

function viaEventSource(prompt, sink, signal) {
  return new Promise((resolve) => {
    const url = new URL(CHAT_URL);
    url.searchParams.set("prompt", prompt);
    url.searchParams.set("resume", "1");
    // No withCredentials: the API never uses cookies, and CORS with credentials would need more than it allows.
    const source = new EventSource(url);
    let settled = false;
    let streamId = null;
    const finish = (outcome) => {
      if (settled) return;
      settled = true;
      source.close();
      signal.removeEventListener("abort", onAbort);
      resolve(outcome);
    };
    const onAbort = () => {
      stopOnServer(streamId);
      finish({ kind: "stopped" });
    };
    signal.addEventListener("abort", onAbort);

    source.addEventListener("open", () => sink.reconnecting(false));
    source.addEventListener("stream", (event) => {
      try {
        streamId = JSON.parse(event.data).stream_id;
      } catch {
        // without the id, Stop only closes the connection (the server cancels after its resume grace)
      }
    });
    source.addEventListener("message", (event) => {
      try {
        sink.delta(JSON.parse(event.data).content);
      } catch {
        finish({ kind: "error", error: { type: "protocol_error", message: "a delta event is not JSON" } });
      }
    });
    for (const kind of Object.keys(PARTS)) {
      source.addEventListener(kind, (event) => {
        try {
          forwardParts(kind, JSON.parse(event.data), sink);
        } catch {
          finish({ kind: "error", error: { type: "protocol_error", message: `a ${kind} event is not JSON` } });
        }
      });
    }
    source.addEventListener("done", (event) => {
      let done = {};
      try {
        done = JSON.parse(event.data);
      } catch {
        // the reply is complete either way
      }
      finish({ kind: "done", finish_reason: done.finish_reason, usage: done.usage });
    });
    // One listener, two kinds of "error": the server's `event: error` is a MessageEvent with JSON data; a
    // connection error is a plain Event without data. While the browser reconnects (readyState CONNECTING) the
    // relay resumes the stream after the last event it delivered, so the page only says it is reconnecting; a
    // closed EventSource (a refusal, or a stream that can no longer be resumed) ends the turn.
    source.addEventListener("error", (event) => {
      if (event instanceof MessageEvent) {
        finish({ kind: "error", error: errorFrom(event.data) });
      } else if (source.readyState === EventSource.CLOSED) {
        finish({
          kind: "connection-error",
          message:
            "the server refused the stream or could not be reached (EventSource cannot show why; " +
            "fetch NDJSON shows the server's reason)",
        });
      } else {
        sink.reconnecting(true);
      }
    });
  });
}

async function refusal(response) {
  // A refusal before streaming is an HTTP status with {"error": {type, message}} (and Retry-After on 429).
  let error;
  try {
    error = errorFrom(await response.text());
  } catch {
    error = { type: "protocol_error", message: "" };
  }
  if (error.type === "protocol_error") error = { type: `http_${response.status}`, message: response.statusText };
  const retryAfter = response.headers.get("Retry-After");
  if (retryAfter) error.message += ` (retry after ${retryAfter} s)`;
  return { kind: "error", error, status: response.status };
}

/** `framing` is "ndjson", or "sse" when a key is needed (EventSource cannot send one). */
async function viaFetch(messages, sink, signal, framing = "ndjson") {
  let response;
  try {
    response = await fetch(CHAT_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: ACCEPT[framing], ...authHeaders() },
      body: JSON.stringify({ messages, resume: true }),
      signal,
    });
  } catch (err) {
    if (signal.aborted) return { kind: "stopped" };
    return { kind: "connection-error", message: `the request failed: ${err.message}` };
  }
  if (!response.ok) return refusal(response);
  const streamId = response.headers.get("X-Stream-Id");
  const onAbort = () => stopOnServer(streamId);
  signal.addEventListener("abort", onAbort);
  try {
    let seq = 0; // the last event received: a resume asks for what follows it
    for (let attempt = 0; ; attempt += 1) {
      const onSeq = (n) => {
        seq = n;
      };
      const read = await readReply(response, sink, signal, onSeq, framing);
      if (read.kind !== "lost" || !streamId || attempt >= RESUME_ATTEMPTS) {
        return read.kind === "lost" ? { kind: "connection-error", message: read.message } : read;
      }
      sink.reconnecting(true);
      await new Promise((resolve) => setTimeout(resolve, RESUME_DELAY_MS * (attempt + 1)));
      if (signal.aborted) return { kind: "stopped" };
      try {
        const url = streamURL(streamId);
        url.searchParams.set("after", String(seq));
        response = await fetch(url, { headers: { Accept: ACCEPT[framing], ...authHeaders() }, signal });
      } catch (err) {
        if (signal.aborted) return { kind: "stopped" };
        response = null;
      }
      if (response && response.status === 204) return { kind: "connection-error", message: "the reply had ended" };
      if (response && !response.ok) return refusal(response);
      if (response) sink.reconnecting(false);
    }
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

/**
 * One response's NDJSON lines (or SSE events, read as the same objects) into `sink`; `{kind: "lost"}` when the
 * connection broke before the end.
 */
async function readReply(response, sink, signal, onSeq, framing = "ndjson") {
  if (!response) return { kind: "lost", message: "the server could not be reached" };
  try {
    const items = framing === "sse" ? readSSEItems(response.body) : readNDJSON(response.body);
    for await (const item of items) {
      if (typeof item.seq === "number") onSeq(item.seq);
      switch (item.type) {
        case "delta":
          sink.delta(item.content);
          break;
        case "done":
          return { kind: "done", finish_reason: item.finish_reason, usage: item.usage };
        case "error":
          return { kind: "error", error: errorFrom(JSON.stringify(item)) };
        default:
          if (forwardParts(item.type, item, sink)) break;
        // "ping" keeps a quiet connection open; other types are for later versions: skip both.
      }
    }
  } catch (err) {
    if (signal.aborted) return { kind: "stopped" };
    if (err instanceof NDJSONError || err instanceof SSEError) {
      return { kind: "error", error: { type: "protocol_error", message: err.message } };
    }
    return { kind: "lost", message: `the connection was lost: ${err.message}` };
  }
  return { kind: "lost", message: "the stream ended before its done line" };
}

// -- the transcript --------------------------------------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** One question and its reply. The reply grows as a single Text node: text in, never markup. */
class Turn {
  constructor(prompt, transport) {
    this.text = "";
    this.node = element("article", "turn");
    const question = element("section", "message user");
    question.append(element("h2", "who", "You"), element("p", "text", prompt));
    this.answer = element("section", "message assistant");
    this.answer.dataset.state = "streaming";
    this.answer.dataset.transport = transport;
    const who = element("h2", "who", settings.model);
    who.append(element("span", "via", ` · ${TRANSPORTS[transport]}`));
    this.body = element("p", "text reply");
    this.textNode = document.createTextNode("");
    this.body.append(this.textNode);
    this.answer.append(who, this.body);
    this.node.append(question, this.answer);
    this.parts = new ReplyParts(this.answer, this.body);
  }

  append(text) {
    this.text += text;
    this.textNode.appendData(text);
  }

  end(state) {
    this.answer.dataset.state = state;
    this.parts.end();
  }

  /** A problem shown in the reply: `kind` is "error" (the server said so) or "connection-error" (it said nothing). */
  problem(kind, title, detail) {
    const box = element("p", `problem ${kind}`);
    box.setAttribute("role", "alert");
    box.append(element("strong", "", title), document.createTextNode(` ${detail}`));
    this.answer.append(box);
  }
}

function scrolledToEnd() {
  const t = view.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 48;
}

function keepAtEnd(wasAtEnd) {
  if (wasAtEnd) view.transcript.scrollTop = view.transcript.scrollHeight;
}

// -- the status line -------------------------------------------------------------------------------------------

class Meter {
  constructor() {
    this.started = performance.now();
    this.first = null;
    this.last = null;
    this.tokens = 0;
  }

  token() {
    const now = performance.now();
    if (this.first === null) this.first = now;
    this.last = now;
    this.tokens += 1;
  }

  get ttft() {
    return this.first === null ? "–" : `${Math.round(this.first - this.started)} ms`;
  }

  get rate() {
    // Tokens after the first over the time they took: the pace of the stream itself, not of the model's start.
    if (this.tokens < 2 || this.last <= this.first) return "–";
    return ((this.tokens - 1) / ((this.last - this.first) / 1000)).toFixed(1);
  }

  get seconds() {
    return `${((performance.now() - this.started) / 1000).toFixed(1)} s`;
  }
}

function showStats(meter) {
  view.ttft.textContent = meter.ttft;
  view.tokens.textContent = String(meter.tokens);
  view.rate.textContent = meter.rate;
}

function showState(state, text) {
  view.status.dataset.state = state;
  view.state.textContent = text;
}

function selectedTransport() {
  return view.form.elements.transport.value === "ndjson" ? "ndjson" : "sse";
}

function setBusy(busy) {
  view.send.disabled = busy;
  view.stop.disabled = !busy;
  view.transcript.setAttribute("aria-busy", String(busy));
  for (const input of view.form.elements.transport) input.disabled = busy;
}

// -- sending ---------------------------------------------------------------------------------------------------

async function send(typed) {
  const prompt = wellFormed(typed);
  const transport = selectedTransport();
  const startedIn = conversation;
  const turn = new Turn(prompt, transport);
  const meter = new Meter();
  const controller = new AbortController();
  active = controller;
  view.emptyHint.hidden = true;
  const wasAtEnd = scrolledToEnd();
  view.transcript.append(turn.node);
  keepAtEnd(wasAtEnd);
  view.transport.textContent = TRANSPORTS[transport];
  showStats(meter);
  showState("streaming", "waiting for the first token…");
  setBusy(true);

  const sink = {
    reconnecting(lost) {
      if (lost) showState("reconnecting", "reconnecting…");
      else if (view.status.dataset.state === "reconnecting") showState("streaming", "streaming…");
    },
    delta(text) {
      if (typeof text !== "string") return;
      progress(() => turn.append(text));
    },
    reasoning: (text) => progress(() => turn.parts.reasoning(text)),
    toolCall: (piece) => progress(() => turn.parts.toolCall(piece)),
    refusal: (text) => progress(() => turn.parts.refusal(text)),
  };
  /** Any part of the reply is progress: the first one ends the wait, each counts as a token. */
  function progress(show) {
    const atEnd = scrolledToEnd();
    if (meter.first === null) showState("streaming", "streaming…");
    meter.token();
    show();
    showStats(meter);
    keepAtEnd(atEnd);
  }
  // The server caps the number of messages; the newest ones matter most.
  const messages = [...history, { role: "user", content: prompt }].slice(-settings.maxMessages);
  const outcome =
    transport === "sse" && !settings.authRequired
      ? await viaEventSource(prompt, sink, controller.signal)
      : await viaFetch(messages, sink, controller.signal, transport);

  active = null;
  showStats(meter);
  turn.end(outcome.kind);
  switch (outcome.kind) {
    case "done":
      showState("done", `done · ${outcome.finish_reason ?? "?"} · ${meter.seconds}`);
      break;
    case "stopped":
      showState("stopped", `stopped after ${meter.seconds}`);
      break;
    case "error":
      turn.problem("error", "The server reported an error:", `${outcome.error.type}: ${outcome.error.message}`);
      showState("error", `error · ${outcome.error.type}`);
      break;
    default:
      turn.problem("connection-error", "Connection error:", outcome.message);
      showState("connection-error", "connection error");
  }
  // A stopped reply stays in the conversation as far as it got; a failed turn is left out, so it can be retried.
  if ((outcome.kind === "done" || outcome.kind === "stopped") && turn.text && startedIn === conversation) {
    history.push({ role: "user", content: prompt }, { role: "assistant", content: wellFormed(turn.text) });
  }
  keepAtEnd(wasAtEnd || scrolledToEnd());
  setBusy(false);
  view.prompt.focus();
}

view.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = view.prompt.value;
  if (active || !prompt.trim()) return;
  view.prompt.value = "";
  send(prompt);
});

view.prompt.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line; not while an input method is composing a character.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!active) view.form.requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && active) active.abort();
});

view.stop.addEventListener("click", () => active?.abort());

view.newChat.addEventListener("click", () => {
  active?.abort();
  conversation += 1;
  history.length = 0;
  for (const turn of view.transcript.querySelectorAll(".turn")) turn.remove();
  view.emptyHint.hidden = false;
  showState("idle", "ready");
  view.prompt.focus();
});

view.form.addEventListener("change", (event) => {
  if (event.target.name === "transport" && !active) view.transport.textContent = TRANSPORTS[selectedTransport()];
});

/** The API key field (only on a relay with --api-keys-file): kept for this tab's session as it is typed. */
function setupKeyField() {
  const input = $("api-key");
  if (!input) return;
  input.value = loadKey();
  input.addEventListener("input", () => saveKey(input.value.trim()));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault(); // Enter in the field: nothing to submit, the key is already kept
    view.prompt.focus();
  });
  $("forget-key").addEventListener("click", () => {
    input.value = "";
    saveKey("");
    input.focus();
  });
  if (!input.value) input.focus();
}

setupKeyField();
view.prompt.maxLength = settings.maxMessageChars;
view.transport.textContent = TRANSPORTS[selectedTransport()];
document.documentElement.dataset.ready = "true";
