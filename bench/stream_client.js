// CONCURRENCY streams kept open for DURATION_S: each one measures time to first byte and to
// the last byte; prints JSON with completed streams/s and TTFB percentiles (ms).
const http = require("http");
const url = new URL(process.env.TARGET);
const CONCURRENCY = Number(process.env.CONCURRENCY || 500);
const DURATION_S = Number(process.env.DURATION_S || 8);
const body = JSON.stringify({ model: "bench", stream: true,
  messages: [{ role: "user", content: "Write a short answer; contact me at jane.doe@example.com" }] });
const agent = new http.Agent({ keepAlive: true, maxSockets: CONCURRENCY });
const ttfb = [], total = [];
let completed = 0, failed = 0, stopping = false;
const started = Date.now();

function one() {
  if (stopping) return;
  const t0 = process.hrtime.bigint();
  let first = null;
  const req = http.request({ host: url.hostname, port: url.port, path: "/v1/chat/completions", method: "POST", agent,
    headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body), "X-Api-Key": "bench" } },
    (res) => {
      res.on("data", () => { if (first === null) first = process.hrtime.bigint(); });
      res.on("end", () => {
        const t1 = process.hrtime.bigint();
        if (res.statusCode === 200 && first !== null) {
          completed++; ttfb.push(Number(first - t0) / 1e6); total.push(Number(t1 - t0) / 1e6);
        } else failed++;
        one();
      });
    });
  req.on("error", () => { failed++; setTimeout(one, 10); });
  req.end(body);
}

for (let i = 0; i < CONCURRENCY; i++) one();
setTimeout(() => {
  stopping = true;
  const secs = (Date.now() - started) / 1000;
  const pct = (a, p) => { const s = [...a].sort((x, y) => x - y); return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : null; };
  console.log(JSON.stringify({ completed, failed, streams_per_s: completed / secs,
    ttfb_p50_ms: pct(ttfb, 0.5), ttfb_p99_ms: pct(ttfb, 0.99), total_p50_ms: pct(total, 0.5) }));
  process.exit(0);
}, DURATION_S * 1000);
