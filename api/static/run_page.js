// The page of one run (GET /runs/{id}): charts of its per-step metrics (loss, aux loss,
// gradient norm; step time, tokens/s and MFU against the prediction; marks where an elastic
// run changed its mapping), peak memory, bytes per collective, error and log tail.
//
// Data: what api/run_view.run_data answers, shipped in the page (<script id="run-data">) and
// fetched again from /runs/{id}/data.json every second while the run is queued or running.
// Per-step rates are computed on the server (one home); this script only draws. Every piece of
// run data goes into the DOM through textContent or setAttribute, never as markup.
(function () {
  'use strict';
  var chart = window.FoldplanChart;  // api/static/line_chart.js
  var el = chart.el, fact = chart.fact, fmtInt = chart.fmtInt, fmtPct = chart.fmtPct;
  var lineChart = chart.lineChart, series = chart.series, num = chart.num, sv = chart.sv,
      fmtSeconds = chart.fmtSeconds;
  var ACTIVE = {queued: true, running: true};
  var POLL_MS = 1000;
  var runId = document.getElementById('run-id').textContent;

  function fmtBytes(x) {
    if (x === null) return '—';
    var units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'], i = 0;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return (i ? x.toFixed(1) : x.toFixed(0)) + ' ' + units[i];
  }

  function figure(caption, svg) {
    var f = el('figure');
    f.appendChild(el('figcaption', null, caption));
    f.appendChild(svg);
    return f;
  }

  // One chart of a per-step column; `pred` adds the predicted value as a dashed line.
  function columnChart(data, col, opts) {
    var c = data.columns;
    var s = series(c.step, c[col]);
    var hlines = [];
    if (opts.pred !== null && opts.pred !== undefined) {
      hlines.push({y: opts.pred, cls: 'pred', label: 'predicted ' + opts.fmt(opts.pred)});
    }
    var yMax;
    if (opts.clipWarmup && s.ys.length >= 3) {  // the first step carries warm-up: clip it
      var top = Math.max.apply(null, s.ys.slice(1).concat(hlines.map(function (h) {
        return h.y;
      })));
      if (top > 0) yMax = top * 1.12;
    }
    var active = ACTIVE[data.run.status];
    return lineChart({
      id: opts.id, label: opts.caption, xs: s.xs, ys: s.ys, hlines: hlines,
      vlines: data.marks.map(function (m) { return {x: m.step, label: m.label}; }),
      yTitle: opts.yTitle, yUnit: opts.unit || '', yFromZero: !!opts.fromZero, yMax: yMax,
      empty: active ? 'No steps measured yet.' : 'Not recorded by this run.'});
  }

  function renderFacts(data) {
    var run = data.run, m = run.metrics || {}, p = run.predicted || {};
    var facts = document.getElementById('run-facts');
    var measured = num(m.step_time_s), pred = num(p.step_time_s);
    var loss = series(data.columns.step, data.columns.loss).ys;
    var done = data.columns.step.length ? data.columns.step[data.columns.step.length - 1] : 0;
    var items = [
      fact('Progress', done + ' / ' + run.steps + ' steps'),
      fact('Measured step time', fmtSeconds(measured), measured !== null
           ? (m.partial ? '(so far)' : '(median)') : null),
      fact('Predicted step time', fmtSeconds(pred)),
      fact('Measured / predicted', measured !== null && pred ? (measured / pred).toFixed(2) + '×'
                                                               : '—'),
      fact('Tokens/s', fmtInt(num(m.tokens_per_s)),
           num(p.tokens_per_s) !== null ? 'predicted ' + fmtInt(p.tokens_per_s) : null),
      fact('MFU', fmtPct(num(m.mfu)), num(p.mfu) !== null ? 'predicted ' + fmtPct(p.mfu) : null),
    ];
    if (loss.length) {
      items.push(fact('Loss', loss[loss.length - 1].toFixed(3),
                      loss.length > 1 ? 'from ' + loss[0].toFixed(3) : null));
    }
    if (typeof p.machine === 'string') items.push(fact('Prediction for', p.machine));
    facts.replaceChildren.apply(facts, items);
    var badge = document.getElementById('run-status-badge');
    badge.textContent = run.status;
    badge.className = 'badge ' + run.status;
  }

  function renderCharts(data) {
    var p = data.run.predicted || {};
    var plain = function (x) { return String(x); };
    var training = document.getElementById('charts-training');
    training.replaceChildren(
      figure('Loss', columnChart(data, 'loss', {id: 'loss-chart', caption: 'Loss per step',
                                                yTitle: 'loss', fmt: plain})),
      figure('Aux loss (router)', columnChart(data, 'aux_loss', {
        id: 'aux-loss-chart', caption: 'Router aux loss per step', yTitle: 'aux loss',
        fmt: plain})),
      figure('Gradient norm', columnChart(data, 'grad_norm', {
        id: 'grad-norm-chart', caption: 'Gradient norm per step', yTitle: 'grad norm',
        fmt: plain})));
    var speed = document.getElementById('charts-speed');
    speed.replaceChildren(
      figure('Step time', columnChart(data, 'step_time_s', {
        id: 'step-time-chart', caption: 'Step time per step', yTitle: 'step time', unit: 's',
        fromZero: true, clipWarmup: true, pred: num(p.step_time_s), fmt: fmtSeconds})),
      figure('Tokens/s', columnChart(data, 'tokens_per_s', {
        id: 'tokens-chart', caption: 'Tokens per second per step', yTitle: 'tokens/s',
        fromZero: true, pred: num(p.tokens_per_s), fmt: fmtInt})),
      figure('MFU', columnChart(data, 'mfu', {
        id: 'mfu-chart', caption: 'MFU per step', yTitle: 'MFU', unit: '%', fromZero: true,
        pred: num(p.mfu), fmt: fmtPct})));
    var marks = document.getElementById('run-marks');
    marks.replaceChildren.apply(marks, data.marks.map(function (mk) {
      return el('p', {'class': 'mark-note'},
                'Step ' + mk.step + ': the run went on with another mapping (' + mk.label + ').');
    }));
  }

  function renderMemory(data) {
    var box = document.getElementById('memory-facts');
    var measured = num(data.peak_memory_gib), pred = num(data.predicted_peak_gib);
    box.replaceChildren(
      fact('Peak memory, rank 0', measured !== null ? measured.toFixed(2) + ' GiB'
           : 'not measured', measured === null ? '(CPU ranks report none)' : null),
      fact('Predicted peak, worst stage', pred !== null ? pred.toFixed(2) + ' GiB' : '—'));
    var comm = document.getElementById('comm-bytes');
    var keys = Object.keys(data.comm_bytes || {}).filter(function (k) {
      return num(data.comm_bytes[k]) !== null;
    }).sort(function (a, b) { return data.comm_bytes[b] - data.comm_bytes[a]; });
    if (!keys.length) {
      comm.replaceChildren(el('p', {'class': 'small muted'}, ACTIVE[data.run.status]
        ? 'Bytes per collective arrive with the final metrics.'
        : 'No collective bytes recorded.'));
      return;
    }
    var max = data.comm_bytes[keys[0]] || 1, rowH = 20, W = 560, labelW = 170;
    var svg = sv('svg', {id: 'comm-chart', width: W + 90, height: rowH * keys.length + 4,
                         viewBox: '0 0 ' + (W + 90) + ' ' + (rowH * keys.length + 4),
                         role: 'img', 'aria-label': 'Bytes per rank per step of each collective',
                         'class': 'run-chart'});
    keys.forEach(function (k, i) {
      var v = data.comm_bytes[k], y = i * rowH;
      svg.appendChild(sv('text', {x: 0, y: y + 14}, k));
      var w = Math.max(1, (W - labelW) * v / max);
      var bar = sv('rect', {x: labelW, y: y + 3, width: w.toFixed(1), height: 14,
                            'class': 'commbar'});
      bar.appendChild(sv('title', null, k + ': ' + fmtBytes(v) + ' per rank per step'));
      svg.appendChild(bar);
      svg.appendChild(sv('text', {x: labelW + w + 6, y: y + 14}, fmtBytes(v)));
    });
    comm.replaceChildren(el('p', {'class': 'small muted'},
                            'Bytes per rank per step of each collective (group.op), averaged ' +
                            'over ranks and steps.'), svg);
  }

  function renderLog(data) {
    var run = data.run;
    var err = document.getElementById('run-error');
    err.textContent = run.error || '';
    err.hidden = !run.error;
    var pre = document.getElementById('run-log');
    var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = run.log_tail || 'No log yet.';
    if (atEnd) pre.scrollTop = pre.scrollHeight;
    var caveat = document.getElementById('prediction-caveat');
    caveat.textContent = data.caveat || '';
    caveat.hidden = !data.caveat;
  }

  function render(data) {
    renderFacts(data);
    renderCharts(data);
    renderMemory(data);
    renderLog(data);
  }

  async function poll() {
    try {
      var r = await fetch('/runs/' + encodeURIComponent(runId) + '/data.json',
                          {cache: 'no-store'});
      if (r.ok) {
        var data = await r.json();
        render(data);
        if (!ACTIVE[data.run.status]) return;
      }
    } catch (e) { /* a network blip: try again */ }
    setTimeout(poll, POLL_MS);
  }

  var shipped = JSON.parse(document.getElementById('run-data').textContent);
  render(shipped);
  if (ACTIVE[shipped.run.status]) setTimeout(poll, POLL_MS);
})();
