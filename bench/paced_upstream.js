// A paced SSE upstream: one chat-completions event every PACE_MS (20), EVENTS (40) of them,
// then [DONE]; the first event goes out at once. Node, so it is never the bottleneck.
const http = require("http");
const PORT = Number(process.env.PORT || 4400);
const PACE_MS = Number(process.env.PACE_MS || 20);
const EVENTS = Number(process.env.EVENTS || 40);

function chunk(i) {
  const body = { id: "chatcmpl-bench", object: "chat.completion.chunk", created: 1, model: "bench",
    choices: [{ index: 0, delta: { content: ` token${i}` }, finish_reason: null }] };
  return `data: ${JSON.stringify(body)}\n\n`;
}

http.createServer((req, res) => {
  req.resume();
  req.on("end", () => {
    res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
    let i = 0;
    res.write(chunk(i++));
    const timer = setInterval(() => {
      if (i >= EVENTS) {
        clearInterval(timer);
        res.end("data: [DONE]\n\n");
        return;
      }
      res.write(chunk(i++));
    }, PACE_MS);
    res.on("close", () => clearInterval(timer));
  });
}).listen(PORT, "127.0.0.1");
