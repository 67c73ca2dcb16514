import type { SendOptions, VskiClient } from "../Client";
import type { ListResult } from "./RecordService";

export interface DatabaseModel {
  name: string;
  size?: number;
}

/** `/api/databases` (admin). */
export class DatabaseService {
  constructor(private readonly client: VskiClient) {}

  async list(options: SendOptions = {}): Promise<DatabaseModel[]> {
    return this.client.send<DatabaseModel[]>("/api/databases", { ...options, method: "GET" });
  }

  async create(name: string, options: SendOptions = {}): Promise<DatabaseModel> {
    return this.client.send<DatabaseModel>("/api/databases", { ...options, method: "POST", body: { name } });
  }

  async delete(name: string, options: SendOptions = {}): Promise<boolean> {
    await this.client.send(`/api/databases/${encodeURIComponent(name)}`, { ...options, method: "DELETE" });
    return true;
  }
}

export interface CollectionModel {
  id: string;
  name: string;
  type: "base" | "auth";
  fields: { [key: string]: any }[];
  indexes: string[];
  listRule: string | null;
  viewRule: string | null;
  createRule: string | null;
  updateRule: string | null;
  deleteRule: string | null;
  [key: string]: any;
}

/** `/api/collections` (admin) of the client's database. */
export class CollectionService {
  constructor(private readonly client: VskiClient) {}

  async list(options: SendOptions = {}): Promise<ListResult<CollectionModel>> {
    return this.client.send("/api/collections", { ...options, method: "GET" });
  }

  async getOne(idOrName: string, options: SendOptions = {}): Promise<CollectionModel> {
    return this.client.send(`/api/collections/${encodeURIComponent(idOrName)}`, { ...options, method: "GET" });
  }

  async create(body: { [key: string]: any }, options: SendOptions = {}): Promise<CollectionModel> {
    return this.client.send("/api/collections", { ...options, method: "POST", body });
  }

  /** Changes a collection; `fields` is the whole list (fields left out are hidden). */
  async update(idOrName: string, body: { [key: string]: any }, options: SendOptions = {}): Promise<CollectionModel> {
    return this.client.send(`/api/collections/${encodeURIComponent(idOrName)}`, { ...options, method: "PATCH", body });
  }

  async delete(idOrName: string, options: SendOptions = {}): Promise<boolean> {
    await this.client.send(`/api/collections/${encodeURIComponent(idOrName)}`, { ...options, method: "DELETE" });
    return true;
  }
}
