//! The model a route names, read once for every route that names one: `{name}` alone, or with
//! `{version}` (`/versions/{version}` on /v1 and V2, `/{version}` on TorchServe's routes). One
//! handler serves both forms of a route.

use std::collections::HashMap;

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

pub struct ModelPath {
    pub name: String,
    /// `None` asks for the model's default version.
    pub version: Option<String>,
}

impl ModelPath {
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ModelPath {
    type Rejection = PathRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(mut params) = Path::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        // Every route that uses this extractor has a `{name}` segment.
        let name = params.remove("name").unwrap_or_default();
        Ok(ModelPath { name, version: params.remove("version") })
    }
}
