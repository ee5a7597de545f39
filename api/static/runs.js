// The run panel of the plan page (GET /plans/{id}): a live table of the plan's runs and, for the
// selected run, a loss chart, a step-time chart against the prediction, the error and log tail.
//
// This script is the only renderer of the runs table. Data: the plan's runs as
// GET /v1/plans/{plan_id}/runs answers them (newest first), shipped in the page
// (<script id="runs-data">, so the table is drawn without waiting for a request), then
// ?status=queued&status=running every second while any run is queued or running (each run that
// finishes fetched once), never otherwise. Charts: api/static/line_chart.js (loaded first).
// Every piece of run data goes into the DOM through textContent or setAttribute, never as markup.
// No libraries, no network access beyond this server: the page works offline.
(function () {
  'use strict';
  var panel = document.getElementById('run-panel');
  if (!panel) return;
  var planId = panel.dataset.planId;
  var tbody = document.querySelector('#runs tbody');
  var detail = document.getElementById('run-detail');
  var statusLine = document.getElementById('run-status');
  var form = document.getElementById('run-form');
  var ACTIVE = {queued: true, running: true};
  var POLL_MS = 1000, RETRY_MS = 3000;
  var chart = window.FoldplanChart;  // api/static/line_chart.js
  var el = chart.el, fact = chart.fact, fmtInt = chart.fmtInt, fmtPct = chart.fmtPct;
  var lineChart = chart.lineChart, series = chart.series, num = chart.num, list = chart.list,
      fmtSeconds = chart.fmtSeconds;

  var state = {
    runs: [],          // last list from the server (plus runs started here it has not listed yet)
    selected: null,    // id of the run the reader picked
    pinned: false,     // true once the reader picked one: keep it instead of following the newest
    started: {},       // id -> run answer of runs this page started, until the list has them
    timer: null,
    failures: 0,
    statusFromPoll: false,
  };

  // ---- small helpers -------------------------------------------------------------------------

  function obj(v) { return v && typeof v === 'object' && !Array.isArray(v) ? v : {}; }

  function fmtRatio(m, p) { return m !== null && p ? (m / p).toFixed(2) + '×' : '—'; }

  function stepsDone(metrics) {
    var steps = list(metrics.steps);
    if (steps.length && num(steps[steps.length - 1]) !== null) return steps[steps.length - 1];
    return list(metrics.loss).length;
  }

  function authHeaders(extra) {
    var h = extra || {};
    var t = document.getElementById('r-token');
    if (t && t.value) h['Authorization'] = 'Bearer ' + t.value;
    return h;
  }

  function say(text, fromPoll) {
    statusLine.textContent = text;
    state.statusFromPoll = !!fromPoll;
  }

  async function errorText(r) {
    try {
      var d = await r.json();
      var m = d.message || d.detail;
      return 'HTTP ' + r.status + ': ' + (typeof m === 'string' ? m : JSON.stringify(m));
    } catch (e) {
      return 'HTTP ' + r.status;
    }
  }

  // The run in the detail panel: the one the reader picked, else the newest.
  function selectedRun() {
    var runs = state.runs;
    if (state.pinned) {
      for (var i = 0; i < runs.length; i++) if (runs[i].id === state.selected) return runs[i];
    }
    return runs[0] || null;
  }

  // ---- the table -----------------------------------------------------------------------------

  function runRow(run) {
    var m = obj(run.metrics), p = obj(run.predicted);
    var measured = num(m.step_time_s), pred = num(p.step_time_s);
    var tr = el('tr', {'data-run-id': run.id, tabindex: '0'});
    var idCell = el('td');
    idCell.appendChild(el('a', {href: '/runs/' + encodeURIComponent(run.id)},
                          String(run.id).slice(0, 8)));
    tr.appendChild(idCell);
    tr.appendChild(el('td', null, num(run.candidate) !== null ? '#' + run.candidate : '—'));
    tr.appendChild(el('td', null, run.backend));
    var st = el('td');
    st.appendChild(el('span', {'class': 'badge ' + run.status}, run.status));
    tr.appendChild(st);
    tr.appendChild(el('td', {'class': 'progress'}, stepsDone(m) + ' / ' + run.steps + ' steps'));
    tr.appendChild(el('td', null, fmtSeconds(measured)));
    tr.appendChild(el('td', null, fmtSeconds(pred)));
    tr.appendChild(el('td', null, fmtRatio(measured, pred)));
    tr.appendChild(el('td', null, fmtInt(num(m.tokens_per_s))));
    tr.appendChild(el('td', null, fmtPct(num(m.mfu))));
    var act = el('td');
    if (ACTIVE[run.status]) {
      act.appendChild(el('button', {type: 'button', 'class': 'secondary cancel',
                                    'data-run-id': run.id}, 'Cancel'));
    }
    tr.appendChild(act);
    return tr;
  }

  function renderTable() {
    var runs = state.runs;
    var shown = selectedRun();
    var rows = runs.map(function (run) {
      var tr = runRow(run);
      if (shown && run.id === shown.id) tr.classList.add('selected');
      return tr;
    });
    if (!rows.length) {
      var empty = el('tr', {'class': 'empty'});
      empty.appendChild(el('td', {colspan: '11'}, 'No runs yet.'));
      rows.push(empty);
    }
    // Rows are rebuilt on every poll: keep keyboard focus on the same row or Cancel button.
    var focused = tbody.contains(document.activeElement) ? document.activeElement : null;
    var focusRow = focused && focused.closest('tr[data-run-id]');
    var focusId = focusRow ? focusRow.dataset.runId : null;
    var focusButton = focused && focused.tagName === 'BUTTON';
    tbody.replaceChildren.apply(tbody, rows);
    if (focusId !== null) {
      var again = rows.find(function (tr) { return tr.dataset.runId === focusId; });
      var target = again && (focusButton ? again.querySelector('button') : again);
      if (target) target.focus({preventScroll: true});
    }
  }


  function lossChart(run) {
    var m = obj(run.metrics);
    var s = series(m.steps, m.loss);
    return lineChart({id: 'loss-chart', label: 'Loss per step', xs: s.xs, ys: s.ys,
                      yTitle: 'loss', yUnit: '',
                      empty: ACTIVE[run.status] ? 'No steps measured yet.'
                                                : 'No losses recorded.'});
  }

  function stepTimeChart(run) {
    var m = obj(run.metrics), p = obj(run.predicted);
    var s = series(m.steps, m.step_times_s);
    var pred = num(p.step_time_s), median = num(m.step_time_s);
    var hlines = [];
    if (pred !== null) hlines.push({y: pred, cls: 'pred', label: 'predicted ' + fmtSeconds(pred)});
    if (!s.ys.length && median !== null) {
      hlines.push({y: median, cls: 'median', label: 'measured median ' + fmtSeconds(median)});
    }
    // The first steps carry warm-up; clip them rather than squash every other step.
    var rest = s.ys.length >= 3 ? s.ys.slice(1) : s.ys;
    var top = Math.max.apply(null, rest.concat(hlines.map(function (h) { return h.y; }), [0]));
    return lineChart({id: 'step-time-chart', label: 'Measured step time per step',
                      xs: s.xs, ys: s.ys, hlines: hlines, yTitle: 'step time', yUnit: 's',
                      yFromZero: true, yMax: top > 0 ? top * 1.12 : undefined,
                      xEnd: stepsDone(m) || run.steps,
                      empty: ACTIVE[run.status] ? 'No steps measured yet.'
                                                : 'No step times recorded.'});
  }

  // ---- the detail panel ----------------------------------------------------------------------

  function when(iso) {
    var t = iso ? new Date(iso) : null;
    return t && !isNaN(t) ? t.toLocaleString() : null;
  }

  // The backend's job handle: its pid or scheduler job id when it has one, else every field.
  function jobText(job) {
    if (!job || typeof job !== 'object') return null;
    var keys = Object.keys(job);
    var main = keys.filter(function (k) { return k === 'pid' || k === 'job_id'; });
    var parts = (main.length ? main : keys).map(function (k) {
      var v = job[k];
      var label = k === 'job_id' ? 'job' : k;
      return label + ' ' + (v !== null && typeof v === 'object' ? JSON.stringify(v) : String(v));
    });
    return parts.length ? parts.join(', ') : null;
  }

  function renderDetail() {
    var run = selectedRun();
    if (!run) { detail.hidden = true; detail.replaceChildren(); return; }
    var m = obj(run.metrics), p = obj(run.predicted);
    var measured = num(m.step_time_s), pred = num(p.step_time_s);
    var parts = [];

    var head = el('h3', {id: 'run-detail-title'});
    head.appendChild(document.createTextNode('Run ' + String(run.id).slice(0, 8) +
      ' · candidate ' + (num(run.candidate) !== null ? '#' + run.candidate : '—') +
      ' · ' + run.backend + ' '));
    head.appendChild(el('span', {'class': 'badge ' + run.status}, run.status));
    parts.push(head);

    var facts = el('div', {'class': 'facts', id: 'run-facts'});
    var soFar = m.partial ? '(so far)' : null;
    facts.appendChild(fact('Progress', stepsDone(m) + ' / ' + run.steps + ' steps'));
    facts.appendChild(fact('Measured step time', fmtSeconds(measured),
                           measured !== null ? (soFar || '(median)') : null));
    facts.appendChild(fact('Predicted step time', fmtSeconds(pred)));
    facts.appendChild(fact('Measured / predicted', fmtRatio(measured, pred)));
    facts.appendChild(fact('Tokens/s', fmtInt(num(m.tokens_per_s)),
                           num(p.tokens_per_s) !== null ? 'predicted ' + fmtInt(p.tokens_per_s)
                                                         : null));
    facts.appendChild(fact('MFU', fmtPct(num(m.mfu)),
                           num(p.mfu) !== null ? 'predicted ' + fmtPct(p.mfu) : null));
    var loss = series(m.steps, m.loss).ys;
    if (loss.length) {
      facts.appendChild(fact('Loss', loss[loss.length - 1].toFixed(3),
                             loss.length > 1 ? 'from ' + loss[0].toFixed(3) : null));
    }
    // Busiest expert's tokens over the mean (latest step): compare with the plan's assumption
    // training.moe_expert_load_imbalance and re-plan with the measured value.
    var load = series(m.steps, m.expert_load_imbalance).ys;
    if (load.length) {
      facts.appendChild(fact('Expert load', load[load.length - 1].toFixed(2) + '×',
                             'busiest / mean'));
    }
    var job = jobText(run.job);
    if (job) facts.appendChild(fact('Job', job));
    parts.push(facts);

    var times = [['queued', when(run.created_at)], ['started', when(run.started_at)],
                 ['finished', when(run.finished_at)]].filter(function (t) { return t[1]; });
    var timeLine = times.map(function (t) { return t[0] + ' ' + t[1]; }).join(' · ');
    var t0 = Date.parse(run.started_at), t1 = Date.parse(run.finished_at);
    if (isFinite(t0) && isFinite(t1)) timeLine += ' · took ' + fmtSeconds((t1 - t0) / 1000);
    if (typeof p.machine === 'string' && p.machine) {
      timeLine += (timeLine ? ' · ' : '') + 'prediction for ' + p.machine;
    }
    if (timeLine) parts.push(el('p', {'class': 'small muted', id: 'run-times'}, timeLine));

    var charts = el('div', {'class': 'run-charts'});
    var f1 = el('figure');
    f1.appendChild(el('figcaption', null, 'Loss'));
    f1.appendChild(lossChart(run));
    var f2 = el('figure');
    var cap = el('figcaption', null, 'Step time ');
    var legend = el('span', {'class': 'legend inline'});
    [['key-measured', 'measured'], ['key-pred', 'predicted']].forEach(function (k) {
      var item = el('span');
      item.appendChild(el('i', {'class': k[0]}));
      item.appendChild(document.createTextNode(k[1]));
      legend.appendChild(item);
    });
    cap.appendChild(legend);
    f2.appendChild(cap);
    f2.appendChild(stepTimeChart(run));
    charts.appendChild(f1);
    charts.appendChild(f2);
    parts.push(charts);

    if (run.error) {
      parts.push(el('h4', null, 'Error'));
      parts.push(el('pre', {id: 'run-error', 'class': 'args run-error'}, run.error));
    }
    var logScroll = null;  // where the new log box scrolls to: the end, unless read elsewhere
    if (run.log_tail) {
      var det = el('details', {id: 'run-log-box'});
      if (run.status === 'failed') det.open = true;
      det.appendChild(el('summary', null, 'Log tail'));
      det.appendChild(el('pre', {id: 'run-log', 'class': 'args'}, run.log_tail));
      // Keep the reader's choices (open or closed, scrolled up) across re-renders.
      var old = document.getElementById('run-log-box');
      var oldPre = document.getElementById('run-log');
      if (old && old.dataset.runId === run.id) {
        det.open = old.open;
        if (oldPre && oldPre.scrollTop + oldPre.clientHeight < oldPre.scrollHeight - 4) {
          logScroll = oldPre.scrollTop;
        }
      }
      det.dataset.runId = run.id;
      parts.push(det);
    }
    detail.replaceChildren.apply(detail, parts);
    detail.dataset.runId = run.id;
    detail.hidden = false;
    var pre = document.getElementById('run-log');
    if (pre) pre.scrollTop = logScroll !== null ? logScroll : pre.scrollHeight;
  }

  function render() {
    renderTable();
    renderDetail();
    // overlay.js draws the runs on top of each other from the same list
    document.dispatchEvent(new CustomEvent('foldplan:runs', {detail: state.runs}));
  }

  // ---- data ----------------------------------------------------------------------------------

  function anyActive() {
    return state.runs.some(function (r) { return ACTIVE[r.status]; });
  }

  function merge(fetched) {
    var seen = {};
    fetched.forEach(function (r) { seen[r.id] = true; });
    var local = Object.keys(state.started).filter(function (id) {
      if (seen[id]) { delete state.started[id]; return false; }
      return true;
    }).map(function (id) { return state.started[id]; });
    return local.concat(fetched);
  }

  async function getJSON(url) {
    var r = await fetch(url, {headers: authHeaders(), cache: 'no-store'});
    if (!r.ok) throw new Error(await errorText(r));
    return r.json();
  }

  // The page shipped every run; polls take only the active ones (finished runs can carry long
  // metrics) plus, once, each run that stopped being active since the last poll (also one
  // started here that finished before a poll saw it).
  async function fetchRuns() {
    var base = '/v1/plans/' + encodeURIComponent(planId) + '/runs';
    var active = await getJSON(base + '?status=queued&status=running');
    if (!Array.isArray(active)) throw new Error('unexpected answer');
    var now = {};
    active.forEach(function (r) { now[r.id] = r; });
    var done = state.runs.filter(function (r) { return ACTIVE[r.status] && !now[r.id]; });
    for (var i = 0; i < done.length; i++) {
      now[done[i].id] = await getJSON('/v1/runs/' + encodeURIComponent(done[i].id));
    }
    var known = {};
    var runs = state.runs.map(function (r) { known[r.id] = true; return now[r.id] || r; });
    var fresh = active.filter(function (r) { return !known[r.id]; });
    return fresh.concat(runs).sort(function (a, b) {  // newest first, as the server lists them
      return String(b.created_at).localeCompare(String(a.created_at));
    });
  }

  async function refresh() {
    state.timer = null;
    try {
      var runs = await fetchRuns();
      if (!Array.isArray(runs)) throw new Error('unexpected answer');
      state.runs = merge(runs);
      state.failures = 0;
      if (state.statusFromPoll) say('', false);
      render();
    } catch (e) {
      state.failures += 1;
      if (anyActive()) {
        say('Could not refresh the runs (' + e.message + '); retrying.', true);
      }
    }
    schedule();
  }

  function schedule() {
    if (state.timer !== null) return;
    if (state.failures > 0 && anyActive()) {
      if (state.failures < 100) state.timer = setTimeout(refresh, RETRY_MS);
    } else if (anyActive()) {
      state.timer = setTimeout(refresh, POLL_MS);
    }
  }

  function select(id, pinned) {
    state.selected = id;
    state.pinned = pinned;
    render();
  }

  tbody.addEventListener('click', async function (ev) {
    var btn = ev.target.closest('button.cancel');
    if (btn) {
      var id = btn.dataset.runId;
      if (!window.confirm('Cancel run ' + id.slice(0, 8) + '?')) return;
      btn.disabled = true;
      try {
        var r = await fetch('/v1/runs/' + encodeURIComponent(id),
                            {method: 'DELETE', headers: authHeaders()});
        say(r.ok ? 'Run ' + id.slice(0, 8) + ' cancelled.' : 'Could not cancel run ' +
            id.slice(0, 8) + ' (' + await errorText(r) + ').', false);
      } catch (e) {
        say('Could not cancel run ' + id.slice(0, 8) + ' (' + e.message + ').', false);
      }
      if (state.timer !== null) { clearTimeout(state.timer); state.timer = null; }
      refresh();
      return;
    }
    if (ev.target.closest('a')) return;
    var tr = ev.target.closest('tr[data-run-id]');
    if (tr) select(tr.dataset.runId, true);
  });
  tbody.addEventListener('keydown', function (ev) {
    var tr = ev.target.closest('tr[data-run-id]');
    if (tr && ev.target === tr && (ev.key === 'Enter' || ev.key === ' ')) {
      ev.preventDefault();
      select(tr.dataset.runId, true);
    }
  });

  if (form) form.addEventListener('submit', async function (ev) {
    ev.preventDefault();
    var submit = document.getElementById('r-submit');
    var body = {candidate: +document.getElementById('r-candidate').value,
                steps: +document.getElementById('r-steps').value,
                backend: document.getElementById('r-backend').value};
    submit.disabled = true;
    try {
      var r = await fetch('/v1/plans/' + encodeURIComponent(planId) + '/runs', {
        method: 'POST', headers: authHeaders({'Content-Type': 'application/json'}),
        body: JSON.stringify(body)});
      if (r.status !== 202) {
        say('Could not start the run (' + await errorText(r) + ').', false);
        return;
      }
      var run = await r.json();
      say('Run ' + String(run.id).slice(0, 8) + ' started.', false);
      state.started[run.id] = run;
      state.runs = merge(state.runs.filter(function (x) { return x.id !== run.id; }));
      state.pinned = false;  // follow the newest: this one
      render();
      schedule();
    } catch (e) {
      say('Could not start the run (' + e.message + ').', false);
    } finally {
      submit.disabled = false;
    }
  });

  // Runs started elsewhere on the page (verify.js starts one per candidate): look again now.
  document.addEventListener('foldplan:runs-started', function () {
    if (state.timer !== null) { clearTimeout(state.timer); state.timer = null; }
    refresh();
  });

  // The runs the page shipped: drawn at once, then followed while any is active.
  var shipped = JSON.parse(document.getElementById('runs-data').textContent);
  state.runs = Array.isArray(shipped) ? shipped : [];
  render();
  schedule();
})();
