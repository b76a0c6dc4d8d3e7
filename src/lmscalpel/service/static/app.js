// lmscalpel service page: plain JavaScript over the JSON API under /v1 (no build step, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const API = "v1"; // relative: the page works behind a path prefix too

// ---------------------------------------------------------------- HTTP

const TOKEN_KEY = "lmscalpel-token";

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

// The server's error bodies: {"error": {"type", "message", "errors": [{"field", "reason"}]}}
// (FastAPI's own {"detail": ...} is understood too).
function errorText(status, body) {
  if (body && typeof body === "object") {
    const error = body.error ?? body.detail;
    if (typeof error === "string") return error;
    if (error && typeof error === "object" && !Array.isArray(error)) {
      const fields = (error.errors || []).map((e) => `${e.field}: ${e.reason}`);
      if (fields.length > 1) return fields.join("; ");
      return error.message || fields[0] || `HTTP ${status}`;
    }
    if (Array.isArray(error)) {
      return error.map((d) => (d.loc ? `${d.loc.join(".")}: ${d.msg}` : d.msg)).join("; ");
    }
  }
  return `HTTP ${status}`;
}

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(`${API}/${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = text;
  }
  if (!response.ok) {
    let message = errorText(response.status, data);
    if (response.status === 401) {
      message += token() ? " (the token was refused)" : " (enter the bearer token, top right)";
    }
    throw new ApiError(response.status, message, data);
  }
  return data;
}

// ---------------------------------------------------------------- small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setStatus(id, text, kind = "") {
  const node = $(id);
  node.textContent = text;
  node.className = `status ${kind}`;
}

// Run an action with its button disabled and its status line showing progress and errors.
async function busy(button, statusId, label, action) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  const started = performance.now();
  setStatus(statusId, `${label}…`, "busy");
  const ticker = setInterval(() => {
    if (!$(statusId).classList.contains("busy")) return;
    const seconds = Math.round((performance.now() - started) / 1000);
    setStatus(statusId, `${label}… ${seconds} s`, "busy");
  }, 1000);
  try {
    const result = await action();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if ($(statusId).classList.contains("busy")) setStatus(statusId, `done in ${seconds} s`, "ok");
    return result;
  } catch (error) {
    setStatus(statusId, error.message || String(error), "error");
    return undefined;
  } finally {
    clearInterval(ticker);
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

function fmt(x, digits = 2) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
}

function lines(text) {
  return text
    .split("\n")
    .map((s) => s.trim())
    .filter(Boolean);
}

// ---------------------------------------------------------------- health

async function refreshHealth() {
  try {
    const h = await call("GET", "health");
    const applied = h.state?.applied ?? h.applied_edits ?? [];
    $("health").replaceChildren(
      "model ",
      el("code", { id: "health-model" }, h.model ?? "?"),
      " on ",
      h.device ?? "?",
      " · fingerprint ",
      el("code", { title: h.fingerprint }, String(h.fingerprint ?? "?").slice(0, 12)),
      " · applied edits ",
      el("b", { id: "health-applied" }, applied.length),
      " · journal state ",
      el("b", { id: "health-state" }, h.state?.version ?? "?"),
    );
    return h;
  } catch (error) {
    $("health").textContent = `server unreachable: ${error.message}`;
    return null;
  }
}

// ---------------------------------------------------------------- ask

async function generate(prompt, maxTokens) {
  const data = await call("POST", "generate", { prompts: [prompt], max_tokens: maxTokens });
  return { text: data.completions[0].text, state: data.state };
}

function showAnswer(prompt, answer) {
  const box = $("ask-answer");
  box.dataset.count = String(Number(box.dataset.count || 0) + 1);
  box.replaceChildren(
    el("span", { class: "prompt" }, prompt),
    el("span", { class: "answer", id: "ask-answer-text" }, answer.text),
  );
  const applied = answer.state?.applied?.length ?? 0;
  $("ask-state").textContent =
    `answered under journal state ${answer.state?.version ?? "?"} ` +
    `(${applied} edit${applied === 1 ? "" : "s"} applied)`;
}

async function onAsk(event) {
  event.preventDefault();
  const prompt = $("ask-prompt").value;
  const maxTokens = Number($("ask-max-tokens").value) || 12;
  await busy($("ask-submit"), "ask-status", "generating", async () => {
    $("ask-answer").replaceChildren();
    $("ask-state").textContent = "";
    showAnswer(prompt, await generate(prompt, maxTokens));
  });
}

// ---------------------------------------------------------------- edit

// "prompt => answer" per line; a line without an answer takes the model's current first word,
// so that the probe checks that the edit leaves it alone.
async function localityProbes(text) {
  const probes = lines(text).map((line) => {
    const [prompt, answer] = line.split("=>").map((s) => s.trim());
    return { prompt, answer: answer || "" };
  });
  for (const probe of probes.filter((p) => !p.answer)) {
    const said = (await generate(probe.prompt, 4)).text.trim().split(/\s+/)[0] || "";
    probe.answer = said.replace(/[.,;:!?]+$/, "");
  }
  return probes;
}

async function editBody() {
  const request = {
    prompt: $("edit-prompt").value.trim(),
    subject: $("edit-subject").value.trim(),
    target_new: $("edit-target-new").value.trim(),
  };
  const truth = $("edit-target-true").value.trim();
  if (truth) request.target_true = truth;
  const paraphrases = lines($("edit-paraphrases").value);
  if (paraphrases.length) request.paraphrases = paraphrases;
  const locality = await localityProbes($("edit-locality").value);
  if (locality.length) request.locality = locality;
  const body = { method: $("edit-method").value, requests: [request] };
  if ($("edit-guard").value === "on") body.guard = {};
  const config = $("edit-config").value.trim();
  if (config) {
    try {
      body.config = JSON.parse(config);
    } catch (error) {
      throw new Error(`method config: not JSON (${error.message})`);
    }
  }
  const note = $("edit-note").value.trim();
  if (note) body.note = note;
  return body;
}

function logprobPair(before, after) {
  if (before == null && after == null) return "–";
  return `${fmt(before)} → ${fmt(after)}`;
}

const METRIC_LABELS = {
  reliability: ["reliability", "share of edit prompts that now give the new target"],
  generalization: ["generalization", "share of paraphrases that now give the new target"],
  locality: ["locality", "share of unrelated prompts whose answer is unchanged"],
  portability: ["portability", "share of portability probes answered as the edit implies"],
};

function guardText(guard) {
  if (!guard) return "";
  if (guard.passed) return "guard: every bound met";
  const failures = (guard.failures || []).map((f) => (typeof f === "string" ? f : f.reason || f.message || JSON.stringify(f)));
  return `guard rolled the edit back: ${failures.join("; ") || "a bound was missed"}`;
}

function showResult(edit) {
  $("result-empty").hidden = true;
  $("result-body").hidden = false;
  const rows = (edit.probes || []).map((p, i) => {
    const changed = p.before?.answer !== p.after?.answer;
    return el(
      "tr",
      { id: `result-row-${i}`, "data-role": p.role },
      el("td", {}, p.role),
      el("td", { class: "mono" }, p.prompt),
      el("td", { class: "mono", "data-col": "before" }, p.before?.answer ?? "–"),
      el("td", { class: `mono${changed ? " changed" : ""}`, "data-col": "after" }, p.after?.answer ?? "–"),
      el("td", { class: "num" }, logprobPair(p.before?.logprob_new, p.after?.logprob_new)),
      el("td", { class: "num" }, logprobPair(p.before?.logprob_true, p.after?.logprob_true)),
    );
  });
  $("result-table").tBodies[0].replaceChildren(...rows);
  $("result-table").hidden = !rows.length;
  const status = edit.status ?? "applied";
  const pill = { applied: "good", rejected: "bad" }[status] || "muted";
  const summary = [
    el("span", { class: `pill ${pill}`, id: "result-status" }, status),
    " ",
    el("code", { id: "result-id" }, edit.id ?? ""),
    ` · ${edit.method ?? ""}`,
    edit.seconds != null ? ` · ${fmt(edit.seconds, 1)} s` : "",
    guardText(edit.guard)
      ? el("div", { class: edit.guard.passed ? "status ok" : "status error", id: "result-guard" }, guardText(edit.guard))
      : null,
  ];
  $("result-summary").replaceChildren(...summary.filter((x) => x !== null && x !== ""));
  const digests = edit.digests || {};
  if (edit.parameters?.length || digests.patch) {
    $("result-summary").append(
      el("details", { id: "result-digests" },
        el("summary", {}, `changed ${edit.parameters?.length ?? "?"} weight matrix(es); digests`),
        el("pre", { class: "output" }, JSON.stringify({ parameters: edit.parameters, digests }, null, 1)),
      ),
    );
  }
  const m = edit.metrics || edit.guard?.measured || {};
  const metrics = Object.entries(METRIC_LABELS)
    .filter(([k]) => typeof m[k] === "number")
    .map(([k, label]) => el("div", { title: label[1] }, `${label[0]} `, el("b", { "data-metric": k }, fmt(m[k], 3))));
  if (typeof m.general_changed === "number") {
    metrics.push(
      el("div", { title: "fixed general prompts whose greedy answer changed" },
        "general prompts changed ",
        el("b", { "data-metric": "general_changed" }, `${m.general_changed} / ${m.general_total ?? "?"}`)),
    );
  }
  $("result-metrics").replaceChildren(...metrics);
  const general = edit.guard?.general || [];
  if (general.length) {
    const changed = general.filter((g) => g.before !== g.after).length;
    $("result-metrics").append(
      el("details", { id: "result-general" },
        el("summary", {}, `general prompts (${changed} of ${general.length} changed)`),
        el("table", {},
          el("thead", {}, el("tr", {},
            el("th", { scope: "col" }, "Prompt"),
            el("th", { scope: "col" }, "Before"),
            el("th", { scope: "col" }, "After"))),
          el("tbody", {}, ...general.map((g) => el("tr", {},
            el("td", { class: "mono" }, g.prompt),
            el("td", { class: "mono" }, g.before),
            el("td", { class: `mono${g.before !== g.after ? " changed" : ""}` }, g.after)))),
        ),
      ),
    );
  }
}

async function onEdit(event) {
  event.preventDefault();
  const method = $("edit-method").value;
  await busy($("edit-submit"), "edit-status", `editing with ${method}`, async () => {
    const body = await editBody();
    let edit;
    try {
      edit = await call("POST", "edits", body);
    } catch (error) {
      const guard = error.body?.error?.guard;
      if (!guard) throw error;
      // the guard rolled it back: show what it measured (probes when the server sends them)
      const { id, probes } = error.body.error;
      showResult({ id, status: "rejected", method: body.method, guard, probes });
      await refreshJournal();
      throw error;
    }
    showResult(edit);
    const seconds = edit.seconds != null ? ` in ${fmt(edit.seconds, 1)} s` : "";
    setStatus("edit-status", `applied ${edit.id}${seconds}`, "ok");
    await Promise.all([refreshJournal(), refreshHealth()]);
  });
}

// ---------------------------------------------------------------- journal

function requestSummary(entry) {
  const r = (entry.requests || [])[0];
  if (!r) return "";
  const more = entry.requests.length > 1 ? ` (+${entry.requests.length - 1} more)` : "";
  return `${r.prompt} → ${r.target_new}${more}`;
}

async function refreshJournal() {
  try {
    const data = await call("GET", "edits");
    const entries = Array.isArray(data) ? data : data.edits || [];
    const rows = entries.map((e, i) => {
      const active = e.status === "applied";
      const revert = active
        ? el("button", {
            type: "button",
            class: "danger",
            id: `revert-${e.id}`,
            "data-edit-id": e.id,
            "aria-label": `Revert edit ${e.id}`,
            onclick: (ev) => onRevert(ev.currentTarget, e.id),
          }, "Revert")
        : null;
      return el(
        "tr",
        {
          id: `journal-row-${e.id}`,
          class: active ? "" : "reverted",
          "data-edit-id": e.id,
          "data-status": e.status,
        },
        el("td", { class: "num" }, e.seq ?? i + 1),
        el(
          "td",
          { class: "mono keep" },
          el("button", {
            type: "button",
            class: "link",
            id: `view-${e.id}`,
            title: "show this edit's answers before and after, and its digests",
            onclick: () => onView(e.id),
          }, e.id),
        ),
        el("td", { class: "num" }, (e.time || "").replace("T", " ").slice(0, 19)),
        el("td", {}, e.method ?? ""),
        el("td", { class: "mono", title: e.note || "" }, requestSummary(e)),
        el(
          "td",
          { class: "keep" },
          el("span", {
            class: `pill ${active ? "good" : e.status === "rejected" ? "bad" : "muted"}`,
            title: e.reverted_time ? `reverted ${e.reverted_time}` : null,
          }, e.status),
        ),
        el("td", { class: "keep" }, revert),
      );
    });
    $("journal-table").tBodies[0].replaceChildren(...rows);
    if (!rows.length) setStatus("journal-status", "no edits yet");
    else if (!$("journal-status").classList.contains("error")) setStatus("journal-status", "");
  } catch (error) {
    setStatus("journal-status", error.message, "error");
  }
}

async function onView(id) {
  try {
    showResult(await call("GET", `edits/${encodeURIComponent(id)}`));
    $("result").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (error) {
    setStatus("journal-status", error.message, "error");
  }
}

async function onRevert(button, id, cascade = false) {
  await busy(button, "journal-status", `reverting ${id}`, async () => {
    const path = `edits/${encodeURIComponent(id)}` + (cascade ? "?cascade=true" : "");
    let data;
    try {
      data = await call("DELETE", path);
    } catch (error) {
      const conflicts = error.body?.error?.conflicts;
      if (error.status !== 409 || !conflicts?.length) throw error;
      // a later edit touched the same weights: offer to revert it (them) first
      setStatus("journal-status", `${error.message} `, "error");
      $("journal-status").append(
        el("button", {
          type: "button",
          class: "danger",
          id: "revert-cascade",
          onclick: (ev) => onRevert(ev.currentTarget, id, true),
        }, `Revert ${conflicts.join(", ")} and ${id}`),
      );
      return;
    }
    const reverted = data.reverted || [id];
    setStatus("journal-status", `reverted ${reverted.join(", ")}`, "ok");
    await Promise.all([refreshJournal(), refreshHealth()]);
  });
}

// ---------------------------------------------------------------- trace

const KIND_COLOURS = { hidden: [94, 38, 160], mlp: [20, 110, 60], attn: [170, 30, 30] };

// A (tokens x layers) matrix drawn as a heatmap: white at p_corrupted, the kind's colour at the
// largest restored probability; subject tokens starred, as in Meng et al. (2022), Figure 1.
function drawHeatmap(canvas, trace) {
  const matrix = trace.matrix;
  const rows = matrix.length;
  const cols = rows ? matrix[0].length : 0;
  const ctx = canvas.getContext("2d");
  const cell = Math.max(8, Math.min(28, Math.floor(720 / Math.max(cols, 1))));
  const cellH = 22;
  ctx.font = "12px ui-monospace, monospace";
  const labels = trace.tokens.map((t, i) => (trace.subject.includes(i) ? `${t}*` : t));
  const left = Math.ceil(Math.max(40, ...labels.map((s) => ctx.measureText(s).width))) + 10;
  const top = 8;
  const legend = 70;
  canvas.width = left + cols * cell + legend;
  canvas.height = top + rows * cellH + 40;
  ctx.font = "12px ui-monospace, monospace";
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const values = matrix.flat().filter((v) => v !== null && Number.isFinite(v));
  const low = trace.low ?? Math.min(...values);
  const high = Math.max(low + 1e-6, ...values);
  const [r, g, b] = KIND_COLOURS[trace.kind] || KIND_COLOURS.hidden;
  const colour = (v) => {
    if (v === null || !Number.isFinite(v)) return "#eeeeee";
    const t = Math.max(0, Math.min(1, (v - low) / (high - low)));
    const mix = (c) => Math.round(255 + (c - 255) * t);
    return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
  };
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      ctx.fillStyle = colour(matrix[i][j]);
      ctx.fillRect(left + j * cell, top + i * cellH, cell, cellH);
    }
    ctx.fillStyle = "#1d232a";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText(labels[i], left - 6, top + i * cellH + cellH / 2);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const step = Math.ceil(20 / cell);
  for (let j = 0; j < cols; j += step) {
    ctx.fillText(String(j), left + j * cell + cell / 2, top + rows * cellH + 4);
  }
  ctx.fillText(`layer (${trace.kind})`, left + (cols * cell) / 2, top + rows * cellH + 20);
  // colour bar
  const x0 = left + cols * cell + 16;
  const h = rows * cellH;
  for (let k = 0; k < h; k++) {
    ctx.fillStyle = colour(high - ((high - low) * k) / h);
    ctx.fillRect(x0, top + k, 14, 1);
  }
  ctx.fillStyle = "#1d232a";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(fmt(high), x0 + 18, top);
  ctx.textBaseline = "bottom";
  ctx.fillText(fmt(low), x0 + 18, top + h);
  canvas.setAttribute(
    "aria-label",
    `Causal trace heatmap of ${rows} tokens by ${cols} layers, restoring ${trace.kind}; ` +
      `probability from ${fmt(low)} to ${fmt(high)}`,
  );
  canvas.dataset.rows = rows;
  canvas.dataset.cols = cols;
  canvas.onmousemove = (ev) => {
    const box = canvas.getBoundingClientRect();
    const x = ((ev.clientX - box.left) * canvas.width) / box.width;
    const y = ((ev.clientY - box.top) * canvas.height) / box.height;
    const j = Math.floor((x - left) / cell);
    const i = Math.floor((y - top) / cellH);
    if (i >= 0 && i < rows && j >= 0 && j < cols) {
      canvas.title = `${trace.tokens[i]} · layer ${j} · p = ${fmt(matrix[i][j], 3)}`;
    }
  };
}

async function onTrace(event) {
  event.preventDefault();
  const kind = $("trace-kind").value;
  const body = {
    prompt: $("trace-prompt").value,
    subject: $("trace-subject").value,
    kinds: [kind],
    samples: Number($("trace-samples").value) || 3,
  };
  await busy($("trace-submit"), "trace-status", "tracing (a minute or more on a CPU)", async () => {
    const data = await call("POST", "trace", body);
    const matrix = data.restored[kind];
    drawHeatmap($("trace-canvas"), {
      matrix,
      tokens: data.tokens,
      subject: data.subject_positions || [],
      kind,
      low: data.p_corrupted,
    });
    $("trace-caption").replaceChildren(
      el("span", { id: "trace-answer" }, `answer “${data.answer}”`),
      ` · p clean ${fmt(data.p_clean, 3)} · p corrupted ${fmt(data.p_corrupted, 3)}` +
        ` · ${data.samples ?? body.samples} noise samples`,
    );
    const png = data.png_by_kind?.[kind] ?? data.png;
    if (png) {
      $("trace-png").src = `data:image/png;base64,${png}`;
      $("trace-png-details").hidden = false;
    }
  });
}

// ---------------------------------------------------------------- start

function loadMethods(health) {
  const names = health?.methods?.length ? health.methods : ["rome", "ft-l"];
  const preferred = names.includes(health?.default_method) ? health.default_method : names[0];
  $("edit-method").replaceChildren(
    ...names.map((n) => el("option", { value: n, selected: n === preferred ? "" : null }, n)),
  );
}

function onToken(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("token-save").textContent = value ? "Token set" : "Use token";
}

async function start() {
  $("ask-form").addEventListener("submit", onAsk);
  $("edit-form").addEventListener("submit", onEdit);
  $("trace-form").addEventListener("submit", onTrace);
  $("token-form").addEventListener("submit", onToken);
  $("journal-refresh").addEventListener("click", refreshJournal);
  // `lmscalpel serve` prints a link ending in #token=...: keep the token for this tab, drop it
  // from the address bar
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem(TOKEN_KEY, fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
  if (token()) $("token-save").textContent = "Token set";
  const health = await refreshHealth();
  loadMethods(health);
  await refreshJournal();
  document.body.dataset.ready = "true";
}

start();
