// Interactive API reference: Swagger UI (served from this site by drf-spectacular-sidecar) on the API's OpenAPI document.
(function () {
  "use strict";
  var host = document.getElementById("swagger-ui");
  if (!host || typeof window.SwaggerUIBundle !== "function") { return; }
  host.innerHTML = "";
  window.SwaggerUIBundle({
    url: host.getAttribute("data-spec-url"),
    domNode: host,
    deepLinking: true,
    docExpansion: "list",
    defaultModelsExpandDepth: 0,
    tryItOutEnabled: false,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
})();
