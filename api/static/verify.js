// The plan page's "Verify the top-k": POST /v1/plans/{id}/verify with the checked candidates,
// then GET /v1/verifications/{id} every second until it is over; the table shows each
// candidate's predicted and measured step time and rank, the summary Spearman's rho, and, once
// it succeeded, a link to its profile correction (GET /v1/verifications/{id}/profile). The
// latest verification of the plan is shipped in the page (<script id="verify-data">) and
// followed the same way if it is still going. Text goes into the DOM as text only.
(function () {
  'use strict';
  var form = document.getElementById('verify-form');
  if (!form) return;
  var chart = window.FoldplanChart;
  var el = chart.el;
  var fmtSeconds = chart.fmtSeconds, num = chart.num;
  var planId = form.dataset.planId;
  var table = document.getElementById('verify-table');
  var tbody = table.querySelector('tbody');
  var status = document.getElementById('verify-status');
  var summary = document.getElementById('verify-summary');
  var ACTIVE = {queued: true, running: true, waiting: true};
  var POLL_MS = 1000;
  var timer = null;

  function token() {
    var t = document.getElementById('r-token');  // the run form's token field
    return t && t.value ? {'Authorization': 'Bearer ' + t.value} : {};
  }

  var knownRuns = {};  // run ids seen: a new one makes runs.js look at the runs again

  function render(v) {
    var fresh = v.candidates.some(function (c) { return c.run_id && !knownRuns[c.run_id]; });
    v.candidates.forEach(function (c) { if (c.run_id) knownRuns[c.run_id] = true; });
    if (fresh) document.dispatchEvent(new CustomEvent('foldplan:runs-started'));
    table.hidden = false;
    table.dataset.verificationId = v.id;
    table.dataset.status = v.status;
    tbody.replaceChildren.apply(tbody, v.candidates.map(function (c) {
      var tr = el('tr', {'data-candidate': c.candidate});
      var meas = num(c.measured_step_time_s), pred = num(c.predicted_step_time_s);
      tr.appendChild(el('td', null, '#' + c.candidate));
      tr.appendChild(el('td', null, fmtSeconds(pred)));
      tr.appendChild(el('td', {'class': 'pred-rank'}, c.predicted_rank));
      tr.appendChild(el('td', {'class': 'measured'}, fmtSeconds(meas)));
      tr.appendChild(el('td', {'class': 'measured-rank'},
                        c.measured_rank === null ? '—' : c.measured_rank));
      tr.appendChild(el('td', null, meas !== null && pred ? (meas / pred).toFixed(2) + '×' : '—'));
      var st = el('td');
      st.appendChild(el('span', {'class': 'badge ' + c.status}, c.status));
      if (c.error) st.setAttribute('title', c.error);
      tr.appendChild(st);
      var run = el('td');
      if (c.run_id) {
        run.appendChild(el('a', {href: '/runs/' + encodeURIComponent(c.run_id)},
                           String(c.run_id).slice(0, 8)));
      }
      tr.appendChild(run);
      return tr;
    }));
    var parts = ['Verification ' + String(v.id).slice(0, 8) + ': ' + v.status + '.'];
    if (num(v.spearman) !== null) {
      parts.push('Spearman ρ between predicted and measured step times: ' +
                 v.spearman.toFixed(2) + ' (1 = the same ranking).');
    } else if (!ACTIVE[v.status]) {
      parts.push('Spearman ρ needs at least two measured candidates with different times.');
    }
    if (num(v.measured_over_predicted) !== null) {
      parts.push('Measured / predicted, median: ' + v.measured_over_predicted.toFixed(2) + '×.');
    }
    if (v.error) parts.push(v.error);
    summary.textContent = parts.join(' ');
    renderProfile(v);
  }

  // A succeeded verification offers its measured/predicted median as the cluster's profile
  // correction (GET /v1/verifications/{id}/profile): a file to put in `cluster.profile`.
  function renderProfile(v) {
    var box = document.getElementById('verify-profile');
    if (!box) return;
    var ok = v.status === 'succeeded' && num(v.measured_over_predicted) !== null;
    box.hidden = !ok;
    if (!ok) { box.replaceChildren(); return; }
    var a = el('a', {id: 'verify-profile-link', download: 'profile-' + String(v.id).slice(0, 8) +
                     '.json', href: '/v1/verifications/' + encodeURIComponent(v.id) + '/profile'},
               'Save the measured step times as a profile correction');
    box.replaceChildren(a, document.createTextNode(
      ' (a profile with step_time_scale = ' + v.measured_over_predicted.toFixed(2) +
      '; put it in the cluster\'s "profile" of the next plan on these machines: its predicted ' +
      'step times are multiplied by it. A uniform factor does not change the ranking, only ' +
      'the predicted numbers.)'));
  }

  async function follow(id) {
    timer = null;
    try {
      var r = await fetch('/v1/verifications/' + encodeURIComponent(id), {cache: 'no-store'});
      if (r.ok) {
        var v = await r.json();
        render(v);
        if (!ACTIVE[v.status]) return;
      }
    } catch (e) { /* try again */ }
    timer = setTimeout(function () { follow(id); }, POLL_MS);
  }

  form.addEventListener('submit', async function (ev) {
    ev.preventDefault();
    var picks = Array.prototype.map.call(
      form.querySelectorAll('input[name=v-candidate]:checked'), function (c) { return +c.value; });
    var body = {candidates: picks, steps: +document.getElementById('v-steps').value,
                backend: document.getElementById('v-backend').value};
    var submit = document.getElementById('v-submit');
    submit.disabled = true;
    try {
      var headers = token();
      headers['Content-Type'] = 'application/json';
      var r = await fetch('/v1/plans/' + encodeURIComponent(planId) + '/verify',
                          {method: 'POST', headers: headers, body: JSON.stringify(body)});
      var data = await r.json();
      if (r.status !== 202) {
        var d = Array.isArray(data.detail) ? data.detail.map(function (x) {
          return (x.loc || []).join('.') + ': ' + x.msg; }).join('; ') : data.detail;
        status.textContent = 'Could not verify (HTTP ' + r.status + '): ' + (d || data.message);
        return;
      }
      status.textContent = 'Verification ' + String(data.id).slice(0, 8) + ' started: ' +
        picks.length + ' candidates, one after the other.';
      render(data);
      if (timer !== null) clearTimeout(timer);
      timer = setTimeout(function () { follow(data.id); }, POLL_MS);
    } catch (e) {
      status.textContent = 'Could not verify (' + e.message + ').';
    } finally {
      submit.disabled = false;
    }
  });

  var shipped = JSON.parse(document.getElementById('verify-data').textContent);
  if (Array.isArray(shipped) && shipped.length) {
    render(shipped[0]);
    if (ACTIVE[shipped[0].status]) timer = setTimeout(function () { follow(shipped[0].id); },
                                                     POLL_MS);
  }
})();
