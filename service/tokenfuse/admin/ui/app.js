/* tokenfuse admin dashboard: vanilla JS, no dependencies, no external resources.
 *
 * Talks to the admin API (protos/tokenfuse/admin/v1/admin.proto) through Envoy's gRPC-JSON
 * transcoder on the same origin. Field names are the proto's (snake_case); int64 values are
 * JSON strings, and money (nano-USD) is only ever handled as BigInt: parsed from the string,
 * formatted exactly, typed USD converted to nano by string arithmetic. Every value that
 * comes from the API is put in the page as text (textContent), never as markup.
 */
'use strict';

(() => {
  const TOKEN_KEY = 'tokenfuse.admin.token';
  const REFRESH_MS = 5000;
  /** How often each view reloads by itself (the usage queries scan Redis: less often). */
  const VIEW_REFRESH_MS = {overview: 5000, usage: 30000, pools: 10000, budgets: 10000,
    events: 10000, audit: 15000};
  const NANO = 1000000000n;
  const WINDOWS = ['minute', 'hour', 'day', 'week', 'month', 'total'];
  const STEP_MS = {minute: 60000, hour: 3600000, day: 86400000};
  const MAX_BARS = 120;
  const GRPC_CODES = ['OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED',
    'NOT_FOUND', 'ALREADY_EXISTS', 'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED',
    'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED', 'INTERNAL',
    'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED'];
  const PALETTE = ['#2458d3', '#e07b00', '#1b9e5a', '#c0262d', '#7b4fc9', '#0f8fa6',
    '#b8860b', '#d1478f', '#6b7a8f'];

  const state = {
    token: null, name: '', role: '', view: 'overview', timer: null, busy: new Set(),
    cache: new Map(), kinds: new Set(), loadedKey: null, pools: [], refreshed: {}, again: new Map(),
    keyNames: new Map(), keyNamesAt: 0,
  };

  // ------------------------------------------------------------------ money and numbers

  /** An int64 from the API (a JSON string; absent means 0) as a BigInt. */
  function big(value) {
    if (value === undefined || value === null || value === '') return 0n;
    if (typeof value === 'bigint') return value;
    if (typeof value === 'number') return BigInt(Math.trunc(value));
    return BigInt(String(value));
  }

  function groupDigits(digits) {
    return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  }

  /** nano-USD -> "$1,234.50", "$0.000012345": exact, at least two decimals. */
  function formatUsd(value) {
    let n = big(value);
    const sign = n < 0n ? '-' : '';
    if (n < 0n) n = -n;
    let frac = (n % NANO).toString().padStart(9, '0').replace(/0+$/, '');
    if (frac.length < 2) frac = frac.padEnd(2, '0');
    return `${sign}$${groupDigits((n / NANO).toString())}.${frac}`;
  }

  /** nano-USD -> "5.5" (what the editor shows in its inputs: no sign, no separators). */
  function plainUsd(value) {
    const n = big(value);
    let frac = (n % NANO).toString().padStart(9, '0').replace(/0+$/, '');
    if (frac.length < 2) frac = frac.padEnd(2, '0');
    return `${(n / NANO).toString()}.${frac}`;
  }

  /** Typed USD ("5", "5.00", "$1,000.5", ".25") -> nano-USD BigInt, exactly; throws on
   * anything else (negative, more than 9 decimals, not a number). */
  function parseUsd(text) {
    const cleaned = String(text).trim().replace(/^\$/, '').replace(/,/g, '').trim();
    const m = /^(\d*)(?:\.(\d*))?$/.exec(cleaned);
    if (!m || (m[1] === '' && (m[2] === undefined || m[2] === ''))) {
      throw new Error(`"${text}" is not an amount in USD (e.g. 5.00)`);
    }
    const frac = m[2] || '';
    if (frac.length > 9) throw new Error(`"${text}": at most 9 decimals (1 nano-USD)`);
    return BigInt(m[1] || '0') * NANO + BigInt(frac.padEnd(9, '0'));
  }

  function formatInt(value) {
    const n = big(value);
    return (n < 0n ? '-' : '') + groupDigits((n < 0n ? -n : n).toString());
  }

  /** part / whole in [0, 1] (BigInt division, then a small Number for drawing). */
  function ratio(part, whole) {
    const p = big(part);
    const w = big(whole);
    if (w <= 0n || p <= 0n) return 0;
    if (p >= w) return 1;
    return Number((p * 1000000n) / w) / 1000000;
  }

  function sumValues(map) {
    let total = 0n;
    for (const v of Object.values(map || {})) total += big(v);
    return total;
  }

  /** The smallest 1, 2 or 5 x 10^k at or above n (chart scales). */
  function niceCeil(n) {
    if (n <= 0n) return 1n;
    const p = 10n ** BigInt(n.toString().length - 1);
    for (const m of [1n, 2n, 5n, 10n]) if (m * p >= n) return m * p;
    return 10n * p;
  }

  function fmtTime(ms) {
    const n = Number(big(ms));
    if (!n) return '–';
    return new Date(n).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  function shortId(id) {
    const s = String(id || '');
    return /^[0-9a-f]{32,}$/i.test(s) ? `${s.slice(0, 10)}…` : s;
  }

  // ------------------------------------------------------------------------- the page

  const $ = (id) => document.getElementById(id);

  /** An element with attributes (text: textContent, class: className, on*: listeners). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') node.textContent = String(v);
      else if (k === 'class') node.className = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  /** Exact USD as "$1.23" + smaller sub-cent digits ("456789"): the text is still the
   * whole exact figure; data-nano holds the integer. */
  function fillMoney(node, value) {
    const text = formatUsd(value);
    const cut = text.indexOf('.') + 3;
    node.replaceChildren(text.slice(0, cut));
    if (text.length > cut) node.append(el('span', {class: 'fine', text: text.slice(cut)}));
    node.dataset.nano = big(value).toString();
    node.title = `${text} (${formatInt(value)} nano-USD)`;
    return node;
  }

  function moneyEl(value, attrs) {
    return fillMoney(el('span', {class: 'money', ...(attrs || {})}), value);
  }

  function setMoney(node, value) {
    fillMoney(node, value);
  }

  function setResult(node, ok, text) {
    node.textContent = text;
    node.dataset.state = ok ? 'ok' : 'error';
  }

  function fillBody(table, rows) {
    const body = table.tBodies[0];
    body.replaceChildren(...rows);
  }

  function isOperator() {
    return state.role === 'operator';
  }

  /** A button only operators may press (disabled, with a reason, for viewers). */
  function opButton(text, attrs, onclick) {
    const button = el('button', {type: 'button', 'data-op': true, text, ...attrs});
    button.addEventListener('click', onclick);
    return button;
  }

  function applyRole() {
    const operator = isOperator();
    for (const node of document.querySelectorAll('[data-op]')) {
      node.disabled = !operator;
      if (!operator) node.title = 'needs an operator token';
    }
    $('role-banner').hidden = operator;
    document.body.dataset.role = state.role || '';
  }

  function badge(text, tone) {
    return el('span', {class: `badge ${tone || ''}`, text});
  }

  function stateTone(s) {
    if (['closed', 'ok', 'enabled', 'healthy'].includes(s)) return 'ok';
    if (['half_open', 'cooldown'].includes(s)) return 'warn';
    return s ? 'bad' : '';
  }

  function compact(obj) {
    if (obj === undefined || obj === null) return '';
    if (typeof obj !== 'object') return String(obj);
    return Object.entries(obj).map(([k, v]) =>
      `${k}=${typeof v === 'object' && v !== null ? JSON.stringify(v) : v}`).join(', ');
  }

  // ---------------------------------------------------------------------------- the API

  class ApiError extends Error {
    constructor(status, code, message, method, path) {
      super(message);
      Object.assign(this, {status, code, method, path});
    }

    describe() {
      const code = this.code === null || this.code === undefined ? ''
        : ` ${GRPC_CODES[this.code] || this.code}`;
      const status = this.status ? `HTTP ${this.status}` : 'no answer';
      return `${this.method} ${this.path} → ${status}${code}: ${this.message}`;
    }
  }

  function safeDecode(text) {
    try {
      return decodeURIComponent(text);
    } catch (_) {
      return text;
    }
  }

  /** One call; JSON answers parsed, `raw` for HttpBody ones (CSV, JSON exports). */
  async function api(method, path, body, raw = false) {
    const headers = {Authorization: `Bearer ${state.token}`};
    let payload;
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, {method, headers, body: payload, cache: 'no-store',
        credentials: 'omit'});
    } catch (exc) {
      throw new ApiError(0, null, `network error (${exc.message})`, method, path);
    }
    const text = await resp.text();
    if (!resp.ok) {
      // The transcoder's JSON {code, message}; else the gRPC status headers; else the text.
      const header = resp.headers.get('grpc-message');
      const status = resp.headers.get('grpc-status');
      let code = status === null ? null : Number(status);
      let message = text.trim() || (header && safeDecode(header)) || resp.statusText || 'error';
      try {
        const doc = JSON.parse(text);
        if (doc && typeof doc === 'object') {
          code = doc.code ?? null;
          message = doc.message || message;
        }
      } catch (_) { /* not JSON: the text itself */ }
      throw new ApiError(resp.status, code, message, method, path);
    }
    if (raw) return {text, type: resp.headers.get('content-type') || 'application/octet-stream'};
    return text ? JSON.parse(text) : {};
  }

  function showError(err, source) {
    const box = $('api-error');
    $('api-error-text').textContent = err instanceof ApiError ? err.describe() : String(err.message || err);
    box.dataset.source = source;
    box.dataset.status = err instanceof ApiError ? String(err.status) : '';
    box.hidden = false;
  }

  function clearError(source) {
    const box = $('api-error');
    if (!source || box.dataset.source === source) box.hidden = true;
  }

  /** Reports a failed call: a refused token ends the session; anything else is shown in the
   * banner (and in `result`, next to the control that failed). */
  function report(err, source, result) {
    if (err instanceof ApiError && err.status === 401 && state.token) {
      logout(`Your token is no longer accepted (HTTP 401: ${err.message}). Sign in again.`);
      return;
    }
    showError(err, source);
    if (result) setResult(result, false, err instanceof ApiError ? err.describe() : String(err.message || err));
  }

  function download(name, text, type) {
    const url = URL.createObjectURL(new Blob([text], {type}));
    const link = el('a', {href: url, download: name, hidden: true});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 30000);
  }

  const enc = encodeURIComponent;

  // -------------------------------------------------------------------- session, router

  async function login(token, fromStorage) {
    const error = $('login-error');
    error.hidden = true;
    state.token = token;
    let who;
    try {
      who = await api('GET', '/api/v1/whoami');
    } catch (err) {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      if (err instanceof ApiError && err.status === 401) {
        error.textContent = fromStorage ? 'Your saved token is no longer accepted. Sign in again.'
          : `This token is not accepted (HTTP 401: ${err.message}).`;
      } else {
        error.textContent = err instanceof ApiError ? `Could not sign in: ${err.describe()}` : String(err);
      }
      error.dataset.status = err instanceof ApiError ? String(err.status) : '';
      error.hidden = false;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    state.name = who.name || '';
    state.role = who.role === 'operator' ? 'operator' : 'viewer';
    $('token-input').value = '';
    $('whoami').textContent = `${state.name} · ${state.role}`;
    $('whoami').dataset.role = state.role;
    $('login-view').hidden = true;
    $('app').hidden = false;
    $('tabs').hidden = false;
    $('session').hidden = false;
    applyRole();
    await loadKeyNames();
    route();
    clearInterval(state.timer);
    state.timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  }

  function logout(message) {
    clearInterval(state.timer);
    state.timer = null;
    state.token = null;
    state.role = '';
    state.cache.clear();
    state.again.clear();
    state.refreshed = {};
    state.loadedKey = null;
    state.keyNames = new Map();
    state.keyNamesAt = 0;
    sessionStorage.removeItem(TOKEN_KEY);
    $('app').hidden = true;
    $('tabs').hidden = true;
    $('session').hidden = true;
    $('api-error').hidden = true;
    $('login-view').hidden = false;
    const error = $('login-error');
    error.textContent = message || '';
    error.hidden = !message;
    document.body.dataset.role = '';
  }

  const VIEWS = ['overview', 'usage', 'pools', 'budgets', 'events', 'audit'];

  function route() {
    const wanted = location.hash.replace(/^#\/?/, '');
    state.view = VIEWS.includes(wanted) ? wanted : 'overview';
    for (const section of document.querySelectorAll('.view')) {
      section.hidden = section.dataset.view !== state.view;
    }
    for (const tab of document.querySelectorAll('.tab')) {
      tab.classList.toggle('active', tab.dataset.tab === state.view);
      tab.setAttribute('aria-current', tab.dataset.tab === state.view ? 'page' : 'false');
    }
    refresh(true);
  }

  /** Fetch a JSON document; render it only when it changed (or `force`). */
  async function load(name, path, render, force) {
    if (state.busy.has(name)) {
      // One in flight may predate an action: load again once it is back.
      if (force) state.again.set(name, [path, render]);
      return;
    }
    state.busy.add(name);
    try {
      const doc = await api('GET', path);
      const text = JSON.stringify(doc);
      if (force || state.cache.get(name) !== text) {
        state.cache.set(name, text);
        render(doc);
      }
      clearError('refresh');
    } catch (err) {
      report(err, 'refresh');
    } finally {
      state.busy.delete(name);
      const next = state.again.get(name);
      if (next) {
        state.again.delete(name);
        load(name, next[0], next[1], true);
      }
    }
  }

  function refresh(force) {
    if (!state.token) return;
    const view = state.view;
    const now = Date.now();
    if (!force && now - (state.refreshed[view] || 0) < VIEW_REFRESH_MS[view] - 500) return;
    state.refreshed[view] = now;
    loadKeyNames();
    if (view === 'overview') {
      load('overview', '/api/v1/overview', renderOverview, force);
    } else if (view === 'usage') {
      const resolution = $('series-resolution').value;
      const group = $('series-group').value;
      load('series', `/api/v1/usage/series?resolution=${enc(resolution)}&group_by=${enc(group)}`,
        (doc) => renderSeries(doc, resolution), force);
      const window_ = $('usage-window').value;
      const by = $('usage-group').value;
      load('usage', `/api/v1/usage?window=${enc(window_)}&group_by=${enc(by)}`, renderUsage, force);
    } else if (view === 'pools') {
      load('pools', '/api/v1/pools', renderPools, force);
    } else if (view === 'budgets') {
      load('budgets', '/api/v1/budgets', renderBudgets, force);
      if (state.loadedKey) {
        load('budget', `/api/v1/budgets/${enc(state.loadedKey)}`, (b) => renderBudgetDetail(b, false), force);
      }
    } else if (view === 'events') {
      const kind = $('events-kind').value;
      load('events', `/api/v1/events?limit=200${kind ? `&kind=${enc(kind)}` : ''}`, renderEvents, force);
    } else if (view === 'audit') {
      load('audit', '/api/v1/audit?limit=200', renderAudit, force);
    }
  }

  // -------------------------------------------------------------------------- overview

  function windowCell(win, name) {
    const cell = el('td', {'data-window': name});
    if (!win) {
      cell.textContent = '–';
      return cell;
    }
    const spent = big(win.spent_nano_usd);
    const hasLimit = win.limit_nano_usd !== undefined && win.limit_nano_usd !== null;
    cell.dataset.spentNano = spent.toString();
    cell.dataset.limitNano = hasLimit ? big(win.limit_nano_usd).toString() : '';
    cell.append(moneyEl(spent), ' of ', hasLimit ? moneyEl(win.limit_nano_usd) : 'no limit');
    if (big(win.reserved_nano_usd) > 0n) {
      cell.append(el('div', {class: 'sub'}, '+ ', moneyEl(win.reserved_nano_usd), ' reserved'));
    }
    if (hasLimit) {
      const used = spent + big(win.reserved_nano_usd);
      const bar = el('div', {class: used >= big(win.limit_nano_usd) ? 'bar over' : 'bar'});
      const fill = el('span');
      fill.style.width = `${(ratio(used, win.limit_nano_usd) * 100).toFixed(1)}%`;
      bar.append(fill);
      cell.append(bar);
    }
    return cell;
  }

  /** A key id as people know it: the gateway key's name when it is one, and its prefix. */
  function keyName(id) {
    const s = String(id || '');
    if (!s) return '';
    for (const [gid, name] of state.keyNames) if (gid === s || (s.length >= 8 && gid.startsWith(s))) return name;
    return '';
  }

  function keyLabel(id, prefix) {
    const name = keyName(id || prefix);
    const short = prefix || shortId(id);
    return name ? [el('span', {class: 'key-name', text: name}), ' ', el('span', {class: 'mono muted', text: short})]
      : [el('span', {class: 'mono', text: short})];
  }

  function keyCell(b) {
    return el('td', {title: b.key_id || ''}, ...keyLabel(b.key_id, b.key_id_prefix));
  }

  /** Names of the gateway keys (their ids are the key ids budgets and usage show). */
  async function loadKeyNames() {
    if (Date.now() - state.keyNamesAt < 60000) return;
    state.keyNamesAt = Date.now();
    try {
      const doc = await api('GET', '/api/v1/gateway-keys');
      const names = new Map((doc.keys || []).filter((k) => k.id && k.name).map((k) => [k.id, k.name]));
      if (JSON.stringify([...names]) !== JSON.stringify([...state.keyNames])) {
        state.keyNames = names;
        state.cache.clear();  // re-render with the names on the next load
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) report(err, 'refresh');
      // Otherwise names are a nicety: ids are shown instead.
    }
  }

  function killedBadge(b) {
    return b.killed ? badge('killed', 'bad') : badge('active', 'ok');
  }

  function limitSum(budgets, windowName) {
    let total = 0n;
    let count = 0;
    for (const b of budgets) {
      const w = (b.windows || {})[windowName];
      if (w && w.limit_nano_usd !== undefined && w.limit_nano_usd !== null) {
        total += big(w.limit_nano_usd);
        count += 1;
      }
    }
    return {total, count};
  }

  function reasonsText(map) {
    const entries = Object.entries(map || {}).filter(([, v]) => big(v) > 0n)
      .sort((a, b) => (big(b[1]) > big(a[1]) ? 1 : big(b[1]) < big(a[1]) ? -1 : a[0].localeCompare(b[0])));
    return entries.map(([k, v]) => `${k} ${formatInt(v)}`).join(' · ');
  }

  function renderOverview(o) {
    const today = o.today || {};
    const month = o.month || {};
    const budgets = o.budgets || [];
    setMoney($('ov-spend-today'), today.spend_nano_usd);
    setMoney($('ov-spend-month'), month.spend_nano_usd);
    for (const [id, name] of [['ov-budget-today', 'day'], ['ov-budget-month', 'month']]) {
      const {total, count} = limitSum(budgets, name);
      $(id).textContent = count ? `limits: ${formatUsd(total)} over ${count} key${count > 1 ? 's' : ''}`
        : 'no key has a limit for this window';
    }
    const perMinute = big(o.requests_last_minute);
    const rps = $('ov-rps');
    rps.textContent = `${perMinute / 60n}.${((perMinute % 60n) * 100n / 60n).toString().padStart(2, '0')}`;
    rps.dataset.requestsLastMinute = perMinute.toString();
    $('ov-requests-today').textContent = formatInt(today.requests);
    const refusals = sumValues(today.refusals_by_reason);
    $('ov-refusals').textContent = formatInt(refusals);
    $('ov-refusals').dataset.count = refusals.toString();
    $('ov-refusal-reasons').textContent = reasonsText(today.refusals_by_reason) || 'none';
    $('ov-live').textContent = formatInt(o.live_streams);
    $('ov-live').dataset.count = big(o.live_streams).toString();
    const t = today.tokens || {};
    $('ov-tokens').textContent = formatInt(big(t.input) + big(t.output));
    $('ov-tokens-kinds').textContent = `in ${formatInt(t.input)} · out ${formatInt(t.output)} · cache r ${
      formatInt(t.cache_read)} / w ${formatInt(t.cache_write)} · reasoning ${formatInt(t.reasoning)}`;
    $('ov-updated').textContent = `as of ${fmtTime(o.now_ms || Date.now())}`;
    fillBody($('ov-budgets'), budgets.map((b) => el('tr', {'data-key-id': b.key_id || ''},
      keyCell(b), el('td', {}, killedBadge(b)),
      windowCell((b.windows || {}).day, 'day'), windowCell((b.windows || {}).month, 'month'))));
    $('ov-budgets-empty').hidden = budgets.length > 0;
  }

  // ----------------------------------------------------------------------------- usage

  function tokensOf(totals, kind) {
    const t = (totals || {}).tokens || {};
    if (kind === 'io') return big(t.input) + big(t.output);
    return big(t[kind]);
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'text') node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  /** The bucket starts to draw: the API's, with the empty buckets between them (and up to
   * now) filled in when they sit on the resolution's grid. */
  function bucketStarts(buckets, resolution) {
    const step = STEP_MS[resolution];
    const starts = buckets.map((b) => Number(big(b.start_ms))).sort((a, b) => a - b);
    if (!step || starts.some((s) => s % step !== 0)) return starts;
    const last = Math.max(Math.floor(Date.now() / step) * step, starts.length ? starts[starts.length - 1] : 0);
    const first = Math.min(starts.length ? starts[0] : last, last - 59 * step);
    const out = [];
    for (let s = Math.max(first, last - (MAX_BARS - 1) * step); s <= last; s += step) out.push(s);
    return out;
  }

  function seriesGroups(buckets, metric) {
    const totals = new Map();
    for (const b of buckets) {
      const groups = b.groups || [];
      for (const g of groups) totals.set(g.key || '(none)', (totals.get(g.key || '(none)') || 0n) + metric(g.totals));
    }
    const ordered = [...totals.entries()].sort((a, b) => (b[1] > a[1] ? 1 : b[1] < a[1] ? -1 : a[0].localeCompare(b[0])));
    const shown = ordered.slice(0, PALETTE.length - 1).map(([k]) => k);
    return {shown, hasOther: ordered.length > shown.length, totals};
  }

  function drawChart(container, buckets, starts, resolution, metric, format, groupsInfo) {
    // Drawn at the container's own width, so that text stays legible on a phone.
    const W = Math.max(300, Math.round(container.clientWidth || 900));
    const H = W < 600 ? 200 : 260;
    const m = {l: 78, r: 10, t: 10, b: 30};
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const byStart = new Map(buckets.map((b) => [Number(big(b.start_ms)), b]));
    const names = [...groupsInfo.shown, ...(groupsInfo.hasOther ? ['other'] : [])];
    const colour = (name) => PALETTE[name === 'other' ? PALETTE.length - 1 : groupsInfo.shown.indexOf(name)];
    // values[i][name] = BigInt
    const values = starts.map((s) => {
      const row = new Map();
      const b = byStart.get(s);
      if (!b) return row;
      const groups = b.groups || [];
      for (const g of groups) {
        const key = g.key || '(none)';
        const name = groupsInfo.shown.includes(key) ? key : 'other';
        row.set(name, (row.get(name) || 0n) + metric(g.totals));
      }
      return row;
    });
    let max = 0n;
    let total = 0n;
    for (const row of values) {
      let sum = 0n;
      for (const v of row.values()) sum += v;
      total += sum;
      if (sum > max) max = sum;
    }
    const top = niceCeil(max);
    const root = svg('svg', {viewBox: `0 0 ${W} ${H}`, role: 'img',
      'aria-label': `${container.id}: ${format(total)} in ${starts.length} buckets`});
    const lines = top >= 4n ? 4 : 1;
    for (let i = 0; i <= lines; i += 1) {
      const y = m.t + ph - (ph * i) / lines;
      root.append(svg('line', {class: i ? 'grid' : 'axis', x1: m.l, x2: W - m.r, y1: y, y2: y}));
      root.append(svg('text', {x: m.l - 6, y: y + 4, 'text-anchor': 'end',
        text: format((top * BigInt(i)) / BigInt(lines))}));
    }
    const slot = starts.length ? pw / starts.length : pw;
    const barW = Math.max(1, slot * 0.8);
    const labelEvery = Math.max(1, Math.ceil(starts.length / Math.max(2, Math.floor(pw / 70))));
    starts.forEach((start, i) => {
      const x = m.l + i * slot + (slot - barW) / 2;
      let y = m.t + ph;
      for (const name of names) {
        const v = values[i].get(name) || 0n;
        if (v <= 0n) continue;
        const h = ratio(v, top) * ph;
        y -= h;
        root.append(svg('rect', {x: x.toFixed(2), y: y.toFixed(2), width: barW.toFixed(2),
          height: Math.max(h, 0.5).toFixed(2), fill: colour(name), 'data-group': name,
          'data-bucket': start, 'data-value': v.toString()},
        svg('title', {text: `${name} · ${fmtTime(start)}: ${format(v)}`})));
      }
      if (i % labelEvery === 0) {
        const d = new Date(start).toISOString();
        const label = resolution === 'day' ? d.slice(5, 10) : d.slice(11, 16);
        root.append(svg('text', {x: (m.l + i * slot + slot / 2).toFixed(1), y: H - 10,
          'text-anchor': 'middle', text: label}));
      }
    });
    container.replaceChildren(root);
    container.dataset.total = total.toString();
    container.dataset.buckets = String(starts.length);
    return total;
  }

  function renderSeries(series, resolution) {
    state.seriesResolution = resolution;
    const buckets = series.buckets || [];
    const starts = bucketStarts(buckets, resolution);
    const spend = (t) => big((t || {}).spend_nano_usd);
    const kind = $('tokens-kind').value;
    const tokens = (t) => tokensOf(t, kind);
    const info = seriesGroups(buckets, spend);
    const spendTotal = drawChart($('chart-spend'), buckets, starts, resolution, spend, formatUsd, info);
    const tokenTotal = drawChart($('chart-tokens'), buckets, starts, resolution, tokens, formatInt, info);
    $('chart-spend-total').textContent = `${formatUsd(spendTotal)} over the ${starts.length} ${resolution}s shown (UTC)`;
    $('chart-spend-total').dataset.nano = spendTotal.toString();
    $('chart-tokens-total').textContent = `${formatInt(tokenTotal)} tokens`;
    const names = [...info.shown, ...(info.hasOther ? ['other'] : [])];
    $('chart-legend').replaceChildren(...names.map((name, i) => {
      const swatch = el('i');
      swatch.style.background = PALETTE[name === 'other' ? PALETTE.length - 1 : i];
      const amount = name === 'other'
        ? [...info.totals.entries()].filter(([k]) => !info.shown.includes(k)).reduce((a, [, v]) => a + v, 0n)
        : info.totals.get(name);
      return el('span', {'data-group': name, title: name}, swatch, shortId(name), ' ',
        el('span', {class: 'muted', text: formatUsd(amount)}));
    }));
    if (!names.length) $('chart-legend').textContent = 'No usage in this range yet.';
  }

  function p50(hist) {
    if (!hist) return '–';
    const counts = (hist.counts || []).map(big);
    const bounds = (hist.bounds_ms || []).map(big);
    const count = big(hist.count);
    if (count <= 0n) return '–';
    let seen = 0n;
    for (let i = 0; i < counts.length; i += 1) {
      seen += counts[i];
      if (seen * 2n >= count) return i < bounds.length ? `≤ ${formatInt(bounds[i])} ms` : `> ${formatInt(bounds[bounds.length - 1] || 0n)} ms`;
    }
    return '–';
  }

  function usageRow(name, totals, cellTag, isKey) {
    const t = totals || {};
    const k = t.tokens || {};
    const td = (text, attrs) => el(cellTag, {class: 'num', ...(attrs || {})}, text);
    const errors = sumValues(t.errors_by_status);
    return [
      el(cellTag, {title: name}, ...(isKey ? keyLabel(name) : [el('span', {class: 'mono', text: shortId(name)})])),
      el(cellTag, {class: 'num', 'data-field': 'spend'}, moneyEl(t.spend_nano_usd)),
      td(formatInt(k.input), {'data-field': 'input'}),
      td(formatInt(k.output), {'data-field': 'output'}),
      td(formatInt(k.cache_read), {'data-field': 'cache_read'}),
      td(formatInt(k.cache_write), {'data-field': 'cache_write'}),
      td(formatInt(k.reasoning), {'data-field': 'reasoning'}),
      td(formatInt(t.requests), {'data-field': 'requests'}),
      td(formatInt(errors), {'data-field': 'errors', title: compact(t.errors_by_status)}),
      el(cellTag, {'data-field': 'refusals', 'data-count': sumValues(t.refusals_by_reason).toString()},
        reasonsText(t.refusals_by_reason) || '–'),
      td(p50(t.latency_ms), {'data-field': 'latency'}),
    ];
  }

  function renderUsage(report_) {
    const by = report_.group_by || $('usage-group').value;
    $('usage-group-head').textContent = by ? by[0].toUpperCase() + by.slice(1) : 'Group';
    const table = $('usage-table');
    table.dataset.startMs = big(report_.start_ms).toString();
    table.dataset.endMs = big(report_.end_ms).toString();
    fillBody(table, (report_.groups || []).map((g) =>
      el('tr', {'data-group': g.key || ''}, ...usageRow(g.key || '(none)', g.totals, 'td', by === 'key'))));
    table.tFoot.replaceChildren(el('tr', {'data-group': '*total*'}, ...usageRow('total', report_.totals, 'td')));
  }

  async function exportUsage() {
    const format = $('export-format').value;
    const resolution = $('series-resolution').value;
    const group = $('series-group').value;
    const result = $('export-result');
    try {
      const {text, type} = await api('GET',
        `/api/v1/usage/export?format=${enc(format)}&resolution=${enc(resolution)}&group_by=${enc(group)}`,
        undefined, true);
      const name = `tokenfuse-usage-${resolution}-${group}.${format}`;
      download(name, text, type);
      setResult(result, true, `Downloaded ${name} (${formatInt(new Blob([text]).size)} bytes).`);
    } catch (err) {
      report(err, 'action', result);
    }
  }

  // ----------------------------------------------------------------------------- pools

  function renderPools(doc) {
    const pools = doc.pools || [];
    state.pools = pools;
    $('pool-names').replaceChildren(...pools.map((p) => el('option', {value: p.name || ''})));
    const providers = [...new Set(pools.map((p) => p.provider).filter(Boolean))];
    $('provider-names').replaceChildren(...providers.map((p) => el('option', {value: p})));
    $('pools-empty').hidden = pools.length > 0;
    $('pools').replaceChildren(...pools.map((pool) => {
      const keys = pool.keys || [];
      const rows = keys.map((k) => {
        const cooldown = Number(big(k.cooldown_until_ms));
        const enabled = Boolean(k.enabled);
        const s = k.state || (enabled ? 'closed' : 'disabled');
        return el('tr', {'data-pool': pool.name, 'data-key-id': k.id || '', 'data-label': k.label || '',
          'data-state': s, 'data-enabled': String(enabled)},
        el('td', {}, k.label || '–'),
        el('td', {class: 'mono', title: k.id || ''}, shortId(k.id)),
        el('td', {class: 'num'}, String(k.weight ?? 1)),
        el('td', {}, badge(s, stateTone(s))),
        el('td', {}, cooldown > Date.now() ? `${fmtTime(cooldown)}` : '–'),
        el('td', {class: 'detail'}, k.last_error || '–'),
        el('td', {class: 'num'}, formatInt(k.requests)),
        el('td', {class: 'num', title: compact(k.errors_by_status)}, formatInt(sumValues(k.errors_by_status))),
        el('td', {class: 'num'}, formatInt(k.tokens)),
        el('td', {class: 'num'}, moneyEl(k.spend_nano_usd)),
        el('td', {}, el('span', {class: 'actions'},
          opButton('Enable', {class: 'small secondary', 'data-testid': 'key-enable', disabled: enabled},
            () => poolKeyAction(pool.name, k, 'enable')),
          opButton('Disable', {class: 'small danger', 'data-testid': 'key-disable', disabled: !enabled},
            () => poolKeyAction(pool.name, k, 'disable')))));
      });
      return el('div', {class: 'card', 'data-pool': pool.name},
        el('div', {class: 'controls'},
          el('h3', {}, pool.name || '(unnamed)', ' ', el('span', {class: 'muted', text: pool.provider || ''})),
          el('span', {class: 'spacer'}),
          el('button', {type: 'button', class: 'secondary', 'data-testid': 'pool-export',
            'data-pool': pool.name, onclick: () => exportPool(pool.name), text: 'Export CSV'})),
        el('div', {class: 'table-wrap'}, el('table', {'data-testid': 'pool-table', 'data-pool': pool.name},
          el('thead', {}, el('tr', {}, ...['Label', 'Id', 'Weight', 'State', 'Cooldown until', 'Last error',
            'Requests', 'Errors', 'Tokens', 'Spend', ''].map((h, i) =>
            el('th', {class: [2, 6, 7, 8, 9].includes(i) ? 'num' : ''}, h)))),
          el('tbody', {}, ...rows))),
        keys.length ? null : el('p', {class: 'muted', text: 'No key in this pool.'}));
    }));
    if (!isOperator()) applyRole();
  }

  async function poolKeyAction(pool, key, action) {
    const result = $('pools-result');
    try {
      const updated = await api('POST', `/api/v1/pools/${enc(pool)}/keys/${enc(key.id || key.label)}/${action}`, {});
      setResult(result, true, `${key.label || key.id} in ${pool}: ${updated.state || action + 'd'}.`);
      clearError('action');
    } catch (err) {
      report(err, 'action', result);
    }
    refresh(true);
  }

  async function exportPool(pool) {
    const result = $('pools-result');
    try {
      const {text, type} = await api('GET', `/api/v1/pools/${enc(pool)}/export`, undefined, true);
      download(`${pool}.csv`, text, type);
      setResult(result, true, `Downloaded ${pool}.csv (ids, labels, weights, health; no keys).`);
    } catch (err) {
      report(err, 'action', result);
    }
  }

  async function importPool(event) {
    event.preventDefault();
    const result = $('import-result');
    const pool = $('import-pool').value.trim();
    const provider = $('import-provider').value.trim();
    const file = $('import-file').files[0];
    if (!pool || !provider || !file) {
      setResult(result, false, 'Pool, provider and a CSV file are needed.');
      return;
    }
    try {
      const csv = await file.text();
      const imported = await api('POST', `/api/v1/pools/${enc(pool)}/import`, {provider, csv});
      const n = (imported.keys || []).length;
      setResult(result, true, `Imported into ${imported.name || pool}: ${n} key${n === 1 ? '' : 's'} in the pool now.`);
      $('import-file').value = '';
      clearError('action');
    } catch (err) {
      report(err, 'action', result);
    }
    refresh(true);
  }

  // --------------------------------------------------------------------------- budgets

  function renderBudgets(doc) {
    const budgets = doc.budgets || [];
    $('known-keys').replaceChildren(...budgets.map((b) => el('option', {value: b.key_id || ''})));
    fillBody($('budgets-table'), budgets.map((b) => el('tr', {'data-key-id': b.key_id || ''},
      keyCell(b),
      el('td', {}, b.limits === 'own' ? 'own' : 'defaults'),
      el('td', {}, killedBadge(b)),
      windowCell((b.windows || {}).day, 'day'),
      windowCell((b.windows || {}).month, 'month'),
      el('td', {}, el('span', {class: 'actions'},
        el('button', {type: 'button', class: 'small secondary', 'data-testid': 'budget-edit',
          text: 'Edit', onclick: () => { $('budget-key').value = b.key_id; loadBudget(); }}),
        b.killed
          ? opButton('Lift', {class: 'small secondary', 'data-testid': 'row-lift'}, () => killOrLift(b.key_id, 'lift'))
          : opButton('Kill', {class: 'small danger', 'data-testid': 'row-kill'}, () => killOrLift(b.key_id, 'kill')))))));
    $('budgets-empty').hidden = budgets.length > 0;
    if (!isOperator()) applyRole();
  }

  function renderBudgetDetail(b, fillInputs) {
    const box = $('budget-detail');
    box.dataset.keyId = b.key_id || '';
    box.dataset.killed = String(Boolean(b.killed));
    box.dataset.limits = b.limits || '';
    const windows = b.windows || {};
    const rows = WINDOWS.filter((w) => windows[w]).map((w) => {
      const s = windows[w];
      const hasLimit = s.limit_nano_usd !== undefined && s.limit_nano_usd !== null;
      return el('tr', {'data-window': w, 'data-limit-nano': hasLimit ? big(s.limit_nano_usd).toString() : '',
        'data-spent-nano': big(s.spent_nano_usd).toString()},
      el('td', {}, w),
      el('td', {class: 'num'}, hasLimit ? moneyEl(s.limit_nano_usd) : 'none'),
      el('td', {class: 'num'}, moneyEl(s.spent_nano_usd)),
      el('td', {class: 'num'}, moneyEl(s.reserved_nano_usd)),
      el('td', {class: 'num'}, s.remaining_nano_usd !== undefined && s.remaining_nano_usd !== null
        ? moneyEl(s.remaining_nano_usd) : '–'),
      el('td', {}, s.resets_at || 'never'));
    });
    box.replaceChildren(
      el('p', {}, el('span', {class: 'mono', text: b.key_id || ''}), ' ', killedBadge(b), ' ',
        badge(b.limits === 'own' ? 'own limits' : 'default limits')),
      el('div', {class: 'table-wrap'}, el('table', {},
        el('thead', {}, el('tr', {}, ...['Window', 'Limit', 'Spent', 'Reserved', 'Remaining', 'Resets at']
          .map((h, i) => el('th', {class: i && i < 5 ? 'num' : ''}, h)))),
        el('tbody', {}, ...rows))));
    if (fillInputs) {
      for (const w of WINDOWS) {
        const input = $(`limit-${w}`);
        const s = windows[w];
        const own = b.limits === 'own' && s && s.limit_nano_usd !== undefined && s.limit_nano_usd !== null;
        input.value = own ? plainUsd(s.limit_nano_usd) : '';
        input.placeholder = s && s.limit_nano_usd !== undefined && s.limit_nano_usd !== null
          ? `default ${plainUsd(s.limit_nano_usd)}` : 'USD';
      }
    }
  }

  function editorKey() {
    const key = $('budget-key').value.trim().toLowerCase();
    if (!/^[0-9a-f]{32}$/.test(key)) throw new Error('A key id is 32 hexadecimal characters (tokenfuse budget status --json).');
    return key;
  }

  async function loadBudget() {
    const result = $('budget-result');
    try {
      const key = editorKey();
      const b = await api('GET', `/api/v1/budgets/${enc(key)}`);
      state.loadedKey = key;
      state.cache.set('budget', JSON.stringify(b));
      renderBudgetDetail(b, true);
      setResult(result, true, `Loaded ${key}.`);
    } catch (err) {
      if (err instanceof ApiError) report(err, 'action', result);
      else setResult(result, false, err.message);
    }
  }

  async function budgetCall(method, suffix, body, done) {
    const result = $('budget-result');
    let key;
    try {
      key = editorKey();
    } catch (err) {
      setResult(result, false, err.message);
      return;
    }
    try {
      const b = await api(method, `/api/v1/budgets/${enc(key)}${suffix}`, body);
      state.loadedKey = key;
      state.cache.set('budget', JSON.stringify(b));
      renderBudgetDetail(b, true);
      setResult(result, true, done(b));
      clearError('action');
    } catch (err) {
      report(err, 'action', result);
    }
    refresh(true);
  }

  function saveBudget(event) {
    event.preventDefault();
    const limits = {};
    try {
      for (const w of WINDOWS) {
        const text = $(`limit-${w}`).value.trim();
        if (text) limits[w] = parseUsd(text).toString();
      }
    } catch (err) {
      setResult($('budget-result'), false, err.message);
      return;
    }
    if (!Object.keys(limits).length) {
      setResult($('budget-result'), false, 'Type at least one limit in USD.');
      return;
    }
    budgetCall('PUT', '', {limits_nano_usd: limits}, () => `Saved: ${
      Object.entries(limits).map(([w, n]) => `${w} ${formatUsd(n)}`).join(', ')}.`);
  }

  async function killOrLift(keyId, action) {
    if (keyId) $('budget-key').value = keyId;
    budgetCall('POST', `/${action}`, {}, (b) => (b.killed ? 'Killed: every request of this key is refused, its streams end.'
      : 'Lifted: the key may spend again.'));
  }

  // ------------------------------------------------------------------- events and audit

  function renderEvents(doc) {
    const events = doc.events || [];
    const select = $('events-kind');
    for (const e of events) {
      if (e.kind && !state.kinds.has(e.kind)) {
        state.kinds.add(e.kind);
        select.append(el('option', {value: e.kind, text: e.kind}));
      }
    }
    fillBody($('events-table'), events.map((e) => {
      const kind = e.kind || '';
      const tone = /lifted|enabled/.test(kind) ? 'ok' : /pool_key|state|threshold/.test(kind) ? 'warn' : 'bad';
      return el('tr', {'data-kind': kind, 'data-event-id': e.id || ''},
        el('td', {class: 'mono'}, fmtTime(e.at_ms)),
        el('td', {}, badge(kind, tone)),
        el('td', {}, ...(e.key_id_prefix ? keyLabel('', e.key_id_prefix) : ['–'])),
        el('td', {}, e.provider || '–'),
        el('td', {}, e.model || '–'),
        el('td', {}, e.pool || '–'),
        el('td', {class: 'detail'}, compact(e.detail) || '–'));
    }));
    $('events-empty').hidden = events.length > 0;
  }

  function renderAudit(doc) {
    const entries = doc.entries || [];
    fillBody($('audit-table'), entries.map((a) => el('tr', {'data-action': a.action || '', 'data-actor': a.actor || ''},
      el('td', {class: 'mono'}, fmtTime(a.at_ms)),
      el('td', {}, a.actor || '–'),
      el('td', {}, a.role || '–'),
      el('td', {}, badge(a.action || '')),
      el('td', {class: 'mono detail'}, a.target || '–'),
      el('td', {class: 'detail'}, compact(a.before) || '–'),
      el('td', {class: 'detail'}, compact(a.after) || '–'))));
    $('audit-empty').hidden = entries.length > 0;
  }

  // ------------------------------------------------------------------------------ wiring

  function start() {
    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const token = $('token-input').value.trim();
      if (token) login(token, false);
    });
    $('logout').addEventListener('click', () => logout(''));
    $('api-error-close').addEventListener('click', () => { $('api-error').hidden = true; });
    for (const tab of document.querySelectorAll('.tab')) {
      tab.addEventListener('click', () => { location.hash = `#${tab.dataset.tab}`; });
    }
    window.addEventListener('hashchange', () => { if (state.token) route(); });
    for (const id of ['series-resolution', 'series-group', 'tokens-kind', 'usage-window', 'usage-group', 'events-kind']) {
      $(id).addEventListener('change', () => refresh(true));
    }
    $('export-usage').addEventListener('click', exportUsage);
    $('import-form').addEventListener('submit', importPool);
    $('budget-form').addEventListener('submit', saveBudget);
    $('budget-load').addEventListener('click', loadBudget);
    $('budget-clear').addEventListener('click', () => budgetCall('DELETE', '', undefined,
      () => 'Own limits cleared: the defaults apply again (spend is kept).'));
    $('kill-button').addEventListener('click', () => killOrLift(null, 'kill'));
    $('lift-button').addEventListener('click', () => killOrLift(null, 'lift'));
    let resizing = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => {
        const cached = state.cache.get('series');
        if (cached && state.view === 'usage') renderSeries(JSON.parse(cached), state.seriesResolution);
      }, 150);
    });
    document.addEventListener('visibilitychange', () => { if (!document.hidden) refresh(); });
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) login(saved, true);
    document.body.dataset.ready = 'true';
  }

  // For tests and the console: the exact money helpers.
  window.tokenfuseMoney = {formatUsd, parseUsd: (t) => parseUsd(t).toString()};

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
