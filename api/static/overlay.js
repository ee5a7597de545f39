// Several runs of one plan in one chart (the plan page's "Runs overlaid"): loss and step time
// per step of every checked run, each in its own colour, with each run's predicted step time
// dashed. The list of runs comes from runs.js (event 'foldplan:runs', sent on every redraw);
// the reader's choice of runs is kept across redraws. Drawn with api/static/line_chart.js.
(function () {
  'use strict';
  var box = document.getElementById('runs-overlay');
  if (!box) return;
  var chart = window.FoldplanChart;
  var el = chart.el;
  var MAX_DEFAULT = 5;          // runs checked when the reader has not chosen yet
  var COLORS = ['#2457a6', '#e3892b', '#2e9c6a', '#8e5ea2', '#c0392b', '#5d4037'];
  var chosen = null;            // run id -> true, once the reader has chosen
  var runs = [];

  function withSteps(list) {
    return list.filter(function (r) {
      return r.metrics && Array.isArray(r.metrics.loss) && r.metrics.loss.length;
    });
  }

  function label(run) {
    return String(run.id).slice(0, 8) + ' · #' + run.candidate;
  }

  function isChecked(run, i) { return chosen ? !!chosen[run.id] : i < MAX_DEFAULT; }

  function draw() {
    var drawable = withSteps(runs);
    box.hidden = drawable.length < 2;
    if (box.hidden) return;
    var picks = document.getElementById('overlay-picks');
    picks.replaceChildren.apply(picks, drawable.map(function (run, i) {
      var lab = el('label', {'class': 'overlay-pick'});
      var cb = el('input', {type: 'checkbox', 'data-run-id': run.id});
      cb.checked = isChecked(run, i);
      lab.appendChild(cb);
      lab.appendChild(el('i', {style: 'background:' + COLORS[i % COLORS.length]}));
      lab.appendChild(document.createTextNode(label(run) + ' (' + run.status + ')'));
      return lab;
    }));
    var shown = drawable.map(function (run, i) { return {run: run, i: i}; })
      .filter(function (x) { return isChecked(x.run, x.i); });
    function lines(key) {
      return shown.map(function (x) {
        var s = chart.series(x.run.metrics.steps, x.run.metrics[key]);
        return {xs: s.xs, ys: s.ys, label: label(x.run), color: COLORS[x.i % COLORS.length]};
      });
    }
    // one dashed line per distinct prediction among the checked runs (runs of one candidate
    // share theirs)
    function predictions() {
      var seen = {};
      return shown.map(function (x) {
        return {y: chart.num((x.run.predicted || {}).step_time_s), c: x.run.candidate};
      }).filter(function (h) {
        var key = h.y + ':' + h.c;
        if (h.y === null || seen[key]) return false;
        seen[key] = true;
        return true;
      }).map(function (h) {
        return {y: h.y, cls: 'pred', label: 'predicted #' + h.c + ' ' + chart.fmtSeconds(h.y)};
      });
    }
    function overlay(id, caption, key, unit) {
      var ls = lines(key);
      var svg = chart.lineChart({id: id, label: caption, xs: [], ys: [], more: ls,
                                 hlines: unit === 's' ? predictions() : [],
                                 yTitle: caption.toLowerCase(), yUnit: unit,
                                 yFromZero: unit === 's',
                                 empty: 'Check runs above to compare them.'});
      // each run in the colour of its check box
      svg.querySelectorAll('polyline.series').forEach(function (pl, k) {
        pl.setAttribute('style', 'stroke:' + ls[k].color);
        pl.setAttribute('data-run', ls[k].label);
      });
      var f = el('figure');
      f.appendChild(el('figcaption', null, caption));
      f.appendChild(svg);
      return f;
    }
    var charts = document.getElementById('overlay-charts');
    charts.replaceChildren(overlay('overlay-loss', 'Loss', 'loss', ''),
                           overlay('overlay-step-time', 'Step time', 'step_times_s', 's'));
  }

  box.addEventListener('change', function (ev) {
    var cb = ev.target.closest('input[type=checkbox][data-run-id]');
    if (!cb) return;
    chosen = {};
    box.querySelectorAll('input[type=checkbox][data-run-id]').forEach(function (c) {
      if (c.checked) chosen[c.dataset.runId] = true;
    });
    draw();
  });
  document.addEventListener('foldplan:runs', function (ev) {
    runs = Array.isArray(ev.detail) ? ev.detail : [];
    draw();
  });
})();
