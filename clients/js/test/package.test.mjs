// The package as npm users get it: `npm pack` of service/static, installed from the
// tarball into a fresh project, imported by name and used against the real worker.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { lstat, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";
import { promisify } from "node:util";

import { TEST_TIMEOUT_MS, WAIT_MS, WS, unique } from "../harness.mjs";

const run = promisify(execFile);
const HERE = path.dirname(fileURLToPath(import.meta.url));
const PACKAGE = path.resolve(HERE, "../../../service/static");
// The test project's own ws, handed to the installed client (which has no dependencies).
const WS_MODULE = pathToFileURL(path.resolve(HERE, "../node_modules/ws/wrapper.mjs")).href;

/** Runs a command, failing with its output; bounded, so that the test ends by itself. */
async function sh(cwd, command, ...args) {
  try {
    return await run(command, args, { cwd, timeout: 6 * WAIT_MS });
  } catch (error) {
    throw new Error(`${command} ${args.join(" ")} failed:\n${error.stdout}\n${error.stderr}`);
  }
}

const slow = { timeout: TEST_TIMEOUT_MS * 2 }; // two npm runs

test("npm pack makes a tarball that installs and imports by name", slow, async (t) => {
  const work = await mkdtemp(path.join(tmpdir(), "broadcast-client-"));
  t.after(() => rm(work, { recursive: true, force: true }));

  const { stdout } = await sh(work, "npm", "pack", "--json", "--pack-destination", work, PACKAGE);
  const [packed] = JSON.parse(stdout);
  const manifest = JSON.parse(await readFile(path.join(PACKAGE, "package.json"), "utf8"));
  assert.equal(packed.name, "broadcast-service-client");
  assert.equal(packed.filename, `broadcast-service-client-${manifest.version}.tgz`);
  // Exactly these: not index.html, nor anything else served from service/static.
  assert.deepEqual(packed.files.map((f) => f.path).sort(), [
    "README.md",
    "client.d.ts",
    "client.js",
    "package.json",
  ]);

  const app = path.join(work, "app");
  await sh(work, "mkdir", app);
  await writeFile(
    path.join(app, "package.json"),
    JSON.stringify({ name: "app", private: true, type: "module" }),
  );
  await sh(app, "npm", "install", "--no-audit", "--no-fund", path.join(work, packed.filename));
  const installed = path.join(app, "node_modules/broadcast-service-client");
  // A copy of the one source file, not a link back to the repository.
  assert.ok(!(await lstat(installed)).isSymbolicLink());
  assert.equal(
    await readFile(path.join(installed, "client.js"), "utf8"),
    await readFile(path.join(PACKAGE, "client.js"), "utf8"),
  );

  // A script of the app: imports the package by name, and makes a round trip.
  const channel = unique();
  const script = `
    import { BroadcastClient } from "broadcast-service-client";
    import { WebSocket } from ${JSON.stringify(WS_MODULE)};
    const client = new BroadcastClient(${JSON.stringify(WS)}, { WebSocket });
    const timer = setTimeout(() => { console.log("timeout"); process.exit(1); }, ${WAIT_MS});
    client.addEventListener("subscribed", () => client.publish(${JSON.stringify(channel)}, "hi"));
    client.addEventListener("message", (e) => {
      console.log(JSON.stringify(e.detail.data));
      clearTimeout(timer);
      client.close();
    });
    client.subscribe(${JSON.stringify(channel)});
    client.connect();
  `;
  await writeFile(path.join(app, "main.js"), script);
  const result = await sh(app, process.execPath, "main.js");
  assert.equal(result.stdout.trim(), '"hi"');
});
