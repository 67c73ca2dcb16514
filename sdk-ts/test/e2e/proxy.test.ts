/**
 * The SDK behind the HAProxy recipe of deploy/ (rendered with deploy/render, run by the real
 * haproxy): one URL for everything. The client pins itself to the replica that first answered
 * and reads its own writes through replicas that poll only once a minute. PocketBase's own
 * SDK, unchanged, in Chromium, on a page served through the same origin, reads its writes too:
 * the master sets the position cookie (POSITION_COOKIE=on) and the replicas honour it.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer, type Server } from "node:http";
import { createServer } from "node:net";
import { chromium } from "playwright-core";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll, expect, it } from "vitest";
import { ADMIN, type Node, installToken, startNode, startReplica, stopAll, waitFor } from "./harness";

type Sdk = typeof import("../../src/index");
const repo = resolve(__dirname, "../../..");
let sdk: Sdk;
let master: Node;
let haproxy: ChildProcess | undefined;
let proxyUrl = "";
let site: Server | undefined;

const CHROMIUM = process.env["CHROMIUM_PATH"] ?? "/usr/bin/chromium";
const pbSdk = join(resolve(__dirname, "../.."), "node_modules/pocketbase/dist/pocketbase.umd.js");
const PAGE = `<!doctype html>
<meta charset="utf-8">
<script src="/app/pocketbase.umd.js"></script>
<script>
  // Create, then read back at once, through whatever node the proxy picks.
  window.run = async (n) => {
    const pb = new PocketBase(location.origin);
    pb.autoCancellation(false);
    let misses = 0;
    for (let i = 0; i < n; i++) {
      const made = await pb.collection("posts").create({ title: "pb " + i });
      try {
        const got = await pb.collection("posts").getOne(made.id);
        if (got.title !== "pb " + i) misses++;
      } catch (e) {
        misses++;
      }
    }
    return misses;
  };
  window.ready = true;
</script>`;

function freePort(): Promise<number> {
  return new Promise((ok) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => ok(typeof a === "object" && a ? a.port : 0));
    });
  });
}

beforeAll(async () => {
  sdk = (await import(pathToFileURL(join(__dirname, ".app/node_modules/@vski/sdk/dist/index.js")).href)) as Sdk;
  master = await startNode({ POSITION_COOKIE: "on" });
  const admin = new sdk.VskiClient(master.url, { authStore: new sdk.BaseAuthStore() });
  await admin.admins.init(ADMIN.email, ADMIN.password, installToken(master));
  await admin.settings.collections.create({
    name: "posts",
    listRule: "",
    viewRule: "",
    createRule: "",
    fields: [{ name: "title", type: "text" }],
  });
  const env = { SYNC_MODE: "poll", SYNC_INTERVAL: "60" };
  const r1 = await startReplica(master, { ...env, REPLICA_ID: "r001" });
  const r2 = await startReplica(master, { ...env, REPLICA_ID: "r002" });
  const port = await freePort();
  const cfg = join(mkdtempSync(join(tmpdir(), "vski-haproxy-")), "haproxy.cfg");
  const host = (n: Node) => n.url.replace("http://", "");
  // The page and PocketBase's SDK, served under /app/ of the same origin as the API.
  site = createHttpServer((req, res) => {
    if (req.url === "/app/pocketbase.umd.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(readFileSync(pbSdk));
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(PAGE);
    }
  });
  await new Promise<void>((ok) => site!.listen(0, "127.0.0.1", ok));
  const sitePort = (site.address() as { port: number }).port;
  const rendered = execFileSync(join(repo, "deploy/render"), [
      join(repo, "deploy/haproxy/haproxy.cfg.tmpl"),
      `LISTEN_PORT=${port}`,
      `MASTER_ADDR=${host(master)}`,
      `REPLICA1_ADDR=${host(r1)}`,
      `REPLICA2_ADDR=${host(r2)}`,
      "CHECK_INTERVAL=1",
  ])
    .toString()
    .replace("    # 1. Writes first", "    use_backend site if { path_beg /app/ }\n    # 1. Writes first")
    .concat(`\nbackend site\n    server site 127.0.0.1:${sitePort} no-check\n`);
  writeFileSync(cfg, rendered);
  haproxy = spawn("haproxy", ["-db", "-f", cfg], { stdio: "ignore" });
  proxyUrl = `http://127.0.0.1:${port}`;
  await waitFor("haproxy", async () => (await fetch(proxyUrl + "/api/collections/posts/records")).status === 200);
});

afterAll(() => {
  haproxy?.kill("SIGKILL");
  site?.close();
  stopAll();
});

it("through the proxy the client keeps its replica pin and reads its own writes", async () => {
  const client = new sdk.VskiClient(proxyUrl, { authStore: new sdk.BaseAuthStore() });
  // Until a replica answered there is no pin; round robin may hand the first reads to the master.
  await waitFor("a replica to answer", async () => {
    await client.collection("posts").getList(1, 1, { requestKey: null });
    return client.replicaMode === "replica";
  });
  const pinned = client.replicaId;
  expect(["r001", "r002"]).toContain(pinned);
  let seen = 0;
  for (let i = 0; i < 50; i++) {
    const made = await client.collection("posts").create({ title: `via proxy ${i}` });
    expect(client.replicaMode).toBe("master");
    const got = await client.collection("posts").getOne(made.id);
    if (got["title"] === `via proxy ${i}` && client.replicaId === pinned && client.replicaMode === "replica") seen++;
  }
  expect(seen).toBe(50);
});

it("PocketBase's SDK, unchanged, reads its own writes through the proxy: 0 of 60 missed", async () => {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
  try {
    const page = await browser.newPage();
    await page.goto(proxyUrl + "/app/");
    await page.waitForFunction(() => (window as any).ready === true);
    const misses = await page.evaluate((n) => (window as any).run(n), 60);
    expect(misses).toBe(0);
  } finally {
    await browser.close();
  }
});
