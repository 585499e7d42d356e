// tokenomics admin page: vanilla JS, no external fetch. Text from the API is inserted with
// textContent only, never as HTML.
"use strict";
(function () {
  const API = "/admin/api";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  const num = (n) => Number(n || 0).toLocaleString("en-US");
  function usd(n) {
    n = Number(n || 0);
    if (n === 0) return "$0";
    return "$" + (n >= 0.01 ? n.toFixed(4) : n.toPrecision(2));
  }

  async function api(method, path, body) {
    const opts = { method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
    if (method !== "GET") {
      opts.headers["X-Tokenomics-Admin"] = "1";
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body || {});
    }
    const res = await fetch(API + path, opts);
    const type = res.headers.get("content-type") || "";
    const data = type.includes("json") ? await res.json() : await res.text();
    if (!res.ok) {
      const msg = data && data.error ? data.error.message : String(data);
      const err = new Error(msg);
      err.status = res.status;
      throw err;
    }
    return data;
  }
  function status(text) { $("status").textContent = text; }

  // --- tabs ---------------------------------------------------------------------------------
  const loaders = {};
  function show(name) {
    for (const b of document.querySelectorAll("nav button")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
    for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== name;
    if (loaders[name]) loaders[name]().catch((e) => status(e.message));
  }
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.tab));

  // --- charts (inline SVG) -------------------------------------------------------------------
  function lineChart(target, points, key, fmt) {
    clear(target);
    const W = 400, H = 160, P = 30;
    const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    box.appendChild(svg("line", { x1: P, y1: H - P, x2: W - 5, y2: H - P, class: "axis" }));
    if (!points.length) {
      const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }); t.textContent = "no requests yet";
      box.appendChild(t); target.appendChild(box); return;
    }
    const max = Math.max(...points.map(key), 1e-12);
    const x = (i) => P + (points.length === 1 ? (W - P - 5) / 2 : i * (W - P - 5) / (points.length - 1));
    const y = (v) => H - P - (v / max) * (H - 2 * P);
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(key(p)).toFixed(1)}`).join(" ");
    box.appendChild(svg("path", { d, class: "line" }));
    points.forEach((p, i) => {
      const c = svg("circle", { cx: x(i), cy: y(key(p)), r: 3, class: "bar" });
      const tip = svg("title"); tip.textContent = `${p.t}: ${fmt(key(p))}`; c.appendChild(tip);
      box.appendChild(c);
    });
    const top = svg("text", { x: 2, y: P - 8 }); top.textContent = fmt(max); box.appendChild(top);
    const first = svg("text", { x: P, y: H - 8 }); first.textContent = points[0].t.slice(5, 16).replace("T", " ");
    box.appendChild(first);
    if (points.length > 1) {
      const last = svg("text", { x: W - 5, y: H - 8, "text-anchor": "end" });
      last.textContent = points[points.length - 1].t.slice(5, 16).replace("T", " "); box.appendChild(last);
    }
    target.appendChild(box);
  }
  function barChart(target, entries) {
    clear(target);
    const rows = entries.slice(0, 8), W = 400, R = 22, H = Math.max(40, rows.length * R + 10);
    const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    if (!rows.length) {
      const t = svg("text", { x: W / 2, y: 24, "text-anchor": "middle" }); t.textContent = "no requests yet";
      box.appendChild(t); target.appendChild(box); return;
    }
    const max = Math.max(...rows.map((r) => r.value), 1);
    rows.forEach((r, i) => {
      const label = svg("text", { x: 0, y: i * R + 15 }); label.textContent = r.name.length > 22 ? r.name.slice(0, 21) + "…" : r.name;
      box.appendChild(label);
      const w = Math.max(1, (r.value / max) * (W - 230));
      const bar = svg("rect", { x: 150, y: i * R + 4, width: w.toFixed(1), height: R - 8, class: "bar" });
      const tip = svg("title"); tip.textContent = `${r.name}: ${num(r.value)} tokens, ${usd(r.cost)}`; bar.appendChild(tip);
      box.appendChild(bar);
      const v = svg("text", { x: 150 + w + 4, y: i * R + 15 }); v.textContent = num(r.value); box.appendChild(v);
    });
    target.appendChild(box);
  }
  function rollup(table, name) {
    return Object.entries(table || {}).map(([k, v]) => ({ name: name ? name(k, v) : k, value: v.total_tokens, cost: v.cost_usd }))
      .sort((a, b) => b.value - a.value);
  }

  // --- analytics -----------------------------------------------------------------------------
  loaders.analytics = async function () {
    const q = new URLSearchParams({ bucket: $("an-bucket").value });
    if ($("an-since").value.trim()) q.set("since", $("an-since").value.trim());
    const s = await api("GET", "/analytics/summary?" + q.toString());
    const t = s.totals, cards = $("an-totals");
    clear(cards);
    for (const [label, value] of [["requests", num(t.request_count)], ["input tokens", num(t.input_tokens)],
      ["output tokens", num(t.output_tokens)], ["cost", usd(t.cost_usd)], ["errors", num(t.error_count)],
      ["rule violations", num(t.rule_violation_count)]]) {
      const c = el("div", { class: "card" }); c.appendChild(el("b", {}, value)); c.appendChild(el("span", { class: "muted" }, label));
      cards.appendChild(c);
    }
    lineChart($("ch-tokens"), s.series, (p) => p.input_tokens + p.output_tokens, num);
    lineChart($("ch-cost"), s.series, (p) => p.cost_usd, usd);
    barChart($("ch-model"), rollup(s.by_model));
    barChart($("ch-provider"), rollup(s.by_provider));
    barChart($("ch-token"), rollup(s.by_token, (k, v) => v.label || k.slice(0, 12)));
    barChart($("ch-branch"), rollup(s.by_branch));
    status("updated " + new Date().toLocaleTimeString());
  };
  $("an-refresh").addEventListener("click", () => loaders.analytics().catch((e) => status(e.message)));
  $("an-bucket").addEventListener("change", () => loaders.analytics().catch((e) => status(e.message)));

  let refreshTimer = null;
  function startFeed() {
    if (!window.EventSource) return;
    const source = new EventSource(API + "/events");
    const onEvent = (msg) => {
      let ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      const d = ev.data || {}, row = el("tr");
      row.appendChild(el("td", {}, (ev.timestamp || "").slice(11, 19)));
      row.appendChild(el("td", {}, ev.type));
      row.appendChild(el("td", {}, d.model || "-"));
      row.appendChild(el("td", {}, d.status !== undefined ? d.status + (d.error ? " " + d.error : "") : (d.rule || d.action || "")));
      row.appendChild(el("td", {}, d.input_tokens !== undefined ? num(d.input_tokens + d.output_tokens) : ""));
      row.appendChild(el("td", {}, d.cost_usd !== undefined ? usd(d.cost_usd) : ""));
      const feed = $("feed");
      feed.insertBefore(row, feed.firstChild);
      while (feed.childNodes.length > 100) feed.removeChild(feed.lastChild);
      if (ev.type === "request.completed" && !$("analytics").hidden) {
        clearTimeout(refreshTimer);
        refreshTimer = setTimeout(() => loaders.analytics().catch(() => {}), 500);
      }
    };
    source.addEventListener("request.completed", onEvent);
    for (const t of ["rule.violation", "rule.warning", "rule.match", "rule.mask"]) source.addEventListener(t, onEvent);
  }

  // --- keys ----------------------------------------------------------------------------------
  let editing = null;
  function openForm(key) {
    editing = key;
    $("key-form").hidden = false;
    $("key-form-title").textContent = key ? "Edit key " + key.hash.slice(0, 12) : "New key";
    $("key-save").textContent = key ? "Save" : "Create";
    $("key-label").value = key ? key.label : "";
    $("key-expires").value = key && key.expires_at ? key.expires_at : "";
    $("key-policy").value = JSON.stringify(key ? key.policy : {}, null, 2);
    $("key-error").textContent = "";
  }
  $("key-new").addEventListener("click", () => openForm(null));
  $("key-cancel").addEventListener("click", () => { $("key-form").hidden = true; });
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    let policy;
    try { policy = JSON.parse($("key-policy").value || "{}"); } catch (err) {
      $("key-error").textContent = "The policy is not valid JSON: " + err.message; return;
    }
    const body = { policy, label: $("key-label").value };
    const expires = $("key-expires").value.trim();
    try {
      if (editing) {
        body.expires = expires || null;
        await api("PUT", "/keys/" + encodeURIComponent(editing.hash), body);
      } else {
        if (expires) body.expires = expires;
        const made = await api("POST", "/keys", body);
        $("key-token").textContent = made.token;
        $("key-once").hidden = false;
      }
      $("key-form").hidden = true;
      await loaders.keys();
    } catch (err) { $("key-error").textContent = err.message; }
  });
  $("key-copy").addEventListener("click", async () => {
    const text = $("key-token").textContent;
    try { await navigator.clipboard.writeText(text); $("key-copy").textContent = "Copied"; } catch (e) {
      const range = document.createRange(); range.selectNodeContents($("key-token"));
      const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
      $("key-copy").textContent = "Selected: press Ctrl+C";
    }
  });
  $("key-once-close").addEventListener("click", () => { $("key-token").textContent = ""; $("key-once").hidden = true; $("key-copy").textContent = "Copy"; });

  function meter(w) {
    const box = el("div", { class: "meter" });
    const unit = w.unit === "tokens" ? (v) => num(v) : usd;
    const name = `${w.unit === "tokens" ? "tokens" : "USD"} ${w.period}${w.scope ? " (" + w.scope + ")" : ""}`;
    box.appendChild(el("div", {}, `${name}: used ${w.used === null ? "?" : unit(w.used)} · left ${w.left === null ? "?" : unit(w.left)} of ${unit(w.cap)}`));
    const track = el("div", { class: "track" }), fill = el("div", { class: "fill" });
    const share = w.cap ? Math.min(1, (w.used || 0) / w.cap) : 1;
    fill.style.width = (share * 100).toFixed(1) + "%";
    if (share > 0.8) fill.classList.add("high");
    track.appendChild(fill); box.appendChild(track);
    return box;
  }
  loaders.keys = async function () {
    const data = await api("GET", "/keys"), list = $("key-list");
    clear(list);
    if (!data.keys.length) list.appendChild(el("p", { class: "muted" }, "No keys yet: create one with New key."));
    for (const k of data.keys) {
      const card = el("div", { class: "key", "data-hash": k.hash });
      const head = el("header");
      const title = el("div");
      title.appendChild(el("b", { class: "key-label" }, k.label || "(no label)"));
      title.appendChild(el("span", { class: k.expired ? "status-expired" : "status-active" }, k.expired ? "  EXPIRED" : "  active"));
      head.appendChild(title);
      const actions = el("div");
      const edit = el("button", { type: "button", class: "key-edit" }, "Edit");
      edit.addEventListener("click", () => openForm(k));
      const revoke = el("button", { type: "button", class: "danger key-revoke" }, "Revoke");
      revoke.addEventListener("click", async () => {
        if (!window.confirm("Revoke key " + (k.label || k.hash.slice(0, 12)) + "? Clients using it get 401 at once.")) return;
        try { await api("DELETE", "/keys/" + encodeURIComponent(k.hash)); await loaders.keys(); } catch (e) { status(e.message); }
      });
      actions.appendChild(edit); actions.appendChild(revoke); head.appendChild(actions);
      card.appendChild(head);
      card.appendChild(el("div", { class: "meta" }, `hash ${k.hash.slice(0, 16)} · created ${k.created_at} · expires ${k.expires_at || "never"}`));
      card.appendChild(el("div", { class: "spend" }, `spent ${usd(k.usage.cost_usd)} · ${num(k.usage.tokens)} tokens · ${num(k.usage.requests)} requests`));
      for (const w of k.usage.windows) card.appendChild(meter(w));
      list.appendChild(card);
    }
  };

  // --- sessions ------------------------------------------------------------------------------
  loaders.sessions = async function () {
    const sessions = await api("GET", "/sessions"), body = $("session-list");
    clear(body);
    for (const s of sessions.slice().reverse()) {
      const row = el("tr", { class: "clickable", "data-session": s.session_id });
      const t = s.totals || {};
      for (const v of [s.session_id, (s.started_at || "").replace("T", " ").slice(0, 19), (s.git || {}).branch || "-",
        num(t.request_count), num(t.total_tokens), usd(t.cost_usd)]) row.appendChild(el("td", {}, v));
      row.addEventListener("click", () => detail(s.session_id).catch((e) => status(e.message)));
      body.appendChild(row);
    }
  };
  async function detail(id) {
    const s = await api("GET", "/sessions/" + encodeURIComponent(id)), box = $("session-detail");
    clear(box);
    box.appendChild(el("h2", {}, `Session ${s.session_id}: ${num((s.totals || {}).request_count)} requests`));
    const table = el("table", { class: "list" }), head = el("tr");
    for (const h of ["time", "model", "endpoint", "status", "in", "out", "cost", "ms"]) head.appendChild(el("th", {}, h));
    const thead = el("thead"); thead.appendChild(head); table.appendChild(thead);
    const tbody = el("tbody", { id: "request-list" });
    for (const r of s.requests || []) {
      const row = el("tr", { "data-request": r.request_id });
      for (const v of [(r.timestamp || "").slice(11, 19), r.model, r.endpoint, r.status_code + (r.error ? " " + r.error : ""),
        num(r.input_tokens), num(r.output_tokens), usd(r.cost_usd), Math.round(r.duration_ms)]) row.appendChild(el("td", {}, v));
      tbody.appendChild(row);
    }
    table.appendChild(tbody); box.appendChild(table);
  }

  // --- memory --------------------------------------------------------------------------------
  loaders.memory = async function () {
    const data = await api("GET", "/memory/files"), list = $("memory-list");
    clear(list);
    if (!data.files.length) list.appendChild(el("li", { class: "muted" }, "No memory files: enable memory in a policy or ledger.memory."));
    for (const f of data.files) {
      const li = el("li"), a = el("a", { tabindex: "0" }, f.path);
      a.addEventListener("click", async () => {
        try {
          const text = await api("GET", "/memory/files/" + f.path.split("/").map(encodeURIComponent).join("/"));
          $("memory-view").textContent = text;
        } catch (e) { $("memory-view").textContent = e.message; }
      });
      li.appendChild(a); li.appendChild(el("span", { class: "muted" }, `  ${num(f.size)} bytes`));
      list.appendChild(li);
    }
  };

  api("GET", "/health").then((h) => status(`v${h.version} · up ${Math.round(h.uptime_s)} s`)).catch((e) => status(e.message));
  show("analytics");
  startFeed();
})();
