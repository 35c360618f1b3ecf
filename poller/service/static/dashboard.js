// The batch-poller dashboard: reads /v1/status and /v1/batches, then follows /v1/events.
// No framework, no build step. Every value that comes from the service is inserted with textContent.
"use strict";

(() => {
  const TOKEN_KEY = "batch-poller.token";
  const FINAL = new Set(["completed", "failed", "expired", "cancelled"]);
  const KNOWN = new Set([
    "validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled", "gone",
    "ok", "failing", "auth_failing", "connecting", "disabled",
  ]);
  const TYPES = [
    "batch.validating", "batch.in_progress", "batch.finalizing", "batch.cancelling", "batch.completed",
    "batch.failed", "batch.expired", "batch.cancelled", "batch.progress", "batch.stalled", "batch.expiring",
  ];
  const RECENT = 50; // events listed
  const FINISHED_SHOWN = 20; // finished batches shown per source, the newest (every active one is shown)
  const REPLAY = 100; // events replayed on load, to fill the list and each batch's last event
  const STATUS_EVERY = 5000;
  const BATCHES_EVERY = 30000;

  const $ = (id) => document.getElementById(id);
  const batches = new Map(); // "source\u0000id" -> batch view, kept up to date by events
  let token = null;
  let stream = null;
  let lastId = null;
  let timers = [];
  let renderQueued = false;

  // -- small helpers --------------------------------------------------------------------------------

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function badge(value) {
    const text = value === null || value === undefined ? "not yet polled" : String(value);
    return el("span", text, KNOWN.has(text) ? `badge s-${text} h-${text}` : "badge");
  }

  function now() {
    return Date.now() / 1000;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h ${m % 60}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  function when(epoch) {
    const node = el("time", `${duration(now() - epoch)} ago`);
    const date = new Date(epoch * 1000);
    node.dateTime = date.toISOString();
    node.title = date.toLocaleString();
    return node;
  }

  function isNumber(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  // The ETA is the Unix time the batch should finish (absent or null: no estimate yet).
  function etaText(eta) {
    if (!isNumber(eta)) return "—";
    const left = eta - now();
    return left > 0 ? `in ${duration(left)}` : "any moment";
  }

  // -- the service ----------------------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function api(path) {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(path, { headers, cache: "no-store" });
    if (response.status === 401) throw new Unauthorized();
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function connection(text, cls) {
    const node = $("connection");
    node.textContent = text;
    node.className = cls || "";
  }

  function needToken(message) {
    stop();
    connection("needs the service token", "down");
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function stop() {
    for (const t of timers) clearInterval(t);
    timers = [];
    if (stream) stream.close();
    stream = null;
  }

  async function start() {
    stop();
    let status;
    try {
      status = await api("v1/status");
    } catch (err) {
      if (err instanceof Unauthorized) return needToken(token ? "That token was refused." : "");
      connection("cannot reach the service; retrying", "down");
      setTimeout(start, 3000);
      return;
    }
    $("login").hidden = true;
    showStatus(status);
    const position = status.events && isNumber(status.events.position) ? status.events.position : 0;
    follow(lastId !== null ? lastId : Math.max(0, position - REPLAY));
    await refreshBatches();
    timers.push(setInterval(refreshStatus, STATUS_EVERY));
    timers.push(setInterval(refreshBatches, BATCHES_EVERY));
    timers.push(setInterval(queueRender, 10000)); // ages move on
  }

  function follow(since) {
    const query = new URLSearchParams({ since: String(since) });
    if (token) query.set("token", token);
    const source = new EventSource(`v1/events?${query}`);
    stream = source;
    source.onopen = () => connection("live", "live");
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (e.g. 401) or gone: find out why, then start over from the last event seen.
        if (stream === source) stream = null;
        connection("disconnected; reconnecting", "down");
        setTimeout(start, 3000);
      } else {
        connection("reconnecting…", "down"); // EventSource retries by itself, sending Last-Event-ID
      }
    };
    for (const type of TYPES) source.addEventListener(type, onEvent);
  }

  async function refreshStatus() {
    try {
      showStatus(await api("v1/status"));
    } catch (err) {
      if (err instanceof Unauthorized) needToken("The token was refused.");
    }
  }

  async function refreshBatches() {
    const asked = performance.now();
    let body;
    try {
      body = await api("v1/batches");
    } catch (err) {
      if (err instanceof Unauthorized) needToken("The token was refused.");
      return;
    }
    const seen = new Set();
    for (const view of body.data || []) {
      const key = `${view.source}\u0000${view.id}`;
      seen.add(key);
      const held = batches.get(key);
      if (!held || (view.sequence || 0) >= (held.sequence || 0)) {
        batches.set(key, Object.assign({}, held || {}, view, { last_event: held ? held.last_event : null }));
      }
    }
    for (const [key, held] of batches) {
      if (!seen.has(key) && (held.seen_at || 0) < asked) batches.delete(key); // pruned or untracked
    }
    queueRender();
  }

  function onEvent(message) {
    lastId = message.lastEventId;
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    const d = event.data || {};
    const key = `${d.source}\u0000${d.id}`;
    const held = batches.get(key) || { id: d.id, source: d.source, sequence: 0, created_at: null };
    if ((d.sequence || 0) >= (held.sequence || 0)) {
      // An event without an ETA keeps the last one while the status holds; a new status clears it.
      if (isNumber(d.eta)) held.eta = d.eta;
      else if (d.status !== held.status) held.eta = null;
      held.status = d.status;
      held.sequence = d.sequence;
      held.request_counts = d.request_counts;
      held.state = FINAL.has(d.status) ? "final" : "active";
      if (held.created_at === null && d.batch && isNumber(d.batch.created_at)) held.created_at = d.batch.created_at;
      held.last_event = { type: event.type, at: d.detected_at };
    }
    held.seen_at = performance.now();
    batches.set(key, held);
    addEvent(event);
    queueRender();
  }

  // -- rendering ------------------------------------------------------------------------------------

  function addEvent(event) {
    const d = event.data || {};
    const item = el("li");
    if (isNumber(d.detected_at)) item.append(when(d.detected_at));
    item.append(badge(d.status), el("span", event.type), el("span", d.id, "id"), el("span", d.source));
    const list = $("events");
    list.prepend(item);
    while (list.children.length > RECENT) list.lastElementChild.remove();
    $("no-events").hidden = true;
  }

  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderBatches();
    });
  }

  function progressCell(counts) {
    const td = el("td");
    if (!counts || !isNumber(counts.total) || counts.total <= 0) {
      td.textContent = "—";
      return td;
    }
    const done = (counts.completed || 0) + (counts.failed || 0);
    const wrap = el("div", null, "progress");
    const bar = el("progress");
    bar.max = counts.total;
    bar.value = Math.min(done, counts.total);
    const label = `${done} of ${counts.total} requests done`;
    bar.setAttribute("aria-label", label);
    bar.setAttribute("aria-valuetext", label);
    bar.textContent = `${Math.round((100 * done) / counts.total)}%`;
    wrap.append(bar, el("span", `${done}/${counts.total}`));
    td.append(wrap);
    return td;
  }

  function countsText(counts) {
    if (!counts) return "—";
    return `${counts.completed || 0} ok · ${counts.failed || 0} failed · ${counts.total || 0} total`;
  }

  function batchRow(b) {
    const tr = el("tr");
    tr.dataset.batch = b.id;
    const cells = [
      ["Batch", el("td", b.id, "id")],
      ["Status", el("td")],
      ["Progress", progressCell(b.request_counts)],
      ["Counts", el("td", countsText(b.request_counts), "num")],
      ["ETA", el("td", FINAL.has(b.status) ? "—" : etaText(b.eta), "num")],
      ["Age", el("td", isNumber(b.created_at) ? duration(now() - b.created_at) : "—", "num")],
      ["Last event", el("td")],
    ];
    cells[1][1].append(badge(b.state === "gone" ? "gone" : b.status));
    if (isNumber(b.eta) && !FINAL.has(b.status)) cells[4][1].title = new Date(b.eta * 1000).toLocaleString();
    if (b.last_event) {
      cells[6][1].append(el("span", `${b.last_event.type} `));
      if (isNumber(b.last_event.at)) cells[6][1].append(when(b.last_event.at));
    } else {
      cells[6][1].textContent = "—";
    }
    for (const [label, td] of cells) {
      td.dataset.label = label;
      tr.append(td);
    }
    return tr;
  }

  function isActive(b) {
    return !FINAL.has(b.status) && b.state !== "gone";
  }

  function renderBatches() {
    const groups = new Map();
    for (const b of batches.values()) {
      if (!groups.has(b.source)) groups.set(b.source, []);
      groups.get(b.source).push(b);
    }
    const root = $("sources");
    root.replaceChildren();
    if (!groups.size) {
      root.append(el("p", "No batches yet.", "empty"));
      return;
    }
    for (const name of [...groups.keys()].sort()) {
      const list = groups.get(name).sort((a, b) =>
        (isActive(b) - isActive(a)) || ((b.created_at || 0) - (a.created_at || 0)) ||
        String(a.id).localeCompare(String(b.id)));
      const section = el("section");
      section.className = "source";
      section.dataset.source = name;
      const title = el("h3", name);
      title.id = `source-${[...groups.keys()].sort().indexOf(name)}`;
      section.setAttribute("aria-labelledby", title.id);
      const active = list.filter(isActive).length;
      section.append(title, el("p", `${active} active, ${list.length} in all`, "empty"));
      const table = el("table");
      table.className = "batches";
      const head = el("thead");
      const row = el("tr");
      for (const label of ["Batch", "Status", "Progress", "Counts", "ETA", "Age", "Last event"]) {
        const th = el("th", label);
        th.scope = "col";
        row.append(th);
      }
      head.append(row);
      const body = el("tbody");
      const shown = list.slice(0, active + FINISHED_SHOWN);
      for (const b of shown) body.append(batchRow(b));
      table.append(head, body);
      const scroll = el("div", null, "scroll");
      scroll.append(table);
      section.append(scroll);
      if (list.length > shown.length) {
        section.append(el("p", `and ${list.length - shown.length} older finished batches (batch-poller list shows them all)`, "empty"));
      }
      root.append(section);
    }
  }

  function showStatus(status) {
    $("status-line").textContent = status.status_line || "";
    const sinks = $("sinks").tBodies[0];
    sinks.replaceChildren();
    for (const [name, view] of Object.entries(status.sinks || {})) {
      const tr = el("tr");
      tr.dataset.sink = name;
      const health = el("td");
      health.append(badge(view.health));
      let backlog = String(view.pending ?? 0);
      if (isNumber(view.oldest_pending_age) && view.pending) backlog += ` (oldest ${duration(view.oldest_pending_age)})`;
      tr.append(el("td", name), health, el("td", backlog, "num"), el("td", view.dead ?? 0, "num"),
        el("td", view.last_error || "—"));
      sinks.append(tr);
    }
    const apis = $("apis").tBodies[0];
    apis.replaceChildren();
    for (const [name, view] of Object.entries(status.sources || {})) {
      const tr = el("tr");
      tr.dataset.source = name;
      const health = el("td");
      if (view.health) health.append(badge(view.health));
      else health.textContent = view.polled_by ? `polled by ${view.polled_by}` : "not polled here";
      const last = el("td");
      if (isNumber(view.last_success)) last.append(when(view.last_success));
      else last.textContent = view.health ? "never" : "—";
      let problem = view.misconfigured || "—";
      if (!view.misconfigured && isNumber(view.api_failing_since)) {
        problem = `unreachable for ${duration(now() - view.api_failing_since)}`;
      }
      tr.append(el("td", name), health, last, el("td", problem));
      apis.append(tr);
    }
  }

  // -- start ----------------------------------------------------------------------------------------

  function readToken() {
    const url = new URL(location.href);
    const given = url.searchParams.get("token");
    if (given !== null) {
      sessionStorage.setItem(TOKEN_KEY, given);
      url.searchParams.delete("token"); // out of the address bar and the history
      history.replaceState(null, "", url);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    start();
  });

  token = readToken();
  start();
})();
