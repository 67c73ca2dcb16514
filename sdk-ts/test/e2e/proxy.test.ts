/**
 * The SDK behind the HAProxy recipe of deploy/ (rendered with deploy/render, run by the real
 * haproxy): one URL for everything. The client pins itself to the replica that first answered
 * and reads its own writes through replicas that poll only once a minute.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
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
  master = await startNode();
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
  writeFileSync(
    cfg,
    execFileSync(join(repo, "deploy/render"), [
      join(repo, "deploy/haproxy/haproxy.cfg.tmpl"),
      `LISTEN_PORT=${port}`,
      `MASTER_ADDR=${host(master)}`,
      `REPLICA1_ADDR=${host(r1)}`,
      `REPLICA2_ADDR=${host(r2)}`,
      "CHECK_INTERVAL=1",
    ]),
  );
  haproxy = spawn("haproxy", ["-db", "-f", cfg], { stdio: "ignore" });
  proxyUrl = `http://127.0.0.1:${port}`;
  await waitFor("haproxy", async () => (await fetch(proxyUrl + "/api/collections/posts/records")).status === 200);
});

afterAll(() => {
  haproxy?.kill("SIGKILL");
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
