// Claw Gateway dashboard: vanilla ES2020, no build step, no dependencies.
// Talks to the control plane's JSON API (/api/v1/*) with the operator's
// token (kept in sessionStorage) and follows /api/v1/events (server-sent
// events read from a fetch stream, since EventSource cannot send headers).
// All content is built with DOM calls and textContent: nothing from the
// API is ever parsed as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "claw.token";
  const TABS = ["overview", "backends", "usage", "agents", "audit"];
  // Which views an event topic invalidates.
  const TOPIC_VIEWS = {
    proxies: ["overview"],
    backends: ["backends", "overview"],
    config: TABS,
    heartbeats: ["agents"],
    usage: ["overview", "usage"],
    audit: ["audit"],
    resync: TABS,
    hello: TABS,
  };

  const state = {
    token: null,
    me: null,
    tab: "overview",
    selectedBackend: null,
    selectedAgent: null,
    coolingEnds: null,
    usage: { granularity: "hourly", since: "24h", group_by: "model", model: "", backend: "", key: "", agent: "" },
    audit: { resource: "", token: "" },
    events: null, // AbortController of the event stream
    eventsGen: 0,
    loading: {},
    pending: {},
  };

  // ---------- DOM helpers ----------
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.setAttribute("class", v);
      else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  function badge(stateName, text, testid) {
    return h("span", { class: "badge", "data-state": stateName, "data-testid": testid }, text ?? stateName);
  }

  function table(headers, rows, emptyText) {
    if (!rows.length) return h("div", { class: "table-wrap" }, h("div", { class: "empty" }, emptyText || "Nothing here yet."));
    return h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        null,
        h("thead", null, h("tr", null, headers.map((x) => (typeof x === "string" ? h("th", null, x) : h("th", { class: x.cls }, x.t))))),
        h("tbody", null, rows)
      )
    );
  }

  // ---------- formatting ----------
  const nf = new Intl.NumberFormat("en-US");
  function num(n) {
    if (n === null || n === undefined || n === "") return "–";
    return nf.format(Number(n));
  }
  function compact(n) {
    n = Number(n) || 0;
    const a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e3) return (n / 1e3).toFixed(a >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(n * 100) / 100);
  }
  function money(x) {
    x = Number(x) || 0;
    if (x === 0) return "$0";
    if (Math.abs(x) < 0.000001) return "<$0.000001";
    if (Math.abs(x) < 0.01) return "$" + String(Number(x.toPrecision(2)));
    return "$" + x.toFixed(2);
  }
  function pad(n) {
    return String(n).padStart(2, "0");
  }
  function parseTime(t) {
    if (!t) return null;
    const d = new Date(t);
    return Number.isNaN(d.getTime()) ? null : d;
  }
  function hms(t) {
    const d = parseTime(t);
    return d ? `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` : "–";
  }
  function dateTime(t) {
    const d = parseTime(t);
    if (!d) return "–";
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function ago(t) {
    const d = parseTime(t);
    if (!d) return "";
    let sec = Math.round((Date.now() - d.getTime()) / 1000);
    const future = sec < 0;
    sec = Math.abs(sec);
    let txt;
    if (sec < 60) txt = `${sec}s`;
    else if (sec < 3600) txt = `${Math.floor(sec / 60)}m`;
    else if (sec < 86400) txt = `${Math.floor(sec / 3600)}h ${Math.floor((sec % 3600) / 60)}m`;
    else txt = `${Math.floor(sec / 86400)}d ${Math.floor((sec % 86400) / 3600)}h`;
    return future ? `in ${txt}` : `${txt} ago`;
  }
  function when(t) {
    const d = parseTime(t);
    if (!d) return "–";
    return h("span", { title: d.toISOString() }, dateTime(t), h("span", { class: "muted" }, " (" + ago(t) + ")"));
  }
  function duration(sec) {
    sec = Number(sec) || 0;
    if (sec % 86400 === 0 && sec >= 86400) return `${sec / 86400}d`;
    if (sec % 3600 === 0 && sec >= 3600) return `${sec / 3600}h`;
    if (sec % 60 === 0 && sec >= 60) return `${sec / 60}m`;
    return `${sec}s`;
  }
  function ms(n) {
    n = Number(n) || 0;
    return n >= 1000 ? `${(n / 1000).toFixed(n >= 10000 ? 0 : 1)}s` : `${n}ms`;
  }

  // ---------- API ----------
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, opts = {}) {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(path, {
        method: opts.method || "GET",
        headers,
        body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
        cache: "no-store",
      });
    } catch (e) {
      throw new ApiError(0, "unavailable", "The control plane is not reachable.");
    }
    let data = null;
    const text = await res.text().catch(() => "");
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (e) {
        data = null;
      }
    }
    if (!res.ok) {
      const err = (data && data.error) || {};
      const e = new ApiError(res.status, err.code || String(res.status), err.message || `${res.status} ${res.statusText}`);
      if (res.status === 401 && !opts.noSignOut) {
        signOut("Your token is no longer accepted. Sign in again.");
      }
      throw e;
    }
    return data || {};
  }

  const isAdmin = () => state.me && state.me.role === "admin";

  // ---------- session ----------
  async function signIn(token, fromStorage) {
    state.token = token;
    let me;
    try {
      me = await api("/api/v1/whoami", { noSignOut: true });
    } catch (e) {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(e.status === 401 || e.status === 403 ? "Token not accepted" : e.message);
      return;
    }
    if (!fromStorage) sessionStorage.setItem(TOKEN_KEY, token);
    state.me = me;
    $("login").hidden = true;
    $("nav").hidden = false;
    $("session").hidden = false;
    const who = $("whoami");
    clear(who);
    append(who, [h("b", { "data-testid": "whoami-name" }, me.name || "?"), " ", badge(me.role || "unknown", me.role || "unknown", "whoami-role")]);
    document.body.dataset.role = me.role || "";
    route();
    startEvents();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.me = null;
    stopEvents();
    for (const t of TABS) clear($(`view-${t}`));
    document.body.dataset.role = "";
    showLogin(message || "");
  }

  function showLogin(message) {
    $("nav").hidden = true;
    $("session").hidden = true;
    for (const t of TABS) $(`view-${t}`).hidden = true;
    $("login").hidden = false;
    const err = $("login-error");
    err.textContent = message || "";
    err.hidden = !message;
    $("token").value = "";
    $("token").focus();
  }

  // ---------- routing ----------
  function route() {
    if (!state.me) return;
    const tab = (location.hash || "#overview").slice(1);
    state.tab = TABS.includes(tab) ? tab : "overview";
    for (const t of TABS) $(`view-${t}`).hidden = t !== state.tab;
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.tab === state.tab);
    document.title = `${state.tab[0].toUpperCase()}${state.tab.slice(1)} · Claw Gateway`;
    load(state.tab);
  }

  // Loads a view; a load requested while one runs is queued (once).
  async function load(tab) {
    if (!state.me) return;
    if (state.loading[tab]) {
      state.pending[tab] = true;
      return;
    }
    state.loading[tab] = true;
    try {
      await LOADERS[tab]($(`view-${tab}`));
    } catch (e) {
      if (state.me) showError($(`view-${tab}`), e);
    } finally {
      state.loading[tab] = false;
      if (state.pending[tab]) {
        state.pending[tab] = false;
        if (state.tab === tab) load(tab);
      }
    }
  }

  function showError(view, e) {
    let b = view.querySelector(":scope > .banner");
    if (!b) {
      b = h("div", { class: "banner", role: "alert", "data-testid": "view-error" });
      view.prepend(b);
    }
    b.textContent = e && e.message ? e.message : String(e);
  }

  // Replaces a view's content (keeps scroll position).
  function render(view, ...nodes) {
    const y = window.scrollY;
    clear(view);
    append(view, nodes);
    window.scrollTo(0, y);
  }

  // ---------- overview ----------
  function stat(label, value, sub, testid) {
    return h("div", { class: "card stat", "data-testid": testid }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), sub ? h("div", { class: "sub" }, sub) : null);
  }

  function totalsCards(hour, day) {
    hour = hour || {};
    day = day || {};
    return [
      stat("Requests", num(hour.requests || 0), `last hour · ${num(day.requests || 0)} last day`, "card-requests"),
      stat("Errors", num(hour.errors || 0), `last hour · ${num(day.errors || 0)} last day`, "card-errors"),
      stat("Tokens", compact(hour.total_tokens || 0), `last hour · ${compact(day.total_tokens || 0)} last day`, "card-tokens"),
      stat("Cost", money(hour.cost), `last hour · ${money(day.cost)} last day`, "card-cost"),
    ];
  }

  async function loadOverview(view) {
    const o = await api("/api/v1/overview");
    const snap = o.snapshot || {};
    const current = Number(snap.config_version || 0);
    const b = o.backends || {};
    const ag = o.agents || {};
    const states = h(
      "div",
      { class: "states" },
      badge("healthy", `${num(b.healthy || 0)} healthy`, "count-healthy"),
      badge("cooling", `${num(b.cooling || 0)} cooling`, "count-cooling"),
      badge("quota_exhausted", `${num(b.quota_exhausted || 0)} quota`, "count-quota"),
      badge("auth_failed", `${num(b.auth_failed || 0)} key rejected`, "count-auth-failed"),
      badge("unhealthy", `${num(b.unhealthy || 0)} unhealthy`, "count-unhealthy"),
      badge("ejected", `${num(b.ejected || 0)} ejected`, "count-ejected"),
      badge("disabled", `${num(b.disabled || 0)} disabled`, "count-disabled")
    );
    const cards = h(
      "div",
      { class: "cards" },
      totalsCards(o.last_hour, o.last_day),
      h("div", { class: "card stat", "data-testid": "card-backends" }, h("div", { class: "label" }, "Backends"), h("div", { class: "value" }, num(b.total || 0)), states),
      stat("Agents", num(ag.total || 0), `${num(ag.enabled || 0)} enabled`, "card-agents"),
      stat("Config version", num(current), `${num(snap.proxies_connected || 0)} ${Number(snap.proxies_connected) === 1 ? "proxy" : "proxies"} connected · key ${snap.master_key_id || "–"}`, "card-config")
    );

    const proxies = (o.proxies || []).map((p) => {
      const acked = Number(p.acked_version || 0);
      let flag;
      if (!p.connected) flag = badge("disconnected", "disconnected", `proxy-state-${p.node_id}`);
      else if (p.last_nack_reason) flag = badge("nack", "NACK", `proxy-state-${p.node_id}`);
      else if (acked < current) flag = badge("behind", "behind", `proxy-state-${p.node_id}`);
      else flag = badge("synced", "synced", `proxy-state-${p.node_id}`);
      return h(
        "tr",
        { "data-testid": `proxy-row-${p.node_id}` },
        h("td", { class: "mono" }, p.node_id),
        h("td", null, flag),
        h("td", { class: "num" }, num(acked), acked !== current ? h("span", { class: "muted" }, ` / ${num(current)}`) : null),
        h("td", null, when(p.connected_since)),
        h("td", null, p.last_seen ? ago(p.last_seen) : "–"),
        h("td", { class: "mono" }, p.peer_address || "–"),
        h("td", { class: "wrap" }, p.last_nack_reason || "")
      );
    });

    const pools = (o.pools || []).map((p) =>
      h(
        "tr",
        { "data-testid": `pool-row-${p.pool || "primary"}` },
        h("td", null, p.pool || "primary"),
        h("td", { class: "num" }, ms(p.cooldown_base_ms)),
        h("td", { class: "num" }, ms(p.cooldown_max_ms)),
        h("td", null, p.exponential ? "yes" : "no"),
        h("td", { class: "num" }, `${Math.round((Number(p.emergency_fraction) || 0) * 100)}%`),
        h("td", { class: "num" }, num(p.max_retries)),
        h("td", { class: "num" }, num(p.queue_depth)),
        h("td", { class: "num" }, ms(p.queue_timeout_ms)),
        h("td", { class: "num" }, ms(p.request_timeout_ms))
      )
    );

    render(
      view,
      cards,
      h("h2", null, "Proxies"),
      table(["Node", "State", { t: "ACKed / current", cls: "num" }, "Connected since", "Last seen", "Peer", "Last NACK"], proxies, "No proxy has connected yet."),
      h("h2", null, "Pools"),
      table(
        ["Pool", { t: "Cooldown base", cls: "num" }, { t: "Cooldown max", cls: "num" }, "Exponential", { t: "Emergency", cls: "num" }, { t: "Retries", cls: "num" }, { t: "Queue", cls: "num" }, { t: "Queue timeout", cls: "num" }, { t: "Request timeout", cls: "num" }],
        pools,
        "No pool settings."
      )
    );
  }

  // ---------- backends ----------
  function stateLabel(b) {
    switch (b.state) {
      case "cooling":
        return b.cooling_until ? `cooling until ${hms(b.cooling_until)}` : "cooling";
      case "quota_exhausted":
        return b.quota_exhausted_until ? `quota exhausted until ${hms(b.quota_exhausted_until)}` : "quota exhausted";
      case "auth_failed":
        return "key rejected (401/403)";
      case "unhealthy":
        return "unhealthy (probe failing)";
      case "ejected":
        return b.health && b.health.ejected_until ? `ejected until ${hms(b.health.ejected_until)}` : "ejected";
      case undefined:
      case null:
      case "":
        return b.enabled ? "healthy" : "disabled";
      default:
        return b.state;
    }
  }

  function meter(used, limit, unit) {
    if (used === null || used === undefined) {
      return h("div", { class: "meter" }, h("span", null, limit ? `– / ${compact(limit)} ${unit}` : `– ${unit}`));
    }
    const frac = limit ? Math.min(1, Number(used) / Number(limit)) : 0;
    const svg = s(
      "svg",
      { width: 70, height: 8, viewBox: "0 0 70 8", "aria-hidden": "true" },
      s("rect", { class: "track", x: 0, y: 0, width: 70, height: 8, rx: 3 }),
      limit ? s("rect", { class: frac > 0.85 ? "fill high" : "fill", x: 0, y: 0, width: Math.max(frac > 0 ? 2 : 0, frac * 70), height: 8, rx: 3 }) : null
    );
    return h("div", { class: "meter" }, svg, h("span", null, `${compact(used)} / ${limit ? compact(limit) : "∞"} ${unit}`));
  }

  async function loadBackends(view) {
    const data = await api("/api/v1/backends");
    const list = data.backends || [];
    const admin = isAdmin();
    const rows = list.map((b) => {
      const st = b.state || (b.enabled ? "healthy" : "disabled");
      const models = (b.models || []).map((m) => m.canonical).join(", ");
      const actions = admin
        ? h(
            "td",
            null,
            b.enabled
              ? h("button", { type: "button", class: "btn btn-small", "data-testid": `backend-disable-${b.name}`, onclick: (ev) => { ev.stopPropagation(); confirmSetEnabled(b, false); } }, "Disable")
              : h("button", { type: "button", class: "btn btn-small", "data-testid": `backend-enable-${b.name}`, onclick: (ev) => { ev.stopPropagation(); confirmSetEnabled(b, true); } }, "Enable")
          )
        : null;
      return h(
        "tr",
        {
          class: "clickable" + (state.selectedBackend === b.id ? " selected" : ""),
          "data-testid": `backend-row-${b.name}`,
          "data-id": b.id,
          tabindex: 0,
          onclick: () => selectBackend(b.id),
          onkeydown: (ev) => { if (ev.key === "Enter") selectBackend(b.id); },
        },
        h("td", null, h("b", null, b.name), b.label ? h("div", { class: "muted" }, b.label) : null),
        h("td", null, b.pool || "primary"),
        h("td", null, b.api || "openai"),
        h("td", null, h("span", { class: "badge", "data-state": st, "data-testid": `backend-state-${b.name}` }, stateLabel(b))),
        h("td", null, meter(b.rpm_in_use, b.rpm, "rpm")),
        h("td", null, meter(b.tpm_in_use, b.tpm, "tpm")),
        h("td", { class: "wrap" }, models || "–"),
        actions
      );
    });
    const headers = ["Name", "Pool", "API", "State", "RPM", "TPM", "Models"];
    if (admin) headers.push("");
    const detail = h("div", { id: "backend-detail", class: "detail", "data-testid": "backend-detail" });
    render(view, table(headers, rows, "No backends. Add one with `clawctl backend add`."), detail);
    const ends = list.filter((b) => b.state === "cooling" && b.cooling_until).map((b) => parseTime(b.cooling_until)).filter(Boolean).map((d) => d.getTime());
    state.coolingEnds = ends.length ? Math.min(...ends) + 1000 : null;
    const sel = list.find((b) => b.id === state.selectedBackend);
    if (sel) await renderCooldowns(detail, sel);
  }

  function selectBackend(id) {
    state.selectedBackend = state.selectedBackend === id ? null : id;
    load("backends");
  }

  async function renderCooldowns(detail, b) {
    let events = [];
    let err = null;
    try {
      const data = await api(`/api/v1/cooldowns?backend=${encodeURIComponent(b.id)}&since=24h&limit=100`);
      events = data.events || [];
    } catch (e) {
      err = e;
    }
    const rows = events.map((e) =>
      h(
        "tr",
        null,
        h("td", null, when(e.started_at)),
        h("td", null, hms(e.until)),
        h("td", { class: "num" }, ms(e.duration_ms)),
        h("td", { class: "num" }, num(e.consecutive)),
        h("td", { class: "mono" }, e.node_id || "–"),
        h("td", { class: "wrap" }, e.summary || "")
      )
    );
    clear(detail);
    append(detail, [
      h("div", { class: "detail-head" }, h("h2", null, `Cooldowns of ${b.name} (last 24 h)`)),
      err ? h("div", { class: "banner" }, err.message) : null,
      table(["Started", "Until", { t: "Duration", cls: "num" }, { t: "Consecutive", cls: "num" }, "Proxy", "Summary"], rows, "No cooldowns in the last 24 hours."),
    ]);
  }

  // ---------- confirm dialog ----------
  let confirmAction = null;
  function confirmDialog(text, okLabel, action) {
    confirmAction = action;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    $("confirm-ok").disabled = false;
    $("confirm-error").hidden = true;
    $("confirm").hidden = false;
    $("confirm-ok").focus();
  }
  function closeConfirm() {
    $("confirm").hidden = true;
    confirmAction = null;
  }
  async function runConfirm() {
    if (!confirmAction) return;
    const action = confirmAction;
    $("confirm-ok").disabled = true;
    try {
      await action();
      closeConfirm();
    } catch (e) {
      $("confirm-error").textContent = e.message;
      $("confirm-error").hidden = false;
      $("confirm-ok").disabled = false;
    }
  }

  function confirmSetEnabled(b, enable) {
    const verb = enable ? "Enable" : "Disable";
    const text = enable ? `Enable backend ${b.name}? It will receive traffic again.` : `Disable backend ${b.name}? It stops receiving traffic on every proxy.`;
    confirmDialog(text, verb, async () => {
      await api(`/api/v1/backends/${encodeURIComponent(b.id)}/${enable ? "enable" : "disable"}`, { method: "POST", body: {} });
      load("backends");
    });
  }

  // ---------- usage ----------
  const RANGES = { "24h": 24 * 3600e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };

  function buckets(granularity, since) {
    const step = granularity === "daily" ? 86400e3 : 3600e3;
    const end = Math.floor(Date.now() / step) * step;
    const start = end - RANGES[since] + step;
    const out = [];
    for (let t = start; t <= end; t += step) out.push(t);
    return { step, list: out };
  }

  function usageControls() {
    const u = state.usage;
    const sel = (id, key, options, label) =>
      h(
        "label",
        null,
        label,
        h(
          "select",
          { id, "data-testid": id, onchange: (ev) => { u[key] = ev.target.value; load("usage"); } },
          options.map(([v, t]) => h("option", { value: v, selected: u[key] === v }, t))
        )
      );
    const inp = (key, label) =>
      h("label", null, label, h("input", { type: "search", id: `usage-${key}`, "data-testid": `usage-filter-${key}`, value: u[key], placeholder: "any", onchange: (ev) => { u[key] = ev.target.value.trim(); load("usage"); } }));
    return h(
      "form",
      { class: "toolbar", onsubmit: (ev) => ev.preventDefault() },
      sel("usage-granularity", "granularity", [["hourly", "Hourly"], ["daily", "Daily"]], "Granularity"),
      sel("usage-range", "since", [["24h", "Last 24 h"], ["7d", "Last 7 days"], ["30d", "Last 30 days"]], "Range"),
      sel("usage-group", "group_by", [["model", "Model"], ["backend", "Backend"], ["key", "Client key"], ["agent", "Agent"]], "Group by"),
      inp("model", "Model"),
      inp("backend", "Backend"),
      inp("key", "Key"),
      inp("agent", "Agent")
    );
  }

  function tokensChart(series, bk) {
    const W = 760, H = 220, L = 48, R = 8, T = 10, B = 24;
    const idx = new Map(bk.list.map((t, i) => [t, i]));
    const stacks = bk.list.map(() => []);
    series.forEach((sr, si) => {
      for (const p of sr.points || []) {
        const d = parseTime(p.time);
        if (!d) continue;
        const key = Math.floor(d.getTime() / bk.step) * bk.step;
        const i = idx.get(key);
        if (i === undefined) continue;
        stacks[i].push({ si, v: Number(p.total_tokens) || 0, g: sr.group, p });
      }
    });
    const max = Math.max(1, ...stacks.map((st) => st.reduce((a, x) => a + x.v, 0)));
    const bw = (W - L - R) / bk.list.length;
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Tokens per bucket", "data-testid": "usage-tokens-chart" });
    for (const f of [0, 0.5, 1]) {
      svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
      svg.append(s("text", { class: "tick", x: L - 4, y: y(max * f) + 3, "text-anchor": "end" }, compact(max * f)));
    }
    stacks.forEach((st, i) => {
      let acc = 0;
      for (const x of st) {
        const y0 = y(acc), y1 = y(acc + x.v);
        acc += x.v;
        if (x.v <= 0) continue;
        svg.append(
          s("rect", { class: `s${x.si % 8}`, x: L + i * bw + bw * 0.1, y: y1, width: Math.max(1, bw * 0.8), height: Math.max(0.5, y0 - y1) }, s("title", null, `${x.g}: ${num(x.v)} tokens @ ${dateTime(new Date(bk.list[i]).toISOString())}`))
        );
      }
    });
    const labels = Math.min(6, bk.list.length);
    for (let k = 0; k < labels; k++) {
      const i = Math.round((k * (bk.list.length - 1)) / Math.max(1, labels - 1));
      const d = new Date(bk.list[i]);
      const txt = bk.step >= 86400e3 ? `${pad(d.getMonth() + 1)}-${pad(d.getDate())}` : `${pad(d.getHours())}:00`;
      svg.append(s("text", { class: "tick", x: L + i * bw + bw / 2, y: H - 8, "text-anchor": "middle" }, txt));
    }
    return svg;
  }

  function costChart(series, bk) {
    const W = 380, H = 220, L = 48, R = 8, T = 10, B = 24;
    const idx = new Map(bk.list.map((t, i) => [t, i]));
    const cost = bk.list.map(() => 0);
    for (const sr of series) {
      for (const p of sr.points || []) {
        const d = parseTime(p.time);
        if (!d) continue;
        const i = idx.get(Math.floor(d.getTime() / bk.step) * bk.step);
        if (i !== undefined) cost[i] += Number(p.cost) || 0;
      }
    }
    const max = Math.max(...cost) || 1;
    const bw = (W - L - R) / bk.list.length;
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Cost per bucket", "data-testid": "usage-cost-chart" });
    for (const f of [0, 0.5, 1]) {
      svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
      svg.append(s("text", { class: "tick", x: L - 4, y: y(max * f) + 3, "text-anchor": "end" }, money(max * f)));
    }
    const pts = cost.map((c, i) => `${(L + i * bw + bw / 2).toFixed(1)},${y(c).toFixed(1)}`);
    cost.forEach((c, i) => {
      if (c > 0) svg.append(s("rect", { class: "costbar", x: L + i * bw + bw * 0.1, y: y(c), width: Math.max(1, bw * 0.8), height: H - B - y(c) }, s("title", null, `${money(c)} @ ${dateTime(new Date(bk.list[i]).toISOString())}`)));
    });
    svg.append(s("polyline", { class: "line", points: pts.join(" ") }));
    return svg;
  }

  async function loadUsage(view) {
    const u = state.usage;
    const q = new URLSearchParams({ granularity: u.granularity, since: u.since, group_by: u.group_by });
    for (const k of ["model", "backend", "key", "agent"]) if (u[k]) q.set(k, u[k]);
    const controls = usageControls();
    let data;
    try {
      data = await api(`/api/v1/usage?${q}`);
    } catch (e) {
      render(view, controls, h("div", { class: "banner", role: "alert" }, e.message));
      return;
    }
    const series = data.series || [];
    const bk = buckets(u.granularity, u.since);
    const totals = series.map((sr, si) => {
      const t = { group: sr.group, si, requests: 0, prompt: 0, completion: 0, cache: 0, total: 0, cost: 0 };
      for (const p of sr.points || []) {
        t.requests += Number(p.requests) || 0;
        t.prompt += Number(p.prompt_tokens) || 0;
        t.completion += Number(p.completion_tokens) || 0;
        t.cache += Number(p.cache_read_tokens) || 0;
        t.total += Number(p.total_tokens) || 0;
        t.cost += Number(p.cost) || 0;
      }
      return t;
    });
    const legend = h(
      "div",
      { class: "legend" },
      totals.map((t) => h("span", null, s("svg", { width: 10, height: 10, "aria-hidden": "true" }, s("rect", { class: `s${t.si % 8}`, width: 10, height: 10, rx: 2 })), t.group || "(none)"))
    );
    const rows = totals
      .slice()
      .sort((a, b) => b.total - a.total)
      .map((t) =>
        h(
          "tr",
          { "data-testid": `usage-row-${t.group}` },
          h("td", null, s("svg", { width: 10, height: 10, "aria-hidden": "true" }, s("rect", { class: `s${t.si % 8}`, width: 10, height: 10, rx: 2 })), " ", t.group || "(none)"),
          h("td", { class: "num" }, num(t.requests)),
          h("td", { class: "num" }, num(t.prompt)),
          h("td", { class: "num" }, num(t.completion)),
          h("td", { class: "num" }, num(t.cache)),
          h("td", { class: "num" }, num(t.total)),
          h("td", { class: "num" }, money(t.cost))
        )
      );
    const groupName = { model: "Model", backend: "Backend", key: "Client key", agent: "Agent" }[u.group_by] || "Group";
    render(
      view,
      controls,
      h(
        "div",
        { class: "charts" },
        h("div", { class: "card" }, h("h2", null, "Tokens"), h("div", { class: "chart" }, tokensChart(series, bk)), legend),
        h("div", { class: "card" }, h("h2", null, "Cost (USD)"), h("div", { class: "chart" }, costChart(series, bk)))
      ),
      table([groupName, { t: "Requests", cls: "num" }, { t: "Prompt", cls: "num" }, { t: "Completion", cls: "num" }, { t: "Cache read", cls: "num" }, { t: "Total tokens", cls: "num" }, { t: "Cost", cls: "num" }], rows, "No usage in this range.")
    );
  }

  // ---------- agents ----------
  function runStatus(r) {
    return r && r.status ? r.status : "unknown";
  }

  async function loadAgents(view) {
    const data = await api("/api/v1/agents");
    const list = data.agents || [];
    const admin = isAdmin();
    const rows = list.map((a) => {
      const last = a.last_run;
      const slots = a.next_slots || [];
      const delivery = last ? (last.delivery_attempts ? `${last.delivery_attempts} attempt${last.delivery_attempts === 1 ? "" : "s"}` : "–") : "–";
      return h(
        "tr",
        {
          class: "clickable" + (state.selectedAgent === a.id ? " selected" : ""),
          "data-testid": `agent-row-${a.id}`,
          tabindex: 0,
          onclick: () => selectAgent(a.id),
          onkeydown: (ev) => { if (ev.key === "Enter") selectAgent(a.id); },
        },
        h("td", { class: "mono" }, a.id),
        h("td", null, a.name || a.id),
        h("td", null, a.model),
        h("td", null, `every ${duration(a.interval_seconds)}`, h("div", { class: "muted" }, `${a.active_hours || "always"} · ${a.timezone || "UTC"}`)),
        h("td", null, a.enabled ? badge("enabled", "enabled", `agent-enabled-${a.id}`) : badge("paused", "paused", `agent-enabled-${a.id}`), a.pause_note ? h("div", { class: "muted" }, a.pause_note) : null),
        h("td", null, last ? badge(runStatus(last), runStatus(last).replace("_", " "), `agent-last-${a.id}`) : h("span", { class: "muted" }, "never"), last ? h("div", { class: "muted" }, ago(last.finished_at || last.started_at || last.nominal_time)) : null),
        h("td", null, slots.length ? slots.slice(0, 3).map((sl, i) => h("div", { class: i ? "muted" : null, title: sl.reason || "" }, hms(sl.time))) : h("span", { class: "muted" }, "–")),
        h("td", null, last && ["delivering", "delivered", "dead_letter"].includes(last.status) ? badge(last.status, last.status.replace("_", " ")) : null, " ", delivery)
      );
    });
    const detail = h("div", { id: "agent-detail", class: "detail", "data-testid": "agent-detail" });
    render(view, table(["Id", "Name", "Model", "Schedule", "Enabled", "Last run", "Next slots", "Delivery"], rows, "No agents. Add one with `clawctl agent add`."), detail);
    const sel = list.find((a) => a.id === state.selectedAgent);
    if (sel) await renderRuns(detail, sel, admin);
  }

  function selectAgent(id) {
    state.selectedAgent = state.selectedAgent === id ? null : id;
    load("agents");
  }

  async function renderRuns(detail, a, admin) {
    let runs = [];
    let err = null;
    try {
      const data = await api(`/api/v1/agents/${encodeURIComponent(a.id)}/runs?limit=50`);
      runs = data.runs || [];
    } catch (e) {
      err = e;
    }
    const timeline = h(
      "div",
      { class: "timeline", "data-testid": "agent-timeline" },
      runs
        .slice()
        .reverse()
        .map((r) => h("span", { class: "run", "data-status": runStatus(r), title: `${dateTime(r.nominal_time)} ${runStatus(r)}${r.skip_reason ? " (" + r.skip_reason + ")" : ""}${r.error ? ": " + r.error : ""}` }))
    );
    const rows = runs.map((r) =>
      h(
        "tr",
        { "data-testid": `run-row-${r.run_id}` },
        h("td", null, when(r.nominal_time)),
        h("td", null, badge(runStatus(r), runStatus(r).replace("_", " "))),
        h("td", null, r.trigger || "–"),
        h("td", { class: "num" }, r.duration_ms ? ms(r.duration_ms) : "–"),
        h("td", { class: "num" }, num(r.tokens || 0)),
        h("td", { class: "num" }, num(r.delivery_attempts || 0)),
        h("td", { class: "wrap" }, r.skip_reason || r.error || r.reply_excerpt || "")
      )
    );
    const actions = admin
      ? h(
          "div",
          { class: "actions" },
          h("button", { type: "button", class: "btn btn-small btn-primary", "data-testid": `agent-run-${a.id}`, onclick: () => confirmDialog(`Run the heartbeat of ${a.id} now?`, "Run now", async () => { await api(`/api/v1/agents/${encodeURIComponent(a.id)}/run`, { method: "POST", body: {} }); load("agents"); }) }, "Run now")
        )
      : null;
    clear(detail);
    append(detail, [
      h("div", { class: "detail-head" }, h("h2", null, `Runs of ${a.id}`), actions),
      err ? h("div", { class: "banner" }, err.message) : null,
      timeline,
      table(["Slot", "Status", "Trigger", { t: "Duration", cls: "num" }, { t: "Tokens", cls: "num" }, { t: "Deliveries", cls: "num" }, "Detail"], rows, "No runs yet."),
    ]);
  }

  // ---------- audit ----------
  // A long value (a JSON list of models) is cut; the whole text is its tooltip.
  function short(v) {
    if (!v) return "∅";
    return v.length > 120 ? h("span", { title: v }, v.slice(0, 117) + "…") : v;
  }


  async function loadAudit(view) {
    const f = state.audit;
    const q = new URLSearchParams({ limit: "100" });
    if (f.resource) q.set("resource", f.resource);
    if (f.token) q.set("token", f.token);
    const controls = h(
      "form",
      { class: "toolbar", onsubmit: (ev) => ev.preventDefault() },
      h("label", null, "Resource (kind/id)", h("input", { type: "search", id: "audit-resource", "data-testid": "audit-filter-resource", value: f.resource, placeholder: "backend/b1", onchange: (ev) => { f.resource = ev.target.value.trim(); load("audit"); } })),
      h("label", null, "Token", h("input", { type: "search", id: "audit-token", "data-testid": "audit-filter-token", value: f.token, placeholder: "any", onchange: (ev) => { f.token = ev.target.value.trim(); load("audit"); } }))
    );
    let data;
    try {
      data = await api(`/api/v1/audit?${q}`);
    } catch (e) {
      render(view, controls, h("div", { class: "banner", role: "alert" }, e.message));
      return;
    }
    const rows = (data.records || []).map((r) =>
      h(
        "tr",
        { "data-testid": `audit-row-${r.id}` },
        h("td", null, when(r.time)),
        h("td", null, h("b", { "data-testid": "audit-token" }, r.token_name || "–")),
        h("td", { class: "mono" }, r.peer || "–"),
        h("td", null, r.operation, r.action ? h("div", { class: "muted" }, r.action) : null),
        h("td", null, r.resource_kind ? `${r.resource_kind}/${r.resource_name || r.resource_id}` : "–"),
        h("td", { class: "num" }, r.config_version ? num(r.config_version) : "–"),
        h("td", { class: "wrap" }, (r.changes || []).map((c) => h("div", null, h("span", { class: "mono" }, c.field), ": ", h("span", { class: "muted" }, short(c.old_value)), " → ", short(c.new_value))))
      )
    );
    render(view, controls, table(["Time", "Token", "Peer", "Operation", "Resource", { t: "Version", cls: "num" }, "Changes"], rows, "No audit records."));
  }

  const LOADERS = { overview: loadOverview, backends: loadBackends, usage: loadUsage, agents: loadAgents, audit: loadAudit };

  // ---------- live events ----------
  function setLive(st, text) {
    const el = $("live");
    el.dataset.state = st;
    el.textContent = text || st;
  }

  function stopEvents() {
    state.eventsGen++;
    if (state.events) state.events.abort();
    state.events = null;
    setLive("offline");
  }

  let refreshTimer = null;
  const dirty = new Set();
  function invalidate(topic) {
    for (const v of TOPIC_VIEWS[topic] || []) dirty.add(v);
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      const views = [...dirty];
      dirty.clear();
      if (views.includes(state.tab)) load(state.tab);
    }, 100);
  }

  async function startEvents() {
    stopEvents();
    const gen = state.eventsGen;
    let backoff = 1000;
    let first = true;
    while (gen === state.eventsGen && state.token) {
      const ctl = new AbortController();
      state.events = ctl;
      setLive("connecting", "connecting");
      let opened = false;
      try {
        const res = await fetch("/api/v1/events", { headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" }, signal: ctl.signal, cache: "no-store" });
        if (res.status === 401) {
          if (gen === state.eventsGen) signOut("Your token is no longer accepted. Sign in again.");
          return;
        }
        if (!res.ok || !res.body) throw new Error(`events: ${res.status}`);
        opened = true;
        backoff = 1000;
        setLive("live", "live");
        if (!first) invalidate("resync"); // we may have missed events while away
        first = false;
        await readEvents(res.body.getReader(), gen);
      } catch (e) {
        // aborted (sign out) or the connection dropped: retry below
      }
      if (gen !== state.eventsGen) return;
      setLive("offline", "reconnecting");
      await new Promise((r) => setTimeout(r, backoff));
      backoff = opened ? 1000 : Math.min(30000, backoff * 2);
    }
  }

  async function readEvents(reader, gen) {
    const dec = new TextDecoder();
    let buf = "";
    let ev = { event: "message", data: "" };
    for (;;) {
      const { value, done } = await reader.read();
      if (done || gen !== state.eventsGen) return;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === "\r" && buf[nl + 1] === "\n" ? 2 : 1));
        if (line === "") {
          if (ev.event || ev.data) dispatch(ev);
          ev = { event: "message", data: "" };
        } else if (line.startsWith(":")) {
          // comment (keep-alive ping)
        } else {
          const c = line.indexOf(":");
          const field = c < 0 ? line : line.slice(0, c);
          let val = c < 0 ? "" : line.slice(c + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") ev.event = val;
          else if (field === "data") ev.data = ev.data ? ev.data + "\n" + val : val;
        }
      }
    }
  }

  function dispatch(ev) {
    let topic = ev.event;
    if (topic === "message" && ev.data) {
      try {
        topic = JSON.parse(ev.data).topic || topic;
      } catch (e) {
        /* not JSON */
      }
    }
    document.body.dataset.lastEvent = topic;
    if (topic === "hello") return; // the views were just loaded
    invalidate(topic);
  }

  // Keeps "in 12s" / "3m ago" and cooling states fresh without a server
  // event: when a cooldown's end passes, reload the backends.
  setInterval(() => {
    if (!state.me || state.tab !== "backends") return;
    if (state.coolingEnds && state.coolingEnds < Date.now()) {
      state.coolingEnds = null;
      load("backends");
    }
  }, 5000);

  // ---------- wiring ----------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("token").value.trim();
      if (!t) {
        showLogin("Enter a token.");
        return;
      }
      $("login-error").hidden = true;
      signIn(t, false);
    });
    $("signout").addEventListener("click", () => signOut(""));
    $("confirm-cancel").addEventListener("click", closeConfirm);
    $("confirm-ok").addEventListener("click", runConfirm);
    $("confirm").addEventListener("click", (ev) => {
      if (ev.target === $("confirm")) closeConfirm();
    });
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && !$("confirm").hidden) closeConfirm();
    });
    window.addEventListener("hashchange", route);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved, true);
    else showLogin("");
  });
})();
