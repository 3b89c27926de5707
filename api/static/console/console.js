// Live progress of a batch page: reads the batch's event stream (the console's copy of
// GET /v1/batches/{id}/events, authenticated by the console's cookie) and updates the bar and
// the counts. Without it the page shows the counts as they were at load.
"use strict";
(function () {
  const box = document.getElementById("progress");
  if (!box || !window.EventSource) return;
  const total = Number(box.dataset.total);
  const ENDED = ["succeeded", "failed", "cancelled"];
  const bar = box.querySelector('[data-role="bar"]');
  const endedText = box.querySelector('[data-role="ended"]');
  const status = box.querySelector('[data-role="status"]');
  const live = box.querySelector('[data-role="live"]');
  const stale = box.querySelector('[data-role="stale"]');
  const atLoad = Number(bar.value);
  let seen = 0;

  function show(batch) {
    seen += 1;
    box.dataset.eventsSeen = String(seen);
    const ended = ENDED.reduce((n, s) => n + (batch.counts[s] || 0), 0);
    bar.value = ended;
    endedText.textContent = String(ended);
    for (const [name, n] of Object.entries(batch.counts)) {
      const cell = box.querySelector('[data-count="' + name + '"]');
      if (cell) cell.textContent = String(n);
    }
    status.textContent = batch.status;
    status.className = "pill " + batch.status;
    bar.className = "bar status-" + batch.status;
    if (ended !== atLoad && stale) stale.hidden = false;
    box.dataset.maxSeen = String(Math.max(Number(box.dataset.maxSeen || 0), ended));
    if (!box.dataset.firstSeen) box.dataset.firstSeen = String(ended);
  }

  if (atLoad >= total) return; // ended before the page loaded: nothing will move

  const source = new EventSource(box.dataset.events);
  source.onopen = function () { live.hidden = false; };
  source.addEventListener("batch.progress", function (e) { show(JSON.parse(e.data)); });
  source.addEventListener("batch.completed", function (e) {
    show(JSON.parse(e.data));
    box.dataset.completed = "true";
    live.hidden = true;
    source.close();
  });
  // The browser reconnects by itself (with Last-Event-ID); meanwhile the page is not live.
  source.onerror = function () { live.hidden = true; };
})();
