//! Detection: score threshold, class-aware non-maximum suppression, and boxes mapped back to
//! the original image.

use serde::Serialize;

use super::label_for;
use crate::image::Geometry;

/// A box in model-input pixels, before suppression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
    pub class: usize,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct BoundingBox {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Detection {
    pub index: usize,
    pub label: String,
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
}

fn area(c: &Candidate) -> f32 {
    (c.x2 - c.x1).max(0.0) * (c.y2 - c.y1).max(0.0)
}

pub fn iou(a: &Candidate, b: &Candidate) -> f32 {
    let w = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let h = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Class-aware NMS: boxes of different classes never suppress each other. A box is dropped
/// when its IoU with a kept, higher-scoring box of its class is above `iou_threshold`
/// (torchvision's `batched_nms` rule). Returns at most `max_detections`, best first.
pub fn non_max_suppression(
    candidates: Vec<Candidate>,
    iou_threshold: f32,
    max_detections: usize,
) -> Vec<Candidate> {
    nms_indices(&candidates, iou_threshold, max_detections).into_iter().map(|i| candidates[i]).collect()
}

/// [`non_max_suppression`] as positions into `candidates`, best first, for callers whose
/// boxes carry more than a box (instance masks).
pub fn nms_indices(candidates: &[Candidate], iou_threshold: f32, max_detections: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Stable: equal scores keep their order, as the sort of the candidates themselves did.
    order.sort_by(|&a, &b| candidates[b].score.total_cmp(&candidates[a].score));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept.len() >= max_detections {
            break;
        }
        let candidate = &candidates[i];
        let suppressed = kept
            .iter()
            .any(|&k| candidates[k].class == candidate.class && iou(&candidates[k], candidate) > iou_threshold);
        if !suppressed {
            kept.push(i);
        }
    }
    kept
}

/// Maps kept boxes from model-input pixels to the original image and attaches labels.
pub fn to_detections(kept: &[Candidate], geometry: &Geometry, labels: &[String]) -> Vec<Detection> {
    kept.iter()
        .map(|c| {
            let (x1, y1) = geometry.to_original(c.x1, c.y1);
            let (x2, y2) = geometry.to_original(c.x2, c.y2);
            Detection {
                index: c.class,
                label: label_for(labels, c.class),
                score: c.score,
                bbox: BoundingBox { x1, y1, x2, y2 },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(x1: f32, y1: f32, x2: f32, y2: f32, score: f32, class: usize) -> Candidate {
        Candidate { x1, y1, x2, y2, score, class }
    }

    #[test]
    fn iou_of_identical_disjoint_and_half_overlapping_boxes() {
        let a = cand(0.0, 0.0, 10.0, 10.0, 1.0, 0);
        assert_eq!(iou(&a, &a), 1.0);
        assert_eq!(iou(&a, &cand(20.0, 20.0, 30.0, 30.0, 1.0, 0)), 0.0);
        let half = iou(&a, &cand(5.0, 0.0, 15.0, 10.0, 1.0, 0));
        assert!((half - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn suppresses_overlaps_within_a_class_only() {
        let boxes = vec![
            cand(0.0, 0.0, 10.0, 10.0, 0.9, 1),
            cand(1.0, 1.0, 10.0, 10.0, 0.8, 1), // overlaps the first, same class: dropped
            cand(1.0, 1.0, 10.0, 10.0, 0.7, 2), // same place, other class: kept
            cand(50.0, 50.0, 60.0, 60.0, 0.6, 1),
        ];
        let kept = non_max_suppression(boxes, 0.45, 100);
        let scores: Vec<f32> = kept.iter().map(|c| c.score).collect();
        assert_eq!(scores, [0.9, 0.7, 0.6]);
    }

    #[test]
    fn caps_at_max_detections_best_first() {
        let boxes = (0..10).map(|i| cand(i as f32 * 20.0, 0.0, i as f32 * 20.0 + 10.0, 10.0, i as f32 / 10.0, 0)).collect();
        let kept = non_max_suppression(boxes, 0.5, 3);
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].score, 0.9);
    }

    #[test]
    fn maps_boxes_back_through_a_letterbox() {
        // 200×100 letterboxed into 100×100: scale 0.5, 25 px of padding on top.
        let g = Geometry {
            original_width: 200,
            original_height: 100,
            input_width: 100,
            input_height: 100,
            scale_x: 0.5,
            scale_y: 0.5,
            offset_x: 0.0,
            offset_y: 25.0,
        };
        let d = to_detections(&[cand(10.0, 25.0, 60.0, 75.0, 0.5, 0)], &g, &["thing".into()]);
        assert_eq!(d[0].label, "thing");
        assert_eq!(d[0].bbox, BoundingBox { x1: 20.0, y1: 0.0, x2: 120.0, y2: 100.0 });
    }
}
