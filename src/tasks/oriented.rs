//! Oriented (rotated) boxes, as ultralytics' `-obb` heads answer them: `(cx, cy, w, h, angle)`
//! per anchor, the angle in radians. Suppression is ultralytics' own: ProbIoU (the similarity of
//! the boxes' Gaussians, arXiv 2106.06072) as the overlap, and its predictor's fast NMS (a box
//! goes when any better box of its class overlaps it past the threshold, kept or not). Kept boxes
//! are answered as ultralytics 8.4's predictor answers them, the angle as the head made it (its
//! `-obb` heads answer [-π/4, 3π/4)), in original pixels, with their four corners and their
//! axis-aligned bound, so a client that reads only `box` still gets a box.

use serde::Serialize;

use super::detection::{BoundingBox, Detection};
use super::label_for;
use crate::image::Geometry;

/// A rotated box: centre, size and angle (radians, counter-clockwise in image axes, as
/// ultralytics' `xywhr`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RotatedBox {
    pub cx: f32,
    pub cy: f32,
    pub w: f32,
    pub h: f32,
    pub angle: f32,
}

/// A rotated box in model-input pixels, before suppression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrientedCandidate {
    pub rotated: RotatedBox,
    pub score: f32,
    pub class: usize,
}

/// One kept rotated box in original pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct OrientedDetection {
    /// Index, label, score, and the corners' axis-aligned bound as `box`.
    pub detection: Detection,
    pub rotated: RotatedBox,
}

impl RotatedBox {
    /// The corners, as ultralytics' `xywhr2xyxyxyxy` orders them.
    pub fn corners(&self) -> [[f32; 2]; 4] {
        let (sin, cos) = self.angle.sin_cos();
        let (ux, uy) = (self.w / 2.0 * cos, self.w / 2.0 * sin);
        let (vx, vy) = (-self.h / 2.0 * sin, self.h / 2.0 * cos);
        let (x, y) = (self.cx, self.cy);
        [[x + ux + vx, y + uy + vy], [x + ux - vx, y + uy - vy], [x - ux - vx, y - uy - vy], [x - ux + vx, y - uy + vy]]
    }

    /// The box's Gaussian covariance `(a, b, c)`: `[[a, c], [c, b]]`.
    fn covariance(&self) -> (f32, f32, f32) {
        let (a, b) = (self.w * self.w / 12.0, self.h * self.h / 12.0);
        let (sin, cos) = self.angle.sin_cos();
        (a * cos * cos + b * sin * sin, a * sin * sin + b * cos * cos, (a - b) * cos * sin)
    }
}

/// ProbIoU of two rotated boxes, 1 for the same box and towards 0 apart: ultralytics'
/// `batch_probiou`, in the same order of operations.
pub fn probiou(p: &RotatedBox, q: &RotatedBox) -> f32 {
    const EPS: f32 = 1e-7;
    let (a1, b1, c1) = p.covariance();
    let (a2, b2, c2) = q.covariance();
    let (a, b, c) = (a1 + a2, b1 + b2, c1 + c2);
    let (dx, dy) = (p.cx - q.cx, p.cy - q.cy);
    let det = a * b - c * c;
    let t1 = ((a * dy * dy + b * dx * dx) / (det + EPS)) * 0.25;
    let t2 = ((c * (q.cx - p.cx) * dy) / (det + EPS)) * 0.5;
    let t3 = (det / (4.0 * ((a1 * b1 - c1 * c1).max(0.0) * (a2 * b2 - c2 * c2).max(0.0)).sqrt() + EPS) + EPS).ln() * 0.5;
    let distance = (t1 + t2 + t3).clamp(EPS, 100.0);
    1.0 - (1.0 - (-distance).exp() + EPS).sqrt()
}

/// ultralytics' rotated fast NMS as positions into `candidates`, best first: a box is dropped
/// when any better-scoring box of its class, kept or not, has a ProbIoU with it above
/// `iou_threshold`; at most `max_detections`.
pub fn suppress(candidates: &[OrientedCandidate], iou_threshold: f32, max_detections: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| candidates[b].score.total_cmp(&candidates[a].score));
    let mut kept = Vec::new();
    for (rank, &j) in order.iter().enumerate() {
        if kept.len() >= max_detections {
            break;
        }
        let c = &candidates[j];
        let overlapped = order[..rank]
            .iter()
            .any(|&i| candidates[i].class == c.class && probiou(&candidates[i].rotated, &c.rotated) > iou_threshold);
        if !overlapped {
            kept.push(j);
        }
    }
    kept
}

/// Threshold, rotated NMS and the cap, then each kept box in original pixels.
/// Sizes are scaled by the geometry's horizontal and vertical scale: exact for letterboxes, an
/// approximation where a stretch scales the two axes differently.
pub fn finish_oriented(
    mut candidates: Vec<OrientedCandidate>,
    geometry: &Geometry,
    labels: &[String],
    score_threshold: f32,
    iou_threshold: f32,
    max_detections: usize,
) -> Vec<OrientedDetection> {
    candidates.retain(|c| c.score >= score_threshold);
    suppress(&candidates, iou_threshold, max_detections)
        .into_iter()
        .map(|i| {
            let c = candidates[i];
            let r = c.rotated;
            let (cx, cy) = geometry.to_original_unclamped(r.cx, r.cy);
            let rotated = RotatedBox { cx, cy, w: r.w / geometry.scale_x, h: r.h / geometry.scale_y, angle: r.angle };
            // The corners' bound, clipped to the image as every answer's boxes are.
            let corners = rotated.corners();
            let (xs, ys) = (corners.map(|p| p[0]), corners.map(|p| p[1]));
            let (width, height) = (geometry.original_width as f32, geometry.original_height as f32);
            let bbox = BoundingBox {
                x1: xs.iter().copied().fold(f32::INFINITY, f32::min).clamp(0.0, width),
                y1: ys.iter().copied().fold(f32::INFINITY, f32::min).clamp(0.0, height),
                x2: xs.iter().copied().fold(f32::NEG_INFINITY, f32::max).clamp(0.0, width),
                y2: ys.iter().copied().fold(f32::NEG_INFINITY, f32::max).clamp(0.0, height),
            };
            let detection = Detection { index: c.class, label: label_for(labels, c.class), score: c.score, bbox };
            OrientedDetection { detection, rotated }
        })
        .collect()
}

/// One rotated box of a `/v1` answer: the detection's fields, the rotated box and its corners.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OrientedResult {
    #[serde(flatten)]
    pub detection: Detection,
    pub rotated_box: RotatedBox,
    /// The four corners, `[[x, y], ...]`, in original pixels.
    pub corners: [[f32; 2]; 4],
}

impl From<&OrientedDetection> for OrientedResult {
    fn from(found: &OrientedDetection) -> Self {
        OrientedResult { detection: found.detection.clone(), rotated_box: found.rotated, corners: found.rotated.corners() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::FRAC_PI_2;

    fn rotated(cx: f32, cy: f32, w: f32, h: f32, angle: f32) -> RotatedBox {
        RotatedBox { cx, cy, w, h, angle }
    }

    fn candidate(cx: f32, score: f32, class: usize) -> OrientedCandidate {
        OrientedCandidate { rotated: rotated(cx, 10.0, 20.0, 6.0, 0.3), score, class }
    }

    #[test]
    fn probiou_is_one_for_the_same_box_and_falls_apart() {
        let b = rotated(10.0, 10.0, 20.0, 6.0, 0.3);
        assert!((probiou(&b, &b) - 1.0).abs() < 2e-3, "{}", probiou(&b, &b));
        assert!(probiou(&b, &rotated(12.0, 10.0, 20.0, 6.0, 0.3)) < probiou(&b, &b));
        assert!(probiou(&b, &rotated(80.0, 80.0, 20.0, 6.0, 0.3)) < 1e-3);
        // A quarter turn with w and h swapped is the same rectangle.
        let turned = rotated(10.0, 10.0, 6.0, 20.0, 0.3 + FRAC_PI_2);
        assert!((probiou(&b, &turned) - probiou(&b, &b)).abs() < 1e-3);
    }

    #[test]
    fn fast_nms_drops_a_box_overlapped_by_a_suppressed_one_too() {
        // 0 overlaps 1 and 1 overlaps 2, but 0 and 2 are apart: greedy NMS would keep 2, fast
        // NMS (ultralytics') does not. Another class is never suppressed.
        let candidates = vec![candidate(0.0, 0.9, 0), candidate(3.0, 0.8, 0), candidate(6.0, 0.7, 0), candidate(3.0, 0.6, 1)];
        let threshold = probiou(&candidates[0].rotated, &candidates[1].rotated) - 0.01;
        assert!(probiou(&candidates[0].rotated, &candidates[2].rotated) < threshold);
        assert_eq!(suppress(&candidates, threshold, 10), [0, 3]);
        assert_eq!(suppress(&candidates, 1.0, 2), [0, 1]);
    }

    #[test]
    fn kept_boxes_are_mapped_through_the_letterbox() {
        // Input 2x smaller than the original, 10 px of padding on top.
        let geometry = Geometry { scale_x: 0.5, scale_y: 0.5, offset_y: 10.0, ..Geometry::identity(200, 100) };
        let c = OrientedCandidate { rotated: rotated(50.0, 30.0, 20.0, 10.0, 2.0), score: 0.9, class: 1 };
        let found = finish_oriented(vec![c], &geometry, &["a".into(), "b".into()], 0.5, 0.5, 10);
        let r = found[0].rotated;
        assert_eq!((r.cx, r.cy, r.w, r.h, r.angle), (100.0, 40.0, 40.0, 20.0, 2.0));
        assert_eq!(found[0].detection.label, "b");
        // The bound holds every corner inside the image.
        let b = found[0].detection.bbox;
        for [x, y] in r.corners() {
            let (x, y) = (x.clamp(0.0, 200.0), y.clamp(0.0, 100.0));
            assert!(x >= b.x1 - 1e-4 && x <= b.x2 + 1e-4 && y >= b.y1 - 1e-4 && y <= b.y2 + 1e-4);
        }
        // A centre past the edge stays where it is.
        let outside = OrientedCandidate { rotated: rotated(-4.0, 30.0, 20.0, 10.0, 0.0), score: 0.9, class: 0 };
        assert_eq!(finish_oriented(vec![outside], &geometry, &[], 0.5, 0.5, 10)[0].rotated.cx, -8.0);
        let upright = rotated(0.0, 0.0, 4.0, 2.0, 0.0).corners();
        assert_eq!(upright, [[2.0, 1.0], [2.0, -1.0], [-2.0, -1.0], [-2.0, 1.0]]);
    }
}
