// nanosae graph page: an attribution graph (Neuronpedia's JSON layout) drawn as SVG, tokens along x, layers up.
// Plain JavaScript, no build step; every string from the graph is inserted with textContent.
(function () {
  "use strict";
  const app = document.getElementById("app");
  const SVG = "http://www.w3.org/2000/svg";
  const slug = new URLSearchParams(location.search).get("slug");
  // a static export (data-mode="static") reads data/graphs.js; pins and supernodes then live in this browser
  const STATIC = document.body.dataset.mode === "static";
  const pageOf = (g) => (STATIC ? "graph.html" : "/graph.html") + "?slug=" + encodeURIComponent(g);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "onclick" || k === "oninput") node[k] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  async function api(path, options) {
    if (STATIC) return fromExport(path, options);
    const r = await fetch(path, options);
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || r.statusText);
    return body;
  }
  function fromExport(path, options) {
    const graphs = window.NANOSAE_GRAPHS || {};
    let m;
    if (path === "/api/graphs") return { graphs: Object.keys(graphs).sort() };
    if ((m = path.match(/^\/api\/graph\/([^/]+)\/qparams$/))) {
      localStorage.setItem("nanosae-qparams-" + decodeURIComponent(m[1]), options.body);
      return JSON.parse(options.body);
    }
    if ((m = path.match(/^\/api\/graph\/([^/]+)$/))) {
      const name = decodeURIComponent(m[1]);
      if (!graphs[name]) throw new Error("no graph " + name);
      const graph = JSON.parse(JSON.stringify(graphs[name]));
      const saved = localStorage.getItem("nanosae-qparams-" + name);
      if (saved) Object.assign(graph.qParams, JSON.parse(saved));
      return graph;
    }
    if ((m = path.match(/^\/api\/layer\/(\d+)\/feature\/(\d+)$/))) {
      const f = (window.NANOSAE_GRAPH_FEATURES || {})[m[1] + "_" + m[2]];
      if (!f) throw new Error("no feature page for this node in the export");
      return f;
    }
    throw new Error("interventions need the model: run nanosae view on the transcoder set");
  }
  const fmt = (v) => (typeof v === "number" ? v.toPrecision(3) : String(v));

  async function listGraphs() {
    const { graphs } = await api("/api/graphs");
    app.replaceChildren(el("h2", { text: "attribution graphs" }),
      graphs.length ? el("ul", {}, ...graphs.map((g) => el("li", {}, el("a", { href: pageOf(g), text: g }))))
        : el("p", { class: "muted", text: "no graphs yet: nanosae trace \"PROMPT\" --transcoders THIS_DIR" }));
  }

  async function showGraph() {
    const graph = await api("/api/graph/" + encodeURIComponent(slug));
    const meta = graph.metadata, q = graph.qParams;
    const pinned = new Set(q.pinnedIds || []);
    const supernodes = q.supernodes || [];
    const byId = Object.fromEntries(graph.nodes.map((n) => [n.node_id, n]));
    document.getElementById("where").textContent = meta.scan + " · " + slug;
    const info = meta.info || {};

    // rows: embeddings, then each layer, then the logits right above the last layer (Neuronpedia's layer string:
    // "E" for embeddings, n_layers + 1 for logits, which would leave an empty row)
    const rowOf = (n) => (n.layer === "E" ? 0 : n.feature_type === "logit" ? Number(n.layer) : Number(n.layer) + 1);
    const nRows = Math.max(...graph.nodes.map(rowOf)) + 1;
    const nPos = meta.prompt_tokens.length;
    // columns fit the window's width down to 36 px a token; a longer prompt scrolls, the layer axis stays put
    const room = Math.max(200, window.innerWidth - 340 - 120);
    const colW = Math.max(36, Math.min(110, Math.floor(room / nPos))), rowH = 46, left = 0, bottom = 40;
    const width = left + nPos * colW + 20, height = nRows * rowH + bottom + 20;
    const cells = {};
    for (const n of graph.nodes) (cells[rowOf(n) + ":" + n.ctx_idx] ||= []).push(n);
    const pos = {};
    for (const [key, list] of Object.entries(cells)) {
      const [row, ctx] = key.split(":").map(Number);
      list.forEach((n, i) => {
        pos[n.node_id] = [left + ctx * colW + colW / 2 + (i - (list.length - 1) / 2) * Math.min(14, (colW - 10) / list.length),
                          height - bottom - row * rowH - rowH / 2];
      });
    }
    const picture = svg("svg", { width, height, id: "graph-svg" });
    const edgeLayer = svg("g", { id: "edges" });
    picture.append(edgeLayer);
    const maxW = Math.max(...graph.links.map((l) => Math.abs(l.weight)), 1e-9);
    const strongest = [...graph.links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    const edgePath = (l, cls) => {
      const [x1, y1] = pos[l.source], [x2, y2] = pos[l.target];
      return svg("path", { class: cls, d: `M${x1},${y1} C${x1},${(y1 + y2) / 2} ${x2},${(y1 + y2) / 2} ${x2},${y2}`,
        stroke: l.weight > 0 ? "#2b6cb0" : "#c53030", "stroke-width": 0.4 + 3.5 * Math.abs(l.weight) / maxW });
    };
    // a graph keeps thousands of edges: the strongest are drawn, and every edge of the selected node
    let shown = Math.min(400, strongest.length), selected = null;
    const drawEdges = () => {
      const around = selected ? graph.links.filter((l) => l.source === selected || l.target === selected) : [];
      edgeLayer.replaceChildren(...strongest.slice(0, shown).map((l) => edgePath(l, "edge")),
        ...around.map((l) => edgePath(l, "edge around")));
    };
    drawEdges();
    const axis = svg("svg", { width: 56, height, id: "layer-axis" });
    for (let r = 0; r < nRows; r++) {
      const label = r === 0 ? "emb" : r === nRows - 1 ? "logits" : "L" + (r - 1);
      const t = svg("text", { x: 4, y: height - bottom - r * rowH - rowH / 2 + 4, class: "layerlabel" });
      t.textContent = label;
      axis.append(t);
    }
    meta.prompt_tokens.forEach((tok, i) => {
      const t = svg("text", { x: left + i * colW + colW / 2, y: height - 12, "text-anchor": "middle", class: "tokenlabel" });
      t.textContent = JSON.stringify(tok).slice(1, -1).slice(0, Math.max(3, Math.floor(colW / 7)));
      const full = svg("title");
      full.textContent = tok;
      t.append(full);
      picture.append(t);
    });
    const circles = {};
    for (const n of graph.nodes) {
      const kind = { "cross layer transcoder": "feature", "mlp reconstruction error": "error" }[n.feature_type] || n.feature_type;
      const [x, y] = pos[n.node_id];
      const c = svg("circle", { cx: x, cy: y, r: kind === "feature" ? 6 : 5, class: "node " + kind, "data-node-id": n.node_id });
      const title = svg("title");
      title.textContent = (n.clerp || n.node_id) + (n.activation != null ? " · activation " + fmt(n.activation) : "")
        + " · influence " + fmt(n.influence || 0);
      c.append(title);
      c.onclick = () => select(n);
      circles[n.node_id] = c;
      picture.append(c);
    }
    const paint = () => { for (const [id, c] of Object.entries(circles)) c.classList.toggle("pinned", pinned.has(id)); };
    paint();

    const detail = el("div", { class: "card", id: "node-detail" }, el("p", { class: "muted", text: "click a node" }));
    const pinList = el("div", { class: "card", id: "pinned" });
    const result = el("div", { id: "intervention" });
    const save = () => api("/api/graph/" + encodeURIComponent(slug) + "/qparams", {
      method: "PUT", headers: { "content-type": "application/json" },
      body: JSON.stringify({ pinnedIds: [...pinned], supernodes }) });

    function renderPins() {
      const name = el("input", { id: "supernode-name", placeholder: "supernode name" });
      const edits = {};
      const rows = [...pinned].map((id) => {
        const n = byId[id];
        if (!n) return el("div", {});
        const row = el("div", { class: "pin-row" }, el("span", { text: (n.clerp || id) + " " }));
        if (n.feature_type === "cross layer transcoder") {
          const value = el("input", { size: 5, value: "0", "data-edit": id });
          const op = el("select", {}, el("option", { value: "=", text: "set" }), el("option", { value: "*", text: "scale" }));
          edits[id] = () => ({ node_id: id, op: op.value, value: Number(value.value) });
          row.append(op, value);
        }
        return row;
      });
      pinList.replaceChildren(el("h3", { text: "pinned (" + pinned.size + ")" }), ...rows,
        el("div", {}, name, el("button", { id: "group", text: "group as supernode", onclick: async () => {
          if (!name.value.trim() || !pinned.size) return;
          supernodes.push([name.value.trim(), ...pinned]);
          await save();
          renderPins();
        } })),
        el("div", {}, el("button", { id: "run-edits", text: "run with these edits", onclick: async () => {
          result.replaceChildren(el("p", { class: "muted", text: "running…" }));
          try {
            const r = await api("/api/intervene", { method: "POST", headers: { "content-type": "application/json" },
              body: JSON.stringify({ slug, edits: Object.values(edits).map((f) => f()), max_new_tokens: 12 }) });
            const side = (title, s) => el("div", {}, el("h3", { text: title }),
              el("p", { text: s.top.map(([t, p]) => JSON.stringify(t) + " " + p.toFixed(3)).join("  ") }),
              el("pre", { text: s.continuation }));
            result.replaceChildren(el("div", { class: "cols" }, side("original", r.original), side("edited", r.edited)));
          } catch (e) {
            result.replaceChildren(el("p", { class: "error", text: e.message }));
          }
        } })),
        el("h3", { text: "supernodes" }),
        el("ul", { id: "supernodes" }, ...supernodes.map((g) => el("li", { text: g[0] + ": " + g.slice(1).join(", ") }))),
        result);
    }

    async function select(n) {
      for (const c of Object.values(circles)) c.classList.remove("selected");
      circles[n.node_id].classList.add("selected");
      selected = n.node_id;
      drawEdges();
      const pinButton = el("button", { id: "pin", text: pinned.has(n.node_id) ? "unpin" : "pin", onclick: async () => {
        pinned.has(n.node_id) ? pinned.delete(n.node_id) : pinned.add(n.node_id);
        paint();
        await save();
        renderPins();
        pinButton.textContent = pinned.has(n.node_id) ? "unpin" : "pin";
      } });
      const lines = [el("h3", { text: n.clerp || n.node_id }),
        el("p", { class: "muted", text: n.feature_type + " · layer " + n.layer + " · position " + n.ctx_idx
          + (n.activation != null ? " · activation " + fmt(n.activation) : "") + " · influence " + fmt(n.influence || 0) }),
        pinButton];
      detail.replaceChildren(...lines);
      if (n.feature_type !== "cross layer transcoder") return;
      const [layer, latent] = n.node_id.split("_");
      try {
        const f = await api(`/api/layer/${layer}/feature/${latent}`);
        detail.append(el("p", { id: "feature-explanation", text: f.explanation || "(no explanation yet)" }),
          el("p", { class: "muted", text: "top logits: " + f.top_logits.slice(0, 5).map(([t]) => JSON.stringify(t)).join(" ") }),
          STATIC ? "" : el("a", { href: `/layer/${layer}/#/feature/${latent}`, id: "feature-link",
                                  text: "feature page (layer " + layer + ", #" + latent + ")" }));
      } catch (e) {
        detail.append(el("p", { class: "muted", id: "feature-explanation", text: e.message }));
      }
    }

    app.replaceChildren(
      el("h2", { text: meta.prompt }),
      el("p", { class: "muted", text: `replacement score ${fmt(info.replacement_score ?? NaN)} · completeness ${fmt(info.completeness_score ?? NaN)} · `
        + `${graph.nodes.length} nodes, ${graph.links.length} edges (blue excites, red inhibits; width ∝ |weight|) · drawn: the ` },
        el("input", { id: "shown-edges", type: "number", min: 0, max: strongest.length, value: shown, style: "width: 5em",
          oninput: (e) => { shown = Math.max(0, Math.min(strongest.length, Number(e.target.value) || 0)); drawEdges(); } }),
        " strongest edges and every edge of the selected node"),
      el("div", { class: "graph-cols" },
        el("div", { class: "graph-wrap" }, el("div", { class: "graph-axis" }, axis), picture),
        el("div", { class: "side" }, detail, pinList)));
    renderPins();
  }

  (slug ? showGraph() : listGraphs()).catch((e) => app.replaceChildren(el("p", { class: "error", text: e.message })));
})();
