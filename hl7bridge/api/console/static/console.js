// hl7bridge console: times in the viewer's zone and keyboard shortcuts. No inline scripts (CSP), no build step.
"use strict";
(function () {
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23", timeZoneName: "short",
  });

  function localTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (el) {
      var moment = new Date(el.getAttribute("datetime"));
      if (isNaN(moment.getTime())) return;
      el.title = el.textContent;
      el.textContent = format.format(moment);
    });
  }

  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable);
  }

  var pages = { d: "/", m: "/messages", l: "/dead-letters", a: "/audit", c: "/config-diff", u: "/users", s: "/settings" };
  var pendingG = 0;
  var row = -1;

  function rows() {
    return Array.prototype.slice.call(document.querySelectorAll("table.rows tbody tr"));
  }

  function moveRow(step) {
    var all = rows();
    if (!all.length) return;
    if (row >= 0 && all[row]) all[row].classList.remove("current");
    row = Math.max(0, Math.min(all.length - 1, row + step));
    all[row].classList.add("current");
    all[row].scrollIntoView({ block: "nearest" });
  }

  function openRow() {
    var current = rows()[row];
    var link = current && current.querySelector("a[href]");
    if (link) window.location.href = link.getAttribute("href");
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    var help = document.getElementById("shortcuts");
    if (event.key === "?") {
      if (help && !help.open) help.showModal();
      event.preventDefault();
      return;
    }
    if (help && help.open) return;
    if (pendingG && Date.now() - pendingG < 1500 && pages[event.key]) {
      pendingG = 0;
      window.location.href = pages[event.key];
      event.preventDefault();
      return;
    }
    pendingG = 0;
    if (event.key === "g") {
      pendingG = Date.now();
    } else if (event.key === "/") {
      var field = document.querySelector("[data-search]") || document.querySelector("main form input:not([type=hidden])");
      if (field) {
        field.focus();
        event.preventDefault();
      }
    } else if (event.key === "j") {
      moveRow(1);
    } else if (event.key === "k") {
      moveRow(-1);
    } else if (event.key === "Enter" && row >= 0) {
      openRow();
    }
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", localTimes);
  } else {
    localTimes();
  }
})();
