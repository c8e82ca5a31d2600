//! Predict parameters: read from the query string and the body, typed and range-checked once.
//! A wrong type or an out-of-range value is a 422 naming the parameter.

use std::collections::HashMap;
use std::str::FromStr;

use crate::error::ApiError;
use crate::repository::config::Task;
use crate::tasks::segmentation::MaskFormat;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictParams {
    pub top_k: usize,
    pub score_threshold: f32,
    pub iou_threshold: f32,
    pub max_detections: usize,
    pub mask_format: MaskFormat,
}

impl Default for PredictParams {
    fn default() -> Self {
        Self { top_k: 5, score_threshold: 0.5, iou_threshold: 0.45, max_detections: 100, mask_format: MaskFormat::Png }
    }
}

fn parse<T: FromStr>(raw: &HashMap<String, String>, key: &str) -> Result<Option<T>, ApiError> {
    match raw.get(key) {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|_| ApiError::InvalidParameter(format!("parameter '{key}' has an invalid value '{text}'"))),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, value: T, low: T, high: T) -> Result<T, ApiError> {
    if value >= low && value <= high {
        Ok(value)
    } else {
        Err(ApiError::InvalidParameter(format!("parameter '{key}' must be within {low}..={high}, got {value}")))
    }
}

impl PredictParams {
    /// `raw` holds query and body parameters together (body wins). Parameters that do not
    /// apply to `task` are refused, so a typo does not pass silently.
    pub fn from_raw(raw: &HashMap<String, String>, task: Task) -> Result<Self, ApiError> {
        let allowed: &[&str] = match task {
            Task::Classification => &["top_k"],
            Task::Segmentation => &["mask_format"],
            Task::Detection => &["score_threshold", "iou_threshold", "max_detections"],
        };
        if let Some(key) = raw.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::InvalidParameter(format!(
                "parameter '{key}' does not apply to {task:?} models (accepted: {})",
                allowed.join(", ")
            )));
        }
        let mut params = Self::default();
        if let Some(k) = parse::<usize>(raw, "top_k")? {
            params.top_k = in_range("top_k", k, 1, 1000)?;
        }
        if let Some(t) = parse::<f32>(raw, "score_threshold")? {
            params.score_threshold = in_range("score_threshold", t, 0.0, 1.0)?;
        }
        if let Some(t) = parse::<f32>(raw, "iou_threshold")? {
            params.iou_threshold = in_range("iou_threshold", t, 0.0, 1.0)?;
        }
        if let Some(n) = parse::<usize>(raw, "max_detections")? {
            params.max_detections = in_range("max_detections", n, 1, 10_000)?;
        }
        if let Some(format) = raw.get("mask_format") {
            params.mask_format = match format.as_str() {
                "png" => MaskFormat::Png,
                "rle" => MaskFormat::Rle,
                "none" => MaskFormat::None,
                other => {
                    return Err(ApiError::InvalidParameter(format!(
                        "parameter 'mask_format' must be png, rle or none, got '{other}'"
                    )))
                }
            };
        }
        Ok(params)
    }
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
        ] {
            let err = PredictParams::from_raw(&pairs, task).unwrap_err();
            assert!(matches!(err, ApiError::InvalidParameter(_)), "{pairs:?}: {err:?}");
        }
    }
}
