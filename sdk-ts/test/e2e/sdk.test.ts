/**
 * The packed SDK, installed into a scratch project, against a real master and two replicas.
 */
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN, type Node, SECRET, installToken, startNode, startReplica, stopAll, waitFor } from "./harness";

type Sdk = typeof import("../../src/index");

const app = resolve(__dirname, ".app");
let sdk: Sdk;
let master: Node;
let streaming: Node; // SYNC_MODE=stream, id r001
let polling: Node; // SYNC_MODE=poll SYNC_INTERVAL=60, id r002

/** A client with its own in-memory auth store (Node has no localStorage anyway). */
function client(url: string, options: Record<string, unknown> = {}) {
  return new sdk.VskiClient(url, { authStore: new sdk.BaseAuthStore(), ...options });
}

beforeAll(async () => {
  const entry = join(app, "node_modules/@vski/sdk/dist/index.js");
  sdk = (await import(pathToFileURL(entry).href)) as Sdk;
  master = await startNode();
  const admin = client(master.url);
  expect(await admin.admins.hasAdmins()).toBe(false);
  // Without the installer token: 401, and still no admin.
  const refused = await admin.admins.init(ADMIN.email, ADMIN.password, "wrong").catch((e) => e);
  expect(refused.status).toBe(401);
  expect(await admin.admins.hasAdmins()).toBe(false);
  const init = await admin.admins.init(ADMIN.email, ADMIN.password, installToken(master));
  expect(init.admin.email).toBe(ADMIN.email);
  expect(await admin.admins.hasAdmins()).toBe(true);
  await admin.settings.collections.create({
    name: "posts",
    listRule: "",
    viewRule: "",
    createRule: "",
    updateRule: "",
    deleteRule: "",
    fields: [
      { name: "title", type: "text" },
      { name: "n", type: "number" },
    ],
  });
  streaming = await startReplica(master, { REPLICA_ID: "r001", SYNC_INTERVAL: "60", SYNC_MODE: "stream" });
  polling = await startReplica(master, { REPLICA_ID: "r002", SYNC_INTERVAL: "60", SYNC_MODE: "poll" });
});

afterAll(() => stopAll());

describe("the packed package", () => {
  it("loads as CommonJS too", () => {
    const req = createRequire(join(app, "package.json"));
    const cjs = req("@vski/sdk") as Sdk;
    expect(typeof cjs.VskiClient).toBe("function");
    expect(new cjs.VskiClient("http://x").baseURL).toBe("http://x");
  });
});

describe("admins, collections and databases", () => {
  it("signs in as admin and manages collections and databases", async () => {
    const c = client(master.url);
    const auth = await c.admins.authWithPassword(ADMIN.email, ADMIN.password);
    expect(c.authStore.isAdmin).toBe(true);
    expect(c.authStore.token).toBe(auth.token);
    expect((await c.admins.me()).email).toBe(ADMIN.email);

    const made = await c.settings.collections.create({ name: "tmp", fields: [{ name: "a", type: "text" }] });
    expect((await c.settings.collections.getOne("tmp")).id).toBe(made.id);
    const updated = await c.settings.collections.update("tmp", { listRule: "" });
    expect(updated.listRule).toBe("");
    const names = (await c.settings.collections.list()).items.map((x) => x.name);
    expect(names).toContain("tmp");
    expect(await c.settings.collections.delete("tmp")).toBe(true);
    expect((await c.settings.collections.list()).items.map((x) => x.name)).not.toContain("tmp");

    await c.settings.databases.create("scratch");
    expect((await c.settings.databases.list()).map((d) => d.name)).toContain("scratch");
    expect(await c.settings.databases.delete("scratch")).toBe(true);
    expect((await c.settings.databases.list()).map((d) => d.name)).not.toContain("scratch");
  });

  it("a wrong password throws ClientResponseError 400 with the server's message", async () => {
    const err = await client(master.url)
      .admins.authWithPassword(ADMIN.email, "wrong-password")
      .catch((e) => e);
    expect(err).toBeInstanceOf(sdk.ClientResponseError);
    expect(err.status).toBe(400);
    expect(err.url).toBe(master.url + "/api/admins/auth-with-password");
  });
});

describe("cron", () => {
  it("creates a job that runs every second, reads its runs and deletes it", async () => {
    const c = client(master.url);
    await c.admins.authWithPassword(ADMIN.email, ADMIN.password);
    const made = await c.cron.create({ name: "touch", schedule: "* * * * * *", type: "sql", sql: "UPDATE posts SET n = n WHERE 0" });
    expect(made.name).toBe("touch");
    expect((await c.cron.list()).map((j) => [j.name, j.active])).toEqual([["touch", true]]);
    await waitFor("a run", async () => (await c.cron.runs("touch")).length > 0, 10_000);
    const [run] = await c.cron.runs("touch");
    expect([run!.outcome, run!.detail]).toEqual(["ok", "0 rows changed"]);
    const bad = await c.cron.create({ name: "bad", schedule: "daily", type: "sql", sql: "SELECT 1" }).catch((e) => e);
    expect([bad.status, Object.keys(bad.response.data)]).toEqual([400, ["schedule"]]);
    expect(await c.cron.delete("touch")).toBe(true);
    expect(await c.cron.list()).toEqual([]);
  });
});

describe("records", () => {
  it("every record method, with a typed collection", async () => {
    interface Post {
      id: string;
      title: string;
      n: number;
      created: string;
    }
    const c = client(master.url);
    const posts = c.collection<Post>("posts");
    const a = await posts.create({ title: "alpha", n: 1 });
    const b = await posts.create({ title: "beta", n: 2 });
    // FormData (multipart) creates arrive with file fields (issue 15); JSON here.
    const g = await posts.create({ title: "gamma", n: 3 });
    expect([a.title, b.n, g.title, g.n]).toEqual(["alpha", 2, "gamma", 3]);

    expect((await posts.getOne(a.id)).title).toBe("alpha");
    const page = await posts.getList(1, 2, { sort: "-n", filter: "n >= 1" });
    expect(page.items.map((p) => p.n)).toEqual([3, 2]);
    expect(page.totalItems).toBeGreaterThanOrEqual(3);
    const skip = await posts.getList(1, 2, { skipTotal: true });
    expect(skip.totalItems).toBe(-1);
    const first = await posts.getFirstListItem(c.filter("title = {:t}", { t: "beta" }));
    expect(first.id).toBe(b.id);
    const missing = await posts.getFirstListItem(c.filter("title = {:t}", { t: "it's not there" })).catch((e) => e);
    expect(missing.status).toBe(404);

    expect((await posts.update(a.id, { "n+": 10 })).n).toBe(11);
    const bulk = await posts.bulkUpdate([a.id, b.id], { title: "bulk" });
    expect(bulk.updated.sort()).toEqual([a.id, b.id].sort());
    const full = await posts.getFullList({ batch: 2, filter: "title = 'bulk'" });
    expect(full.map((p) => p.id).sort()).toEqual([a.id, b.id].sort());
    expect(await posts.delete(g.id)).toBe(true);
    expect((await posts.getOne(g.id).catch((e) => e)).status).toBe(404);
    expect((await posts.bulkDelete([a.id, b.id])).deleted.sort()).toEqual([a.id, b.id].sort());
  });

  it("filter() keeps hostile input a value", async () => {
    const c = client(master.url);
    const posts = c.collection("posts");
    await posts.create({ title: "x' || title != '" });
    await posts.create({ title: "innocent" });
    const hits = await posts.getFullList({ filter: c.filter("title = {:t}", { t: "x' || title != '" }) });
    expect(hits.map((p) => p["title"])).toEqual(["x' || title != '"]);
  });
});

describe("users", () => {
  it("registers, signs in, refreshes and reads itself", async () => {
    const c = client(master.url);
    const reg = await c.auth.register({ email: "u1@example.com", password: "user-pass-1", passwordConfirm: "user-pass-1" });
    expect(reg.record["email"]).toBe("u1@example.com");
    c.auth.logout();
    expect(c.authStore.token).toBe("");
    await c.auth.login("u1@example.com", "user-pass-1");
    expect((await c.auth.me())["email"]).toBe("u1@example.com");
    const before = c.authStore.token;
    await new Promise((r) => setTimeout(r, 1100)); // a new iat, so a new token
    const refreshed = await c.collection("users").authRefresh();
    expect(refreshed.token).not.toBe(before);
    expect(c.authStore.token).toBe(refreshed.token);
    const c2 = client(master.url);
    await c2.collection("users").authWithPassword("u1@example.com", "user-pass-1");
    expect(c2.authStore.record?.["id"]).toBe(reg.record["id"]);
  });
});

describe("replicas", () => {
  it("captures the replica id through a real replica and refuses writes with isReadOnlyReplica", async () => {
    const c = client(streaming.url);
    await waitFor("the replica to hold posts", async () => (await c.collection("posts").getList(1, 1, { requestKey: null })).page === 1);
    expect([c.replicaId, c.replicaMode]).toEqual(["r001", "replica"]);
    // A guest learns the mode and staleness; an admin also the replica's identity and state.
    const status = await c.replica.status();
    expect([status.mode, status.replicaId, status.syncMode, status.dbs]).toEqual(["replica", undefined, "stream", undefined]);
    expect(typeof status.lagMs).toBe("number");
    const a = client(streaming.url);
    await a.admins.authWithPassword(ADMIN.email, ADMIN.password);
    const full = await a.replica.status();
    expect([full.mode, full.replicaId, full.syncMode]).toEqual(["replica", "r001", "stream"]);
    expect(full.dbs?.["default"]?.localVersion).toBeGreaterThan(0);
    const err = await c.collection("posts").create({ title: "nope" }).catch((e) => e);
    expect(err).toBeInstanceOf(sdk.ClientResponseError);
    expect([err.status, err.isReadOnlyReplica]).toEqual([403, true]);
    // The master's answer says master; no replica id is invented.
    const m = client(master.url);
    await m.collection("posts").getList(1, 1);
    expect([m.replicaId, m.replicaMode]).toEqual(["", "master"]);
  });

  it("writes go to the master and reads to the replicas; a streaming replica has the write", async () => {
    const c = client(master.url, { readUrls: [streaming.url] });
    const made = await c.collection("posts").create({ title: "split" });
    const got = await c.collection("posts").getOne(made.id);
    expect(got["title"]).toBe("split");
    expect(c.replicaId).toBe("r001");
  });

  it("read-your-writes through a replica that polls once a minute: 100 of 100", async () => {
    const c = client(master.url, { readUrls: [polling.url] });
    let seen = 0;
    for (let i = 0; i < 100; i++) {
      const made = await c.collection("posts").create({ title: `ryw-${i}`, n: i });
      const got = await c.collection("posts").getOne(made.id);
      if (got["title"] === `ryw-${i}`) seen++;
    }
    expect(seen).toBe(100);
    expect(c.replicaId).toBe("r002");
    // The same without a session position would have missed them: the replica is behind.
    const eventual = client(polling.url, { consistency: "eventual" });
    const made = await client(master.url).collection("posts").create({ title: "unseen" });
    const e = await eventual.collection("posts").getOne(made.id).catch((x) => x);
    expect(e.status).toBe(404);
  });

  it("a replica that cannot be reached is skipped", async () => {
    const c = client(master.url, { readUrls: ["http://127.0.0.1:9", streaming.url] });
    for (let i = 0; i < 4; i++) {
      expect((await c.collection("posts").getList(1, 1, { requestKey: null })).page).toBe(1);
    }
  });
});

describe("realtime", () => {
  it("collection(x).subscribe receives creates, updates and deletes; unsubscribe stops them", async () => {
    const watcher = client(master.url);
    const events: string[] = [];
    const stop = await watcher.collection("posts").subscribe("*", (e) => events.push(`${e.action} ${e.record["title"]}`));
    expect(watcher.realtime.isConnected).toBe(true);
    const writer = client(master.url);
    const p = await writer.collection("posts").create({ title: "live" });
    await writer.collection("posts").update(p.id, { title: "live edited" });
    await writer.collection("posts").delete(p.id);
    await waitFor("three events", async () => events.length >= 3, 10_000).catch((e) => {
      throw new Error(`${e.message}; got ${JSON.stringify(events)}`);
    });
    expect(events).toEqual(["create live", "update live edited", "delete live edited"]);
    // Options: a filter on the subscription.
    const filtered: string[] = [];
    await watcher.collection("posts").subscribe("*", (e) => filtered.push(e.record["title"]), { filter: 'title ~ "keep"' });
    await writer.collection("posts").create({ title: "keep this" });
    await writer.collection("posts").create({ title: "drop this" });
    await waitFor("the filtered event", async () => filtered.length >= 1 && events.length >= 5, 10_000);
    expect(filtered).toEqual(["keep this"]);
    await stop();
    await watcher.collection("posts").unsubscribe();
    expect(watcher.realtime.isConnected).toBe(false);
    await writer.collection("posts").create({ title: "unheard" });
    await new Promise((r) => setTimeout(r, 300));
    expect(events.length).toBe(5);
  });

  it("a db(name) client subscribes in its own database", async () => {
    const admin = client(master.url);
    await admin.admins.authWithPassword(ADMIN.email, ADMIN.password);
    await admin.settings.databases.create("live");
    const live = admin.db("live");
    await live.settings.collections.create({ name: "posts", listRule: "", viewRule: "", createRule: "", fields: [{ name: "title", type: "text" }] });
    const seen: string[] = [];
    await live.collection("posts").subscribe("*", (e) => seen.push(e.record["title"]));
    await client(master.url).collection("posts").create({ title: "in default" });
    await live.collection("posts").create({ title: "in live" });
    await waitFor("the event of live", async () => seen.length >= 1, 10_000);
    await new Promise((r) => setTimeout(r, 300));
    expect(seen).toEqual(["in live"]);
    await live.realtime.unsubscribe();
  });
});

describe("files", () => {
  it("uploads with FormData, reads the file back through files.getURL, and appends with field+", async () => {
    const admin = client(master.url);
    await admin.admins.authWithPassword(ADMIN.email, ADMIN.password);
    await admin.settings.collections.create({
      name: "albums",
      listRule: "",
      viewRule: "",
      createRule: "",
      updateRule: "",
      fields: [
        { name: "title", type: "text" },
        { name: "photos", type: "file", maxSelect: 3 },
      ],
    });
    const c = client(master.url);
    const form = new FormData();
    form.append("title", "trip");
    form.append("photos", new Blob(["first bytes"], { type: "text/plain" }), "first.txt");
    const made = await c.collection("albums").create(form);
    expect(made["title"]).toBe("trip");
    expect(made["photos"]).toHaveLength(1);
    const url = c.files.getURL(made, made["photos"][0]);
    expect(await (await fetch(url)).text()).toBe("first bytes");
    const more = new FormData();
    more.append("photos+", new Blob(["second"], { type: "text/plain" }), "second.txt");
    const updated = await c.collection("albums").update(made.id, more);
    expect(updated["photos"]).toHaveLength(2);
    expect((await fetch(c.files.getURL(updated, updated["photos"][1], { download: true }))).headers.get("content-disposition")).toMatch(/^attachment/);
    const bad = new FormData();
    bad.append("title", new Blob(["x"]), "x.txt");
    const err = await c.collection("albums").create(bad).catch((e) => e);
    expect([err.status, Object.keys(err.response.data)]).toEqual([400, ["title"]]);
  });
});

describe("databases", () => {
  it("db(name) addresses another database and shares the auth store", async () => {
    const admin = client(master.url);
    await admin.admins.authWithPassword(ADMIN.email, ADMIN.password);
    await admin.settings.databases.create("tenant");
    const tenant = admin.db("tenant");
    expect(tenant.authStore).toBe(admin.authStore);
    await tenant.settings.collections.create({
      name: "notes",
      listRule: "@request.auth.id != ''",
      viewRule: "@request.auth.id != ''",
      createRule: "@request.auth.id != ''",
      fields: [{ name: "body", type: "text" }],
    });
    await tenant.collection("notes").create({ body: "tenant only" });
    // Only `default` starts with a `users` collection.
    await tenant.settings.collections.create({ name: "users", type: "auth", createRule: "", fields: [] });
    // The same collection name does not exist in the default database.
    expect((await admin.collection("notes").getList().catch((e) => e)).status).toBe(404);

    // A user of the tenant database is a user there and a guest elsewhere.
    const user = client(master.url).db("tenant");
    await user.auth.register({ email: "t@example.com", password: "tenant-pass-1", passwordConfirm: "tenant-pass-1" });
    expect((await user.collection("notes").getList()).items.map((n) => n["body"])).toEqual(["tenant only"]);
    const other = new sdk.VskiClient(master.url, { authStore: user.authStore });
    expect((await other.auth.me().catch((e) => e)).status).toBe(401);
  });
});

void SECRET;
