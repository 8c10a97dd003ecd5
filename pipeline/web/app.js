// The page of `moe-pipeline serve`: plain JavaScript, no library, no network but this server.
// The token is kept for the tab only (sessionStorage) and sent as a bearer header.
"use strict";

const main = document.getElementById("main");
const token = () => sessionStorage.getItem("moe-token") || "";

function el(tag, attrs = {}, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const kid of kids.flat()) node.append(kid instanceof Node ? kid : String(kid ?? ""));
  return node;
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  const body = response.headers.get("content-type")?.includes("json")
    ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = typeof body === "object" ? JSON.stringify(body.detail ?? body) : body;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function show(...nodes) { main.replaceChildren(...nodes); }
function failed(err) { return el("p", { class: "error" }, String(err.message || err)); }

function table(rows, columns, onclick) {
  columns = columns || (rows.length ? Object.keys(rows[0]) : []);
  return el("table", {},
    el("tr", {}, columns.map((c) => el("th", {}, c))),
    rows.map((r) => el("tr", onclick ? { onclick: () => onclick(r), style: "cursor:pointer" } : {},
      columns.map((c) => el("td", {}, cell(r[c]))))));
}

function cell(v) {
  if (v instanceof Node) return v;
  if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(3);
  return typeof v === "object" && v !== null ? JSON.stringify(v) : v;
}

// -- views ---------------------------------------------------------------------------------
const views = {
  login() {
    const input = el("input", { type: "password", id: "token", placeholder: "token" });
    show(el("h2", {}, "Token"),
      el("p", { class: "muted" }, "moe-pipeline token prints one (--write for one that may write)."),
      input, el("button", { id: "save-token", onclick: () => {
        sessionStorage.setItem("moe-token", input.value.trim()); go("jobs");
      } }, "Use this token"));
  },

  async jobs() {
    const body = el("textarea", { id: "items", rows: 6,
      placeholder: '{"id": "a", "text": "one item per line"}' });
    const file = el("input", { type: "file", id: "file", accept: ".jsonl,.ndjson,.json" });
    const out = el("div", { id: "job-out" });
    const list = el("div", { id: "job-list" });
    async function submit() {
      out.replaceChildren();
      const data = file.files[0] ? await file.files[0].text() : body.value;
      try {
        const job = await api("/jobs", { method: "POST", body: data,
          headers: { "Content-Type": "application/x-ndjson" } });
        out.append(el("p", {}, `job ${job.id} (${job.mode})`));
        await follow(job.id, out);
        refresh();
      } catch (err) { out.append(failed(err)); }
    }
    async function refresh() {
      try {
        const jobs = await api("/jobs");
        list.replaceChildren(table(jobs, ["id", "status", "mode", "items"], (j) => jobPage(j.id)));
      } catch (err) { list.replaceChildren(failed(err)); }
    }
    show(el("h2", {}, "Submit items"), body, file,
      el("button", { id: "submit", onclick: submit }, "Submit"), out,
      el("h2", {}, "Jobs"), list);
    refresh();
  },

  async topics() {
    show(el("h2", {}, "Constellations"), el("p", {}, "loading..."));
    try {
      const rows = await api("/constellations");
      const most = Math.max(1, ...rows.map((r) => r.insights));
      show(el("h2", {}, "Constellations"), table(rows.map((r) => ({
        name: r.name, description: r.description, experts: r.experts.join(", "),
        insights: r.insights, sources: r.sources,
        size: el("span", { class: "bar", style: `width:${(12 * r.insights) / most}em` }),
      })), ["name", "description", "experts", "insights", "sources", "size"]));
    } catch (err) { show(failed(err)); }
  },

  search() {
    const input = el("input", { type: "text", id: "question", placeholder: "ask for similar insights" });
    const out = el("div", { id: "hits" });
    async function ask() {
      out.replaceChildren(el("p", {}, "searching..."));
      try {
        const answer = await api(`/similar?k=10&text=${encodeURIComponent(input.value)}`);
        out.replaceChildren(answer.hits.length
          ? table(answer.hits.map((h) => ({ similarity: h.similarity.toFixed(3), shard: h.shard,
              summary: h.summary, support: h.support, id: h.node_id })),
            ["similarity", "shard", "summary", "support"], (h) => insightPage(h.id))
          : el("p", {}, `nothing close (floor ${answer.floor})`));
      } catch (err) { out.replaceChildren(failed(err)); }
    }
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });
    show(el("h2", {}, "Search"), input, el("button", { id: "ask", onclick: ask }, "Search"), out);
  },

  cypher() {
    const input = el("textarea", { id: "cypher", rows: 4 },
      "MATCH (i:Insight) RETURN i.shard AS shard, count(*) AS insights ORDER BY insights DESC");
    const out = el("div", { id: "rows" });
    async function run() {
      out.replaceChildren();
      try {
        const answer = await api("/query", { method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ cypher: input.value }) });
        out.append(table(answer.rows));
        if (answer.truncated) out.append(el("p", { class: "muted" }, "first 1,000 rows"));
      } catch (err) { out.append(failed(err)); }
    }
    show(el("h2", {}, "Cypher (read-only)"), input,
      el("button", { id: "run", onclick: run }, "Run"), out);
  },
};

async function follow(jobId, out) {
  // Server-sent events through fetch: EventSource cannot send the bearer header.
  const line = el("p", { class: "progress" }, "queued");
  out.append(line);
  const response = await fetch(`/jobs/${jobId}/events`, {
    headers: { Authorization: `Bearer ${token()}` } });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      const p = JSON.parse(event);
      line.textContent = `${p.status}: ${p.finished}/${p.batches} batches, ${p.items_done} items`;
    }
  }
}

async function jobPage(id) {
  try {
    const job = await api(`/jobs/${encodeURIComponent(id)}`);
    show(el("h2", {}, `Job ${job.id}`),
      el("p", {}, `${job.status}, ${job.items} items, ${job.progress.finished}/${job.progress.batches} batches`),
      el("h3", {}, "Batches"), table(job.batches),
      el("h3", {}, "Bad items"), job.bad_items.length ? table(job.bad_items) : el("p", {}, "none"));
  } catch (err) { show(failed(err)); }
}

// -- an insight and its neighbourhood, drawn as a graph that grows by clicking -------------
const drawn = { nodes: new Map(), edges: [] };

async function insightPage(id) {
  drawn.nodes.clear();
  drawn.edges = [];
  show(el("p", {}, "loading..."));
  try {
    const insight = await expand(id, 0, 0);
    render(insight);
  } catch (err) { show(failed(err)); }
}

async function expand(id, x, y) {
  const insight = await api(`/insights/${encodeURIComponent(id)}`);
  if (!drawn.nodes.has(id)) drawn.nodes.set(id, { id, x, y, text: insight.text, kind: "insight" });
  const around = [
    ...insight.similar.map((n) => ({ ...n, kind: "insight", label: (n.score ?? 0).toFixed(2) })),
    ...insight.shared.map((n) => ({ ...n, kind: "insight", label: "shared source" })),
    ...insight.sources.map((s) => ({ id: `source:${s.id}`, text: s.text || s.id, kind: "source", label: "" })),
  ];
  around.forEach((n, k) => {
    const angle = (2 * Math.PI * k) / Math.max(1, around.length) + drawn.nodes.size;
    if (!drawn.nodes.has(n.id)) {
      drawn.nodes.set(n.id, { id: n.id, x: x + 170 * Math.cos(angle), y: y + 130 * Math.sin(angle),
        text: n.text, kind: n.kind });
    }
    drawn.edges.push({ a: id, b: n.id, label: n.label });
  });
  return insight;
}

function render(insight) {
  const nodes = [...drawn.nodes.values()];
  const xs = nodes.map((n) => n.x), ys = nodes.map((n) => n.y);
  const [x0, y0] = [Math.min(...xs) - 120, Math.min(...ys) - 40];
  const [w, h] = [Math.max(...xs) - x0 + 120, Math.max(...ys) - y0 + 40];
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("id", "graph");
  svg.setAttribute("viewBox", `${x0} ${y0} ${w} ${h}`);
  svg.setAttribute("width", "100%");
  svg.setAttribute("height", String(Math.min(640, Math.max(320, h))));
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  for (const e of drawn.edges) {
    const a = drawn.nodes.get(e.a), b = drawn.nodes.get(e.b);
    add("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: "#b8c2d6" });
    if (e.label) add("text", { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2, fill: "#667" }, e.label);
  }
  for (const n of nodes) {
    const group = add("g", { class: "node", "data-id": n.id });
    const circle = document.createElementNS(ns, "circle");
    Object.entries({ cx: n.x, cy: n.y, r: n.kind === "source" ? 6 : 10,
      fill: n.kind === "source" ? "#e5a43b" : "#4c7bd9" }).forEach(([k, v]) => circle.setAttribute(k, v));
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", n.x + 12);
    label.setAttribute("y", n.y + 4);
    label.textContent = (n.text || n.id).slice(0, 40);
    group.append(circle, label);
    svg.append(group);
    if (n.kind === "insight") {
      group.addEventListener("click", async () => { await expand(n.id, n.x, n.y); render(insight); });
    }
  }
  show(el("h2", {}, "Insight"), el("p", { id: "insight-text" }, insight.text),
    el("p", { class: "muted" }, `constellation ${insight.shard}`),
    el("h3", {}, "Sources"), table(insight.sources, ["id", "text", "score"]),
    el("h3", {}, "Experts"), table(insight.experts, ["name", "weight"]),
    el("h3", {}, "Neighbourhood (click an insight to expand it)"), svg);
}

function go(view) {
  document.querySelectorAll("header a").forEach((a) => a.classList.toggle("on", a.dataset.view === view));
  views[view]();
}

document.querySelectorAll("header a").forEach((a) => a.addEventListener("click", () => go(a.dataset.view)));
go(token() ? "jobs" : "login");
