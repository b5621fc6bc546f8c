// One MCP client held open for the failover bench, in Node: `node failover_clients_driver.mjs ts-sdk|mcp-remote URL`.
// ts-sdk: the TypeScript SDK's Client over its StreamableHTTPClientTransport. mcp-remote: the same Client
// over stdio to `mcp-remote URL`, the bridge desktop clients run, so what is measured is mcp-remote's
// behaviour. The packages come from the directory in FAILOVER_NODE_DIR (npm install there). Same
// protocol as failover_clients_driver.py: prints {"ready": true}, then one JSON line per `call`.
import path from "node:path";
import readline from "node:readline";
import { pathToFileURL } from "node:url";

const [mode, url] = process.argv.slice(2);
const nodeDir = process.env.FAILOVER_NODE_DIR;
const sdk = (file) => import(pathToFileURL(path.join(nodeDir, "node_modules/@modelcontextprotocol/sdk/dist/esm", file)).href);
const emit = (document) => process.stdout.write(JSON.stringify(document) + "\n");
const CALL_TIMEOUT_MS = 30000;

try {
  const { Client } = await sdk("client/index.js");
  let transport;
  if (mode === "mcp-remote") {
    const { StdioClientTransport } = await sdk("client/stdio.js");
    const bridge = path.join(nodeDir, "node_modules/mcp-remote/dist/proxy.js");
    transport = new StdioClientTransport({ command: process.execPath, args: [bridge, url, "--transport", "http-only"], stderr: "ignore" });
  } else {
    const { StreamableHTTPClientTransport } = await sdk("client/streamableHttp.js");
    transport = new StreamableHTTPClientTransport(new URL(url));
  }
  const client = new Client({ name: "failover-bench", version: "1" });
  await client.connect(transport);
  emit({ ready: true });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() !== "call") break;
    const started = performance.now();
    const seconds = () => Math.round(performance.now() - started) / 1000;
    try {
      const result = await client.callTool({ name: "whoami", arguments: {} }, undefined, { timeout: CALL_TIMEOUT_MS });
      const text = result.content?.[0]?.text ?? "";
      if (result.isError) emit({ ok: false, error: `tool error: ${text}`.slice(0, 300), seconds: seconds() });
      else emit({ ok: true, result: text, seconds: seconds() });
    } catch (error) {
      emit({ ok: false, error: `${error?.name}: ${error?.message}`.slice(0, 300), seconds: seconds() });
    }
  }
  await client.close();
  process.exit(0);
} catch (error) {
  emit({ fatal: `${error?.name}: ${error?.message}`.slice(0, 300) });
  process.exit(1);
}
