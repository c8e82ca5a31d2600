//! What each task makes of a model's output, in plain Rust: top-k, NMS, masks and their
//! encodings, results mapped back to the original image. Nothing here touches a tensor, so all
//! of it is unit-tested without libtorch.
//!
//! [`finish`] is the one place that turns what a worker hands back ([`ModelOutput`]) into an
//! image's result in original pixels ([`Finished`]); every protocol only shapes that result.

pub mod classification;
pub mod detection;
pub mod embedding;
pub mod instances;
pub mod keypoints;
pub mod oriented;
pub mod params;
pub mod prototypes;
pub mod segmentation;
pub mod slicing;
pub mod tracking;

use std::sync::Arc;

use serde::Serialize;

use crate::image::Geometry;
use crate::model_config::Task;
pub use classification::Prediction;
pub use detection::Detection;
pub use params::{ParamError, PredictParams};
pub use segmentation::SegmentationResult;

/// What the worker hands back for one image, before the task-level post-processing.
#[derive(Debug, Clone)]
pub enum ModelOutput {
    /// Class scores, softmax applied when the config asks for it.
    Probabilities(Vec<f32>),
    /// Class index per pixel at model-input resolution.
    LabelMap(segmentation::LabelMap),
    /// Boxes in model-input pixels at or above the request's score threshold, before NMS.
    Candidates(Vec<detection::Candidate>),
    /// The image's embedding, finite, normalised when the config asks for it.
    Embedding(Vec<f32>),
    /// Boxes with their masks, in model-input pixels, before NMS.
    Instances(Vec<instances::InstanceCandidate>),
    /// Boxes with their mask coefficients and the image's prototypes (ultralytics `-seg`), in
    /// model-input pixels, before NMS: masks are made for the boxes NMS keeps.
    PrototypeInstances { candidates: Vec<prototypes::CoefficientCandidate>, prototypes: prototypes::Prototypes },
    /// Boxes with their points, in model-input pixels, before NMS.
    Keypoints { candidates: Vec<keypoints::KeypointCandidate>, schema: Arc<keypoints::KeypointSchema> },
    /// Rotated boxes in model-input pixels, before NMS.
    Oriented(Vec<oriented::OrientedCandidate>),
    /// What an NMS-free head picked (YOLOv10, YOLO26 end-to-end exports): finished as the
    /// output inside, with the score threshold and the cap but no suppression.
    Chosen(Box<ModelOutput>),
}

/// One image's result, in the original image's pixels, before any protocol shapes it.
#[derive(Debug, Clone)]
pub enum Finished {
    /// Every class's score (V2 returns them all) and the top `top_k`, best first.
    Classification { scores: Vec<f32>, top: Vec<Prediction> },
    /// After class-aware NMS, at most `max_detections`, best first.
    Detection { detections: Vec<Detection> },
    /// The class of every original pixel, with its probability when the job asked for it.
    Segmentation { mask: segmentation::LabelMap },
    /// The image's embedding; no geometry applies to it.
    Embedding { vector: Vec<f32> },
    /// As detection, each box with its mask, both in original pixels.
    InstanceSegmentation { instances: Vec<instances::Instance> },
    /// As detection, each box with its points (in the schema's order), both in original pixels.
    Keypoints { poses: Vec<keypoints::Pose>, schema: Arc<keypoints::KeypointSchema> },
    /// After rotated NMS, at most `max_detections`, best first, in original pixels.
    OrientedDetection { detections: Vec<oriented::OrientedDetection> },
}

/// A worker's output of another kind than the model's task: a server fault, never the
/// client's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("worker output does not match task {0:?}")]
pub struct OutputMismatch(pub Task);

/// Turns one image's model output into its result: top-k; the request's score threshold, then
/// NMS; mapping boxes and masks back through the image's geometry.
pub fn finish(
    task: Task,
    output: ModelOutput,
    geometry: &Geometry,
    labels: &[String],
    params: &PredictParams,
) -> Result<Finished, OutputMismatch> {
    match (task, output) {
        (Task::Classification, ModelOutput::Probabilities(scores)) => {
            let top = classification::top_k(&scores, params.top_k, labels);
            Ok(Finished::Classification { scores, top })
        }
        (Task::Detection, ModelOutput::Candidates(mut candidates)) => {
            // The executor dropped only what is below every threshold of its batch.
            candidates.retain(|c| c.score >= params.score_threshold);
            let kept = detection::non_max_suppression(candidates, params.iou_threshold, params.max_detections);
            Ok(Finished::Detection { detections: detection::to_detections(&kept, geometry, labels) })
        }
        (Task::Segmentation, ModelOutput::LabelMap(map)) => {
            Ok(Finished::Segmentation { mask: segmentation::resample_to_original(&map, geometry) })
        }
        (Task::Embedding, ModelOutput::Embedding(vector)) => Ok(Finished::Embedding { vector }),
        (Task::InstanceSegmentation, ModelOutput::Instances(candidates)) => Ok(Finished::InstanceSegmentation {
            instances: instances::finish_instances(
                candidates,
                geometry,
                labels,
                params.score_threshold,
                params.iou_threshold,
                params.max_detections,
            ),
        }),
        (Task::InstanceSegmentation, ModelOutput::PrototypeInstances { candidates, prototypes }) => {
            Ok(Finished::InstanceSegmentation {
                instances: instances::finish_prototype_instances(
                    candidates,
                    &prototypes,
                    geometry,
                    labels,
                    params.score_threshold,
                    params.iou_threshold,
                    params.max_detections,
                ),
            })
        }
        (Task::Keypoints, ModelOutput::Keypoints { candidates, schema }) => Ok(Finished::Keypoints {
            poses: keypoints::finish_poses(
                candidates,
                geometry,
                labels,
                params.score_threshold,
                params.iou_threshold,
                params.max_detections,
            ),
            schema,
        }),
        (Task::OrientedDetection, ModelOutput::Oriented(candidates)) => Ok(Finished::OrientedDetection {
            detections: oriented::finish_oriented(
                candidates,
                geometry,
                labels,
                params.score_threshold,
                params.iou_threshold,
                params.max_detections,
            ),
        }),
        (task, ModelOutput::Chosen(inner)) => {
            // No IoU exceeds infinity: nothing is suppressed.
            finish(task, *inner, geometry, labels, &PredictParams { iou_threshold: f32::INFINITY, ..*params })
        }
        (task, _) => Err(OutputMismatch(task)),
    }
}

/// [`finish`] for each image of a request, in order.
pub fn finish_all(
    task: Task,
    outputs: Vec<ModelOutput>,
    geometries: &[Geometry],
    labels: &[String],
    params: &PredictParams,
) -> Result<Vec<Finished>, OutputMismatch> {
    outputs.into_iter().zip(geometries).map(|(output, geometry)| finish(task, output, geometry, labels, params)).collect()
}

/// A sliced request's results: each tile finished as an image of its own (threshold, NMS,
/// geometry), its boxes moved into its photo's pixels, and each photo's tiles merged.
/// `tiles` holds each photo's tiles in the order of `outputs`.
pub fn finish_sliced(
    task: Task,
    outputs: Vec<ModelOutput>,
    geometries: &[Geometry],
    labels: &[String],
    params: &PredictParams,
    tiles: &[Vec<slicing::Tile>],
) -> Result<Vec<Finished>, OutputMismatch> {
    let slicing = params.slicing.unwrap_or_default();
    let mut outputs = outputs.into_iter().zip(geometries);
    tiles
        .iter()
        .map(|photo| {
            // The tiles cover the photo: its size is where the last ones end.
            let width = photo.iter().map(|t| t.x + t.width).max().unwrap_or(0);
            let height = photo.iter().map(|t| t.y + t.height).max().unwrap_or(0);
            let (mut boxes, mut masked) = (Vec::new(), Vec::new());
            for (tile, (output, geometry)) in photo.iter().zip(outputs.by_ref()) {
                match finish(task, output, geometry, labels, params)? {
                    Finished::Detection { mut detections } => {
                        slicing::shift(&mut detections, *tile);
                        boxes.extend(detections);
                    }
                    Finished::InstanceSegmentation { mut instances } => {
                        slicing::shift_instances(&mut instances, *tile, width, height);
                        masked.extend(instances);
                    }
                    _ => return Err(OutputMismatch(task)),
                }
            }
            Ok(match task {
                Task::InstanceSegmentation => Finished::InstanceSegmentation { instances: slicing::merge_instances(masked, &slicing, params.max_detections) },
                _ => Finished::Detection { detections: slicing::merge(boxes, &slicing, params.max_detections) },
            })
        })
        .collect()
}

/// One image's answer, in the `/v1` result shape.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TaskResult {
    Classification { predictions: Vec<Prediction> },
    Segmentation(SegmentationResult),
    Detection { detections: Vec<Detection> },
    InstanceSegmentation { detections: Vec<instances::InstanceResult> },
    /// The poses, with the names of their points and the skeleton joining them.
    Keypoints { detections: Vec<keypoints::PoseResult>, keypoint_names: Vec<String>, skeleton: Vec<[usize; 2]> },
    OrientedDetection { detections: Vec<oriented::OrientedResult> },
    Embedding {
        embedding: Vec<f32>,
        /// With `neighbours = k`: the k most similar of the request's other images.
        #[serde(skip_serializing_if = "Option::is_none")]
        neighbours: Option<Vec<embedding::Neighbour>>,
    },
}

impl TaskResult {
    /// The `/v1` shape of a result: the top-k, the detections, the class summary with the
    /// mask encoded as asked, or the embedding.
    pub fn from_finished(finished: Finished, labels: &[String], params: &PredictParams) -> Result<Self, image::ImageError> {
        let mask_format = params.mask_format;
        Ok(match finished {
            Finished::Classification { top, .. } => TaskResult::Classification { predictions: top },
            Finished::Detection { detections } => TaskResult::Detection { detections },
            Finished::Segmentation { mask } => TaskResult::Segmentation(segmentation::encode_result(&mask, labels, mask_format)?),
            Finished::Embedding { vector } => TaskResult::Embedding { embedding: vector, neighbours: None },
            Finished::InstanceSegmentation { instances } => TaskResult::InstanceSegmentation {
                detections: instances
                    .iter()
                    .map(|instance| instances::encode_instance(instance, params.instance_masks))
                    .collect::<Result<_, _>>()?,
            },
            Finished::Keypoints { poses, schema } => TaskResult::Keypoints {
                detections: poses.iter().map(keypoints::PoseResult::from).collect(),
                keypoint_names: schema.names.clone(),
                skeleton: schema.skeleton.clone(),
            },
            Finished::OrientedDetection { detections } => {
                TaskResult::OrientedDetection { detections: detections.iter().map(oriented::OrientedResult::from).collect() }
            }
        })
    }

    /// Every image of a request in the `/v1` shape; with `neighbours` asked, each embedding
    /// also lists its nearest among the request's other images (by cosine similarity).
    pub fn from_request(results: Vec<Finished>, labels: &[String], params: &PredictParams) -> Result<Vec<Self>, image::ImageError> {
        let vectors: Vec<Vec<f32>> = match params.neighbours {
            0 => Vec::new(),
            _ => results.iter().filter_map(|f| if let Finished::Embedding { vector } = f { Some(vector.clone()) } else { None }).collect(),
        };
        let mut nearest = embedding::nearest(&vectors, &vectors, params.neighbours, true).into_iter();
        results
            .into_iter()
            .map(|finished| {
                let mut result = Self::from_finished(finished, labels, params)?;
                if let TaskResult::Embedding { neighbours, .. } = &mut result {
                    *neighbours = nearest.next();
                }
                Ok(result)
            })
            .collect()
    }
}

/// Label of class `index`, or its number when the model ships no labels for it.
pub fn label_for(labels: &[String], index: usize) -> String {
    labels.get(index).cloned().unwrap_or_else(|| index.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use detection::Candidate;
    use segmentation::LabelMap;

    fn labels() -> Vec<String> {
        ["zero", "one", "two"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn classification_keeps_every_score_and_the_top_k() {
        let params = PredictParams { top_k: 2, ..PredictParams::default() };
        let out = finish(Task::Classification, ModelOutput::Probabilities(vec![0.2, 0.5, 0.3]), &Geometry::identity(4, 4), &labels(), &params);
        let Ok(Finished::Classification { scores, top }) = out else { panic!("{out:?}") };
        assert_eq!(scores, [0.2, 0.5, 0.3]);
        assert_eq!(top.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(), ["one", "two"]);
    }

    #[test]
    fn detection_keeps_only_what_reaches_the_requests_threshold() {
        let c = |x: f32, score: f32| Candidate { x1: x, y1: 0.0, x2: x + 10.0, y2: 10.0, score, class: 1 };
        // A batch-mate asked for 0.2, so the executor passed these on; this request asked for 0.5.
        let candidates = vec![c(0.0, 0.3), c(50.0, 0.5), c(80.0, 0.9)];
        let out = finish(Task::Detection, ModelOutput::Candidates(candidates), &Geometry::identity(100, 10), &labels(), &PredictParams::default()).unwrap();
        let Finished::Detection { detections } = out else { panic!() };
        assert_eq!(detections.iter().map(|d| d.score).collect::<Vec<_>>(), [0.9, 0.5]);
    }

    #[test]
    fn detection_applies_nms_the_cap_and_the_geometry() {
        let c = |x: f32, score: f32| Candidate { x1: x, y1: 0.0, x2: x + 10.0, y2: 10.0, score, class: 1 };
        let candidates = vec![c(0.0, 0.9), c(1.0, 0.8), c(50.0, 0.7), c(80.0, 0.6)];
        let params = PredictParams { max_detections: 2, ..PredictParams::default() };
        // The model saw the image at half size.
        let geometry = Geometry { scale_x: 0.5, scale_y: 0.5, ..Geometry::identity(200, 40) };
        let out = finish(Task::Detection, ModelOutput::Candidates(candidates), &geometry, &labels(), &params).unwrap();
        let Finished::Detection { detections } = out else { panic!() };
        assert_eq!(detections.iter().map(|d| d.score).collect::<Vec<_>>(), [0.9, 0.7]);
        assert_eq!((detections[1].bbox.x1, detections[1].bbox.x2), (100.0, 120.0));
        assert_eq!(detections[0].label, "one");
    }

    #[test]
    fn segmentation_resamples_to_the_original_size() {
        let map = LabelMap { width: 2, height: 1, labels: vec![0, 2], confidence: vec![] };
        let geometry = Geometry { scale_x: 0.5, scale_y: 0.5, ..Geometry::identity(4, 2) };
        let out = finish(Task::Segmentation, ModelOutput::LabelMap(map), &geometry, &labels(), &PredictParams::default()).unwrap();
        let Finished::Segmentation { mask } = out else { panic!() };
        assert_eq!((mask.width, mask.height), (4, 2));
        assert_eq!(mask.labels, [0, 0, 2, 2, 0, 0, 2, 2]);
    }

    #[test]
    fn embeddings_pass_through_and_neighbours_are_listed_only_when_asked() {
        let finished: Vec<Finished> = [vec![1.0, 0.0], vec![0.0, 1.0], vec![0.8, 0.6]]
            .into_iter()
            .map(|v| finish(Task::Embedding, ModelOutput::Embedding(v), &Geometry::identity(8, 8), &[], &PredictParams::default()).unwrap())
            .collect();
        let plain = TaskResult::from_request(finished.clone(), &[], &PredictParams::default()).unwrap();
        let json = serde_json::to_value(&plain).unwrap();
        assert_eq!(json[0], serde_json::json!({"embedding": [1.0, 0.0]}));
        let params = PredictParams { neighbours: 1, ..PredictParams::default() };
        let near = serde_json::to_value(TaskResult::from_request(finished, &[], &params).unwrap()).unwrap();
        assert_eq!(near[0]["neighbours"][0]["index"], 2);
        assert_eq!(near[1]["neighbours"][0]["index"], 2);
        assert_eq!(near[2]["neighbours"][0]["index"], 0);
        assert_eq!(near[2]["neighbours"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn an_output_of_another_task_is_a_mismatch() {
        let out = finish(Task::Detection, ModelOutput::Probabilities(vec![1.0]), &Geometry::identity(1, 1), &[], &PredictParams::default());
        assert!(matches!(out, Err(OutputMismatch(Task::Detection))));
    }

    #[test]
    fn chosen_boxes_are_not_suppressed() {
        let candidates = vec![
            Candidate { x1: 0.0, y1: 0.0, x2: 10.0, y2: 10.0, score: 0.9, class: 0 },
            Candidate { x1: 0.0, y1: 0.0, x2: 10.0, y2: 10.0, score: 0.8, class: 0 },
        ];
        let geometry = Geometry::identity(10, 10);
        let chosen = finish(Task::Detection, ModelOutput::Chosen(Box::new(ModelOutput::Candidates(candidates.clone()))), &geometry, &labels(), &PredictParams::default()).unwrap();
        let Finished::Detection { detections } = chosen else { panic!("not detections") };
        assert_eq!(detections.len(), 2);
        let suppressed = finish(Task::Detection, ModelOutput::Candidates(candidates), &geometry, &labels(), &PredictParams::default()).unwrap();
        let Finished::Detection { detections } = suppressed else { panic!("not detections") };
        assert_eq!(detections.len(), 1);
    }
}
