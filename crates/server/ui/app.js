// HCP operator dashboard and customer portal. Plain script, no build step: it reads the REST API
// with the session cookie set by POST /ui/login and redraws the open view every two seconds.
'use strict';

// ---- errors: kept where the end-to-end test (and a curious operator) can read them -------------
const hcpErrors = [];
window.hcpErrors = hcpErrors;
window.addEventListener('error', (e) => hcpErrors.push(String(e.message || e)));
window.addEventListener('unhandledrejection', (e) => {
  const r = e.reason;
  hcpErrors.push('unhandled rejection: ' + String((r && r.message) || r));
});
document.addEventListener('securitypolicyviolation', (e) => hcpErrors.push('CSP: ' + e.violatedDirective + ' ' + e.blockedURI));
const consoleError = console.error.bind(console);
console.error = (...args) => {
  hcpErrors.push(args.map(String).join(' '));
  consoleError(...args);
};

const REFRESH_MS = 2000;
// Changes (maintenance, backtests) need the operator role; a viewer sees their buttons disabled.
const canOperate = () => !!(state.me && (state.me.role === 'operator' || state.me.role === 'admin'));
const state = { me: null, view: null, timer: null, busy: false, sites: [] };

// ---- API ---------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, opts = {}) {
  const init = { method: opts.method || 'GET', credentials: 'same-origin', headers: {} };
  if (init.method !== 'GET') init.headers['x-hcp-csrf'] = '1';
  if (opts.body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(opts.body);
  }
  const r = await fetch(path, init);
  if (r.status === 401 && !opts.quiet) {
    showLogin('Your session ended; log in again.');
    throw new ApiError(401, 'not logged in');
  }
  if (r.status === 204) return null;
  const text = await r.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = text;
  }
  if (!r.ok) {
    const msg = body && body.error ? body.error.message : 'HTTP ' + r.status;
    throw new ApiError(r.status, msg);
  }
  return body;
}

// ---- DOM helpers -------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'style') el.style.cssText = v; // CSSOM: allowed by the CSP, unlike a style attribute
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel, root) => (root || document).querySelector(sel);
function setText(sel, text, root) {
  const el = $(sel, root);
  if (el && el.textContent !== text) el.textContent = text;
}
function fmt(n, digits = 1) {
  if (n === null || n === undefined || Number.isNaN(n)) return '—';
  return Number(n).toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}
function usd(n, digits = 0) {
  if (n === null || n === undefined) return '—';
  const s = fmt(Math.abs(n), digits);
  return (n < 0 ? '−$' : '$') + s;
}
// Money from micro-USD: cents for a dollar or more, to the micro-dollar below (an invoice of a few
// thousand tokens is worth less than a cent).
function money(micro) {
  if (micro === null || micro === undefined) return '—';
  return usd(micro / 1e6, Math.abs(micro) >= 1e6 || micro === 0 ? 2 : 6);
}
function pad(n) {
  return String(n).padStart(2, '0');
}
function fmtTime(ms) {
  if (!ms && ms !== 0) return '—';
  const d = new Date(ms);
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())} UTC`;
}
function table(headers, rows, opts = {}) {
  const head = h('tr', {}, headers.map((c) => h('th', { scope: 'col', class: c.n ? 'n' : null }, c.label || c)));
  const body = rows.map((r) => {
    const tr = h('tr', { class: r.onclick ? 'click' : null, tabindex: r.onclick ? '0' : null, 'data-id': r.id });
    if (r.onclick) {
      tr.addEventListener('click', r.onclick);
      tr.addEventListener('keydown', (e) => e.key === 'Enter' && r.onclick());
    }
    r.cells.forEach((c, i) => {
      const td = h('td', { class: headers[i] && headers[i].n ? 'n' : null });
      td.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? '—' : String(c)));
      tr.append(td);
    });
    return tr;
  });
  return h('table', { 'aria-label': opts.label || null }, h('thead', {}, head), h('tbody', {}, body));
}
function kpi(id, label, value) {
  return h('div', { class: 'kpi' }, h('div', { class: 'v', id }, value), h('div', { class: 'l' }, label));
}
function status(text) {
  setText('#live-status', text);
}

// ---- charts (SVG, drawn here) ------------------------------------------------------------------
const COLORS = ['#2f7fd8', '#e39b1b', '#1e8a4c', '#7b4fc9', '#c23a3a', '#5b6676', '#0f9fa8'];
const C = { mining: '#e39b1b', inference: '#2f7fd8', curtailed: '#9aa5b1', held: '#7b4fc9', price: '#c23a3a', cap: '#14213d' };

function niceStep(span) {
  const raw = span / 5;
  const mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}
function timeLabel(ms, span) {
  const d = new Date(ms);
  if (span > 3 * 86400000) return `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
}

// series: [{name, color, points: [[x, y], ...], kind: 'line' | 'area' | 'bar'}]; area series
// stack in order. x is ms (UTC) unless opts.categories names the bars.
function chart(title, yLabel, series, opts = {}) {
  const W = 640;
  const H = opts.height || 220;
  const m = { l: 56, r: 24, t: 10, b: 34 };
  const iw = W - m.l - m.r;
  const ih = H - m.t - m.b;
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const wrap = h('figure', { class: 'chartbox', style: 'margin:0' });
  wrap.append(h('figcaption', { class: 'muted' }, title));
  if (!xs.length) {
    wrap.append(h('p', { class: 'muted' }, 'No data yet.'));
    return wrap;
  }
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs);
  const stackTop = new Map();
  let ymax = 0;
  let ymin = 0;
  const drawn = series.map((s) => {
    const pts = s.points.map(([x, y]) => {
      let base = 0;
      if (s.kind === 'area' || s.kind === 'bar') {
        base = stackTop.get(x) || 0;
        stackTop.set(x, base + y);
      }
      ymax = Math.max(ymax, base + y);
      ymin = Math.min(ymin, base + y);
      return [x, base, base + y];
    });
    return { s, pts };
  });
  if (opts.ymax !== undefined) ymax = Math.max(ymax, opts.ymax);
  if (ymax === ymin) ymax = ymin + 1;
  const step = niceStep(ymax - ymin);
  const top = Math.ceil(ymax / step) * step;
  const bottom = Math.floor(ymin / step) * step;
  const sx = (x) => m.l + (x1 === x0 ? iw / 2 : ((x - x0) / (x1 - x0)) * iw);
  const sy = (y) => m.t + ih - ((y - bottom) / (top - bottom)) * ih;
  const ns = 'http://www.w3.org/2000/svg';
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const svg = el('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title} (${yLabel})` });
  for (let y = bottom; y <= top + step / 2; y += step) {
    svg.append(el('line', { class: 'grid', x1: m.l, x2: W - m.r, y1: sy(y), y2: sy(y) }));
    svg.append(el('text', { x: m.l - 6, y: sy(y) + 4, 'text-anchor': 'end' }, fmt(y, step < 1 ? 1 : 0)));
  }
  svg.append(el('line', { class: 'axis', x1: m.l, x2: m.l, y1: m.t, y2: m.t + ih }));
  svg.append(el('line', { class: 'axis', x1: m.l, x2: W - m.r, y1: sy(0), y2: sy(0) }));
  svg.append(el('text', { x: 12, y: m.t + ih / 2, transform: `rotate(-90 12 ${m.t + ih / 2})`, 'text-anchor': 'middle' }, yLabel));
  const uniq = [...new Set(xs)].sort((a, b) => a - b);
  const ticks = Math.min(6, uniq.length);
  for (let i = 0; i < ticks; i++) {
    const x = uniq[Math.round((i * (uniq.length - 1)) / Math.max(1, ticks - 1))];
    const label = opts.categories ? opts.categories(x) : timeLabel(x, x1 - x0);
    svg.append(el('text', { x: sx(x), y: H - 18, 'text-anchor': 'middle' }, label));
  }
  svg.append(el('text', { x: m.l + iw / 2, y: H - 3, 'text-anchor': 'middle' }, opts.xLabel || 'time (UTC)'));
  const barW = Math.max(2, (iw / Math.max(1, uniq.length)) * 0.7);
  drawn.forEach(({ s, pts }, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    if (s.kind === 'bar') {
      for (const [x, b, t] of pts) {
        svg.append(el('rect', { x: sx(x) - barW / 2, y: sy(t), width: barW, height: Math.max(0, sy(b) - sy(t)), fill: color }));
      }
    } else if (s.kind === 'area') {
      const upper = pts.map(([x, , t]) => `${sx(x)},${sy(t)}`);
      const lower = pts.slice().reverse().map(([x, b]) => `${sx(x)},${sy(b)}`);
      svg.append(el('polygon', { points: upper.concat(lower).join(' '), fill: color, 'fill-opacity': '0.75' }));
    } else {
      svg.append(el('polyline', { points: pts.map(([x, , t]) => `${sx(x)},${sy(t)}`).join(' '), fill: 'none', stroke: color, 'stroke-width': 2, 'stroke-dasharray': s.dash || '' }));
    }
  });
  wrap.append(svg);
  wrap.append(h('div', { class: 'legend' }, drawn.map(({ s }, i) => h('span', {}, h('i', { style: `background:${s.color || COLORS[i % COLORS.length]}` }), s.name))));
  return wrap;
}

function replace(container, node) {
  container.replaceChildren(node);
}

// ---- login -------------------------------------------------------------------------------------
function showLogin(message) {
  stopTimer();
  state.me = null;
  $('#login').hidden = false;
  $('#main').replaceChildren();
  $('#nav').replaceChildren();
  $('#logout').hidden = true;
  setText('#whoami', '');
  setText('#login-error', message || '');
  $('#token').focus();
}

async function login(e) {
  e.preventDefault();
  const token = $('#token').value.trim();
  try {
    await api('/ui/login', { method: 'POST', body: { token }, quiet: true });
    $('#token').value = '';
    await start();
  } catch (err) {
    setText('#login-error', err.status === 401 ? 'That token was not accepted.' : err.message);
  }
}

async function logout() {
  await api('/ui/logout', { method: 'POST', quiet: true });
  location.hash = '';
  showLogin('Logged out.');
}

// ---- views -------------------------------------------------------------------------------------
const OPERATOR_VIEWS = [
  ['fleet', 'Fleet'], ['economics', 'Economics'], ['decisions', 'Decisions'], ['devices', 'Devices'],
  ['workloads', 'Workloads'], ['backtest', 'Backtest'], ['alerts', 'Alerts'],
];
const TENANT_VIEWS = [['usage', 'Usage'], ['invoices', 'Invoices'], ['keys', 'API keys'], ['jobs', 'Batch jobs']];

const views = {};

views.fleet = {
  live: true,
  render(main) {
    main.append(
      h('h1', {}, 'Fleet overview'),
      h('p', { class: 'muted' }, 'Latest interval: ', h('span', { id: 'fleet-at' }, '—')),
      h('div', { class: 'kpis', id: 'fleet-totals' },
        kpi('fleet-cap', 'cap (MW)', '—'), kpi('fleet-mining', 'mining (MW)', '—'),
        kpi('fleet-inference', 'inference (MW)', '—'), kpi('fleet-curtailed', 'curtailed (MW)', '—'),
        kpi('fleet-held', 'held for grid (MW)', '—'), kpi('fleet-hashrate', 'hashrate (PH/s)', '—'),
        kpi('fleet-margin', 'margin (USD/h)', '—')),
      h('div', { class: 'grid', id: 'fleet-sites' }),
      h('h2', {}, 'Signals ', h('span', { class: 'badge', id: 'signals-mode' }, '—')),
      h('div', { id: 'signals-table' }));
  },
  async refresh() {
    const sig = await api('/api/v1/signals');
    setText('#signals-mode', sig.mode ? `${sig.mode} mode` : 'no engine');
    const age = (s) => (s == null ? '—' : Math.abs(s) < 120 ? `${fmt(s, 0)} s` : Math.abs(s) < 7200 ? `${fmt(s / 60, 0)} min` : `${fmt(s / 3600, 1)} h`);
    const feeds = new Map(sig.feeds.map((x) => [x.feed, x]));
    const srcCell = (src) => {
      const f = feeds.get(src);
      return f && !f.ok ? `${src} (failing: ${f.reason})` : src;
    };
    const st = $('#signals-table');
    if (st) {
      replace(st, table(['signal', 'where', { label: 'value', n: true }, 'for (market time)', 'source', { label: 'age', n: true }],
        sig.signals.map((x) => ({ cells: [x.kind, x.key, fmt(x.value, 2), fmtTime(x.at_ms).replace(' UTC', ''), srcCell(x.source), age(x.age_s)] })),
        { label: 'signals now' }));
    }
    const f = await api('/api/v1/fleet');
    const t = f.totals;
    const at = Math.max(0, ...f.sites.map((s) => s.at_ms || 0));
    setText('#fleet-at', at ? fmtTime(at) : 'waiting for the first interval');
    setText('#fleet-cap', fmt(t.cap_mw, 2));
    setText('#fleet-mining', fmt(t.mining_mw, 2));
    setText('#fleet-inference', fmt(t.inference_mw, 2));
    setText('#fleet-curtailed', fmt(t.curtailed_mw, 2));
    setText('#fleet-held', fmt(t.held_for_grid_mw, 2));
    setText('#fleet-hashrate', fmt(t.hashrate_ph_s, 2));
    setText('#fleet-margin', usd(t.margin_usd_per_h, 0));
    const grid = $('#fleet-sites');
    if (!grid) return;
    for (const s of f.sites) {
      let card = grid.querySelector(`[data-site="${s.site}"]`);
      if (!card) {
        card = h('section', { class: 'card', 'data-site': s.site, 'aria-label': `site ${s.site}` },
          h('h2', {}, `Site ${s.site}`),
          h('div', { class: 'split' }),
          h('div', { class: 'kpis' },
            kpi(null, 'price (USD/MWh)', '—'), kpi(null, 'hashrate (PH/s)', '—'),
            kpi(null, 'GPUs serving', '—'), kpi(null, 'margin (USD/h)', '—')),
          h('div', { class: 'history' }));
        grid.append(card);
      }
      const v = card.querySelectorAll('.kpi .v');
      v[0].textContent = fmt(s.price_usd_per_mwh, 1);
      v[1].textContent = fmt(s.hashrate_ph_s, 2);
      v[2].textContent = fmt(s.gpus_serving, 0);
      v[3].textContent = usd(s.margin_usd_per_h, 0);
      replace(card.querySelector('.split'), splitBar(s));
    }
    // Power history per site (one request per site; the last 24 simulated hours).
    if (at) {
      await Promise.all(f.sites.map(async (s) => {
        const p = await api(`/api/v1/sites/${encodeURIComponent(s.site)}/power?from_ms=${at - 86400000}&to_ms=${at + 1}`);
        const card = grid.querySelector(`[data-site="${s.site}"] .history`);
        if (!card) return;
        const pts = (k) => p.items.map((r) => [r.at_ms, r[k] / 1e6]);
        replace(card, chart(`Power at ${s.site}, last 24 h`, 'MW', [
          { name: 'mining', color: C.mining, kind: 'area', points: pts('mining_w') },
          { name: 'inference', color: C.inference, kind: 'area', points: pts('inference_w') },
          { name: 'cap', color: '#14213d', kind: 'line', dash: '4 3', points: p.items.map((r) => [r.at_ms, s.cap_mw]) },
        ], { height: 180 }));
      }));
    }
  },
};

function splitBar(s) {
  const cap = s.cap_mw || 0;
  const parts = [
    ['mining', s.mining_mw, C.mining], ['inference', s.inference_mw, C.inference],
    ['held for grid', s.held_for_grid_mw, C.held], ['curtailed', s.curtailed_mw, C.curtailed],
  ];
  const wrap = h('div', {});
  const total = Math.max(cap, parts.reduce((a, p) => a + (p[1] || 0), 0)) || 1;
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('class', 'chart');
  svg.setAttribute('viewBox', '0 0 640 34');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `power split against the cap of ${fmt(cap, 2)} MW: ` + parts.map((p) => `${p[0]} ${fmt(p[1], 2)} MW`).join(', '));
  let x = 0;
  for (const [, mw, color] of parts) {
    const w = ((mw || 0) / total) * 640;
    const r = document.createElementNS(ns, 'rect');
    r.setAttribute('x', x);
    r.setAttribute('y', 4);
    r.setAttribute('width', Math.max(0, w));
    r.setAttribute('height', 22);
    r.setAttribute('fill', color);
    svg.append(r);
    x += w;
  }
  wrap.append(svg);
  wrap.append(h('div', { class: 'legend' },
    parts.map(([name, mw, color]) => h('span', {}, h('i', { style: `background:${color}` }), `${name} ${fmt(mw, 2)} MW`)),
    h('span', {}, `cap ${fmt(cap, 2)} MW`)));
  return wrap;
}

views.economics = {
  live: true,
  render(main) {
    main.append(
      h('h1', {}, 'Economics'),
      h('div', { class: 'kpis' }, kpi('econ-hashprice', 'hashprice (USD/PH/day)', '—')),
      h('div', { class: 'grid' },
        h('section', { class: 'card' }, h('h2', {}, 'Prices and grid commitments'), h('div', { id: 'econ-sites' })),
        h('section', { class: 'card' }, h('h2', {}, 'Breakeven price per ASIC model'), h('div', { id: 'econ-breakeven' }))),
      h('div', { class: 'grid' },
        h('section', { class: 'card' }, h('h2', {}, 'The plan ahead (24 h)'), h('div', { id: 'econ-ahead' })),
        h('section', { class: 'card' }, h('h2', {}, 'Real-time price, last 24 h'), h('div', { id: 'econ-rt' }))));
  },
  async refresh() {
    const e = await api('/api/v1/economics');
    setText('#econ-hashprice', fmt(e.hashprice_usd_per_ph_day, 2));
    replace($('#econ-sites'), table(
      ['site', { label: 'real-time (USD/MWh)', n: 1 }, { label: 'day-ahead (USD/MWh)', n: 1 }, { label: 'held for grid (MW)', n: 1 }, { label: 'limit (MW)', n: 1 }],
      e.sites.map((s) => ({ cells: [s.site, fmt(s.rt_price_usd_per_mwh, 1), fmt(s.da_price_usd_per_mwh, 1), fmt(s.commitment.held_for_grid_mw, 2), fmt(s.commitment.limit_mw, 2)] })),
      { label: 'prices by site' }));
    const rt = Math.max(...e.sites.map((s) => s.rt_price_usd_per_mwh || 0));
    replace($('#econ-breakeven'), table(
      ['model', { label: 'devices', n: 1 }, { label: 'J/TH', n: 1 }, { label: 'breakeven (USD/MWh)', n: 1 }, 'at today\u2019s price'],
      e.breakeven.map((b) => ({ cells: [b.name, b.devices, fmt(b.j_per_th, 1), fmt(b.breakeven_usd_per_mwh, 1), b.breakeven_usd_per_mwh === null ? '—' : b.breakeven_usd_per_mwh >= rt ? 'mines' : 'curtails'] })),
      { label: 'breakeven by model' }));
    const a = e.ahead;
    if (a && a.sites.length) {
      const t = (i) => a.at_ms + i * a.interval_ms;
      replace($('#econ-ahead'), h('div', {},
        chart('Day-ahead price by site', 'USD/MWh', a.sites.map((s, i) => ({ name: s.site, color: COLORS[i], kind: 'line', points: s.day_ahead_usd_per_mwh.map((p, k) => [t(k), p]) }))),
        chart('Planned ASIC draw above idle', 'MW', a.sites.map((s, i) => ({ name: s.site, color: COLORS[i], kind: 'line', points: s.planned_asic_mw.map((p, k) => [t(k), p]) })))));
    }
    const sps = [...new Set(e.sites.map((s) => s.settlement_point))];
    const now = a ? a.at_ms : Date.now();
    const rows = await Promise.all(sps.map((sp) => api(`/api/v1/signals?kind=rt_price&key=${encodeURIComponent(sp)}&from_ms=${now - 86400000}&limit=200`)));
    replace($('#econ-rt'), chart('Real-time price by settlement point', 'USD/MWh',
      rows.map((r, i) => ({ name: sps[i], color: COLORS[i], kind: 'line', points: r.items.map((x) => [x.at_ms, x.value]) }))));
  },
};

views.decisions = {
  live: true,
  render(main) {
    this.after = null;
    const sel = h('select', { id: 'decision-site', onchange: () => { this.after = null; this.refresh(); } }, h('option', { value: '' }, 'all sites'));
    for (const s of state.sites) sel.append(h('option', { value: s.id }, s.id));
    main.append(h('h1', {}, 'Decisions'),
      h('div', { class: 'row' }, h('label', { for: 'decision-site' }, 'Site', sel)),
      h('div', { id: 'decision-list' }),
      h('div', { class: 'row' }, h('button', { type: 'button', class: 'secondary', id: 'decision-older', onclick: () => this.older() }, 'Older'),
        h('button', { type: 'button', class: 'secondary', onclick: () => { this.after = null; this.refresh(); } }, 'Newest')),
      h('section', { class: 'card', id: 'decision-detail', hidden: true }));
  },
  older() {
    if (this.next) {
      this.after = this.next;
      this.refresh();
    }
  },
  async refresh() {
    const site = $('#decision-site') ? $('#decision-site').value : '';
    const q = new URLSearchParams({ limit: '25' });
    if (site) q.set('site', site);
    if (this.after) q.set('after', this.after);
    const d = await api('/api/v1/decisions?' + q);
    this.next = d.next_after;
    replace($('#decision-list'), table(['time', 'site', 'kind', 'reason', { label: 'devices changed', n: 1 }],
      d.items.map((x) => {
        let body = {};
        try { body = JSON.parse(x.body); } catch (_) { body = {}; }
        return { id: x.id, cells: [fmtTime(x.at_ms), x.site_id, x.kind, x.reason, body.devices_changed], onclick: () => this.drill(x) };
      }), { label: 'decisions' }));
  },
  async drill(x) {
    const box = $('#decision-detail');
    box.hidden = false;
    replace(box, h('p', { class: 'muted' }, 'Loading commands…'));
    const end = x.at_ms + 15 * 60000;
    const cmds = [];
    let after = null;
    for (let page = 0; page < 10; page++) {
      const q = new URLSearchParams({ limit: '1000' });
      if (after) q.set('after', after);
      const r = await api('/api/v1/commands?' + q);
      for (const c of r.items) if (c.issued_ms >= x.at_ms && c.issued_ms < end) cmds.push(c);
      if (!r.items.length || r.items[r.items.length - 1].issued_ms < x.at_ms) break;
      after = r.items[r.items.length - 1].id;
    }
    const count = (f) => cmds.filter(f).length;
    replace(box, h('div', {},
      h('h2', {}, `${x.kind} at ${x.site_id}, ${fmtTime(x.at_ms)}`),
      h('p', {}, x.reason),
      h('p', { class: 'muted' }, `${cmds.length} commands in this interval: ${count((c) => c.outcome === 'applied')} applied, ` +
        `${count((c) => c.outcome && c.outcome !== 'applied')} failed or given up, ${count((c) => !c.outcome)} awaiting an answer.`),
      table(['command', { label: 'device', n: 1 }, 'target', { label: 'attempt', n: 1 }, 'issued', 'outcome'],
        cmds.slice(0, 100).map((c) => ({ cells: [c.id, c.device_idx, c.target, c.attempt, fmtTime(c.issued_ms), c.outcome || 'pending'] })),
        { label: 'commands of the decision' })));
  },
};

views.devices = {
  live: true,
  render(main, arg) {
    if (arg) return this.renderOne(main, Number(arg));
    this.one = null;
    this.stack = [];
    this.after = null;
    const siteSel = h('select', { id: 'dev-site' }, h('option', { value: '' }, 'all'));
    for (const s of state.sites) siteSel.append(h('option', { value: s.id }, s.id));
    const statusSel = h('select', { id: 'dev-status' }, ['', 'available', 'unknown', 'quarantined'].map((s) => h('option', { value: s }, s || 'any')));
    const maintSel = h('select', { id: 'dev-maint' }, [['', 'any'], ['true', 'yes'], ['false', 'no']].map(([v, l]) => h('option', { value: v }, l)));
    const reset = () => { this.stack = []; this.after = null; this.refresh(); };
    // The fleet's model ids, offered as the model filter's choices.
    api('/api/v1/fleet').then((f) => {
      const list = $('#dev-models');
      if (list) list.replaceChildren(...f.models.map((m) => h('option', { value: m.id }, `${m.kind}, ${m.devices} devices`)));
    }).catch((err) => status(err.message));
    main.append(h('h1', {}, 'Devices'),
      h('form', { class: 'row', role: 'search', onsubmit: (e) => { e.preventDefault(); reset(); } },
        h('label', { for: 'dev-site' }, 'Site', siteSel),
        h('label', { for: 'dev-model' }, 'Model', h('input', { id: 'dev-model', list: 'dev-models', placeholder: 'any model' })),
        h('datalist', { id: 'dev-models' }),
        h('label', { for: 'dev-status' }, 'Status', statusSel),
        h('label', { for: 'dev-maint' }, 'Maintenance', maintSel),
        h('button', { type: 'submit' }, 'Search'),
        h('button', { type: 'button', class: 'secondary', onclick: () => { statusSel.value = 'quarantined'; reset(); } }, 'Quarantined')),
      h('div', { id: 'dev-list' }),
      h('div', { class: 'row' },
        h('button', { type: 'button', class: 'secondary', id: 'dev-prev', onclick: () => { this.after = this.stack.pop() || null; this.refresh(); } }, 'Previous'),
        h('button', { type: 'button', class: 'secondary', id: 'dev-next', onclick: () => { if (this.next) { this.stack.push(this.after); this.after = this.next; this.refresh(); } } }, 'Next')));
  },
  async refresh() {
    if (this.one !== null && this.one !== undefined) return this.refreshOne();
    const q = new URLSearchParams({ limit: '25' });
    for (const [k, id] of [['site', '#dev-site'], ['model', '#dev-model'], ['status', '#dev-status'], ['maintenance', '#dev-maint']]) {
      const v = $(id) ? $(id).value.trim() : '';
      if (v) q.set(k, v);
    }
    if (this.after !== null) q.set('after', this.after);
    const d = await api('/api/v1/devices?' + q);
    this.next = d.next_after;
    $('#dev-next').disabled = !this.next;
    $('#dev-prev').disabled = !this.stack.length && this.after === null;
    replace($('#dev-list'), table([{ label: 'device', n: 1 }, 'site', 'feeder', { label: 'rack', n: 1 }, 'model', 'kind', 'status', 'reason', 'maintenance', 'last telemetry'],
      d.items.map((x) => ({
        id: x.idx,
        cells: [x.idx, x.site_id, x.feeder_id, x.rack_idx, x.model, x.kind, h('span', { class: 'st-' + x.status }, x.status || '—'), x.status_reason, x.maintenance ? 'yes' : 'no', x.last_telemetry_ms ? fmtTime(x.last_telemetry_ms) : 'none yet'],
        onclick: () => { location.hash = '#/devices/' + x.idx; },
      })), { label: 'devices' }));
  },
  renderOne(main, idx) {
    this.one = idx;
    main.append(h('p', {}, h('a', { href: '#/devices' }, '← all devices')),
      h('h1', {}, `Device ${idx}`),
      h('div', { class: 'kpis' }, kpi('dev-status-v', 'status', '—'), kpi('dev-maint-v', 'maintenance', '—'), kpi('dev-last', 'last telemetry', '—')),
      h('div', { class: 'row' }, h('button', { type: 'button', id: 'maint-toggle', onclick: () => this.toggle() }, 'Maintenance')),
      h('p', { class: 'muted', id: 'dev-info' }),
      h('div', { class: 'grid', id: 'dev-charts' }));
  },
  async toggle() {
    const btn = $('#maint-toggle');
    btn.disabled = true;
    try {
      await api('/api/v1/maintenance', { method: 'POST', body: { scope: 'device', id: String(this.one), on: !this.maint } });
      await this.refreshOne();
    } catch (err) {
      status('Maintenance not changed: ' + err.message);
    } finally {
      btn.disabled = !canOperate();
    }
  },
  async refreshOne() {
    const d = await api('/api/v1/devices/' + this.one);
    if (!canOperate()) {
      $('#maint-toggle').disabled = true;
      $('#maint-toggle').title = 'needs the operator role';
    }
    this.maint = d.maintenance;
    setText('#dev-status-v', d.status || '—');
    setText('#dev-maint-v', d.maintenance ? 'on' : 'off');
    setText('#maint-toggle', d.maintenance ? 'End maintenance' : 'Start maintenance');
    setText('#dev-info', `${d.model} (${d.kind}) at ${d.site_id}, feeder ${d.feeder_id}, rack ${d.rack_idx}` + (d.status_reason ? ` — ${d.status_reason}` : ''));
    const t = await api(`/api/v1/devices/${this.one}/telemetry`);
    const rows = t.items;
    setText('#dev-last', rows.length ? fmtTime(rows[rows.length - 1].minute_ms) : 'none yet');
    const line = (name, key, color) => ({ name, color, kind: 'line', points: rows.filter((r) => r[key] !== null).map((r) => [r.minute_ms, r[key]]) });
    const charts = [chart('Power (per-minute average)', 'W', [line('power', 'power_w_avg', C.inference)]),
      chart('Temperature (per-minute maximum)', '°C', [line('temperature', 'temp_c_max', C.price)])];
    if (d.kind === 'asic') charts.push(chart('Hashrate (per-minute average)', 'TH/s', [line('hashrate', 'hashrate_ths_avg', C.mining)]));
    replace($('#dev-charts'), h('div', { style: 'display:contents' }, charts.map((c) => h('section', { class: 'card' }, c))));
  },
};

views.workloads = {
  live: true,
  render(main) {
    main.append(h('h1', {}, 'Workloads'),
      h('div', { class: 'kpis' }, kpi('wl-replicas', 'replicas in service', '—'), kpi('wl-gpus', 'GPUs in service', '—'),
        kpi('wl-queued', 'queued', '—'), kpi('wl-running', 'running', '—'), kpi('wl-preempted', 'preempted by power', '—')),
      h('h2', {}, 'By band'), h('div', { id: 'wl-bands' }),
      h('h2', {}, 'Capacity by site'), h('div', { id: 'wl-sites' }),
      h('h2', {}, 'Tenants (busiest first)'), h('div', { id: 'wl-tenants' }));
  },
  async refresh() {
    const w = await api('/api/v1/workloads');
    const r = w.router;
    setText('#wl-replicas', String(r.in_service));
    setText('#wl-gpus', String(r.gpus_in_service));
    setText('#wl-queued', String(r.queued));
    setText('#wl-running', String(r.running));
    setText('#wl-preempted', String(r.preempted));
    const band = ['critical', 'standard', 'batch'];
    replace($('#wl-bands'), table(['band', { label: 'queued', n: 1 }, { label: 'arrived', n: 1 }, { label: 'rejected', n: 1 }, { label: 'queue p50 (ms)', n: 1 }, { label: 'queue p99 (ms)', n: 1 }, { label: 'first token p50 (ms)', n: 1 }, { label: 'preempted (power)', n: 1 }, { label: 'preempted (reclaim)', n: 1 }, { label: 'fairness (Jain)', n: 1 }],
      r.bands.map((b) => ({ cells: [`${b.band} ${band[b.band] || ''}`, b.queued, b.arrived, b.rejected, fmt(b.queue_ms_p50, 0), fmt(b.queue_ms_p99, 0), fmt(b.ttft_ms_p50, 0), b.preempted_shrink, b.preempted_reclaim, b.fairness_index === null ? '—' : fmt(b.fairness_index, 3)] })),
      { label: 'bands' }));
    replace($('#wl-sites'), table(['site', { label: 'replicas', n: 1 }, { label: 'in service', n: 1 }, { label: 'slots', n: 1 }, { label: 'GPUs', n: 1 }],
      r.by_site.map((s) => ({ cells: [s.site, s.replicas, s.in_service, s.slots, s.gpus_in_service] })), { label: 'capacity by site' }));
    replace($('#wl-tenants'), tenantTable(w.tenants));
  },
};

function tenantTable(tenants) {
  return table(['tenant', { label: 'weight', n: 1 }, { label: 'GPUs held', n: 1 }, { label: 'entitled', n: 1 }, { label: 'guaranteed', n: 1 }, { label: 'borrowed', n: 1 }, 'band', { label: 'requests', n: 1 }, { label: 'preempted', n: 1 }, { label: 'tokens', n: 1 }, { label: 'mean queue (ms)', n: 1 }, { label: 'mean first token (ms)', n: 1 }],
    tenants.flatMap((t) => (t.bands.length ? t.bands : [null]).map((b, i) => ({
      cells: [i ? '' : t.tenant, i ? '' : fmt(t.weight, 1), i ? '' : fmt(t.gpus_held, 1), i ? '' : fmt(t.entitled_gpus, 1), i ? '' : fmt(t.guaranteed_gpus, 1), i ? '' : fmt(t.borrowed_gpus, 1),
        b ? b.band : '—', b ? b.dispatched : '—', b ? b.preempted : '—', b ? (b.input_tokens + b.output_tokens).toLocaleString('en-US') : '—', b ? fmt(b.queue_ms_mean, 0) : '—', b ? fmt(b.ttft_ms_mean, 0) : '—'],
    }))), { label: 'tenants' });
}

views.backtest = {
  live: false,
  render(main) {
    const form = h('form', { class: 'row', id: 'bt-form', onsubmit: (e) => { e.preventDefault(); this.run(); } },
      h('label', { for: 'bt-from' }, 'From (UTC day)', h('input', { id: 'bt-from', type: 'date', value: '2025-06-01', required: true })),
      h('label', { for: 'bt-days' }, 'Days', h('input', { id: 'bt-days', type: 'number', min: '1', max: '7', value: '1', required: true })),
      h('label', { for: 'bt-fleet' }, 'Fleet', h('select', { id: 'bt-fleet' })),
      h('fieldset', { id: 'bt-policies', style: 'border:0;padding:0;margin:0' }, h('legend', { class: 'muted' }, 'Policies')),
      h('button', { type: 'submit', id: 'bt-run', disabled: !canOperate(), title: canOperate() ? null : 'needs the operator role' }, 'Run backtest'));
    main.append(h('h1', {}, 'Backtest'),
      h('p', { class: 'muted' }, 'Runs the chosen policies over a simulated period (the grid and market simulators, seeded) on this platform.'),
      form, h('p', { id: 'bt-status', role: 'status' }), h('div', { id: 'bt-result' }));
    api('/api/v1/backtests').then((o) => {
      const sel = $('#bt-fleet');
      if (!sel) return;
      for (const f of o.fleets) sel.append(h('option', { value: f.name }, `${f.name} (${f.sites} sites, ${f.devices.toLocaleString('en-US')} devices)`));
      $('#bt-days').max = String(o.max_days);
      const fs = $('#bt-policies');
      for (const p of o.policies) {
        fs.append(h('label', { style: 'flex-direction:row;gap:4px' }, h('input', { type: 'checkbox', name: 'policy', value: p, checked: true }), p));
      }
    }).catch((err) => setText('#bt-status', err.message));
  },
  async run() {
    const btn = $('#bt-run');
    btn.disabled = true;
    setText('#bt-status', 'Running…');
    const policies = [...document.querySelectorAll('#bt-policies input:checked')].map((i) => i.value);
    try {
      const r = await api('/api/v1/backtests', { method: 'POST', body: { from: $('#bt-from').value, days: Number($('#bt-days').value), fleet: $('#bt-fleet').value || undefined, policies } });
      setText('#bt-status', `Done: ${r.fleet}, ${r.from} .. ${r.to}, in ${fmt(r.seconds, 1)} s.`);
      const pts = (k) => r.chart.points.map((p) => [p.at_ms, p[k]]);
      replace($('#bt-result'), h('div', {},
        table(['policy', { label: 'energy (MWh)', n: 1 }, { label: 'mining revenue', n: 1 }, { label: 'inference revenue', n: 1 }, { label: 'energy cost', n: 1 }, { label: 'margin', n: 1 }, { label: 'uplift captured', n: 1 }, { label: 'switches/device/day', n: 1 }],
          r.outcomes.map((o) => ({ id: o.policy, cells: [o.policy, fmt(o.energy_mwh, 1), usd(o.mining_revenue_usd), usd(o.inference_revenue_usd), usd(o.energy_cost_usd), usd(o.margin_usd), fmt(o.uplift_captured, 3), fmt(o.switches_per_device_day, 3)] })),
          { label: 'backtest results' }),
        h('div', { class: 'grid' },
          h('section', { class: 'card' }, chart(`Power split (${r.chart.policy})`, 'MW', [
            { name: 'mining', color: C.mining, kind: 'area', points: pts('mining_mw') },
            { name: 'inference', color: C.inference, kind: 'area', points: pts('inference_mw') },
            { name: 'curtailed', color: C.curtailed, kind: 'area', points: pts('curtailed_mw') }])),
          h('section', { class: 'card' }, chart('Real-time price', 'USD/MWh', [{ name: 'price', color: C.price, kind: 'line', points: pts('price_usd_per_mwh') }])))));
    } catch (err) {
      setText('#bt-status', 'Backtest failed: ' + err.message);
    } finally {
      btn.disabled = !canOperate();
    }
  },
};

views.alerts = {
  live: true,
  render(main) {
    main.append(h('h1', {}, 'Alerts'), h('div', { id: 'alert-list' }));
  },
  async refresh() {
    const a = await api('/api/v1/alerts');
    state.alerts = a; // the nav's count shows the same answer
    replace($('#alert-list'), a.items.length
      ? table(['severity', 'kind', 'site', 'message'], a.items.map((x) => ({ cells: [h('span', { class: 'badge sev-' + x.severity }, x.severity), x.kind, x.site || 'fleet', x.message] })), { label: 'alerts' })
      : h('p', {}, 'No alerts.'));
  },
};

// ---- customer portal ---------------------------------------------------------------------------
const TIERS = ['interactive', 'standard', 'batch'];

views.usage = {
  live: true,
  render(main) {
    main.append(h('h1', {}, 'Usage'),
      h('div', { class: 'kpis' }, kpi('use-requests', 'requests (30 days)', '—'), kpi('use-input', 'input tokens', '—'), kpi('use-output', 'output tokens', '—'), kpi('use-gpuh', 'GPU-hours', '—')),
      h('section', { class: 'card' }, h('div', { id: 'use-chart' })),
      h('h2', {}, 'Latency (since the platform started)'), h('div', { id: 'use-latency' }),
      h('h2', {}, 'By day, model and tier'), h('div', { id: 'use-table' }));
  },
  async refresh() {
    const d = await api('/api/v1/usage/daily');
    const sum = (k) => d.items.reduce((a, r) => a + r[k], 0);
    setText('#use-requests', sum('records').toLocaleString('en-US'));
    setText('#use-input', sum('input_tokens').toLocaleString('en-US'));
    setText('#use-output', sum('output_tokens').toLocaleString('en-US'));
    setText('#use-gpuh', fmt(sum('gpu_ms') / 3600000, 2));
    const days = [...new Set(d.items.map((r) => r.day_ms))].sort((a, b) => a - b);
    const per = (k) => days.map((day) => [day, d.items.filter((r) => r.day_ms === day).reduce((a, r) => a + r[k], 0)]);
    replace($('#use-chart'), chart('Tokens by day', 'tokens', [
      { name: 'input', color: C.inference, kind: 'bar', points: per('input_tokens') },
      { name: 'output', color: C.mining, kind: 'bar', points: per('output_tokens') }], { xLabel: 'day (UTC)', categories: (x) => fmtTime(x).slice(5, 10) }));
    replace($('#use-table'), table(['day', 'kind', 'model', 'tier', { label: 'requests', n: 1 }, { label: 'input tokens', n: 1 }, { label: 'output tokens', n: 1 }, { label: 'GPU-hours', n: 1 }],
      d.items.slice().reverse().map((r) => ({ cells: [fmtTime(r.day_ms).slice(0, 10), r.kind, r.model, TIERS[r.tier] || r.tier, r.records.toLocaleString('en-US'), r.input_tokens.toLocaleString('en-US'), r.output_tokens.toLocaleString('en-US'), fmt(r.gpu_ms / 3600000, 2)] })),
      { label: 'usage by day' }));
    const w = await api('/api/v1/workloads');
    const t = w.tenants[0];
    replace($('#use-latency'), t && t.bands.length
      ? table(['tier', { label: 'requests', n: 1 }, { label: 'completed', n: 1 }, { label: 'preempted', n: 1 }, { label: 'mean queue (ms)', n: 1 }, { label: 'mean time to first token (ms)', n: 1 }],
        t.bands.map((b) => ({ cells: [TIERS[b.band] || b.band, b.dispatched, b.completed, b.preempted, fmt(b.queue_ms_mean, 0), fmt(b.ttft_ms_mean, 0)] })), { label: 'latency by tier' })
      : h('p', { class: 'muted' }, 'No requests since the platform started.'));
  },
};

function months(n) {
  const d = new Date();
  const out = [];
  for (let i = 0; i < n; i++) {
    const m = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() - i, 1));
    out.push(`${m.getUTCFullYear()}-${pad(m.getUTCMonth() + 1)}`);
  }
  return out;
}

views.invoices = {
  live: true,
  render(main) {
    main.append(h('h1', {}, 'Invoices'), h('div', { id: 'inv-list' }), h('section', { class: 'card', id: 'inv-detail', hidden: true }));
  },
  async refresh() {
    const t = state.me.tenant;
    const list = await Promise.all(months(3).map((m) => api(`/api/v1/tenants/${encodeURIComponent(t)}/invoices/${m}`).then((inv) => [m, inv])));
    replace($('#inv-list'), table(['period', 'status', { label: 'requests', n: 1 }, { label: 'total', n: 1 }, 'download'],
      list.map(([m, inv]) => ({
        id: m,
        cells: [m, inv.status, inv.requests.toLocaleString('en-US'), money(inv.total_micro_usd),
          h('a', { href: `/api/v1/tenants/${encodeURIComponent(t)}/invoices/${m}?format=csv`, download: `invoice-${t}-${m}.csv`, class: 'download', onclick: (e) => e.stopPropagation() }, 'CSV')],
        onclick: () => this.show(m, inv),
      })), { label: 'invoices' }));
    if (this.open) {
      const again = list.find(([m]) => m === this.open);
      if (again) this.show(again[0], again[1]);
    }
  },
  show(m, inv) {
    this.open = m;
    const box = $('#inv-detail');
    box.hidden = false;
    replace(box, h('div', {}, h('h2', {}, `Invoice ${m} (${inv.status})`),
      table(['line', { label: 'quantity', n: 1 }, 'unit', { label: 'unit price', n: 1 }, { label: 'discount', n: 1 }, { label: 'amount', n: 1 }],
        inv.lines.map((l) => ({ cells: [l.description, l.quantity.toLocaleString('en-US'), l.unit.replace('1000000 ', '1M '), money(l.unit_price_micro_usd), l.discount_pct + ' %', money(l.amount_micro_usd)] })),
        { label: 'invoice lines' }),
      h('p', {}, h('strong', {}, 'Total ' + money(inv.total_micro_usd)))));
  },
};

views.keys = {
  live: true,
  render(main) {
    const bandSel = h('select', { id: 'key-band' }, [0, 1, 2].filter((b) => b >= (state.me.default_band || 0)).map((b) => h('option', { value: b }, `${b} ${TIERS[b]}`)));
    main.append(h('h1', {}, 'API keys'),
      h('form', { class: 'row', id: 'key-form', onsubmit: (e) => { e.preventDefault(); this.create(); } },
        h('label', { for: 'key-band' }, 'Default tier', bandSel),
        h('label', { for: 'key-rate' }, 'Requests per second', h('input', { id: 'key-rate', type: 'number', min: '1', step: '1', value: String(Math.min(100, state.me.rate_per_s || 100)) })),
        h('button', { type: 'submit', id: 'key-create' }, 'Create key')),
      h('div', { id: 'key-new' }),
      h('div', { id: 'key-list' }));
  },
  async create() {
    try {
      const k = await api(`/api/v1/tenants/${encodeURIComponent(state.me.tenant)}/keys`, { method: 'POST', body: { default_band: Number($('#key-band').value), rate_per_s: Number($('#key-rate').value) } });
      replace($('#key-new'), h('div', { class: 'card' }, h('p', {}, `Key ${k.id} created. Its secret is shown this once; keep it now:`), h('p', { class: 'secret', id: 'key-secret' }, k.key)));
      await this.refresh();
    } catch (err) {
      replace($('#key-new'), h('p', { class: 'error', role: 'alert' }, 'Key not created: ' + err.message));
    }
  },
  async revoke(btn, id) {
    if (btn.dataset.armed !== 'yes') {
      btn.dataset.armed = 'yes';
      btn.textContent = 'Confirm revoke';
      return;
    }
    btn.disabled = true;
    delete btn.dataset.armed;
    try {
      await api('/api/v1/keys/' + encodeURIComponent(id), { method: 'DELETE' });
      await this.refresh();
    } catch (err) {
      status('Key not revoked: ' + err.message);
      btn.disabled = false;
    }
  },
  async refresh() {
    if (document.querySelector('#key-list [data-armed="yes"]')) return; // a revoke awaits its confirmation
    const k = await api(`/api/v1/tenants/${encodeURIComponent(state.me.tenant)}/keys`);
    replace($('#key-list'), table(['key', 'default tier', { label: 'requests/s', n: 1 }, 'created', 'state', ''],
      k.items.map((x) => ({
        id: x.id,
        cells: [x.id + (x.id === state.me.key ? ' (this session)' : ''), TIERS[x.default_band] || x.default_band, fmt(x.rate_per_s, 0), new Date(x.created_ms).toISOString().slice(0, 16).replace('T', ' ') + ' UTC',
          x.revoked_ms ? 'revoked' : 'active',
          x.revoked_ms || x.id === state.me.key ? '' : h('button', { type: 'button', class: 'danger revoke', 'data-key': x.id, onclick: (e) => this.revoke(e.currentTarget, x.id) }, 'Revoke')],
      })), { label: 'API keys' }));
  },
};

views.jobs = {
  live: true,
  render(main) {
    main.append(h('h1', {}, 'Batch jobs'),
      h('form', { class: 'row', id: 'job-form', onsubmit: (e) => { e.preventDefault(); this.submit(); } },
        h('label', { for: 'job-gpus' }, 'GPUs', h('input', { id: 'job-gpus', type: 'number', min: '1', value: '1' })),
        h('label', { for: 'job-duration' }, 'Duration (s)', h('input', { id: 'job-duration', type: 'number', min: '1', value: '60' })),
        h('label', { for: 'job-priority' }, 'Tier', h('select', { id: 'job-priority' }, [2, 1, 0].map((b) => h('option', { value: b }, `${b} ${TIERS[b]}`)))),
        h('label', { for: 'job-spot', style: 'flex-direction:row;gap:4px' }, h('input', { id: 'job-spot', type: 'checkbox', checked: true }), 'preemptible (spot price)'),
        h('button', { type: 'submit' }, 'Submit job')),
      h('p', { id: 'job-status', role: 'status' }),
      h('div', { id: 'job-list' }));
  },
  async submit() {
    try {
      const j = await api('/api/v1/jobs', { method: 'POST', body: { gpus: Number($('#job-gpus').value), duration_s: Number($('#job-duration').value), priority: Number($('#job-priority').value), preemptible: $('#job-spot').checked } });
      setText('#job-status', `Job ${j.id} submitted.`);
      await this.refresh();
    } catch (err) {
      setText('#job-status', 'Job not submitted: ' + err.message);
    }
  },
  async refresh() {
    const j = await api('/api/v1/jobs');
    replace($('#job-list'), table(['job', 'state', { label: 'GPUs', n: 1 }, { label: 'duration (s)', n: 1 }, { label: 'ran (s)', n: 1 }, 'tier', 'spot', 'site', { label: 'preemptions', n: 1 }, ''],
      j.items.map((x) => ({
        id: x.id,
        cells: [x.id, x.state + (x.reason ? ` (${x.reason})` : ''), x.gpus, x.duration_s, fmt((x.ran_ms || 0) / 1000, 0), TIERS[x.priority] || x.priority, x.preemptible ? 'yes' : 'no', x.site, x.preemptions,
          x.state === 'queued' || x.state === 'running' ? h('button', { type: 'button', class: 'danger', onclick: async () => {
            try { await api('/api/v1/jobs/' + encodeURIComponent(x.id), { method: 'DELETE' }); await this.refresh(); } catch (err) { setText('#job-status', 'Not cancelled: ' + err.message); }
          } }, 'Cancel') : ''],
      })), { label: 'batch jobs' }));
  },
};

// ---- navigation and the refresh loop -----------------------------------------------------------
function stopTimer() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

async function tick() {
  if (state.busy || !state.view || !state.me) return;
  state.busy = true;
  const v = state.view;
  try {
    if (v.refresh) await v.refresh();
    if (state.me.account) {
      const a = v === views.alerts && state.alerts ? state.alerts : await api('/api/v1/alerts');
      const link = document.querySelector('nav a[data-view="alerts"]');
      if (link) link.textContent = a.items.length ? `Alerts (${a.items.length})` : 'Alerts';
    }
    status('Updated ' + new Date().toLocaleTimeString('en-GB'));
  } catch (err) {
    if (err.status !== 401) status('Update failed: ' + err.message);
  } finally {
    state.busy = false;
  }
}

function route() {
  if (!state.me) return;
  const list = state.me.account ? OPERATOR_VIEWS : TENANT_VIEWS;
  const [, name, arg] = (location.hash || '').replace(/^#\/?/, '/').split('/');
  const key = list.some(([k]) => k === name) ? name : list[0][0];
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.view === key) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  stopTimer();
  const main = $('#main');
  main.replaceChildren();
  const view = views[key];
  state.view = view;
  view.render(main, arg);
  document.title = `HCP — ${list.find(([k]) => k === key)[1]}`;
  state.busy = false;
  tick();
  if (view.live) state.timer = setInterval(tick, REFRESH_MS);
}

async function start() {
  let me;
  try {
    me = await api('/ui/session', { quiet: true });
  } catch (err) {
    showLogin('The platform did not answer: ' + err.message);
    return;
  }
  if (!me.logged_in) {
    showLogin('');
    return;
  }
  state.me = me;
  $('#login').hidden = true;
  $('#logout').hidden = false;
  setText('#whoami', me.account ? `${me.account} (${me.role})` : `tenant ${me.tenant}`);
  if (me.account) {
    try {
      state.sites = (await api('/api/v1/sites')).items;
    } catch (_) {
      state.sites = [];
    }
  }
  const list = me.account ? OPERATOR_VIEWS : TENANT_VIEWS;
  $('#nav').replaceChildren(...list.map(([k, label]) => h('a', { href: '#/' + k, 'data-view': k }, label)));
  route();
}

document.addEventListener('DOMContentLoaded', () => {
  $('#login-form').addEventListener('submit', login);
  $('#logout').addEventListener('click', () => logout().catch((err) => status(err.message)));
  window.addEventListener('hashchange', route);
  start();
});
