import type { RecordModel, SendOptions, VskiClient } from "../Client";
import { ClientResponseError } from "../ClientResponseError";
import type { RecordSubscription, SubscribeOptions, UnsubscribeFunc } from "./RealtimeService";

/** A page of a list. With `skipTotal`, `totalItems` and `totalPages` are -1. */
export interface ListResult<T> {
  page: number;
  perPage: number;
  totalItems: number;
  totalPages: number;
  items: T[];
}

/** Options of a list request. */
export interface ListOptions extends SendOptions {
  filter?: string;
  sort?: string;
  expand?: string;
  fields?: string;
  skipTotal?: boolean;
}

/** Options of a single-record request. */
export interface RecordOptions extends SendOptions {
  expand?: string;
  fields?: string;
}

/** The answer of a sign-in or refresh: the token and the signed-in record. */
export interface RecordAuthResponse<T = RecordModel> {
  token: string;
  record: T;
}

/** `/api/collections/{name}/records` and the collection's auth endpoints. */
export class RecordService<T = RecordModel> {
  constructor(
    private readonly client: VskiClient,
    readonly collectionIdOrName: string,
  ) {}

  private get base(): string {
    return `/api/collections/${encodeURIComponent(this.collectionIdOrName)}`;
  }

  /** One page of records: `page` from 1, `perPage` up to 1000. */
  async getList(page = 1, perPage = 30, options: ListOptions = {}): Promise<ListResult<T>> {
    const { skipTotal, ...rest } = options;
    return this.client.send<ListResult<T>>(`${this.base}/records`, {
      ...rest,
      method: "GET",
      query: { ...(options.query ?? {}), page, perPage, ...(skipTotal ? { skipTotal: 1 } : {}) },
    });
  }

  /** Every record matching the options, fetched `batch` (default 500) at a time. */
  async getFullList(options: ListOptions & { batch?: number } = {}): Promise<T[]> {
    const { batch = 500, ...rest } = options;
    const out: T[] = [];
    for (let page = 1; ; page++) {
      const list = await this.getList(page, batch, { ...rest, skipTotal: true, requestKey: null });
      out.push(...list.items);
      if (list.items.length < batch) return out;
    }
  }

  /** The first record matching `filter`; a 404 `ClientResponseError` when there is none. */
  async getFirstListItem(filter: string, options: ListOptions = {}): Promise<T> {
    const list = await this.getList(1, 1, {
      requestKey: `getFirstListItem ${this.collectionIdOrName} ${filter}`,
      ...options,
      filter,
      skipTotal: true,
    });
    const first = list.items[0];
    if (first === undefined) {
      throw new ClientResponseError({
        url: this.client.buildURL(`${this.base}/records`),
        status: 404,
        response: { status: 404, code: 404, message: "The requested resource wasn't found.", data: {} },
      });
    }
    return first;
  }

  async getOne(id: string, options: RecordOptions = {}): Promise<T> {
    if (!id) {
      throw new ClientResponseError({
        url: this.client.buildURL(`${this.base}/records/`),
        status: 404,
        response: { status: 404, code: 404, message: "Missing record id.", data: {} },
      });
    }
    return this.client.send<T>(`${this.base}/records/${encodeURIComponent(id)}`, { ...options, method: "GET" });
  }

  /** Creates a record from an object (JSON) or `FormData` (multipart, for files). */
  async create(body: { [key: string]: any } | FormData, options: RecordOptions = {}): Promise<T> {
    return this.client.send<T>(`${this.base}/records`, { ...options, method: "POST", body });
  }

  /** Updates fields of a record; `{"n+": 1}` style modifiers work as on the API. */
  async update(id: string, body: { [key: string]: any } | FormData, options: RecordOptions = {}): Promise<T> {
    const record = await this.client.send<T>(`${this.base}/records/${encodeURIComponent(id)}`, {
      ...options,
      method: "PATCH",
      body,
    });
    // The signed-in record changed: keep the auth store's copy current, as PocketBase does.
    const me = this.client.authStore.record;
    if (me && me["id"] === id && me["collectionName"] !== undefined && record) {
      const r = record as { [key: string]: any };
      if (r["collectionName"] === me["collectionName"] || r["collectionId"] === me["collectionId"]) {
        this.client.authStore.save(this.client.authStore.token, { ...me, ...r });
      }
    }
    return record;
  }

  async delete(id: string, options: SendOptions = {}): Promise<boolean> {
    await this.client.send(`${this.base}/records/${encodeURIComponent(id)}`, { ...options, method: "DELETE" });
    const me = this.client.authStore.record;
    if (me && me["id"] === id && me["collectionName"] === this.collectionIdOrName) {
      this.client.authStore.clear();
    }
    return true;
  }

  /** Sets `data` on every record of `ids`, all or nothing. */
  async bulkUpdate(ids: string[], data: { [key: string]: any }, options: SendOptions = {}): Promise<{ updated: string[] }> {
    return this.client.send(`${this.base}/records/bulk`, { ...options, method: "PATCH", body: { ids, data } });
  }

  /** Deletes every record of `ids`, all or nothing. */
  async bulkDelete(ids: string[], options: SendOptions = {}): Promise<{ deleted: string[] }> {
    return this.client.send(`${this.base}/records/bulk`, { ...options, method: "DELETE", body: { ids } });
  }

  /** Signs in to this auth collection; the token and record go to the auth store. */
  async authWithPassword(identity: string, password: string, options: SendOptions = {}): Promise<RecordAuthResponse<T>> {
    const auth = await this.client.send<RecordAuthResponse<T>>(`${this.base}/auth-with-password`, {
      ...options,
      method: "POST",
      body: { identity, password },
    });
    this.client.authStore.save(auth.token, auth.record as { [key: string]: any });
    return auth;
  }

  /** A fresh token for the signed-in record; it replaces the one in the auth store. */
  async authRefresh(options: SendOptions = {}): Promise<RecordAuthResponse<T>> {
    const auth = await this.client.send<RecordAuthResponse<T>>(`${this.base}/auth-refresh`, {
      ...options,
      method: "POST",
    });
    this.client.authStore.save(auth.token, auth.record as { [key: string]: any });
    return auth;
  }

  /**
   * Calls `callback` with every create, update and delete event of this collection (`"*"`) or
   * of one record (its id) that the caller may see (listRule, or viewRule for one record).
   */
  async subscribe(
    topic: string,
    callback: (data: RecordSubscription<T>) => void,
    options?: SubscribeOptions,
  ): Promise<UnsubscribeFunc> {
    return this.client.realtime.subscribe(`${this.collectionIdOrName}/${topic}`, callback, options);
  }

  /** Stops the subscriptions of `topic` (`"*"` or a record id), or of the whole collection. */
  async unsubscribe(topic?: string): Promise<void> {
    if (topic === undefined) return this.client.realtime.unsubscribeByPrefix(`${this.collectionIdOrName}/`);
    return this.client.realtime.unsubscribe(`${this.collectionIdOrName}/${topic}`);
  }
}
