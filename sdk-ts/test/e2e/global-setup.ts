/**
 * Builds and packs the SDK, and installs the tarball into a scratch project the way a user
 * would (`npm install ./vski-sdk-x.y.z.tgz`), so the end-to-end tests drive the published
 * artifact, not the sources.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

export default function setup(): void {
  const root = resolve(__dirname, "../..");
  const app = join(root, "test/e2e/.app");
  rmSync(app, { recursive: true, force: true });
  mkdirSync(app, { recursive: true });
  execFileSync("npm", ["run", "build", "--silent"], { cwd: root, stdio: "inherit" });
  execFileSync("npm", ["pack", "--silent", "--pack-destination", app], { cwd: root, stdio: ["ignore", "ignore", "inherit"] });
  const tgz = readdirSync(app).find((f) => f.endsWith(".tgz"));
  if (!tgz) throw new Error("npm pack produced no tarball");
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "sdk-e2e-app", private: true, type: "module" }));
  execFileSync("npm", ["install", "--silent", "--no-audit", "--no-fund", "--offline", `./${tgz}`], {
    cwd: app,
    stdio: "inherit",
  });
  process.env["VSKI_SDK_APP"] = app;
}
