// framepack-celery browser UI: submit, watch the preview come alive, get the video.
// No build step: one ES module. Parameter fields come from the OpenAPI document (the server's
// one schema), live state from the WebSocket streams described in docs/protocol.md.

const $ = (sel) => document.querySelector(sel);
const MAIN_FIELDS = ["prompt", "n_prompt", "total_second_length", "model", "seed"];
const TEXTAREAS = new Set(["prompt", "n_prompt"]);

// ---------------------------------------------------------------------------------------------
// API tokens: when the server answers 401, the page asks for a token and keeps it for this
// tab's session (sessionStorage). fetch() sends it as a Bearer header; WebSocket, <video> and
// <img> URLs cannot carry a header, so they get a short-lived read-only ticket (?access=)
// from POST /api/access, renewed at half its lifetime.
const TOKEN_KEY = "framepack-token";
let token = sessionStorage.getItem(TOKEN_KEY);
let access = null;
let accessTimer = null;

function authHeaders(headers = {}) {
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (resp.status === 401 && token) { forgetToken(); location.reload(); }
  return resp;
}

function withAccess(url) {
  if (!access || !url) return url;
  return `${url}${url.includes("?") ? "&" : "?"}access=${encodeURIComponent(access)}`;
}

async function refreshAccess() {
  clearTimeout(accessTimer);
  if (!token) { access = null; return; }
  const resp = await api("/api/access", { method: "POST" });
  if (!resp.ok) return;
  const body = await resp.json();
  access = body.access;
  if (body.ttl) accessTimer = setTimeout(refreshAccess, (body.ttl * 1000) / 2);
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  access = null;
}

function askToken(message) {
  // Shows the token form; resolves with what the user typed.
  $("#token-view").hidden = false;
  $("#app").hidden = true;
  $("#token-error").textContent = message || "";
  const input = $("#token-input");
  input.value = "";
  input.setAttribute("aria-invalid", message ? "true" : "false");
  input.focus();
  return new Promise((resolve) => {
    $("#token-form").onsubmit = (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (value) resolve(value);
    };
  });
}

async function signIn() {
  // Until /api/info answers: an open server answers at once; one with tokens after a good one.
  let message = "";
  for (;;) {
    const resp = await fetch("/api/info", { headers: authHeaders() });
    if (resp.ok) {
      $("#token-view").hidden = true;
      $("#app").hidden = false;
      return resp.json();
    }
    if (resp.status !== 401) throw new Error(`/api/info: HTTP ${resp.status}`);
    if (token) message = "That token was refused. Check it and try again.";
    forgetToken();
    token = await askToken(message);
    sessionStorage.setItem(TOKEN_KEY, token);
  }
}

// ---------------------------------------------------------------------------------------------
// Reconnecting WebSocket with exponential back-off
class Stream {
  constructor(path, { onMessage, onState, done = () => false }) {
    this.path = path;
    this.onMessage = onMessage;
    this.onState = onState || (() => {});
    this.done = done;
    this.delay = 500;
    this.stopped = false;
    this.open();
  }
  open() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    this.ws = new WebSocket(`${proto}//${location.host}${withAccess(this.path)}`);
    this.ws.onopen = () => { this.delay = 500; this.onState("live"); };
    this.ws.onmessage = (e) => this.onMessage(JSON.parse(e.data));
    this.ws.onclose = (e) => {
      if (this.stopped || this.done() || e.code === 4404) { this.onState(e.code === 4404 ? "unknown" : "closed"); return; }
      // 1013: the server is at its watcher capacity; wait as long as it asks (plus jitter, so
      // a refused crowd does not come back at once), not the short back-off of a lost socket
      const busy = e.code === 1013;
      const wait = busy ? 5000 + Math.random() * 5000 : this.delay;
      this.onState(`${busy ? "server busy: " : ""}reconnecting in ${(wait / 1000).toFixed(1)} s`);
      this.timer = setTimeout(() => this.open(), wait);
      if (!busy) this.delay = Math.min(this.delay * 2, 10000);
    };
  }
  close() { this.stopped = true; clearTimeout(this.timer); if (this.ws) this.ws.close(); }
}

// ---------------------------------------------------------------------------------------------
// Submit form, generated from the OpenAPI schema
let schema = null;
let defaultResolution = null; // the workers' profile's bucket base (/api/info)

function fieldSchema(prop) {
  // Optional fields come as anyOf [{type...}, {type: null}]
  const base = prop.anyOf ? prop.anyOf.find((p) => p.type !== "null") || {} : prop;
  return { ...base, ...prop, type: base.type || prop.type, $ref: base.$ref || prop.$ref };
}

function resolveEnum(spec, components) {
  if (spec.enum) return spec.enum;
  if (spec.$ref) return (components[spec.$ref.split("/").pop()] || {}).enum || null;
  return null;
}

function renderField(name, prop, components) {
  const spec = fieldSchema(prop);
  const wrap = document.createElement("div");
  wrap.className = "field";
  wrap.dataset.field = name;
  const id = `f-${name}`;
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = spec.title || name;
  const range = spec.minimum !== undefined ? ` ${spec.minimum}–${spec.maximum}` : "";
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.textContent = ` ${spec.description || ""}${range ? ` (${range.trim()})` : ""}`;
  label.append(hint);
  let input;
  const options = resolveEnum(spec, components);
  if (options) {
    input = document.createElement("select");
    for (const v of options) input.append(new Option(v, v, false, v === spec.default));
  } else if (spec.type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = !!spec.default;
    wrap.classList.add("check");
  } else if (TEXTAREAS.has(name)) {
    input = document.createElement("textarea");
    input.rows = name === "prompt" ? 3 : 2;
  } else {
    input = document.createElement("input");
    if (spec.type === "integer" || spec.type === "number") {
      input.type = "number";
      input.step = spec.type === "integer" ? "1" : "any";
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      input.inputMode = spec.type === "integer" ? "numeric" : "decimal";
    } else {
      input.type = "text";
    }
    if (spec.default !== undefined && spec.default !== null) input.value = spec.default;
    else input.placeholder = name === "seed" ? "random"
      : name === "resolution" ? (defaultResolution ? `server default: ${defaultResolution}` : "server default") : "";
  }
  input.id = id;
  input.name = name;
  const err = document.createElement("p");
  err.className = "field-error";
  err.id = `error-${name}`;
  err.setAttribute("aria-live", "polite");
  input.setAttribute("aria-describedby", err.id);
  if (spec.type === "boolean") {
    const row = document.createElement("div");
    row.className = "check";
    row.append(input, label);
    wrap.append(row, err);
  } else {
    wrap.append(label, input, err);
  }
  return wrap;
}

async function buildForm() {
  const doc = await (await api("/api/openapi.json")).json();
  const components = doc.components.schemas;
  schema = components.JobParams;
  const main = $("#main-fields");
  const adv = $("#advanced-fields");
  for (const [name, prop] of Object.entries(schema.properties)) {
    // timestamped prompts are written in the prompt ("[2s: he jumps]"); LoRAs get a picker
    if (name === "end_image" || name === "prompts" || name === "loras") continue;
    (MAIN_FIELDS.includes(name) ? main : adv).append(renderField(name, prop, components));
  }
  await buildLoraPicker(main);
  setupSchedulePreview();
  const model = $("#f-model");
  const syncEnd = () => { $("#end-image-field").hidden = model.value !== "framepack"; };
  model.addEventListener("change", syncEnd);
  syncEnd();
}

// Timestamped prompts ("[0s: a cat sits] [2s: it jumps]"): what each part of the video will show
const STAMP = /\[\s*(\d+(?:\.\d+)?)\s*s(?:\s*-\s*(\d+(?:\.\d+)?)\s*s)?\s*:\s*([^\]]*)\]/g;

function setupSchedulePreview() {
  const prompt = $("#f-prompt");
  const list = document.createElement("ul");
  list.id = "prompt-schedule";
  list.className = "schedule";
  list.setAttribute("aria-live", "polite");
  prompt.after(list);
  const update = () => {
    list.innerHTML = "";
    const parts = [...prompt.value.matchAll(STAMP)].sort((a, b) => Number(a[1]) - Number(b[1]));
    for (const [, start, end, text] of parts) {
      const li = document.createElement("li");
      li.textContent = `${end ? `${start}–${end} s` : `from ${start} s`}: ${text.trim() || "(empty)"}`;
      list.append(li);
    }
  };
  prompt.addEventListener("input", update);
  update();
}

// LoRA picker: rows of (file, weight) from GET /api/loras; sent as loras=NAME:WEIGHT.  Files the
// server cannot use (unreadable) are listed, disabled, with the reason.
let loraNames = [];
let loraEntries = [];

async function buildLoraPicker(container) {
  try { loraEntries = (await (await api("/api/loras")).json()).loras; } catch { loraEntries = []; }
  loraNames = loraEntries.filter((l) => !String(l.format).startsWith("unreadable")).map((l) => l.name);
  const wrap = document.createElement("div");
  wrap.className = "field";
  wrap.dataset.field = "loras";
  wrap.innerHTML = `<label>LoRAs <span class="hint"></span></label><div id="lora-rows"></div>
    <button type="button" id="add-lora">Add LoRA</button><p class="field-error" id="error-loras" aria-live="polite"></p>`;
  const unusable = loraEntries.length - loraNames.length;
  wrap.querySelector(".hint").textContent = (loraNames.length ? ` ${loraNames.length} available` : " none usable in the LoRA directory")
    + (unusable ? ` (${unusable} unreadable)` : "");
  const add = wrap.querySelector("#add-lora");
  add.disabled = !loraNames.length;
  add.addEventListener("click", () => addLoraRow(wrap.querySelector("#lora-rows")));
  container.append(wrap);
}

function addLoraRow(rows) {
  const i = rows.children.length;
  const row = document.createElement("div");
  row.className = "lora-row";
  const select = document.createElement("select");
  select.id = `f-loras.${i}.name`;
  select.setAttribute("aria-label", `LoRA ${i + 1}`);
  for (const l of loraEntries) {
    const usable = loraNames.includes(l.name);
    const option = new Option(usable ? l.name : `${l.name} — ${l.format}`, l.name);
    option.disabled = !usable;
    select.append(option);
  }
  const weight = document.createElement("input");
  Object.assign(weight, { type: "number", step: "0.05", min: "-4", max: "4", value: "1" });
  weight.id = `f-loras.${i}.weight`;
  weight.setAttribute("aria-label", `LoRA ${i + 1} weight`);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => row.remove());
  row.append(select, weight, remove);
  rows.append(row);
}

function setupImagePicker() {
  const input = $("#image");
  const zone = $("#drop-zone");
  const thumb = $("#image-thumb");
  const show = (files) => {
    if (!files.length) return;
    thumb.src = URL.createObjectURL(files[0]);
    thumb.hidden = false;
    $("#image-hint").textContent = files.length > 1
      ? `${files.length} images: one job each, as a batch — drop or press Enter to replace`
      : `${files[0].name} — drop or press Enter to replace`;
  };
  input.addEventListener("change", () => show(input.files));
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) {
      const dt = new DataTransfer();
      for (const file of e.dataTransfer.files) dt.items.add(file);
      input.files = dt.files;
      show(input.files);
    }
  });
}

function clearErrors() {
  for (const el of document.querySelectorAll(".field-error")) el.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showErrors(body) {
  const errors = body.errors && body.errors.length ? body.errors : [{ field: body.field || "body", message: body.error }];
  let first = null;
  for (const { field, message } of errors) {
    const slot = $(`#error-${field}`) || $("#error-body");
    slot.textContent = message;
    const input = $(`#f-${field}`) || $(`#${field}`);
    if (input) { input.setAttribute("aria-invalid", "true"); first = first || input; }
    const details = slot.closest("details");
    if (details) details.open = true;
  }
  if (first) first.focus();
}

async function submit(e) {
  e.preventDefault();
  clearErrors();
  const form = new FormData();
  const images = [...$("#image").files];
  const batch = images.length > 1;
  for (const file of batch ? images : images.slice(0, 1)) form.append(batch ? "images" : "image", file);
  for (const row of document.querySelectorAll(".lora-row")) {
    form.append("loras", `${row.querySelector("select").value}:${row.querySelector("input").value || 1}`);
  }
  const model = $("#f-model").value;
  const end = $("#end_image").files[0];
  if (end && model === "framepack" && !batch) form.append("end_image", end);
  for (const name of Object.keys(schema.properties)) {
    const input = $(`#f-${name}`);
    if (!input) continue;
    if (input.type === "checkbox") form.append(name, input.checked ? "true" : "false");
    else if (input.value !== "") form.append(name, input.value);
  }
  const btn = $("#submit-btn");
  btn.disabled = true;
  try {
    const resp = await api(batch ? "/api/batches" : "/api/jobs", { method: "POST", body: form });
    const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}`, field: "body" }));
    if (resp.status !== 202) { showErrors(body); return; }
    navigate(batch ? `/batches/${body.id}` : `/jobs/${body.id}`);
  } catch (err) {
    showErrors({ error: String(err), field: "body" });
  } finally {
    btn.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Job view
let jobStream = null;
let animation = null;

class PreviewPlayer {
  // Plays the section's latent frames (tiles of one strip) as a short loop on a canvas.
  constructor(canvas) { this.canvas = canvas; this.ctx = canvas.getContext("2d"); this.img = null; this.frame = 0; this.timer = null; }
  show(preview) {
    const img = new Image();
    img.onload = () => {
      this.img = img;
      this.meta = preview;
      const scale = Math.max(1, Math.floor(256 / Math.max(preview.tile_width, preview.tile_height)));
      this.canvas.width = preview.tile_width * scale;
      this.canvas.height = preview.tile_height * scale;
      this.ctx.imageSmoothingEnabled = false;
      if (!this.timer) this.timer = setInterval(() => this.draw(), 1000 / 10);
      this.draw();
    };
    img.src = preview.image;
  }
  draw() {
    if (!this.img) return;
    const { frames, tile_width: w, tile_height: h } = this.meta;
    this.frame = (this.frame + 1) % frames;
    this.ctx.drawImage(this.img, this.frame * w, 0, w, h, 0, 0, this.canvas.width, this.canvas.height);
  }
  stop() { clearInterval(this.timer); this.timer = null; }
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

function renderJob(job) {
  const state = job.state;
  const el = $("#job-state");
  el.textContent = state + (job.stalled ? " (stalled)" : "") + (state === "queued" && job.position ? ` · #${job.position} in queue` : "");
  el.className = `state ${state}`;
  $("#job-stage").textContent = TERMINAL.has(state) ? "" : (job.stage || "") + (job.prompt ? ` — “${job.prompt}”` : "");
  const pct = Math.round(100 * (state === "succeeded" ? 1 : job.progress || 0));
  const bar = $("#job-progress");
  bar.setAttribute("aria-valuenow", String(pct));
  bar.firstElementChild.style.width = `${pct}%`;
  const parts = [];
  if (job.sections) parts.push(`section ${job.section}/${job.sections}`);
  if (job.steps) parts.push(`step ${job.step}/${job.steps}`);
  $("#job-progress-text").textContent = `${pct} %${parts.length ? " · " + parts.join(" · ") : ""}`;
  $("#job-eta").textContent = !TERMINAL.has(state) && job.eta ? `ETA ${fmtSeconds(job.eta)}` : "";
  const canvas = $("#preview-canvas");
  if (job.preview && canvas.dataset.image !== job.preview.image) {
    canvas.dataset.image = job.preview.image;
    canvas.dataset.previews = String(Number(canvas.dataset.previews || 0) + 1);
    animation.show(job.preview);
  }
  if (job.preview) {
    $("#preview-caption").textContent = TERMINAL.has(state)
      ? `The last preview: ${job.preview.frames} latent frames of the last section sampled`
      : `Live preview: ${job.preview.frames} latent frames of the current section, looping`;
  }
  const sections = job.sections_done || [];
  if (sections.length) {
    $("#partial").hidden = state === "succeeded";
    const last = sections[sections.length - 1];
    const video = $("#partial-video");
    if (video.dataset.url !== last.url) { video.dataset.url = last.url; video.src = withAccess(last.url); }
    $("#sections-list").innerHTML = "";
    for (const s of sections) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = withAccess(s.url);
      a.textContent = `after section ${s.section}: ${s.frames} frames, ${s.seconds.toFixed(2)} s`;
      li.append(a);
      $("#sections-list").append(li);
    }
  }
  $("#cancel-btn").hidden = TERMINAL.has(state);
  if (state === "succeeded" && job.result) {
    $("#final").hidden = false;
    const video = $("#final-video");
    if (video.dataset.url !== job.result.video_url) { video.dataset.url = job.result.video_url; video.src = withAccess(job.result.video_url); }
    $("#download-link").href = withAccess(job.result.video_url);
    const r = job.result;
    const meta = { seed: r.seed, frames: r.frames, seconds: r.seconds, size: `${r.width}×${r.height}`,
      profile: r.profile, "sampling time": fmtSeconds(r.timings && r.timings.sampling), "total time": fmtSeconds(r.timings && r.timings.total),
      "cache-skipped steps": r.cache_skipped_steps,
      LoRAs: (r.loras || []).map((l) => `${l.name} × ${l.weight} (${l.sha256.slice(0, 12)})`).join(", "),
      "resumed after section": r.resumed_from_section ?? "", extends: r.extends ? `${r.extends} (+${r.extended_sections} sections before)` : "" };
    $("#job-meta").innerHTML = "";
    for (const [k, v] of Object.entries(meta)) {
      if (v === undefined || v === "") continue;
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      $("#job-meta").append(dt, dd);
    }
  }
  const why = state === "failed" ? job.error || job.reason : state === "cancelled" ? job.reason || "cancelled" : null;
  $("#job-reason").hidden = !why;
  $("#job-reason").textContent = why ? `${state === "failed" ? "Failed" : "Ended"}: ${why}` : "";
  $("#job-reason").className = `reason ${state}`;
  if (TERMINAL.has(state)) animation.stop();
}

function openJob(id) {
  $("#submit-view").hidden = true;
  $("#job-view").hidden = false;
  $("#job-id").textContent = id;
  for (const sel of ["#partial", "#final", "#job-error", "#job-reason"]) $(sel).hidden = true;
  for (const sel of ["#job-preview", ".progress-wrap", "#job-status-line"]) $(sel).hidden = false;
  delete $("#preview-canvas").dataset.image;
  delete $("#preview-canvas").dataset.previews;
  $("#preview-caption").textContent = "The preview appears when sampling starts.";
  $("#job-meta").innerHTML = "";
  $("#sections-list").innerHTML = "";
  for (const v of ["#partial-video", "#final-video"]) { $(v).removeAttribute("src"); delete $(v).dataset.url; }
  if (animation) animation.stop();
  animation = new PreviewPlayer($("#preview-canvas"));
  let job = null;
  let finished = false;
  if (jobStream) jobStream.close();
  jobStream = new Stream(`/ws/jobs/${encodeURIComponent(id)}`, {
    done: () => finished,
    onState: (s) => {
      $("#job-connection").textContent = s === "live" || s === "closed" ? "" : s;
      if (s === "unknown") {  // nothing to watch, cancel or preview
        $("#job-error").hidden = false;
        $("#job-error").textContent = "Unknown job: it never existed, was deleted or expired, or belongs to someone else.";
        for (const sel of ["#cancel-btn", "#job-preview", ".progress-wrap", "#job-status-line"]) $(sel).hidden = true;
      }
    },
    onMessage: (m) => {
      if (m.type === "snapshot") job = { ...m.job };
      else job = { ...job, ...m, id };
      if (m.type === "final") finished = true;
      renderJob(job);
    },
  });
  $("#extend-form").onsubmit = async (e) => {
    e.preventDefault();
    $("#error-extend").textContent = "";
    const body = { seconds: Number($("#extend-seconds").value) };
    if ($("#extend-prompt").value.trim()) body.prompt = $("#extend-prompt").value;
    const resp = await api(`/api/jobs/${encodeURIComponent(id)}/extend`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const out = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
    if (resp.status !== 202) { $("#error-extend").textContent = out.error; return; }
    navigate(`/jobs/${out.id}`);
  };
  $("#cancel-btn").onclick = async () => {
    $("#cancel-btn").disabled = true;
    await api(`/api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    $("#cancel-btn").disabled = false;
  };
}

// ---------------------------------------------------------------------------------------------
// Queue (all jobs, live)
const queueJobs = new Map();
let historyTotal = 0; // jobs the server lists for this caller (GET /api/jobs total)

function jobRow(j) {
  // One job as a row (queue, history, batch): input thumbnail, state, short id, prompt, progress.
  const li = document.createElement("li");
  li.dataset.jobId = j.id;
  li.dataset.state = j.state;
  const a = document.createElement("a");
  a.href = `/jobs/${j.id}`;
  a.dataset.nav = "";
  const img = document.createElement("img");
  img.src = withAccess(`/api/jobs/${j.id}/input`);
  img.alt = "";
  img.loading = "lazy";
  const text = document.createElement("div");
  const where = j.state === "queued" && j.position ? ` · #${j.position}` : "";
  const pct = Math.round(100 * (j.state === "succeeded" ? 1 : j.progress || 0));
  text.innerHTML = `<div><span class="state ${j.state}"></span> <span class="id"></span></div><div class="line"></div>`
    + `<div class="mini"><div></div></div>`;
  text.querySelector(".state").textContent = `${j.state}${where}`;
  text.querySelector(".id").textContent = j.id.slice(0, 8);
  text.querySelector(".id").title = j.id;
  text.querySelector(".line").textContent = j.prompt || "(no prompt)";
  text.querySelector(".line").title = j.prompt || "";
  text.querySelector(".mini div").style.width = `${pct}%`;
  a.append(img, text);
  li.append(a);
  return li;
}

function renderQueue() {
  const ul = $("#queue");
  ul.innerHTML = "";
  const wanted = $("#queue-filter").value;
  const jobs = [...queueJobs.values()].sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
  for (const j of jobs) if (!wanted || j.state === wanted) ul.append(jobRow(j));
  $("#queue-more").hidden = queueJobs.size >= historyTotal;
}

async function loadHistory(offset) {
  // Older jobs, 50 at a time (the live feed's snapshot holds the newest 50).
  const resp = await api(`/api/jobs?offset=${offset}&limit=50`);
  if (!resp.ok) return;
  const page = await resp.json();
  historyTotal = page.total;
  for (const j of page.jobs) if (!queueJobs.has(j.id)) queueJobs.set(j.id, j);
  renderQueue();
}

async function refreshSummary(id) {
  const resp = await api(`/api/jobs/${encodeURIComponent(id)}`);
  if (!resp.ok) { queueJobs.delete(id); renderQueue(); return; }
  const j = await resp.json();
  queueJobs.set(id, { ...j, prompt: (j.params || {}).prompt || "" });
  renderQueue();
}

function watchQueue() {
  // Every feed event carries what changed: the job's row when the publisher has it, and the
  // queue position it left (every queued job behind it moves up one): no re-reading needed.
  new Stream("/ws/jobs", {
    onMessage: (m) => {
      if (m.type === "snapshot") {
        queueJobs.clear();
        for (const j of m.jobs) queueJobs.set(j.id, j);
        historyTotal = Math.max(historyTotal, m.jobs.length);
        renderQueue();
        loadHistory(0); // the total, for "Show older jobs"
        return;
      }
      if (m.event === "submitted") historyTotal += 1;
      if (m.left_position) {
        for (const j of queueJobs.values()) {
          if (j.state === "queued" && j.position > m.left_position && j.id !== m.job_id) j.position -= 1;
        }
      }
      if (m.event === "deleted") queueJobs.delete(m.job_id);
      else if (m.job) queueJobs.set(m.job_id, m.job);
      else if (queueJobs.has(m.job_id)) {
        const known = queueJobs.get(m.job_id);
        queueJobs.set(m.job_id, { ...known, state: m.state, position: null, progress: m.progress ?? known.progress,
                                  section: m.section ?? known.section, sections: m.sections ?? known.sections });
      } else refreshSummary(m.job_id); // started before this page saw it
      renderQueue();
    },
  });
}

// ---------------------------------------------------------------------------------------------
// Batch view: its jobs and their states, kept live by the all-jobs feed
let batchTimer = null;

async function openBatch(id) {
  $("#submit-view").hidden = true;
  $("#job-view").hidden = true;
  $("#batch-view").hidden = false;
  $("#batch-id").textContent = id;
  const render = async () => {
    const resp = await api(`/api/batches/${encodeURIComponent(id)}`);
    if (!resp.ok) { $("#batch-counts").textContent = "Unknown batch."; return; }
    const b = await resp.json();
    $("#batch-counts").textContent = Object.entries(b.counts).map(([k, v]) => `${v} ${k}`).join(" · ") + (b.done ? " — done" : "");
    const ul = $("#batch-jobs");
    ul.innerHTML = "";
    for (const j of b.jobs) ul.append(jobRow(j));
    for (const e of b.errors) {
      const li = document.createElement("li");
      li.className = "error";
      li.textContent = `entry ${e.index} refused: ${e.field ? e.field + ": " : ""}${e.message}`;
      ul.append(li);
    }
    $("#batch-cancel").hidden = b.done;
    if (b.done) { clearInterval(batchTimer); batchTimer = null; }
  };
  $("#batch-cancel").onclick = async () => { await api(`/api/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" }); render(); };
  clearInterval(batchTimer);
  batchTimer = setInterval(render, 2000);
  await render();
}

// ---------------------------------------------------------------------------------------------
// Routing: "/" is the form, "/jobs/<id>" a job, "/batches/<id>" a batch (shareable, survive reload)
function route() {
  $("#batch-view").hidden = true;
  clearInterval(batchTimer);
  const b = location.pathname.match(/^\/batches\/([^/]+)$/);
  if (b) { openBatch(decodeURIComponent(b[1])); return; }
  const m = location.pathname.match(/^\/jobs\/([^/]+)$/);
  if (m) { openJob(decodeURIComponent(m[1])); return; }
  if (jobStream) { jobStream.close(); jobStream = null; }
  if (animation) animation.stop();
  $("#job-view").hidden = true;
  $("#submit-view").hidden = false;
}

function navigate(path) {
  history.pushState({}, "", path);
  route();
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-nav]");
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);

function showProfile(info) {
  const names = info.profiles.length ? info.profiles.join(", ") : "no worker yet";
  $("#profile-badge").textContent = `model profile: ${names}`;
  $("#profile-badge").title = info.is_noise
    ? "Random weights: the videos are noise. To run the real model, start the server with FRAMEPACK_PROFILE=hf "
      + "after downloading the weights (README, “Model profiles”)."
    : `The workers run the ${names} profile.`;
  $("#noise-warning").hidden = !info.is_noise;
  const auth = info.auth || {};
  $("#who").hidden = !auth.required;
  $("#who-name").textContent = auth.required ? `${auth.name} (${auth.role})` : "";
}

async function main() {
  setupImagePicker();
  $("#submit-form").addEventListener("submit", submit);
  $("#sign-out").addEventListener("click", () => { forgetToken(); location.reload(); });
  const info = await signIn();
  defaultResolution = info.default_resolution;
  await refreshAccess();
  await buildForm();
  $("#queue-filter").addEventListener("change", renderQueue);
  $("#queue-more").addEventListener("click", () => loadHistory(queueJobs.size));
  showProfile(info);
  watchQueue();
  route();
  document.body.dataset.ready = "true";
}

main();
