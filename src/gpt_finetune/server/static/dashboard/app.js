// The gpt-finetune dashboard: one script, no library, no build. Every figure comes from the
// server's public API (/v1 and its documented extension endpoints), so what it shows is what
// any client sees. Every string from the server is put into the page as text (append/textContent),
// never as markup: a file named "<img src=x onerror=alert(1)>.jsonl" stays a name.

const KEY_SLOT = "gpt-finetune-key"; // sessionStorage: this tab only, gone when it closes
const ACTIVE = ["validating_files", "queued", "running", "paused"];
const TERMINAL = ["succeeded", "failed", "cancelled"];
const POLL_MS = 1500;

const state = { key: sessionStorage.getItem(KEY_SLOT) || "", timers: [], aborts: [], view: 0 };

// ---- DOM helpers ------------------------------------------------------------------------------
function el(tag, attrs = {}, ...kids) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    node.append(kid instanceof Node ? kid : String(kid)); // a string becomes a text node
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...kids) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const kid of kids.flat(Infinity)) if (kid) node.append(kid instanceof Node ? kid : String(kid));
  return node;
}

function link(hash, ...kids) {
  return el("a", { href: hash }, ...kids);
}

function table(headers, rows, { responsive = true, label = "" } = {}) {
  const head = el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", class: h.num ? "num" : null }, h.title))));
  const body = el(
    "tbody",
    {},
    rows.map((cells) =>
      el(
        "tr",
        {},
        cells.map((cell, i) => el("td", { "data-label": headers[i].title, class: headers[i].num ? "num" : null }, cell)),
      ),
    ),
  );
  return el("div", { class: "table-wrap" }, el("table", { class: responsive ? "responsive" : null, "aria-label": label || null }, head, body));
}

function statusBadge(status) {
  return el("span", { class: `status ${status}`, "data-status": status }, status);
}

function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function duration(job) {
  const start = job.created_at;
  const end = job.finished_at || (TERMINAL.includes(job.status) ? null : Date.now() / 1000);
  if (!start || !end) return "";
  let s = Math.max(0, Math.round(end - start));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  s %= 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

function number(n) {
  return n === null || n === undefined ? "" : Number(n).toLocaleString();
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / (1 << 20)).toFixed(1)} MB`;
}

function notice(text) {
  document.getElementById("notice").textContent = text || "";
}

// ---- the API --------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", json, form, raw = false, signal } = {}) {
  const headers = new Headers();
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let body;
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body, signal, credentials: "omit" });
  if (response.status === 401) {
    askForKey(state.key ? "The server refused this API key. Enter another one." : "This server asks for an API key.");
    throw new ApiError(401, "an API key is needed");
  }
  if (!response.ok) {
    let message = response.statusText;
    try {
      message = (await response.json()).error.message || message;
    } catch {
      /* not OpenAI's error shape: keep the status text */
    }
    throw new ApiError(response.status, message);
  }
  return raw ? response : response.json();
}

async function listAll(path, limit = 100) {
  const out = [];
  let after = null;
  for (let page = 0; page < 50; page++) {
    const sep = path.includes("?") ? "&" : "?";
    const data = await api(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    out.push(...data.data);
    if (!data.has_more || !data.data.length) break;
    after = data.data[data.data.length - 1].id;
  }
  return out;
}

function askForKey(reason) {
  const panel = document.getElementById("key-panel");
  document.getElementById("key-reason").textContent = reason;
  panel.hidden = false;
  document.getElementById("key-input").focus();
}

function setUpKeyPanel() {
  const panel = document.getElementById("key-panel");
  panel.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("key-input");
    state.key = input.value.trim();
    input.value = "";
    sessionStorage.setItem(KEY_SLOT, state.key);
    panel.hidden = true;
    notice("");
    render();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    state.key = "";
    sessionStorage.removeItem(KEY_SLOT);
    notice("The key is forgotten.");
  });
  document.getElementById("key-button").addEventListener("click", () => askForKey("Enter the server's API key."));
}

// ---- routing ------------------------------------------------------------------------------
function every(ms, fn) {
  const id = setInterval(fn, ms);
  state.timers.push(id);
}

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = hash.split("?");
  return { parts: path.split("/").map(decodeURIComponent), params: new URLSearchParams(query) };
}

async function render() {
  for (const id of state.timers) clearInterval(id);
  for (const controller of state.aborts) controller.abort();
  state.timers = [];
  state.aborts = [];
  const view = ++state.view;
  const { parts, params } = route();
  const section = parts[0] || "jobs";
  for (const a of document.querySelectorAll("nav a[data-section]")) {
    if (a.dataset.section === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  const views = {
    jobs: parts[1] ? (current) => jobPage(parts[1], current) : jobsPage,
    new: newJobPage,
    files: filesPage,
    models: modelsPage,
    playground: () => playgroundPage(params),
  };
  const make = views[section] || jobsPage;
  try {
    const node = await make(() => view === state.view);
    if (view !== state.view) return; // the user went elsewhere meanwhile
    main.replaceChildren(node);
    notice("");
  } catch (error) {
    if (view !== state.view) return;
    main.replaceChildren(el("h1", {}, "Could not load this page"), el("p", {}, error.message));
  }
  document.body.dataset.rendered = location.hash; // which view is on screen (tests wait for it)
}

// ---- jobs ----------------------------------------------------------------------------------
async function jobsPage(current) {
  const { params } = route();
  const status = params.get("status") || "";
  const meta = params.get("metadata") || "";
  let query = "/v1/fine_tuning/jobs";
  const [mk, ...mv] = meta.split("=");
  if (meta && mv.length) query += `?metadata[${encodeURIComponent(mk.trim())}]=${encodeURIComponent(mv.join("=").trim())}`;
  const body = el("div");
  const draw = async () => {
    const jobs = (await listAll(query)).filter((j) => !status || j.status === status);
    const rows = jobs.map((j) => [
      link(`#/jobs/${encodeURIComponent(j.id)}`, j.id),
      statusBadge(j.status),
      j.metadata?.base_model || j.model,
      j.fine_tuned_model || "",
      when(j.created_at),
      duration(j),
      number(j.trained_tokens),
      Object.entries(j.metadata || {})
        .filter(([k]) => k !== "base_model")
        .map(([k, v]) => `${k}=${v}`)
        .join(", "),
    ]);
    body.replaceChildren(
      jobs.length
        ? table(
            [
              { title: "Job" },
              { title: "Status" },
              { title: "Base model" },
              { title: "Fine-tuned model" },
              { title: "Created" },
              { title: "Duration" },
              { title: "Trained tokens", num: true },
              { title: "Metadata" },
            ],
            rows,
            { label: "Fine-tuning jobs" },
          )
        : el("p", { class: "muted" }, "No jobs", status || meta ? " match these filters" : " yet", "."),
    );
    return jobs.some((j) => ACTIVE.includes(j.status));
  };
  await draw();
  every(POLL_MS * 2, () => current() && draw().catch(() => {}));

  const statusSelect = el(
    "select",
    { id: "status-filter", name: "status" },
    el("option", { value: "" }, "any"),
    [...ACTIVE, ...TERMINAL].map((s) => el("option", { value: s, selected: s === status }, s)),
  );
  const metaInput = el("input", { id: "metadata-filter", name: "metadata", placeholder: "key=value", value: meta });
  const filters = el(
    "form",
    {
      class: "toolbar",
      role: "search",
      onsubmit: (event) => {
        event.preventDefault();
        const q = new URLSearchParams();
        if (statusSelect.value) q.set("status", statusSelect.value);
        if (metaInput.value.trim()) q.set("metadata", metaInput.value.trim());
        location.hash = `#/jobs${q.toString() ? `?${q}` : ""}`;
      },
    },
    el("label", {}, "Status", statusSelect),
    el("label", {}, "Metadata", metaInput),
    el("button", { type: "submit" }, "Filter"),
  );
  return el("section", {}, el("div", { class: "toolbar" }, el("h1", {}, "Fine-tuning jobs"), link("#/new", "New job")), filters, body);
}

const LOSS_KEYS = ["train_loss", "valid_loss", "full_valid_loss"];
const ACCURACY_KEYS = ["train_mean_token_accuracy", "valid_mean_token_accuracy", "full_valid_mean_token_accuracy", "rewards/accuracies"];

function chart(title, series, id) {
  // series: [{name, points: [[step, value], ...]}]; a line per series, a dot per point
  const W = 600;
  const H = 220;
  const pad = { l: 48, r: 12, t: 10, b: 28 };
  const all = series.flatMap((s) => s.points);
  const n = all.length;
  const box = el("figure", { class: "chart", id, "data-points": n });
  box.append(el("figcaption", {}, el("strong", {}, title)));
  if (!n) {
    box.append(el("p", { class: "muted" }, "No points yet: they arrive as the job trains."));
    return box;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const X = (x) => pad.l + ((x - x0) / (x1 - x0 || 1)) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  const last = series.map((s) => `${s.name} ${s.points.length ? s.points[s.points.length - 1][1].toFixed(4) : "-"}`).join(", ");
  const picture = svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${n} points; last ${last}` },
    svg("line", { class: "axis", x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b }),
    svg("line", { class: "axis", x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b }),
    svg("text", { x: pad.l - 6, y: Y(y1) + 4, "text-anchor": "end" }, y1.toFixed(3)),
    svg("text", { x: pad.l - 6, y: Y(y0), "text-anchor": "end" }, y0.toFixed(3)),
    svg("text", { x: pad.l, y: H - 8 }, `step ${x0}`),
    svg("text", { x: W - pad.r, y: H - 8, "text-anchor": "end" }, `step ${x1}`),
    series.map((s, i) => [
      s.points.length > 1 ? svg("polyline", { class: `s${i}`, points: s.points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" ") }) : null,
      s.points.map((p) => svg("circle", { class: `d${i}`, cx: X(p[0]), cy: Y(p[1]), r: s.points.length > 60 ? 1.5 : 3 })),
    ]),
  );
  box.append(picture, el("div", { class: "legend" }, series.map((s, i) => el("span", { class: `k${i}` }, s.name))));
  return box;
}

function curves(events, keys) {
  const metrics = events.filter((e) => e.type === "metrics" && e.data).sort((a, b) => a.data.step - b.data.step);
  return keys
    .map((key) => ({ name: key, points: metrics.filter((e) => typeof e.data[key] === "number").map((e) => [e.data.step, e.data[key]]) }))
    .filter((s) => s.points.length);
}

async function download(fileId, filename) {
  const response = await api(`/v1/files/${encodeURIComponent(fileId)}/content`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = el("a", { href: url, download: filename || fileId });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function jobPage(jobId, current) {
  const id = encodeURIComponent(jobId);
  let events = []; // newest first, in the server's order (events of one second keep theirs)
  const loadEvents = async (limit) => {
    const page = await api(`/v1/fine_tuning/jobs/${id}/events?limit=${limit}`);
    const fresh = new Set(page.data.map((e) => e.id));
    events = [...page.data, ...events.filter((e) => !fresh.has(e.id))];
  };
  await loadEvents(10000);
  const root = el("section");
  const draw = async () => {
    const [job, details, checkpoints] = await Promise.all([
      api(`/v1/fine_tuning/jobs/${id}`),
      api(`/v1/fine_tuning/jobs/${id}/details`),
      api(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`),
    ]);
    const list = events;
    const action = (label, verb, cls) =>
      el(
        "button",
        {
          type: "button",
          class: cls,
          "data-action": verb,
          onclick: async (event) => {
            event.target.disabled = true;
            try {
              await api(`/v1/fine_tuning/jobs/${id}/${verb}`, { method: "POST" });
              notice(`Job ${verb === "cancel" ? "cancelled" : verb === "pause" ? "pausing" : "resumed"}.`);
            } catch (error) {
              notice(error.message);
            }
            await refresh();
          },
        },
        label,
      );
    const buttons = [];
    if (job.status === "running" || job.status === "queued") buttons.push(action("Pause", "pause", "quiet"));
    if (job.status === "paused") buttons.push(action("Resume", "resume"));
    if (!TERMINAL.includes(job.status)) buttons.push(action("Cancel", "cancel", "danger"));
    // the local options, group by group ("lora.r"), those with a value; "given" names the ones set
    const local = Object.entries(details.local || {})
      .filter(([group, values]) => group !== "given" && values && typeof values === "object")
      .flatMap(([group, values]) => Object.entries(values).filter(([, v]) => v !== null && v !== false).map(([k, v]) => [`${group}.${k}`, v]));
    const hp = { ...details.hyperparameters, ...Object.fromEntries(local) };
    const facts = [
      ["Status", statusBadge(job.status)],
      ["Method", details.method],
      ["Base model", job.metadata?.base_model || job.model],
      ["Fine-tuned model", job.fine_tuned_model ? link(`#/playground?model=${encodeURIComponent(job.fine_tuned_model)}`, job.fine_tuned_model) : "not yet"],
      ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at)],
      ["Duration", duration(job)],
      ["Trained tokens", number(job.trained_tokens)],
      ["Training file", job.training_file],
      ["Validation file", job.validation_file || "none"],
      ["Seed", job.seed],
      ["Metadata", Object.entries(job.metadata || {}).filter(([k]) => k !== "base_model").map(([k, v]) => `${k}=${v}`).join(", ") || "none"],
    ];
    if (job.error && job.error.message) facts.splice(1, 0, ["Error", el("span", { class: "error" }, job.error.message)]);
    const results = (job.result_files || []).map((f) =>
      el("button", { type: "button", class: "quiet", onclick: () => download(f, `${job.id}-result.csv`).catch((e) => notice(e.message)) }, `Download result file ${f}`),
    );
    root.replaceChildren(
      ...el("div", {},
      el("div", { class: "toolbar" }, el("h1", {}, `Job ${job.id}`), buttons),
      el(
        "div",
        { class: "grid2" },
        el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
        el(
          "div",
          {},
          el("h2", {}, "Hyperparameters"),
          el("dl", { class: "facts", id: "hyperparameters" }, Object.entries(hp).map(([k, v]) => [el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : v)])),
          el("h2", {}, "Memory plan"),
          el("p", { id: "plan" }, details.plan_summary || "Made when the job starts training."),
        ),
      ),
      el("div", { class: "grid2" }, chart("Loss", curves(list, LOSS_KEYS), "loss-chart"), chart("Accuracy", curves(list, ACCURACY_KEYS), "accuracy-chart")),
      el("h2", {}, "Checkpoints"),
      checkpoints.data.length
        ? table(
            [{ title: "Step", num: true }, { title: "Model" }, { title: "Metrics" }, { title: "" }],
            checkpoints.data.map((c) => [
              number(c.step_number),
              c.fine_tuned_model_checkpoint,
              Object.entries(c.metrics || {})
                .filter(([k, v]) => typeof v === "number" && k !== "step")
                .map(([k, v]) => `${k} ${v.toFixed(4)}`)
                .join(", "),
              link(`#/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}`, "Try in the playground"),
            ]),
            { label: "Checkpoints" },
          )
        : el("p", { class: "muted" }, "None yet."),
      results.length ? [el("h2", {}, "Result file"), results] : null,
      el("h2", {}, "Events"),
      el(
        "ol",
        { class: "events", id: "events", tabindex: 0, "aria-label": "Events, newest first" },
        list.map((e) => el("li", { class: e.level }, el("span", { class: "when" }, when(e.created_at)), e.message)),
      ),
    ).childNodes, // built by el(), which drops what is absent and flattens lists
    );
    return job;
  };
  const refresh = async () => {
    await loadEvents(100);
    return draw();
  };
  const job = await draw();
  if (!TERMINAL.includes(job.status)) {
    let busy = false;
    every(POLL_MS, async () => {
      if (busy || !current()) return;
      busy = true;
      try {
        const now = await refresh();
        if (TERMINAL.includes(now.status)) await refresh(); // the last events, then stop
      } catch {
        /* a missed poll: the next one tries again */
      } finally {
        busy = false;
      }
    });
  }
  return root;
}

// ---- create a job -----------------------------------------------------------------------------
function checkReport(check) {
  const s = check.stats;
  const tpe = s.tokens_per_example || {};
  const parts = [
    el("p", { class: check.ok ? "good" : "error", "data-check": check.ok ? "ok" : "failed" }, check.ok ? "OK: " : "FAILED: ", `${check.filename}: ${check.n_errors} errors, ${check.n_warnings} warnings`),
    el(
      "dl",
      { class: "facts" },
      [
        ["Examples", number(s.n_examples)],
        ["Tokens", `${number(s.total_tokens)} (${s.encoding})`],
        ["Tokens per example", tpe.mean !== undefined ? `mean ${Math.round(tpe.mean)}, max ${number(tpe.max)}` : ""],
        ["Epochs", `${s.job.n_epochs} (${s.job.epochs_rule})`],
        ["Billed tokens", number(s.job.billed_tokens)],
        [`OpenAI would have billed (${s.model})`, s.job.cost_usd === null ? "no price known" : `$${s.job.cost_usd.toFixed(2)}`],
      ].map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]),
    ),
  ];
  if (s.labels) {
    const top = Math.max(...Object.values(s.labels));
    parts.push(
      el("h3", {}, "Labels"),
      el("div", { class: "bars" }, Object.entries(s.labels).map(([label, n]) => el("div", {}, el("span", {}, label), el("span", { class: "bar", style: null, "data-width": n / top }), el("span", {}, number(n))))),
    );
  }
  if (check.findings.length) {
    parts.push(el("ul", { class: "findings" }, check.findings.map((f) => el("li", { class: f.severity }, `${f.severity}: line ${f.line ?? "-"}${f.field ? `, ${f.field}` : ""}: ${f.message}`))));
  }
  const box = el("div", { class: "panel check" }, parts);
  // bar widths through the CSSOM: style attributes in markup are refused by the page's policy
  for (const bar of box.querySelectorAll(".bar")) bar.style.width = `${Math.max(2, Number(bar.dataset.width) * 100)}%`;
  return box;
}

async function newJobPage() {
  const [models, files] = await Promise.all([api("/v1/models"), listAll("/v1/files?purpose=fine-tune", 1000)]);
  const bases = models.data.filter((m) => m.owned_by === "system").map((m) => m.id);
  const tuned = models.data.filter((m) => m.id.startsWith("ft:")).map((m) => m.id);
  const chosen = { training: null, validation: null };
  const checks = el("div", { id: "checks" });
  const estimate = el("select", { name: "estimate" }, ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o", "gpt-4.1"].map((m) => el("option", { value: m }, m)));
  const epochs = el("input", { name: "n_epochs", value: "auto", size: 5 });

  const runChecks = async () => {
    const shown = [];
    for (const kind of ["training", "validation"]) {
      if (!chosen[kind]) continue;
      const q = new URLSearchParams({ model: estimate.value, n_epochs: epochs.value.trim() || "auto" });
      try {
        shown.push(el("h3", {}, kind === "training" ? "Training file" : "Validation file"), checkReport(await api(`/v1/files/${encodeURIComponent(chosen[kind])}/check?${q}`)));
      } catch (error) {
        shown.push(el("p", { class: "error" }, `${kind} file: ${error.message}`));
      }
    }
    checks.replaceChildren(...shown);
  };

  const picker = (kind) => {
    const input = el("input", { type: "file", accept: ".jsonl,.json,application/jsonl", name: `${kind}-upload`, id: `${kind}-upload` });
    const select = el(
      "select",
      { name: `${kind}-file`, id: `${kind}-file` },
      el("option", { value: "" }, kind === "training" ? "choose or upload" : "none"),
      files.map((f) => el("option", { value: f.id }, `${f.filename} (${f.id})`)),
    );
    input.addEventListener("change", async () => {
      if (!input.files.length) return;
      const form = new FormData();
      form.append("purpose", "fine-tune");
      form.append("file", input.files[0]);
      notice(`Uploading ${input.files[0].name}...`);
      try {
        const f = await api("/v1/files", { method: "POST", form });
        select.append(el("option", { value: f.id }, `${f.filename} (${f.id})`));
        select.value = f.id;
        chosen[kind] = f.id;
        notice(`Uploaded ${f.filename} as ${f.id}.`);
        await runChecks();
      } catch (error) {
        notice(error.message);
      }
    });
    select.addEventListener("change", () => {
      chosen[kind] = select.value || null;
      runChecks();
    });
    return el("fieldset", {}, el("legend", {}, kind === "training" ? "Training file" : "Validation file (optional)"), el("label", {}, "Upload a JSONL file", input), el("label", {}, "or use an uploaded one", select));
  };

  const model = el("input", { name: "model", list: "base-models", value: bases[0] || "gpt-4o-mini", required: true });
  const method = el("select", { name: "method" }, el("option", { value: "supervised" }, "supervised"), el("option", { value: "dpo" }, "dpo (preference pairs)"));
  const batch = el("input", { name: "batch_size", value: "auto", size: 5 });
  const lr = el("input", { name: "learning_rate_multiplier", value: "auto", size: 5 });
  const beta = el("input", { name: "beta", value: "auto", size: 5 });
  const betaLabel = el("label", { hidden: true }, "beta (DPO)", beta);
  method.addEventListener("change", () => (betaLabel.hidden = method.value !== "dpo"));
  const suffix = el("input", { name: "suffix", maxlength: 64 });
  const seed = el("input", { name: "seed", inputmode: "numeric", size: 8 });
  const metadata = el("textarea", { name: "metadata", rows: 2, placeholder: "team=net (one key=value per line)" });
  epochs.addEventListener("change", runChecks);
  estimate.addEventListener("change", runChecks);

  const value = (input) => {
    const v = input.value.trim();
    if (!v || v === "auto") return "auto";
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(`${input.name} must be a number or auto`);
    return n;
  };
  const submit = async (event) => {
    event.preventDefault();
    try {
      if (!chosen.training) throw new Error("Choose or upload a training file first.");
      const hyperparameters = { n_epochs: value(epochs), batch_size: value(batch), learning_rate_multiplier: value(lr) };
      if (method.value === "dpo") hyperparameters.beta = value(beta);
      const body = { model: model.value.trim(), training_file: chosen.training, method: { type: method.value, [method.value]: { hyperparameters } } };
      if (chosen.validation) body.validation_file = chosen.validation;
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      if (seed.value.trim()) body.seed = Number(seed.value.trim());
      const meta = Object.fromEntries(
        metadata.value
          .split("\n")
          .map((line) => line.trim())
          .filter(Boolean)
          .map((line) => {
            const at = line.indexOf("=");
            if (at < 1) throw new Error(`metadata: "${line}" is not key=value`);
            return [line.slice(0, at).trim(), line.slice(at + 1).trim()];
          }),
      );
      if (Object.keys(meta).length) body.metadata = meta;
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      notice(error.message);
    }
  };
  return el(
    "section",
    {},
    el("h1", {}, "New fine-tuning job"),
    el(
      "form",
      { id: "new-job", onsubmit: submit },
      el("div", { class: "grid2" }, picker("training"), picker("validation")),
      el("div", { class: "toolbar" }, el("label", {}, "Estimate OpenAI's price as", estimate)),
      checks,
      el("h2", {}, "Model and method"),
      el("datalist", { id: "base-models" }, [...bases, ...tuned].map((m) => el("option", { value: m }))),
      el("label", {}, "Base model", model),
      el("label", {}, "Method", method),
      el("label", {}, "Epochs", epochs),
      el("label", {}, "Batch size", batch),
      el("label", {}, "Learning rate multiplier", lr),
      betaLabel,
      el("label", {}, "Suffix", suffix),
      el("label", {}, "Seed", seed),
      el("label", {}, "Metadata", metadata),
      el("div", {}, el("button", { type: "submit", id: "start-job" }, "Start the job")),
    ),
  );
}

// ---- files and models ---------------------------------------------------------------------------
async function removeAfterConfirming(path, what) {
  if (!confirm(`Delete ${what}?`)) return;
  try {
    await api(path, { method: "DELETE" });
    notice(`Deleted ${what}.`);
    render();
  } catch (error) {
    notice(error.message);
  }
}

async function filesPage() {
  const files = await listAll("/v1/files", 1000);
  const remove = (f) => removeAfterConfirming(`/v1/files/${encodeURIComponent(f.id)}`, `${f.filename} (${f.id})`);
  return el(
    "section",
    {},
    el("h1", {}, "Files"),
    files.length
      ? table(
          [{ title: "File" }, { title: "Name" }, { title: "Purpose" }, { title: "Size", num: true }, { title: "Created" }, { title: "" }],
          files.map((f) => [
            f.id,
            el("span", { class: "filename" }, f.filename),
            f.purpose,
            bytes(f.bytes),
            when(f.created_at),
            el(
              "span",
              { class: "toolbar" },
              el("button", { type: "button", class: "quiet", onclick: () => download(f.id, f.filename).catch((e) => notice(e.message)) }, "Download"),
              el("button", { type: "button", class: "danger", "aria-label": `Delete ${f.filename}`, onclick: () => remove(f) }, "Delete"),
            ),
          ]),
          { label: "Files" },
        )
      : el("p", { class: "muted" }, "No files yet."),
  );
}

function modelKind(m) {
  if (m.owned_by === "system") return "base";
  if (m.id.includes(":ckpt-step-")) return "checkpoint";
  if (m.id.startsWith("ft:")) return "fine-tuned";
  return "alias";
}

async function modelsPage() {
  const models = (await api("/v1/models")).data;
  const kids = (id, kind) => models.filter((m) => m.parent === id && modelKind(m) === kind).map((m) => m.id);
  const remove = (m) => removeAfterConfirming(`/v1/models/${encodeURIComponent(m.id)}`, m.id);
  return el(
    "section",
    {},
    el("h1", {}, "Models"),
    table(
      [{ title: "Model" }, { title: "Kind" }, { title: "Parent" }, { title: "Checkpoints" }, { title: "Aliases" }, { title: "Created" }, { title: "" }],
      models.map((m) => {
        const kind = modelKind(m);
        return [
          m.id,
          kind,
          m.parent || "",
          kids(m.id, "checkpoint").join(", "),
          kids(m.id, "alias").join(", "),
          when(m.created),
          el(
            "span",
            { class: "toolbar" },
            link(`#/playground?model=${encodeURIComponent(m.id)}`, "Playground"),
            kind === "fine-tuned" || kind === "checkpoint" ? el("button", { type: "button", class: "danger", "aria-label": `Delete ${m.id}`, onclick: () => remove(m) }, "Delete") : null,
          ),
        ];
      }),
      { label: "Models" },
    ),
  );
}

// ---- playground -------------------------------------------------------------------------------
async function streamChat(body, out, signal) {
  // OpenAI's server-sent events, read as they come: each delta is appended as text
  const response = await api("/v1/chat/completions", { method: "POST", json: { ...body, stream: true }, raw: true, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let chunks = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return chunks;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        const text = chunk.choices?.[0]?.delta?.content;
        if (text) {
          out.append(text);
          out.dataset.chunks = String(++chunks);
        }
      }
    }
  }
  return chunks;
}

async function labelsOf(modelId) {
  // a fine-tuned model (or checkpoint) id ends in its job: ft:<base>:<suffix>:<job>[:ckpt-step-N]
  const job = modelId.split(":").find((part) => part.startsWith("ftjob-"));
  if (!job) return null;
  try {
    return (await api(`/v1/fine_tuning/jobs/${encodeURIComponent(job)}/details`)).labels;
  } catch {
    return null;
  }
}

async function playgroundPage(params) {
  const models = (await api("/v1/models")).data.map((m) => m.id);
  const pick = (name, first, none) =>
    el("select", { name, id: name }, none ? el("option", { value: "" }, "none") : null, models.map((m) => el("option", { value: m, selected: m === first }, m)));
  const wanted = params.get("model");
  const modelA = pick("model-a", wanted || models[0]);
  const modelB = pick("model-b", params.get("compare") || "", true);
  const system = el("textarea", { name: "system", id: "system", rows: 2, placeholder: "System prompt (optional)" });
  const prompt = el("textarea", { name: "prompt", id: "prompt", rows: 4, required: true, placeholder: "Your message" });
  const temperature = el("input", { name: "temperature", id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const maxTokens = el("input", { name: "max_tokens", id: "max-tokens", type: "number", min: 1, value: 128 });
  const constrained = el("input", { type: "checkbox", name: "constrained", id: "constrained" });
  const constrainedLabel = el("label", { class: "inline", hidden: true }, constrained, "Label-constrained answer with its confidence");
  const outputs = el("div", { class: "grid2", id: "answers" });
  const labels = {};
  const updateLabels = async () => {
    for (const m of [modelA.value, modelB.value].filter(Boolean)) if (!(m in labels)) labels[m] = await labelsOf(m);
    constrainedLabel.hidden = ![modelA.value, modelB.value].some((m) => m && labels[m]);
  };
  modelA.addEventListener("change", updateLabels);
  modelB.addEventListener("change", updateLabels);
  await updateLabels();

  const answerOne = async (model, box, signal) => {
    const out = el("pre", { class: "answer", "aria-live": "polite", "data-model": model });
    const meta = el("p", { class: "muted" });
    box.replaceChildren(el("h2", {}, model), out, meta);
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value });
    messages.push({ role: "user", content: prompt.value });
    const body = { model, messages, temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
    const set = labels[model];
    const started = performance.now();
    try {
      if (constrained.checked && set) {
        const request = { ...body, structured_outputs: { choice: set.label_sets }, logprobs: true, top_logprobs: Math.min(set.label_sets.length, 5) };
        const answer = await api("/v1/chat/completions", { method: "POST", json: request, signal });
        const choice = answer.choices[0];
        out.textContent = choice.message.content;
        const info = choice.logprobs?.content?.[0];
        if (info) {
          meta.replaceChildren(
            el("span", { class: "confidence" }, `confidence ${(Math.exp(info.logprob) * 100).toFixed(1)}%`),
            el("ul", {}, (info.top_logprobs || []).map((t) => el("li", {}, `${t.token}: ${(Math.exp(t.logprob) * 100).toFixed(1)}%`))),
          );
        }
      } else {
        const chunks = await streamChat(body, out, signal);
        meta.textContent = `${chunks} chunks in ${((performance.now() - started) / 1000).toFixed(1)} s`;
      }
    } catch (error) {
      if (error.name !== "AbortError") meta.textContent = `Error: ${error.message}`;
    }
  };
  const send = async (event) => {
    event.preventDefault();
    for (const c of state.aborts) c.abort();
    const controller = new AbortController();
    state.aborts = [controller];
    const chosen = [modelA.value, modelB.value].filter(Boolean);
    const boxes = chosen.map(() => el("div", { class: "answer-box" }));
    outputs.replaceChildren(...boxes);
    await Promise.all(chosen.map((m, i) => answerOne(m, boxes[i], controller.signal)));
  };
  return el(
    "section",
    {},
    el("h1", {}, "Playground"),
    el(
      "form",
      { id: "playground", onsubmit: send },
      el("label", {}, "Model", modelA),
      el("label", {}, "Compare with", modelB),
      el("label", {}, "Temperature", temperature),
      el("label", {}, "Max tokens", maxTokens),
      el("div", {}, constrainedLabel),
      system,
      prompt,
      el("div", { class: "toolbar" }, el("button", { type: "submit", id: "send" }, "Send")),
    ),
    outputs,
  );
}

// ---- start ---------------------------------------------------------------------------------
setUpKeyPanel();
window.addEventListener("hashchange", render);
if (!location.hash) history.replaceState(null, "", "#/jobs");
render();
