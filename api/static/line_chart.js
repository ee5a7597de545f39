// Line charts of the run panel (api/static/runs.js), the run page (run_page.js) and the runs
// overlay (overlay.js): inline SVG with round ticks, a clipped
// warm-up step, horizontal reference lines, at most MAX_DRAWN points. No libraries. Exposes
// window.FoldplanChart = {lineChart, series, sv, num, list, fmtSeconds} and the small DOM and
// number helpers every page script shares: el, fact, fmtInt, fmtPct.
(function () {
  'use strict';
  var SVG_NS = 'http://www.w3.org/2000/svg';
  var MAX_DRAWN = 1000;

  function sv(tag, attrs, text) {
    var e = document.createElementNS(SVG_NS, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fact(label, value, extra) {
    var d = el('div');
    d.appendChild(el('b', null, label));
    d.appendChild(document.createTextNode(value));
    if (extra) d.appendChild(el('span', {'class': 'muted small'}, ' ' + extra));
    return d;
  }

  function fmtInt(x) {
    return x === null ? '—' : x.toLocaleString('en-US', {maximumFractionDigits: 0});
  }
  function fmtPct(x) { return x === null ? '—' : (100 * x).toFixed(1) + '%'; }

  function num(v) { return typeof v === 'number' && isFinite(v) ? v : null; }
  function list(v) { return Array.isArray(v) ? v : []; }

  // Seconds for people: '12.34 s' from 1 s up ('123 s' from 100 s), '87.5 ms' / '250 ms' below,
  // '—' for no value. The one formatter of step times on the pages (runs.js uses it too).
  function fmtSeconds(x) {
    if (x === null) return '—';
    if (x >= 100) return x.toFixed(0) + ' s';
    if (x >= 1) return x.toFixed(2) + ' s';
    var ms = 1000 * x;
    return ms >= 100 ? ms.toFixed(0) + ' ms' : ms.toFixed(1) + ' ms';
  }

  // A round step (1, 2, 2.5 or 5 times a power of ten) giving about `count` ticks over [lo, hi].
  function niceStep(lo, hi, count, integer) {
    var raw = (hi - lo) / Math.max(1, count);
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 2.5, 5, 10].map(function (f) { return f * mag; })
      .find(function (s) { return s >= raw * (1 - 1e-9); });
    return integer ? Math.max(1, Math.round(step)) : step;
  }

  function ticksIn(lo, hi, step) {
    var ticks = [];
    for (var k = Math.ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; k++) {
      ticks.push(k * step);
    }
    return ticks;
  }

  // Large tick values short: 12k, 1.5M, 2G (bytes, tokens/s); small ones as they are.
  function compact(t, step) {
    var units = [[1e9, 'G'], [1e6, 'M'], [1e3, 'k']];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(t) >= units[i][0]) {
        return (t / units[i][0]).toFixed(Math.min(3, decimals(step / units[i][0]))) +
          units[i][1];
      }
    }
    return t.toFixed(decimals(step));
  }

  // Digits after the point that show every tick of this step exactly (2.5 -> 1, 0.25 -> 2).
  function decimals(step) {
    var d = 0;
    while (d < 6 && Math.abs(Math.round(step * Math.pow(10, d)) - step * Math.pow(10, d)) >
           1e-6 * Math.max(1, step * Math.pow(10, d))) d++;
    return d;
  }

  function tickLabel(t, step, unit, top) {
    if (t === 0) return '0';
    if (unit === '%') return (100 * t).toFixed(decimals(100 * step)) + '%';
    if (unit !== 's') return compact(t, step);
    if (top >= 1) return t.toFixed(decimals(step)) + ' s';
    return (1000 * t).toFixed(decimals(1000 * step)) + ' ms';
  }

  // A line chart in SVG. opts: id, xs, ys (same length), yUnit ('s', '%' or ''), yFromZero,
  // yMax (clip above), hlines: [{y, cls, label}], vlines: [{x, label}] (dotted marks, e.g.
  // where a run changed its mapping), empty (text when there is nothing to draw), and
  // `more`: further series [{xs, ys, label}] drawn in other colours (an overlay of runs).
  function lineChart(opts) {
    var W = 520, H = 230, L = 62, R = 16, T = 12, B = 38;
    var root = sv('svg', {id: opts.id, width: W, height: H, viewBox: '0 0 ' + W + ' ' + H,
                          role: 'img', 'aria-label': opts.label, 'class': 'run-chart'});
    var others = opts.more || [];
    var xs = opts.xs, ys = opts.ys;
    var allXs = others.reduce(function (a, o) { return a.concat(o.xs); }, xs.slice());
    var allYs = others.reduce(function (a, o) { return a.concat(o.ys); }, ys.slice());
    var hv = (opts.hlines || []).map(function (h) { return h.y; });
    var yvals = allYs.concat(hv);
    if (!allXs.length && !hv.length) {
      root.appendChild(sv('text', {x: W / 2, y: H / 2, 'text-anchor': 'middle', 'class': 'muted'},
                          opts.empty || 'No measurements yet.'));
      return root;
    }
    var x0 = allXs.length ? Math.min.apply(null, allXs) : 1;
    var x1 = allXs.length ? Math.max.apply(null, allXs) : opts.xEnd || 1;
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    var lo = opts.yFromZero ? 0 : Math.min.apply(null, yvals);
    var hi = opts.yMax !== undefined ? opts.yMax : Math.max.apply(null, yvals);
    if (!(hi > lo)) { var d = Math.abs(hi) * 0.1 || 1; hi += d; if (!opts.yFromZero) lo -= d; }
    var ystep = niceStep(lo, hi, 4, false);
    lo = Math.floor(lo / ystep + 1e-9) * ystep;  // the y axis runs from tick to tick
    hi = Math.ceil(hi / ystep - 1e-9) * ystep;
    var yticks = ticksIn(lo, hi, ystep);
    var xstep = niceStep(x0, x1, 6, true);
    var xticks = ticksIn(x0, x1, xstep);
    if (!xticks.length || xticks[0] - x0 >= xstep / 2) xticks.unshift(x0);
    var px = function (x) { return L + (W - L - R) * (x - x0) / (x1 - x0); };
    var py = function (y) { return T + (H - T - B) * (1 - (y - lo) / (hi - lo)); };

    var axes = sv('g', {'class': 'axes'});
    yticks.forEach(function (t) {
      axes.appendChild(sv('line', {x1: L, x2: W - R, y1: py(t), y2: py(t), 'class': 'gridline'}));
      axes.appendChild(sv('text', {x: L - 6, y: py(t) + 4, 'text-anchor': 'end'},
                          tickLabel(t, ystep, opts.yUnit, hi)));
    });
    xticks.forEach(function (t) {
      axes.appendChild(sv('line', {x1: px(t), x2: px(t), y1: H - B, y2: H - B + 4,
                                   'class': 'axis'}));
      axes.appendChild(sv('text', {x: px(t), y: H - B + 16, 'text-anchor': 'middle'}, t));
    });
    axes.appendChild(sv('line', {x1: L, x2: W - R, y1: H - B, y2: H - B, 'class': 'axis'}));
    axes.appendChild(sv('line', {x1: L, x2: L, y1: T, y2: H - B, 'class': 'axis'}));
    axes.appendChild(sv('text', {x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle',
                                 'class': 'muted'}, 'step'));
    axes.appendChild(sv('text', {x: 12, y: (T + H - B) / 2, 'text-anchor': 'middle',
                                 'class': 'muted',
                                 transform: 'rotate(-90 12 ' + (T + H - B) / 2 + ')'},
                        opts.yTitle));
    root.appendChild(axes);

    (opts.hlines || []).forEach(function (h) {
      var y = py(Math.min(h.y, hi));
      root.appendChild(sv('line', {x1: L, x2: W - R, y1: y, y2: y, 'class': h.cls}));
      if (h.label) {
        root.appendChild(sv('text', {x: W - R - 4, y: y - 5, 'text-anchor': 'end',
                                     'class': h.cls + '-label'}, h.label));
      }
    });

    (opts.vlines || []).forEach(function (v) {
      if (v.x < x0 || v.x > x1) return;
      root.appendChild(sv('line', {x1: px(v.x), x2: px(v.x), y1: T, y2: H - B, 'class': 'mark'}));
      if (v.label) {
        root.appendChild(sv('text', {x: px(v.x) + 4, y: T + 22, 'class': 'mark-label'},
                            v.label));
      }
    });

    others.forEach(function (o, k) {
      var pts = o.xs.map(function (x, i) {
        return px(x).toFixed(1) + ',' + py(Math.min(o.ys[i], hi)).toFixed(1);
      });
      if (!pts.length) return;
      var line = sv('polyline', {points: pts.join(' '), 'class': 'series s' + (1 + k % 5),
                                 'data-points': String(pts.length)});
      if (o.label) line.appendChild(sv('title', null, o.label));
      root.appendChild(line);
    });

    if (xs.length) {
      // At most MAX_DRAWN points (every k-th step and the last): a long run stays cheap to draw.
      var stride = Math.ceil(xs.length / MAX_DRAWN);
      var keep = xs.map(function (_, i) { return i; }).filter(function (i) {
        return i % stride === 0 || i === xs.length - 1;
      });
      xs = keep.map(function (i) { return xs[i]; });
      ys = keep.map(function (i) { return ys[i]; });
      var clipped = [];
      var pts = xs.map(function (x, i) {
        var y = ys[i];
        if (y > hi) { clipped.push(i); y = hi; }
        return px(x).toFixed(1) + ',' + py(y).toFixed(1);
      });
      root.appendChild(sv('polyline', {points: pts.join(' '), 'class': 'series',
                                       'data-points': String(pts.length)}));
      if (pts.length <= 40) {
        xs.forEach(function (x, i) {
          var dot = sv('circle', {cx: px(x), cy: py(Math.min(ys[i], hi)), r: 2.5,
                                  'class': 'dot'});
          dot.appendChild(sv('title', null, 'step ' + x + ': ' +
                             (opts.yUnit === 's' ? fmtSeconds(ys[i]) : ys[i])));
          root.appendChild(dot);
        });
      }
      if (clipped.length) {  // name the first point above the chart (warm-up), count the rest
        var c = clipped[0];
        root.appendChild(sv('text', {x: px(xs[c]) + 5, y: T + 10, 'class': 'muted'},
                            '↑ step ' + xs[c] + ': ' + fmtSeconds(ys[c]) +
                            (clipped.length > 1 ? ' (+' + (clipped.length - 1) + ' more above)'
                                                : '')));
      }
    }
    return root;
  }

  // Pairs (step, value) with a finite value; steps default to 1..n when missing or mismatched.
  function series(steps, values) {
    steps = list(steps);
    values = list(values);
    var useSteps = steps.length === values.length;
    var xs = [], ys = [];
    values.forEach(function (v, i) {
      var x = useSteps ? num(steps[i]) : i + 1;
      if (num(v) !== null && x !== null) { xs.push(x); ys.push(v); }
    });
    return {xs: xs, ys: ys};
  }

  window.FoldplanChart = {lineChart: lineChart, series: series, sv: sv, num: num, list: list,
                          fmtSeconds: fmtSeconds, el: el, fact: fact, fmtInt: fmtInt,
                          fmtPct: fmtPct};
})();
