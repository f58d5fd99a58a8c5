// Builds reducer.js (with logq.js) into reducer.wasm: a component of the
// logq:reducer world that imports nothing. Every WASI feature ComponentizeJS can
// leave out is left out: no clock, no randomness, no stdio, no network.
import { componentize } from "@bytecodealliance/componentize-js";
import { readFile, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

const here = (name) => fileURLToPath(new URL(name, import.meta.url));
const { component, imports } = await componentize({
  sourcePath: here("reducer.js"),
  witPath: here("wit/reducer.wit"),
  worldName: "reducer",
  disableFeatures: ["stdio", "random", "clocks", "http", "fetch-event"],
});
await writeFile(here("reducer.wasm"), component);
console.log(`reducer.wasm: ${component.length} bytes; imports: ${JSON.stringify(imports)}`);
