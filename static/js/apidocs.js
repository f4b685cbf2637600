// The catalog's reference page: Swagger UI on the portal's copy of the API's OpenAPI
// document (its `servers` point at the gateway). "Try it" adds the key the user typed, and
// the version header or query parameter, to each request; nothing is stored anywhere.
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  if (!root || typeof SwaggerUIBundle === "undefined") return;
  var d = root.dataset;
  var tryIt = d.tryIt === "1";
  SwaggerUIBundle({
    url: d.specUrl,
    domNode: root,
    deepLinking: false,
    persistAuthorization: false,
    tryItOutEnabled: false,
    supportedSubmitMethods: tryIt ? ["get", "put", "post", "delete", "options", "head", "patch"] : [],
    validatorUrl: null,
    requestInterceptor: function (req) {
      if (!tryIt || req.loadSpec) return req;
      var key = document.getElementById("try-key").value.trim();
      if (key) req.headers[d.keyHeader] = key;
      if (d.version && d.versionHeader) req.headers[d.versionHeader] = d.version;
      if (d.version && d.versionQuery) {
        var url = new URL(req.url);
        url.searchParams.set(d.versionQuery, d.version);
        req.url = url.toString();
      }
      return req;
    },
  });
})();
