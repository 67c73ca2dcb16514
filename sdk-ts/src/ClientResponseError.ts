/**
 * The one error every failed request throws: an HTTP error answer, a network failure or a
 * cancellation. Shaped like the PocketBase JS SDK's error of the same name.
 */
export class ClientResponseError extends Error {
  /** The URL that was requested ("" when the request never started). */
  url: string;
  /** The HTTP status; 0 for a network failure or a cancellation. */
  status: number;
  /** The server's JSON error body (`{status, code, message, error, data}`), or `{}`. */
  response: { [key: string]: any };
  /** Whether the request was cancelled (by an `AbortSignal` or by auto-cancellation). */
  isAbort: boolean;
  /** The error that caused this one, if any (a `TypeError` from `fetch`, an `AbortError`). */
  originalError: unknown;

  constructor(init: {
    url?: string;
    status?: number;
    response?: { [key: string]: any };
    isAbort?: boolean;
    originalError?: unknown;
  } = {}) {
    const response = init.response ?? {};
    const message =
      typeof response["message"] === "string" && response["message"]
        ? response["message"]
        : init.isAbort
          ? "The request was cancelled."
          : init.status
            ? `Request failed with status ${init.status}.`
            : "Something went wrong while processing the request.";
    super(message);
    this.name = "ClientResponseError";
    this.url = init.url ?? "";
    this.status = init.status ?? 0;
    this.response = response;
    this.isAbort = init.isAbort ?? false;
    this.originalError = init.originalError;
    Object.setPrototypeOf(this, ClientResponseError.prototype);
  }

  /** The field errors of a 400 (`{field: {code, message}}`). */
  get data(): { [key: string]: any } {
    return (this.response["data"] as { [key: string]: any }) ?? {};
  }

  /** A write sent to a read-only replica (403 `replica is read-only`): send it to the master. */
  get isReadOnlyReplica(): boolean {
    return this.status === 403 && this.response["message"] === "replica is read-only";
  }

  /** A replica that did not reach the client's last position in time (504 `replica is behind`). */
  get isReplicaBehind(): boolean {
    return this.status === 504 && this.response["message"] === "replica is behind";
  }

  toJSON() {
    return { ...this, message: this.message };
  }
}
