// Copy buttons: <button data-copy-target="input-id">. The key stays in the page only; nothing is sent anywhere.
(function () {
  "use strict";
  document.querySelectorAll("[data-copy-target]").forEach(function (button) {
    button.addEventListener("click", function () {
      var input = document.getElementById(button.getAttribute("data-copy-target"));
      var status = document.getElementById("copy-status");
      if (!input) { return; }
      input.select();
      var done = function () {
        button.textContent = "Copied";
        if (status) { status.textContent = "Copied to the clipboard."; }
        setTimeout(function () { button.textContent = "Copy"; }, 2000);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(done, function () {
          if (status) { status.textContent = "Press Ctrl+C (⌘C) to copy the selected key."; }
        });
      } else {
        try { document.execCommand("copy"); done(); }
        catch (e) { if (status) { status.textContent = "Press Ctrl+C (⌘C) to copy the selected key."; } }
      }
    });
  });
})();
