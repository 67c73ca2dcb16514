/**
 * The client's session: the newest `X-Db-Position` it has seen per database. The token is
 * opaque to applications; the SDK reads it as `<epoch>.<uid>.<version>[.<hash>]` to keep the
 * highest.
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
  // `<epoch>.<uid>.<version>`, with the chained hash after it (`.<hash>`): the history is
  // compared by epoch and uid here; the server compares the hash.
  const parts = token.split(".");
  if (parts.length !== 3 && parts.length !== 4) return null;
  const version = Number(parts[2]);
  return Number.isSafeInteger(version) ? { history: `${parts[0]}.${parts[1]}`, version } : null;
}
