// Starts Swagger UI on /docs from a file, not an inline script, so the page runs under the node's CSP
// (script-src 'self'). validatorUrl null: Swagger UI would otherwise send the spec to an online validator.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
});
