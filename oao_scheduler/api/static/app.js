// OAO dashboard: one page over the HTTP API (docs/dashboard.md). No framework, no CDN.
// Views: #/ (runs), #/runs/<id> (one run, live over SSE), #/fleet (workers and queues).
// Every text from the API goes into the page through textContent, never as HTML.
"use strict";

const END_EVENTS = new Set(["RUN_SUCCEEDED", "RUN_FAILED", "RUN_CANCELLED", "RUN_PARTIAL"]);
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED", "PARTIAL"]);
// Node state after a node event (the report's mapping, oao_scheduler/report.py).
const NODE_STATE = {
  NODE_READY: "READY", NODE_STARTED: "RUNNING", NODE_SUCCEEDED: "SUCCEEDED", NODE_FAILED: "FAILED",
  NODE_SKIPPED: "SKIPPED", NODE_CANCELLED: "CANCELLED", NODE_RETRY_SCHEDULED: "PENDING",
  NODE_REQUEUED: "READY", NODE_HANDED_BACK: "READY", NODE_PARKED: "PARKED",
};
// Events that end a node attempt on the timeline.
const ATTEMPT_END = new Set([
  "NODE_SUCCEEDED", "NODE_FAILED", "NODE_CANCELLED", "NODE_RETRY_SCHEDULED", "NODE_REQUEUED",
  "NODE_HANDED_BACK",
]);
const MAX_DAG_NODES = 400;      // draw the graph up to this size
const MAX_TIMELINE_NODES = 200; // one timeline row per node up to this size
const MAX_LOG_ROWS = 1000;      // event rows kept in the page
const POLL_MS = 2000;           // runs list and fleet refresh

// ------------------------------------------------------------------ helpers

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k === "data") Object.assign(node.dataset, v);
    else if (k === "style") Object.assign(node.style, v);  // CSSOM: allowed by the CSP
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "data") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const enc = encodeURIComponent;
const badge = (status) => el("span", { class: "badge", text: status, data: { status } });
const fmtInt = (n) => (Number(n) || 0).toLocaleString("en-US");
const fmtCost = (x) => "$" + (Number(x) || 0).toFixed(4);

function fmtSecs(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  const m = Math.floor(s / 60);
  return m + " m " + Math.round(s - 60 * m) + " s";
}

function fmtTime(ms) {
  return ms ? new Date(Number(ms)).toLocaleTimeString() : "";
}

function preview(value, max = 400) {
  if (value === null || value === undefined) return "";
  const text = typeof value === "string" ? value : JSON.stringify(value, null, 1);
  return text.length > max ? text.slice(0, max) + ` … (${text.length} chars)` : text;
}

function errorText(err) {
  if (!err) return "";
  if (typeof err !== "object") return String(err);
  if (err.type === "PolicyViolation" && err.reason) return "PolicyViolation: " + err.reason;
  return `${err.type || "Error"}: ${err.message || ""}`;
}

function setConn(state, text) {
  const c = document.getElementById("conn");
  c.className = "conn " + state;
  c.textContent = text;
}

// ------------------------------------------------------------------ API access

class AuthNeeded extends Error {}

const api = {
  token: sessionStorage.getItem("oao-token") || "",
  headers() {
    return this.token ? { Authorization: "Bearer " + this.token } : {};
  },
  async request(method, path) {
    let resp;
    try {
      resp = await fetch(path, { method, headers: this.headers() });
    } catch (e) {
      setConn("down", "API unreachable");
      throw e;
    }
    if (resp.status === 401) {
      askToken(this.token ? "That token was refused." : "");
      throw new AuthNeeded();
    }
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      const msg = body && body.error ? body.error.message : resp.statusText;
      if (resp.status === 503) setConn("down", "Redis unavailable");
      throw new Error(`${resp.status}: ${msg}`);
    }
    setConn("live", "live");
    return body;
  },
  get(path) { return this.request("GET", path); },
  post(path) { return this.request("POST", path); },
};

function askToken(message) {
  const box = document.getElementById("token-box");
  document.getElementById("token-error").textContent = message || "";
  box.hidden = false;
  document.getElementById("token-input").focus();
}

function saveToken() {
  const value = document.getElementById("token-input").value.trim();
  if (!value) return;
  api.token = value;
  sessionStorage.setItem("oao-token", value);
  document.getElementById("token-box").hidden = true;
  route();
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
// Calls onMessage({id, event, data}) per message; resumes with Last-Event-ID after a
// dropped connection; returns when the run's end event arrived, the server closed the
// stream (the run is over), or signal aborted.
async function followEvents(runId, onMessage, signal) {
  let last = null;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const headers = api.headers();
      if (last) headers["Last-Event-ID"] = last;
      const resp = await fetch(`/runs/${enc(runId)}/events`, { headers, signal });
      if (resp.status === 401) { askToken("That token was refused."); return; }
      if (!resp.ok) throw new Error("events: HTTP " + resp.status);
      setConn("live", "live");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;  // the server ends the stream after the run's end
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const msg = { id: null, event: "message", data: "" };
          const data = [];
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (field === "id") msg.id = val;
            else if (field === "event") msg.event = val;
            else if (field === "data") data.push(val);
          }
          if (!data.length) continue;  // a keep-alive comment
          msg.data = JSON.parse(data.join("\n"));
          if (msg.id) last = msg.id;
          delay = 500;
          onMessage(msg);
          if (END_EVENTS.has(msg.event)) return;
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      setConn("down", "reconnecting…");
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
    }
  }
}

// Call fn at most once per `ms` (trailing call kept).
function throttle(fn, ms) {
  let timer = null;
  let again = false;
  const fire = async () => {
    again = false;
    try { await fn(); } catch (e) { if (!(e instanceof AuthNeeded)) console.warn(e); }
    timer = setTimeout(() => { timer = null; if (again) run(); }, ms);
  };
  const run = () => { if (timer) again = true; else { timer = -1; fire(); } };
  return run;
}

// ------------------------------------------------------------------ runs list

function viewRuns(root) {
  const body = el("tbody");
  const note = el("p", { class: "muted", text: "Loading…" });
  root.append(
    el("div", { class: "titlebar" }, el("h1", { text: "Runs" })),
    el("div", { class: "panel" },
      el("table", { id: "runs-table" },
        el("thead", {}, el("tr", {},
          ...["run", "name", "status", "nodes", "duration", "tokens in / out", "cost", "created"].map(
            (h, i) => el("th", { text: h, class: i >= 3 && i <= 6 ? "num" : "" })))),
        body),
      note));
  let stopped = false;
  (async () => {
    while (!stopped) {
      try {
        const runs = await api.get("/runs?limit=100");
        body.replaceChildren(...runs.map(runRow));
        note.textContent = runs.length ? "" : "No runs yet: submit one with oao-scheduler submit or POST /runs.";
      } catch (e) {
        if (!(e instanceof AuthNeeded)) note.textContent = String(e.message || e);
      }
      await sleep(POLL_MS);
    }
  })();
  return () => { stopped = true; };
}

function runRow(r) {
  const now = Date.now();
  const start = Number(r.started_at || r.created_at);
  const end = Number(r.finished_at) || (TERMINAL.has(r.status) ? start : now);
  return el("tr", { data: { runId: r.id, status: r.status || "?" } },
    el("td", {}, el("a", { href: "#/runs/" + enc(r.id), class: "mono", text: r.id })),
    el("td", { text: r.name || "" }),
    el("td", {}, badge(r.status || "?")),
    el("td", { class: "num", text: `${r.nodes_done || 0}/${r.nodes_total || 0}` +
      (Number(r.nodes_failed) ? ` (${r.nodes_failed} failed)` : "") }),
    el("td", { class: "num", text: start ? fmtSecs((end - start) / 1000) : "" }),
    el("td", { class: "num", text: `${fmtInt(r.tokens_in)} / ${fmtInt(r.tokens_out)}` }),
    el("td", { class: "num", text: fmtCost(r.cost_usd) }),
    el("td", { text: fmtTime(r.created_at) }));
}

// ------------------------------------------------------------------ one run

// Layered left-to-right layout: a node's column is its longest path from a root; rows
// in a column follow the mean row of the node's parents (one barycentre pass).
function layout(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const col = new Map();
  const colOf = (n, seen = new Set()) => {
    if (col.has(n.id)) return col.get(n.id);
    if (seen.has(n.id)) return 0;
    seen.add(n.id);
    let c = 0;
    for (const d of n.depends_on) if (byId.has(d)) c = Math.max(c, colOf(byId.get(d), seen) + 1);
    col.set(n.id, c);
    return c;
  };
  nodes.forEach((n) => colOf(n));
  const columns = [];
  for (const n of nodes) (columns[col.get(n.id)] ||= []).push(n);
  const row = new Map();
  columns.forEach((members, c) => {
    if (c > 0) {
      const key = (n) => {
        const ps = n.depends_on.filter((d) => row.has(d));
        return ps.length ? ps.reduce((s, d) => s + row.get(d), 0) / ps.length : 0;
      };
      members.sort((a, b) => key(a) - key(b));
    }
    members.forEach((n, i) => row.set(n.id, i));
  });
  return { col, row, columns };
}

function drawDag(graph, onSelect) {
  const W = 150, H = 34, GX = 60, GY = 14, PAD = 10;
  const { col, row, columns } = layout(graph.nodes);
  const tallest = Math.max(...columns.map((c) => c.length));
  const width = PAD * 2 + columns.length * W + (columns.length - 1) * GX;
  const height = PAD * 2 + tallest * H + (tallest - 1) * GY;
  const pos = (id) => {
    const members = columns[col.get(id)].length;
    const offset = ((tallest - members) * (H + GY)) / 2;  // centre short columns
    return { x: PAD + col.get(id) * (W + GX), y: PAD + offset + row.get(id) * (H + GY) };
  };
  const root = svg("svg", { class: "dag", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "the run's DAG" });
  for (const n of graph.nodes) {
    const b = pos(n.id);
    for (const d of n.depends_on) {
      if (!col.has(d)) continue;
      const a = pos(d);
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      root.append(svg("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
    }
  }
  const elements = new Map();
  for (const n of graph.nodes) {
    const p = pos(n.id);
    const label = n.id.length > 19 ? n.id.slice(0, 18) + "…" : n.id;
    const g = svg("g", { class: "node", transform: `translate(${p.x},${p.y})`,
      data: { node: n.id, status: "PENDING" } },
      svg("title", { text: `${n.id} (${n.agent})` }),
      svg("rect", { width: W, height: H }),
      svg("text", { x: 10, y: H / 2 + 4, text: label }));
    g.addEventListener("click", () => onSelect(n.id));
    elements.set(n.id, g);
    root.append(g);
  }
  return { root, elements };
}

function legend() {
  return el("div", { class: "legend" },
    ...["PENDING", "READY", "RUNNING", "SUCCEEDED", "FAILED", "SKIPPED", "CANCELLED", "PARKED"].map(
      (s) => el("span", {}, el("i", { style: { background: `var(--${s})` } }), s)));
}

function viewRun(root, runId) {
  const ctrl = new AbortController();
  const state = {
    graph: null, report: null, statuses: new Map(), attempts: new Map(), order: [],
    selected: null, live: new Map(), ended: false, firstTs: null, clockSkew: 0,
  };
  const title = el("h1", { class: "mono", text: runId });
  const status = badge("…");
  const cancelBtn = el("button", { class: "danger", id: "cancel-run", text: "Cancel run", disabled: "" });
  const summary = el("div", { class: "summary", id: "run-summary" });
  const dagBox = el("div", { class: "dag-wrap", id: "dag" }, el("p", { class: "muted", text: "Loading graph…" }));
  const timeline = el("div", { class: "timeline", id: "timeline" });
  const axis = el("div", { class: "tl-axis" });
  const logBody = el("tbody");
  const logBox = el("div", { class: "log", id: "event-log" },
    el("table", {}, el("thead", {}, el("tr", {}, ...["+s", "event", "node", "att", "data"].map(
      (h) => el("th", { text: h })))), logBody));
  const nodePanel = el("div", { class: "panel", id: "node-panel" },
    el("h2", { text: "Node" }), el("p", { class: "muted", text: "Click a node in the graph or the timeline." }));
  root.append(
    el("div", { class: "titlebar" }, el("a", { href: "#/", text: "← runs" }), title, status, cancelBtn),
    el("div", { class: "panel" }, summary),
    el("div", { class: "grid" },
      el("div", {},
        el("div", { class: "panel" }, el("h2", { text: "Graph" }), dagBox, legend()),
        el("div", { class: "panel" }, el("h2", { text: "Timeline of node attempts" }), timeline, axis),
        el("div", { class: "panel" }, el("h2", { text: "Event log" }), logBox)),
      nodePanel));

  let dag = null;

  const select = (nid) => {
    state.selected = nid;
    if (dag) for (const [id, g] of dag.elements) g.classList.toggle("selected", id === nid);
    refreshNode();
  };

  const renderSummary = () => {
    const r = state.report;
    if (!r) return;
    status.textContent = r.status;
    status.dataset.status = r.status;
    root.dataset.status = r.status;
    cancelBtn.disabled = TERMINAL.has(r.status);
    const t = r.totals;
    const item = (k, v) => el("span", {}, el("span", { class: "k", text: k }), v);
    summary.replaceChildren(
      item("workflow", r.name),
      item("nodes", `${t.nodes_done}/${t.nodes} done` + (t.nodes_failed ? `, ${t.nodes_failed} failed` : "")),
      item("steps", `${t.steps}` + (t.replayed_steps ? ` (+${t.replayed_steps} replayed)` : "")),
      item("tokens", `${fmtInt(t.tokens_in)} in / ${fmtInt(t.tokens_out)} out`),
      item("tool calls", String(t.tool_calls)),
      item("cost", fmtCost(t.cost_usd)),
      item("duration", r.duration_s === null ? "running" : fmtSecs(r.duration_s)),
      item("exec hash", el("code", { text: (r.exec_hash || "").slice(0, 16) })));
  };

  const paintNode = (nid) => {
    const g = dag && dag.elements.get(nid);
    if (g) g.dataset.status = state.statuses.get(nid) || "PENDING";
  };

  const renderTimeline = () => {
    const rows = state.order.slice(0, MAX_TIMELINE_NODES);
    if (!rows.length || state.firstTs === null) {
      timeline.replaceChildren(el("p", { class: "muted", text: "No node has started yet." }));
      return;
    }
    let tEnd = state.firstTs + 1;
    for (const list of state.attempts.values()) for (const a of list) tEnd = Math.max(tEnd, a.end || a.start);
    if (!state.ended) tEnd = Math.max(tEnd, Date.now() - state.clockSkew);
    const span = tEnd - state.firstTs;
    const pct = (t) => ((t - state.firstTs) / span) * 100;
    timeline.replaceChildren(...rows.map((nid) => {
      const track = el("div", { class: "tl-track" });
      for (const a of state.attempts.get(nid) || []) {
        const end = a.end || tEnd;
        const bar = el("div", {
          class: "tl-bar", text: a.worker,
          title: `${nid} attempt ${a.attempt} on ${a.worker}: ${a.endType || "running"} ` +
            `(${fmtSecs((end - a.start) / 1000)})`,
          style: { left: `${Math.min(pct(a.start), 99.4)}%`, width: `${Math.max(pct(end) - pct(a.start), 0.6)}%` },
          data: { node: nid, attempt: String(a.attempt), end: a.endType || "running", worker: a.worker },
        });
        track.append(bar);
      }
      return el("div", { class: "tl-row" },
        el("div", { class: "tl-label", text: nid, title: nid, onclick: () => select(nid) }), track);
    }));
    if (state.order.length > MAX_TIMELINE_NODES) {
      timeline.append(el("p", { class: "muted", text: `First ${MAX_TIMELINE_NODES} of ${state.order.length} nodes.` }));
    }
    axis.replaceChildren(el("span", { text: "0 s" }), el("span", { text: fmtSecs(span / 1000) }));
  };

  const appendLog = (msg) => {
    const ev = msg.data;
    if (state.firstTs === null) state.firstTs = ev.ts_ms;
    const near = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 30;
    logBody.append(el("tr", { data: { type: ev.type } },
      el("td", { class: "num", text: ((ev.ts_ms - state.firstTs) / 1000).toFixed(3) }),
      el("td", { text: ev.type }),
      el("td", { text: ev.node || "" }),
      el("td", { class: "num", text: ev.node ? String(ev.attempt) : "" }),
      el("td", { class: "data mono", text: preview(ev.data, 200) === "{}" ? "" : preview(ev.data, 200) })));
    while (logBody.childElementCount > MAX_LOG_ROWS) logBody.firstElementChild.remove();
    if (near) logBox.scrollTop = logBox.scrollHeight;
  };

  const applyEvent = (ev) => {
    if (ev.ts_ms) state.clockSkew = Date.now() - ev.ts_ms;  // the browser's clock vs Redis'
    const nid = ev.node;
    if (!nid) return;
    if (!state.attempts.has(nid)) { state.attempts.set(nid, []); state.order.push(nid); }
    const list = state.attempts.get(nid);
    if (ev.type === "NODE_STARTED") {
      list.push({ attempt: ev.attempt, worker: (ev.data && ev.data.worker) || "?", start: ev.ts_ms });
    } else if (ATTEMPT_END.has(ev.type)) {
      const open = [...list].reverse().find((a) => !a.end);
      if (open) { open.end = ev.ts_ms; open.endType = ev.type; }
    }
    if (NODE_STATE[ev.type]) { state.statuses.set(nid, NODE_STATE[ev.type]); paintNode(nid); }
  };

  const refreshSummary = throttle(async () => {
    state.report = await api.get(`/runs/${enc(runId)}`);
    renderSummary();
  }, 1000);
  const refreshTimeline = throttle(async () => renderTimeline(), 250);
  const refreshNode = throttle(async () => {
    if (!state.selected) return;
    const nid = state.selected;
    const n = await api.get(`/runs/${enc(runId)}/nodes/${enc(nid)}`);
    if (state.selected === nid) renderNode(nodePanel, n, state.live.get(nid));
  }, 500);

  cancelBtn.addEventListener("click", async () => {
    if (!window.confirm(`Cancel run ${runId}? Pending and running nodes become CANCELLED.`)) return;
    cancelBtn.disabled = true;
    try {
      await api.post(`/runs/${enc(runId)}/cancel`);
    } catch (e) {
      if (!(e instanceof AuthNeeded)) window.alert(String(e.message || e));
    }
    refreshSummary();
  });

  (async () => {
    try {
      const [graph, report] = await Promise.all([
        api.get(`/runs/${enc(runId)}/graph`), api.get(`/runs/${enc(runId)}`)]);
      state.graph = graph;
      state.report = report;
      renderSummary();
      if (graph.nodes.length <= MAX_DAG_NODES) {
        dag = drawDag(graph, select);
        dagBox.replaceChildren(dag.root);
      } else {
        dagBox.replaceChildren(el("p", { class: "muted",
          text: `${graph.nodes.length} nodes: too many to draw; see the timeline and the node table of GET /runs/${runId}.` }));
      }
      for (const n of report.nodes) state.statuses.set(n.id, n.status);  // until events say more
      for (const n of graph.nodes) paintNode(n.id);
    } catch (e) {
      if (!(e instanceof AuthNeeded)) dagBox.replaceChildren(el("p", { class: "error", text: String(e.message || e) }));
      return;
    }
    // Replay the log from the start, then follow it live.
    state.statuses.clear();
    for (const n of state.graph.nodes) state.statuses.set(n.id, "PENDING");
    await followEvents(runId, (msg) => {
      if (msg.event === "MODEL_DELTA") {  // live model text, never stored in the log
        const d = msg.data;
        const text = (state.live.get(d.node) || "") + (d.text || "");
        state.live.set(d.node, text.slice(-20000));
        if (state.selected === d.node) refreshNode();
        return;
      }
      applyEvent(msg.data);
      appendLog(msg);
      refreshTimeline();
      if (msg.data.node || END_EVENTS.has(msg.event)) refreshSummary();
      if (msg.data.node && msg.data.node === state.selected) refreshNode();
    }, ctrl.signal);
    if (ctrl.signal.aborted) return;
    state.ended = true;
    // The run is over: the stored node states are final.
    try {
      state.report = await api.get(`/runs/${enc(runId)}`);
      for (const n of state.report.nodes) { state.statuses.set(n.id, n.status); paintNode(n.id); }
      renderSummary();
      renderTimeline();
      refreshNode();
    } catch (e) { /* the next visit shows it */ }
  })();
  return () => ctrl.abort();
}

// What a step returned, as a person reads it: a model reply's text (and the tools it
// asked for), else the recorded result as is.
function stepResult(s) {
  const r = s.result;
  if (s.kind === "llm" && r && typeof r === "object" && typeof r.content === "string") {
    const calls = (r.tool_calls || []).map((c) => c.name || (c.function && c.function.name) || "?");
    return r.content + (calls.length ? ` [tool calls: ${calls.join(", ")}]` : "");
  }
  return r;
}

function renderNode(panel, n, liveText) {
  const kv = el("dl", { class: "kv" });
  const add = (k, v) => kv.append(el("dt", { text: k }), el("dd", {}, v));
  add("status", badge(n.status));
  add("agent", n.agent);
  add("attempt", `${n.attempt}` + (n.retries ? `, ${n.retries} retries` : "") + (n.requeues ? `, ${n.requeues} requeues` : ""));
  if (n.worker) add("worker", el("code", { text: n.worker }));
  add("steps", `${n.steps}` + (n.replayed_steps ? ` (+${n.replayed_steps} replayed)` : ""));
  add("tokens", `${fmtInt(n.tokens_in)} in / ${fmtInt(n.tokens_out)} out`);
  add("tool calls", String(n.tool_calls));
  add("cost", fmtCost(n.cost_usd));
  add("duration", n.duration_s === null ? "" : fmtSecs(n.duration_s));
  const parts = [el("h2", { text: "Node " + n.id }), kv];
  if (n.error) parts.push(el("h2", { text: "Error" }), el("pre", { class: "out error", id: "node-error", text: errorText(n.error) }));
  if (n.output !== null && n.output !== undefined) {
    parts.push(el("h2", { text: "Output" }), el("pre", { class: "out", id: "node-output", text: preview(n.output, 5000) }));
  } else if (liveText) {
    parts.push(el("h2", { text: "Model output (live)" }), el("pre", { class: "out", id: "node-live", text: liveText }));
  }
  const steps = el("tbody");
  for (const s of n.ledger || []) {
    const u = s.usage || {};
    steps.append(el("tr", {},
      el("td", { class: "num", text: String(s.seq) }),
      el("td", { text: s.kind }),
      el("td", { class: "mono", text: s.name }),
      el("td", { class: "num", text: `${u.in || 0}/${u.out || 0}` }),
      el("td", { class: "num", text: fmtCost(u.cost_usd) }),
      el("td", { class: "num", text: s.duration_ms === undefined ? "" : `${s.duration_ms} ms` }),
      el("td", { class: "mono", text: preview(stepResult(s), 160) })));
  }
  parts.push(el("h2", { text: "Steps" }), (n.ledger || []).length
    ? el("table", { id: "node-steps" }, el("thead", {}, el("tr", {}, ...["#", "kind", "name", "tok in/out", "cost", "time", "result"].map(
      (h) => el("th", { text: h })))), steps)
    : el("p", { class: "muted", text: "No recorded step." }));
  panel.replaceChildren(...parts);
  panel.dataset.node = n.id;
  panel.dataset.status = n.status;
}

// ------------------------------------------------------------------ fleet

function viewFleet(root) {
  const workers = el("tbody");
  const queues = el("tbody");
  const note = el("p", { class: "muted" });
  root.append(
    el("div", { class: "titlebar" }, el("h1", { text: "Fleet" })),
    el("div", { class: "grid" },
      el("div", { class: "panel" }, el("h2", { text: "Workers" }),
        el("table", { id: "workers-table" }, el("thead", {}, el("tr", {},
          ...["worker", "state", "heartbeat age", "active", "active jobs", "concurrency", "queues",
            "host / pid"].map((h, i) => el("th", { text: h, class: [2, 3, 5].includes(i) ? "num" : "" })))),
          workers), note),
      el("div", { class: "panel" }, el("h2", { text: "Queue depths (ready jobs)" }),
        el("table", { id: "queues-table" }, el("thead", {}, el("tr", {},
          ...["queue", "band", "ready"].map((h, i) => el("th", { text: h, class: i === 2 ? "num" : "" })))), queues))));
  let stopped = false;
  (async () => {
    while (!stopped) {
      try {
        const [ws, qs] = await Promise.all([api.get("/workers"), api.get("/queues")]);
        workers.replaceChildren(...ws.map((w) => el("tr", { data: { worker: w.id, alive: String(w.alive) } },
          el("td", { class: "mono", text: w.id }),
          el("td", {}, badge(w.alive ? "alive" : "dead")),
          el("td", { class: "num", text: `${Number(w.heartbeat_age_s).toFixed(1)} s` }),
          el("td", { class: "num", text: String(w.active.length), title: w.active.join("\n") }),
          el("td", { class: "mono", text: w.active.slice(0, 3).join(", ") +
            (w.active.length > 3 ? ` +${w.active.length - 3}` : "") }),
          el("td", { class: "num", text: w.concurrency || "" }),
          el("td", { text: w.queues || "" }),
          el("td", { class: "mono", text: `${w.host || ""} / ${w.pid || ""}` }))));
        note.textContent = ws.length ? "" : "No worker has registered.";
        const names = Object.keys(qs.queues).sort();
        queues.replaceChildren(...names.map((name) => {
          const [q, band] = name.includes(":") ? name.split(/:(.*)/s) : [name, "normal"];
          return el("tr", { data: { queue: name } },
            el("td", { text: q }), el("td", { text: band }),
            el("td", { class: "num", text: fmtInt(qs.queues[name]) }));
        }));
      } catch (e) {
        if (!(e instanceof AuthNeeded)) note.textContent = String(e.message || e);
      }
      await sleep(POLL_MS);
    }
  })();
  return () => { stopped = true; };
}

// ------------------------------------------------------------------ router

let cleanup = null;

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  const view = document.getElementById("view");
  view.replaceChildren();
  delete view.dataset.status;
  const hash = location.hash || "#/";
  const run = hash.match(/^#\/runs\/(.+)$/);
  document.getElementById("nav-runs").classList.toggle("active", !run && hash !== "#/fleet");
  document.getElementById("nav-fleet").classList.toggle("active", hash === "#/fleet");
  if (run) cleanup = viewRun(view, decodeURIComponent(run[1]));
  else if (hash === "#/fleet") cleanup = viewFleet(view);
  else cleanup = viewRuns(view);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-save").addEventListener("click", saveToken);
  document.getElementById("token-input").addEventListener("keydown", (e) => { if (e.key === "Enter") saveToken(); });
  window.addEventListener("hashchange", route);
  route();
});
