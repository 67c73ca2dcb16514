import { BaseAuthStore, defaultAuthStore, getTokenPayload, isTokenValid } from "./AuthStore";
import { ClientResponseError } from "./ClientResponseError";
import { filter } from "./filter";
import { Positions } from "./positions";
import { AdminService } from "./services/AdminService";
import { AuthService } from "./services/AuthService";
import { CronService } from "./services/CronService";
import { RecordService } from "./services/RecordService";
import { ReplicaService } from "./services/ReplicaService";
import { RealtimeService } from "./services/RealtimeService";
import { FileService } from "./services/FileService";
import { CollectionService, DatabaseService } from "./services/SettingsService";

export interface ClientOptions {
  /**
   * Replica URLs for reads (GET/HEAD). Reads go round robin over them, skipping one that does
   * not answer; writes go to the client's URL, the master. Default: none (everything to `url`).
   */
  readUrls?: string[];
  /**
   * `session` (default): every read carries the newest position this client has seen of its
   * database (`X-Min-Db-Position`), so it sees the client's own writes and never goes back in
   * time, whichever node answers. `eventual`: reads carry no position.
   */
  consistency?: "session" | "eventual";
  /** Send back the `X-Replica-Id` of the last answer, so a proxy keeps the client on its replica. Default true. */
  stickyReplica?: boolean;
  /**
   * The master's URL, for retrying a read a replica answered with 504 `replica is behind`.
   * Default: the client's URL when `readUrls` are given (it is the master then), else none.
   */
  masterUrl?: string;
  /** Where the token is kept. Default: `localStorage` in browsers, memory elsewhere. */
  authStore?: BaseAuthStore;
  /** The `fetch` to use (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /**
   * The node realtime subscriptions use: the client's URL (default, the master), or a replica
   * started with `REPLICA_REALTIME=on`.
   */
  realtimeUrl?: string;
}

/** Options of one request. */
export interface SendOptions {
  method?: string;
  /** Query parameters; `undefined` and `null` values are left out. */
  query?: { [key: string]: unknown };
  /** A JSON-serialisable body, or `FormData` (sent as multipart). */
  body?: unknown;
  headers?: { [key: string]: string };
  /** Cancels the request. */
  signal?: AbortSignal;
  /**
   * Requests with the same key cancel the earlier one still running (auto-cancellation).
   * Default: method and path. `null` turns it off for this request.
   */
  requestKey?: string | null;
  fetch?: typeof fetch;
  /** Extra query parameters, PocketBase style. */
  [key: string]: unknown;
}

/** What the hooks see and may change before a request is sent. */
export interface RequestInfo {
  url: string;
  init: RequestInit & { headers: { [key: string]: string } };
}

/** Replica state shared by a client and the clients `db()` made from it. */
interface Shared {
  authStore: BaseAuthStore;
  positions: Positions;
  replicaId: string;
  replicaMode: string;
  cancelControllers: Map<string, AbortController>;
  enableAutoCancellation: boolean;
  nextRead: number;
  beforeSend?: (info: RequestInfo) => RequestInfo | void | Promise<RequestInfo | void>;
  afterSend?: (response: Response, data: any) => any;
  autoRefreshThreshold: number;
}

const READ_METHODS = new Set(["GET", "HEAD"]);

/**
 * A client of one vski deployment: a master, optionally its replicas. Shaped like the
 * PocketBase JS SDK (`collection(name)`, one `send()`, one `ClientResponseError`, an auth
 * store), and aware of replicas: it captures `X-Replica-Id`/`-Mode`, sends reads to
 * `readUrls`, and keeps the session consistent with `X-Db-Position`.
 */
export class VskiClient {
  /** The master's (or the proxy's) base URL. */
  readonly baseURL: string;
  readonly readUrls: string[];
  readonly consistency: "session" | "eventual";
  readonly stickyReplica: boolean;
  readonly masterUrl: string | undefined;
  /** The database this client addresses (`X-Dbname`); `undefined` for the default one. */
  readonly dbName: string | undefined;

  readonly admins: AdminService;
  readonly auth: AuthService;
  readonly settings: { databases: DatabaseService; collections: CollectionService };
  readonly cron: CronService;
  readonly replica: ReplicaService;
  /** Realtime subscriptions (PocketBase's SSE protocol); see also `collection(x).subscribe`. */
  readonly realtime: RealtimeService;
  /** URLs of uploaded files. */
  readonly files: FileService;
  /** Where realtime subscriptions go (`realtimeUrl`, default the client's URL). */
  readonly realtimeUrl: string;

  private readonly shared: Shared;
  private readonly fetchImpl: typeof fetch | undefined;
  private readonly recordServices = new Map<string, RecordService<any>>();

  constructor(url = "/", options: ClientOptions = {}, shared?: Shared, dbName?: string) {
    this.baseURL = url.replace(/\/+$/, "");
    this.readUrls = (options.readUrls ?? []).map((u) => u.replace(/\/+$/, ""));
    this.consistency = options.consistency ?? "session";
    this.stickyReplica = options.stickyReplica ?? true;
    this.masterUrl = (options.masterUrl ?? (this.readUrls.length > 0 ? this.baseURL : undefined))?.replace(
      /\/+$/,
      "",
    );
    this.fetchImpl = options.fetch;
    this.dbName = dbName;
    this.shared = shared ?? {
      authStore: options.authStore ?? defaultAuthStore(),
      positions: new Positions(),
      replicaId: "",
      replicaMode: "",
      cancelControllers: new Map(),
      enableAutoCancellation: true,
      nextRead: 0,
      autoRefreshThreshold: 0,
    };
    this.options = options;
    this.admins = new AdminService(this);
    this.auth = new AuthService(this);
    this.settings = { databases: new DatabaseService(this), collections: new CollectionService(this) };
    this.cron = new CronService(this);
    this.replica = new ReplicaService(this);
    this.realtimeUrl = (options.realtimeUrl ?? this.baseURL).replace(/\/+$/, "");
    this.realtime = new RealtimeService(this);
    this.files = new FileService(this);
  }

  /** The `fetch` this client uses. */
  get fetchFn(): typeof fetch {
    return this.fetchImpl ?? globalThis.fetch.bind(globalThis);
  }

  private readonly options: ClientOptions;

  get authStore(): BaseAuthStore {
    return this.shared.authStore;
  }

  /** The `X-Replica-Id` of the last answer ("" until a replica answered). */
  get replicaId(): string {
    return this.shared.replicaId;
  }

  /** The `X-Replica-Mode` of the last answer: `master`, `replica`, or "" before any answer. */
  get replicaMode(): string {
    return this.shared.replicaMode;
  }

  /** The newest position this client has seen of database `db` (default: this client's). */
  position(db?: string): string | undefined {
    return this.shared.positions.get(db ?? this.dbName ?? "default");
  }

  /** Called with every request before it is sent; may return a changed `{url, init}`. */
  set beforeSend(hook: Shared["beforeSend"]) {
    this.shared.beforeSend = hook;
  }

  get beforeSend(): Shared["beforeSend"] {
    return this.shared.beforeSend;
  }

  /** Called with every successful answer and its parsed body; may return another body. */
  set afterSend(hook: Shared["afterSend"]) {
    this.shared.afterSend = hook;
  }

  get afterSend(): Shared["afterSend"] {
    return this.shared.afterSend;
  }

  /** The records of collection `name`, typed as `T`. */
  collection<T = RecordModel>(name: string): RecordService<T> {
    let s = this.recordServices.get(name);
    if (!s) {
      s = new RecordService<T>(this, name);
      this.recordServices.set(name, s);
    }
    return s as RecordService<T>;
  }

  /**
   * A client for database `name` (sends `X-Dbname`). It shares this client's auth store,
   * positions, replica id and hooks.
   */
  db(name: string): VskiClient {
    return new VskiClient(this.baseURL, this.options, this.shared, name);
  }

  /** See {@link filter}. */
  filter(expr: string, params?: { [key: string]: unknown }): string {
    return filter(expr, params);
  }

  /** Turns auto-cancellation of duplicate requests on (default) or off. */
  autoCancellation(enable: boolean): this {
    this.shared.enableAutoCancellation = enable;
    return this;
  }

  cancelRequest(requestKey: string): this {
    this.shared.cancelControllers.get(requestKey)?.abort();
    this.shared.cancelControllers.delete(requestKey);
    return this;
  }

  cancelAllRequests(): this {
    for (const c of this.shared.cancelControllers.values()) c.abort();
    this.shared.cancelControllers.clear();
    return this;
  }

  /**
   * Refreshes an auth record's token before a request when it expires within `threshold`
   * seconds (`0` turns it off). Admin tokens cannot be refreshed without the password.
   */
  autoRefresh(thresholdSeconds = 300): this {
    this.shared.autoRefreshThreshold = thresholdSeconds;
    return this;
  }

  /** Builds a full URL for `path` on `base` (default: the client's URL). */
  buildURL(path: string, base: string = this.baseURL): string {
    return base + (path.startsWith("/") ? path : "/" + path);
  }

  /**
   * Sends one request; every service method goes through here. Reads go to a replica when
   * `readUrls` are set, writes to the master; the answer's replica headers and position are
   * kept; an error answer throws `ClientResponseError`.
   */
  async send<T = any>(path: string, options: SendOptions = {}): Promise<T> {
    const method = (options.method ?? "GET").toUpperCase();
    const read = READ_METHODS.has(method);
    const db = this.dbName ?? "default";
    await this.maybeRefresh(path);

    const headers: { [key: string]: string } = {};
    const token = this.authStore.token;
    if (token) headers["Authorization"] = token;
    if (this.dbName) headers["X-Dbname"] = this.dbName;
    if (this.stickyReplica && this.shared.replicaId) headers["X-Replica-Id"] = this.shared.replicaId;
    const position = this.shared.positions.get(db);
    if (read && this.consistency === "session" && position) headers["X-Min-Db-Position"] = position;
    let body: BodyInit | undefined;
    if (options.body !== undefined && options.body !== null) {
      if (isFormData(options.body)) {
        body = options.body as FormData;
      } else {
        headers["Content-Type"] = "application/json";
        body = JSON.stringify(options.body);
      }
    }
    Object.assign(headers, options.headers ?? {});

    const query = queryString(collectQuery(options));
    const suffix = (path.startsWith("/") ? path : "/" + path) + (query ? "?" + query : "");

    // Auto-cancellation: a newer request with the same key cancels this one.
    const key = options.requestKey === undefined ? `${method} ${path}` : options.requestKey;
    const controller = new AbortController();
    if (this.shared.enableAutoCancellation && key !== null) {
      this.shared.cancelControllers.get(key)?.abort();
      this.shared.cancelControllers.set(key, controller);
    }
    const onAbort = () => controller.abort();
    if (options.signal) {
      if (options.signal.aborted) controller.abort();
      else options.signal.addEventListener("abort", onAbort, { once: true });
    }
    const fetchImpl = (options.fetch as typeof fetch | undefined) ?? this.fetchImpl ?? globalThis.fetch;

    try {
      const viaMaster = options[VIA_MASTER] === true && this.masterUrl !== undefined;
      const bases = viaMaster ? [this.masterUrl as string] : read ? this.readBases() : [this.baseURL];
      let lastError: unknown;
      for (let i = 0; i < bases.length; i++) {
        const base = bases[i] as string;
        let resp: Response;
        let info: RequestInfo = {
          url: base + suffix,
          init: { method, headers: { ...headers }, body, signal: controller.signal },
        };
        if (this.shared.beforeSend) {
          info = (await this.shared.beforeSend(info)) ?? info;
        }
        try {
          resp = await fetchImpl(info.url, info.init);
        } catch (e) {
          if (controller.signal.aborted) {
            throw new ClientResponseError({ url: info.url, isAbort: true, originalError: e });
          }
          // A replica that does not answer: the next one, then the master.
          lastError = new ClientResponseError({ url: info.url, originalError: e });
          continue;
        }
        const data = await parseBody(resp);
        this.observe(resp, db);
        if (resp.ok) {
          return (this.shared.afterSend ? this.shared.afterSend(resp, data) : data) as T;
        }
        const err = new ClientResponseError({ url: info.url, status: resp.status, response: asObject(data) });
        // A replica behind the client's session: the master answers once, when it is known.
        if (read && err.isReplicaBehind && this.masterUrl && !viaMaster && base !== this.masterUrl) {
          return await this.send<T>(path, { ...options, requestKey: null, ...{ [VIA_MASTER]: true } });
        }
        throw err;
      }
      throw lastError ?? new ClientResponseError({ url: this.baseURL + suffix });
    } finally {
      options.signal?.removeEventListener("abort", onAbort);
      if (key !== null && this.shared.cancelControllers.get(key) === controller) {
        this.shared.cancelControllers.delete(key);
      }
    }
  }

  /** The base URLs to try for a read, in order. */
  private readBases(): string[] {
    if (this.readUrls.length === 0) return [this.baseURL];
    const n = this.readUrls.length;
    const start = this.shared.nextRead++ % n;
    const order = Array.from({ length: n }, (_, i) => this.readUrls[(start + i) % n] as string);
    return [...order, this.baseURL];
  }

  /** Keeps what an answer says about the node and the database. */
  private observe(resp: Response, db: string): void {
    const mode = resp.headers.get("x-replica-mode");
    if (mode) this.shared.replicaMode = mode;
    const id = resp.headers.get("x-replica-id");
    if (mode === "replica" && id) this.shared.replicaId = id;
    const position = resp.headers.get("x-db-position");
    if (position) this.shared.positions.observe(db, position, mode === "master");
  }

  private refreshing: Promise<unknown> | null = null;

  private async maybeRefresh(path: string): Promise<void> {
    const threshold = this.shared.autoRefreshThreshold;
    const token = this.authStore.token;
    if (!threshold || !token || path.endsWith("/auth-refresh") || path.endsWith("/auth-with-password")) return;
    const claims = getTokenPayload(token);
    if (claims["type"] !== "auth" || isTokenValid(token, threshold) || !isTokenValid(token)) return;
    const collection = (this.authStore.record?.["collectionName"] as string | undefined) ?? "users";
    this.refreshing ??= this.collection(collection)
      .authRefresh({ requestKey: null })
      .finally(() => {
        this.refreshing = null;
      });
    await this.refreshing;
  }
}

/** Marks the one retry of a read against the master. */
const VIA_MASTER = "__vskiViaMaster";

/** A record as the API returns it. */
export interface RecordModel {
  id: string;
  collectionId: string;
  collectionName: string;
  created: string;
  updated: string;
  expand?: { [key: string]: any };
  [key: string]: any;
}

function isFormData(v: unknown): boolean {
  return typeof FormData !== "undefined" && v instanceof FormData;
}

function asObject(v: unknown): { [key: string]: any } {
  return v && typeof v === "object" ? (v as { [key: string]: any }) : {};
}

async function parseBody(resp: Response): Promise<unknown> {
  if (resp.status === 204) return null;
  const text = await resp.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

const RESERVED = new Set(["method", "query", "body", "headers", "signal", "requestKey", "fetch", VIA_MASTER]);

/** `options.query` plus any other non-reserved option (PocketBase lets both carry parameters). */
function collectQuery(options: SendOptions): { [key: string]: unknown } {
  const q: { [key: string]: unknown } = { ...(options.query ?? {}) };
  for (const [k, v] of Object.entries(options)) {
    if (!RESERVED.has(k)) q[k] = v;
  }
  return q;
}

function queryString(q: { [key: string]: unknown }): string {
  const parts: string[] = [];
  for (const [k, v] of Object.entries(q)) {
    if (v === undefined || v === null) continue;
    const values = Array.isArray(v) ? v : [v];
    for (const one of values) {
      const s = one instanceof Date ? one.toISOString().replace("T", " ") : typeof one === "object" ? JSON.stringify(one) : String(one);
      parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(s));
    }
  }
  return parts.join("&");
}
