// Zeitwork console: progressive enhancement only. Every page works without
// this script; with it, destructive forms ask in place, ages stay current,
// copy buttons work and the deployments list updates live.
(function () {
  'use strict';

  // Destructive forms ask first. Without the script the server asks on a
  // page of its own (the form then lacks confirmed=1).
  document.addEventListener('submit', function (ev) {
    var form = ev.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
    if (!window.confirm(form.dataset.confirm)) {
      ev.preventDefault();
      return;
    }
    var c = form.querySelector('input[name="confirmed"]');
    if (c) c.value = '1';
  });

  function ago(ms) {
    var s = Math.floor((Date.now() - ms) / 1000);
    if (s < 5) return 'just now';
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 172800) return Math.floor(s / 3600) + ' h ago';
    return Math.floor(s / 86400) + ' d ago';
  }
  // Times of day: the server writes UTC; the browser knows the reader's zone.
  function clock(ms) {
    var d = new Date(ms), today = new Date().toDateString() === d.toDateString();
    var opts = today ? { hour: '2-digit', minute: '2-digit', second: '2-digit' }
      : { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' };
    return d.toLocaleString([], opts);
  }
  function refreshAges(root) {
    root.querySelectorAll('time[data-age], time[data-clock]').forEach(function (el) {
      var t = Date.parse(el.getAttribute('datetime'));
      if (isNaN(t)) return;
      el.textContent = el.hasAttribute('data-age') ? ago(t) : clock(t);
    });
  }

  function enableCopy(root) {
    if (!navigator.clipboard || !window.isSecureContext) return;
    root.querySelectorAll('button.copy').forEach(function (b) {
      b.hidden = false;
      if (b.dataset.bound) return;
      b.dataset.bound = '1';
      b.addEventListener('click', function () {
        var text = b.dataset.copy;
        if (b.dataset.copyFrom) {
          var src = document.getElementById(b.dataset.copyFrom);
          text = src.value;
          src.select();
        }
        var done = function () { b.textContent = 'Copied'; setTimeout(function () { b.textContent = 'Copy'; }, 2000); };
        navigator.clipboard.writeText(text).then(done, function () {});
      });
    });
  }

  // The deployments list polls its fragment; a 304 means nothing changed.
  function live(section) {
    var list = document.getElementById('deployments-list');
    var note = document.getElementById('live-note');
    var every = parseInt(section.dataset.pollMs, 10) || 2000;
    var etag = section.dataset.etag || null;
    var hint = section.querySelector('.js-only');
    if (hint) hint.hidden = false;

    function statuses() {
      var m = {};
      list.querySelectorAll('[data-id]').forEach(function (el) {
        m[el.dataset.id] = { name: el.dataset.name, status: el.dataset.status };
      });
      return m;
    }
    function announce(before, after) {
      var said = [];
      Object.keys(after).forEach(function (id) {
        var was = before[id];
        if (!was) said.push(after[id].name + ' is ' + after[id].status);
        else if (was.status !== after[id].status) said.push(after[id].name + ' is now ' + after[id].status);
      });
      if (said.length) note.textContent = said.join('. ') + '.';
    }
    function ended() {
      document.getElementById('session-ended').hidden = false;
    }
    function poll() {
      if (document.hidden) return schedule();
      var headers = { 'Accept': 'text/html' };
      if (etag) headers['If-None-Match'] = etag;
      fetch(section.dataset.poll, { headers: headers, cache: 'no-store', credentials: 'same-origin', redirect: 'error' })
        .then(function (r) {
          if (r.status === 401) { ended(); return null; }
          if (r.status === 304 || !r.ok) { schedule(); return null; }
          etag = r.headers.get('ETag');
          return r.text().then(function (html) {
            var before = statuses();
            var focused = document.activeElement;
            var keep = focused && list.contains(focused) ? focused.id : '';
            list.innerHTML = html;
            refreshAges(list);
            enableCopy(list);
            if (keep) {
              var again = document.getElementById(keep);
              if (again) again.focus();
            }
            announce(before, statuses());
            schedule();
          });
        })
        .catch(function () { schedule(); });
    }
    function schedule() { setTimeout(poll, every); }
    schedule();
  }

  function start() {
    refreshAges(document);
    enableCopy(document);
    setInterval(function () { refreshAges(document); }, 10000);
    var section = document.querySelector('[data-poll]');
    if (section && window.fetch) live(section);
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
