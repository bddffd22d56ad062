// edgeloop dashboard: reads the same public API as the CLI; actions go through the same endpoints.
// Every call carries the operator's bearer token (kept in localStorage). GET /auth/me tells who
// that is; buttons above the role are disabled, and the server refuses them anyway (403).
"use strict";

const API = "/api/v1";
const REFRESH_MS = 2000;
const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff7b72"];
const $ = (sel) => document.querySelector(sel);
const ROLES = ["viewer", "operator", "approver", "admin"];
// The least role each action needs (the server's rule; see server/api/routes/rollouts.py).
const NEEDS = { approve: "approver", pause: "operator", resume: "operator", abort: "operator", rollback: "operator",
  ack: "operator" }; // ack: server/api/routes/alerts.py
let me = null; // {name, role} of the token's operator, or null
function token() { return $("#token").value.trim(); }
function authHeaders() { return token() ? { Authorization: `Bearer ${token()}` } : {}; }
function allowed(action) { return !!me && ROLES.indexOf(me.role) >= ROLES.indexOf(NEEDS[action]); }

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function fmt(x, digits = 3) { return typeof x === "number" ? x.toFixed(digits) : "–"; }
function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}
function toast(msg) {
  const t = $("#toast"); t.textContent = msg; t.classList.add("show");
  setTimeout(() => t.classList.remove("show"), 3000);
}
async function getJSON(path) {
  const r = await fetch(path, { headers: { Accept: "application/json", ...authHeaders() } });
  if (!r.ok) { const e = new Error(`${path}: ${r.status}`); e.status = r.status; throw e; }
  return r.json();
}
async function act(rolloutId, action) {
  if (!me) { toast("Paste your operator token first"); $("#token").focus(); return; }
  // No name in the body: the server records the token's operator.
  const r = await fetch(`${API}/rollouts/${rolloutId}/${action}`, {
    method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: "{}",
  });
  const data = await r.json().catch(() => ({}));
  toast(r.ok ? `rollout #${rolloutId}: ${data.state}` : `refused: ${JSON.stringify(data.detail ?? r.status)}`);
  refresh();
}

function metricOf(v, key) {
  const m = v.metrics || {};
  if (typeof m[key] === "number") return m[key];
  return m.challenger && typeof m.challenger[key] === "number" ? m.challenger[key] : undefined;
}

function renderLines(lines, devicesByLine, health) {
  $("#health").textContent = health.mqtt && health.mqtt.connected ? "broker connected" : "broker offline";
  $("#health").className = "pill " + (health.mqtt && health.mqtt.connected ? "ok" : "bad");
  $("#lines").innerHTML = `<h2>Fleet</h2><div class="cards">` + lines.map((l) => {
    const devs = devicesByLine[l.name] || [];
    const byVersion = {};
    devs.forEach((d) => { byVersion[d.model_version ?? "none"] = (byVersion[d.model_version ?? "none"] || 0) + 1; });
    const recent = devs.filter((d) => d.last_seen && Date.now() - Date.parse(d.last_seen) < 120000).length;
    return `<div class="card" data-line="${esc(l.name)}">
      <div class="muted">model line</div><div class="big">${esc(l.name)}</div>
      <div>champion <b>v${esc(l.champion_version ?? "–")}</b> · release ${esc(l.current_release ?? "–")} · ${esc(l.trainer)}</div>
      <div>${devs.length} devices, ${recent} seen in the last 2 min</div>
      <div class="muted">on: ${Object.entries(byVersion).map(([v, n]) => `${v === "none" ? "no model" : "v" + esc(v)} × ${n}`).join(", ") || "–"}</div>
      <div class="muted">new samples ${l.new_samples} / ${l.retrain_threshold}</div>
    </div>`;
  }).join("") + `</div>`;
}

function stageRow(name, counts) {
  const total = Object.values(counts || {}).reduce((a, b) => a + b, 0);
  if (!total) return "";
  const done = ["committed", "already_installed"].reduce((a, k) => a + (counts[k] || 0), 0);
  const spans = Object.entries(counts).map(([s, n]) =>
    `<span class="s-${esc(s)}" style="width:${(100 * n) / total}%" title="${esc(s)}: ${n}"></span>`).join("");
  return `<div class="stage"><span>${esc(name)}</span><div class="bar">${spans}</div>
          <span class="muted">${done}/${total} on target</span></div>`;
}

function renderRollouts(rollouts) {
  if (!rollouts.length) return;
  $("#rollouts").innerHTML = rollouts.map((r) => {
    const active = ["canary", "rolling", "full", "awaiting_gate", "paused"].includes(r.state);
    const button = (act, label, cls = "") => {
      const ok = allowed(act);
      const why = ok ? "" : ` disabled title="needs the ${NEEDS[act]} role"`;
      return `<button class="${cls}" data-act="${act}" data-id="${r.id}"${why}>${label}</button>`;
    };
    const buttons = [
      r.state === "pending_approval" ? button("approve", "Approve") : "",
      r.state === "awaiting_gate" ? button("approve", "Approve next wave") : "",
      ["canary", "rolling", "full", "awaiting_gate"].includes(r.state) ? button("pause", "Pause", "secondary") : "",
      r.state === "paused" ? button("resume", "Resume") : "",
      active || r.state === "pending_approval" ? button("abort", active ? "Roll back" : "Abort", "danger") : "",
      r.state === "completed" ? button("rollback", "Roll back", "danger") : "",
    ].join("");
    const gates = r.gates ? Object.entries(r.gates).map(([k, v]) => `${k}: ${typeof v === "number" ? fmt(v) : JSON.stringify(v)}`).join("\n") : "";
    return `<div class="rollout" id="rollout-${r.id}" data-state="${esc(r.state)}">
      <header><b>#${r.id}</b>&nbsp; ${esc(r.model_line)} v${esc(r.from_version ?? "–")} → v${esc(r.to_version)}
        &nbsp;<span class="state ${esc(r.state)}">${esc(r.state.replace("_", " "))}</span>
        <span class="muted">&nbsp;canary ${r.canary_percent}% · by ${esc(r.created_by)}${r.approved_by ? " · approved by " + esc(r.approved_by) : ""}</span>
        <div class="actions">${buttons}</div></header>
      ${r.waves && r.waves.length
        ? r.waves.map((w) => stageRow(`wave ${w.index + 1} · ${w.label} · ${w.state.replace("_", " ")}`, w.devices)).join("")
        : stageRow("canary", (r.devices || {}).canary) + stageRow("rest", (r.devices || {}).rest)}
      ${r.reason ? `<div class="muted">${esc(r.reason)}</div>` : ""}
      ${gates ? `<div class="gates">${esc(gates)}</div>` : ""}
    </div>`;
  }).join("");
  document.querySelectorAll("#rollouts button").forEach((b) =>
    b.addEventListener("click", () => act(b.dataset.id, b.dataset.act)));
}

function renderVersions(versions) {
  $("#versions tbody").innerHTML = versions.slice().reverse().map((v) => `<tr>
    <td>v${v.version}</td><td>${esc(v.status)}</td><td>${fmt(metricOf(v, "golden_accuracy"))}</td>
    <td>${fmt(metricOf(v, "field_accuracy"))}</td><td>${v.parent_version ? "v" + v.parent_version : "–"}</td>
    <td title="${esc(v.dataset_version)}">${esc((v.dataset_version || "").slice(0, 12))}</td>
    <td>${v.sample_count}</td><td>${ago(v.created_at)}</td><td class="reason">${esc(v.reason ?? "")}</td></tr>`).join("");
}

function renderDevices(devices) {
  $("#device-count").textContent = `(${devices.length}${devices.length > 200 ? ", first 200 shown" : ""})`;
  $("#devices tbody").innerHTML = devices.slice(0, 200).map((d) => `<tr>
    <td>${esc(d.device_id)}</td><td>${d.model_version ? "v" + d.model_version : "–"}</td><td>${esc(d.release ?? "–")}</td>
    <td>${esc(d.state ?? "–")}</td><td>${ago(d.last_seen)}</td><td class="reason">${esc(d.last_reason ?? "")}</td></tr>`).join("");
}

function chart(svg, series, key, yMax) {
  const W = 640, H = 220, L = 44, R = 10, T = 10, B = 24;
  const pts = series.filter((p) => typeof p[key] === "number");
  if (!pts.length) { svg.innerHTML = `<text x="${W / 2 - 60}" y="${H / 2}">no data yet</text>`; return; }
  const t0 = Math.min(...pts.map((p) => p.t)), t1 = Math.max(...pts.map((p) => p.t), t0 + 1);
  const ymax = yMax ?? (Math.max(...pts.map((p) => p[key])) * 1.15 || 1);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R), y = (v) => H - B - (v / ymax) * (H - T - B);
  const byVersion = {};
  pts.forEach((p) => (byVersion[p.model_version] ||= []).push(p));
  let out = `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#2a3642"/>`;
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    out += `<text x="4" y="${y(v) + 4}">${v.toFixed(ymax <= 1 ? 2 : 1)}</text><line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" stroke="#1f2933"/>`;
  }
  Object.entries(byVersion).forEach(([ver, ps], i) => {
    const c = COLORS[i % COLORS.length];
    out += `<polyline fill="none" stroke="${c}" stroke-width="2" points="${ps.map((p) => `${x(p.t)},${y(p[key])}`).join(" ")}"/>`;
    out += `<text x="${L + 8 + i * 60}" y="${T + 12}" style="fill:${c}">v${esc(ver)}</text>`;
  });
  // Time axis: the device clock of the first, middle and last bucket (local time).
  [t0, (t0 + t1) / 2, t1].forEach((t, i) => {
    const label = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    const anchor = ["start", "middle", "end"][i];
    out += `<text class="time" x="${x(t)}" y="${H - 6}" text-anchor="${anchor}">${label}</text>`;
  });
  svg.innerHTML = out;
}

// ---------------------------------------------------------------- monitoring
// The series comes from GET /model-lines/{line}/monitoring/series: one (version, group)'s
// windows, oldest first. A drift score is the window's highest statistic / its calibrated
// threshold, so one line at 1 is every signal's threshold; the accuracy floor is the reference
// accuracy minus the server's alert_max_accuracy_drop.
let monitorKey = null; // "version|group" picked in the selector; null: the server's default
function utc(iso) { return iso ? new Date(iso).toISOString().slice(0, 19).replace("T", " ") + " UTC" : "–"; }
function groupName(g) { return g === "*" ? "all devices" : g; }

// A time chart of several series and horizontal lines. opts: {series: [{name, color, pts: [{t, v,
// breach, untrusted}], band: [{t, lo, hi}]}], hlines: [{y, label, cls, below}], yMin, yMax, log,
// legend}. An untrusted point is drawn hollow.
function timeChart(svg, opts) {
  const W = 640, H = 220, L = 44, R = 10, T = 10, B = 24;
  const all = opts.series.flatMap((s) => s.pts);
  if (!all.length) { svg.innerHTML = `<text x="${W / 2 - 60}" y="${H / 2}">no windows yet</text>`; return; }
  const t0 = Math.min(...all.map((p) => p.t)), t1 = Math.max(...all.map((p) => p.t), t0 + 1);
  const f = opts.log ? (v) => Math.log10(Math.max(v, opts.yMin)) : (v) => v;
  const lo = f(opts.yMin), hi = f(opts.yMax);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => H - B - ((Math.min(Math.max(f(v), lo), hi) - lo) / (hi - lo)) * (H - T - B);
  let out = `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#2a3642"/>`;
  const ticks = opts.log
    ? Array.from({ length: Math.round(hi - lo) + 1 }, (_, i) => 10 ** (lo + i))
    : [0, 1, 2, 3, 4].map((i) => opts.yMin + ((opts.yMax - opts.yMin) * i) / 4);
  ticks.forEach((v) => {
    out += `<text x="4" y="${y(v) + 4}">${v < 1 ? v.toFixed(opts.log ? 1 : 2) : v.toFixed(0)}</text>` +
      `<line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" stroke="#1f2933"/>`;
  });
  opts.series.forEach((s) => {
    if (s.band && s.band.length) {
      const upper = s.band.map((p) => `${x(p.t)},${y(p.hi)}`), lower = s.band.slice().reverse().map((p) => `${x(p.t)},${y(p.lo)}`);
      out += `<polygon class="band" fill="${s.color}" fill-opacity="0.15" points="${upper.concat(lower).join(" ")}"/>`;
    }
  });
  (opts.hlines || []).forEach((h) => {
    out += `<line class="${h.cls}" data-y="${h.y}" x1="${L}" x2="${W - R}" y1="${y(h.y)}" y2="${y(h.y)}"/>` +
      `<text class="${h.cls}-label" x="${W - R - 4}" y="${y(h.y) + (h.below ? 12 : -4)}" text-anchor="end">${esc(h.label)}</text>`;
  });
  opts.series.forEach((s, i) => {
    if (!s.pts.length) return;
    out += `<polyline class="series" data-series="${esc(s.name)}" fill="none" stroke="${s.color}" stroke-width="2" ` +
      `points="${s.pts.map((p) => `${x(p.t)},${y(p.v)}`).join(" ")}"/>`;
    out += s.pts.map((p) => `<circle class="pt${p.breach ? " breach" : ""}${p.untrusted ? " untrusted" : ""}" data-series="${esc(s.name)}" ` +
      `data-t="${p.t}" data-v="${p.v}" data-breach="${!!p.breach}" data-untrusted="${!!p.untrusted}" cx="${x(p.t)}" cy="${y(p.v)}" r="2.5" fill="${s.color}" stroke="${s.color}">` +
      `<title>${esc(s.name)} ${fmt(p.v)} at ${utc(new Date(p.t * 1000).toISOString())}${p.untrusted ? " (unreliable: the inputs drifted)" : ""}</title></circle>`).join("");
    if (opts.legend !== false) out += `<text x="${L + 8 + i * 120}" y="${T + 12}" style="fill:${s.color}">${esc(s.name)}</text>`;
  });
  [t0, (t0 + t1) / 2, t1].forEach((t, i) => {
    const label = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    out += `<text class="time" x="${x(t)}" y="${H - 6}" text-anchor="${["start", "middle", "end"][i]}">${label}</text>`;
  });
  svg.innerHTML = out;
}

function renderMonitoring(ser) {
  const sel = $("#monitor-key");
  const options = ser.keys.map((k) => [`${k.version}|${k.group}`, `v${k.version} · ${groupName(k.group)}`]);
  const sig = JSON.stringify(options);
  if (sel.dataset.sig !== sig) {
    sel.innerHTML = options.map(([v, label]) => `<option value="${esc(v)}">${esc(label)}</option>`).join("");
    sel.dataset.sig = sig;
  }
  if (ser.version !== null) sel.value = `${ser.version}|${ser.group}`;
  const pts = ser.points.map((p) => ({ ...p, t: Date.parse(p.window_start) / 1000 }));
  const scores = pts.filter((p) => typeof p.drift_score === "number");
  const top = Math.max(10, ...scores.map((p) => p.drift_score));
  timeChart($("#chart-drift"), {
    series: [{ name: "drift score", color: COLORS[0], pts: scores.map((p) => ({ t: p.t, v: p.drift_score, breach: p.drift_breach })) }],
    hlines: [{ y: ser.drift_threshold, label: `threshold ${ser.drift_threshold}`, cls: "threshold" }],
    yMin: 0.1, yMax: 10 ** Math.ceil(Math.log10(top)), log: true,
  });
  const est = pts.filter((p) => typeof p.estimated_accuracy === "number");
  const live = pts.filter((p) => typeof p.live_accuracy === "number");
  const last = pts[pts.length - 1];
  const floor = [...pts].reverse().find((p) => typeof p.accuracy_floor === "number");
  const hlines = floor ? [
    { y: floor.reference_accuracy, label: `reference ${fmt(floor.reference_accuracy)}`, cls: "reference" },
    { y: floor.accuracy_floor, label: `alert floor ${fmt(floor.accuracy_floor)}`, cls: "threshold", below: true },
  ] : [];
  timeChart($("#chart-monitor-accuracy"), {
    series: [
      { name: "estimated", color: COLORS[0], pts: est.map((p) => ({ t: p.t, v: p.estimated_accuracy, breach: p.breaches.includes("estimated_accuracy"), untrusted: p.estimate_trusted === false })),
        band: est.filter((p) => typeof p.estimated_low === "number").map((p) => ({ t: p.t, lo: p.estimated_low, hi: p.estimated_high })) },
      { name: "live (labelled)", color: COLORS[1], pts: live.map((p) => ({ t: p.t, v: p.live_accuracy, breach: p.breaches.includes("live_accuracy") })) },
    ],
    hlines, yMin: 0, yMax: 1, legend: false, // the panel's title names the colours
  });
  if (!last) { $("#monitor-latest").textContent = "No monitoring windows yet."; return; }
  const item = (k, text) => `<span data-k="${k}">${text}</span>`;
  $("#monitor-latest").innerHTML = [
    item("window", `latest window ${esc(utc(last.window_start))} · ${last.samples} samples from ${last.devices} devices`),
    item("drift", `drift score ${fmt(last.drift_score, 2)} (threshold ${ser.drift_threshold}${last.drift_breach ? ", breach: " + esc(last.drifted.join(", ")) : ""})`),
    // A window whose drift verdict breaches breaks the estimate's assumption (a model can be
    // confidently wrong on drifted inputs): its estimate is shown, marked unreliable.
    item("estimated", `estimated accuracy ${fmt(last.estimated_accuracy)}${last.estimate_trusted === false ? " (unreliable: the inputs drifted)" : ""}`),
    item("live", `live accuracy ${fmt(last.live_accuracy)} (${last.labelled} labels)`),
    item("floor", `alert floor ${fmt(last.accuracy_floor)}`),
  ].join("");
}

// The acknowledged column: who and when (the note as a tooltip), an Ack button on a raised alert
// nobody acknowledged yet (disabled below the operator role), or a dash.
function ackCell(a) {
  if (a.acknowledged_by) {
    return `<span class="acked" title="${esc(a.ack_note ?? "")}">${esc(a.acknowledged_by)}</span> ` +
      `<span class="muted">${esc(utc(a.acknowledged_at))}</span>`;
  }
  if (a.state !== "raised") return "–";
  const why = allowed("ack") ? "" : ` disabled title="needs the ${NEEDS.ack} role"`;
  return `<button class="secondary" data-ack="${a.id}"${why}>Ack</button>`;
}

function renderAlerts(alerts) {
  $("#alerts tbody").innerHTML = alerts.length ? alerts.map((a) => `<tr data-alert-id="${a.id}" data-state="${esc(a.state)}"
      data-acked="${!!a.acknowledged_by}">
    <td>#${a.id}</td><td><span class="state ${esc(a.state)}">${esc(a.state)}</span></td><td>${esc(a.rule)}</td>
    <td>v${a.model_version}</td><td>${esc(groupName(a.group))}</td><td>${fmt(a.value)}</td>
    <td>${esc(utc(a.raised_at))}</td><td>${esc(utc(a.cleared_at))}</td>
    <td class="reason">${a.retrain_job_id !== null ? "job #" + a.retrain_job_id : esc(a.retrain_note ?? "–")}</td>
    <td class="ack">${ackCell(a)}</td></tr>`).join("")
    : `<tr><td colspan="10" class="muted">No alerts.</td></tr>`;
  document.querySelectorAll("#alerts button[data-ack]").forEach((b) =>
    b.addEventListener("click", () => acknowledge(b.dataset.ack)));
}

async function acknowledge(alertId) {
  if (!me) { toast("Paste your operator token first"); $("#token").focus(); return; }
  const note = prompt(`Acknowledge alert #${alertId}: a note (optional)`, "");
  if (note === null) return; // cancelled
  // The server records the token's operator; the alert stays raised until it clears.
  const r = await fetch(`${API}/alerts/${alertId}/acknowledge`, {
    method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(note.trim() ? { note: note.trim() } : {}),
  });
  const data = await r.json().catch(() => ({}));
  toast(r.ok ? `alert #${alertId} acknowledged by ${data.acknowledged_by}` : `refused: ${JSON.stringify(data.detail ?? r.status)}`);
  refresh();
}

// ---------------------------------------------------------------- labelling
// One row per line from GET /model-lines/{line}/labelling-summary.
function renderLabelling(summaries) {
  $("#labelling tbody").innerHTML = summaries.length ? summaries.map((s) => {
    const policies = s.capture_policies.map((p) => `<span data-group="${esc(p.group)}">${esc(groupName(p.group))}: ` +
      `rate ${fmt(p.sample_rate, 2)} below ${fmt(p.uncertain_below, 2)} until ${esc(utc(p.expires_at))}</span>`).join("");
    return `<tr data-line="${esc(s.model_line)}">
      <td>${esc(s.model_line)}</td><td data-k="queued">${s.queued}</td>
      <td data-k="device">${s.labelled.device ?? 0}</td><td data-k="operator">${s.labelled.operator ?? 0}</td>
      <td class="policies" data-k="policies" data-count="${s.capture_policies.length}">${policies || "none (devices on their default)"}</td></tr>`;
  }).join("") : `<tr><td colspan="5" class="muted">No model lines.</td></tr>`;
}

async function refreshMonitoring(line) {
  const q = new URLSearchParams({ limit: "200" });
  if (monitorKey) { const [v, g] = monitorKey.split("|"); q.set("version", v); q.set("group", g); }
  const base = `${API}/model-lines/${encodeURIComponent(line)}`;
  try {
    const [ser, alerts] = await Promise.all([
      getJSON(`${base}/monitoring/series?${q}`), getJSON(`${API}/alerts?model_line=${encodeURIComponent(line)}&limit=50`),
    ]);
    renderMonitoring(ser);
    renderAlerts(alerts);
  } catch (e) {
    if (e.status === 404 && monitorKey) { monitorKey = null; return; } // that version is gone
    $("#monitor-latest").textContent = `monitoring unavailable: ${e.message}`;
  }
}

let checkedToken = null; // the token `me` belongs to
async function whoami() {
  const t = token();
  if (t === checkedToken) return; // a second "change" (e.g. on blur) changes nothing
  checkedToken = t;
  if (!t) { me = null; $("#whoami").textContent = "not signed in"; return; }
  try {
    const who = await getJSON(`${API}/auth/me`);
    if (token() === t) { me = who; $("#whoami").textContent = `${who.name} (${who.role})`; }
  } catch (e) {
    if (token() === t) {
      me = null;
      $("#whoami").textContent = e.status === 401 ? "token refused" : "cannot check token";
    }
  }
}

async function refresh() {
  if (!me) {
    $("#health").textContent = token() ? "token refused" : "sign in with a token";
    $("#health").className = "pill bad";
    $("#lines").innerHTML = `<div class="card signin"><h2>Sign in</h2>
      <p>Paste an operator token in the <b>token</b> box above. An admin makes one with
      <code>edgeloop tokens create --name NAME --role viewer</code> (viewer, operator, approver or
      admin); in development the server's admin token is <code>edgeloop-dev-admin-token</code>.</p></div>`;
    return;
  }
  try {
    const [health, lines, rollouts, devices] = await Promise.all([
      getJSON("/healthz"), getJSON(`${API}/model-lines`), getJSON(`${API}/rollouts`), getJSON(`${API}/devices`),
    ]);
    const devicesByLine = {};
    devices.forEach((d) => (devicesByLine[d.model_line] ||= []).push(d));
    renderLines(lines, devicesByLine, health);
    const details = await Promise.all(rollouts.slice(-10).reverse().map((r) => getJSON(`${API}/rollouts/${r.id}`)));
    renderRollouts(details);
    renderDevices(devices);
    renderLabelling(await Promise.all(lines.map((l) =>
      getJSON(`${API}/model-lines/${encodeURIComponent(l.name)}/labelling-summary`))));
    if (lines.length) {
      const line = lines[0].name;
      const [versions, series] = await Promise.all([
        getJSON(`${API}/model-lines/${encodeURIComponent(line)}/versions`),
        getJSON(`${API}/model-lines/${encodeURIComponent(line)}/series?bucket_s=5&window_s=3600`),
      ]);
      renderVersions(versions);
      chart($("#chart-accuracy"), series, "accuracy", 1);
      chart($("#chart-latency"), series, "latency_ms_p95_max");
      await refreshMonitoring(line);
    }
  } catch (e) {
    $("#health").textContent = "server unreachable"; $("#health").className = "pill bad";
  }
}

$("#token").value = localStorage.getItem("edgeloop.token") || "";
$("#token").addEventListener("change", async () => {
  localStorage.setItem("edgeloop.token", token());
  await whoami();
  refresh();
});
$("#monitor-key").addEventListener("change", () => { monitorKey = $("#monitor-key").value || null; refresh(); });
whoami().then(refresh);
setInterval(refresh, REFRESH_MS);
