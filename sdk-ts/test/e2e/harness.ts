/**
 * Real vski processes for the SDK's end-to-end tests: the binary the Rust suite builds
 * (`VSKI_BIN`, default `../target/debug/vski`), on loopback with ephemeral ports and temporary
 * data directories, stopped when the test file ends.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

export const SECRET = "sdk-e2e-shared-secret-0123456789";
export const ADMIN = { email: "admin@example.com", password: "admin-pass-123" };

export const VSKI_BIN = process.env["VSKI_BIN"] ?? resolve(__dirname, "../../../target/debug/vski");

export interface Node {
  url: string;
  process: ChildProcess;
  dir: string;
  log: () => string;
  stop: () => void;
}

const running: Node[] = [];

/** Starts `vski serve` with `env` and resolves once it listens and `/health` answers. */
export async function startNode(env: Record<string, string> = {}): Promise<Node> {
  const dir = mkdtempSync(join(tmpdir(), "vski-sdk-"));
  const child = spawn(
    VSKI_BIN,
    ["serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2", "--data-dir", join(dir, "data")],
    {
      env: { PATH: process.env["PATH"] ?? "", RUST_LOG: "info,vski::access=warn", JWT_SECRET: SECRET, ...env },
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  let log = "";
  child.stderr!.on("data", (d) => (log += d.toString()));
  const url = await new Promise<string>((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`vski did not listen in 30 s:\n${log}`)), 30_000);
    child.on("exit", (code) => fail(new Error(`vski exited with ${code}:\n${log}`)));
    const check = () => {
      const m = /listening on (http:\/\/\S+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        ok(m[1]!);
      } else {
        setTimeout(check, 20);
      }
    };
    check();
  });
  const node: Node = {
    url,
    process: child,
    dir,
    log: () => log,
    stop: () => {
      child.kill("SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    },
  };
  running.push(node);
  await waitFor("/health", async () => (await fetch(url + "/health")).status === 200);
  return node;
}

/** The installer token a master with no admin keeps in its data directory. */
export function installToken(node: Node): string {
  return readFileSync(join(node.dir, "data", ".install_token"), "utf8").trim();
}

/** A replica of `master` (its health answers 200 once it holds data). */
export function startReplica(master: Node, env: Record<string, string> = {}): Promise<Node> {
  return startNode({ REPLICA_MODE: "replica", MASTER_URL: master.url, ...env });
}

export function stopAll(): void {
  for (const n of running.splice(0)) n.stop();
}

/** Polls `f` until it is true, for at most `ms`. */
export async function waitFor(what: string, f: () => Promise<boolean>, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await f()) return;
    } catch {
      // Not yet.
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
