// Apex console: log in with a pasted token; a user starts runs and watches their steps arrive
// over the chat WebSocket; an admin watches agents, running instances and projector lag.
// Plain browser JavaScript, no dependencies; the page's CSP allows this origin only.
'use strict';

(() => {
  const TOKEN_KEY = 'apex.console.token';
  const ADMIN_REFRESH_MS = 2000;
  const TERMINAL = { agent_completed: 'completed', agent_failed: 'failed', agent_cancelled: 'cancelled' };

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null,
    claims: null,
    socket: null,
    socketRetry: 0,
    socketTimer: null,
    stopped: true,
    runs: new Map(), // instance id → { el, list, status, last }
    adminTimer: null,
    adminBusy: false,
    adminRefreshes: 0,
    errorSource: null,
  };

  /** Builds an element: h('td', { class: 'num' }, 'text', child). Text is never parsed as HTML. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) el.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // ---- token ------------------------------------------------------------------------------

  /** The claims of a JWT; the signature is the server's business, not the page's. */
  function decodeClaims(token) {
    const parts = token.split('.');
    if (parts.length !== 3) throw new Error('this is not a JWT (expected three dot-separated parts)');
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    let claims;
    try {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      claims = JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      throw new Error('the token payload is not base64url-encoded JSON');
    }
    if (typeof claims.sub !== 'string' || typeof claims.role !== 'string') {
      throw new Error('the token has no sub or role claim');
    }
    if (typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now()) {
      throw new Error(`the token expired at ${new Date(claims.exp * 1000).toLocaleString()}`);
    }
    return claims;
  }

  // ---- errors -----------------------------------------------------------------------------

  function showError(text, source) {
    state.errorSource = source;
    $('error-text').textContent = text;
    $('error').hidden = false;
  }

  /** Hides the error if it came from `source` (or whatever it came from, without one). */
  function clearError(source) {
    if (source && state.errorSource !== source) return;
    state.errorSource = null;
    $('error').hidden = true;
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function describe(e) {
    return e instanceof ApiError ? `${e.code} (HTTP ${e.status}): ${e.message}` : String(e.message || e);
  }

  // ---- API --------------------------------------------------------------------------------

  /** Calls the API; a non-2xx answer throws its `{"error":{"code","message"}}` as an ApiError. */
  async function api(method, path, body) {
    const init = { method, headers: { Authorization: `Bearer ${state.token}` } };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, 'network_error', `cannot reach the API: ${e.message}`);
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = null;
    }
    if (!response.ok) {
      const error = json && json.error;
      throw new ApiError(
        response.status,
        (error && error.code) || `http_${response.status}`,
        (error && error.message) || text || response.statusText,
      );
    }
    return json;
  }

  // ---- formatting -------------------------------------------------------------------------

  const time = (at) => (at ? new Date(at).toLocaleTimeString() : '–');
  const num = (n) => (n === null || n === undefined ? '–' : String(n));
  const duration = (ms) => (ms === null || ms === undefined ? '–' : ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`);

  /** What the chat shows for one step. */
  function stepText(type, data) {
    const d = data || {};
    switch (type) {
      case 'agent_started': return d.message || 'Started';
      case 'agent_thinking': return d.thought;
      case 'tool_executing': return `${d.tool} · ${d.summary || 'running'} (call ${d.call_id})`;
      case 'tool_completed': return `${d.tool} · ${d.summary || 'done'}${d.is_error ? ' · tool error' : ''}`;
      case 'agent_completed': return d.output;
      case 'agent_failed': return d.error;
      case 'agent_cancelled': return `${d.reason || 'Cancelled'} (by ${d.by_role || 'unknown'})`;
      default: return JSON.stringify(d);
    }
  }

  // ---- user view: agents, start a run, live runs -----------------------------------------

  async function loadAgents() {
    const { items } = await api('GET', '/v1/agents');
    const list = $('agents');
    const select = $('run-agent');
    list.replaceChildren();
    select.replaceChildren();
    for (const agent of items) {
      list.append(h('li', { 'data-agent': agent.id },
        h('b', null, agent.display_name), ' ', h('code', null, agent.id), ' ', h('span', { class: 'hint' }, `v${agent.version}`),
        agent.description ? h('div', null, agent.description) : null,
        h('div', { class: 'tools' }, `tools: ${agent.tools.join(', ') || 'none'}`)));
      select.append(h('option', { value: agent.id }, `${agent.display_name} (${agent.id})`));
    }
    $('agents-empty').hidden = items.length > 0;
    $('run-start').disabled = items.length === 0;
  }

  /** The card of a run, created on first sight (from the POST answer or a live step). */
  function runCard(id) {
    let run = state.runs.get(id);
    if (run) return run;
    const status = h('span', { class: 'status', 'data-status': 'pending' }, 'pending');
    const agent = h('b', null, 'run');
    const input = h('div', { class: 'input' });
    const list = h('ol', { class: 'events' });
    const el = h('article', { class: 'run', 'data-instance-id': id },
      h('div', { class: 'run-head' }, agent, h('code', null, id), status, input), list);
    run = { el, list, status, agent, input, last: 1 };
    state.runs.set(id, run);
    $('runs').prepend(el);
    $('runs-empty').hidden = true;
    return run;
  }

  function setRunStatus(run, status) {
    run.status.dataset.status = status;
    run.status.textContent = status;
  }

  /** Appends a step to its run, once, in sequence order (the server sends them in order). */
  function addStep(message) {
    const run = runCard(message.instance_id);
    if (message.sequence <= run.last) return;
    run.last = message.sequence;
    run.list.append(h('li', { 'data-type': message.type, 'data-sequence': message.sequence },
      h('span', { class: 'seq' }, `#${message.sequence}`),
      h('span', { class: 'kind' }, message.type),
      h('span', { class: 'at' }, time(message.at)),
      h('span', { class: 'text' }, stepText(message.type, message.data))));
    setRunStatus(run, TERMINAL[message.type] || 'running');
  }

  async function startRun(event) {
    event.preventDefault();
    const button = $('run-start');
    const agentId = $('run-agent').value;
    const input = $('run-input').value.trim();
    button.disabled = true;
    try {
      const answer = await api('POST', '/v1/instances', { agent_id: agentId, input });
      clearError();
      const run = runCard(answer.instance_id);
      run.agent.textContent = agentId;
      run.input.textContent = input;
      connectSocket();
    } catch (e) {
      showError(`Starting a run failed — ${describe(e)}`, 'action');
    } finally {
      button.disabled = false;
    }
  }

  // ---- chat WebSocket ---------------------------------------------------------------------

  function setSocketState(socketState, label) {
    const pill = $('ws-status');
    pill.hidden = false;
    pill.dataset.state = socketState;
    pill.textContent = label;
  }

  /** Opens the chat socket, resuming every known run after its last step seen. */
  function connectSocket() {
    if (state.stopped || state.socket) return;
    clearTimeout(state.socketTimer);
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const resume = [...state.runs].map(([id, run]) => `${id}:${run.last}`).join(',');
    let url = `${scheme}//${location.host}/v1/ws`;
    if (resume) url += `?resume=${encodeURIComponent(resume)}`;
    setSocketState('connecting', 'socket connecting');
    // The token goes as a subprotocol, not in the URL, which proxies write to their logs.
    const socket = new WebSocket(url, ['apex.chat.v1', `apex.bearer.${state.token}`]);
    state.socket = socket;
    socket.onopen = () => {
      state.socketRetry = 0;
      setSocketState('open', 'live');
      clearError('socket');
    };
    socket.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === 'error') {
        showError(`Chat socket — ${message.code}: ${message.message}`, 'socket-message');
      } else if (message.instance_id && typeof message.sequence === 'number') {
        addStep(message);
      }
      // `resync_required` is followed by a close; the reconnect below resumes.
    };
    socket.onclose = (event) => {
      if (state.socket !== socket) return;
      state.socket = null;
      if (state.stopped) return;
      const delay = Math.min(10000, 500 * 2 ** state.socketRetry++);
      setSocketState('closed', `socket closed (${event.code}), retrying`);
      if (state.socketRetry > 2) {
        showError(`The chat socket keeps closing (code ${event.code}); retrying in ${delay / 1000} s`, 'socket');
      }
      state.socketTimer = setTimeout(connectSocket, delay);
    };
  }

  // ---- admin view -------------------------------------------------------------------------

  function fill(tbody, rows, columns, empty) {
    tbody.replaceChildren(...(rows.length ? rows : [h('tr', null, h('td', { class: 'empty', colspan: columns }, empty))]));
  }

  function renderAgents(items) {
    fill($('admin-agents').tBodies[0], items.map((a) => {
      const s = a.stats;
      const by = s.runs_by_status;
      return h('tr', { 'data-agent': a.id },
        h('td', null, h('b', null, a.display_name), ' ', h('code', null, a.id)),
        h('td', null, a.status), h('td', { class: 'num' }, a.version), h('td', null, a.tiers.join(', ')),
        h('td', { class: 'num', 'data-col': 'runs' }, s.runs_total), h('td', { class: 'num' }, by.running),
        h('td', { class: 'num' }, by.completed), h('td', { class: 'num' }, by.failed),
        h('td', { class: 'num' }, by.cancelled), h('td', { class: 'num' }, s.tool_calls),
        h('td', { class: 'num' }, duration(s.average_duration_ms)));
    }), 11, 'No agents defined.');
  }

  function renderRunning(items) {
    fill($('admin-running').tBodies[0], items.map((r) => h('tr', { 'data-instance-id': r.instance_id },
      h('td', null, h('code', null, r.instance_id)), h('td', null, r.agent_id), h('td', null, r.owner_id),
      h('td', null, time(r.started_at)), h('td', { class: 'num' }, r.thought_count),
      h('td', { class: 'num' }, r.tool_call_count), h('td', { class: 'num' }, r.open_tool_calls),
      h('td', null, r.last_message || ''))), 8, 'No run is running.');
  }

  function renderProjections(status) {
    $('head-position').textContent = status.head_position;
    const projectors = status.projectors.map((p) => {
      // Not marked on lag: a projector that skips other aggregates' events trails the head
      // by those until its next own event (see `lag_events` of /v1/admin/projections).
      return h('tr', { 'data-projector': p.name, class: p.dead_letters > 0 ? 'dead' : null },
        h('td', null, p.name), h('td', { class: 'num' }, p.last_position),
        h('td', { class: 'num' }, p.lag_events),
        h('td', { class: 'num' }, p.lag_seconds === null ? '–' : p.lag_seconds.toFixed(1)),
        h('td', { class: 'num' }, p.processed_total), h('td', { class: 'num' }, p.retried_total),
        h('td', { class: 'num' }, p.dead_letters), h('td', null, time(p.last_applied_at)));
    });
    const relays = status.relays.map((r) => h('tr', { 'data-relay': r.name, class: r.lag_events > 0 ? 'lagging' : null },
      h('td', null, `relay ${r.name}`), h('td', { class: 'num' }, r.position), h('td', { class: 'num' }, r.lag_events),
      h('td', { class: 'num' }, '–'), h('td', { class: 'num' }, r.published_total), h('td', { class: 'num' }, '–'),
      h('td', { class: 'num' }, '–'), h('td', null, time(r.updated_at))));
    fill($('admin-projectors').tBodies[0], [...relays, ...projectors], 8, 'No projector has started yet.');
  }

  async function refreshAdmin() {
    if (state.adminBusy || state.stopped) return;
    state.adminBusy = true;
    try {
      const [agents, running, projections] = await Promise.all([
        api('GET', '/v1/admin/agents'),
        api('GET', '/v1/admin/instances?status=running&limit=50'),
        api('GET', '/v1/admin/projections'),
      ]);
      if (state.stopped) return;
      renderAgents(agents.items);
      renderRunning(running.items);
      renderProjections(projections);
      state.adminRefreshes += 1;
      const updated = $('admin-updated');
      updated.textContent = new Date().toLocaleTimeString();
      updated.dataset.refreshes = String(state.adminRefreshes);
      clearError('refresh');
    } catch (e) {
      showError(`Refreshing the admin view failed — ${describe(e)}`, 'refresh');
    } finally {
      state.adminBusy = false;
    }
  }

  // ---- session ----------------------------------------------------------------------------

  async function logIn(token) {
    let claims;
    try {
      claims = decodeClaims(token);
    } catch (e) {
      showError(`Cannot use this token — ${e.message}`, 'login');
      return;
    }
    clearError();
    state.token = token;
    state.claims = claims;
    state.stopped = false;
    sessionStorage.setItem(TOKEN_KEY, token);
    const tier = claims.tier ? ` · tier ${claims.tier}` : '';
    const expires = typeof claims.exp === 'number' ? ` · expires ${new Date(claims.exp * 1000).toLocaleTimeString()}` : '';
    $('who-text').textContent = `${claims.sub} · ${claims.role}${tier}${expires}`;
    $('who').hidden = false;
    $('login').hidden = true;
    if (claims.role === 'user') {
      $('user-view').hidden = false;
      connectSocket();
      try {
        await loadAgents();
      } catch (e) {
        showError(`Loading the agents failed — ${describe(e)}`, 'action');
      }
    } else if (claims.role === 'admin') {
      $('admin-view').hidden = false;
      await refreshAdmin();
      state.adminTimer = setInterval(refreshAdmin, ADMIN_REFRESH_MS);
    } else {
      $('other-role').textContent = claims.role;
      $('other-view').hidden = false;
    }
  }

  function logOut() {
    state.stopped = true;
    sessionStorage.removeItem(TOKEN_KEY);
    if (state.socket) state.socket.close(1000, 'logged out');
    clearTimeout(state.socketTimer);
    clearInterval(state.adminTimer);
    location.reload();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      logIn($('token').value.trim());
    });
    $('run-form').addEventListener('submit', startRun);
    $('logout').addEventListener('click', logOut);
    $('error-close').addEventListener('click', () => clearError());
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) logIn(saved);
  });
})();
