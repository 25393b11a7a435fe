// Subscribe with the official Convex npm client and print one JSON line per result.
//
//   node subscribe.mjs URL PATH ARGS_JSON
//
// The token comes from STELLA_TOKEN (never argv). Each line is
// {"value": ..., "chunks": n} or {"error": "..."}, where n counts the
// TransitionChunk messages the socket has carried so far: the client
// reassembles them itself, this only watches the frames go by.
import { ConvexClient } from "convex/browser";
import { anyApi } from "convex/server";
import WebSocket from "ws";

const [url, path, argsJson] = process.argv.slice(2);
const [moduleName, functionName] = path.split(":");
let chunks = 0;

// Node 20 has no global WebSocket; ConvexClient takes a constructor.
class CountingWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (event) => {
      if (JSON.parse(event.data.toString()).type === "TransitionChunk") chunks += 1;
    });
  }
}

const client = new ConvexClient(url, { webSocketConstructor: CountingWebSocket });
const token = process.env.STELLA_TOKEN;
if (token) client.setAuth(async () => token);
client.onUpdate(
  anyApi[moduleName][functionName],
  JSON.parse(argsJson),
  (value) => process.stdout.write(JSON.stringify({ value, chunks }) + "\n"),
  (error) => process.stdout.write(JSON.stringify({ error: String(error) }) + "\n"),
);
