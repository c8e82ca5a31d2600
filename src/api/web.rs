//! The web page for trying models, and its bundled sample photos. Everything is embedded in
//! the binary: the page works offline and needs no CDN.

use axum::extract::Path;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::error::ApiError;

const INDEX: &str = include_str!("../../assets/web/index.html");

/// (file name, content type, bytes, what it shows)
const SAMPLES: [(&str, &str, &[u8], &str); 4] = [
    ("chelsea.jpg", "image/jpeg", include_bytes!("../../assets/samples/chelsea.jpg"), "a cat"),
    ("coffee.jpg", "image/jpeg", include_bytes!("../../assets/samples/coffee.jpg"), "a cup of coffee"),
    ("astronaut.jpg", "image/jpeg", include_bytes!("../../assets/samples/astronaut.jpg"), "an astronaut"),
    ("page.png", "image/png", include_bytes!("../../assets/samples/page.png"), "a printed page"),
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/samples", get(list_samples))
        .route("/samples/{name}", get(sample))
}

/// The page to a browser; to an API client (no `text/html` in `Accept`), KServe V1's liveness,
/// `{"status": "alive"}`, which KServe's SDK asks `/` for.
async fn index(headers: HeaderMap) -> Response {
    let wants_html = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    if wants_html { Html(INDEX).into_response() } else { Json(json!({"status": "alive"})).into_response() }
}

async fn list_samples() -> impl IntoResponse {
    Json(json!({
        "samples": SAMPLES.iter().map(|(name, _, _, what)| json!({"name": name, "url": format!("/samples/{name}"), "shows": what})).collect::<Vec<_>>()
    }))
}

async fn sample(Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let (_, content_type, bytes, _) = SAMPLES
        .iter()
        .find(|(n, ..)| *n == name)
        .ok_or_else(|| ApiError::NotFound(format!("no sample named '{name}'")))?;
    Ok(([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "public, max-age=86400")], *bytes))
}
