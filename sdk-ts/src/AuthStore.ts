/** What a signed-in client holds: the token and the record (or admin) it belongs to. */
export type AuthRecord = { [key: string]: any } | null;

export type OnStoreChange = (token: string, record: AuthRecord) => void;

/** Decodes a JWT's payload without checking it (the server checks; this reads `exp`). */
export function getTokenPayload(token: string): { [key: string]: any } {
  const part = token.split(".")[1];
  if (!part) {
    return {};
  }
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const text =
      typeof atob === "function"
        ? decodeURIComponent(
            Array.from(atob(padded), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
          )
        : "";
    return JSON.parse(text) ?? {};
  } catch {
    return {};
  }
}

/** Whether `token` is a JWT that expires more than `thresholdSeconds` from now. */
export function isTokenValid(token: string, thresholdSeconds = 0): boolean {
  const exp = getTokenPayload(token)["exp"];
  return typeof exp === "number" && exp - thresholdSeconds > Date.now() / 1000;
}

/**
 * Holds the current token in memory. Subclass it (override `save`/`clear` and the getters) to
 * keep it elsewhere; `LocalAuthStore` keeps it in `localStorage`.
 */
export class BaseAuthStore {
  protected baseToken = "";
  protected baseRecord: AuthRecord = null;
  private listeners: OnStoreChange[] = [];

  get token(): string {
    return this.baseToken;
  }

  /** The signed-in auth record, or the admin for an admin token. */
  get record(): AuthRecord {
    return this.baseRecord;
  }

  /** PocketBase's older name for `record`. */
  get model(): AuthRecord {
    return this.record;
  }

  /** Whether a token is held and has not expired. */
  get isValid(): boolean {
    return isTokenValid(this.token);
  }

  /** Whether the token is an admin (superuser) token. */
  get isAdmin(): boolean {
    const type = getTokenPayload(this.token)["type"];
    // vski's admin token, or PocketBase's superuser token (an `auth` token of `_superusers`).
    return type === "admin" || (type === "auth" && this.record?.["collectionName"] === "_superusers");
  }

  get isSuperuser(): boolean {
    return this.isAdmin;
  }

  save(token: string, record: AuthRecord = null): void {
    this.baseToken = token || "";
    this.baseRecord = record;
    this.triggerChange();
  }

  clear(): void {
    this.baseToken = "";
    this.baseRecord = null;
    this.triggerChange();
  }

  /** Calls `callback` on every change; returns a function that removes it. */
  onChange(callback: OnStoreChange, fireImmediately = false): () => void {
    this.listeners.push(callback);
    if (fireImmediately) {
      callback(this.token, this.record);
    }
    return () => {
      this.listeners = this.listeners.filter((l) => l !== callback);
    };
  }

  protected triggerChange(): void {
    for (const l of this.listeners) {
      l(this.token, this.record);
    }
  }
}

/** Keeps the token in `localStorage` under `key` (browsers), so a reload stays signed in. */
export class LocalAuthStore extends BaseAuthStore {
  private readonly key: string;

  constructor(key = "vski_auth") {
    super();
    this.key = key;
    const stored = this.read();
    this.baseToken = stored.token;
    this.baseRecord = stored.record;
    if (typeof window !== "undefined" && typeof window.addEventListener === "function") {
      // Another tab signed in or out.
      window.addEventListener("storage", (e) => {
        if (e.key !== this.key) return;
        const s = this.read();
        this.baseToken = s.token;
        this.baseRecord = s.record;
        this.triggerChange();
      });
    }
  }

  override save(token: string, record: AuthRecord = null): void {
    this.write({ token, record });
    super.save(token, record);
  }

  override clear(): void {
    try {
      globalThis.localStorage?.removeItem(this.key);
    } catch {
      // Storage refused (private mode): the memory copy is still cleared.
    }
    super.clear();
  }

  private read(): { token: string; record: AuthRecord } {
    try {
      const raw = globalThis.localStorage?.getItem(this.key);
      if (raw) {
        const v = JSON.parse(raw);
        return { token: typeof v.token === "string" ? v.token : "", record: v.record ?? null };
      }
    } catch {
      // Unreadable entry: start signed out.
    }
    return { token: "", record: null };
  }

  private write(v: { token: string; record: AuthRecord }): void {
    try {
      globalThis.localStorage?.setItem(this.key, JSON.stringify(v));
    } catch {
      // Storage full or refused: the memory copy still works for this page.
    }
  }
}

/** `LocalAuthStore` where `localStorage` exists (browsers), else an in-memory store. */
export function defaultAuthStore(): BaseAuthStore {
  try {
    if (typeof window !== "undefined" && globalThis.localStorage) {
      return new LocalAuthStore();
    }
  } catch {
    // localStorage access can throw (sandboxed iframes).
  }
  return new BaseAuthStore();
}
