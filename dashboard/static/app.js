// TW-LB dashboard: draws what /api/events pushes (a snapshot, then one frame per round).
// Plain DOM and hand-drawn SVG; every text from the cluster goes in through textContent.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf",
  "#ff7b72", "#a5d6ff", "#7ee787", "#e3b341", "#ffa657", "#d2a8ff"];
const OUTCOME_COLORS = { success: "#3fb950", error: "#f85149", failed: "#ff7b72",
  no_backend: "#d29922", quorum_failed: "#bc8cff", too_large: "#8b98a5", bad_request: "#a5d6ff" };

const model = {
  t: 0, historyS: 300, policy: null, balancerUp: null,
  cards: [], history: {}, outcomes: [], events: [], gossip: {}, gossipNames: {},
};

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}
const fmt = (x, d = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

function colorOf(url) {
  const i = model.cards.findIndex((c) => c.url === url);
  return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
}

// ---- state updates --------------------------------------------------------------------
function applyHeader(m) {
  model.t = m.t;
  model.historyS = m.history_s;
  model.policy = m.policy;
  model.balancerUp = m.balancer_up;
  model.cards = m.backends;
  model.gossip = m.gossip || {};
}

function onSnapshot(m) {
  applyHeader(m);
  model.history = m.history || {};
  model.outcomes = m.outcome_history || [];
  model.events = (m.events || []).slice();
  render();
}

function onFrame(m) {
  applyHeader(m);
  for (const [url, point] of Object.entries(m.points || {})) {
    (model.history[url] = model.history[url] || []).push(point);
  }
  if (m.outcomes) model.outcomes.push(m.outcomes);
  for (const e of m.events || []) model.events.push(e);
  const cutoff = model.t - model.historyS;
  for (const url of Object.keys(model.history)) {
    const h = model.history[url];
    while (h.length && h[0][0] < cutoff) h.shift();
  }
  while (model.outcomes.length && model.outcomes[0][0] < cutoff) model.outcomes.shift();
  if (model.events.length > 300) model.events.splice(0, model.events.length - 300);
  render();
}

// ---- drawing --------------------------------------------------------------------------
function render() {
  const policy = document.getElementById("policy");
  policy.textContent = "policy " + (model.policy || "?");
  const bal = document.getElementById("balancer");
  bal.textContent = model.balancerUp ? "balancer up" : "balancer down";
  bal.className = "pill " + (model.balancerUp ? "good" : "bad");
  document.getElementById("clock").textContent = model.t ? clock(model.t) : "";
  renderCards();
  renderTrustChart();
  renderOutcomeChart();
  renderGossip();
  renderEvents();
}

function sparkline(points) {
  const s = svg("svg", { class: "spark", viewBox: "0 0 100 30", preserveAspectRatio: "none" });
  s.appendChild(svg("line", { x1: 0, x2: 100, y1: 15, y2: 15 }));
  if (points.length > 1) {
    const t0 = points[0][0], span = Math.max(1e-6, points[points.length - 1][0] - t0);
    const pts = points.map(([t, w]) => `${(100 * (t - t0)) / span},${30 - 30 * w}`).join(" ");
    s.appendChild(svg("polyline", { points: pts }));
  }
  return s;
}

function renderCards() {
  const box = document.getElementById("cards");
  box.replaceChildren();
  for (const c of model.cards) {
    const card = el("article", { class: "card", "data-node": c.name, "data-url": c.url,
      "data-state": c.state || "unknown", "data-held": String(!!c.held) });
    const top = el("div", { class: "top" });
    top.append(el("span", { class: "name" }, c.name), el("span", { class: "state" },
      (c.state || "unknown") + (c.held ? " · held" : "")));
    card.append(top);
    const dl = el("dl");
    const row = (k, v, cls) => { dl.append(el("dt", {}, k), el("dd", cls ? { class: cls } : {}, v)); };
    const named = c.fault && c.fault !== c.truth && c.fault !== "benign";
    const truth = c.truth ? c.truth + (named ? ` (${c.fault})` : "") : "unknown";
    row("true fault", truth);
    const wrong = c.truth && c.verdict && c.truth !== c.verdict;
    row("verdict", c.verdict || "–", wrong ? "mismatch" : "");
    row("trust", fmt(c.weight));
    row("held", c.held ? "yes (floor)" : "no", c.held ? "held" : "");
    row("health", c.up === undefined || c.up === null ? "–" : c.up ? "up" : "down");
    row("process", c.alive === null ? "–" : (c.alive ? "running" : "down") +
      (c.pid ? ` pid ${c.pid}` : "") + (c.restarts ? `, ${c.restarts} restarts` : ""));
    row("requests", c.req_rate === null ? "–" : fmt(c.req_rate, 1) + "/s");
    row("errors", pct(c.err_ratio));
    row("wrong answers", c.wrong_caught === null ? "–" : String(c.wrong_caught), c.wrong_caught ? "mismatch" : "");
    card.append(dl, sparkline(model.history[c.url] || []));
    box.append(card);
  }
}

function firstSeen() {
  let first = model.t;
  for (const h of Object.values(model.history)) if (h.length) first = Math.min(first, h[0][0]);
  if (model.outcomes.length) first = Math.min(first, model.outcomes[0][0]);
  return first;
}

function chartFrame(svgEl, yMax, yLabel) {
  const W = Math.max(300, Math.round(svgEl.clientWidth || 800)), H = 240;
  svgEl.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svgEl.removeAttribute("preserveAspectRatio");
  svgEl.replaceChildren();
  const pad = { l: 38, r: 8, t: 8, b: 20 };
  // The window is the last minutes, or less while the cluster is younger than that.
  const t1 = model.t, t0 = Math.min(t1 - 60, Math.max(t1 - model.historyS, firstSeen()));
  const x = (t) => pad.l + ((W - pad.l - pad.r) * (t - t0)) / Math.max(1e-6, t1 - t0);
  const y = (v) => H - pad.b - ((H - pad.t - pad.b) * v) / yMax;
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    svgEl.appendChild(svg("line", { class: "grid", x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v) }));
    const lab = svg("text", { class: "axis", x: 2, y: y(v) + 4 });
    lab.textContent = yLabel(v);
    svgEl.appendChild(lab);
  }
  const step = t1 - t0 > 150 ? 60 : 30;
  for (let s = 0; s <= t1 - t0; s += step) {
    const lab = svg("text", { class: "axis", x: Math.max(pad.l, x(t1 - s) - 14), y: H - 4 });
    lab.textContent = s ? (s % 60 ? `-${s}s` : `-${s / 60}m`) : "now";
    svgEl.appendChild(lab);
  }
  return { x, y, t0 };
}

function renderTrustChart() {
  const s = document.getElementById("trust-chart");
  const { x, y, t0 } = chartFrame(s, 1, (v) => v.toFixed(2));
  for (const e of model.events) {
    if ((e.kind !== "eject" && e.kind !== "readmit") || e.t < t0) continue;
    const mark = svg("line", { class: e.kind, x1: x(e.t), x2: x(e.t), y1: 8, y2: 220,
      "data-kind": e.kind, "data-node": e.node || "" });
    const title = svg("title", {});
    title.textContent = `${clock(e.t)} ${e.text}`;
    mark.appendChild(title);
    s.appendChild(mark);
  }
  const legend = document.getElementById("trust-legend");
  legend.replaceChildren();
  for (const c of model.cards) {
    const pts = (model.history[c.url] || []).map(([t, w]) => `${x(t)},${y(w)}`).join(" ");
    s.appendChild(svg("polyline", { points: pts, stroke: colorOf(c.url), "data-url": c.url }));
    const item = el("span", {}, c.name);
    const swatch = el("i");
    swatch.style.background = colorOf(c.url);
    item.prepend(swatch);
    legend.append(item);
  }
}

function renderOutcomeChart() {
  const s = document.getElementById("outcome-chart");
  const names = new Set();
  let top = 1;
  for (const [, rates] of model.outcomes) {
    for (const [k, v] of Object.entries(rates)) {
      if (v > 0 || names.has(k)) names.add(k);
      top = Math.max(top, v);
    }
  }
  const { x, y } = chartFrame(s, top * 1.1, (v) => v.toFixed(v < 10 ? 1 : 0));
  const legend = document.getElementById("outcome-legend");
  legend.replaceChildren();
  const last = model.outcomes.length ? model.outcomes[model.outcomes.length - 1][1] : {};
  for (const name of [...names].sort()) {
    const color = OUTCOME_COLORS[name] || "#8b98a5";
    const pts = model.outcomes.map(([t, r]) => `${x(t)},${y(r[name] || 0)}`).join(" ");
    s.appendChild(svg("polyline", { points: pts, stroke: color, "data-outcome": name }));
    const item = el("span", {}, `${name} ${fmt(last[name] || 0, 1)}/s`);
    const swatch = el("i");
    swatch.style.background = color;
    item.prepend(swatch);
    legend.append(item);
  }
}

function renderGossip() {
  const box = document.getElementById("gossip");
  box.replaceChildren();
  const views = Object.entries(model.gossip);
  const answered = views.filter(([, v]) => v && v !== "off");
  if (!answered.length) {
    // 404 from every node that answered: the cluster runs without gossip.
    const off = views.some(([, v]) => v === "off");
    box.append(el("p", { class: "muted", id: off ? "gossip-off" : "gossip-none" },
      off ? "gossip off" : "no node answers /gossip"));
    return;
  }
  const nameOf = (url) => (model.cards.find((c) => c.url === url) || { name: url }).name;
  // Gossip names members by their gossip id; each observer says which id is its own,
  // remembered so that a node that is down (and so silent) keeps its name.
  const idName = model.gossipNames;
  for (const [url, v] of answered) if (v.self) idName[v.self] = nameOf(url);
  const label = (id) => idName[id] || id;
  const members = [...new Set(answered.flatMap(([, v]) => v.members.map((m) => m.node)))]
    .sort((a, b) => label(a).localeCompare(label(b), undefined, { numeric: true }));
  const table = el("table", { class: "gossip" });
  const head = el("tr");
  head.append(el("th", {}, "observer \\ member"));
  for (const m of members) head.append(el("th", { title: m }, label(m)));
  table.append(head);
  for (const [url, v] of views) {
    const tr = el("tr");
    tr.append(el("th", {}, nameOf(url)));
    if (!v || v === "off") {
      const td = el("td", { colspan: String(Math.max(1, members.length)) }, v === "off" ? "gossip off" : "no answer");
      tr.append(td);
    } else {
      for (const m of members) {
        const entry = v.members.find((e) => e.node === m);
        const state = entry ? entry.state : "–";
        const td = el("td", { class: "g-" + state, "data-state": state }, state);
        if (entry) {
          td.title = entry.incarnation !== null && entry.incarnation !== undefined
            ? `incarnation ${entry.incarnation}`
            : `generation ${entry.generation ?? "–"}, heartbeat ${entry.heartbeat ?? "–"}`;
        }
        tr.append(td);
      }
    }
    table.append(tr);
  }
  const proto = answered.length ? answered[0][1].protocol : "";
  const scroll = el("div", { class: "scroll" });
  scroll.append(table);
  box.append(el("p", { class: "muted" }, proto ? `protocol ${proto}` : ""), scroll);
}

function renderEvents() {
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const e of model.events.slice().reverse()) {
    const li = el("li", { "data-kind": e.kind });
    li.append(el("time", {}, clock(e.t)), el("span", { class: "k k-" + e.kind }, e.kind), document.createTextNode(" " + e.text));
    list.append(li);
  }
}

// ---- the stream -----------------------------------------------------------------------
function connect() {
  const link = document.getElementById("link");
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => { link.textContent = "live"; link.className = "pill link-live"; });
  source.addEventListener("error", () => { link.textContent = "reconnecting"; link.className = "pill link-lost"; });
  source.addEventListener("snapshot", (ev) => onSnapshot(JSON.parse(ev.data)));
  source.addEventListener("frame", (ev) => onFrame(JSON.parse(ev.data)));
}

document.addEventListener("DOMContentLoaded", connect);
window.addEventListener("resize", () => { if (model.t) render(); });
