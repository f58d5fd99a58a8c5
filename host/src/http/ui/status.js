// logq status page: live numbers from /status/stream (Server-Sent Events), charts
// drawn as SVG, and the admin actions. No framework, no build step, no external
// resource. The admin token lives in `token` below and nowhere else: not in
// storage, not in the URL; a reload forgets it.
"use strict";

const WINDOW = 300; // chart points kept: one a second, five minutes
const COLORS = ["#0b5cad", "#b3261e", "#1b7f3b", "#7a4dbf", "#8a5a00", "#00707a"];
const SVG = "http://www.w3.org/2000/svg";

let token = null;
let points = [];
let latest = null;

const $ = (id) => document.getElementById(id);
const fmt = (n, digits = 0) =>
  n === null || n === undefined || Number.isNaN(n)
    ? "–"
    : Number(n).toLocaleString("en-US", { maximumFractionDigits: digits });
const mib = (bytes) => (bytes === null || bytes === undefined ? null : bytes / 1048576);

function setOut(id, value, text) {
  const el = $(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text === undefined ? fmt(value) : text;
}

function text(tag, content, attrs = {}) {
  const el = document.createElement(tag);
  if (content !== undefined && content !== null) el.textContent = String(content);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function row(cells, attrs = {}) {
  const tr = text("tr", null, attrs);
  for (const c of cells) tr.append(c instanceof Node ? c : text("td", c));
  return tr;
}

function holding(child) {
  const td = text("td", null);
  td.append(child);
  return td;
}

// ---- charts ----------------------------------------------------------------

// Draws `series` ([{name, values}]) into the SVG `id`: one polyline each, scaled
// to the largest value in the window, with the scale written on the chart.
function chart(id, series, unit, digits = 0) {
  const svg = $(id);
  const w = 400;
  const h = 160;
  const top = 4;
  let max = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  const scale = max > 0 ? max : 1;
  svg.replaceChildren();
  for (const y of [top, h - 1]) {
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("x1", "0");
    line.setAttribute("x2", String(w));
    line.setAttribute("y1", String(y));
    line.setAttribute("y2", String(y));
    line.setAttribute("class", "grid");
    svg.append(line);
  }
  // The scale is text outside the SVG, which stretches to its box.
  $(id.replace("chart-", "axis-")).textContent = `0 to ${fmt(max, digits)} ${unit}`;
  const legend = $(id.replace("chart-", "legend-"));
  legend.replaceChildren();
  const summary = [];
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const n = s.values.length;
    const coords = [];
    s.values.forEach((v, j) => {
      if (v === null) return;
      const x = n <= 1 ? w : (w * (WINDOW - n + j)) / (WINDOW - 1);
      const y = h - 1 - ((h - 1 - top) * v) / scale;
      coords.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    const last = [...s.values].reverse().find((v) => v !== null);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", coords.join(" "));
    line.setAttribute("stroke", color);
    line.setAttribute("class", "series");
    line.dataset.series = s.name;
    line.dataset.last = last === undefined ? "" : String(last);
    svg.append(line);
    const item = text("li", `${s.name}: ${fmt(last, digits)} ${unit}`);
    item.style.setProperty("--swatch", color);
    legend.append(item);
    summary.push(`${s.name} ${fmt(last, digits)} ${unit} now`);
  });
  svg.dataset.max = String(max);
  svg.setAttribute(
    "aria-label",
    `${svg.parentElement.querySelector("figcaption").textContent}: ${summary.join(", ") || "no data"}; largest in the window ${fmt(max, digits)}`,
  );
}

function drawCharts() {
  const col = (key) => points.map((p) => (p[key] === undefined ? null : p[key]));
  // Records first, so the events line (the same when each record is one event)
  // is drawn on top.
  chart("chart-ingest", [
    { name: "records", values: col("records_per_second") },
    { name: "events", values: col("events_per_second") },
  ], "/s");
  const partitions = new Set();
  for (const p of points) for (const k of Object.keys(p.lag || {})) partitions.add(k);
  chart(
    "chart-lag",
    [...partitions].sort().map((k) => ({
      name: k,
      values: points.map((p) => (p.lag && k in p.lag ? p.lag[k] : null)),
    })),
    "records",
  );
  chart("chart-reads", [{ name: "reads", values: col("reads_per_second") }], "/s");
  chart("chart-latency", [
    { name: "p50", values: col("read_p50_ms") },
    { name: "p99", values: col("read_p99_ms") },
  ], "ms", 3);
  chart("chart-memory", [
    { name: "RSS", values: points.map((p) => mib(p.resident_bytes)) },
  ], "MiB", 1);
}

// ---- the sample ------------------------------------------------------------

function render(s) {
  latest = s;
  const ready = $("ready");
  ready.dataset.ready = String(s.ready);
  ready.textContent = s.ready ? "Ready" : "Not ready";
  $("status-text").textContent = s.status;
  $("position").textContent = s.position || "–";

  setOut("users", s.state.users);
  setOut("organizations", s.state.organizations);
  setOut("tombstones", s.state.tombstones);
  setOut("events-rate", s.ingest.events_per_second, fmt(s.ingest.events_per_second, 1));
  setOut("lag-total", s.lag.total);
  const rss = s.memory.resident_bytes;
  setOut("rss", rss, rss === null ? "–" : `${fmt(mib(rss), 1)} MiB`);
  setOut("reads-rate", s.reads.per_second, fmt(s.reads.per_second, 1));
  setOut("read-p99", s.reads.p99_ms, fmt(s.reads.p99_ms, 3));
  const dead = s.ingest.topics.reduce((n, t) => n + t.dead_lettered, 0);
  setOut("dead-letters-total", dead);

  $("partitions").replaceChildren(
    ...(s.lag.partitions.length
      ? s.lag.partitions.map((p) => {
          const lag = text("td", fmt(p.lag), { class: "num lag", "data-value": String(p.lag) });
          return row([p.topic, String(p.partition), lag], { "data-partition": `${p.topic}/${p.partition}` });
        })
      : [row([text("td", "No partition seen yet.", { colspan: "3" })])]),
  );

  group(s.cluster);
  $("dead-letters").replaceChildren(...s.ingest.topics.map(deadLetters));
  reducer(s.reducer);
  admin(s.admin.enabled);
}

// The hosts that share the partitions (`--sharded`): this one first, then each
// host whose advert is fresh.
function group(c) {
  $("group-section").hidden = !c;
  if (!c) return;
  const unheld = c.unheld.length ? ` Held by no host now: users/${c.unheld.join(", users/")}.` : "";
  $("group-summary").textContent =
    `${fmt(c.others.length + 1)} hosts share the ${fmt(c.topic_partitions)} partitions of the users topic; ` +
    `reads forwarded from here ${fmt(c.forwarded)}, failed ${fmt(c.forward_failures)}.${unheld}`;
  const hosts = [{ ...c, seen_ms_ago: 0, me: true }, ...c.others];
  $("group").replaceChildren(
    ...hosts.map((h) => {
      const name = text("td", null);
      name.append(text("a", h.instance, { href: `${h.url}/` }));
      if (h.me) name.append(" (this host)");
      const sha = h.reducer ? `${h.reducer.slice(0, 12)}…` : "–";
      // `--standbys`: the partitions it also folds, each with how far behind it is
      // (records; readers turn to it within `--max-standby-lag`).
      const standby = Object.entries(h.standby || {});
      const lag = (l) => (l >= Number.MAX_SAFE_INTEGER ? "not measured yet" : `lag ${fmt(l)}`);
      return row(
        [
          name,
          h.partitions.length ? h.partitions.join(", ") : "none",
          standby.length ? standby.map(([p, l]) => `${p} (${lag(l)})`).join(", ") : "none",
          h.ready ? "yes" : "no",
          holding(text("code", sha, { title: h.reducer || "" })),
          text("td", h.me ? "–" : `${fmt(h.seen_ms_ago / 1000, 1)} s`, { class: "num" }),
        ],
        {
          "data-instance": h.instance,
          "data-partitions": h.partitions.join(","),
          "data-standby": standby.map(([p]) => p).join(","),
          "data-reducer": h.reducer || "",
        },
      );
    }),
  );
}

function deadLetters(t) {
  const box = text("div", null, { class: "dlq", "data-topic": t.topic });
  const h = text("h3", null);
  h.append(text("code", t.topic), " → ", text("code", t.dead_letter_topic));
  box.append(h);
  const count = text("output", fmt(t.dead_lettered), { class: "count", "data-value": String(t.dead_lettered) });
  const p = text("p", null);
  p.append(count, ` sent this run; ${fmt(t.dead_letters_known)} refused again but sent by an earlier run; ${fmt(t.tombstones_skipped)} compaction tombstones skipped.`);
  box.append(p);
  if (t.recent_dead_letters.length) {
    const list = text("ol", null, { class: "reasons", "aria-label": `latest dead letters of ${t.topic}` });
    for (const d of t.recent_dead_letters) {
      const li = text("li", null, { class: "reason" });
      li.append(text("span", `${d.at} · partition ${d.partition} · offset ${d.offset}: `, { class: "where" }), text("span", d.reason, { class: "why" }));
      list.append(li);
    }
    box.append(list);
  }
  return box;
}

function reducer(r) {
  const a = r.active;
  $("active-sha").textContent = a.sha256;
  $("active-origin").textContent = a.origin;
  $("active-loaded").textContent = a.loaded_at;
  $("active-world").textContent = `logq:reducer ${a.world_version}, ${fmt(a.size)} bytes`;
  const share = a.answers ? a.answers.share_by_active : null;
  $("active-share").textContent =
    share === null ? "–" : `${fmt(share * 100, 1)} % (${fmt(a.answers.by_active)} of ${fmt(a.answers.total)})`;
  $("previous-sha").textContent = r.previous ? r.previous.sha256 : "none";

  const box = $("replay");
  const p = r.replay;
  box.hidden = !p;
  if (p) {
    const goal = p.records_read + Math.max(p.lag, 0);
    const done = goal > 0 ? p.records_read / goal : 1;
    $("replay-progress").value = done;
    $("replay-progress").textContent = `${fmt(done * 100, 1)} %`;
    $("replay-text").textContent =
      `Swap #${p.swap} (${p.sha256.slice(0, 12)}…): ${p.phase}; ${fmt(p.records_read)} records read, ` +
      `${fmt(p.lag)} to go, ${fmt(p.events_per_second)} events/s, ${fmt(p.elapsed_seconds, 1)} s` +
      (p.error ? `; ${p.error}` : "");
  }

  // The newest preview's report (the history is newest first).
  const previewed = r.history.find((h) => h.preview);
  $("preview").hidden = !previewed;
  if (previewed) {
    const summary = $("preview-summary");
    summary.textContent = `Swap #${previewed.id} (${previewed.sha256.slice(0, 12)}…): ${previewSummary(previewed.preview)}`;
    summary.dataset.swapId = String(previewed.id);
    summary.dataset.changed = String(previewed.preview.users.changed);
    $("preview-report").textContent = JSON.stringify(previewed.preview, null, 2);
  }

  $("history").replaceChildren(
    ...(r.history.length
      ? r.history.map((h) =>
          row(
            [
              String(h.id),
              h.at,
              holding(text("code", h.sha256 ? `${h.sha256.slice(0, 12)}…` : "–", { title: h.sha256 })),
              h.origin,
              h.mode,
              text("td", h.outcome, { class: `outcome ${h.outcome}` }),
              h.preview ? previewSummary(h.preview) : h.reason || "",
            ],
            { "data-swap-id": String(h.id), "data-outcome": h.outcome },
          ),
        )
      : [row([text("td", "No swap yet.", { colspan: "7" })])]),
  );
}

// What a preview found, in one line.
function previewSummary(p) {
  const u = p.users;
  const d = p.dead_letters;
  const atLeast = d.complete ? "" : " (at least)";
  return (
    `users: ${fmt(u.changed)} changed, ${fmt(u.newly_visible)} newly visible, ` +
    `${fmt(u.newly_hidden)} newly hidden, ${fmt(u.unchanged)} unchanged; ` +
    `organizations: ${fmt(p.organizations.changed)} changed; ` +
    `dead letters: ${fmt(d.added)} added, ${fmt(d.removed)} removed${atLeast}; ` +
    `${fmt(p.seconds, 1)} s`
  );
}

// ---- admin -----------------------------------------------------------------

function admin(enabled) {
  const note = $("admin-note");
  $("token").disabled = !enabled;
  $("token-use").disabled = !enabled;
  $("actions").disabled = !(enabled && token);
  $("token-forget").hidden = !token;
  if (!enabled) {
    note.textContent =
      "Read-only: this host was started without --admin-token, so its admin actions are off.";
  } else if (!token) {
    note.textContent =
      "Read-only: enter the admin token to upload or preview a reducer, roll back or cancel a replay. " +
      "The token is kept in this page's memory only; a reload forgets it.";
  } else {
    note.textContent = "Admin actions enabled with the token in this page's memory.";
  }
}

async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (e) {
    return { status: 0, statusText: "network error", body: String(e) };
  }
  const raw = await response.text();
  let shown = raw;
  try {
    shown = JSON.stringify(JSON.parse(raw), null, 2);
  } catch (_) {
    // not JSON: shown as it came
  }
  return { status: response.status, statusText: response.statusText, body: shown };
}

function show(method, path, answer) {
  const out = $("result");
  out.dataset.status = String(answer.status);
  out.dataset.ok = String(answer.status >= 200 && answer.status < 300);
  out.textContent = `${method} ${path} → ${answer.status} ${answer.statusText}\n${answer.body}`;
  if (answer.status === 401) {
    token = null;
    $("token-state").textContent = "The host refused the token (401): enter it again.";
  }
  if (latest) admin(latest.admin.enabled);
}

function confirmed(message) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = message;
    dialog.returnValue = "";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.showModal();
  });
}

async function useToken(event) {
  event.preventDefault();
  const given = $("token").value.trim();
  if (!given) {
    $("token-state").textContent = "Enter a token first.";
    return;
  }
  token = given;
  const answer = await call("GET", "/admin/reducer");
  show("GET", "/admin/reducer", answer);
  if (answer.status === 200) {
    $("token").value = "";
    $("token-state").textContent = "Token accepted; kept in this page's memory only.";
  } else {
    token = null;
    $("token-state").textContent =
      `The host refused the token: ${answer.status} ${answer.statusText}. ${answer.body}`;
  }
  if (latest) admin(latest.admin.enabled);
}

function forgetToken() {
  token = null;
  $("token-state").textContent = "Token forgotten.";
  if (latest) admin(latest.admin.enabled);
}

async function swap() {
  const file = $("reducer-file").files[0];
  if (!file) {
    show("PUT", "/admin/reducer", { status: 0, statusText: "not sent", body: "Choose a .wasm component first." });
    return;
  }
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const what = {
    replay: "rebuilds the whole state from the earliest offsets with it, then switches readers over at once",
    forward: "keeps the state; events from the next batch on are folded by it",
    preview:
      "folds the whole log with it into a shadow state and reports how the answers and dead letters would change; nothing changes",
  }[mode];
  if (!(await confirmed(`Swap in ${file.name} (${fmt(file.size)} bytes) in ${mode} mode? This ${what}.`))) return;
  const path = `/admin/reducer?mode=${mode}`;
  show("PUT", path, await call("PUT", path, file));
}

async function rollback() {
  const target = latest && latest.reducer.previous ? latest.reducer.previous.sha256 : "the previous reducer";
  if (!(await confirmed(`Roll back to ${target}? The state is rebuilt with it (a replay), then readers switch over.`))) return;
  show("POST", "/admin/reducer/rollback", await call("POST", "/admin/reducer/rollback"));
}

async function cancelReplay() {
  if (!(await confirmed("Cancel the running replay? The active reducer and its state stay as they are."))) return;
  show("DELETE", "/admin/reducer/replay", await call("DELETE", "/admin/reducer/replay"));
}

// ---- the stream ------------------------------------------------------------

function connect() {
  const conn = $("connection");
  const source = new EventSource("/status/stream");
  source.addEventListener("open", () => {
    conn.dataset.state = "live";
    conn.textContent = "live";
  });
  source.addEventListener("error", () => {
    conn.dataset.state = "reconnecting";
    conn.textContent = "disconnected, reconnecting…";
  });
  source.addEventListener("points", (e) => {
    points = JSON.parse(e.data).slice(-WINDOW);
    drawCharts();
  });
  source.addEventListener("sample", (e) => {
    const s = JSON.parse(e.data);
    points.push(s.point);
    if (points.length > WINDOW) points.splice(0, points.length - WINDOW);
    render(s);
    drawCharts();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", useToken);
  $("token-forget").addEventListener("click", forgetToken);
  $("swap").addEventListener("click", swap);
  // The button says what it will do: a preview swaps nothing in.
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      $("swap").textContent = radio.value === "preview" ? "Preview…" : "Swap in…";
    });
  }
  $("rollback").addEventListener("click", rollback);
  $("cancel-replay").addEventListener("click", cancelReplay);
  connect();
});
