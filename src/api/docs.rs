//! The API contract and its interactive page: `GET /openapi.yaml` (the repository's
//! `openapi.yaml`, compiled in) and `GET /docs` (Swagger UI, its script and style sheet
//! embedded too, so the page works without reaching any CDN).

use axum::extract::Path;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::error::ApiError;

pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");
/// The same document as JSON (`make openapi-json` writes it; a test keeps the two equal), for
/// TorchServe's API description, which its clients read as JSON.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");
const BUNDLE_JS: &str = include_str!("../../assets/swagger-ui/swagger-ui-bundle.js");
const STYLE_CSS: &str = include_str!("../../assets/swagger-ui/swagger-ui.css");

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>visionserve API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>
  window.ui = SwaggerUIBundle({
    url: "/openapi.yaml",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    tryItOutEnabled: false,
  });
</script>
</body>
</html>
"##;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.yaml", get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML) }))
        .route("/docs", get(|| async { Html(PAGE) }))
        .route("/docs/{asset}", get(asset))
}

async fn asset(Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let (content_type, body) = match name.as_str() {
        "swagger-ui-bundle.js" => ("text/javascript", BUNDLE_JS),
        "swagger-ui.css" => ("text/css", STYLE_CSS),
        _ => return Err(ApiError::NotFound(format!("no documentation asset named '{name}'"))),
    };
    Ok(([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=86400")], body))
}
