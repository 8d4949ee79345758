// Swagger UI over this broker's /openapi.json, served from the package (no CDN).
window.ui = SwaggerUIBundle({
  // Relative to the page, so it works wherever the broker is mounted.
  url: new URL(document.getElementById("swagger-ui").dataset.openapiUrl, window.location.href).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  // The default sends the document to an online validator for a badge: never.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
