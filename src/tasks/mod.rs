//! What each task makes of a model's output, in plain Rust: top-k, NMS, masks and their
//! encodings, results mapped back to the original image. Nothing here touches a tensor, so all
//! of it is unit-tested without libtorch.

pub mod classification;
pub mod detection;
pub mod segmentation;

use serde::Serialize;

pub use classification::Prediction;
pub use detection::Detection;
pub use segmentation::SegmentationResult;

/// One image's answer, in the `/v1` result shape.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TaskResult {
    Classification { predictions: Vec<Prediction> },
    Segmentation(SegmentationResult),
    Detection { detections: Vec<Detection> },
}

/// Label of class `index`, or its number when the model ships no labels for it.
pub fn label_for(labels: &[String], index: usize) -> String {
    labels.get(index).cloned().unwrap_or_else(|| index.to_string())
}
