/**
 * The ESM build in headless Chromium (Debian's `chromium`, driven by `playwright-core`): a page
 * served from another origin loads the SDK, signs in and lists records from a real vski. This
 * is the browser path: fetch, CORS with the replica and position headers, localStorage.
 */
import { createServer, type Server } from "node:http";
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { chromium, type Browser } from "playwright-core";
import { afterAll, beforeAll, expect, it } from "vitest";
import { ADMIN, type Node, startNode, startReplica, stopAll, waitFor, installToken } from "./harness";

const CHROMIUM = process.env["CHROMIUM_PATH"] ?? "/usr/bin/chromium";
const dist = join(resolve(__dirname, ".app"), "node_modules/@vski/sdk/dist/index.js");

let master: Node;
let replica: Node;
let site: Server;
let siteUrl = "";
let browser: Browser;

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>vski sdk in a browser</title>
<script type="module">
  import { VskiClient } from "./sdk.js";
  window.run = async (masterUrl, replicaUrl) => {
    const client = new VskiClient(masterUrl, { readUrls: [replicaUrl] });
    const auth = await client.collection("users").authWithPassword("reader@example.com", "reader-pass-1");
    const made = await client.collection("notes").create({ body: "from the browser" });
    const list = await client.collection("notes").getList(1, 10, { sort: "created" });
    const readOnly = await new VskiClient(replicaUrl).collection("notes").create({ body: "x" }).catch((e) => e);
    return {
      user: auth.record.email,
      bodies: list.items.map((n) => n.body),
      made: made.id,
      replicaId: client.replicaId,
      replicaMode: client.replicaMode,
      position: client.position() ?? null,
      stored: JSON.parse(localStorage.getItem("vski_auth") || "{}").token === client.authStore.token,
      readOnly: readOnly.isReadOnlyReplica === true,
    };
  };
  window.ready = true;
</script>`;

beforeAll(async () => {
  master = await startNode();
  const r = await fetch(master.url + "/api/admins/init", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${installToken(master)}` },
    body: JSON.stringify(ADMIN),
  });
  const { token } = (await r.json()) as { token: string };
  const post = (path: string, body: unknown) =>
    fetch(master.url + path, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: token },
      body: JSON.stringify(body),
    }).then(async (res) => expect(res.status, await res.text()).toBe(200));
  await post("/api/collections", {
    name: "notes",
    listRule: "@request.auth.id != ''",
    viewRule: "@request.auth.id != ''",
    createRule: "@request.auth.id != ''",
    fields: [{ name: "body", type: "text" }],
  });
  await post("/api/collections/users/records", {
    email: "reader@example.com",
    password: "reader-pass-1",
    passwordConfirm: "reader-pass-1",
  });
  await post("/api/collections/notes/records", { body: "seeded" });
  replica = await startReplica(master, { REPLICA_ID: "r-browser", SYNC_INTERVAL: "60" });
  await waitFor("the replica to hold notes", async () => (await fetch(replica.url + "/api/collections/notes/records")).status === 200);

  // Another origin: the page and the SDK come from here, the API from the vski ports.
  site = createServer((req, res) => {
    if (req.url === "/sdk.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(readFileSync(dist));
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
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

afterAll(async () => {
  await browser?.close();
  site?.close();
  stopAll();
});

it("a page on another origin signs in, writes through the master and reads its write on the replica", async () => {
  const page = await browser.newPage();
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(siteUrl + "/");
  await page.waitForFunction(() => (window as any).ready === true);
  const out = await page.evaluate(
    ([m, r]) => (window as any).run(m, r),
    [master.url.replace("127.0.0.1", "localhost"), replica.url.replace("127.0.0.1", "localhost")],
  );
  expect(errors).toEqual([]);
  expect(out.user).toBe("reader@example.com");
  // Read on the replica right after the write: the session position made it wait for it.
  expect(out.bodies).toEqual(["seeded", "from the browser"]);
  expect([out.replicaId, out.replicaMode]).toEqual(["r-browser", "replica"]);
  // epoch.uid.version.hash: the hash names the history (16 hex characters of the chain).
  expect(out.position).toMatch(/^[a-z0-9]+\.[a-z0-9]+\.\d+\.[0-9a-f]{16}$/);
  expect(out.stored).toBe(true);
  expect(out.readOnly).toBe(true);
});
