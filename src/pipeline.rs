//! A pipeline: a model folder with a `pipeline.toml` instead of a model file. Its first step is
//! a detector; its second, a classifier run on a crop of every detection it keeps. Both are
//! models of the same repository, served as they always are (their own preprocessing, queue,
//! batching and admission); the pipeline only names them and says which detections to crop.
//!
//! ```toml
//! description = "COCO animals and objects, with ImageNet's finer labels"
//! [detect]
//! model = "ssd_mobilenet_v2_coco"  # a detector of this repository
//! version = "2"                    # optional: its default version otherwise
//! min_score = 0.5                  # detections kept: at least this score …
//! classes = ["cat", "dog"]         # … of these classes (all when empty)
//! max_crops = 10                   # at most this many per image, best first
//! slice = "auto"                   # optional: sliced detection, with the request parameters'
//! overlap = 0.2                    # companions (merge, match, match_threshold, full_image)
//! [classify]
//! model = "mobilenet_v2"           # a classifier of this repository
//! margin = 0.1                     # each crop is the box grown by this share of its size per side
//! top_k = 5                        # predictions per detection
//! ```
//!
//! Plain Rust and serde: which detections become which crops is decided here and unit-tested;
//! running the steps is `serve::pipeline`.

use serde::{Deserialize, Serialize};

use crate::tasks::params::slicing_from;
use crate::tasks::slicing::Slicing;
use crate::tasks::Detection;

/// The file that makes a model folder a pipeline.
pub const PIPELINE_FILE: &str = "pipeline.toml";

/// A pipeline has one version.
pub const PIPELINE_VERSION: &str = "1";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    #[serde(default)]
    pub description: Option<String>,
    pub detect: DetectStep,
    pub classify: ClassifyStep,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DetectStep {
    pub model: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default = "default_min_score")]
    pub min_score: f32,
    /// Labels of the detector's classes to keep; every class when empty.
    #[serde(default)]
    pub classes: Vec<String>,
    #[serde(default = "default_max_crops")]
    pub max_crops: usize,
    /// Sliced detection, as a request's `slice` and its companions say it (a side, `WxH` or
    /// `"auto"`); read into [`DetectStep::slicing`] when the file is parsed.
    #[serde(default)]
    pub slice: Option<toml::Value>,
    #[serde(default)]
    pub overlap: Option<f64>,
    #[serde(default)]
    pub merge: Option<String>,
    #[serde(default, rename = "match")]
    pub match_metric: Option<String>,
    #[serde(default)]
    pub match_threshold: Option<f64>,
    #[serde(default)]
    pub full_image: Option<bool>,
    #[serde(skip)]
    pub slicing: Option<Slicing>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyStep {
    pub model: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default = "default_margin")]
    pub margin: f32,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_min_score() -> f32 {
    0.5
}

fn default_max_crops() -> usize {
    10
}

fn default_margin() -> f32 {
    0.1
}

fn default_top_k() -> usize {
    5
}

impl PipelineSpec {
    pub fn parse(text: &str) -> Result<PipelineSpec, String> {
        let mut spec: PipelineSpec = toml::from_str(text).map_err(|e| format!("bad {PIPELINE_FILE}: {e}"))?;
        let detect = &spec.detect;
        let setting = |key: &str| -> Option<String> {
            match key {
                "slice" => detect.slice.as_ref().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)),
                "overlap" => detect.overlap.map(|v| v.to_string()),
                "merge" => detect.merge.clone(),
                "match" => detect.match_metric.clone(),
                "match_threshold" => detect.match_threshold.map(|v| v.to_string()),
                "full_image" => detect.full_image.map(|v| v.to_string()),
                _ => None,
            }
        };
        spec.detect.slicing = slicing_from(setting).map_err(|e| format!("detect: {e}"))?;
        if !(0.0..=1.0).contains(&spec.detect.min_score) {
            return Err(format!("detect.min_score must be within 0..=1, got {}", spec.detect.min_score));
        }
        if !(1..=100).contains(&spec.detect.max_crops) {
            return Err(format!("detect.max_crops must be within 1..=100, got {}", spec.detect.max_crops));
        }
        if !(0.0..=1.0).contains(&spec.classify.margin) {
            return Err(format!("classify.margin must be within 0..=1, got {}", spec.classify.margin));
        }
        if !(1..=100).contains(&spec.classify.top_k) {
            return Err(format!("classify.top_k must be within 1..=100, got {}", spec.classify.top_k));
        }
        Ok(spec)
    }

    /// Whether the pipeline keeps a detection of this label (before the score and count,
    /// which the detector itself applies).
    pub fn keeps(&self, label: &str) -> bool {
        self.detect.classes.is_empty() || self.detect.classes.iter().any(|c| c == label)
    }
}

/// A crop of the decoded image, in its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The crop of one detection: its box grown by `margin` of its width and height on each
/// side, clamped to the image, in whole pixels (outward). `None` when nothing of it is in
/// the image.
pub fn crop_of(detection: &Detection, margin: f32, width: u32, height: u32) -> Option<CropRect> {
    let b = &detection.bbox;
    let (dx, dy) = ((b.x2 - b.x1).max(0.0) * margin, (b.y2 - b.y1).max(0.0) * margin);
    let x1 = (b.x1 - dx).floor().clamp(0.0, width as f32) as u32;
    let y1 = (b.y1 - dy).floor().clamp(0.0, height as f32) as u32;
    let x2 = (b.x2 + dx).ceil().clamp(0.0, width as f32) as u32;
    let y2 = (b.y2 + dy).ceil().clamp(0.0, height as f32) as u32;
    (x2 > x1 && y2 > y1).then_some(CropRect { x: x1, y: y1, width: x2 - x1, height: y2 - y1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::detection::BoundingBox;

    fn detection(label: &str, x1: f32, y1: f32, x2: f32, y2: f32) -> Detection {
        Detection { index: 0, label: label.into(), score: 0.9, bbox: BoundingBox { x1, y1, x2, y2 } }
    }

    #[test]
    fn crops_grow_by_the_margin_and_stay_inside_the_image() {
        let inside = crop_of(&detection("cat", 100.0, 50.0, 200.0, 150.0), 0.1, 640, 480).unwrap();
        assert_eq!(inside, CropRect { x: 90, y: 40, width: 120, height: 120 });
        let at_edge = crop_of(&detection("cat", 0.0, 0.0, 50.5, 479.0), 0.1, 640, 480).unwrap();
        assert_eq!(at_edge, CropRect { x: 0, y: 0, width: 56, height: 480 });
        assert_eq!(crop_of(&detection("cat", 700.0, 10.0, 800.0, 20.0), 0.0, 640, 480), None);
        assert_eq!(crop_of(&detection("cat", 10.0, 10.0, 10.0, 20.0), 0.0, 640, 480), None);
    }

    #[test]
    fn the_spec_is_checked_and_filters_classes() {
        let spec = PipelineSpec::parse(
            "[detect]\nmodel = \"ssd\"\nclasses = [\"cat\", \"dog\"]\n[classify]\nmodel = \"mobilenet\"\n",
        )
        .unwrap();
        assert!(spec.keeps("dog") && !spec.keeps("person"));
        assert_eq!((spec.detect.min_score, spec.detect.max_crops, spec.classify.top_k), (0.5, 10, 5));
        let all = PipelineSpec::parse("[detect]\nmodel = \"ssd\"\n[classify]\nmodel = \"m\"\n").unwrap();
        assert!(all.keeps("anything"));
        assert_eq!(all.detect.slicing, None);
        let sliced = PipelineSpec::parse("[detect]\nmodel = \"ssd\"\nslice = 512\nmatch = \"iou\"\n[classify]\nmodel = \"m\"\n").unwrap();
        let slicing = sliced.detect.slicing.unwrap();
        assert_eq!(slicing.tile, crate::tasks::slicing::TileSize::Fixed { width: 512, height: 512 });
        assert_eq!(slicing.metric, crate::tasks::slicing::MatchMetric::Iou);
        let auto = PipelineSpec::parse("[detect]\nmodel = \"ssd\"\nslice = \"auto\"\n[classify]\nmodel = \"m\"\n").unwrap();
        assert_eq!(auto.detect.slicing, Some(Slicing::default()));
        for bad in [
            "[detect]\nmodel = \"ssd\"\nmin_score = 2.0\n[classify]\nmodel = \"m\"\n",
            "[detect]\nmodel = \"ssd\"\nmax_crops = 0\n[classify]\nmodel = \"m\"\n",
            "[detect]\nmodel = \"ssd\"\n[classify]\nmodel = \"m\"\nmargin = -1.0\n",
            "[detect]\nmodel = \"ssd\"\n[classify]\nmodel = \"m\"\nunknown = 1\n",
            "[detect]\nmodel = \"ssd\"\n",
            "[detect]\nmodel = \"ssd\"\nslice = 8\n[classify]\nmodel = \"m\"\n",
            "[detect]\nmodel = \"ssd\"\noverlap = 0.3\n[classify]\nmodel = \"m\"\n",
        ] {
            assert!(PipelineSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
