/**
 * Builds a filter expression with `{:name}` placeholders replaced by safely quoted values, as
 * PocketBase's `pb.filter`: strings are single-quoted with `\` and `'` escaped, numbers and
 * booleans are written as they are, `null`/`undefined` as `null`, dates as vski's UTC time
 * strings, and anything else as quoted JSON. User input never changes the expression's shape.
 *
 * ```ts
 * client.filter("title ~ {:q} && created >= {:since}", { q: "it's", since: new Date() })
 * ```
 */
export function filter(expr: string, params?: { [key: string]: unknown }): string {
  if (!params) return expr;
  let out = expr;
  for (const key of Object.keys(params)) {
    out = out.split(`{:${key}}`).join(quote(params[key]));
  }
  return out;
}

function quote(value: unknown): string {
  if (value === null || value === undefined) return "null";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : "null";
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "boolean") return value ? "true" : "false";
  if (value instanceof Date) return text(value.toISOString().replace("T", " "));
  if (typeof value === "string") return text(value);
  return text(JSON.stringify(value));
}

function text(s: string): string {
  return "'" + s.replace(/\\/g, "\\\\").replace(/'/g, "\\'") + "'";
}
