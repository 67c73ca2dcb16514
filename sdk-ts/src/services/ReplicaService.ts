import type { SendOptions, VskiClient } from "../Client";

/**
 * A node's `/health`: its mode and, on a replica, whether it is ready and how stale it is
 * (`lagMs`: its largest lag). `replicaId`, `masterUrl`, `lastError` and the sync state per
 * database come only to admins (an admin token in the auth store).
 */
export interface NodeStatus {
  status: string;
  mode: "master" | "replica";
  replicaId?: string;
  masterUrl?: string;
  syncMode?: "stream" | "poll" | "manual";
  ready?: boolean;
  stale?: boolean;
  lagMs?: number;
  dbs?: {
    [db: string]: { localVersion: number; masterVersion: number; lag: number; lagMs: number; [key: string]: any };
  };
  [key: string]: any;
}

/** Replication: the node's state, the master's list of replicas, a manual sync. */
export class ReplicaService {
  constructor(private readonly client: VskiClient) {}

  /** `/health` of the node that answers (a replica when `readUrls` are set). */
  async status(options: SendOptions = {}): Promise<NodeStatus> {
    return this.client.send("/health", { ...options, method: "GET" });
  }

  /** The replicas the master knows, with their lag per database (admin). */
  async replicas(options: SendOptions = {}): Promise<{ [key: string]: any }[]> {
    return this.client.send("/api/replica/replicas", { ...options, method: "GET" });
  }

  /** Runs a sync round now on the replica at the client's URL (admin). */
  async sync(options: SendOptions = {}): Promise<{ synced: boolean; [key: string]: any }> {
    return this.client.send("/api/replica/sync", { ...options, method: "POST" });
  }
}
