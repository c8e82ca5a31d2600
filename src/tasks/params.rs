//! The parameters that decide a task's answer, their defaults and their ranges, in one place.
//! Each protocol reads them its own way — /v1 from the query string and the body, V2 from the
//! request's `parameters`, TorchServe not at all (its handlers' fixed choices) — through the
//! constructors here. A wrong type or an out-of-range value is an error naming the parameter.

use std::collections::HashMap;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::model_config::Task;
use crate::tasks::instances::InstanceMaskFormat;
use crate::tasks::segmentation::MaskFormat;
use crate::tasks::slicing::{self, MatchMetric, Merge, Slicing, TileSize};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictParams {
    pub top_k: usize,
    pub score_threshold: f32,
    pub iou_threshold: f32,
    pub max_detections: usize,
    pub mask_format: MaskFormat,
    /// Instance segmentation's `mask_format`: RLE unless asked otherwise.
    pub instance_masks: InstanceMaskFormat,
    /// Segmentation: keep each pixel's class probability (TorchServe's segmenter answer).
    pub pixel_confidence: bool,
    /// Embedding on /v1: list each image's `neighbours` most similar among the request's
    /// other images (0: none). Computed after the per-image results, so not in the cache key.
    pub neighbours: usize,
    /// Detection: cut the photo into tiles, detect on each, merge (`slice` and its companions).
    pub slicing: Option<Slicing>,
}

/// The parameters that shape slicing; every one but `slice` needs `slice`.
pub const SLICING_KEYS: [&str; 6] = ["slice", "overlap", "merge", "match", "match_threshold", "full_image"];

const TOP_K: (usize, usize) = (1, 1000);
const THRESHOLD: (f32, f32) = (0.0, 1.0);
const MAX_DETECTIONS: (usize, usize) = (1, 10_000);
const NEIGHBOURS: (usize, usize) = (1, 1000);

impl Default for PredictParams {
    fn default() -> Self {
        Self {
            top_k: 5,
            score_threshold: 0.5,
            iou_threshold: 0.45,
            max_detections: 100,
            mask_format: MaskFormat::Png,
            instance_masks: InstanceMaskFormat::Rle,
            pixel_confidence: false,
            neighbours: 0,
            slicing: None,
        }
    }
}

/// A parameter that is unknown for the task, of the wrong type, or out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

fn parse<T: FromStr>(raw: &HashMap<String, String>, key: &str) -> Result<Option<T>, ParamError> {
    match raw.get(key) {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|_| ParamError(format!("parameter '{key}' has an invalid value '{text}'"))),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, value: T, (low, high): (T, T)) -> Result<T, ParamError> {
    if value >= low && value <= high {
        Ok(value)
    } else {
        Err(ParamError(format!("parameter '{key}' must be within {low}..={high}, got {value}")))
    }
}

/// V2's reading of a range: any JSON number within it (V2 clients send integers as numbers).
fn v2_number(parameters: &Map<String, Value>, key: &str, default: f64, (low, high): (f64, f64)) -> Result<f64, ParamError> {
    match parameters.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| (low..=high).contains(x))
            .ok_or_else(|| ParamError(format!("parameter '{key}' must be a number within {low}..={high}"))),
    }
}

impl PredictParams {
    /// `raw` holds query and body parameters together (body wins). Parameters that do not
    /// apply to `task` are refused, so a typo does not pass silently.
    pub fn from_raw(raw: &HashMap<String, String>, task: Task) -> Result<Self, ParamError> {
        let allowed: &[&str] = match task {
            Task::Classification => &["top_k"],
            Task::Segmentation => &["mask_format"],
            Task::Detection => &["score_threshold", "iou_threshold", "max_detections", "slice", "overlap", "merge", "match", "match_threshold", "full_image"],
            Task::Embedding => &["neighbours"],
            Task::InstanceSegmentation => &["score_threshold", "iou_threshold", "max_detections", "mask_format", "slice", "overlap", "merge", "match", "match_threshold", "full_image"],
            Task::Keypoints | Task::OrientedDetection => &["score_threshold", "iou_threshold", "max_detections"],
        };
        if let Some(key) = raw.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ParamError(format!(
                "parameter '{key}' does not apply to {task:?} models (accepted: {})",
                allowed.join(", ")
            )));
        }
        let mut params = Self::default();
        if let Some(k) = parse::<usize>(raw, "top_k")? {
            params.top_k = in_range("top_k", k, TOP_K)?;
        }
        if let Some(t) = parse::<f32>(raw, "score_threshold")? {
            params.score_threshold = in_range("score_threshold", t, THRESHOLD)?;
        }
        if let Some(t) = parse::<f32>(raw, "iou_threshold")? {
            params.iou_threshold = in_range("iou_threshold", t, THRESHOLD)?;
        }
        if let Some(n) = parse::<usize>(raw, "max_detections")? {
            params.max_detections = in_range("max_detections", n, MAX_DETECTIONS)?;
        }
        params.slicing = slicing_from(|key| raw.get(key).cloned())?;
        if let Some(k) = parse::<usize>(raw, "neighbours")? {
            params.neighbours = in_range("neighbours", k, NEIGHBOURS)?;
        }
        if let (Some(format), Task::InstanceSegmentation) = (raw.get("mask_format"), task) {
            params.instance_masks = match format.as_str() {
                "rle" => InstanceMaskFormat::Rle,
                "polygon" => InstanceMaskFormat::Polygon,
                "png" => InstanceMaskFormat::Png,
                "none" => InstanceMaskFormat::None,
                other => {
                    return Err(ParamError(format!(
                        "parameter 'mask_format' must be rle, polygon, png or none, got '{other}'"
                    )))
                }
            };
        } else if let Some(format) = raw.get("mask_format") {
            params.mask_format = match format.as_str() {
                "png" => MaskFormat::Png,
                "rle" => MaskFormat::Rle,
                "none" => MaskFormat::None,
                other => {
                    return Err(ParamError(format!(
                        "parameter 'mask_format' must be png, rle or none, got '{other}'"
                    )))
                }
            };
        }
        Ok(params)
    }

    /// The Open Inference Protocol's request `parameters`: the detection thresholds and cap,
    /// as JSON numbers. Others are left to the protocol (and ignored by the task).
    pub fn from_v2(parameters: &Map<String, Value>) -> Result<Self, ParamError> {
        let defaults = Self::default();
        let threshold = (f64::from(THRESHOLD.0), f64::from(THRESHOLD.1));
        let max_detections = (MAX_DETECTIONS.0 as f64, MAX_DETECTIONS.1 as f64);
        Ok(Self {
            score_threshold: v2_number(parameters, "score_threshold", f64::from(defaults.score_threshold), threshold)? as f32,
            iou_threshold: v2_number(parameters, "iou_threshold", f64::from(defaults.iou_threshold), threshold)? as f32,
            max_detections: v2_number(parameters, "max_detections", defaults.max_detections as f64, max_detections)? as usize,
            slicing: slicing_from(|key| {
                parameters.get(key).map(|value| match value {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
            })?,
            ..defaults
        })
    }

    /// TorchServe's default handlers' fixed choices: the top 5 classes, every detection
    /// scoring 0.5 or more, and each pixel's class with its probability.
    pub fn torchserve() -> Self {
        Self { max_detections: usize::MAX, pixel_confidence: true, ..Self::default() }
    }
}

/// Slicing from `slice` and its companions, read as text however the protocol carried them
/// (`get` answers a parameter's value). `None` without `slice`; a companion alone is an error,
/// so `overlap=0.3` sent to a request that does not slice does not pass silently.
pub fn slicing_from(get: impl Fn(&str) -> Option<String>) -> Result<Option<Slicing>, ParamError> {
    let Some(tile) = get("slice") else {
        return match SLICING_KEYS[1..].iter().find(|key| get(key).is_some()) {
            Some(key) => Err(ParamError(format!("parameter '{key}' applies only with 'slice' (a tile size such as 512, 640x480, or auto)"))),
            None => Ok(None),
        };
    };
    let invalid = |key: &str, text: &str, expected: &str| ParamError(format!("parameter '{key}' must be {expected}, got '{text}'"));
    let (low, high) = slicing::TILE_SIDE;
    let mut slicing = Slicing {
        tile: TileSize::parse(&tile).ok_or_else(|| invalid("slice", &tile, &format!("auto, a side or WIDTHxHEIGHT within {low}..={high} pixels")))?,
        ..Slicing::default()
    };
    if let Some(text) = get("overlap") {
        let (low, high) = slicing::OVERLAP;
        slicing.overlap = text.trim().parse::<f64>().ok().filter(|v| (low..=high).contains(v)).ok_or_else(|| invalid("overlap", &text, &format!("a fraction within {low}..={high}")))?;
    }
    if let Some(text) = get("merge") {
        slicing.merge = Merge::parse(&text).ok_or_else(|| invalid("merge", &text, "nms or nmm"))?;
    }
    if let Some(text) = get("match") {
        slicing.metric = MatchMetric::parse(&text).ok_or_else(|| invalid("match", &text, "iou or ios"))?;
    }
    if let Some(text) = get("match_threshold") {
        slicing.match_threshold = text.trim().parse::<f32>().ok().filter(|v| (THRESHOLD.0..=THRESHOLD.1).contains(v)).ok_or_else(|| invalid("match_threshold", &text, "a number within 0..=1"))?;
    }
    if let Some(text) = get("full_image") {
        slicing.full_image = match text.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => return Err(invalid("full_image", &text, "true or false")),
        };
    }
    Ok(Some(slicing))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_and_overrides() {
        let p = PredictParams::from_raw(&raw(&[]), Task::Detection).unwrap();
        assert_eq!(p, PredictParams::default());
        let p = PredictParams::from_raw(&raw(&[("score_threshold", "0.2"), ("max_detections", "7")]), Task::Detection).unwrap();
        assert_eq!((p.score_threshold, p.max_detections), (0.2, 7));
    }

    #[test]
    fn rejects_bad_types_ranges_and_foreign_parameters() {
        for (pairs, task) in [
            (raw(&[("top_k", "abc")]), Task::Classification),
            (raw(&[("top_k", "0")]), Task::Classification),
            (raw(&[("top_k", "-1")]), Task::Classification),
            (raw(&[("score_threshold", "1.5")]), Task::Detection),
            (raw(&[("score_threshold", "NaN")]), Task::Detection),
            (raw(&[("mask_format", "jpeg")]), Task::Segmentation),
            (raw(&[("top_k", "3")]), Task::Detection),
            (raw(&[("neighbours", "0")]), Task::Embedding),
            (raw(&[("top_k", "3")]), Task::Embedding),
        ] {
            let err = PredictParams::from_raw(&pairs, task).unwrap_err();
            assert!(err.0.contains("parameter"), "{pairs:?}: {err:?}");
        }
    }

    #[test]
    fn v2_parameters_share_the_defaults_and_ranges() {
        let parameters = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(PredictParams::from_v2(&Map::new()).unwrap(), PredictParams::default());
        let p = PredictParams::from_v2(&parameters(serde_json::json!({"score_threshold": 0.25, "max_detections": 7}))).unwrap();
        assert_eq!((p.score_threshold, p.max_detections), (0.25, 7));
        let err = PredictParams::from_v2(&parameters(serde_json::json!({"iou_threshold": 1.5}))).unwrap_err();
        assert_eq!(err.0, "parameter 'iou_threshold' must be a number within 0..=1");
        let err = PredictParams::from_v2(&parameters(serde_json::json!({"max_detections": "5"}))).unwrap_err();
        assert_eq!(err.0, "parameter 'max_detections' must be a number within 1..=10000");
    }

    #[test]
    fn slicing_is_read_alike_from_v1_text_and_v2_json() {
        let v1 = PredictParams::from_raw(&raw(&[("slice", "512"), ("overlap", "0.25"), ("merge", "nms"), ("match", "iou"), ("full_image", "true")]), Task::Detection).unwrap();
        let json = serde_json::json!({"slice": 512, "overlap": 0.25, "merge": "nms", "match": "iou", "full_image": true});
        let v2 = PredictParams::from_v2(json.as_object().unwrap()).unwrap();
        assert_eq!(v1.slicing, v2.slicing);
        let slicing = v1.slicing.unwrap();
        assert_eq!(slicing.tile, TileSize::Fixed { width: 512, height: 512 });
        assert_eq!((slicing.overlap, slicing.merge, slicing.metric, slicing.full_image), (0.25, Merge::Nms, MatchMetric::Iou, true));
        let auto = PredictParams::from_raw(&raw(&[("slice", "auto")]), Task::Detection).unwrap().slicing.unwrap();
        assert_eq!(auto, Slicing::default());
        assert_eq!(PredictParams::from_raw(&raw(&[]), Task::Detection).unwrap().slicing, None);
    }

    #[test]
    fn slicing_refuses_bad_values_and_companions_without_slice() {
        for pairs in [
            raw(&[("slice", "8")]),
            raw(&[("slice", "huge")]),
            raw(&[("slice", "512"), ("overlap", "0.95")]),
            raw(&[("slice", "512"), ("merge", "wbf")]),
            raw(&[("slice", "512"), ("match", "giou")]),
            raw(&[("slice", "512"), ("match_threshold", "2")]),
            raw(&[("slice", "512"), ("full_image", "maybe")]),
            raw(&[("overlap", "0.2")]),
        ] {
            let err = PredictParams::from_raw(&pairs, Task::Detection).unwrap_err();
            assert!(err.0.starts_with("parameter '"), "{pairs:?}: {err:?}");
        }
        let err = PredictParams::from_raw(&raw(&[("slice", "512")]), Task::Classification).unwrap_err();
        assert!(err.0.contains("does not apply"), "{err:?}");
    }
}
