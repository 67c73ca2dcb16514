import type { SendOptions, VskiClient } from "../Client";

export interface CronJob {
  name: string;
  /** Five-field cron expression. */
  schedule: string;
  type: "sql" | "http";
  sql?: string;
  database?: string;
  url?: string;
  method?: string;
  headers?: { [key: string]: string };
  body?: string;
  [key: string]: any;
}

/** `/api/cron` (admin). */
export class CronService {
  constructor(private readonly client: VskiClient) {}

  async list(options: SendOptions = {}): Promise<CronJob[]> {
    return this.client.send("/api/cron", { ...options, method: "GET" });
  }

  async create(job: CronJob, options: SendOptions = {}): Promise<CronJob> {
    return this.client.send("/api/cron", { ...options, method: "POST", body: job });
  }

  async delete(name: string, options: SendOptions = {}): Promise<boolean> {
    await this.client.send(`/api/cron/${encodeURIComponent(name)}`, { ...options, method: "DELETE" });
    return true;
  }
}
