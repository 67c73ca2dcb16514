import { describe, expect, it } from "vitest";
import { BaseAuthStore, ClientResponseError, LocalAuthStore, VskiClient, filter, parseFrame, topicKey } from "../../src/index";

interface Call {
  url: string;
  method: string;
  headers: Record<string, string>;
  body: unknown;
}

/** A fetch that records each request and answers with `reply(call)`. */
function stub(reply: (c: Call, n: number) => Response | Promise<Response>) {
  const calls: Call[] = [];
  const fetch = async (url: RequestInfo | URL, init?: RequestInit) => {
    const headers = (init?.headers ?? {}) as Record<string, string>;
    const call: Call = { url: String(url), method: init?.method ?? "GET", headers, body: init?.body };
    calls.push(call);
    if (init?.signal?.aborted) throw new DOMException("aborted", "AbortError");
    return reply(call, calls.length - 1);
  };
  return { calls, fetch: fetch as typeof globalThis.fetch };
}

function json(body: unknown, status = 200, headers: Record<string, string> = {}) {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });
}

/** A JWT with the given claims (the signature is not checked client-side). */
function jwt(claims: Record<string, unknown>) {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256" })}.${b64(claims)}.sig`;
}

describe("request shaping", () => {
  it("builds list queries and sends the token, the database and JSON bodies", async () => {
    const s = stub(() => json({ page: 2, perPage: 5, totalItems: -1, totalPages: -1, items: [] }));
    const client = new VskiClient("http://h:1/", { fetch: s.fetch, authStore: new BaseAuthStore() });
    client.authStore.save("tok", null);
    await client.db("tenant").collection("posts").getList(2, 5, {
      filter: client.filter("title = {:t}", { t: "a'b" }),
      sort: "-created",
      expand: "author",
      skipTotal: true,
    });
    const c = s.calls[0]!;
    const u = new URL(c.url);
    expect(u.origin + u.pathname).toBe("http://h:1/api/collections/posts/records");
    expect(Object.fromEntries(u.searchParams)).toEqual({
      page: "2",
      perPage: "5",
      skipTotal: "1",
      filter: "title = 'a\\'b'",
      sort: "-created",
      expand: "author",
    });
    expect(c.headers["Authorization"]).toBe("tok");
    expect(c.headers["X-Dbname"]).toBe("tenant");

    await client.collection("posts").create({ title: "x" });
    expect(s.calls[1]!.method).toBe("POST");
    expect(s.calls[1]!.headers["Content-Type"]).toBe("application/json");
    expect(s.calls[1]!.body).toBe('{"title":"x"}');
    expect(s.calls[1]!.headers["X-Dbname"]).toBeUndefined();
  });

  it("sends FormData as multipart, leaving the content type to fetch", async () => {
    const s = stub(() => json({ id: "r1" }));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    const form = new FormData();
    form.append("title", "with a file");
    await client.collection("posts").create(form);
    expect(s.calls[0]!.body).toBe(form);
    expect(s.calls[0]!.headers["Content-Type"]).toBeUndefined();
  });

  it("bulk operations, deletes and auth endpoints use the API's paths", async () => {
    const s = stub((c) => (c.method === "DELETE" && c.url.endsWith("/r1") ? new Response(null, { status: 204 }) : json({ token: "t", record: { id: "u" }, admin: { id: "a" }, hasAdmins: true, updated: [], deleted: [] })));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    await client.collection("posts").bulkUpdate(["a", "b"], { n: 1 });
    await client.collection("posts").bulkDelete(["a"]);
    expect(await client.collection("posts").delete("r1")).toBe(true);
    expect(await client.admins.hasAdmins()).toBe(true);
    await client.admins.authWithPassword("a@b.c", "pw");
    expect(client.authStore.token).toBe("t");
    await client.collection("users").authWithPassword("u@b.c", "pw");
    await client.auth.login("u@b.c", "pw");
    await client.settings.databases.create("x");
    await client.cron.delete("nightly");
    await client.cron.runs("nightly");
    expect(s.calls.map((c) => `${c.method} ${new URL(c.url).pathname}`)).toEqual([
      "PATCH /api/collections/posts/records/bulk",
      "DELETE /api/collections/posts/records/bulk",
      "DELETE /api/collections/posts/records/r1",
      "GET /api/admins/has-admins",
      "POST /api/admins/auth-with-password",
      "POST /api/collections/users/auth-with-password",
      "POST /api/auth/login",
      "POST /api/databases",
      "DELETE /api/cron/nightly",
      "GET /api/cron/nightly/runs",
    ]);
    expect(s.calls[0]!.body).toBe('{"ids":["a","b"],"data":{"n":1}}');
    expect(s.calls[4]!.body).toBe('{"identity":"a@b.c","password":"pw"}');
  });
});

describe("replicas and positions", () => {
  it("captures the replica id and sends it back, unless turned off", async () => {
    const s = stub(() => json({}, 200, { "x-replica-mode": "replica", "x-replica-id": "r001" }));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    expect(client.replicaId).toBe("");
    await client.send("/api/x");
    expect([client.replicaId, client.replicaMode]).toEqual(["r001", "replica"]);
    await client.send("/api/x");
    expect(s.calls[1]!.headers["X-Replica-Id"]).toBe("r001");
    const off = new VskiClient("http://h", { fetch: s.fetch, stickyReplica: false, authStore: new BaseAuthStore() });
    await off.send("/api/x");
    await off.send("/api/x");
    expect(s.calls[3]!.headers["X-Replica-Id"]).toBeUndefined();
  });

  it("keeps the highest position per database and sends it on reads only", async () => {
    const positions = ["e.u.5", "e.u.3", "e.u.7"];
    const s = stub((_, n) => json({}, 200, { "x-replica-mode": "master", "x-db-position": positions[n] ?? "e.u.7" }));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    await client.send("/api/a", { method: "POST" });
    await client.send("/api/a");
    expect(s.calls[1]!.headers["X-Min-Db-Position"]).toBe("e.u.5");
    expect(client.position()).toBe("e.u.5");
    await client.send("/api/a");
    expect(s.calls[2]!.headers["X-Min-Db-Position"]).toBe("e.u.5");
    await client.send("/api/a", { method: "PATCH" });
    expect(s.calls[3]!.headers["X-Min-Db-Position"]).toBeUndefined();
    expect(client.position()).toBe("e.u.7");
    // Another database has its own position.
    expect(client.db("other").position()).toBeUndefined();
    // Eventual consistency sends none.
    const ev = new VskiClient("http://h", { fetch: s.fetch, consistency: "eventual", authStore: new BaseAuthStore() });
    await ev.send("/api/a", { method: "POST" });
    await ev.send("/api/a");
    expect(s.calls[5]!.headers["X-Min-Db-Position"]).toBeUndefined();
  });

  it("a replica on another history does not move the session back; the master does", async () => {
    const answers: [string, string][] = [
      ["master", "e.u.9"],
      ["replica", "e.old.20"],
      ["master", "e.new.2"],
    ];
    const s = stub((_, n) => json({}, 200, { "x-replica-mode": answers[n]![0], "x-db-position": answers[n]![1] }));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    await client.send("/api/a");
    await client.send("/api/a");
    expect(client.position()).toBe("e.u.9");
    await client.send("/api/a");
    expect(client.position()).toBe("e.new.2");
  });

  it("reads tokens that carry the history's hash by their version", async () => {
    const positions = ["e.u.5.00000000000000aa", "e.u.3.00000000000000bb", "e.u.12.00000000000000cc"];
    const s = stub((_, n) => json({}, 200, { "x-replica-mode": "replica", "x-db-position": positions[n]! }));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    await client.send("/api/a");
    await client.send("/api/a");
    expect(client.position()).toBe("e.u.5.00000000000000aa");
    await client.send("/api/a");
    expect(client.position()).toBe("e.u.12.00000000000000cc");
  });

  it("reads go round robin over readUrls, skipping one that fails, and writes to the master", async () => {
    const s = stub((c) => {
      if (c.url.startsWith("http://r2")) throw new TypeError("connection refused");
      return json({ at: new URL(c.url).host });
    });
    const client = new VskiClient("http://m", { fetch: s.fetch, readUrls: ["http://r1", "http://r2"], authStore: new BaseAuthStore() });
    const hosts: string[] = [];
    for (let i = 0; i < 4; i++) hosts.push((await client.send("/api/x", { requestKey: null })).at);
    expect(hosts).toEqual(["r1", "r1", "r1", "r1"]);
    expect(s.calls.filter((c) => c.url.startsWith("http://r2")).length).toBe(2);
    expect((await client.send("/api/x", { method: "POST" })).at).toBe("m");
  });

  it("a 504 'replica is behind' is retried once on the master", async () => {
    const s = stub((c) =>
      c.url.startsWith("http://r1")
        ? json({ status: 504, code: 504, message: "replica is behind", data: {} }, 504, { "x-replica-mode": "replica" })
        : json({ ok: true }, 200, { "x-replica-mode": "master" }),
    );
    const client = new VskiClient("http://m", { fetch: s.fetch, readUrls: ["http://r1"], authStore: new BaseAuthStore() });
    expect(await client.send("/api/x")).toEqual({ ok: true });
    expect(s.calls.map((c) => new URL(c.url).host)).toEqual(["r1", "m"]);
    // Without a known master the error reaches the caller.
    const alone = new VskiClient("http://r1", { fetch: s.fetch, authStore: new BaseAuthStore() });
    const err = await alone.send("/api/x").catch((e) => e);
    expect(err).toBeInstanceOf(ClientResponseError);
    expect(err.isReplicaBehind).toBe(true);
  });
});

describe("errors and cancellation", () => {
  it("an error answer throws ClientResponseError with the body; a read-only 403 says so", async () => {
    const s = stub(() => json({ status: 403, code: 403, message: "replica is read-only", data: {} }, 403));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    const err = await client.collection("posts").create({}).catch((e) => e);
    expect(err).toBeInstanceOf(ClientResponseError);
    expect([err.status, err.isReadOnlyReplica, err.isAbort, err.message]).toEqual([403, true, false, "replica is read-only"]);
    expect(err.url).toBe("http://h/api/collections/posts/records");
  });

  it("a newer request with the same key cancels the older; requestKey null and autoCancellation(false) do not", async () => {
    let release: () => void = () => {};
    const gate = new Promise<void>((r) => (release = r));
    const fetch = (async (_url: RequestInfo | URL, init?: RequestInit) => {
      await Promise.race([gate, new Promise((_, rej) => init?.signal?.addEventListener("abort", () => rej(new DOMException("aborted", "AbortError"))))]);
      return json({ ok: true });
    }) as typeof globalThis.fetch;
    const client = new VskiClient("http://h", { fetch, authStore: new BaseAuthStore() });
    const first = client.collection("posts").getList(1, 1);
    const second = client.collection("posts").getList(1, 1);
    const third = client.collection("posts").getList(1, 1, { requestKey: null });
    const e = await first.catch((x) => x);
    release();
    expect(e.isAbort).toBe(true);
    expect(await second).toEqual({ ok: true });
    expect(await third).toEqual({ ok: true });
    client.autoCancellation(false);
    const [a, b] = await Promise.all([client.collection("posts").getList(1, 1), client.collection("posts").getList(1, 1)]);
    expect([a, b]).toEqual([{ ok: true }, { ok: true }]);
  });

  it("an AbortSignal cancels", async () => {
    const s = stub(() => json({}));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    const ctl = new AbortController();
    ctl.abort();
    const e = await client.send("/api/x", { signal: ctl.signal }).catch((x) => x);
    expect(e.isAbort).toBe(true);
  });
});

describe("auth store, hooks, filter", () => {
  it("knows validity and admin tokens, and tells listeners", () => {
    const store = new BaseAuthStore();
    const seen: string[] = [];
    const off = store.onChange((t) => seen.push(t));
    store.save(jwt({ type: "admin", exp: Date.now() / 1000 + 60 }), { id: "a" });
    expect([store.isValid, store.isAdmin]).toEqual([true, true]);
    store.save(jwt({ type: "auth", exp: Date.now() / 1000 - 1 }), { id: "u" });
    expect([store.isValid, store.isAdmin]).toEqual([false, false]);
    // PocketBase's superuser session: an `auth` token with a `_superusers` record.
    store.save(jwt({ type: "auth", exp: Date.now() / 1000 + 60 }), { id: "s", collectionName: "_superusers" });
    expect([store.isAdmin, store.isSuperuser]).toEqual([true, true]);
    store.save(jwt({ type: "auth", exp: Date.now() / 1000 + 60 }), { id: "u", collectionName: "users" });
    expect(store.isSuperuser).toBe(false);
    off();
    store.clear();
    expect(seen.length).toBe(4);
  });

  it("LocalAuthStore keeps the token in localStorage", () => {
    const data = new Map<string, string>();
    (globalThis as any).localStorage = {
      getItem: (k: string) => data.get(k) ?? null,
      setItem: (k: string, v: string) => data.set(k, v),
      removeItem: (k: string) => data.delete(k),
    };
    try {
      new LocalAuthStore("k").save("tok", { id: "x" });
      expect(new LocalAuthStore("k").token).toBe("tok");
      new LocalAuthStore("k").clear();
      expect(new LocalAuthStore("k").token).toBe("");
    } finally {
      delete (globalThis as any).localStorage;
    }
  });

  it("beforeSend may change a request; afterSend may change the answer", async () => {
    const s = stub(() => json({ n: 1 }));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() });
    client.beforeSend = (info) => {
      info.init.headers["X-Trace"] = "1";
      return info;
    };
    client.afterSend = (_resp, data) => ({ ...data, seen: true });
    expect(await client.send("/api/x")).toEqual({ n: 1, seen: true });
    expect(s.calls[0]!.headers["X-Trace"]).toBe("1");
  });

  it("refreshes an auth token about to expire before a request", async () => {
    const fresh = jwt({ type: "auth", exp: Date.now() / 1000 + 3600 });
    const s = stub((c) => (c.url.endsWith("/auth-refresh") ? json({ token: fresh, record: { id: "u", collectionName: "users" } }) : json({})));
    const client = new VskiClient("http://h", { fetch: s.fetch, authStore: new BaseAuthStore() }).autoRefresh(300);
    client.authStore.save(jwt({ type: "auth", exp: Date.now() / 1000 + 60 }), { id: "u", collectionName: "users" });
    await client.send("/api/x");
    expect(s.calls.map((c) => new URL(c.url).pathname)).toEqual(["/api/collections/users/auth-refresh", "/api/x"]);
    expect(client.authStore.token).toBe(fresh);
    expect(s.calls[1]!.headers["Authorization"]).toBe(fresh);
  });

  it("filter quotes values so input cannot change the expression", () => {
    expect(filter("a = {:a} && b = {:b} && c = {:c} && d = {:d}", { a: "x' || 1=1 || '", b: 3, c: true, d: null })).toBe(
      "a = 'x\\' || 1=1 || \\'' && b = 3 && c = true && d = null",
    );
    expect(filter("t >= {:t}", { t: new Date("2026-01-02T03:04:05.006Z") })).toBe("t >= '2026-01-02 03:04:05.006Z'");
    expect(filter("p = {:p}", { p: "back\\slash" })).toBe("p = 'back\\\\slash'");
  });
});

describe("realtime helpers", () => {
  it("topics carry their options as PocketBase's ?options=", () => {
    expect(topicKey("posts/*")).toBe("posts/*");
    const key = topicKey("posts/*", { filter: "n > 1", expand: "author" });
    expect(key.startsWith("posts/*?options=")).toBe(true);
    expect(JSON.parse(decodeURIComponent(key.split("?options=")[1]!))).toEqual({ query: { filter: "n > 1", expand: "author" } });
  });

  it("SSE frames give their event and data; comments give neither", () => {
    expect(parseFrame('id:x\nevent:posts/*\ndata:{"a":1}')).toEqual({ event: "posts/*", data: '{"a":1}' });
    expect(parseFrame(":ping")).toEqual({ event: "", data: "" });
  });
});
