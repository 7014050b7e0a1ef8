/**
 * The client's API key, when the relay is started with `--api-keys-file`: the page asks for it and sends it as
 * `Authorization: Bearer <key>` on every API request (start, resume, stop). It is never put in a URL (URLs end up
 * in history, logs and Referer headers) and never written to the console.
 *
 * It is kept for the tab's session only: sessionStorage (cleared when the tab closes, not shared with other tabs),
 * or this module's memory where storage is unavailable (a sandboxed frame, storage turned off). Never
 * localStorage or a cookie, which outlive the session.
 */

const STORAGE_NAME = "llm-relay.api-key";
let inMemory = "";

function storage() {
  try {
    return window.sessionStorage;
  } catch {
    return null; // access itself throws when storage is blocked
  }
}

/** The key entered in this tab's session, or "". */
export function loadKey() {
  try {
    return storage()?.getItem(STORAGE_NAME) ?? inMemory;
  } catch {
    return inMemory;
  }
}

/** Keep `key` for this tab's session; an empty key forgets it. */
export function saveKey(key) {
  inMemory = key;
  try {
    if (key) storage()?.setItem(STORAGE_NAME, key);
    else storage()?.removeItem(STORAGE_NAME);
  } catch {
    // quota or blocked storage: the key stays in memory until the page is left
  }
}

/** The headers that carry the key, to spread into a fetch's headers. */
export function authHeaders() {
  const key = loadKey().trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}
