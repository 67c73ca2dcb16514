/**
 * The client's session: the newest `X-Db-Position` it has seen per database. The token is
 * opaque to applications; the SDK reads it as `<epoch>.<uid>.<version>` to keep the highest.
 */
export class Positions {
  private readonly byDb = new Map<string, string>();

  get(db: string): string | undefined {
    return this.byDb.get(db);
  }

  /**
   * Notes a position seen in an answer. Within one history the higher version wins. A token of
   * another history (a restored master, a re-created database) replaces the kept one only when
   * the master sent it: a replica still on the old history must not pull the session back.
   */
  observe(db: string, token: string, fromMaster: boolean): void {
    const next = parse(token);
    if (!next) return;
    const cur = this.byDb.get(db);
    const have = cur ? parse(cur) : null;
    if (!have) {
      this.byDb.set(db, token);
    } else if (have.history === next.history) {
      if (next.version > have.version) this.byDb.set(db, token);
    } else if (fromMaster) {
      this.byDb.set(db, token);
    }
  }

  clear(): void {
    this.byDb.clear();
  }
}

function parse(token: string): { history: string; version: number } | null {
  const at = token.lastIndexOf(".");
  if (at <= 0) return null;
  const version = Number(token.slice(at + 1));
  return Number.isSafeInteger(version) ? { history: token.slice(0, at), version } : null;
}
