/**
 * The official PocketBase JS SDK (npm `pocketbase`), unchanged, in headless Chromium: it signs
 * in and subscribes through Server-Sent Events, on the master and on a replica started with
 * `REPLICA_REALTIME=on`, and receives the creates and updates written on the master.
 */
import { createServer, type Server } from "node:http";
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { chromium, type Browser } from "playwright-core";
import { afterAll, beforeAll, expect, it } from "vitest";
import { ADMIN, type Node, startNode, startReplica, stopAll, waitFor, installToken } from "./harness";

const CHROMIUM = process.env["CHROMIUM_PATH"] ?? "/usr/bin/chromium";
const pbSdk = join(resolve(__dirname, "../.."), "node_modules/pocketbase/dist/pocketbase.umd.js");

let master: Node;
let replica: Node;
let site: Server;
let siteUrl = "";
let browser: Browser;
let token = "";

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>PocketBase SDK against vski</title>
<script src="/pocketbase.umd.js"></script>
<script>
  window.events = [];
  window.watch = async (url) => {
    const pb = new PocketBase(url);
    await pb.collection("users").authWithPassword("reader@example.com", "reader-pass-1");
    await pb.collection("notes").subscribe("*", (e) => window.events.push({ topic: "*", action: e.action, body: e.record.body, id: e.record.id }));
    return pb.realtime.clientId;
  };
  window.superuser = async (url, email, password) => {
    try {
      return await superuser(url, email, password);
    } catch (e) {
      return { error: String(e) + " " + JSON.stringify(e.response ?? {}) };
    }
  };
  const superuser = async (url, email, password) => {
    // Both clients keep their session in the page's localStorage: one after the other.
    const pb = new PocketBase(url);
    await pb.collection("_superusers").authWithPassword(email, password);
    const isSuperuser = pb.authStore.isSuperuser;
    const collectionName = pb.authStore.record.collectionName;
    const collections = await pb.collections.getFullList();
    await pb.collection("_superusers").authRefresh();
    const afterRefresh = pb.authStore.isSuperuser;
    const user = new PocketBase(url);
    await user.collection("users").authWithPassword("reader@example.com", "reader-pass-1");
    return {
      isSuperuser,
      afterRefresh,
      collectionName,
      collections: collections.map((c) => c.name).includes("notes"),
      userIsSuperuser: user.authStore.isSuperuser,
    };
  };
  window.ready = true;
</script>`;

async function api(url: string, method: string, path: string, body?: unknown): Promise<any> {
  const res = await fetch(url + path, {
    method,
    headers: { "content-type": "application/json", authorization: token },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  expect(res.status, text).toBe(200);
  return JSON.parse(text);
}

beforeAll(async () => {
  master = await startNode();
  const r = await fetch(master.url + "/api/admins/init", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${installToken(master)}` },
    body: JSON.stringify(ADMIN),
  });
  token = ((await r.json()) as { token: string }).token;
  await api(master.url, "POST", "/api/collections", {
    name: "notes",
    listRule: "@request.auth.id != '' && secret = false",
    viewRule: "@request.auth.id != ''",
    createRule: "",
    fields: [
      { name: "body", type: "text" },
      { name: "secret", type: "bool" },
    ],
  });
  await api(master.url, "POST", "/api/collections/users/records", {
    email: "reader@example.com",
    password: "reader-pass-1",
    passwordConfirm: "reader-pass-1",
  });
  replica = await startReplica(master, { REPLICA_REALTIME: "on", SYNC_INTERVAL: "60" });
  await waitFor("the replica to hold notes", async () => (await fetch(replica.url + "/api/collections/notes/records")).status === 200);
  site = createServer((req, res) => {
    if (req.url === "/pocketbase.umd.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(readFileSync(pbSdk));
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(PAGE);
    }
  });
  await new Promise<void>((ok) => site.listen(0, "127.0.0.1", ok));
  const addr = site.address();
  siteUrl = `http://127.0.0.1:${typeof addr === "object" && addr ? addr.port : 0}`;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
});

afterAll(async () => {
  await browser?.close();
  site?.close();
  stopAll();
});

it("the PocketBase SDK's isSuperuser is true after a _superusers sign-in, and false for a user", async () => {
  const page = await browser.newPage();
  await page.goto(siteUrl + "/");
  await page.waitForFunction(() => (window as any).ready === true);
  const out = await page.evaluate(
    ([url, email, password]) => (window as any).superuser(url, email, password),
    [master.url.replace("127.0.0.1", "localhost"), ADMIN.email, ADMIN.password],
  );
  expect(out).toEqual({
    isSuperuser: true,
    afterRefresh: true,
    collectionName: "_superusers",
    collections: true,
    userIsSuperuser: false,
  });
  await page.close();
});

it.each([
  ["master", () => master],
  ["replica with REPLICA_REALTIME=on", () => replica],
])("the PocketBase SDK subscribes on the %s and receives a create and an update", async (_, node) => {
  const page = await browser.newPage();
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(siteUrl + "/");
  await page.waitForFunction(() => (window as any).ready === true);
  const clientId = await page.evaluate((url) => (window as any).watch(url), node().url.replace("127.0.0.1", "localhost"));
  expect(clientId).toMatch(/^[a-z0-9]+$/);
  const made = await api(master.url, "POST", "/api/collections/notes/records", { body: "hello" });
  await api(master.url, "POST", "/api/collections/notes/records", { body: "hidden", secret: true });
  await api(master.url, "PATCH", `/api/collections/notes/records/${made.id}`, { body: "hello again" });
  await page.waitForFunction(() => (window as any).events.length >= 2, undefined, { timeout: 15_000 });
  // The listRule hides the secret note; give it time to arrive if it were going to.
  await new Promise((r) => setTimeout(r, 300));
  const events = await page.evaluate(() => (window as any).events);
  expect(errors).toEqual([]);
  expect(events).toEqual([
    { topic: "*", action: "create", body: "hello", id: made.id },
    { topic: "*", action: "update", body: "hello again", id: made.id },
  ]);
  await page.close();
});
