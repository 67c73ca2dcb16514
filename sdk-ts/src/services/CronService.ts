import type { SendOptions, VskiClient } from "../Client";

export interface CronJob {
  name: string;
  /** Five fields (minute hour day month weekday) or six (seconds first), UTC. */
  schedule: string;
  type: "sql" | "http";
  sql?: string;
  database?: string;
  url?: string;
  method?: string;
  headers?: { [key: string]: string };
  body?: string;
  /** In a listing: whether the answering node runs the job (replicas run few). */
  active?: boolean;
  [key: string]: any;
}

export interface CronRun {
  started: string;
  durationMs: number;
  outcome: "ok" | "error" | "skipped";
  detail: string;
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

  /** The answering node's last runs of job `name`, newest first. */
  async runs(name: string, options: SendOptions = {}): Promise<CronRun[]> {
    return this.client.send(`/api/cron/${encodeURIComponent(name)}/runs`, { ...options, method: "GET" });
  }

  async delete(name: string, options: SendOptions = {}): Promise<boolean> {
    await this.client.send(`/api/cron/${encodeURIComponent(name)}`, { ...options, method: "DELETE" });
    return true;
  }
}
