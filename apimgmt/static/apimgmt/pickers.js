// Admin add forms: choosing the tenant (or, for a subscription, the API) reloads the form with it in the URL, so
// the policy and plan pickers below offer only that tenant's rows (and only the plans that API offers).
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("select[data-reload-with]").forEach(function (select) {
    select.addEventListener("change", function () {
      var url = new URL(window.location.href);
      // Keep what was already chosen in the form's other drop-downs (the admin reads them as initial values).
      select.form.querySelectorAll("select[name]").forEach(function (other) {
        if (other.value && !other.multiple) url.searchParams.set(other.name, other.value);
      });
      url.searchParams.set(select.dataset.reloadWith, select.value);
      window.location.assign(url.toString());
    });
  });
});
