/**
 * Runs every ```js block of wiki/SDK.md, in order, as one module of a scratch app that installed
 * the packed SDK, against a real master and a replica that polls once a minute.
 */
import { execFile } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, expect, it } from "vitest";
import { startNode, startReplica, stopAll, installToken } from "./harness";

const page = resolve(__dirname, "../../../wiki/SDK.md");
const app = resolve(__dirname, ".app");

function jsBlocks(markdown: string): string {
  const out: string[] = [];
  let inside = false;
  for (const line of markdown.split("\n")) {
    if (inside && line.trimStart().startsWith("```")) inside = false;
    else if (inside) out.push(line);
    else if (line.trim() === "```js") inside = true;
  }
  return out.join("\n");
}

afterAll(() => stopAll());

it("wiki/SDK.md runs as written", async () => {
  const master = await startNode();
  const init = await fetch(master.url + "/api/admins/init", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${installToken(master)}` },
    body: JSON.stringify({ email: "admin@example.com", password: "change-me-now" }),
  });
  expect(init.status).toBe(200);
  const replica = await startReplica(master, { SYNC_MODE: "poll", SYNC_INTERVAL: "60" });
  const script = jsBlocks(readFileSync(page, "utf8"));
  expect(script.length).toBeGreaterThan(0);
  const file = join(app, "wiki-sdk.mjs");
  writeFileSync(file, script);
  const { stdout } = await promisify(execFile)("node", [file], {
    cwd: app,
    env: { ...process.env, VSKI_URL: master.url, REPLICA_URL: replica.url },
  });
  const lines = stdout.trim().split("\n");
  expect(lines).toEqual([
    "admin: true",
    "list: 1 Hello 1",
    "full list: 1 first: true",
    "filter: title ~ 'it\\'s\\' || 1=1 || \\''",
    "me: reader@example.com",
    "read your write: read me back from replica " + (await fetch(replica.url + "/health")).headers.get("x-replica-id"),
    "read-only replica: true",
    "databases: true",
    "realtime: create: live, delete: live",
    "error: 400 [ 'views' ]",
  ]);
});
