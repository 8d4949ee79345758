// A real, maintained third-party SSE client for the end-to-end suite.
//
// Usage: node client.mjs URL OUTPUT_FILE [EVENT_TYPE ...]
//
// Subscribes with the npm `eventsource` package, which reconnects by itself and
// sends Last-Event-ID; this script adds no reconnection logic of its own, so the
// suite tests what users of that package get. It appends one JSON line to
// OUTPUT_FILE per open, error and received event ("message", "broker.gap" and any
// EVENT_TYPE given), and a last line with its readyState when it gets SIGTERM.
import { appendFileSync } from "node:fs";
import { EventSource } from "eventsource";

const [url, output, ...extraTypes] = process.argv.slice(2);
if (!url || !output) {
  console.error("usage: node client.mjs URL OUTPUT_FILE [EVENT_TYPE ...]");
  process.exit(2);
}

// Synchronous appends: a line is on disk before the next event is handled, so
// the suite can read the file at any moment and see a prefix of what happened.
function record(entry) {
  appendFileSync(output, JSON.stringify({ t: Date.now() / 1000, ...entry }) + "\n");
}

const source = new EventSource(url);

source.addEventListener("open", () => record({ kind: "open" }));
source.addEventListener("error", (event) => {
  record({
    kind: "error",
    message: event.message ?? null,
    code: event.code ?? null,
    readyState: source.readyState,
  });
});
for (const type of new Set(["message", "broker.gap", ...extraTypes])) {
  source.addEventListener(type, (event) => {
    record({ kind: "event", type: event.type, id: event.lastEventId, data: event.data });
  });
}

function stop() {
  record({ kind: "final", readyState: source.readyState });
  source.close();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
