// nanosae viewer front end: plain JavaScript, no build step. Corpus text is untrusted, so every piece of
// it is inserted with textContent (never innerHTML). In a static export (data-mode="static") the API's
// answers are read from data/*.js files loaded as classic scripts, which also works from file://.
(function () {
  "use strict";
  const MODE = document.body.dataset.mode;
  const app = document.getElementById("app");
  window.NANOSAE_DATA = window.NANOSAE_DATA || {};
  let featureList = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "onclick" || k === "oninput" || k === "onchange") node[k] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined) return "";
    if (typeof v !== "number") return String(v);
    return Math.abs(v) >= 1000 || Number.isInteger(v) ? String(v) : v.toPrecision(digits || 4);
  }
  // An explanation's score as a reader should take it: with its interval and how many held-out windows it rests
  // on, or the reason there is none (docs/interpretation.md, "Scores").
  function scoreText(f) {
    const given = (x) => x !== null && x !== undefined;
    const windows = given(f.n_active) ? " on " + f.n_active + " active + " + f.n_silent + " silent held-out windows" : "";
    const method = f.method ? f.method + " " : "";
    if (given(f.score)) {
      const interval = given(f.score_low) ? " [" + fmt(f.score_low, 2) + ", " + fmt(f.score_high, 2) + "]" : "";
      const pr = given(f.precision) ? "; precision " + fmt(f.precision, 2) + ", recall " + fmt(f.recall, 2) : "";
      const f1 = given(f.f1) ? ", token F1 " + fmt(f.f1, 2) : "";
      return " (" + method + "detection score " + fmt(f.score, 2) + interval + windows + pr + f1 + ")";
    }
    if (f.explanation && given(f.score_low)) {
      return " (" + method + "no score: too little held-out evidence, " + fmt(f.score_low, 2) + ".." + fmt(f.score_high, 2) + windows + ")";
    }
    return "";
  }


  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error("cannot load " + src));
      document.head.append(s);
    });
  }

  // a static export packs feature pages into data/features-N.js; token strings are stored once per file
  const DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const indices = (text, width) => {
    const out = [];
    for (let i = 0; i < text.length; i += width) {
      let n = 0;
      for (let k = 0; k < width; k++) n = n * 64 + DIGITS.indexOf(text[i + k]);
      out.push(n);
    }
    return out;
  };
  window.NANOSAE_UNPACK = (strings, width, feats) => {
    const rank = { top: 0, quantile: 0 };
    for (const f of feats) {
      rank.top = 0;
      rank.quantile = 0;
      f.histogram = { edges: window.NANOSAE_HIST_EDGES, counts: f.histogram };
      f.examples = f.examples.map(([top, activation, tokens, focus, ...firing]) => {
        const kind = top ? "top" : "quantile";
        const ids = indices(tokens, width);
        const acts = ids.map(() => 0);
        for (let i = 0; i < firing.length; i += 2) acts[firing[i]] = firing[i + 1] / 1000;
        return { kind, rank: rank[kind]++, activation, tokens: ids.map((i) => strings[i]), acts, focus };
      });
      window.NANOSAE_DATA["feature/" + f.id] = f;
    }
  };

  async function get(path) {
    if (MODE === "static") {
      const m = path.match(/^feature\/(\d+)$/);
      if (m && !(path in window.NANOSAE_DATA)) {
        if (!("overview" in window.NANOSAE_DATA)) await loadScript("data/overview.js");
        await loadScript("data/features-" + Math.floor(parseInt(m[1], 10) / window.NANOSAE_CHUNK) + ".js");
      } else if (!(path in window.NANOSAE_DATA)) await loadScript("data/" + path + ".js");
      const found = window.NANOSAE_DATA[path];
      if (found === undefined) throw new Error("no data for " + path);
      return found;
    }
    const r = await fetch("api/" + path);
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || r.statusText);
    return body;
  }

  async function post(path, payload) {
    const r = await fetch("api/" + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
    const body = await r.json();
    if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    return body;
  }

  function bars(counts, labels, width, height) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    const max = Math.max(1, ...counts);
    const w = width / counts.length;
    counts.forEach((c, i) => {
      const r = document.createElementNS(ns, "rect");
      const h = (c / max) * (height - 4);
      r.setAttribute("x", i * w);
      r.setAttribute("y", height - h);
      r.setAttribute("width", Math.max(1, w - 1));
      r.setAttribute("height", h);
      const t = document.createElementNS(ns, "title");
      t.textContent = (labels ? labels[i] + ": " : "") + c;
      r.append(t);
      svg.append(r);
    });
    return svg;
  }

  // a token as a reader sees it: line breaks and tabs as visible marks (an example stays one line), special
  // tokens (<|im_start|>, <s>, ...) as badges
  const SPECIAL = /^(<\|[^|]*\|>|<\/?s>|<unk>|<pad>)$/;
  function tokenSpan(text, attrs) {
    const special = SPECIAL.test(text);
    const span = el("span", Object.assign({}, attrs, { class: (attrs.class || "tok") + (special ? " special" : "") }));
    span.textContent = special ? text : text.replace(/\r?\n/g, "↵").replace(/\t/g, "⇥");
    return span;
  }

  function heat(example, maxAct) {
    const line = el("div", { class: "example" });
    example.tokens.forEach((tok, i) => {
      const a = example.acts[i] || 0;
      const alpha = maxAct > 0 ? Math.min(1, a / maxAct) : 0;
      const span = tokenSpan(tok, { class: "tok" + (i === example.focus ? " focus" : ""), title: "activation " + fmt(a), "data-act": String(a) });
      if (a > 0) span.style.background = "rgba(230, 110, 20, " + (0.15 + 0.85 * alpha).toFixed(3) + ")";
      line.append(span);
    });
    return line;
  }

  // a model-diffing crosscoder (nanosae diff RUN): the relative decoder norms, as Lindsey et al. plot them
  function diffCard(d) {
    const [a, b] = d.models;
    const n = d.histogram.length;
    const labels = d.histogram.map((_, i) => (i / n).toFixed(2) + "–" + ((i + 1) / n).toFixed(2));
    const c = d.counts;
    return el("div", { class: "card", id: "diff-histogram" },
      el("h3", { text: "relative decoder norm |d_B| / (|d_A| + |d_B|)" }),
      bars(d.histogram.map((v) => Math.log10(1 + v)), labels.map((l, i) => l + " (" + d.histogram[i] + " latents)"), 460, 140),
      el("p", { class: "muted", text: "0: " + a + " (A) only · 1: " + b + " (B) only · log scale · " + c["A-only"] + " A-only, " +
        c["B-only"] + " B-only, " + c.shared + " shared (median cosine " + fmt(d.shared_cosine_median, 3) + ")" }));
  }

  async function overview() {
    const [ov, list] = await Promise.all([get("overview"), features()]);
    app.replaceChildren();
    const meta = ov.meta;
    document.getElementById("where").textContent = meta.model + " · " + (meta.kind === "transcoder" ? meta.hook + " → " + meta.hook_out : meta.hook) + " · " + meta.d_sae + " latents";
    const metrics = el("table", {});
    for (const [k, v] of Object.entries(ov.metrics)) metrics.append(el("tr", {}, el("th", { text: k }), el("td", { text: fmt(v) })));
    const h = ov.density_hist;
    const labels = h.edges.slice(0, -1).map((e) => "10^" + e.toFixed(2));
    app.append(el("div", { class: "grid" },
      el("div", { class: "card" }, el("h3", { text: "metrics" }), Object.keys(ov.metrics).length ? metrics : el("p", { class: "muted", text: "no eval.json yet (nanosae eval RUN)" })),
      el("div", { class: "card" }, el("h3", { text: "feature density (log10)" }), bars(h.counts, labels, 460, 140),
        el("p", { class: "muted", text: h.never_fired + " latents never fired in " + meta.tokens + " tokens" })),
      ov.diff ? diffCard(ov.diff) : ""));
    const search = el("input", { id: "search", size: "40", placeholder: MODE === "static" ?
      "search id, explanation or output token" : "search id, explanation, output token or example text" });
    const sort = el("select", { id: "sort" }, ...["density", "max_act", "mean_act", "score", "id"].map((s) => el("option", { value: s, text: "sort: " + s })));
    const table = el("table", { id: "features" });
    const count = el("span", { id: "showing", class: "muted" });
    const prev = el("button", { id: "page-prev", text: "← previous" });
    const next = el("button", { id: "page-next", text: "next →" });
    const PAGE = 100;
    let page = 0, pending = 0;
    async function matching(q) {
      if (!q) return list;
      if (MODE !== "static" && !/^\d+$/.test(q)) {  // the server also searches the examples' text
        const ids = new Set((await get("features?limit=100000&q=" + encodeURIComponent(q))).items.map((f) => f.id));
        return list.filter((f) => ids.has(f.id));
      }
      const low = q.toLowerCase();
      return list.filter((f) => String(f.id) === q || (f.explanation || "").toLowerCase().includes(low) ||
        f.top_logits.some((t) => t.toLowerCase().includes(low)));
    }
    async function render() {
      const ticket = ++pending;
      let rows = await matching(search.value.trim());
      if (ticket !== pending) return;  // a newer keystroke is on its way
      const key = sort.value;
      // dense latents (firing on more than dense_threshold of tokens) after the rest, whatever the order
      const dense = (f) => (f.density > ov.dense_threshold ? 1 : 0);
      rows = rows.slice().sort((a, b) => dense(a) - dense(b) ||
        (key === "id" ? a.id - b.id : (b[key] ?? -Infinity) - (a[key] ?? -Infinity)));
      page = Math.min(page, Math.max(0, Math.ceil(rows.length / PAGE) - 1));
      const shown = rows.slice(page * PAGE, (page + 1) * PAGE);
      count.textContent = rows.length ? "showing " + (page * PAGE + 1) + "–" + (page * PAGE + shown.length) + " of " + rows.length
        + (rows.length < list.length ? " (of " + list.length + " features)" : " features") : "no feature matches";
      prev.disabled = page === 0;
      next.disabled = (page + 1) * PAGE >= rows.length;
      table.replaceChildren(el("tr", {}, ...["id", "density", "max act", "explanation", "top output tokens"].map((t) => el("th", { text: t }))));
      for (const f of shown) {
        table.append(el("tr", { class: dense(f) ? "row dense" : "row", "data-id": String(f.id), onclick: () => (location.hash = "#/feature/" + f.id) },
          el("td", { text: String(f.id) }), el("td", { text: fmt(f.density, 3) + (dense(f) ? " dense" : "") }), el("td", { text: fmt(f.max_act, 3) }),
          el("td", { text: f.explanation || "" }), el("td", { text: f.top_logits.join(" · ") })));
      }
    }
    search.oninput = () => { page = 0; render(); };
    sort.onchange = () => { page = 0; render(); };
    prev.onclick = () => { page -= 1; render(); };
    next.onclick = () => { page += 1; render(); };
    // the feature list first, in the first screen; metrics and the density histogram after it
    app.prepend(el("div", { class: "card" }, el("h3", { text: "features" }), search, " ", sort, " ", count, " ", prev, " ", next, table));
    render();
  }

  async function features() {
    if (!featureList) featureList = (await get(MODE === "static" ? "features" : "features?sort=id&desc=false&limit=100000")).items;
    return featureList;
  }

  // an activation histogram over the observed range, with axis ticks and labels
  function histogram(counts, edges) {
    const ns = "http://www.w3.org/2000/svg";
    const used = counts.map((c, i) => (c > 0 ? i : -1)).filter((i) => i >= 0);
    const first = used.length ? used[0] : 0;
    const last = used.length ? used[used.length - 1] : counts.length - 1;
    const shown = counts.slice(first, last + 1);
    const lo = (i) => (i === 0 ? 0 : edges[i - 1]);
    const width = 460, height = 150, left = 40, bottom = 30;
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("id", "histogram");
    const max = Math.max(1, ...shown);
    const w = (width - left) / Math.max(1, shown.length);
    const text = (x, y, s, anchor) => {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "10");
      t.setAttribute("text-anchor", anchor || "middle"); t.setAttribute("class", "tick");
      t.textContent = s;
      svg.append(t);
    };
    shown.forEach((c, k) => {
      const r = document.createElementNS(ns, "rect");
      const h = (c / max) * (height - bottom - 6);
      r.setAttribute("x", left + k * w); r.setAttribute("y", height - bottom - h);
      r.setAttribute("width", Math.max(1, w - 1)); r.setAttribute("height", h);
      const t = document.createElementNS(ns, "title");
      t.textContent = fmt(lo(first + k), 3) + "–" + fmt(edges[first + k] ?? lo(first + k), 3) + ": " + c;
      r.append(t);
      svg.append(r);
    });
    for (const k of [0, Math.floor(shown.length / 2), shown.length]) text(left + k * w, height - bottom + 14, fmt(lo(first + k), 2));
    text(left + (width - left) / 2, height - 2, "activation (log-spaced bins)");
    text(left - 4, 10, String(max), "end");
    text(left - 4, height - bottom, "0", "end");
    return svg;
  }

  async function feature(id) {
    const [f, list] = await Promise.all([get("feature/" + id), features()]);
    const names = new Map(list.map((x) => [x.id, x.explanation]));
    const n = list.length;
    app.replaceChildren();
    const nav = el("p", { id: "feature-nav" },
      el("a", { id: "prev", href: "#/feature/" + ((id - 1 + n) % n), text: "← previous" }), " · ",
      el("a", { id: "next", href: "#/feature/" + ((id + 1) % n), text: "next →" }), " · ",
      el("a", { id: "random", href: "#/feature/" + Math.floor(Math.random() * n), text: "random" }),
      MODE === "static" ? "" : el("span", {}, " · ", el("a", { id: "steer-link", href: "#/steer?feature=" + id + "&value=" +
        fmt(2 * Math.max(1, f.max_act), 3), text: "steer with this feature" })));
    app.append(el("h2", { id: "feature-title", text: "feature " + f.id }), nav,
      el("p", {}, el("b", { text: "explanation: " }),
        el("span", { id: "explanation", text: f.explanation || f.note || "none yet (nanosae explain RUN)" }),
        el("span", { class: "muted", id: "score", text: scoreText(f) })),
      f.explanation && f.note ? el("p", { class: "muted", id: "score-note", text: f.note }) : "",
      (f.explanations || []).length > 1 ? el("table", { id: "explanations" },
        el("tr", {}, ...["method", "explanation", "score"].map((t) => el("th", { text: t }))),
        ...f.explanations.map((e) => el("tr", { class: "method-row", "data-method": e.method },
          el("td", { text: e.method }), el("td", { text: e.explanation || e.note || "" }),
          el("td", { class: "muted", text: scoreText(Object.assign({}, e, { method: "" })) })))) : "",
      el("p", { class: "muted", text: "density " + fmt(f.density, 3) + " · fires " + f.fires + " · mean " + fmt(f.mean_act, 3) + " · max " + fmt(f.max_act, 3) }));
    if (f.diff) {
      app.append(el("p", { id: "diff-line", class: "muted", text: "relative decoder norm " + fmt(f.diff.relative_norm, 3) +
        " (0: " + f.diff.models[0] + " only, 1: " + f.diff.models[1] + " only) · cosine of its two rows " + fmt(f.diff.cosine, 3) +
        " · change " + fmt(f.diff.change, 3) }));
    }
    if (!f.fires) {
      app.append(el("p", { id: "never-fired", class: "notice", text: "This latent never fired in the text the feature " +
        "database read, so it has no examples, histogram or explanation (a dead latent, or one for text not read)." }));
    }
    // the examples first: what a reader looks for, in the first screen
    const top = f.examples.filter((e) => e.kind === "top");
    const topCard = el("div", { class: "card examples", id: "top-examples" }, el("h4", { text: "top activations (one per window)" }));
    top.forEach((e) => topCard.append(el("div", { class: "ex-row" }, el("span", { class: "muted act", text: fmt(e.activation, 3) }), heat(e, f.max_act))));
    if (top.length) app.append(topCard);
    if (f.diff && MODE !== "static" && top.length) {
      const sides = el("div", { class: "card examples", id: "sides" }, el("h4", { text: "each model alone" }),
        el("p", { class: "muted", text: "running its top examples through both models…" }));
      app.append(sides);
      get("feature/" + id + "/sides").then((r) => {
        const [a, b] = r.models;
        sides.replaceChildren(el("h4", { text: "each model alone: the feature on A's activations and on B's, same tokens" }));
        r.examples.forEach((e, k) => {
          for (const [side, name] of [["A", a], ["B", b]]) {
            sides.append(el("div", { class: "ex-row side-" + side }, el("span", { class: "muted act", text: side + " " + name.slice(-18) }),
              heat({ tokens: top[k].tokens, acts: e[side], focus: top[k].focus }, f.max_act)));
          }
        });
      }).catch((err) => sides.replaceChildren(el("h4", { text: "each model alone" }), el("p", { class: "muted", text: String(err.message || err) })));
    }
    const quant = f.examples.filter((e) => e.kind === "quantile");
    if (quant.length) {
      const card = el("div", { class: "card examples", id: "quantile-examples" }, el("h4", { text: "across the range of its activations" }));
      quant.forEach((e, k) => {
        const pct = Math.round((100 * k) / Math.max(1, quant.length - 1));
        const next = quant[k + 1] ? fmt(quant[k + 1].activation, 3) : fmt(f.max_act, 3);
        card.append(el("h5", { class: "interval", text: "percentile " + pct + " of its firings · activation " + fmt(e.activation, 3) + " (next shown: " + next + ")" }),
          heat(e, f.max_act));
      });
      app.append(card);
    }
    const logits = (rows, title) => el("div", {}, el("h4", { text: title }),
      el("table", {}, ...rows.map(([t, v]) => el("tr", {}, el("td", { class: "example", text: JSON.stringify(t) }), el("td", { text: fmt(v, 3) })))));
    const cof = el("div", { id: "cofiring" }, el("h4", { text: "fires together with" }),
      ...f.cofiring.map(([j, p]) => el("div", {}, el("a", { href: "#/feature/" + j, text: "feature " + j }), " ",
        el("span", { class: "muted", text: "P = " + fmt(p, 3) + " · " }), el("span", { class: "cofire-expl", text: names.get(j) || "(no explanation)" }))));
    app.append(el("div", { class: "grid" },
      el("div", { class: "card" }, el("h4", { text: "activation histogram" }), histogram(f.histogram.counts, f.histogram.edges)),
      el("div", { class: "card" }, cof)),
      el("div", { class: "card", id: "measured-effect" }, el("h4", { text: "output effect, measured" }),
        el("p", { class: "muted", text: MODE === "static" ? "measured by `nanosae view` (it runs the model): not in a static site" :
          "measuring: ablating it where it fires in its top examples…" })),
      el("div", { class: "grid" }, el("div", { class: "card" }, logits(f.top_logits, "logit lens, boosted (W_dec·W_U: what the direction would do at the output, not measured)")),
        el("div", { class: "card" }, logits(f.bottom_logits, "logit lens, suppressed"))));
    if (MODE !== "static") {
      get("feature/" + id + "/effect").then((e) => {
        const card = document.getElementById("measured-effect");
        if (!card) return;
        if (e.note) { card.replaceChildren(el("h4", { text: "output effect, measured" }), el("p", { class: "muted", text: e.note })); return; }
        const agree = e.lens_top_overlap !== undefined ? "; the logit lens below agrees on " + e.lens_top_overlap + " of its top 10 (correlation " + fmt(e.lens_correlation, 2) + ")" : "";
        card.replaceChildren(el("h4", { text: "output effect, measured" }),
          el("p", { class: "muted", id: "effect-how", text: "mean change of next-token log-probability where it fires, it present minus it ablated, over " +
            e.positions + " positions in " + e.windows + " of its top examples" + agree }),
          el("div", { class: "grid" }, logits(e.promoted, "promoted"), logits(e.suppressed, "suppressed")));
      }).catch(() => {});
    }
    window.scrollTo(0, 0);
  }

  function runText() {
    // tokens are coloured by one feature at a time (the strongest non-dense one in the text, or the one picked
    // from the list or from a token's panel), as Neuronpedia does: every token by its own strongest latent
    // would paint the text in the dense latents' colour
    const box = el("textarea", { id: "run-input" });
    box.value = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)";
    const out = el("div", { class: "card example", id: "run-output" });
    const panel = el("div", { class: "card", id: "run-panel" }, el("p", { class: "muted", text: "click a token to see its strongest features" }));
    const choose = el("select", { id: "run-feature" });
    const shown = el("p", { class: "muted", id: "run-colour" });
    let tokens = [], names = new Map(), maxima = new Map();
    async function colour(id) {
      const r = await post("run_text", { text: box.value, top_k: 5, feature: id });
      const max = Math.max(1e-9, maxima.get(id) || Math.max(...r.tokens.map((t) => t.value)));
      out.querySelectorAll(".tok").forEach((span, n) => {
        const v = r.tokens[n].value;
        span.dataset.value = String(v);
        span.style.background = v > 0 ? "rgba(230, 110, 20, " + Math.min(1, 0.15 + 0.85 * v / max).toFixed(3) + ")" : "";
      });
      choose.value = String(id);
      shown.textContent = "coloured by feature " + id + ": " + (names.get(id) || "(no explanation)");
    }
    choose.onchange = () => colour(Number(choose.value));
    const go = el("button", { id: "run-button", text: "run", onclick: async () => {
      out.textContent = "running…";
      try {
        const [r, list] = await Promise.all([post("run_text", { text: box.value, top_k: 5, include_dense: true }), features()]);
        names = new Map(list.map((x) => [x.id, x.explanation]));
        maxima = new Map(list.map((x) => [x.id, x.max_act]));
        tokens = r.tokens;
        const dense = new Set(r.dense);
        const total = new Map();  // each feature's summed activation over the text
        for (const t of tokens) for (const [i, v] of t.features) total.set(i, (total.get(i) || 0) + v);
        // dense features (firing on more than the overview's share of tokens) after the others, and marked
        const ranked = [...total.entries()].sort((a, b) => dense.has(a[0]) - dense.has(b[0]) || b[1] - a[1]).map(([i]) => i);
        choose.replaceChildren(...ranked.map((i) => el("option", { value: String(i), text: "feature " + i + (dense.has(i) ? " (dense)" : "") +
          ": " + (names.get(i) || "(no explanation)") })));
        out.replaceChildren();
        for (const t of tokens) {
          const span = tokenSpan(t.text, { class: "tok", title: t.features.map(([i, v]) => i + ": " + fmt(v, 3)).join("\n") });
          span.onclick = () => {
            out.querySelectorAll(".selected").forEach((x) => x.classList.remove("selected"));
            span.classList.add("selected");
            panel.replaceChildren(el("h4", { text: "token " + JSON.stringify(t.text) }),
              ...(t.features.length ? t.features.map(([i, v]) => el("div", { class: "panel-feature" },
                el("a", { href: "#/feature/" + i, text: "feature " + i }), el("span", { class: "muted", text: " " + fmt(v, 3) + " · " }),
                el("span", { text: (dense.has(i) ? "(dense) " : "") + (names.get(i) || "(no explanation)") }), " ",
                el("button", { class: "colour-by", text: "colour by it", onclick: () => colour(i) }))) : [el("p", { class: "muted", text: "no feature fires here" })]));
          };
          out.append(span);
        }
        if (ranked.length) await colour(ranked[0]);
        else shown.textContent = "no feature fires in this text";
      } catch (e) { out.replaceChildren(el("span", { class: "error", text: String(e.message || e) })); }
    } });
    app.replaceChildren(el("h2", { text: "run text" }), el("p", { class: "muted", text: "click a token to see its strongest features" }),
      box, go, " ", choose, shown, el("div", { class: "run-cols" }, out, panel));
  }

  function steerPage(params) {
    const prompt = el("input", { id: "steer-prompt", size: "60", value: "The weather today is" });
    const edits = el("input", { id: "steer-edits", size: "30", placeholder: "123=+8, 77=0" });
    if (params.get("feature")) edits.value = params.get("feature") + "=+" + (params.get("value") || "8");
    const tokens = el("input", { id: "steer-tokens", type: "number", min: "1", max: "128", value: "24", size: "4" });
    const temp = el("input", { id: "steer-temperature", type: "number", min: "0", step: "0.1", value: "0", size: "4" });
    const out = el("div", { class: "cols" });
    const go = el("button", { text: "generate", onclick: async () => {
      out.textContent = "generating…";
      try {
        const parsed = edits.value.split(",").map((s) => s.trim()).filter(Boolean).map((s) => {
          const m = s.match(/^(\d+)\s*=\s*([+-]?)([\d.]+)$/);
          if (!m) throw new Error("cannot read " + s);
          const v = parseFloat(m[3]) * (m[2] === "-" ? -1 : 1);
          return { latent: parseInt(m[1], 10), value: v, mode: m[2] ? "add" : "clamp" };
        });
        const r = await post("steer", { prompt: prompt.value, edits: parsed, max_new_tokens: parseInt(tokens.value, 10),
                                        temperature: parseFloat(temp.value) });
        const plain = (text) => text.replace(/<\|[^|]*\|>/g, "");  // special tokens are not text
        out.replaceChildren(el("div", {}, el("h4", { text: "baseline" }), el("pre", { id: "steer-baseline", text: prompt.value + plain(r.baseline) })),
          el("div", {}, el("h4", { text: "steered" }), el("pre", { id: "steer-steered", text: prompt.value + plain(r.steered) })));
      } catch (e) { out.replaceChildren(el("span", { class: "error", text: String(e.message || e) })); }
    } });
    app.replaceChildren(el("h2", { text: "steering playground" }),
      el("p", { class: "muted", text: "LATENT=+V adds V × its decoder direction, LATENT=V clamps it, LATENT=0 ablates" }),
      prompt, " ", edits, " ", el("label", {}, " tokens ", tokens), el("label", {}, " temperature ", temp), " ", go, out);
  }

  async function route() {
    const hash = location.hash || "#/";
    try {
      const m = hash.match(/^#\/feature\/(\d+)$/);
      if (m) await feature(parseInt(m[1], 10));
      else if ((hash === "#/run" || hash.startsWith("#/steer")) && MODE === "static")
        app.replaceChildren(el("p", { id: "needs-server", text: "Run text and steering run the model, so they need the " +
          "viewer's server: nanosae view RUN (this is a static export)." }));
      else if (hash === "#/run") runText();
      else if (hash.startsWith("#/steer")) steerPage(new URLSearchParams(hash.split("?")[1] || ""));
      else await overview();
    } catch (e) {
      app.replaceChildren(el("p", { class: "error", text: String(e.message || e) }));
    }
  }

  if (MODE === "static") document.querySelectorAll(".live").forEach((a) => a.remove());
  window.addEventListener("hashchange", route);
  route();
})();
