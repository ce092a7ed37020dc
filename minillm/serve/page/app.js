// minillm inspector page: draws what minillm.inspector.views computed for one prompt and one run.
//
// Two modes, one code path: served by `python -m minillm.serve`, the page asks api/methods what the
// loaded models can run, posts the form to api/inspect and reads sources from api/source; written by
// `python -m minillm.inspector --html FILE`, the views and sources are embedded in
// <script id="minillm-data"> and the page steps through that recorded run with no server at all.
// Plain JavaScript, no library; heatmaps are drawn on canvas. Ids and data-* attributes are stable
// (tests/test_serve_page.py reads them).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { views: null, sources: {}, served: true, step: 0, timer: null, layer: 0, head: 0,
                headRows: [], sort: { key: null, dir: 1 } };

// ---------------------------------------------------------------- small helpers

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function fmt(x, digits = 4) {
  if (x == null) return "—";
  if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(1);
  return x.toFixed(digits);
}

const pct = (x) => (x == null ? "—" : (100 * x).toFixed(1) + "%");
const clip = (s, n) => (s.length > n ? s.slice(0, n - 1) + "…" : s);
const clamp = (x, lo, hi) => Math.max(lo, Math.min(hi, x));

function heat(x) {  // 0 -> white, 1 -> deep blue
  x = clamp(x || 0, 0, 1);
  return `rgb(${Math.round(255 - 215 * x)}, ${Math.round(255 - 160 * x)}, ${Math.round(255 - 75 * x)})`;
}

function surpriseColour(x) {  // 0 (expected) -> pale green, 1 (most surprising in the prompt) -> red
  x = clamp(x || 0, 0, 1);
  return `hsl(${Math.round(120 - 120 * x)}, 70%, ${Math.round(88 - 18 * x)}%)`;
}

function bar(p) {
  return el("span", { class: "bar", style: `width:${Math.round(60 * clamp(p || 0, 0, 1))}px` });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  document.body.dataset.state = "error";
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

function showTooltip(ev, text) {
  const tip = $("tooltip");
  tip.textContent = text;
  tip.style.whiteSpace = "pre";
  tip.style.left = ev.clientX + 14 + "px";
  tip.style.top = ev.clientY + 14 + "px";
  tip.hidden = false;
}

const hideTooltip = () => { $("tooltip").hidden = true; };

async function fetchJSON(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new Error(body && body.error ? body.error.message : `${r.status} ${r.statusText}`);
  return body;
}

// ---------------------------------------------------------------- start: served or static

function init() {
  wireControls();
  const embedded = $("minillm-data");
  if (embedded) startStatic(JSON.parse(embedded.textContent));
  else startServed();
}

function startStatic(data) {
  state.served = false;
  state.sources = data.sources || {};
  const i = data.views.info;
  $("mode").textContent = "static page: one recorded run (python -m minillm.inspector --html)";
  $("model-info").textContent = `${i.model_path || "model"}: ${modelText(i)}; prompt ${JSON.stringify(i.prompt || "")}`;
  render(data.views);
}

async function startServed() {
  $("run-form").hidden = false;
  $("mode").textContent = "served";
  try {
    showMethods(await fetchJSON("api/methods"));
  } catch (e) {
    showError(e.message);
  }
}

function modelText(i) {
  return `${i.family}, ${i.n_layer} layers × ${i.n_head} heads, vocab ${i.vocab_size}, context ${i.block_size}`;
}

function showMethods(m) {
  $("model-info").textContent = `${m.model.id}: ${modelText(m.model)}`;
  for (const opt of $("method").options) {
    const ok = m.methods[opt.value];
    opt.disabled = !ok;
    if (!ok) opt.textContent = `${opt.value} (needs --${m.needs[opt.value]} when the server starts)`;
  }
  $("max-tokens").max = m.limits.max_tokens;
  document.body.dataset.state = "idle";
}

function wireControls() {
  $("run-form").addEventListener("submit", run);
  $("method").addEventListener("change", showMethodFields);
  $("step-first").addEventListener("click", () => { stopPlay(); showStep(0); });
  $("step-prev").addEventListener("click", () => { stopPlay(); showStep(state.step - 1); });
  $("step-next").addEventListener("click", () => { stopPlay(); showStep(state.step + 1); });
  $("step-play").addEventListener("click", togglePlay);
  $("attn-layer").addEventListener("change", (e) => selectHead(+e.target.value, state.head));
  $("attn-head").addEventListener("change", (e) => selectHead(state.layer, +e.target.value));
  $("source-close").addEventListener("click", () => $("source-dialog").close());
  document.addEventListener("click", (e) => {
    const link = e.target.closest("[data-source]");
    if (link) openSource(link.dataset.source);
  });
  document.addEventListener("keydown", stepKeys);
  showMethodFields();
}

function stepKeys(e) {
  if (!state.views || e.target.closest("input, textarea, select")) return;
  if (e.key === "ArrowRight") showStep(state.step + 1);
  if (e.key === "ArrowLeft") showStep(state.step - 1);
}

function showMethodFields() {
  const method = $("method").value;
  for (const label of document.querySelectorAll("label[data-methods]")) {
    label.hidden = !label.dataset.methods.split(" ").includes(method);
  }
}

// ---------------------------------------------------------------- run (served mode)

function requestBody() {
  const method = $("method").value;  // "lookup": speculative decoding with prompt lookup as its draft
  const body = method === "lookup" ? { prompt: $("prompt").value, method: "speculative", draft_lookup: true }
                                   : { prompt: $("prompt").value, method: method };
  const maxTokens = $("max-tokens").value;
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  for (const label of document.querySelectorAll("label[data-methods]")) {
    const input = label.querySelector("input");
    if (!label.hidden && input.value !== "") body[input.name] = Number(input.value);
  }
  return body;
}

async function run(ev) {
  ev.preventDefault();
  clearError();
  stopPlay();
  $("run").disabled = true;
  $("status").textContent = "running…";
  document.body.dataset.state = "running";
  const t0 = performance.now();
  try {
    const views = await fetchJSON("api/inspect", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()) });
    render(views);
    $("status").textContent = `first view after ${((performance.now() - t0) / 1000).toFixed(2)} s`;
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  } finally {
    $("run").disabled = false;
  }
}

async function openSource(name) {
  try {
    const s = state.served ? await fetchJSON("api/source?name=" + encodeURIComponent(name)) : state.sources[name];
    if (!s) throw new Error(`the source of ${name} is not in this page`);
    $("source-name").textContent = s.name;
    $("source-file").textContent = `${s.file}:${s.line}`;
    $("source-code").textContent = s.source;
    $("source-dialog").showModal();
  } catch (e) {
    showError(e.message);
  }
}

// ---------------------------------------------------------------- the views

function render(v) {
  state.views = v;
  $("views").hidden = false;
  renderCitations(v);
  renderPrefill(v);
  renderLens(v);
  renderAttention(v);
  renderTrace(v);
  document.body.dataset.state = "ready";
  document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);
}

function renderCitations(v) {
  const panels = { prefill: v.prefill, lens: v.lens, attention: v.attention, heads: v.heads, trace: v.trace };
  for (const span of document.querySelectorAll(".cite[data-panel]")) {
    const p = panels[span.dataset.panel];
    const names = p ? [...p.functions, ...(p.trace_functions || [])] : [];
    span.replaceChildren(...names.map((n) =>
      el("button", { type: "button", class: "source-link", "data-source": n, title: "show the source" }, n)));
  }
}

function renderPrefill(v) {
  const p = v.prefill;
  $("perplexity").textContent = p.perplexity == null ? "perplexity: undefined for a one-token prompt"
    : `perplexity ${p.perplexity.toFixed(3)} (mean surprisal ${p.mean_surprisal_bits.toFixed(3)} bits/token ` +
      `over ${p.rows.length - 1} predicted tokens)`;
  const bits = p.rows.filter((r) => r.next).map((r) => r.next.surprisal_bits);
  const maxBits = Math.max(1, ...bits);
  $("prefill-tokens").replaceChildren(...p.rows.map((r, t) => prefillToken(p.rows, t, maxBits)));
  $("prefill-table").tBodies[0].replaceChildren(...p.rows.map(prefillRow));
}

function guesses(row) {
  return row.top.map((g) => `${g.token} ${fmt(g.p, 3)}`).join("  ");
}

function prefillToken(rows, t, maxBits) {
  const r = rows[t], seen = t > 0 ? rows[t - 1].next : null;
  const span = el("span", { class: "tok", "data-pos": t, "data-token": r.token }, r.token);
  if (seen) {
    span.style.background = surpriseColour(seen.surprisal_bits / maxBits);
    span.dataset.surprisal = seen.surprisal_bits;
  }
  const how = seen ? `p = ${fmt(seen.p)}, ${seen.surprisal_bits.toFixed(2)} bits, rank ${seen.rank}` : "the first token: not predicted";
  const text = `position ${t}: ${r.token}   (${how})\nthe model's top guesses for what follows:\n${r.top
    .map((g) => `  ${g.token.padEnd(12)} ${fmt(g.p)}`).join("\n")}`;
  span.addEventListener("mouseenter", (ev) => showTooltip(ev, text));
  span.addEventListener("mouseleave", hideTooltip);
  return span;
}

function prefillRow(r) {
  const n = r.next;
  return el("tr", { "data-pos": r.pos, "data-token": r.token, "data-next": n ? n.token : "", "data-p": n ? n.p : "" },
    el("td", { class: "num" }, String(r.pos)), el("td", { class: "tokcell" }, r.token),
    el("td", { class: "tokcell" }, n ? n.token : "—"), el("td", { class: "num" }, n ? fmt(n.p) : ""),
    el("td", { class: "num" }, n ? n.surprisal_bits.toFixed(2) : ""), el("td", { class: "num" }, n ? String(n.rank) : ""),
    el("td", { class: "tokcell" }, guesses(r)));
}

// ---------------------------------------------------------------- logit lens (canvas)

const LENS = { w: 64, h: 20, left: 44, top: 24, maxCols: 200 };

function renderLens(v) {
  const L = v.lens, rows = L.layers.length, T = v.tokens.length, first = Math.max(0, T - LENS.maxCols);
  const c = $("lens-canvas"), g = c.getContext("2d");
  c.width = LENS.left + (T - first) * LENS.w;
  c.height = LENS.top + rows * LENS.h;
  g.fillStyle = "#fff";
  g.fillRect(0, 0, c.width, c.height);
  g.font = "11px monospace";
  g.textBaseline = "middle";
  for (let t = first; t < T; t++) {
    g.fillStyle = "#68707a";
    g.fillText(clip(v.tokens[t], 8), LENS.left + (t - first) * LENS.w + 3, LENS.top / 2);
  }
  for (let l = 0; l < rows; l++) {
    g.fillStyle = "#68707a";
    g.fillText(L.layers[l], 4, LENS.top + l * LENS.h + LENS.h / 2);
    for (let t = first; t < T; t++) lensCell(g, L, l, t, LENS.left + (t - first) * LENS.w, LENS.top + l * LENS.h);
  }
  c.onmousemove = (ev) => lensReadout(ev, v, first);
  c.onmouseleave = () => { $("lens-readout").textContent = ""; };
}

function lensCell(g, L, l, t, x, y) {
  const p = L.top_p[l][t];
  g.fillStyle = heat(p);
  g.fillRect(x + 1, y + 1, LENS.w - 2, LENS.h - 2);
  g.fillStyle = p > 0.55 ? "#fff" : "#1d2125";
  const mark = L.top_id[l][t] === L.final_id[t] ? "*" : "";
  g.fillText(clip(L.top_token[l][t], 7) + mark, x + 4, y + LENS.h / 2);
}

function lensReadout(ev, v, first) {
  const L = v.lens, r = ev.target.getBoundingClientRect();
  const t = first + Math.floor((ev.clientX - r.left - LENS.left) / LENS.w);
  const l = Math.floor((ev.clientY - r.top - LENS.top) / LENS.h);
  if (t < first || t >= v.tokens.length || l < 0 || l >= L.layers.length) return;
  const top = (L.top ? L.top[l][t] : [[L.top_token[l][t], L.top_p[l][t]]]).map(([s, p]) => `${s} ${fmt(p, 3)}`);
  $("lens-readout").textContent = `layer ${L.layers[l]}, position ${t} (${v.tokens[t]}): ${top.join("  ")} | ` +
    `final prediction ${L.final_token[t]}: rank ${L.final_rank[l][t]}, p ${fmt(L.final_p[l][t])}`;
}

// ---------------------------------------------------------------- attention and head scores

function renderAttention(v) {
  const a = v.attention, n = v.info;
  $("attention-note").hidden = !a.note;
  $("attention-note").textContent = a.note || "";
  const options = (count) => Array.from({ length: count }, (_, i) => el("option", { value: i }, String(i)));
  $("attn-layer").replaceChildren(...options(n.n_layer));
  $("attn-head").replaceChildren(...options(n.n_head));
  state.headRows = v.heads.rows.slice();
  state.sort = { key: null, dir: 1 };
  for (const th of document.querySelectorAll("#heads-table th[data-sort]")) th.onclick = () => sortHeads(th.dataset.sort);
  selectHead(0, 0);
}

function selectHead(layer, head) {
  state.layer = layer;
  state.head = head;
  $("attn-layer").value = layer;
  $("attn-head").value = head;
  drawAttention();
  drawHeadRows();
}

function drawAttention() {
  const maps = state.views.attention.maps, c = $("attn-canvas"), g = c.getContext("2d");
  if (!maps) { c.width = c.height = 0; return; }
  const m = maps[state.layer][state.head], T = m.length, tokens = state.views.tokens;
  const cell = clamp(Math.floor(640 / T), 3, 22), margin = cell >= 10 ? 72 : 4;
  c.width = c.height = margin + T * cell;
  g.fillStyle = "#fff";
  g.fillRect(0, 0, c.width, c.height);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      g.fillStyle = k > q ? "#eef0f3" : heat(Math.sqrt(m[q][k]));  // sqrt: small weights stay visible
      g.fillRect(margin + k * cell, margin + q * cell, cell - (cell > 4 ? 1 : 0), cell - (cell > 4 ? 1 : 0));
    }
  }
  if (margin > 4) attentionLabels(g, tokens, cell, margin);
  c.onmousemove = (ev) => attentionReadout(ev, m, cell, margin);
  c.onmouseleave = () => { $("attn-readout").textContent = ""; };
}

function attentionLabels(g, tokens, cell, margin) {
  g.font = `${Math.min(11, cell - 1)}px monospace`;
  g.fillStyle = "#68707a";
  g.textBaseline = "middle";
  g.textAlign = "right";
  tokens.forEach((s, q) => g.fillText(clip(s, 9), margin - 4, margin + q * cell + cell / 2));
  g.textAlign = "left";
  g.save();
  g.rotate(-Math.PI / 2);  // the keys' labels read upwards from the top edge of the map
  tokens.forEach((s, k) => g.fillText(clip(s, 9), -(margin - 4), margin + k * cell + cell / 2));
  g.restore();
}

function attentionReadout(ev, m, cell, margin) {
  const r = ev.target.getBoundingClientRect(), tokens = state.views.tokens;
  const k = Math.floor((ev.clientX - r.left - margin) / cell), q = Math.floor((ev.clientY - r.top - margin) / cell);
  if (q < 0 || k < 0 || q >= m.length || k >= m.length) return;
  $("attn-readout").textContent = `layer ${state.layer} head ${state.head}: query ${q} (${tokens[q]}) → key ${k} ` +
    `(${tokens[k]}): ${k > q ? "masked (the future)" : fmt(m[q][k])}`;
}

function sortHeads(key) {
  const s = state.sort;
  s.dir = s.key === key ? -s.dir : (key === "layer" || key === "head" ? 1 : -1);
  s.key = key;
  const value = (r) => (r[key] == null ? (s.dir > 0 ? Infinity : -Infinity) : r[key]);  // missing: last
  state.headRows.sort((a, b) => (value(a) - value(b)) * s.dir || a.layer - b.layer || a.head - b.head);
  for (const th of document.querySelectorAll("#heads-table th[data-sort]")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === key && s.dir > 0);
    th.classList.toggle("sorted-desc", th.dataset.sort === key && s.dir < 0);
  }
  drawHeadRows();
}

function drawHeadRows() {
  $("heads-table").tBodies[0].replaceChildren(...state.headRows.map((r) => {
    const picked = r.layer === state.layer && r.head === state.head;
    return el("tr", { "data-layer": r.layer, "data-head": r.head, class: picked ? "selected" : null,
                      onclick: () => selectHead(r.layer, r.head) },
      el("td", { class: "num" }, String(r.layer)), el("td", { class: "num" }, String(r.head)),
      el("td", { class: "num" }, fmt(r.entropy_bits, 3)), el("td", { class: "num" }, fmt(r.prev_token, 3)),
      el("td", { class: "num" }, fmt(r.first_token, 3)));
  }));
}

// ---------------------------------------------------------------- the decoding trace, step by step

function renderTrace(v) {
  stopPlay();
  const tr = v.trace, panel = $("trace-panel");
  panel.dataset.method = tr ? tr.method : "";
  panel.dataset.steps = tr ? tr.steps.length : 0;
  $("trace-settings").textContent = tr ? settingsText(tr.settings) : "";
  $("trace-stats").textContent = tr && tr.stats ? tr.stats.summary : "";
  const empty = !tr || tr.steps.length === 0;
  for (const id of ["step-first", "step-prev", "step-next", "step-play"]) $(id).disabled = empty;
  if (!empty) return showStep(0);
  $("step-pos").textContent = "";
  $("trace-tokens").replaceChildren();
  $("step-view").replaceChildren(el("p", { class: "hint" }, tr ? "no tokens were decoded (max tokens 0)"
    : "no decoding was recorded (python -m minillm.inspector --generate N records one)"));
}

function settingsText(s) {
  return Object.entries(s).filter(([, x]) => x != null).map(([k, x]) => `${k} ${x}`).join(" · ");
}

function showStep(i) {
  const tr = state.views && state.views.trace;
  if (!tr || !tr.steps.length) return;
  const n = tr.steps.length;
  i = clamp(i, 0, n - 1);
  state.step = i;
  $("trace-panel").dataset.step = i;
  $("step-pos").textContent = `${tr.method === "speculative" ? "target call" : "step"} ${i + 1} of ${n}`;
  $("step-first").disabled = $("step-prev").disabled = i === 0;
  $("step-next").disabled = i === n - 1;
  renderTraceTokens(tr, i);
  const view = { speculative: specStepView, contrastive: cdStepView }[tr.method] || sampleStepView;
  $("step-view").replaceChildren(view(tr.steps[i]));
}

function emittedBy(method, s) {
  if (method === "speculative") return s.emitted.map((e) => e.token).concat(s.eos ? ["⟨eos⟩"] : []);
  return [s.eos ? "⟨eos⟩" : s.token];
}

function renderTraceTokens(tr, i) {
  const prompt = state.views.tokens, shown = prompt.slice(-40);
  const spans = shown.map((s) => el("span", { class: "tok prompt" }, s));
  if (shown.length < prompt.length) spans.unshift(el("span", { class: "tok prompt" }, "…"));
  tr.steps.slice(0, i + 1).forEach((s, j) => {
    for (const tok of emittedBy(tr.method, s)) {
      spans.push(el("span", { class: j === i ? "tok new current" : "tok new", "data-step": j }, tok));
    }
  });
  $("trace-tokens").replaceChildren(...spans);
}

function togglePlay() {
  if (state.timer) return stopPlay();
  const n = state.views.trace.steps.length;
  if (state.step >= n - 1) showStep(0);
  $("step-play").textContent = "pause";
  state.timer = setInterval(() => {
    if (state.step >= n - 1) stopPlay();
    else showStep(state.step + 1);
  }, 700);
}

function stopPlay() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  $("step-play").textContent = "play";
}

function distTable(id, title, rows, key, chosen) {
  return el("div", {}, el("h3", {}, title), el("table", { id },
    el("thead", {}, el("tr", {}, el("th", {}, "token"), el("th", {}, "p"), el("th", {}))),
    el("tbody", {}, ...rows.map((r) => el("tr", { "data-id": r.id, "data-token": r.token, class: r.id === chosen ? "chosen" : null },
      el("td", { class: "tokcell" }, r.token), el("td", { class: "num" }, fmt(r[key])), el("td", {}, bar(r[key])))))));
}

function sampleStepView(s) {
  const head = el("p", { id: "step-token", "data-id": s.id, "data-token": s.token },
    `step ${s.step}: chose `, el("span", { class: "tok new" }, s.token), `  p ${fmt(s.p_sampler)} in the distribution it was drawn from ` +
    `(${s.n_kept} tokens kept), ${fmt(s.p_model)} in the model's own softmax` + (s.eos ? "; end of sequence: the run stops" : ""));
  return el("div", {}, head, el("div", { class: "step-grid" },
    distTable("raw-table", "raw: softmax of the model's logits", s.raw_top || [], "p_model", s.id),
    distTable("processed-table", "processed: what sampling.choose drew from", s.alternatives, "p_sampler", s.id)));
}

function specStepView(s) {
  const rows = s.drafts.map((d, i) => el("tr", { "data-verdict": d.verdict, "data-id": d.id, "data-token": d.token },
    el("td", { class: "num" }, String(i + 1)), el("td", { class: "tokcell" }, d.token),
    el("td", { class: "num" }, fmt(d.p_target)), el("td", { class: "num" }, fmt(d.q_draft)),
    el("td", { class: "num" }, fmt(d.u)), el("td", { class: "num" }, fmt(d.accept_prob)),
    el("td", { class: "verdict" }, d.verdict)));
  const table = el("table", { id: "spec-drafts" }, el("thead", {}, el("tr", {}, ...["#", "draft", "p_target", "q_draft",
    "u", "min(1, p/q)", "verdict"].map((h) => el("th", {}, h)))), el("tbody", {}, ...rows));
  const r = s.running;
  return el("div", {},
    el("p", {}, `target call ${s.call + 1} at position ${s.position}: the draft proposed ${s.k}, ` +
      `${s.n_accepted} accepted (a draft passes when u·q_draft < p_target)`),
    table, specLast(s),
    el("p", { id: "spec-emitted" }, `this call emitted: ${s.emitted.map((e) => e.token).join(" ")}` + (s.eos ? " ⟨eos⟩" : "")),
    el("p", { id: "spec-stats", "data-accepted": r.drafts_accepted, "data-proposed": r.drafts_proposed },
      `so far: ${r.calls} target calls, ${r.drafts_accepted} of ${r.drafts_proposed} drafts accepted ` +
      `(${pct(r.acceptance_rate)}), ${r.tokens} tokens, ${r.tokens_per_call.toFixed(2)} tokens per target call`));
}

function specLast(s) {
  const last = s.last;
  const how = last.kind === "residual" ? "drawn from the residual norm(max(0, p_target − q_draft)) after the rejection"
    : last.kind === "bonus" ? "the bonus token: every draft passed, drawn from p_target after the last draft"
    : "an accepted draft";
  const alt = (last.alternatives || []).map((a) => `${a.token} ${fmt(a.p, 3)}`).join("  ");
  return el("p", { id: "spec-last", "data-kind": last.kind, "data-id": last.id, "data-token": last.token },
    el("span", { class: "kind" }, last.kind), `: ${last.token} — ${how}` + (last.p != null ? ` (p ${fmt(last.p)}; top: ${alt})` : ""));
}

function cdStepView(s) {
  const rows = s.head.map((h) => el("tr", { "data-id": h.id, "data-token": h.token, class: h.id === s.id ? "chosen" : null },
    el("td", { class: "tokcell" }, h.token + (h.id === s.expert.id ? " ★" : "")), el("td", { class: "num" }, fmt(h.p_expert)),
    el("td", { class: "num" }, fmt(h.p_amateur)), el("td", { class: "num" }, fmt(h.score, 3))));
  const more = s.head_size > s.head.length ? ` (the best ${s.head.length} of ${s.head_size} shown)` : "";
  return el("div", {},
    el("p", { id: "cd-summary", "data-head-size": s.head_size, "data-changed": String(s.changed), "data-id": s.id,
              "data-token": s.token },
      `step ${s.step}: |V_head| = ${s.head_size} plausible tokens${more}; chose `, el("span", { class: "tok new" }, s.token),
      `, the expert's argmax is ${s.expert.token} (★)`,
      s.changed ? el("span", { class: "changed" }, "  — the contrast changed the choice") : "  — same as the expert",
      s.eos ? "; end of sequence: the run stops" : ""),
    el("table", { id: "cd-head" }, el("thead", {}, el("tr", {}, ...["token", "p_expert", "p_amateur", "score − best"]
      .map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)));
}

init();
