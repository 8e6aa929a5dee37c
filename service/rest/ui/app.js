// ProtoNMF explanation viewer: plain JS, no dependencies, talks only to this service.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
// Builds nodes; "text" and string children always land as text, never as markup: class names
// come from user checkpoints (tests/test_xss.py). No innerHTML anywhere in this file.
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v; // CSSOM: allowed by the CSP, an attribute is not
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};
const fmt = (x, d = 3) => (x === null || x === undefined || !isFinite(x) ? "—" : Number(x).toFixed(d));
const signed = (x, d = 3) => (x === null || x === undefined ? "—" : (x >= 0 ? "+" : "") + Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%");

// The service's own endpoints, relative to the page: /ui/ → ../explain etc.
const BASE = new URL("..", document.baseURI);
const SAMPLES = ["bag", "sneaker", "trouser", "coat", "ankle_boot", "dress"];

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    const m = /\[([A-Za-z0-9_.-]+)\]\s*$/.exec(message);
    this.status = status;
    this.reason = m ? m[1] : null;
  }
}

async function api(path, body, as = "json") {
  let r;
  try {
    r = await fetch(new URL(path, BASE), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body ?? {}),
    });
  } catch (e) {
    throw new ApiError(0, `the service did not answer (${e.message}) [unreachable]`);
  }
  if (!r.ok) {
    const text = await r.text();
    let message = text;
    try {
      let j = JSON.parse(text);
      if (Array.isArray(j) && j.length === 1) j = j[0]; // BentoML: [{"error": "… [reason]"}]
      message = j.error ?? j.detail ?? j.message ?? text;
      if (typeof message !== "string") message = JSON.stringify(message);
    } catch (_) { /* not JSON: the text as it is */ }
    throw new ApiError(r.status, message || `HTTP ${r.status}`);
  }
  return as === "blob" ? r.blob() : r.json();
}

function showError(e, what) {
  const box = $("#error");
  box.replaceChildren();
  if (!e) { box.hidden = true; return; }
  const reason = e.reason ? el("span", { class: "reason", text: e.reason }) : null;
  box.append(`${what} failed${e.status ? ` (HTTP ${e.status})` : ""}: `);
  if (reason) box.append(reason, " — ");
  box.append(e.message);
  box.hidden = false;
  if (!(e instanceof ApiError)) console.error(e);
}

function status(text) { $("#status").textContent = text; }

// --- state -------------------------------------------------------------------------------

const state = {
  model: null,
  image: null,        // {b64, name, bitmap}
  explanation: null,  // /explain's first explanation
  topK: 3,
  mapKind: "similarity",
  off: new Map(),     // "class\u0000prototype" → {class, prototype}
  cfSeq: 0,
  strips: new Map(),  // "kind|class|prototype" → Promise<object URL | ApiError>
};

// --- model ---------------------------------------------------------------------------------

async function loadModel() {
  const m = await api("model", {});
  state.model = m;
  const maps = m.heatmap_classes;
  $("#model-info").textContent =
    `${m.backbone ?? "model"} · ${m.classes.length} classes · p = ${m.p} prototypes per class · ` +
    `graph: scores ${m.scores}, maps ${m.maps}${maps ? ` (${maps === m.classes.length ? "all" : maps} classes)` : ""} · ` +
    `${m.provider}${m.variant && m.variant !== "fp32" ? " " + m.variant : ""} · ` +
    `artifact v${m.artifact.format_version}, ${m.artifact.created ?? ""}`;
  const kinds = m.map_kinds ?? ["similarity"];
  const select = $("#map-kind");
  select.replaceChildren(...kinds.map((k) => el("option", { value: k, text: k })));
  state.mapKind = kinds.includes("contribution") ? "contribution" : kinds[0];
  select.value = state.mapKind;
  select.disabled = !maps;
  const topK = $("#top-k");
  const max = maps ? Math.min(maps, m.classes.length) : Math.min(m.classes.length, 10);
  topK.max = String(max);
  state.topK = Math.min(3, max);
  topK.value = String(state.topK);
  fillAtlasList("");
  const kindsSel = $("#atlas-kind");
  const exKinds = m.exemplars?.kinds ?? [];
  kindsSel.replaceChildren(...exKinds.map((k) => el("option", { value: k, text: k })));
  kindsSel.disabled = !exKinds.length;
}

// --- image input -----------------------------------------------------------------------------

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function useImage(blob, name) {
  showError(null);
  const b64 = toBase64(await blob.arrayBuffer());
  let bitmap = null;
  try { bitmap = await createImageBitmap(blob); } catch (_) { /* the service says why */ }
  state.image = { b64, name, bitmap };
  state.off.clear();
  $("#run").disabled = false;
  await explain();
}

/** The model's crop geometry (artifact Preprocessing), for drawing the image as it saw it. */
function drawCrop(canvas, bitmap) {
  const spec = state.model.preprocessing;
  const ctx = canvas.getContext("2d");
  canvas.width = spec.width; canvas.height = spec.height;
  ctx.fillStyle = "#000";
  if (spec.crop_mode === "border") {
    const m = spec.mean.map((v) => Math.round(255 * v));
    ctx.fillStyle = m.length === 1 ? `rgb(${m[0]},${m[0]},${m[0]})` : `rgb(${m.join(",")})`;
  }
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!bitmap) return;
  const w = bitmap.width, h = bitmap.height;
  const [th, tw] = spec.resize_hw ?? [spec.resize, spec.resize];
  let nw, nh;
  const mode = spec.crop_mode ?? "center";
  if (mode === "squash") { nw = tw; nh = th; }
  else if (mode === "center" && !spec.resize_hw) {
    const short = Math.min(w, h), long = Math.max(w, h);
    const l = Math.floor((spec.resize * long) / short);
    [nw, nh] = w <= h ? [spec.resize, l] : [l, spec.resize];
    if (spec.height !== spec.width) { nw = Math.max(spec.width, nw); nh = Math.max(spec.height, nh); }
  } else {
    const r = mode === "border" ? Math.max(h / th, w / tw) : Math.min(h / th, w / tw);
    nw = Math.round(w / r); nh = Math.round(h / r);
  }
  const off = (side, crop) => (crop > side ? -Math.floor((crop - side) / 2) : Math.round((side - crop) / 2));
  ctx.imageSmoothingEnabled = true;
  ctx.filter = spec.color_mode === "L" ? "grayscale(1)" : "none";
  ctx.drawImage(bitmap, -off(nw, spec.width), -off(nh, spec.height), nw, nh);
  ctx.filter = "none";
}

// --- explanation ---------------------------------------------------------------------------

async function explain() {
  if (!state.image) return;
  const m = state.model;
  const heatmaps = m.heatmap_classes > 0;
  state.topK = Math.max(1, Math.min(Number($("#top-k").value) || 1, Number($("#top-k").max)));
  $("#top-k").value = String(state.topK);
  state.mapKind = $("#map-kind").value;
  const body = { images_base64: [state.image.b64], top_k: state.topK, heatmaps };
  if (heatmaps) body.map_kind = state.mapKind;
  status(`Explaining ${state.image.name}…`);
  $("#result").dataset.state = "loading";
  const t0 = performance.now();
  try {
    const r = await api("explain", body);
    state.explanation = r.explanations[0];
    state.off.clear();
    render();
    status(`${state.image.name}: explained in ${Math.round(performance.now() - t0)} ms (${r.provider}).`);
    $("#result").dataset.state = "explained";
  } catch (e) {
    $("#result").dataset.state = "error";
    status("");
    showError(e, "Explain");
  }
}

function render() {
  const ex = state.explanation;
  $("#result").hidden = false;
  drawCrop($("#input-canvas"), state.image.bitmap);
  $("#input-caption").textContent = `${state.image.name} as the model sees it`;
  $("#topk tbody").replaceChildren(...ex.top_k.map((c) => el("tr", { "data-class": c.class },
    el("th", { scope: "row", text: c.class }),
    el("td", {}, el("span", { class: "prob", style: `width:${Math.round(60 * c.probability)}px` }), pct(c.probability)),
    el("td", { text: fmt(c.logit) }))));
  // one bar scale for the whole explanation
  let scale = 1e-12;
  for (const c of ex.top_k) for (const p of c.prototypes) {
    scale = Math.max(scale, Math.abs(p.contribution), Math.abs(p.nmf_contribution ?? 0));
  }
  $("#classes").replaceChildren(...ex.top_k.map((c, rank) => classCard(c, rank, scale)));
  renderCounterfactual(null);
}

function classCard(c, rank, scale) {
  const share = c.residual_share;
  const card = el("article", { class: "class-card", "data-class": c.class, "aria-labelledby": `class-${rank}` },
    el("header", {},
      el("h3", { id: `class-${rank}`, text: `#${rank + 1} ${c.class}${c.description ? " — " + c.description : ""}` }),
      el("span", { text: `p = ${pct(c.probability)}` }),
      el("span", { text: `logit ${fmt(c.logit)} = Σ contributions + bias ${fmt(c.bias)}` }),
      el("span", { text: share ? `residual share of the logit ${pct(share.logit)}, of the margin over ${share.versus} ${pct(share.margin)}` : "residual split not available" })));
  // one colour scale for the class's maps
  let vmax = 1e-12;
  for (const p of c.prototypes) if (p.heatmap) for (const row of p.heatmap.values) for (const v of row) vmax = Math.max(vmax, Math.abs(v));
  for (const p of c.prototypes) card.append(protoRow(c, p, scale, vmax));
  return card;
}

function contributionBar(p, scale) {
  const x = (v) => 50 + (50 * v) / scale; // percent from the left, 50 = zero
  const seg = (cls, a, b) => el("div", { class: `seg ${cls}`, style: `left:${Math.min(x(a), x(b))}%;width:${Math.abs(x(b) - x(a))}%` });
  const bar = el("div", { class: "bar", role: "img" }, el("div", { class: "axis" }));
  let label;
  if (p.nmf_contribution === null || p.nmf_contribution === undefined) {
    bar.append(seg("nmf", 0, p.contribution));
    label = `contribution ${signed(p.contribution)} (no residual split for this graph)`;
  } else {
    bar.append(seg("nmf", 0, p.nmf_contribution), seg("res", p.nmf_contribution, p.nmf_contribution + p.residual_contribution));
    label = `contribution ${signed(p.contribution)} = NMF ${signed(p.nmf_contribution)} + residual ${signed(p.residual_contribution)}`;
  }
  bar.setAttribute("aria-label", label);
  return [bar, el("div", { class: "bar-text", text: label })];
}

function mapCanvas(c, p, vmax) {
  const canvas = el("canvas", { class: "map", role: "img", "aria-label": `${p.heatmap.kind} map of prototype ${p.prototype} for ${c.class}, peak at row ${p.heatmap.peak.row}, column ${p.heatmap.peak.col}` });
  const spec = state.model.preprocessing;
  canvas.width = spec.width * Math.max(1, Math.ceil(104 / spec.width));
  canvas.height = spec.height * Math.max(1, Math.ceil(104 / spec.height));
  const ctx = canvas.getContext("2d");
  ctx.drawImage($("#input-canvas"), 0, 0, canvas.width, canvas.height);
  const [H, W] = p.heatmap.shape;
  const small = document.createElement("canvas");
  small.width = W; small.height = H;
  const img = small.getContext("2d").createImageData(W, H);
  p.heatmap.values.forEach((row, i) => row.forEach((v, j) => {
    const k = 4 * (i * W + j);
    const [r, g, b] = v >= 0 ? [198, 40, 40] : [21, 101, 192];
    img.data[k] = r; img.data[k + 1] = g; img.data[k + 2] = b;
    img.data[k + 3] = Math.round(210 * Math.min(1, Math.abs(v) / vmax));
  }));
  small.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  return canvas;
}

function protoRow(c, p, scale, vmax) {
  const key = `${c.class}\u0000${p.prototype}`;
  const id = `off-${c.index}-${p.prototype}`;
  const box = el("input", { type: "checkbox", id, "data-class": c.class, "data-prototype": String(p.prototype) });
  box.checked = state.off.has(key);
  const row = el("div", { class: "proto-row" + (box.checked ? " off" : ""), "data-class": c.class, "data-prototype": String(p.prototype) },
    el("div", { class: "proto-name" },
      el("strong", { text: `prototype ${p.prototype}` }),
      el("div", { text: `a = ${signed(p.coefficient)}` }),
      el("div", { text: `score ${fmt(p.score, 2)}` }),
      el("label", { for: id }, box, ` off`)),
    el("div", {}, ...contributionBar(p, scale)),
    p.heatmap ? mapCanvas(c, p, vmax) : el("div", { class: "strip" }, el("span", { class: "none", text: "no map" })),
    strip(c.class, p.prototype, "augmented"));
  box.setAttribute("aria-label", `switch off prototype ${p.prototype} of ${c.class}`);
  box.addEventListener("change", () => {
    if (box.checked) state.off.set(key, { class: c.class, prototype: p.prototype });
    else state.off.delete(key);
    row.classList.toggle("off", box.checked);
    counterfactual();
  });
  return row;
}

// --- exemplar strips (PNG from /prototype_image, shown as blob: URLs) ---------------------------

let stripQueue = Promise.resolve();
function stripUrl(cls, prototype, kind) {
  const key = `${kind}|${cls}|${prototype}`;
  if (!state.strips.has(key)) {
    // one at a time: the server renders them in its pool; the page stays responsive
    const p = stripQueue.then(() => api("prototype_image", { class: cls, prototype, kind }, "blob"))
      .then((b) => URL.createObjectURL(b), (e) => e);
    stripQueue = p.then(() => undefined);
    state.strips.set(key, p);
  }
  return state.strips.get(key);
}

function strip(cls, prototype, kind) {
  const box = el("div", { class: "strip", "data-kind": kind });
  if (!state.model.exemplars || !kind) {
    box.append(el("span", { class: "none", text: "no exemplars in this artifact" }));
    return box;
  }
  box.append(el("span", { class: "none", text: "loading exemplars…" }));
  stripUrl(cls, prototype, kind).then((url) => {
    if (url instanceof Error) {
      box.replaceChildren(el("span", { class: "none", text: `no exemplar strip: ${url.message}` }));
    } else {
      box.replaceChildren(el("img", { src: url, alt: `${kind} exemplars of ${cls} prototype ${prototype}, best first, with their presence maps` }));
    }
  });
  return box;
}

// --- counterfactual (the /explain intervention API) ---------------------------------------------

async function counterfactual() {
  const seq = ++state.cfSeq;
  const interventions = [...state.off.values()];
  if (!interventions.length) { renderCounterfactual(null); return; }
  status("Switching prototypes off…");
  $("#counterfactual").dataset.state = "loading";
  try {
    const r = await api("explain", { images_base64: [state.image.b64], top_k: state.topK, heatmaps: false, interventions });
    if (seq !== state.cfSeq) return; // a newer toggle won
    renderCounterfactual(r.explanations[0].intervention, interventions);
    status("");
  } catch (e) {
    if (seq !== state.cfSeq) return;
    $("#counterfactual").dataset.state = "error";
    showError(e, "Intervention");
    status("");
  }
}

function renderCounterfactual(cf, interventions) {
  const box = $("#counterfactual");
  if (!cf) { box.hidden = true; delete box.dataset.state; delete box.dataset.interventions; return; }
  showError(null);
  const before = Object.fromEntries(state.explanation.top_k.map((c) => [c.class, c.logit]));
  $("#cf-off").textContent = "Off: " + cf.switched_off.map((o) => `${o.class} #${o.prototype}`).join(", ");
  $("#cf-logits tbody").replaceChildren(...Object.entries(cf.logits).map(([cls, v]) => el("tr", { "data-class": cls, "data-logit": String(v) },
    el("th", { scope: "row", text: cls }), el("td", { text: fmt(before[cls]) }), el("td", { text: fmt(v) }))));
  $("#cf-topk tbody").replaceChildren(...cf.top_k.map((c) => el("tr", { "data-class": c.class, "data-logit": String(c.logit) },
    el("th", { scope: "row", text: c.class }),
    el("td", {}, el("span", { class: "prob", style: `width:${Math.round(60 * c.probability)}px` }), pct(c.probability)),
    el("td", { text: fmt(c.logit) }))));
  const changed = $("#cf-changed");
  changed.className = cf.prediction_changed ? "changed" : "";
  changed.textContent = cf.prediction_changed
    ? `The prediction changes: ${cf.prediction_before} → ${cf.prediction_after}.`
    : `The prediction stays ${cf.prediction_after}.`;
  box.hidden = false;
  box.dataset.interventions = JSON.stringify(interventions);
  box.dataset.state = "ready";
}

// --- atlas -----------------------------------------------------------------------------------

function fillAtlasList(filter) {
  const q = filter.trim().toLowerCase();
  const sel = $("#atlas-class");
  const keep = sel.value;
  const opts = [];
  state.model.classes.forEach((name, i) => {
    if (!q || name.toLowerCase().includes(q) || String(i) === q) {
      opts.push(el("option", { value: String(i), text: `${i} · ${name}` }));
    }
  });
  sel.replaceChildren(...opts);
  if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

let atlasTimer = 0, atlasSeq = 0;
function atlasShowSoon() { clearTimeout(atlasTimer); atlasTimer = setTimeout(atlasShow, 120); }

async function atlasShow() {
  const sel = $("#atlas-class");
  if (sel.selectedIndex < 0) return;
  const index = Number(sel.value);
  const seq = ++atlasSeq;
  const detail = $("#atlas-detail");
  detail.dataset.state = "loading";
  try {
    const r = await api("prototypes", { classes: [index] });
    if (seq !== atlasSeq) return;
    const c = r.classes[0];
    const kind = $("#atlas-kind").value;
    const es = c.explained_share ?? {};
    detail.replaceChildren(
      el("h2", { text: `${c.index} · ${c.class}` }),
      el("p", { class: "meta", text: `fold: ${c.fold ?? "—"} · explained: ${c.explained} · ` +
        `NMF share of the class vector: energy ${pct(es.energy)}, norm ratio ${fmt(es.norm_ratio)}` }),
      ...c.prototypes.map((p) => {
        const n = (p.exemplars?.[kind] ?? []).length;
        return el("div", { class: "atlas-proto", "data-prototype": String(p.prototype) },
          el("h3", { text: `prototype ${p.prototype}` }),
          el("div", { class: "meta", text: `coefficient a = ${signed(p.coefficient)} · fold weight ${fmt(p.fold_weight)} · ${n} ${kind || ""} exemplars` }),
          n ? strip(c.class, p.prototype, kind) : el("div", { class: "strip" }, el("span", { class: "none", text: "no exemplars for this prototype" })));
      }));
    detail.dataset.state = "ready";
    detail.dataset.class = c.class;
  } catch (e) {
    if (seq !== atlasSeq) return;
    detail.dataset.state = "error";
    showError(e, "Atlas");
  }
}

function atlasStep(d) {
  const sel = $("#atlas-class");
  const i = Math.max(0, Math.min(sel.options.length - 1, sel.selectedIndex + d));
  if (sel.options.length) { sel.selectedIndex = i; atlasShowSoon(); }
}

// --- tabs -------------------------------------------------------------------------------------

function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $("#" + t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
  if (tab.id === "tab-atlas" && !$("#atlas-detail").dataset.state) {
    const sel = $("#atlas-class");
    if (sel.selectedIndex < 0 && sel.options.length) sel.selectedIndex = 0;
    atlasShow();
  }
}

// --- wiring -----------------------------------------------------------------------------------

function wire() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((t, i) => {
    t.addEventListener("click", () => selectTab(t));
    t.addEventListener("keydown", (e) => {
      const d = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (d) { e.preventDefault(); selectTab(tabs[(i + d + tabs.length) % tabs.length]); }
    });
  });
  $("#file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    if (f) useImage(f, f.name);
  });
  const drop = $("#drop");
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const f = e.dataTransfer.files[0];
    if (f) useImage(f, f.name);
  });
  // a file dropped beside the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("#samples").replaceChildren(...SAMPLES.map((name) => {
    const b = el("button", { type: "button", "data-sample": name, "aria-label": `sample: ${name.replace("_", " ")}` },
      el("img", { src: `samples/${name}.png`, alt: "" }), name.replace("_", " "));
    b.addEventListener("click", async () => {
      try {
        const r = await fetch(`samples/${name}.png`);
        await useImage(await r.blob(), `${name}.png`);
      } catch (e) { showError(e, "Sample"); }
    });
    return b;
  }));
  $("#input-form").addEventListener("submit", (e) => { e.preventDefault(); explain(); });
  $("#map-kind").addEventListener("change", explain);
  $("#reset-off").addEventListener("click", () => {
    state.off.clear();
    for (const b of document.querySelectorAll(".proto-row input[type=checkbox]")) b.checked = false;
    for (const r of document.querySelectorAll(".proto-row.off")) r.classList.remove("off");
    counterfactual();
  });
  $("#atlas-filter").addEventListener("input", (e) => fillAtlasList(e.target.value));
  $("#atlas-filter").addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === "ArrowDown") {
      e.preventDefault();
      const sel = $("#atlas-class");
      if (sel.options.length) { sel.selectedIndex = Math.max(0, sel.selectedIndex); sel.focus(); atlasShowSoon(); }
    }
  });
  $("#atlas-class").addEventListener("change", atlasShowSoon);
  $("#atlas-kind").addEventListener("change", atlasShow);
  $("#atlas-prev").addEventListener("click", () => atlasStep(-1));
  $("#atlas-next").addEventListener("click", () => atlasStep(1));
}

async function main() {
  wire();
  try {
    await loadModel();
    document.body.dataset.ready = "true";
  } catch (e) {
    $("#model-info").textContent = "The model could not be loaded.";
    showError(e, "Loading the model");
    document.body.dataset.ready = "error";
  }
}

main();
