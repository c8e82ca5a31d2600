//! Keypoints (pose): detections that each carry a fixed list of named points — COCO's 17 body
//! keypoints unless the model's config names its own — with the skeleton's edges for drawing.
//! Points leave in original pixels, in COCO's result layout (`[x1, y1, s1, x2, ...]`), so
//! pycocotools' `COCOeval` reads them as they are.

use serde::Serialize;

use super::detection::{self, Candidate, Detection};
use crate::image::Geometry;
use crate::model_config::OutputSpec;

/// The points a model finds and how they join: one per model, shared by every result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeypointSchema {
    /// The points' names, in the model's order.
    pub names: Vec<String>,
    /// Pairs of positions into `names` (0-based) that a drawing joins.
    pub skeleton: Vec<[usize; 2]>,
    /// Points scoring below this are left out of drawings (results list every point).
    #[serde(skip)]
    pub draw_threshold: f32,
}

impl KeypointSchema {
    pub fn of(spec: &OutputSpec) -> Self {
        KeypointSchema { names: spec.keypoint_names(), skeleton: spec.skeleton(), draw_threshold: spec.keypoint_threshold }
    }
}

/// One point: position and the model's score for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keypoint {
    pub x: f32,
    pub y: f32,
    pub score: f32,
}

/// A box with its points in model-input pixels, before NMS.
#[derive(Debug, Clone)]
pub struct KeypointCandidate {
    pub candidate: Candidate,
    pub points: Vec<Keypoint>,
}

/// A detection and its points, in original pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Pose {
    pub detection: Detection,
    pub points: Vec<Keypoint>,
}

/// The score threshold, class-aware NMS on the boxes (points go with their box), then boxes and
/// points mapped back through the geometry (clipped to the image, as ultralytics'
/// `scale_coords` does).
pub fn finish_poses(
    mut candidates: Vec<KeypointCandidate>,
    geometry: &Geometry,
    labels: &[String],
    score_threshold: f32,
    iou_threshold: f32,
    max_detections: usize,
) -> Vec<Pose> {
    candidates.retain(|c| c.candidate.score >= score_threshold);
    let boxes: Vec<Candidate> = candidates.iter().map(|c| c.candidate).collect();
    let kept = detection::nms_indices(&boxes, iou_threshold, max_detections);
    let kept_boxes: Vec<Candidate> = kept.iter().map(|&i| boxes[i]).collect();
    let mut points: Vec<Option<Vec<Keypoint>>> = candidates.into_iter().map(|c| Some(c.points)).collect();
    detection::to_detections(&kept_boxes, geometry, labels)
        .into_iter()
        .zip(&kept)
        .map(|(detection, &i)| {
            let points = points[i].take().expect("a kept position is kept once");
            let points = points
                .into_iter()
                .map(|p| {
                    let (x, y) = geometry.to_original(p.x, p.y);
                    Keypoint { x, y, score: p.score }
                })
                .collect();
            Pose { detection, points }
        })
        .collect()
}

/// A pose in the `/v1` shape: the detection's fields and its points as COCO lays out a
/// result (`[x, y, score]` per point, flat, in the schema's order).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoseResult {
    #[serde(flatten)]
    pub detection: Detection,
    pub keypoints: Vec<f32>,
}

impl From<&Pose> for PoseResult {
    fn from(pose: &Pose) -> Self {
        PoseResult { detection: pose.detection.clone(), keypoints: flat_points(&pose.points) }
    }
}

/// `[x1, y1, s1, x2, y2, s2, ...]`.
pub fn flat_points(points: &[Keypoint]) -> Vec<f32> {
    points.iter().flat_map(|p| [p.x, p.y, p.score]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(x: f32, score: f32, point_x: f32) -> KeypointCandidate {
        KeypointCandidate {
            candidate: Candidate { x1: x, y1: 0.0, x2: x + 10.0, y2: 10.0, score, class: 0 },
            points: vec![Keypoint { x: point_x, y: 5.0, score: 0.9 }, Keypoint { x: point_x + 1.0, y: 6.0, score: 0.1 }],
        }
    }

    #[test]
    fn the_coco_skeleton_joins_named_points() {
        let spec: OutputSpec = toml::from_str("convention = \"yolov8\"").unwrap();
        let schema = KeypointSchema::of(&spec);
        assert_eq!(schema.names.len(), 17);
        assert!(schema.skeleton.iter().flatten().all(|&i| i < 17));
        // COCO's own first edge, 1-based [16, 14]: left ankle to left knee.
        assert_eq!((schema.names[15].as_str(), schema.names[13].as_str()), ("left_ankle", "left_knee"));
    }

    #[test]
    fn points_follow_their_box_through_nms_and_the_geometry() {
        // The model saw the 40 × 20 image at half size; the second box overlaps the first.
        let geometry = Geometry { scale_x: 0.5, scale_y: 0.5, ..Geometry::identity(40, 20) };
        let candidates = vec![candidate(0.0, 0.6, 3.0), candidate(1.0, 0.9, 4.0), candidate(15.0, 0.2, 16.0)];
        let poses = finish_poses(candidates, &geometry, &["person".to_string()], 0.25, 0.5, 10);
        assert_eq!(poses.len(), 1, "the overlapping box is suppressed, the low one thresholded");
        let pose = &poses[0];
        assert_eq!(pose.detection.score, 0.9);
        assert_eq!((pose.points[0].x, pose.points[0].y, pose.points[0].score), (8.0, 10.0, 0.9));
        assert_eq!(PoseResult::from(pose).keypoints, vec![8.0, 10.0, 0.9, 10.0, 12.0, 0.1]);
    }

    #[test]
    fn points_outside_the_image_are_clipped_to_it() {
        let geometry = Geometry::identity(20, 20);
        let mut c = candidate(0.0, 0.9, 3.0);
        c.points[0] = Keypoint { x: -4.0, y: 25.0, score: 0.3 };
        let poses = finish_poses(vec![c], &geometry, &[], 0.25, 0.5, 10);
        assert_eq!((poses[0].points[0].x, poses[0].points[0].y), (0.0, 20.0));
    }
}
