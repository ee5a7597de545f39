// The plan page's own controls (GET /plans/{id}): the layout kind tabs, and the copy and
// download buttons of the Megatron-LM arguments and the launch scripts. No libraries.
(function () {
  'use strict';
  document.querySelectorAll('#layout-tabs input[name=kind]').forEach(function (input) {
    input.addEventListener('change', function () {
      document.querySelectorAll('.layout-kind').forEach(function (d) {
        d.classList.toggle('shown', d.dataset.kind === input.value);
      });
    });
  });

  function say(button, text) {
    var status = document.getElementById('copy-status');
    if (button.id !== 'copy-args' || !status) {
      var old = button.textContent;
      button.textContent = text;
      setTimeout(function () { button.textContent = old; }, 1500);
    } else {
      status.textContent = text;
    }
  }

  async function copy(button, text) {
    try {
      await navigator.clipboard.writeText(text);
      say(button, 'Copied.');
    } catch (e) {  // no clipboard permission (plain http, headless): the old way
      var ta = document.createElement('textarea');
      ta.value = text;
      document.body.appendChild(ta);
      ta.select();
      var ok = document.execCommand('copy');
      ta.remove();
      say(button, ok ? 'Copied.' : 'Select the text and copy it by hand.');
    }
  }

  function download(text, filename) {
    var url = URL.createObjectURL(new Blob([text], {type: 'text/x-shellscript'}));
    var a = document.createElement('a');
    a.href = url;
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  }

  document.addEventListener('click', function (ev) {
    var b = ev.target.closest('button[data-copy], button[data-download]');
    if (!b) return;
    var source = document.getElementById(b.dataset.copy || b.dataset.download);
    if (!source) return;
    if (b.dataset.copy) copy(b, source.textContent);
    else download(source.textContent, b.dataset.filename || 'script.sh');
  });
})();
