// The relay around the scripted provider (tests/scripted_relay.py), as a process on a free port, for the tests
// that drive it with real client packages. PYTHON names the interpreter (the Makefile passes the venv's).
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../../", import.meta.url));

function python() {
  if (process.env.PYTHON) return process.env.PYTHON;
  const venv = `${ROOT}.venv/bin/python`;
  return existsSync(venv) ? venv : "python3";
}

/** Start the scripted relay; resolves to { base, stop } once it listens. Heartbeats go out every 50 ms of quiet,
 * so the clients' parsers meet them between events (every pause of the "slow" and "quiet" scripts). */
export async function startScriptedRelay() {
  const child = spawn(python(), ["-m", "tests.scripted_relay", "--port", "0", "--heartbeat", "0.05"], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (chunk) => {
    stderr += chunk;
  });
  const base = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`the relay did not start: ${stderr}`)), 60_000);
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const match = out.match(/scripted relay at (http:\/\/\S+)/);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`the relay exited (${code}): ${stderr}`));
    });
  });
  const stop = () =>
    new Promise((resolve) => {
      if (child.exitCode !== null) return resolve();
      child.once("exit", resolve);
      child.kill();
    });
  return { base, stop };
}

/** Collect what `console.warn` and `console.error` print while `body` runs (the SDKs warn through them). */
export async function consoleWarnings(body) {
  const seen = [];
  const { warn, error } = console;
  console.warn = (...args) => seen.push(args.join(" "));
  console.error = (...args) => seen.push(args.join(" "));
  try {
    await body();
  } finally {
    console.warn = warn;
    console.error = error;
  }
  return seen;
}
