import type { VskiClient } from "../Client";
import { ClientResponseError } from "../ClientResponseError";

/** A record event, as PocketBase delivers it. */
export interface RecordSubscription<T = any> {
  action: "create" | "update" | "delete";
  record: T;
}

/** List options a subscription applies to its events. */
export interface SubscribeOptions {
  filter?: string;
  expand?: string;
  fields?: string;
}

export type UnsubscribeFunc = () => Promise<void>;

/** The reconnect delays after a dropped stream, in ms (as the PocketBase SDK). */
const RECONNECT_DELAYS = [200, 300, 500, 1000, 1200, 1500, 2000];

/** A topic with its options, as the server expects it (PocketBase's `?options=` form). */
export function topicKey(topic: string, options?: SubscribeOptions): string {
  const query: { [key: string]: string } = {};
  for (const k of ["filter", "expand", "fields"] as const) {
    const v = options?.[k];
    if (v) query[k] = v;
  }
  if (Object.keys(query).length === 0) return topic;
  return topic + "?options=" + encodeURIComponent(JSON.stringify({ query }));
}

/** The error of a failed answer, with the server's JSON error (or its text) as `response`. */
async function answerError(url: string, resp: Response): Promise<ClientResponseError> {
  const text = await resp.text();
  let data: any = {};
  try {
    data = JSON.parse(text);
  } catch {
    data = { message: text };
  }
  return new ClientResponseError({ url, status: resp.status, response: data });
}

/** One Server-Sent Events message: its `event` and `data` lines (comments give neither). */
export function parseFrame(frame: string): { event: string; data: string } {
  let event = "";
  const data: string[] = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return { event, data: data.join("\n") };
}

/**
 * Realtime over PocketBase's Server-Sent Events protocol, read with `fetch` streaming, so it
 * works in browsers and in Node.js and addresses the client's database (`X-Dbname`). One
 * stream per client; the subscription set is posted to the same node, with the client's auth.
 */
export class RealtimeService {
  clientId = "";
  /** Called when the server ends the stream with a reason (for example a too slow client). */
  onDisconnect?: (reason: string) => void;

  private readonly listeners = new Map<string, Set<(data: any) => void>>();
  private controller: AbortController | undefined;
  private connecting: Promise<void> | undefined;
  private attempt = 0;

  constructor(private readonly client: VskiClient) {}

  get isConnected(): boolean {
    return this.clientId !== "";
  }

  /** Calls `callback` with the data of every event of `topic` (`collection/*`, `collection/id`, `resync`). */
  async subscribe(topic: string, callback: (data: any) => void, options?: SubscribeOptions): Promise<UnsubscribeFunc> {
    const key = topicKey(topic, options);
    let set = this.listeners.get(key);
    if (!set) {
      set = new Set();
      this.listeners.set(key, set);
    }
    set.add(callback);
    await this.connect();
    await this.submit();
    return async () => {
      set.delete(callback);
      if (set.size === 0) this.listeners.delete(key);
      await this.changed();
    };
  }

  /** Drops every listener of `topic` (with any options), or of every topic. */
  async unsubscribe(topic?: string): Promise<void> {
    for (const key of [...this.listeners.keys()]) {
      if (topic === undefined || key === topic || key.startsWith(topic + "?")) this.listeners.delete(key);
    }
    await this.changed();
  }

  /** Drops every listener of the topics that start with `prefix`. */
  async unsubscribeByPrefix(prefix: string): Promise<void> {
    for (const key of [...this.listeners.keys()]) {
      if (key.startsWith(prefix)) this.listeners.delete(key);
    }
    await this.changed();
  }

  /** Closes the stream (subscribing again opens a new one). */
  disconnect(): void {
    this.controller?.abort();
    this.controller = undefined;
    this.connecting = undefined;
    this.clientId = "";
  }

  private async changed(): Promise<void> {
    if (this.listeners.size === 0) this.disconnect();
    else if (this.isConnected) await this.submit();
  }

  private get url(): string {
    return this.client.realtimeUrl + "/api/realtime";
  }

  private headers(): { [key: string]: string } {
    const h: { [key: string]: string } = {};
    if (this.client.dbName) h["X-Dbname"] = this.client.dbName;
    return h;
  }

  private async submit(): Promise<void> {
    const headers: { [key: string]: string } = { ...this.headers(), "Content-Type": "application/json" };
    const token = this.client.authStore.token;
    if (token) headers["Authorization"] = token;
    const resp = await this.client.fetchFn(this.url, {
      method: "POST",
      headers,
      body: JSON.stringify({ clientId: this.clientId, subscriptions: [...this.listeners.keys()] }),
    });
    if (!resp.ok) {
      throw await answerError(this.url, resp);
    }
  }

  private connect(): Promise<void> {
    if (!this.connecting) {
      this.connecting = new Promise<void>((ready, fail) => {
        void this.read(ready, fail);
      });
      this.connecting.catch(() => {
        this.connecting = undefined;
      });
    }
    return this.connecting;
  }

  /** Reads the stream until it ends; `ready` once the server named this client. */
  private async read(ready: () => void, fail: (e: unknown) => void): Promise<void> {
    const controller = new AbortController();
    this.controller = controller;
    let named = false;
    try {
      const resp = await this.client.fetchFn(this.url, {
        headers: { ...this.headers(), Accept: "text/event-stream" },
        signal: controller.signal,
      });
      if (!resp.ok || !resp.body) {
        throw await answerError(this.url, resp);
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
          const { event, data } = parseFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          if (event === "PB_CONNECT") {
            this.clientId = (JSON.parse(data) as { clientId: string }).clientId;
            this.attempt = 0;
            if (!named) {
              named = true;
              ready();
            }
            continue;
          }
          if (event === "disconnect") {
            this.onDisconnect?.((JSON.parse(data) as { reason?: string }).reason ?? "");
            continue;
          }
          const payload = JSON.parse(data);
          for (const cb of this.listeners.get(event) ?? []) cb(payload);
        }
      }
    } catch (e) {
      if (!named) {
        fail(controller.signal.aborted ? new ClientResponseError({ url: this.url, isAbort: true, originalError: e }) : e);
        return;
      }
    }
    if (!named) {
      fail(new ClientResponseError({ url: this.url, originalError: new Error("the realtime stream ended before it started") }));
      return;
    }
    // The stream ended: reconnect while there are listeners and nobody closed it on purpose.
    if (this.controller !== controller || controller.signal.aborted) return;
    this.clientId = "";
    this.connecting = undefined;
    if (this.listeners.size === 0) return;
    this.reconnect();
  }

  private reconnect(): void {
    const delay = RECONNECT_DELAYS[Math.min(this.attempt++, RECONNECT_DELAYS.length - 1)];
    setTimeout(() => {
      if (this.listeners.size === 0) return;
      this.connect()
        .then(() => this.submit())
        .catch(() => this.reconnect());
    }, delay);
  }
}
