// The admin's policy add form: only the typed fields of the chosen policy type show (without JavaScript, all do).
document.addEventListener("DOMContentLoaded", function () {
  var select = document.querySelector("select[name=policy_type]");
  var sets = document.querySelectorAll("fieldset.policy-type-fields");
  if (!select || !sets.length) return;
  function show() {
    sets.forEach(function (set) {
      set.hidden = Boolean(select.value) && !set.classList.contains("policy-type-" + select.value);
    });
  }
  select.addEventListener("change", show);
  show();
});
