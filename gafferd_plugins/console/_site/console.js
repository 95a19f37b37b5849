/* gafferd web console.
 *
 * A static site plugin: this script administers the gafferd that serves it,
 * through the daemon's HTTP API on the same origin. Plain JavaScript, no
 * framework, no build step, no external resource.
 *
 * How the page stays current
 *   - GET /status lists the templates with their lifecycle summary (state,
 *     ready count, restarts, last exit); GET /status/NAME re-reads one;
 *     GET /stats/NAME gives their processes (internal id, OS pid, CPU,
 *     memory); GET /processes/NAME the definition.
 *   - GET /watch?feed=eventsource is read with fetch() and a stream reader
 *     (EventSource cannot send an Authorization header). Each event naming a
 *     template schedules a (debounced) refresh of that template's row; a
 *     `state` event and an `exit` nobody asked for are also shown at once,
 *     before that refresh confirms them. Nothing
 *     polls the daemon for state; only CPU/memory figures are re-read on a slow
 *     timer, because no event announces that they changed.
 *   - No change is ever missed, at start-up or after a lost feed: the feed is
 *     opened first and the whole state read only once it is open (the daemon
 *     subscribes before it answers). A change made while that read is in
 *     flight may be missing from its reply, so every template named by an
 *     event during the read is re-read after the read has been applied.
 *   - The output pane shows GET /processes/NAME/_log (recent output), then
 *     follows GET /streams/ID/LABEL?feed=eventsource.
 *
 * Authentication
 *   Any 401 shows a small token form (once); the token is kept in this tab's
 *   sessionStorage and sent as "Authorization: Bearer <token>" on every
 *   request, streams included.
 *
 * Test hooks: every row is tr.template[data-name][data-state]; every button
 *   has data-action (and data-name / data-id); <body data-ready="1"> after
 *   the first complete load, <body data-auth="required"> while the token form
 *   is shown.
 */
"use strict";

(function () {
  const TOKEN_KEY = "gafferd.console.token";
  const REFRESH_DEBOUNCE_MS = 150;
  const STATS_INTERVAL_MS = 5000;
  const LOG_MAX_LINES = 5000;
  const LOG_BACKLOG_LINES = 200;

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  /* ------------------------------------------------------------------ */
  /* State                                                                */
  /* ------------------------------------------------------------------ */

  // name -> {name, status, def, stats, procs: [{id, pid, cpu, mem, rss, ctime}],
  //          row: <tr>, procRows: [<tr>], spawnedAt: Map(id -> ms), restarts}
  const templates = new Map();
  // from GET /metrics: per-process uptime, per-template restarts ("at": when read)
  let metrics = {uptime: new Map(), restarts: new Map(), at: 0};

  const auth = {shown: false, rejected: false};
  let watchCtrl = null;
  let watchBackoff = 1000;
  let watchEverOpen = false;
  // Full reloads in flight, and the templates named by events meanwhile
  // (the reloads' replies may predate those events: re-read them after).
  let reloads = 0;
  const touchedDuringReload = new Set();

  /* ------------------------------------------------------------------ */
  /* HTTP                                                                 */
  /* ------------------------------------------------------------------ */

  class ApiError extends Error {
    constructor(status, code, message, method, path) {
      super(message);
      this.status = status;
      this.code = code;
      this.method = method;
      this.path = path;
    }
    describe() {
      const where = this.method + " " + this.path.split("?")[0];
      if (this.status === 0) return where + ": " + this.message;
      let text = where + " → " + this.status + " " + this.code;
      if (this.message && this.message !== this.code) text += ": " + this.message;
      return text;
    }
  }

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  /* Every request sends the token itself and omits the browser's credentials:
   * the daemon's 401 also offers Basic auth, and a request that may use
   * credentials would make the browser pop up its own login box (or, headless,
   * wait for one) instead of letting this page ask for the token. */
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const t = token();
    if (t) h["Authorization"] = "Bearer " + t;
    return h;
  }

  /* Turn a non-2xx fetch Response into an ApiError (reads the body).
   * ``used`` is the token the request carried: a 401 for a token that has
   * been replaced meanwhile must not bring the token form back. */
  async function errorFrom(resp, method, path, used) {
    let text = "";
    try { text = await resp.text(); } catch (e) { /* ignore */ }
    let code = resp.statusText || "error";
    let message = "";
    try {
      const body = JSON.parse(text);
      if (body && typeof body === "object") {
        code = body.error || code;
        message = body.message || "";
      }
    } catch (e) {
      message = text.trim().slice(0, 200);
    }
    if (resp.status === 401 && used === token()) needAuth();
    return new ApiError(resp.status, code, message, method, path);
  }

  /* One JSON (or text) API call. Resolves with the decoded body. */
  async function api(method, path, body) {
    const used = token();
    const init = {method: method, cache: "no-store", credentials: "omit",
                  headers: headers({"Accept": "application/json"})};
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "network_error", "cannot reach gafferd (" + e.message + ")", method, path);
    }
    if (!resp.ok) throw await errorFrom(resp, method, path, used);
    const text = await resp.text();
    const type = resp.headers.get("Content-Type") || "";
    if (type.indexOf("json") >= 0) {
      try { return JSON.parse(text); } catch (e) { /* fall through */ }
    }
    return text;
  }

  /* Incremental parser for server-sent events (WHATWG HTML, 9.2.6). */
  class SSEParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buf = "";
      this.pendingCR = false;
      this.data = [];
      this.event = "";
      this.lastId = "";
    }
    feed(text) {
      if (this.pendingCR) {           // a CR ended the previous chunk: drop its LF
        this.pendingCR = false;
        if (text.charAt(0) === "\n") text = text.slice(1);
      }
      this.buf += text;
      const re = /\r\n|\r|\n/g;
      let start = 0;
      let m;
      while ((m = re.exec(this.buf)) !== null) {
        this.line(this.buf.slice(start, m.index));
        start = re.lastIndex;
        if (m[0] === "\r" && start === this.buf.length) this.pendingCR = true;
      }
      this.buf = this.buf.slice(start);
    }
    line(line) {
      if (line === "") {
        if (this.data.length) {
          this.onEvent({event: this.event || "message", data: this.data.join("\n"), id: this.lastId});
        }
        this.data = [];
        this.event = "";
        return;
      }
      if (line.charAt(0) === ":") return;   // comment (heartbeat)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.charAt(0) === " ") value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
      else if (field === "id" && value.indexOf("\0") < 0) this.lastId = value;
    }
  }

  /* Read an event-stream with fetch(); calls handlers.open() once the reply
   * headers arrived and handlers.event(ev) per event. Resolves when the
   * server ends the reply; rejects with ApiError on an HTTP error. */
  async function sse(path, signal, handlers) {
    const used = token();
    let resp;
    try {
      resp = await fetch(path, {cache: "no-store", credentials: "omit", signal: signal,
                                headers: headers({"Accept": "text/event-stream"})});
    } catch (e) {
      if (signal.aborted) throw e;
      throw new ApiError(0, "network_error", "cannot reach gafferd (" + e.message + ")", "GET", path);
    }
    if (!resp.ok) throw await errorFrom(resp, "GET", path, used);
    if (handlers.open) handlers.open();
    const parser = new SSEParser(handlers.event);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder("utf-8");
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      parser.feed(decoder.decode(value, {stream: true}));
    }
    parser.feed(decoder.decode());
  }

  /* ------------------------------------------------------------------ */
  /* Status bar, auth form, dialog                                        */
  /* ------------------------------------------------------------------ */

  let statusTimer = null;

  function showStatus(text, kind) {
    const bar = $("statusbar");
    $("statusbar-text").textContent = text;
    bar.dataset.kind = kind || "error";
    bar.hidden = false;
    clearTimeout(statusTimer);
    if (kind === "info") statusTimer = setTimeout(() => { bar.hidden = true; }, 4000);
  }

  function showError(err) {
    if (err && err.name === "AbortError") return;
    if (err instanceof ApiError) {
      if (err.status === 401) return;          // the token form says it all
      showStatus(err.describe(), "error");
    } else {
      showStatus(String(err && err.message || err), "error");
      if (window.console) console.error(err);
    }
  }

  function needAuth() {
    if (auth.shown) return;
    auth.shown = true;
    auth.rejected = !!token();
    stopWatch();
    document.body.dataset.auth = "required";
    $("auth").hidden = false;
    $("main").hidden = true;
    $("auth-error").textContent = auth.rejected ? "The daemon refused this token." : "";
    $("watch-state").dataset.state = "down";
    $("watch-state").textContent = "not signed in";
    const input = $("auth-token");
    input.value = "";
    input.focus();
  }

  function onAuthSubmit(ev) {
    ev.preventDefault();
    const value = $("auth-token").value.trim();
    if (!value) return;
    try { sessionStorage.setItem(TOKEN_KEY, value); } catch (e) { /* private mode */ }
    auth.shown = false;
    $("auth").hidden = true;
    $("main").hidden = false;
    delete document.body.dataset.auth;
    $("logout").hidden = false;
    $("statusbar").hidden = true;
    boot();
  }

  function onLogout() {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* ignore */ }
    $("logout").hidden = true;
    closeLogStream();
    boot();
  }

  /* A small modal: ask({title, text, input, placeholder, ok, danger}) resolves
   * with the input's value (or true) on OK, null on cancel. */
  function ask(opts) {
    const dlg = $("dialog");
    $("dialog-title").textContent = opts.title;
    $("dialog-text").textContent = opts.text || "";
    const field = $("dialog-field");
    const input = $("dialog-input");
    field.hidden = !opts.input;
    $("dialog-input-label").textContent = opts.input || "";
    input.value = opts.value || "";
    input.placeholder = opts.placeholder || "";
    input.required = !!opts.input;
    const ok = $("dialog-ok");
    ok.textContent = opts.ok || "OK";
    ok.classList.toggle("danger", !!opts.danger);
    ok.classList.toggle("primary", !opts.danger);
    return new Promise((resolve) => {
      const done = (result) => {
        dlg.removeEventListener("close", onClose);
        $("dialog-cancel").onclick = null;
        resolve(result);
      };
      const onClose = () => {
        if (dlg.returnValue === "ok") done(opts.input ? input.value.trim() : true);
        else done(null);
      };
      dlg.addEventListener("close", onClose);
      $("dialog-cancel").onclick = () => dlg.close("cancel");
      dlg.returnValue = "";
      dlg.showModal();
      (opts.input ? input : $("dialog-cancel")).focus();
    });
  }

  /* ------------------------------------------------------------------ */
  /* Formatting                                                           */
  /* ------------------------------------------------------------------ */

  function num(v, digits) {
    return typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "—";
  }

  const UNITS = {B: 1, K: 1024, M: Math.pow(1024, 2), G: Math.pow(1024, 3),
                 T: Math.pow(1024, 4), P: Math.pow(1024, 5)};

  function parseSize(s) {           // "7M" -> bytes (the stats' power-of-1024 sizes)
    const m = /^(\d+(?:\.\d+)?)([BKMGTP])$/.exec(String(s || ""));
    return m ? parseFloat(m[1]) * UNITS[m[2]] : NaN;
  }

  function formatSize(n) {
    if (!isFinite(n)) return "—";
    const order = ["P", "T", "G", "M", "K"];
    for (const u of order) {
      if (n >= UNITS[u]) {
        const v = n / UNITS[u];
        return (v >= 10 ? v.toFixed(0) : v.toFixed(1)) + " " + u + "iB";
      }
    }
    return n + " B";
  }

  function formatDuration(seconds) {
    if (!isFinite(seconds) || seconds < 0) return "—";
    seconds = Math.floor(seconds);
    const d = Math.floor(seconds / 86400);
    const h = Math.floor(seconds % 86400 / 3600);
    const m = Math.floor(seconds % 3600 / 60);
    const s = seconds % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  /* ------------------------------------------------------------------ */
  /* Templates: data                                                      */
  /* ------------------------------------------------------------------ */

  function entry(name) {
    let t = templates.get(name);
    if (!t) {
      t = {name: name, status: null, def: null, stats: null, procs: [],
           row: null, procRows: [], spawnedAt: new Map(), restarts: 0};
      templates.set(name, t);
    }
    return t;
  }

  function forget(name) {
    const t = templates.get(name);
    if (!t) return;
    if (t.row) t.row.remove();
    t.procRows.forEach((r) => r.remove());
    templates.delete(name);
    renderEmpty();
    renderLogSources();
  }

  /* Re-read one template (status, processes, definition) and redraw it. */
  async function refreshTemplate(name) {
    let status;
    try {
      status = await api("GET", "/status/" + enc(name));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { forget(name); return; }
      throw e;
    }
    const t = entry(name);
    t.status = status;
    const jobs = [refreshStats(t)];
    if (!t.def) jobs.push(refreshDefinition(t));
    await Promise.all(jobs);
    render(t);
  }

  async function refreshDefinition(t) {
    try {
      t.def = await api("GET", "/processes/" + enc(t.name));
    } catch (e) {
      t.def = null;
      if (!(e instanceof ApiError && e.status === 404)) throw e;
    }
  }

  /* Processes of a template from GET /stats/NAME (ids, pids, cpu, memory).
   * Falls back on GET /processes/NAME/_pids when stats are unavailable. */
  async function refreshStats(t) {
    try {
      t.stats = await api("GET", "/stats/" + enc(t.name));
      t.procs = (t.stats.stats || []).map((s) => ({
        id: s.id, pid: s.pid, cpu: s.cpu, mem: s.mem, rss: s.mem_info1,
        ctime: s.ctime, uptime: typeof s.uptime === "number" ? s.uptime : null,
      }));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { t.procs = []; return; }
      t.stats = null;
      try {
        const r = await api("GET", "/processes/" + enc(t.name) + "/_pids");
        t.procs = (r.pids || []).map((id) => ({id: id, pid: null}));
      } catch (e2) { t.procs = []; }
      throw e;
    }
  }

  /* Uptime and restart counters from /metrics (optional: the columns fall
   * back on what this page saw in the event feed). */
  async function refreshMetrics() {
    let text;
    try {
      text = await api("GET", "/metrics");
    } catch (e) {
      return;                       // not essential
    }
    if (typeof text !== "string") return;
    const uptime = new Map();
    const restarts = new Map();
    const re = /^(gafferd_[a-z_]+)\{([^}]*)\}\s+(\S+)/;
    for (const line of text.split("\n")) {
      const m = re.exec(line);
      if (!m) continue;
      const labels = {};
      m[2].replace(/(\w+)="((?:[^"\\]|\\.)*)"/g, (_, k, v) => { labels[k] = v.replace(/\\(.)/g, "$1"); });
      const value = parseFloat(m[3]);
      if (m[1] === "gafferd_process_uptime_seconds" && labels.id !== undefined) {
        uptime.set(Number(labels.id), value);
      } else if (m[1] === "gafferd_template_restarts_total" && labels.name !== undefined) {
        restarts.set(labels.name, value);
      }
    }
    metrics = {uptime: uptime, restarts: restarts, at: Date.now()};
  }

  /* The whole picture: GET / and GET /status, then every template. Templates
   * named by events while it runs are refreshed again once it is applied. */
  async function reloadAll() {
    reloads += 1;
    try {
      await readAll();
    } finally {
      reloads -= 1;
      if (!reloads) {
        touchedDuringReload.forEach(scheduleRefresh);
        touchedDuringReload.clear();
      }
    }
  }

  async function readAll() {
    const [root, all] = await Promise.all([api("GET", "/"), api("GET", "/status")]);
    if (root && root.version) {
      $("daemon-version").textContent = "gafferd " + (root.gafferd || "?") + " · API " + root.version;
    }
    for (const name of Array.from(templates.keys())) {
      if (!(name in all)) forget(name);
    }
    for (const name of Object.keys(all)) {
      const t = entry(name);
      t.status = all[name];
      render(t);
    }
    renderEmpty();
    await refreshMetrics();
    const results = await Promise.allSettled(Object.keys(all).map((name) => {
      const t = entry(name);
      return Promise.all([refreshStats(t), t.def ? null : refreshDefinition(t)]).then(() => render(t));
    }));
    const failed = results.find((r) => r.status === "rejected");
    if (failed) showError(failed.reason);
    renderLogSources();
  }

  /* Re-read /metrics soon (restart counters move on exits). */
  let metricsTimer = null;
  function scheduleMetrics() {
    if (metricsTimer) return;
    metricsTimer = setTimeout(() => {
      metricsTimer = null;
      refreshMetrics().then(() => templates.forEach(render));
    }, 500);
  }

  /* Debounced per-template refreshes, driven by /watch events. */
  const pending = new Set();
  const inflight = new Map();   // name -> Promise
  let pendingTimer = null;

  function scheduleRefresh(name) {
    pending.add(name);
    if (!pendingTimer) pendingTimer = setTimeout(flushRefreshes, REFRESH_DEBOUNCE_MS);
  }

  function flushRefreshes() {
    pendingTimer = null;
    for (const name of Array.from(pending)) {
      if (inflight.has(name)) continue;     // picked up when that one ends
      pending.delete(name);
      const p = refreshTemplate(name).catch(showError).finally(() => {
        inflight.delete(name);
        if (pending.has(name) && !pendingTimer) {
          pendingTimer = setTimeout(flushRefreshes, REFRESH_DEBOUNCE_MS);
        }
        afterTemplateRefresh(name);
      });
      inflight.set(name, p);
    }
  }

  /* Slow timer for CPU / memory / uptime only (no event announces those). */
  async function statsTick() {
    if (document.hidden || auth.shown || !document.body.dataset.ready) return;
    await refreshMetrics();
    await Promise.allSettled(Array.from(templates.values()).map((t) => {
      if (!t.status || !t.status.running) { render(t); return null; }
      return refreshStats(t).then(() => render(t));
    }));
  }

  /* ------------------------------------------------------------------ */
  /* Templates: rendering                                                 */
  /* ------------------------------------------------------------------ */

  const COLUMNS = ["name", "group", "state", "running", "ready", "procs", "cpu", "mem", "rss",
                   "uptime", "restarts", "last_exit", "actions"];
  const NUMERIC = new Set(["ready", "cpu", "mem", "rss", "uptime", "restarts"]);

  const ACTIONS = [
    {action: "start", label: "Start", title: "start the template"},
    {action: "stop", label: "Stop", title: "stop every process"},
    {action: "restart", label: "Restart", title: "restart every process"},
    {action: "add", label: "+1", title: "one more process", aria: "add one process to"},
    {action: "sub", label: "−1", title: "one process less", aria: "remove one process from"},
    {action: "signal", label: "Signal…", title: "send a signal to every process"},
    {action: "remove", label: "Remove", title: "stop and delete the template", cls: "danger"},
  ];

  function stateOf(t) {
    const s = t.status || {};
    if (s.state) return s.state;
    return s.active ? "running" : "stopped";
  }

  function groupOf(t) {
    if (t.def && t.def.group) return t.def.group;
    const i = t.name.indexOf(":");
    return i > 0 ? t.name.slice(0, i) : "";
  }

  function makeRow(t) {
    const tr = document.createElement("tr");
    tr.className = "template";
    tr.dataset.name = t.name;
    tr.cells_ = {};
    for (const col of COLUMNS) {
      const td = document.createElement(col === "name" ? "th" : "td");
      if (col === "name") td.scope = "row";
      td.dataset.field = col;
      if (NUMERIC.has(col)) td.className = "num";
      tr.appendChild(td);
      tr.cells_[col] = td;
    }
    const box = document.createElement("div");
    box.className = "actions";
    for (const a of ACTIONS) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = a.label;
      b.title = a.title;
      b.dataset.action = a.action;
      b.dataset.name = t.name;
      b.setAttribute("aria-label", (a.aria || a.label.replace("…", "")) + " " + t.name);
      if (a.cls) b.className = a.cls;
      box.appendChild(b);
    }
    tr.cells_.actions.appendChild(box);
    return tr;
  }

  /* Insert or update one template's row and its process rows. */
  function render(t) {
    if (!templates.has(t.name)) return;
    const body = $("templates-body");
    if (!t.row) {
      t.row = makeRow(t);
      // keep rows in the daemon's order (that of /status), new ones last
      body.appendChild(t.row);
    }
    const c = t.row.cells_;
    const s = t.status || {};
    const state = stateOf(t);
    const prev = t.row.dataset.state;
    t.row.dataset.state = state;
    c.name.textContent = t.name;
    if (t.def && t.def.cmd) c.name.title = [t.def.cmd].concat(argsOf(t.def)).join(" ");
    c.group.textContent = groupOf(t) || "—";
    c.state.replaceChildren(badge(state));
    c.running.textContent = (s.running != null ? s.running : "?") + " / " +
                            (s.max_processes != null ? s.max_processes : "?");
    c.ready.textContent = typeof s.ready === "number" ? String(s.ready) : "—";
    c.ready.title = "processes ready (of " + (s.max_processes != null ? s.max_processes : "?") +
                    " wanted)" + (s.waiting_for && s.waiting_for.length ?
                    "; waiting for " + s.waiting_for.join(", ") : "");
    c.procs.replaceChildren(pidList(t.procs));

    const live = t.procs.length > 0;
    const sum = (k) => t.procs.reduce((a, p) => a + (typeof p[k] === "number" ? p[k] : NaN), 0);
    c.cpu.textContent = live ? num(sum("cpu"), 1) : "—";
    c.mem.textContent = live ? num(sum("mem"), 1) : "—";
    c.rss.textContent = live ? formatSize(t.procs.reduce((a, p) => a + parseSize(p.rss), 0)) : "—";
    renderUptime(t);
    // the daemon's count (GET /status/NAME, else /metrics), else what this page saw
    const known = typeof s.restarts === "number" ? s.restarts :
                  metrics.restarts.has(t.name) ? metrics.restarts.get(t.name) : null;
    const restarts = known != null ? known : t.restarts;
    c.restarts.textContent = restarts != null ? String(restarts) : "—";
    c.restarts.title = known != null ? "exits nobody asked for since the template started" :
                       "unasked-for exits seen by this page";
    renderLastExit(t);

    const btn = (a) => t.row.querySelector('button[data-action="' + a + '"]');
    btn("start").disabled = state === "running" && s.running >= s.max_processes;
    btn("stop").disabled = state === "stopped" && !s.running;
    btn("sub").disabled = !s.max_processes;

    renderProcRows(t);
    if (prev && prev !== state) flash(t.row);
    renderEmpty();
  }

  /* Linux signal numbers (what the daemon reports in term_signal). */
  const SIGNALS = ["", "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL",
                   "USR1", "SEGV", "USR2", "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT",
                   "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF",
                   "WINCH", "IO", "PWR", "SYS"];

  /* "SIGKILL" (killed by it) or "exit 3", from a last_exit object or an
   * exit event. */
  function exitText(e) {
    if (e.term_signal) {
      const n = e.term_signal;
      return SIGNALS[n] ? "SIG" + SIGNALS[n] : "signal " + n;
    }
    return "exit " + (e.exit_status != null ? e.exit_status : "?");
  }

  /* The last exit nobody asked for: what, and how long ago (redrawn every
   * second with the uptimes); the title holds the details. */
  function renderLastExit(t) {
    if (!t.row) return;
    const cell = t.row.cells_.last_exit;
    const e = (t.status || {}).last_exit;
    if (!e) {
      cell.textContent = "—";
      cell.title = "no exit nobody asked for";
      delete cell.dataset.signal;
      delete cell.dataset.status;
      return;
    }
    const ago = typeof e.time === "number" ? Date.now() / 1000 - e.time : NaN;
    cell.textContent = exitText(e) + (isFinite(ago) ? " · " + formatDuration(Math.max(0, ago)) + " ago" : "");
    cell.dataset.signal = e.term_signal || 0;
    cell.dataset.status = e.exit_status != null ? e.exit_status : "";
    cell.title = (e.term_signal ? "killed by " : "") + exitText(e) + ": #" + e.id +
                 (e.os_pid != null ? " (pid " + e.os_pid + ")" : "") +
                 (typeof e.uptime === "number" ? ", up " + e.uptime.toFixed(1) + " s" : "") +
                 (typeof e.time === "number" ? ", at " + new Date(e.time * 1000).toLocaleString() : "");
  }

  function argsOf(def) {
    if (Array.isArray(def.args)) return def.args;
    return def.args ? [String(def.args)] : [];
  }

  function badge(state) {
    const span = document.createElement("span");
    span.className = "state state-" + state;
    span.textContent = state;
    return span;
  }

  function pidList(procs) {
    const frag = document.createElement("span");
    frag.className = "pids";
    if (!procs.length) { frag.textContent = "—"; return frag; }
    procs.forEach((p, i) => {
      if (i) frag.appendChild(document.createTextNode(", "));
      frag.appendChild(document.createTextNode("#" + p.id));
      if (p.pid != null) {
        const pid = document.createElement("span");
        pid.className = "pid";
        pid.textContent = " (" + p.pid + ")";
        frag.appendChild(pid);
      }
    });
    return frag;
  }

  /* Seconds since the process started: from its stats, from /metrics, or
   * from the spawn event this page saw; null when nobody knows. */
  function uptimeOf(t, p) {
    if (p.uptime != null) return p.uptime;
    if (metrics.uptime.has(p.id)) return metrics.uptime.get(p.id) + (Date.now() - metrics.at) / 1000;
    if (t.spawnedAt.has(p.id)) return (Date.now() - t.spawnedAt.get(p.id)) / 1000;
    return null;
  }

  /* One sub-row per process when a template has more than one. */
  function renderProcRows(t) {
    t.procRows.forEach((r) => r.remove());
    t.procRows = [];
    if (t.procs.length < 2) return;
    let after = t.row;
    for (const p of t.procs) {
      const tr = document.createElement("tr");
      tr.className = "proc";
      tr.dataset.name = t.name;
      tr.dataset.id = p.id;
      const cells = {
        name: "#" + p.id, group: "", state: "", running: "", ready: "", last_exit: "",
        procs: p.pid != null ? "pid " + p.pid : "", cpu: num(p.cpu, 1), mem: num(p.mem, 1),
        rss: formatSize(parseSize(p.rss)),
        uptime: uptimeOf(t, p) != null ? formatDuration(uptimeOf(t, p)) : "—", restarts: "",
      };
      for (const col of COLUMNS) {
        const td = document.createElement("td");
        td.dataset.field = col;
        if (NUMERIC.has(col)) td.className = "num";
        if (col === "actions") {
          const b = document.createElement("button");
          b.type = "button";
          b.textContent = "Output";
          b.dataset.action = "logs";
          b.dataset.name = t.name;
          b.dataset.id = p.id;
          b.setAttribute("aria-label", "show the output of process " + p.id + " of " + t.name);
          td.appendChild(b);
        } else {
          td.textContent = cells[col];
        }
        tr.appendChild(td);
      }
      after.after(tr);
      after = tr;
      t.procRows.push(tr);
    }
  }

  /* Uptime cells only: redrawn every second from what is known, no request. */
  function renderUptime(t) {
    if (!t.row) return;
    renderLastExit(t);
    const ups = t.procs.map((p) => uptimeOf(t, p)).filter((u) => u != null);
    t.row.cells_.uptime.textContent = ups.length ? formatDuration(Math.max.apply(null, ups)) : "—";
    t.procRows.forEach((tr, i) => {
      const p = t.procs[i];
      const u = p ? uptimeOf(t, p) : null;
      tr.querySelector('[data-field="uptime"]').textContent = u != null ? formatDuration(u) : "—";
    });
  }

  function flash(tr) {
    tr.classList.remove("flash");
    void tr.offsetWidth;          // restart the animation
    tr.classList.add("flash");
  }

  function renderEmpty() {
    const body = $("templates-body");
    const ph = body.querySelector("tr.placeholder");
    const n = templates.size;
    $("templates-count").textContent = n ? n + (n === 1 ? " template" : " templates") : "";
    if (n && ph) ph.remove();
    if (!n && !ph) {
      const tr = document.createElement("tr");
      tr.className = "placeholder";
      tr.innerHTML = '<td colspan="' + COLUMNS.length + '"></td>';
      body.appendChild(tr);
    }
    const cell = body.querySelector("tr.placeholder td");
    if (cell) {
      cell.textContent = auth.shown ? "Waiting for the API token…" :
        document.body.dataset.ready ? "No templates. Add one with the form below." : "Loading…";
    }
  }

  /* ------------------------------------------------------------------ */
  /* Actions                                                              */
  /* ------------------------------------------------------------------ */

  async function onTableClick(ev) {
    const b = ev.target.closest("button[data-action]");
    if (!b || b.disabled) return;
    const name = b.dataset.name;
    const action = b.dataset.action;
    if (action === "logs") { selectLog(name, Number(b.dataset.id), true); return; }
    const base = "/processes/" + enc(name);
    let method = "POST";
    let path;
    let done = name + ": " + action + " ok";
    switch (action) {
      case "start": case "stop": case "restart":
        path = base + "/_" + action; break;
      case "add": case "sub":
        path = base + "/_" + action; break;
      case "signal": {
        const sig = await ask({title: "Send a signal to " + name,
                               text: "Every live process of the template gets it.",
                               input: "Signal name or number", placeholder: "HUP, TERM, 10…",
                               ok: "Send"});
        if (!sig) return;
        const clean = /^\d+$/.test(sig) ? sig : sig.toUpperCase();
        path = base + "/_signal/" + enc(clean);
        done = name + ": sent " + clean;
        break;
      }
      case "remove": {
        const ok = await ask({title: "Remove " + name + "?",
                              text: "Its processes are stopped and the template is deleted.",
                              ok: "Remove", danger: true});
        if (!ok) return;
        method = "DELETE";
        path = base;
        done = name + " removed";
        break;
      }
      default:
        return;
    }
    b.disabled = true;
    b.setAttribute("aria-busy", "true");
    try {
      const r = await api(method, path);
      if (r && typeof r.numprocesses === "number") done += " (target " + r.numprocesses + ")";
      showStatus(done, "info");
    } catch (e) {
      showError(e);
    } finally {
      b.removeAttribute("aria-busy");
      b.disabled = false;
      if (action === "remove") scheduleRefresh(name);
      else if (templates.has(name)) scheduleRefresh(name);
    }
  }

  async function onAddSubmit(ev) {
    ev.preventDefault();
    const f = ev.target;
    const body = {name: f.name.value.trim(), cmd: f.cmd.value.trim()};
    const args = f.args.value.trim();
    if (args) body.args = args;              // a string: the daemon splits it (shlex)
    const n = f.numprocesses.value.trim();
    if (n !== "") body.numprocesses = parseInt(n, 10);
    body.start = f.start.checked;
    const submit = $("add-submit");
    submit.disabled = true;
    try {
      await api("POST", "/processes", body);
      showStatus("template " + body.name + " added", "info");
      f.name.value = "";
      f.args.value = "";
      scheduleRefresh(body.name);
    } catch (e) {
      showError(e);
    } finally {
      submit.disabled = false;
    }
  }

  /* ------------------------------------------------------------------ */
  /* The /watch event feed                                                */
  /* ------------------------------------------------------------------ */

  function setWatchState(state, text) {
    const el = $("watch-state");
    el.dataset.state = state;
    el.textContent = text;
  }

  function stopWatch() {
    if (watchCtrl) watchCtrl.abort();
    watchCtrl = null;
  }

  async function startWatch() {
    stopWatch();
    const ctrl = new AbortController();
    watchCtrl = ctrl;
    setWatchState("connecting", watchEverOpen ? "reconnecting…" : "connecting…");
    let opened = false;
    try {
      await sse("/watch?feed=eventsource&heartbeat=30", ctrl.signal, {
        open() {
          opened = true;
          watchBackoff = 1000;
          setWatchState("live", "live");
          watchEverOpen = true;
          onFeedOpen();          // subscribed: now read the state (first load or resync)
        },
        event: onWatchEvent,
      });
    } catch (e) {
      if (ctrl.signal.aborted) return;
      if (e instanceof ApiError && e.status === 401) return;   // needAuth() took over
      if (!opened) showError(e);
    }
    if (ctrl.signal.aborted || watchCtrl !== ctrl) return;
    setWatchState("down", "event feed lost, retrying");
    setTimeout(() => { if (watchCtrl === ctrl) startWatch(); }, watchBackoff);
    watchBackoff = Math.min(watchBackoff * 2, 15000);
  }

  function onWatchEvent(ev) {
    // Each manager event also arrives as proc.NAME.EVENT; the bare twin is enough.
    if (ev.event.indexOf("proc.") === 0) return;
    let payload = {};
    try { payload = JSON.parse(ev.data); } catch (e) { return; }
    const name = payload.name;
    if (typeof name !== "string") return;
    if (reloads) touchedDuringReload.add(name);
    switch (ev.event) {
      case "delete":
        forget(name);
        break;    // the refresh (a 404) also drops a row an in-flight refresh brought back
      case "spawn": {
        const t = entry(name);
        t.spawnedAt.set(payload.pid, Date.now());
        break;
      }
      case "exit": {
        const t = templates.get(name);
        // An exit nobody asked for (no stop_pid/reap announced it) is a restart:
        // shown at once; the refresh below brings the daemon's own figures.
        if (t && !(t.stopping && t.stopping.has(payload.pid))) {
          t.restarts += 1;
          if (t.status) {
            t.status.last_exit = {id: payload.pid, os_pid: payload.os_pid,
                                  exit_status: payload.exit_status, term_signal: payload.term_signal,
                                  uptime: payload.uptime, time: Date.now() / 1000};
            // a success (by the template's success_exit_codes) that is not
            // restarted (restart_in null) leaves the process exited: no restart
            const codes = t.def && Array.isArray(t.def.success_exit_codes) ?
                          t.def.success_exit_codes : [0];
            const ok = payload.restart_in == null && !payload.term_signal &&
                       codes.indexOf(payload.exit_status) >= 0;
            if (!ok && typeof t.status.restarts === "number") t.status.restarts += 1;
            render(t);
          }
        }
        if (t && t.stopping) t.stopping.delete(payload.pid);
        scheduleMetrics();
        break;
      }
      case "state": {
        const t = templates.get(name);
        if (t && t.status && typeof payload.state === "string") {
          t.status.state = payload.state;
          render(t);
        }
        break;
      }
      case "stop_pid": case "reap": {
        const t = templates.get(name);
        if (t) (t.stopping = t.stopping || new Set()).add(payload.pid);
        break;
      }
      default:
        if (ev.event !== "create" && !templates.has(name)) return;   // e.g. a plugin's event
    }
    scheduleRefresh(name);
  }

  /* ------------------------------------------------------------------ */
  /* Output pane                                                          */
  /* ------------------------------------------------------------------ */

  const log = {name: "", id: null, label: "stdout", ctrl: null, following: null,
               gen: 0, failed: new Set(), lines: 0};

  function logKey(name, id) { return name + "\u0000" + (id == null ? "" : id); }

  /* The process picker: per template, "latest process" and each live one. */
  function renderLogSources() {
    const sel = $("log-source");
    const current = log.name ? logKey(log.name, log.id) : sel.value;
    sel.replaceChildren();
    const none = document.createElement("option");
    none.value = "";
    none.textContent = templates.size ? "— pick a process —" : "— no template —";
    sel.appendChild(none);
    let found = false;
    for (const t of templates.values()) {
      const g = document.createElement("optgroup");
      g.label = t.name;
      const opts = [[null, t.name + " · latest process"]];
      for (const p of t.procs) opts.push([p.id, t.name + " #" + p.id + (p.pid != null ? " (pid " + p.pid + ")" : "")]);
      if (log.name === t.name && log.id != null && !t.procs.some((p) => p.id === log.id)) {
        opts.push([log.id, t.name + " #" + log.id + " (exited)"]);
      }
      for (const [id, text] of opts) {
        const o = document.createElement("option");
        o.value = logKey(t.name, id);
        o.textContent = text;
        if (o.value === current) { o.selected = true; found = true; }
        g.appendChild(o);
      }
      sel.appendChild(g);
    }
    if (!found) none.selected = true;
  }

  function renderLogLabels(name) {
    const t = templates.get(name);
    const sel = $("log-label");
    let labels = ["stdout", "stderr"];
    if (t && t.def && Array.isArray(t.def.redirect_output) && t.def.redirect_output.length) {
      labels = t.def.redirect_output.slice();
    }
    const keep = labels.indexOf(sel.value) >= 0 ? sel.value : labels[0];
    sel.replaceChildren();
    for (const l of labels) {
      const o = document.createElement("option");
      o.value = o.textContent = l;
      if (l === keep) o.selected = true;
      sel.appendChild(o);
    }
  }

  /* Follow ``name`` (process ``id``, or its latest). ``focus`` moves the
   * keyboard focus (and so the view) to the pane: for a user's click only,
   * never when the page picks a process on its own while loading. */
  function selectLog(name, id, focus) {
    log.name = name;
    log.id = id;
    renderLogSources();
    $("log-source").value = logKey(name, id);
    renderLogLabels(name);
    openLog();
    if (focus) $("log").focus();
  }

  function logState(text) { $("log-state").textContent = text; }

  function appendLog(text, cls) {
    const pre = $("log");
    const stick = $("log-follow").checked;
    const lines = text.split("\n");
    if (cls) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text + "\n";
      pre.appendChild(span);
    } else {
      pre.appendChild(document.createTextNode(text + "\n"));
    }
    log.lines += lines.length;
    while (log.lines > LOG_MAX_LINES && pre.firstChild) {
      const first = pre.firstChild;
      log.lines -= (first.textContent.match(/\n/g) || []).length;
      first.remove();
    }
    if (stick) pre.scrollTop = pre.scrollHeight;
  }

  function closeLogStream() {
    if (log.ctrl) log.ctrl.abort();
    log.ctrl = null;
    log.following = null;
  }

  /* Show the recent output of the chosen template, then follow a process.
   * The stream is opened first and its events held back until the backlog is
   * shown, so that nothing printed in between is lost; lines present in both
   * (the tail of the backlog, the head of the held events) are shown once. */
  async function openLog() {
    closeLogStream();
    const gen = ++log.gen;
    const value = $("log-source").value;
    log.label = $("log-label").value || "stdout";
    log.failed = new Set();
    log.held = null;
    $("log").replaceChildren();
    log.lines = 0;
    if (!value) { log.name = ""; log.id = null; logState(""); return; }
    const [name, idText] = value.split("\u0000");
    log.name = name;
    log.id = idText === "" ? null : Number(idText);
    if (!redirects(templates.get(name))) {
      appendLog(name + " does not capture its output: set redirect_output = stdout, stderr " +
                "in its [process:" + name + "] section (or \"redirect_output\" when adding it).", "sep");
      logState("");
      return;
    }
    logState("loading recent output…");
    log.held = [];
    log.heldNotes = [];
    const opened = await attachLogStream();
    if (gen !== log.gen) return;
    let backlog = [];
    try {
      const r = await api("GET", "/processes/" + enc(name) + "/_log?lines=" + LOG_BACKLOG_LINES +
                          "&label=" + enc(log.label));
      if (gen !== log.gen) return;
      backlog = ((r && r.lines) || []).map((l) => String(l).replace(/\r?\n$/, ""));
      appendLog("── recent " + log.label + " of " + name + " (" + backlog.length + " lines) ──", "sep");
      if (backlog.length) appendLog(backlog.join("\n"));
    } catch (e) {
      if (gen !== log.gen) return;
      appendLog("recent output unavailable: " + (e.describe ? e.describe() : e.message), "err");
    }
    let held = [];
    for (const data of log.held || []) held = held.concat(data.split("\n"));
    const notes = log.heldNotes || [];
    log.held = null;
    log.heldNotes = null;
    if (opened != null) {
      appendLog("── live " + log.label + " of #" + opened + " ──", "sep");
      const skip = overlap(backlog, held);
      if (held.length > skip) appendLog(held.slice(skip).join("\n"));
    }
    for (const [text, cls] of notes) appendLog(text, cls);
  }

  /* Does the template capture its output? (true when unknown) */
  function redirects(t) {
    if (!t || !t.def) return true;
    return Array.isArray(t.def.redirect_output) && t.def.redirect_output.length > 0;
  }

  /* A line about the stream itself; while openLog() holds the live events
   * back, it waits for them, after the backlog. */
  function note(text, cls) {
    if (log.held) log.heldNotes.push([text, cls]);
    else appendLog(text, cls);
  }

  /* Largest m such that the last m lines of a are the first m lines of b. */
  function overlap(a, b) {
    for (let m = Math.min(a.length, b.length); m > 0; m--) {
      let same = true;
      for (let i = 0; i < m && same; i++) same = a[a.length - m + i] === b[i];
      if (same) return m;
    }
    return 0;
  }

  /* Follow one process's output; in "latest process" mode re-attach to the
   * newest live process whenever the followed one ends. Resolves with the
   * id followed once the stream is open, null if there is nothing to follow
   * or it fails. */
  function attachLogStream() {
    if (!log.name || log.ctrl || !redirects(templates.get(log.name))) return Promise.resolve(null);
    const t = templates.get(log.name);
    let id = log.id;
    if (id == null) {
      const live = t ? t.procs.filter((p) => !log.failed.has(p.id)) : [];
      id = live.length ? live[live.length - 1].id : null;
      if (id == null) {
        logState("no live process; waiting for one to start");
        return Promise.resolve(null);
      }
    } else if (log.failed.has(id) || (t && !t.procs.some((p) => p.id === id))) {
      logState("process #" + id + " is not running");
      return Promise.resolve(null);
    }
    const gen = log.gen;
    const ctrl = new AbortController();
    log.ctrl = ctrl;
    log.following = id;
    const label = log.label;
    const path = "/streams/" + id + "/" + enc(label) + "?feed=eventsource&heartbeat=30";
    logState("connecting to #" + id + "…");
    return new Promise((resolve) => {
      sse(path, ctrl.signal, {
        open() {
          // during openLog() the separator comes after the backlog
          if (!log.held) appendLog("── live " + label + " of #" + id + " ──", "sep");
          logState("following " + label + " of " + log.name + " #" + id);
          resolve(id);
        },
        event(ev) {
          if (log.held) log.held.push(ev.data);
          else appendLog(ev.data);
        },
      }).then(() => {
        if (gen !== log.gen) return;
        note("── #" + id + " ended ──", "sep");
        log.failed.add(id);
        logState("process #" + id + " ended");
      }, (e) => {
        if (ctrl.signal.aborted || gen !== log.gen) return;
        log.failed.add(id);
        if (e instanceof ApiError && e.status === 404 && e.code === "not_found") {
          note("── #" + id + " has already exited ──", "sep");   // the table was a bit behind
        } else {
          note("cannot follow #" + id + ": " + (e.describe ? e.describe() : e.message), "err");
        }
        logState("");
      }).finally(() => {
        resolve(null);
        if (log.ctrl !== ctrl) return;
        log.ctrl = null;
        log.following = null;
        if (log.id == null && gen === log.gen) scheduleRefresh(log.name);  // then re-attach
      });
    });
  }

  function afterTemplateRefresh(name) {
    if (name === log.name) {
      renderLogSources();
      if (!log.ctrl) attachLogStream();
    } else {
      renderLogSources();
    }
  }

  /* ------------------------------------------------------------------ */
  /* Start-up                                                             */
  /* ------------------------------------------------------------------ */

  /* Subscribe first, then read: the event feed is opened, and its opening
   * (onFeedOpen) reads the state, so a change made during start-up is
   * either in that reply or announced by an event (see reloadAll). */
  function boot() {
    delete document.body.dataset.ready;
    stopWatch();
    $("logout").hidden = !token();
    watchEverOpen = false;
    startWatch();
  }

  /* The feed is open (first time or again): read the whole state. */
  async function onFeedOpen() {
    try {
      await reloadAll();
    } catch (e) {
      showError(e);
      renderEmpty();
      return;
    }
    if (document.body.dataset.ready) return;         // a resync: nothing else to do
    document.body.dataset.ready = "1";
    renderEmpty();
    if (!log.name) {
      // follow the first template that has a live process and captures its output
      const live = Array.from(templates.values()).filter((t) => t.procs.length);
      const first = live.find(redirects) || live[0];
      if (first) selectLog(first.name, null, false);
    } else if (!log.ctrl) {
      openLog();
    }
  }

  function init() {
    $("auth-form").addEventListener("submit", onAuthSubmit);
    $("logout").addEventListener("click", onLogout);
    $("refresh").addEventListener("click", () => {
      $("statusbar").hidden = true;
      reloadAll().catch(showError);
    });
    $("statusbar-close").addEventListener("click", () => { $("statusbar").hidden = true; });
    $("templates-body").addEventListener("click", onTableClick);
    $("add-form").addEventListener("submit", onAddSubmit);
    $("log-source").addEventListener("change", () => {
      const v = $("log-source").value;
      renderLogLabels(v ? v.split("\u0000")[0] : "");
      openLog();
    });
    $("log-label").addEventListener("change", openLog);
    $("log-clear").addEventListener("click", () => { $("log").replaceChildren(); log.lines = 0; });
    setInterval(() => { statsTick().catch(() => {}); }, STATS_INTERVAL_MS);
    setInterval(() => { if (!document.hidden) templates.forEach(renderUptime); }, 1000);
    renderLogSources();
    boot();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
