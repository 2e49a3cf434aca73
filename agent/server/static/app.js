// The Nexus fleet page: an operator client of /v1/ws, no library, no build step.
//
// Rules:
// - The token comes from the URL fragment (#token=...), which the browser never sends in
//   a request; it is then removed from the address bar and kept in sessionStorage for
//   reloads. Without one, or when the server refuses it, the page asks for one.
// - Browsers cannot set an Authorization header on a WebSocket, so the page sends the
//   token as ?token= on /v1/ws, as the guide's browser client does.
// - Devices are learned from telemetry.update; events.update (device.online,
//   device.offline) says when one connects or goes. A device once seen stays listed.
// - A telemetry.update with a `source` is an application's sample (the ingest socket, a
//   script input): it goes to the picked device's source list, never into the device's
//   row or chart, which show the device's own readings (no source).
// - Everything from the network is shown with textContent, never parsed as HTML.
"use strict";

const HISTORY_MS = 5 * 60 * 1000;
const CHART_MIN_MS = 30 * 1000;
const RECONNECT_MAX_MS = 10000;
const devices = new Map(); // device_id -> {state, lastSeen, metrics, history, row, sources}
const pending = new Map(); // command id -> result <li>
let socket = null;
let token = null;
let picked = null;
let reconnectMs = 500;
let counter = 0;

const $ = (id) => document.getElementById(id);

function start() {
  token = takeToken();
  $("login-form").addEventListener("submit", onLogin);
  $("command-form").addEventListener("submit", onCommand);
  setInterval(refreshAges, 1000);
  if (token) connect(); else askForToken("");
}

function takeToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    const value = decodeURIComponent(match[1]);
    sessionStorage.setItem("nexus-token", value);
    history.replaceState(null, "", location.pathname); // out of the address bar and history
    return value;
  }
  return sessionStorage.getItem("nexus-token");
}

function askForToken(reason) {
  $("login").hidden = false;
  $("fleet").hidden = true;
  $("login-reason").textContent = reason;
  $("token-input").focus();
}

function onLogin(event) {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  token = value;
  sessionStorage.setItem("nexus-token", value);
  $("token-input").value = "";
  connect();
}

// ------------------------------------------------------------------ connection

function connect() {
  $("login").hidden = true;
  $("fleet").hidden = false;
  setConn("connecting", "connecting…");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/v1/ws?token=${encodeURIComponent(token)}`);
  socket.onmessage = (event) => onMessage(JSON.parse(event.data));
  socket.onclose = onClose;
}

function onClose(event) {
  socket = null;
  if (event.code === 4000) { // AUTH_FAILED: a new token is needed, retrying would not help
    sessionStorage.removeItem("nexus-token");
    setConn("refused", "token refused");
    askForToken(event.reason === "Token expired"
      ? "This token has expired: the server ended the session. Paste a new token."
      : "The server refused this token (expired, or signed with another secret).");
    return;
  }
  setConn("closed", `disconnected (${event.code}); retrying in ${reconnectMs / 1000} s`);
  for (const d of devices.values()) setState(d, "offline"); // unknown until we hear again
  setTimeout(connect, reconnectMs);
  reconnectMs = Math.min(RECONNECT_MAX_MS, reconnectMs * 2);
}

function send(type, payload, id) {
  const message = { type, id: id || nextId("page"), timestamp: new Date().toISOString(), payload };
  socket.send(JSON.stringify(message));
  return message.id;
}

function nextId(prefix) {
  counter += 1;
  return `${prefix}-${Date.now()}-${counter}-${Math.random().toString(36).slice(2, 8)}`;
}

function setConn(state, text) {
  $("conn").dataset.state = state;
  $("conn").textContent = text;
}

function onMessage(msg) {
  switch (msg.type) {
    case "connected":
      reconnectMs = 500;
      setConn("open", "live");
      send("subscribe", { channel: "telemetry", filters: {} });
      send("subscribe", { channel: "events", filters: {} });
      break;
    case "telemetry.update": onTelemetry(msg.payload); break;
    case "events.update": onEvent(msg.payload); break;
    case "command.result": onResult(msg.id, msg.payload); break;
    case "error": onError(msg); break;
    default: break; // subscribed, ack, pong
  }
}

// ------------------------------------------------------------------ devices

function device(id) {
  let d = devices.get(id);
  if (!d) {
    d = { id, state: "online", lastSeen: null, metrics: {}, history: [], row: makeRow(id),
      sources: new Map() }; // source -> {metrics, tags, seen}
    devices.set(id, d);
    addDeviceOption(id);
    $("no-devices").hidden = true;
    if (!picked) pick(id);
  }
  return d;
}

function onTelemetry(payload) {
  if (!payload || typeof payload.device_id !== "string") return;
  const d = device(payload.device_id);
  const now = Date.now();
  d.lastSeen = now;
  if (typeof payload.source === "string") {
    d.sources.set(payload.source, { metrics: payload.metrics || {}, tags: payload.tags || {},
      seen: now });
    refreshAge(d);
    if (picked === d.id) drawSources();
    return;
  }
  d.metrics = payload.metrics || {};
  d.history.push({ t: now, cpu: d.metrics.cpu_usage, mem: d.metrics.memory_usage });
  while (d.history.length && d.history[0].t < now - HISTORY_MS) d.history.shift();
  setState(d, "online");
  fillRow(d);
  if (picked === d.id) drawChart();
}

function onEvent(payload) {
  if (!payload || typeof payload.device_id !== "string") return;
  if (payload.event === "device.online") setState(device(payload.device_id), "online");
  if (payload.event === "device.offline") setState(device(payload.device_id), "offline");
}

function setState(d, state) {
  d.state = state;
  d.row.dataset.state = state;
  cell(d.row, "state").textContent = state;
}

const COLUMNS = ["device", "state", "seen", "cpu", "mem", "temp", "queued", "dropped",
  "reconnects", "offset"];

function makeRow(id) {
  const row = document.createElement("tr");
  row.dataset.device = id;
  for (const field of COLUMNS) {
    const td = document.createElement("td");
    td.dataset.field = field;
    row.appendChild(td);
  }
  cell(row, "device").textContent = id;
  row.addEventListener("click", () => pick(id));
  $("devices").tBodies[0].appendChild(row);
  return row;
}

function cell(row, field) {
  return row.querySelector(`td[data-field="${field}"]`);
}

function fmt(value, digits, unit) {
  if (typeof value !== "number" || !isFinite(value)) return "—";
  return value.toFixed(digits) + unit;
}

function fillRow(d) {
  const m = d.metrics;
  cell(d.row, "cpu").textContent = fmt(m.cpu_usage, 1, " %");
  cell(d.row, "mem").textContent = fmt(m.memory_usage, 1, " %");
  cell(d.row, "temp").textContent = fmt(m.cpu_temp_c, 1, " °C");
  cell(d.row, "queued").textContent = fmt(m.agent_queue_depth, 0, "");
  cell(d.row, "dropped").textContent = fmt(m.agent_dropped, 0, "");
  cell(d.row, "reconnects").textContent = fmt(m.agent_reconnects, 0, "");
  const offset = m.agent_clock_offset_s;
  cell(d.row, "offset").textContent =
    typeof offset === "number" ? (offset >= 0 ? "+" : "") + offset.toFixed(3) + " s" : "—";
  refreshAge(d);
}

function refreshAge(d) {
  const text = d.lastSeen === null ? "never"
    : `${Math.max(0, Math.round((Date.now() - d.lastSeen) / 1000))} s ago`;
  cell(d.row, "seen").textContent = text;
}

function refreshAges() {
  for (const d of devices.values()) refreshAge(d);
  drawSources();
}

function pairs(obj) {
  return Object.entries(obj).map(([k, v]) => `${k}=${v}`).join("  ");
}

// The picked device's sources, one row each: the latest values and tags (textContent only).
function drawSources() {
  const body = $("source-table").tBodies[0];
  body.replaceChildren();
  const d = devices.get(picked);
  const sources = d ? [...d.sources.entries()].sort((a, b) => a[0].localeCompare(b[0])) : [];
  $("no-sources").hidden = sources.length > 0;
  for (const [name, s] of sources) {
    const row = document.createElement("tr");
    row.dataset.source = name;
    const ago = `${Math.max(0, Math.round((Date.now() - s.seen) / 1000))} s ago`;
    for (const [field, text] of [["source", name], ["values", pairs(s.metrics)],
      ["tags", pairs(s.tags)], ["seen", ago]]) {
      const td = document.createElement("td");
      td.dataset.field = field;
      td.textContent = text;
      row.appendChild(td);
    }
    body.appendChild(row);
  }
}

function addDeviceOption(id) {
  const option = document.createElement("option");
  option.value = id;
  option.textContent = id;
  $("command-device").appendChild(option);
}

function pick(id) {
  picked = id;
  for (const d of devices.values()) d.row.classList.toggle("picked", d.id === id);
  $("chart-device").textContent = id;
  $("sources-device").textContent = id;
  $("command-device").value = id;
  drawChart();
  drawSources();
}

// ------------------------------------------------------------------ chart (plain SVG)

const SVG = "http://www.w3.org/2000/svg";
const W = 600;
const H = 200;

function svg(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function drawChart() {
  const chart = $("chart");
  chart.replaceChildren();
  for (const pct of [25, 50, 75]) {
    const y = H - (pct / 100) * H;
    chart.appendChild(svg("line", { x1: 0, x2: W, y1: y, y2: y, class: "grid" }));
  }
  const d = devices.get(picked);
  if (!d) return;
  // The x axis spans what is kept (at least CHART_MIN_MS, at most HISTORY_MS), ending now.
  const end = Date.now();
  const first = d.history.length ? d.history[0].t : end;
  const span = Math.min(HISTORY_MS, Math.max(CHART_MIN_MS, end - first));
  $("chart-span").textContent = span >= 60000 ? `${Math.round(span / 60000)} min`
    : `${Math.round(span / 1000)} s`;
  for (const key of ["cpu", "mem"]) {
    const points = d.history
      .filter((s) => typeof s[key] === "number")
      .map((s) => {
        const x = W - ((end - s.t) / span) * W;
        const y = H - (Math.min(100, Math.max(0, s[key])) / 100) * H;
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
    chart.appendChild(svg("polyline", { points: points.join(" "), class: key }));
  }
}

// ------------------------------------------------------------------ commands

// Words as a POSIX shell splits them (what nexus-ctl gets from the shell): blanks
// separate; '...' keeps everything literally; "..." keeps all but \" \\ \$ \`; a
// backslash outside quotes keeps the next character. text="hello world" is one word.
function splitWords(text) {
  const words = [];
  let word = null;
  let quote = null;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote === "'") {
      if (c === "'") quote = null; else word += c;
    } else if (quote === '"') {
      if (c === '"') quote = null;
      else if (c === "\\" && '"\\$`'.includes(text[i + 1] ?? "x")) word += text[++i];
      else word += c;
    } else if (/\s/.test(c)) {
      if (word !== null) words.push(word);
      word = null;
    } else {
      if (word === null) word = "";
      if (c === "'" || c === '"') quote = c;
      else if (c === "\\" && i + 1 < text.length) word += text[++i];
      else word += c;
    }
  }
  if (quote) throw new Error(`the ${quote} quote is not closed`);
  if (word !== null) words.push(word);
  return words;
}

function parseArgs(text) {
  const args = {};
  for (const pair of splitWords(text)) {
    const at = pair.indexOf("=");
    if (at < 1) throw new Error(`argument "${pair}" is not key=value`);
    args[pair.slice(0, at)] = pair.slice(at + 1);
  }
  return args;
}

function onCommand(event) {
  event.preventDefault();
  const deviceId = $("command-device").value;
  const name = $("command-name").value.trim();
  const item = resultItem(deviceId, name);
  let args;
  try {
    args = parseArgs($("command-args").value);
  } catch (err) {
    showStatus(item, "error", err.message);
    return;
  }
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    showStatus(item, "error", "not connected to the server");
    return;
  }
  const id = send("command", { device_id: deviceId, name, args }, nextId("cmd"));
  item.dataset.commandId = id;
  pending.set(id, item);
  showStatus(item, "sent", "waiting for the device…");
}

function resultItem(deviceId, name) {
  const item = document.createElement("li");
  const head = document.createElement("div");
  const status = document.createElement("span");
  status.className = "status";
  const what = document.createElement("span");
  what.textContent = ` ${name} on ${deviceId} `;
  const detail = document.createElement("span");
  detail.className = "detail";
  head.append(status, what, detail);
  item.appendChild(head);
  $("results").prepend(item);
  return item;
}

function showStatus(item, status, detail) {
  item.dataset.status = status;
  item.querySelector(".status").textContent = status;
  item.querySelector(".detail").textContent = detail;
}

function onResult(id, payload) {
  const item = pending.get(id);
  if (!item || !payload) return;
  pending.delete(id);
  const code = payload.exit_code === null || payload.exit_code === undefined
    ? "" : `exit ${payload.exit_code}, `;
  showStatus(item, payload.status, `${code}${payload.duration_ms} ms`);
  for (const stream of ["stdout", "stderr"]) {
    if (payload[stream]) {
      const pre = document.createElement("pre");
      pre.className = stream;
      pre.textContent = payload[stream];
      item.appendChild(pre);
    }
  }
}

function onError(msg) {
  const error = msg.error || {};
  const item = pending.get(msg.id);
  if (item) { // DEVICE_OFFLINE, FORBIDDEN, INVALID_MESSAGE... for a command we sent
    pending.delete(msg.id);
    showStatus(item, "error", `${error.code}: ${error.message}`);
  } else if (error.code !== "AUTH_FAILED") { // that one ends in close 4000, handled there
    setConn("open", `server error ${error.code}: ${error.message}`);
  }
}

start();
