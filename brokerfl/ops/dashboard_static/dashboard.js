// brokerfl dashboard: polls /api/state and draws it. Everything from the broker is data: the
// DOM is built with createElement and textContent only (never innerHTML with data).
"use strict";

const POLL_MS = 1500;
const SVG_NS = "http://www.w3.org/2000/svg";
const token = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
let lastState = null;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    if (cell instanceof Node) {
      const td = document.createElement("td");
      td.appendChild(cell);
      tr.appendChild(td);
    } else {
      tr.appendChild(el("td", cell === null || cell === undefined ? "-" : cell));
    }
  }
  return tr;
}

function fillTable(id, rows, empty) {
  const body = document.querySelector("#" + id + " tbody");
  clear(body);
  if (!rows.length && empty) {
    const tr = row([empty]);
    tr.firstChild.colSpan = document.querySelectorAll("#" + id + " thead th").length;
    tr.className = "muted";
    body.appendChild(tr);
  }
  for (const cells of rows) body.appendChild(row(cells));
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "-";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits || 4);
  return String(value);
}

function list(values) {
  return values && values.length ? values.join(", ") : "-";
}

function runState(status) {
  if (!status) return "no answer";
  if (status.done) return "finished";
  if (status.paused) return "paused";
  if (status.round_open) return "training";
  if (!status.begun) return "waiting";
  return "between rounds";
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
    body: JSON.stringify(body),
  });
  let answer = {};
  try { answer = await response.json(); } catch (e) { answer = { error: "HTTP " + response.status }; }
  if (!response.ok) throw new Error(answer.error || "HTTP " + response.status);
  return answer;
}

// ------------------------------------------------------------------ drawing

function drawRuns(state) {
  const select = document.getElementById("run-select");
  const names = [];
  for (const name of state.command_line_runs) names.push(name);
  for (const r of state.runs) if (!names.includes(r.run)) names.push(r.run);
  const current = Array.from(select.options).map((o) => o.value).join("\n");
  if (current !== names.join("\n")) {
    clear(select);
    for (const name of names) {
      const option = el("option", name);
      option.value = name;
      select.appendChild(option);
    }
  }
  select.value = state.selected || "";
  const note = document.getElementById("runs-note");
  note.hidden = !state.runs_note;
  note.textContent = (state.runs_note || "") + (state.runs_note && !state.selected ? ": start the dashboard with a run's CONFIG or --run NAME" : "");
  fillTable(
    "runs",
    state.runs.map((r) => {
      const pick = el("button", r.run, "link");
      pick.type = "button";
      pick.addEventListener("click", () => selectRun(r.run));
      return [
        pick,
        r.state,
        r.round === null ? "-" : fmt(r.round) + (r.rounds ? " of " + r.rounds : ""),
        r.model_version,
        r.metric_name ? r.metric_name + " " + fmt(r.metric_value) : "-",
        r.reason || "",
      ];
    }),
    state.runs_note ? null : "no runs found"
  );
}

function drawRound(run) {
  const headline = document.getElementById("round-headline");
  const facts = document.getElementById("round-facts");
  clear(facts);
  const status = run.status;
  document.getElementById("run-state").textContent = runState(status);
  document.getElementById("run-state").className = "pill state-" + runState(status).replace(/ /g, "-");
  if (!status) {
    headline.textContent = run.status_error || "waiting for the server's answer";
    return;
  }
  const r = run.round;
  if (run.status_stale_s !== null && run.status_stale_s !== undefined) {
    facts.appendChild(el("dt", "note"));
    facts.appendChild(el("dd", "the server does not answer: its last answer, " + fmt(run.status_stale_s, 0) + " s old", "warn"));
  }
  headline.textContent =
    "round " + fmt(r.round) + " of " + fmt(r.rounds) + " \u00b7 model version " + fmt(status.model_version);
  const add = (term, value) => {
    facts.appendChild(el("dt", term));
    facts.appendChild(el("dd", value));
  };
  add("strategy", status.strategy);
  if (run.finished) add("finished", "at model version " + fmt(run.finished.model_version) + (run.finished.reason ? ": " + run.finished.reason : ""));
  add("open for", r.open && r.age_s !== null ? fmt(r.age_s, 1) + " s" : "-");
  add("time left", r.time_left_s === null || r.time_left_s === undefined ? "-" : fmt(r.time_left_s, 1) + " s");
  add("sampled", list(r.sampled));
  add("answered", list(r.answered));
  add("training", list(r.training));
  if (r.failed.length) add("failed", list(r.failed));
  if (r.refused.length) add("refused", list(r.refused));
  add("accuracy", fmt(status.accuracy));
  add("loss", fmt(status.loss));
  const live = status.clients.filter((c) => c.live).length;
  add("clients live", live + " of " + status.clients_expected + " (min " + status.min_clients + ")");
  if (status.failure) add("FAILED", status.failure);
}

function drawCurves(run) {
  const box = document.getElementById("curves");
  clear(box);
  const points = run.curve;
  const names = [];
  for (const p of points) for (const name of Object.keys(p.metrics)) if (!names.includes(name)) names.push(name);
  const target = run.status && run.status.target ? run.status.target.name : "accuracy";
  names.sort((a, b) => {
    const rank = (n) => (n === target ? 0 : n === "loss" ? 1 : n.startsWith("train_") ? 3 : 2);
    return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);
  });
  if (!names.length) {
    box.appendChild(el("p", "no metrics yet", "muted"));
    return;
  }
  for (const name of names.slice(0, 4)) box.appendChild(curve(name, points.filter((p) => name in p.metrics)));
  box.appendChild(el("p", points.length + " model versions" + (run.journal ? " (from the journal and status replies)" : " (seen while this page was open)"), "muted"));
}

function curve(name, points) {
  const W = 320, H = 120, L = 44, B = 18, T = 8, R = 8;
  const figure = el("figure", null, "curve");
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.setAttribute("role", "img");
  const xs = points.map((p) => p.version), ys = points.map((p) => p.metrics[name]);
  const xMin = Math.min(...xs), xMax = Math.max(...xs);
  let yMin = Math.min(...ys), yMax = Math.max(...ys);
  if (yMax - yMin < 1e-9) { yMin -= 0.5; yMax += 0.5; }
  const x = (v) => L + (xMax === xMin ? (W - L - R) / 2 : ((v - xMin) / (xMax - xMin)) * (W - L - R));
  const y = (v) => T + (1 - (v - yMin) / (yMax - yMin)) * (H - T - B);
  const line = (x1, y1, x2, y2, cls) => {
    const l = document.createElementNS(SVG_NS, "line");
    l.setAttribute("x1", x1); l.setAttribute("y1", y1); l.setAttribute("x2", x2); l.setAttribute("y2", y2);
    l.setAttribute("class", cls);
    svg.appendChild(l);
  };
  const label = (text, lx, ly, anchor) => {
    const t = document.createElementNS(SVG_NS, "text");
    t.setAttribute("x", lx); t.setAttribute("y", ly); t.setAttribute("text-anchor", anchor);
    t.setAttribute("class", "axis-label");
    t.textContent = text;
    svg.appendChild(t);
  };
  line(L, T, L, H - B, "axis");
  line(L, H - B, W - R, H - B, "axis");
  label(yMax.toPrecision(3), L - 4, T + 8, "end");
  label(yMin.toPrecision(3), L - 4, H - B, "end");
  label("v" + xMin, L, H - 4, "start");
  label("v" + xMax, W - R, H - 4, "end");
  const path = document.createElementNS(SVG_NS, "polyline");
  path.setAttribute("points", points.map((p) => x(p.version).toFixed(1) + "," + y(p.metrics[name]).toFixed(1)).join(" "));
  path.setAttribute("class", "series");
  svg.appendChild(path);
  for (const p of points) {
    const dot = document.createElementNS(SVG_NS, "circle");
    dot.setAttribute("cx", x(p.version).toFixed(1)); dot.setAttribute("cy", y(p.metrics[name]).toFixed(1));
    dot.setAttribute("r", "2.2");
    dot.setAttribute("class", "point");
    const tip = document.createElementNS(SVG_NS, "title");
    tip.textContent = name + " " + fmt(p.metrics[name]) + " at version " + p.version;
    dot.appendChild(tip);
    svg.appendChild(dot);
  }
  figure.appendChild(svg);
  const last = points[points.length - 1];
  figure.appendChild(el("figcaption", name + ": " + fmt(last.metrics[name]) + " at v" + last.version));
  return figure;
}

function thisRound(c, status) {
  if ((status.failed || []).includes(c.id)) return "failed";
  if ((status.refused || []).includes(c.id)) return "update refused";
  const training = "training" + (c.training_s === null || c.training_s === undefined ? "" : " " + fmt(c.training_s, 1) + " s");
  if (status.still_training.includes(c.id)) return training;
  if (status.participants.includes(c.id)) return "answered";
  return c.training_s === null || c.training_s === undefined ? "" : training;
}

function drawClients(run) {
  const status = run.status;
  const rows = !status ? [] : status.clients.map((c) => {
    const state = (c.removed ? "removed" : c.live ? "live" : "silent") + (c.duplicate && c.duplicate.length ? ", duplicate" : "");
    return [c.id, el("span", state, "state-" + state.split(",")[0]), fmt(c.last_seen_s, 1) + " s ago", c.num_samples, thisRound(c, status)];
  });
  fillTable("clients", rows, "no clients seen yet");
}

function drawDead(run) {
  document.getElementById("dead-total").textContent = String(run.journal ? run.dead_total : run.dead_queued || 0);
  const kinds = Object.entries(run.dead_by_kind).map(([kind, n]) => n + " " + kind);
  const parts = [];
  if (run.journal) parts.push(kinds.length ? "in the journal, by kind: " + kinds.join(", ") : "none in the journal");
  if (run.dead_queued !== null && run.dead_queued !== undefined) parts.push(run.dead_queued + " in the dead-letter queue now");
  document.getElementById("dead-kinds").textContent = parts.join("; ");
  fillTable("dead", run.dead_letters.map((d) => [d.kind, d.from, d.reason]), null);
}

function drawAdmin(state, run) {
  document.getElementById("admin-readonly").hidden = state.admin;
  document.getElementById("admin-actions").hidden = !state.admin;
  const s = run.admin_state;
  document.getElementById("admin-state").textContent = s
    ? (s.paused ? "paused" : "not paused") + "; removed: " + list(s.removed) + "; min clients " + fmt(s.min_clients) + "; rounds " + fmt(s.rounds)
    : "no admin command so far";
  fillTable("admin-log", run.admin_log.map((a) => [a.command, a.user || a.by, (a.ok ? "OK: " : "REFUSED: ") + a.text]), "none");
  const acc = document.getElementById("accounting");
  acc.textContent = run.accounting ? run.accounting.text : "";
}

function drawQueues(run) {
  fillTable("queues", Object.entries(run.queues).map(([label, q]) => [label, q.ready, q.unacked === null ? "?" : q.unacked, q.consumers]), null);
  const notes = [];
  if (run.journal_note) notes.push(run.journal_note);
  if (run.journal) notes.push(run.journal_records + " journal records read");
  if (run.skipped) notes.push(run.skipped);
  document.getElementById("journal-note").textContent = notes.join("; ");
}

function draw(state) {
  lastState = state;
  const banner = document.getElementById("banner");
  banner.hidden = !state.broker;
  banner.textContent = state.broker || "";
  document.getElementById("mode").textContent = state.admin ? "admin" : "read-only";
  document.getElementById("updated").textContent = "updated " + new Date(state.generated_at * 1000).toLocaleTimeString();
  drawRuns(state);
  const run = state.run;
  for (const id of ["round-card", "curve-card", "clients-card", "dead-card", "admin-card", "accounting-card", "queues-card"]) {
    document.getElementById(id).hidden = !run;
  }
  if (!run) return;
  drawRound(run);
  drawCurves(run);
  drawClients(run);
  drawDead(run);
  drawAdmin(state, run);
  drawQueues(run);
}

// ------------------------------------------------------------------ actions

async function selectRun(name) {
  try { await post("/api/select", { run: name }); await poll(); }
  catch (e) { showBanner(e.message); }
}

function showBanner(text) {
  const banner = document.getElementById("banner");
  banner.hidden = false;
  banner.textContent = text;
}

async function admin(command, takesValue) {
  const result = document.getElementById("admin-result");
  const value = document.getElementById("admin-value").value.trim();
  if (takesValue && !value) { result.textContent = command + " needs a value"; return; }
  let reason = "";
  if (command === "abort") {
    const answer = window.prompt("Abort run " + (lastState ? lastState.selected : "") + "? Reason:", "");
    if (answer === null) return;
    reason = answer;
  }
  result.textContent = command + "...";
  try {
    const answer = await post("/api/admin", { command: command, values: takesValue ? [value] : [], reason: reason });
    result.textContent = (answer.ok ? "OK: " : "REFUSED: ") + answer.text;
  } catch (e) {
    result.textContent = "error: " + e.message;
  }
}

async function account() {
  const out = document.getElementById("accounting");
  out.textContent = "reading the journal...";
  try { out.textContent = (await post("/api/accounting", {})).text; }
  catch (e) { out.textContent = "error: " + e.message; }
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (response.ok) draw(await response.json());
  } catch (e) {
    showBanner("the dashboard does not answer: " + e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("run-select").addEventListener("change", (e) => selectRun(e.target.value));
  for (const button of document.querySelectorAll("#admin-actions button[data-command]")) {
    button.addEventListener("click", () => admin(button.dataset.command, button.dataset.takesValue === "1"));
  }
  document.getElementById("accounting-button").addEventListener("click", account);
  poll();
  setInterval(poll, POLL_MS);
});
