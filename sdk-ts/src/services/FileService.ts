import type { RecordModel, VskiClient } from "../Client";

/** URLs of the files of `file` fields (`/api/files/...`). */
export class FileService {
  constructor(private readonly client: VskiClient) {}

  /**
   * The URL of `filename` of `record`, as PocketBase's `files.getURL`. `download` asks the
   * browser to save it; `token` puts a token in the URL for `<img src>` and the like (prefer
   * headers: URLs end up in logs).
   */
  getURL(record: Pick<RecordModel, "id"> & { collectionId?: string; collectionName?: string }, filename: string, options: { download?: boolean; token?: string } = {}): string {
    if (!filename || !record?.id) return "";
    const collection = record.collectionId || record.collectionName || "";
    const params = new URLSearchParams();
    if (options.download) params.set("download", "1");
    if (options.token) params.set("token", options.token);
    if (this.client.dbName) params.set("db", this.client.dbName);
    const query = params.toString();
    const path = ["api", "files", collection, record.id, filename].map(encodeURIComponent).join("/");
    return this.client.buildURL("/" + path) + (query ? "?" + query : "");
  }
}
