/**
 * The parts of a reply besides its text: the model's reasoning, its tool calls and a refusal, as the relay streams
 * them (SSE `event: reasoning` / `tool_call` / `refusal`, NDJSON `type` of the same names; docs/http-api.md).
 *
 * - Reasoning is shown muted in a <details> element above the answer (open while it arrives, collapsible), and
 *   grows as one Text node.
 * - Each tool call is its name and its JSON arguments, as text: the first piece of call `index` names it, later
 *   pieces add fragments of the arguments, which are only concatenated (never parsed or evaluated).
 * - A refusal is shown in place of an answer.
 *
 * Model output is only ever inserted as text (Text nodes, textContent, dataset), never parsed as HTML.
 */

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A tool-call piece from an event's JSON, or null when it is not the documented shape. */
export function toolCallPiece(data) {
  if (data === null || typeof data !== "object") return null;
  const { index, id, name, arguments: args } = data;
  if (!Number.isInteger(index) || index < 0) return null;
  if ((id != null && typeof id !== "string") || (name != null && typeof name !== "string")) return null;
  if (args != null && typeof args !== "string") return null;
  return { index, id: id ?? null, name: name ?? null, arguments: args ?? "" };
}

export class ReplyParts {
  /** `answer` is the reply's section; `body` its text paragraph: reasoning goes before it, the rest after it. */
  constructor(answer, body) {
    this.answer = answer;
    this.body = body;
    this.reasoningBox = null;
    this.reasoningText = null;
    this.calls = new Map();
    this.callList = null;
    this.refusalBox = null;
    this.refusalText = null;
  }

  reasoning(text) {
    if (this.reasoningText === null) {
      const box = element("details", "reasoning");
      box.open = true;
      box.dataset.state = "streaming";
      const summary = element("summary", "reasoning-summary", "Reasoning");
      const body = element("p", "reasoning-text");
      this.reasoningText = document.createTextNode("");
      body.append(this.reasoningText);
      box.append(summary, body);
      this.body.before(box);
      this.reasoningBox = box;
    }
    this.reasoningText.appendData(text);
  }

  toolCall(piece) {
    let call = this.calls.get(piece.index);
    if (call === undefined) {
      if (this.callList === null) {
        this.callList = element("div", "tool-calls");
        (this.refusalBox ?? this.body).after(this.callList);
      }
      const node = element("div", "tool-call");
      node.dataset.index = String(piece.index);
      const name = element("code", "tool-name");
      const args = element("pre", "tool-arguments");
      const argsText = document.createTextNode("");
      args.append(argsText);
      node.append(element("span", "tool-label", "Tool call "), name, args);
      // Calls are kept in index order, whatever order their first pieces arrive in.
      const after = [...this.calls.entries()].filter(([index]) => index < piece.index).sort(([a], [b]) => b - a)[0];
      if (after) after[1].node.after(node);
      else this.callList.prepend(node);
      call = { node, name, argsText };
      this.calls.set(piece.index, call);
    }
    if (piece.id !== null && !call.node.dataset.callId) call.node.dataset.callId = piece.id;
    if (piece.name !== null && !call.name.textContent) call.name.textContent = piece.name;
    if (piece.arguments) call.argsText.appendData(piece.arguments);
  }

  refusal(text) {
    if (this.refusalText === null) {
      const box = element("p", "refusal");
      box.append(element("strong", "refusal-label", "Refused: "));
      this.refusalText = document.createTextNode("");
      box.append(this.refusalText);
      this.body.after(box);
      this.refusalBox = box;
    }
    this.refusalText.appendData(text);
  }

  /** The reply ended (done, stopped or failed): the reasoning is no longer live. */
  end() {
    if (this.reasoningBox) this.reasoningBox.dataset.state = "ended";
  }
}
