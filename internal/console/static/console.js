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

  // Copy buttons: the clipboard API where the page may use it, else the
  // value selected in a text field for the reader's own copy key.
  function fallbackCopy(b, text) {
    var field = b.parentNode.querySelector('input.copy-text');
    if (!field) {
      field = document.createElement('input');
      field.className = 'copy-text mono';
      field.readOnly = true;
      field.setAttribute('aria-label', 'Value to copy');
      b.parentNode.insertBefore(field, b.nextSibling);
    }
    field.value = text;
    field.focus();
    field.select();
    var ok = false;
    try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    b.textContent = ok ? 'Copied' : 'Press Ctrl+C';
    b.dataset.copied = ok ? 'field' : 'select';
    setTimeout(function () { b.textContent = 'Copy'; }, 2000);
  }
  function enableCopy(root) {
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
        var done = function () { b.textContent = 'Copied'; b.dataset.copied = 'clipboard'; setTimeout(function () { b.textContent = 'Copy'; }, 2000); };
        if (!navigator.clipboard || !window.isSecureContext) return fallbackCopy(b, text);
        navigator.clipboard.writeText(text).then(done, function () { fallbackCopy(b, text); });
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

  // A log page follows its log: NDJSON lines read as they come (fetch and
  // a stream reader), each shown as text (never markup) with its time and
  // stream. The filter hides lines that lack its text; follow keeps the
  // newest line in view.
  function logs(box) {
    var filter = document.getElementById('log-filter');
    var follow = document.getElementById('log-follow');
    var status = document.getElementById('log-status');
    var controls = document.querySelector('.log-controls');
    if (controls) controls.hidden = false;
    var count = 0;
    function shows(row) {
      var q = filter.value.toLowerCase();
      return !q || row.dataset.text.indexOf(q) >= 0;
    }
    function refilter() {
      box.querySelectorAll('.logline').forEach(function (row) { row.hidden = !shows(row); });
      scroll();
    }
    function scroll() { if (follow.checked) box.scrollTop = box.scrollHeight; }
    function span(cls, text) {
      var s = document.createElement('span');
      s.className = cls;
      s.textContent = text;
      return s;
    }
    function add(l) {
      var row = document.createElement('div');
      row.className = 'logline';
      var t = Date.parse(l.time);
      var when = isNaN(t) ? '' : new Date(t).toLocaleTimeString([], { hour12: false });
      var stream = (l.region ? l.region + '/' : '') + (l.stream || '');
      var time = span('lt', when);
      if (!isNaN(t)) time.title = new Date(t).toISOString();
      row.appendChild(time);
      row.appendChild(span('ls s-' + (l.stream || ''), stream));
      row.appendChild(span('ll', l.line || ''));
      row.dataset.text = (stream + ' ' + (l.line || '')).toLowerCase();
      row.hidden = !shows(row);
      box.appendChild(row);
      count++;
    }
    filter.addEventListener('input', refilter);
    follow.addEventListener('change', scroll);
    status.textContent = 'Following…';
    fetch(box.dataset.log, { headers: { 'Accept': 'application/x-ndjson' }, cache: 'no-store', credentials: 'same-origin', redirect: 'error' })
      .then(function (r) {
        if (r.status === 401) { status.textContent = 'Your session has ended. Sign in again.'; return null; }
        if (!r.ok || !r.body) { status.textContent = 'The log cannot be read (' + r.status + ').'; return null; }
        var reader = r.body.getReader(), dec = new TextDecoder(), buf = '';
        function lines(final) {
          var i, any = false;
          while ((i = buf.indexOf('\n')) >= 0 || (final && buf)) {
            var text = i >= 0 ? buf.slice(0, i) : buf;
            buf = i >= 0 ? buf.slice(i + 1) : '';
            if (!text) continue;
            try { add(JSON.parse(text)); any = true; } catch (e) { /* a torn line: skip */ }
          }
          if (any) scroll();
        }
        function pump() {
          return reader.read().then(function (res) {
            if (res.done) {
              buf += dec.decode();
              lines(true);
              status.textContent = 'The log ended (' + count + (count === 1 ? ' line' : ' lines') + ').';
              box.dataset.ended = '1';
              return null;
            }
            buf += dec.decode(res.value, { stream: true });
            lines(false);
            return pump();
          });
        }
        return pump();
      })
      .catch(function () { status.textContent = 'The log stream broke off. Reload to follow it again.'; });
  }

  function start() {
    refreshAges(document);
    enableCopy(document);
    setInterval(function () { refreshAges(document); }, 10000);
    var section = document.querySelector('[data-poll]');
    if (section && window.fetch) live(section);
    var log = document.querySelector('[data-log]');
    if (log && window.fetch && window.ReadableStream && window.TextDecoder) logs(log);
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
