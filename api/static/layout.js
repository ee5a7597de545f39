// The aggregated rank layout of the plan page (worlds too large to draw GPU by GPU, see
// api/layout_view.py): one cell per node or NVLink domain, coloured by the set of cells the
// selected kind's groups tie together (grey: every group inside the cell). Clicking a cell
// opens the zoom on that node (?c=K&node=N). Data: <script id="layout-data">.
(function () {
  'use strict';
  var svg = document.getElementById('node-grid');
  var dataEl = document.getElementById('layout-data');
  if (!svg || !dataEl) return;
  var data = JSON.parse(dataEl.textContent);
  var sv = window.FoldplanChart.sv;  // api/static/line_chart.js (loaded first)
  var GREY = '#d7dbe0';

  function color(i) {  // api/layout_view.color, the same hues as the GPU grid
    return 'hsl(' + ((i * 137.508) % 360).toFixed(0) + ',62%,' + (52 + 10 * (i % 3)) + '%)';
  }

  function draw(kind) {
    var st = data.sets[kind];
    var local = st.cells_per_set === 1;
    var c = data.cell, cols = data.cols;
    var parts = [];
    for (var row = 0; row * cols < data.num_cells; row++) {
      parts.push(sv('text', {x: 0, y: 4 + row * (c + 2) + c * 0.8, 'class': 'small'},
                    String(row * cols * data.nodes_per_cell)));
    }
    for (var i = 0; i < data.num_cells; i++) {
      var set = st.set[i];
      var r = sv('rect', {x: 48 + (i % cols) * (c + 2), y: 4 + Math.floor(i / cols) * (c + 2),
                          width: c, height: c, rx: c >= 10 ? 2 : 1,
                          fill: local ? GREY : color(set), 'data-cell': i});
      var first = i * data.nodes_per_cell;
      var what = data.unit === 'node' ? 'node ' + first
        : data.unit + ' ' + i + ' (nodes ' + first + '–' + (first + data.nodes_per_cell - 1) + ')';
      r.appendChild(sv('title', {}, what + ' · ranks ' + i * data.cell_gpus + '–' +
                       ((i + 1) * data.cell_gpus - 1) + ' · ' + kind +
                       (local ? ': every group inside' : ': cell set ' + set)));
      parts.push(r);
    }
    svg.replaceChildren.apply(svg, parts);
    svg.dataset.kind = kind;
  }

  svg.addEventListener('click', function (ev) {
    var r = ev.target.closest('rect[data-cell]');
    if (!r) return;
    var node = +r.dataset.cell * data.nodes_per_cell;
    window.location.href = '?c=' + data.candidate + '&node=' + node + '#layout-zoom';
  });
  document.querySelectorAll('#layout-tabs input[name=kind]').forEach(function (input) {
    input.addEventListener('change', function () { draw(input.value); });
  });
  var checked = document.querySelector('#layout-tabs input[name=kind]:checked');
  draw(checked ? checked.value : 'tp');
})();
