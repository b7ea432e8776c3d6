"""The live alerts page served at ``/`` by ``sensorhub alerts serve``: plain HTML and JavaScript.

It connects to ``/alerts?history=200`` (passing on its own ``token``,
``device``, ``rule`` and ``severity`` query parameters), keeps one table row
per alert (``<tr id="alert-<id>" data-state="open|closed">``), open alerts
on top, and reconnects with a jittered delay when the connection drops. Text
goes in with ``textContent`` only, never as HTML.
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sensorhub alerts</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .3em; }
  #status { color: #666; margin-bottom: 1em; }
  #status.down { color: #b00; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; white-space: nowrap; }
  th { background: #f4f4f4; }
  tr.open.critical td { background: #fdd; }
  tr.open.warning td { background: #fed; }
  tr.open.info td { background: #eef; }
  tr.closed td { color: #777; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<h1>sensorhub alerts</h1>
<div id="status">connecting&hellip;</div>
<div><span id="open-count">0</span> open, <span id="closed-count">0</span> closed shown</div>
<table>
<thead><tr><th>state</th><th>severity</th><th>rule</th><th>device</th><th>metric</th>
<th>value</th><th>threshold</th><th>opened</th><th>closed</th></tr></thead>
<tbody id="alerts"></tbody>
</table>
<script>
"use strict";
const MAX_ROWS = 500;
const rows = new Map();  // alert id -> {tr, ev}
const tbody = document.getElementById("alerts");
const statusEl = document.getElementById("status");

function fmtTime(s) {
  if (s === null || s === undefined) return "";
  return new Date(s * 1000).toISOString().replace("T", " ").replace("Z", "");
}
function fmtNum(v) {
  if (v === null || v === undefined) return "";
  return Math.abs(v) >= 1e6 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(Math.round(v * 1000) / 1000);
}
function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}
function render(entry) {
  const ev = entry.ev, tr = entry.tr;
  tr.replaceChildren();
  tr.className = ev.state + " " + ev.severity;
  tr.dataset.state = ev.state;
  tr.dataset.rule = ev.rule;
  tr.dataset.device = ev.device;
  cell(tr, ev.state); cell(tr, ev.severity); cell(tr, ev.rule); cell(tr, ev.device); cell(tr, ev.metric);
  cell(tr, fmtNum(ev.state === "open" ? ev.value : ev.open_value), "num");
  cell(tr, fmtNum(ev.threshold), "num");
  cell(tr, fmtTime(ev.opened)); cell(tr, fmtTime(ev.closed));
}
function counts() {
  let open = 0;
  for (const e of rows.values()) if (e.ev.state === "open") open++;
  document.getElementById("open-count").textContent = open;
  document.getElementById("closed-count").textContent = rows.size - open;
}
function upsert(ev) {
  let entry = rows.get(ev.id);
  if (!entry) {
    entry = {tr: document.createElement("tr"), ev: ev};
    entry.tr.id = "alert-" + ev.id;
    rows.set(ev.id, entry);
  } else if (entry.ev.state === "closed" && ev.state === "open") {
    return;  // an older open event after its close (history, then live)
  }
  entry.ev = ev;
  render(entry);
  if (ev.state === "open") {
    tbody.prepend(entry.tr);
  } else {
    const firstClosed = Array.from(tbody.children).find(tr => tr !== entry.tr && tr.dataset.state === "closed");
    tbody.insertBefore(entry.tr, firstClosed || null);
  }
  while (rows.size > MAX_ROWS) {  // bounded: drop the oldest closed row
    const last = Array.from(tbody.children).reverse().find(tr => tr.dataset.state === "closed");
    if (!last) break;
    rows.delete(last.id.slice("alert-".length));
    last.remove();
  }
  counts();
}
function connect(attempt) {
  const own = new URLSearchParams(location.search);
  const q = new URLSearchParams({history: "200"});
  for (const k of ["token", "device", "rule", "severity"]) if (own.get(k)) q.set(k, own.get(k));
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/alerts?" + q);
  ws.onopen = () => { statusEl.textContent = "live"; statusEl.className = "up"; attempt = 0; };
  ws.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    if (ev.type === "alert") upsert(ev);
  };
  ws.onclose = (e) => {
    statusEl.textContent = "disconnected (" + (e.reason || e.code) + "), reconnecting";
    statusEl.className = "down";
    const delay = Math.min(10000, 500 * 2 ** Math.min(attempt, 5)) * (0.5 + Math.random() / 2);
    setTimeout(() => connect(attempt + 1), delay);
  };
}
connect(0);
</script>
</body>
</html>
"""
