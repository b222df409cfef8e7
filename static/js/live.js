// Live updates: the websocket brings hints (event ids); a gap or a reconnect means a page
// re-fetches its fragments, so a lost message never leaves a stale screen.
(function () {
  var lastEventId = null;
  function setStatus(ok) {
    var el = document.getElementById("live-status");
    if (!el) { return; }
    el.classList.toggle("on", ok);
    el.title = ok ? "live updates on" : "live updates off";
    var said = el.querySelector(".sr-only");  // read out by screen readers (role=status)
    if (said && said.textContent !== el.title) { said.textContent = el.title; }
  }
  document.addEventListener("htmx:wsOpen", function () {
    setStatus(true);
    if (lastEventId !== null) { document.body.dispatchEvent(new CustomEvent("live:resync")); }
  });
  document.addEventListener("htmx:wsClose", function () { setStatus(false); });
  // Inside [data-swap-errors="400 409"], answers with those statuses are swapped in like a
  // success: they carry the reason (a stale decision, a refused role), not a broken page.
  // (Here and not in hx-on attributes: the CSP allows no inline script and htmx no eval.)
  document.addEventListener("htmx:beforeSwap", function (e) {
    var holder = e.target && e.target.closest && e.target.closest("[data-swap-errors]");
    if (!holder) { return; }
    var statuses = holder.dataset.swapErrors.split(/\s+/);
    if (statuses.indexOf(String(e.detail.xhr.status)) >= 0) {
      e.detail.shouldSwap = true;
      e.detail.isError = false;
    }
  });
  // Live refreshes (elements triggered by live:event, live:resync, htmx:wsOpen) are skipped
  // while the user is busy (data-pause-while: a selector, e.g. an open edit form) and, with
  // data-live-subject, for pushes about other subjects. Here rather than in hx-trigger
  // filters, which htmx would have to eval.
  document.addEventListener("htmx:confirm", function (e) {
    var elt = e.detail.elt;
    if (!elt || !elt.dataset) { return; }
    var pause = elt.dataset.pauseWhile;
    if (pause && document.querySelector(pause)) { e.preventDefault(); return; }
    var subject = elt.dataset.liveSubject;
    var trigger = e.detail.triggeringEvent;
    if (subject && trigger && trigger.type === "live:event" && trigger.detail && trigger.detail.subject !== subject) {
      e.preventDefault();
      return;
    }
    if (isLiveRefresh(trigger, elt) && answerAwaitedIn(e.detail.target, elt)) { e.preventDefault(); refreshOwed = true; }
  });
  // A request of something inside a live refresh's target (a card's decision or edit) pins
  // it until its answer is in: a refresh is not sent meanwhile, and one already sent is not
  // swapped in when it comes back. Swapped in, it would replace that card, and the card's
  // answer would go to a card no longer on screen: the user would see nothing happen. The
  // refresh is sent again once the answer is in.
  var refreshOwed = false;
  function isLiveRefresh(trigger, elt) {
    if (trigger) { return /^(live:event|live:resync|htmx:wsOpen)$/.test(trigger.type); }
    // A timed refresh (hx-trigger "every 2s": the ownership board, the overview) has no event.
    return !!elt && elt.getAttribute && /\bevery\b/.test(elt.getAttribute("hx-trigger") || "");
  }
  function answerAwaitedIn(target, refresher) {
    if (!target || !target.querySelectorAll) { return false; }
    if (pressedIn(target)) { return true; }
    return Array.prototype.some.call(target.querySelectorAll(".htmx-request"), function (el) { return el !== refresher; });
  }
  // A press (mouse, pen, touch, or Space on a button) inside the target pins it the same way until it is released:
  // swapped in between the press and its release, the refresh would replace the button being
  // pressed, and the browser fires no click for a button no longer on the page. The operator's
  // Approve would be lost without a word. A press held for more than 10 s pins nothing.
  var press = null;
  function pressing() { return !!press && Date.now() - press.at < 10000; }
  function pressedIn(target) { return pressing() && target.contains(press.on); }
  function pressed(on) {
    press = { on: on, at: Date.now() };
    setTimeout(refreshIfOwed, 10000);  // a release that never came (a menu took it) holds no longer
  }
  document.addEventListener("pointerdown", function (e) {
    if (e.button === 0) { pressed(e.target); }  // a press that clicks: a mouse's main button, a touch, a pen
  }, true);
  function released() {
    if (!press) { return; }
    press = null;
    // After the release's click has sent its own request (if any): the refresh waits for it.
    setTimeout(refreshIfOwed, 0);
  }
  document.addEventListener("pointerup", released, true);
  document.addEventListener("pointercancel", released, true);
  window.addEventListener("blur", released);
  // The Space key clicks a button as it comes up (Enter at once, as it goes down): a refresh in
  // between would take that click too.
  document.addEventListener("keydown", function (e) {
    if (e.key === " " && !e.repeat && e.target.closest && e.target.closest("button")) { pressed(e.target); }
  }, true);
  document.addEventListener("keyup", function (e) { if (e.key === " ") { released(); } }, true);
  document.addEventListener("htmx:beforeSwap", function (e) {
    var config = e.detail.requestConfig;
    if (config && isLiveRefresh(config.triggeringEvent, config.elt) && answerAwaitedIn(e.detail.target, config.elt)) {
      e.detail.shouldSwap = false;
      refreshOwed = true;
    }
  });
  function refreshIfOwed() {
    if (refreshOwed && !pressing() && !document.querySelector(".htmx-request")) {
      refreshOwed = false;
      document.body.dispatchEvent(new CustomEvent("live:resync"));
    }
  }
  document.addEventListener("htmx:afterRequest", refreshIfOwed);
  // An answer whose handling failed leaves htmx's request class on its element: it would hold
  // every later refresh of its list back. Taken off here.
  document.addEventListener("htmx:onLoadError", function (e) {
    var elt = e.detail && e.detail.elt;
    if (elt && elt.classList) { elt.classList.remove("htmx-request"); }
  });
  // Moments are sent in UTC (<time datetime>); show them in the reader's timezone, with how
  // long ago for recent ones, and keep UTC in the tooltip. Re-run after every swap.
  function ago(seconds) {
    if (seconds < 60) { return Math.max(0, Math.round(seconds)) + " s ago"; }
    if (seconds < 3600) { return Math.round(seconds / 60) + " min ago"; }
    return Math.round(seconds / 3600) + " h ago";
  }
  function localize(root) {
    (root || document).querySelectorAll("time[datetime]:not([data-expires]):not([data-localized])").forEach(function (el) {
      var moment = new Date(el.getAttribute("datetime"));
      if (isNaN(moment.getTime())) { return; }
      // A date carries its month by name: 12/02/2026 reads as December or February by locale.
      var timeOnly = el.dataset.local === "time" || (!el.dataset.local && el.textContent.indexOf("-") < 0);
      // The year only where it is not this one: a table of runs then fits a laptop's width.
      var year = moment.getFullYear() === new Date().getFullYear() ? undefined : "numeric";
      var text = timeOnly
        ? moment.toLocaleTimeString([], { hour12: false })
        : moment.toLocaleString([], { year: year, month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
      var seconds = (Date.now() - moment.getTime()) / 1000;
      if (!timeOnly && seconds >= 0 && seconds < 86400) { text += " · " + ago(seconds); }
      el.title = el.getAttribute("datetime") + " (UTC " + el.textContent.trim() + ")";
      el.textContent = text;
      el.dataset.localized = timeOnly ? "time" : "1";
      if (!timeOnly) { el.dataset.absolute = text.split(" · ")[0]; }
    });
  }
  // "· 3 min ago" keeps counting while the page stays open.
  setInterval(function () {
    document.querySelectorAll("time[data-localized='1'][data-absolute]").forEach(function (el) {
      var seconds = (Date.now() - new Date(el.getAttribute("datetime")).getTime()) / 1000;
      el.textContent = el.dataset.absolute + (seconds >= 0 && seconds < 86400 ? " · " + ago(seconds) : "");
    });
    reachableScrolling(document);  // longer texts may have made a table wider than its frame
  }, 15000);
  // A table wider than the screen scrolls inside its frame; give that frame a name and a
  // place in the Tab order so it can be scrolled from the keyboard too.
  // The nearest heading before an element (its section's, else the page's): a frame's name.
  function headingBefore(el) {
    for (var node = el; node && node !== document.body; node = node.parentElement) {
      for (var prev = node.previousElementSibling; prev; prev = prev.previousElementSibling) {
        if (/^H[1-6]$/.test(prev.tagName)) { return prev.textContent.trim(); }
        var inner = prev.querySelectorAll("h1, h2, h3");
        if (inner.length) { return inner[inner.length - 1].textContent.trim(); }
      }
    }
    return "table";
  }
  function reachableScrolling(root) {
    (root || document).querySelectorAll(".table-wrap").forEach(function (el) {
      if (el.scrollWidth > el.clientWidth + 1) {
        if (!el.hasAttribute("tabindex")) {
          el.setAttribute("tabindex", "0");
          el.setAttribute("role", "region");
          el.setAttribute("aria-label", headingBefore(el) + " (scrolls sideways)");
        }
      } else if (el.getAttribute("role") === "region") {
        el.removeAttribute("tabindex"); el.removeAttribute("role"); el.removeAttribute("aria-label");
      }
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localize(document); reachableScrolling(document); });
  // A live refresh replaces the fragment a keyboard user may be scrolling: keep their place.
  // Refreshes can overlap (a decision and the step it resumes push events a few ms apart): a
  // swap that starts while an earlier one has not settled finds the focus already gone, so the
  // place kept is held until the last swap in flight has settled (or for 2 s at most).
  var keptFrame = null, swapsInFlight = 0;
  document.addEventListener("htmx:beforeSwap", function (e) {
    if (!e.detail.shouldSwap) { return; }  // nothing will settle
    var active = document.activeElement;
    if (keptFrame && Date.now() - keptFrame.at > 2000) { keptFrame = null; swapsInFlight = 0; }
    swapsInFlight += 1;
    if (active && active.classList && active.classList.contains("table-wrap")) {
      keptFrame = { index: Array.prototype.indexOf.call(document.querySelectorAll(".table-wrap"), active), left: active.scrollLeft, at: Date.now() };
    }
  });
  document.addEventListener("htmx:afterSettle", function () {
    localize(document);
    reachableScrolling(document);
    swapsInFlight = Math.max(0, swapsInFlight - 1);
    if (keptFrame && !(document.activeElement && document.activeElement.classList.contains("table-wrap"))) {
      var frame = document.querySelectorAll(".table-wrap")[keptFrame.index];
      if (frame && frame.tabIndex >= 0) { frame.scrollLeft = keptFrame.left; frame.focus({ preventScroll: true }); }
    }
    if (swapsInFlight === 0) { keptFrame = null; }
  });
  // A card's notice (what the user's own action did: "Saved version 2 …") outlives a live
  // refresh of its list, which re-renders every card without one: it stays until the card's
  // next answer brings a notice of its own.
  var keptNotices = {};
  document.addEventListener("htmx:beforeSwap", function (e) {
    var target = e.detail.target;
    if (!e.detail.shouldSwap || !target || !target.querySelectorAll) { return; }
    target.querySelectorAll(".card[id] > p.notice").forEach(function (notice) {
      keptNotices[notice.parentElement.id] = notice.cloneNode(true);
    });
  });
  document.addEventListener("htmx:afterSwap", function () {
    Object.keys(keptNotices).forEach(function (id) {
      var card = document.getElementById(id);
      var head = card && card.querySelector(":scope > header");
      if (card && head && !card.querySelector(":scope > p.notice")) { head.after(keptNotices[id]); }
    });
    keptNotices = {};
  });
  document.addEventListener("htmx:oobAfterSwap", function () { localize(document); });
  window.addEventListener("resize", function () { reachableScrolling(document); });

  // Expiry counts down in the browser between refreshes ([data-expires]: a Unix time).
  setInterval(function () {
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-expires]").forEach(function (el) {
      var left = Math.round(parseFloat(el.dataset.expires) - now);
      el.textContent = left >= 0 ? "in " + left + " s" : -left + " s ago";
      el.classList.toggle("expiring", left <= 5);
    });
  }, 1000);
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
