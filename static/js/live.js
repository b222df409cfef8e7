// Live updates: the websocket brings hints (event ids); a gap or a reconnect means a page
// re-fetches its fragments, so a lost message never leaves a stale screen.
(function () {
  var lastEventId = null;
  function setStatus(ok) {
    var el = document.getElementById("live-status");
    if (el) { el.classList.toggle("on", ok); el.title = ok ? "live updates on" : "live updates off"; }
  }
  document.addEventListener("htmx:wsOpen", function () {
    setStatus(true);
    if (lastEventId !== null) { document.body.dispatchEvent(new CustomEvent("live:resync")); }
  });
  document.addEventListener("htmx:wsClose", function () { setStatus(false); });
  document.addEventListener("htmx:oobAfterSwap", function (e) {
    var target = e.detail && e.detail.target;
    if (!target || target.id !== "live-last-event") { return; }
    // The event names the element that was swapped out; read the one now in the page.
    var el = document.getElementById("live-last-event");
    if (!el || el.dataset.seen) { return; }
    el.dataset.seen = "1";  // one live:event per push, however many swap events fire
    var id = parseInt(el.dataset.eventId, 10);
    if (lastEventId !== null && id > lastEventId + 1) {
      document.body.dispatchEvent(new CustomEvent("live:resync"));
    }
    lastEventId = Math.max(lastEventId || 0, id);
    document.body.dispatchEvent(new CustomEvent("live:event", { detail: el.dataset }));
  });
})();
