//! Reading a model's `IValue` output according to the configured convention, into plain Rust
//! data. Runs on the worker thread, the only place tensors live.

use std::sync::Arc;

use tch::{IValue, Kind, Tensor};

use super::EngineError;
use crate::tasks::ModelOutput;
use crate::model_config::{BoxCoordinates, BoxLayout, OutputConvention, OutputSpec};
use crate::tasks::detection::Candidate;
use crate::tasks::embedding;
use crate::tasks::instances::{InstanceCandidate, RegionMask};
use crate::tasks::keypoints::{Keypoint, KeypointCandidate, KeypointSchema};
use crate::tasks::oriented::{OrientedCandidate, RotatedBox};
use crate::tasks::prototypes::{logit, CoefficientCandidate, Prototypes};
use crate::tasks::segmentation::LabelMap;

/// Upper bound on candidates kept per image before NMS, best first, so a low threshold on a
/// dense head cannot produce an unbounded answer.
const MAX_CANDIDATES: i64 = 10_000;

fn err(message: impl Into<String>) -> EngineError {
    EngineError::Output(message.into())
}

fn tensor_of(value: IValue, what: &str) -> Result<Tensor, EngineError> {
    match value {
        IValue::Tensor(t) => Ok(t),
        // Exported models often wrap a single output in a one-element tuple or list.
        IValue::Tuple(mut items) | IValue::GenericList(mut items) if items.len() == 1 => {
            tensor_of(items.remove(0), what)
        }
        IValue::TensorList(mut items) if items.len() == 1 => Ok(items.remove(0)),
        other => Err(err(format!("expected a tensor for {what}, got {}", describe(&other)))),
    }
}

fn describe(value: &IValue) -> String {
    match value {
        IValue::Tensor(t) => format!("Tensor{:?}", t.size()),
        IValue::Tuple(v) => format!("Tuple(len {})", v.len()),
        IValue::GenericList(v) => format!("List(len {})", v.len()),
        IValue::TensorList(v) => format!("TensorList(len {})", v.len()),
        IValue::GenericDict(v) => format!("Dict(len {})", v.len()),
        _ => "a non-tensor value".to_string(),
    }
}

fn dict_get(entries: Vec<(IValue, IValue)>, key: &str) -> Option<IValue> {
    entries.into_iter().find_map(|(k, v)| match k {
        IValue::String(s) if s == key => Some(v),
        _ => None,
    })
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>, EngineError> {
    let flat = t.to_kind(Kind::Float).contiguous().view(-1);
    Vec::<f32>::try_from(&flat).map_err(|e| err(e.to_string()))
}

fn to_i64_vec(t: &Tensor) -> Result<Vec<i64>, EngineError> {
    let flat = t.to_kind(Kind::Int64).contiguous().view(-1);
    Vec::<i64>::try_from(&flat).map_err(|e| err(e.to_string()))
}

fn expect_dims(t: &Tensor, dims: usize, batch: usize, what: &str) -> Result<Vec<i64>, EngineError> {
    let size = t.size();
    if size.len() != dims || size[0] != batch as i64 {
        return Err(err(format!(
            "expected {what} with {dims} dimensions and batch {batch}, got {size:?}"
        )));
    }
    Ok(size)
}

/// Parses the output of a forward pass over `batch` stacked images; `extras` says what a
/// YOLOv8 head carries besides boxes (keypoints, or mask coefficients beside prototypes).
pub fn parse_batched(
    value: IValue,
    spec: &OutputSpec,
    batch: usize,
    options: super::JobOptions,
    extras: &DetectionExtras,
) -> Result<Vec<ModelOutput>, EngineError> {
    let score_threshold = options.score_threshold;
    match spec.convention {
        OutputConvention::Logits => {
            let logits = tensor_of(value, "logits")?.to_device(tch::Device::Cpu);
            let size = expect_dims(&logits, 2, batch, "logits [N, C]")?;
            let scores = if spec.softmax { logits.softmax(1, Kind::Float) } else { logits.to_kind(Kind::Float) };
            let flat = to_f32_vec(&scores)?;
            Ok(flat.chunks(size[1] as usize).map(|row| ModelOutput::Probabilities(row.to_vec())).collect())
        }
        OutputConvention::ClassLogits => {
            let logits = match value {
                IValue::GenericDict(entries) => dict_get(entries, "out")
                    .ok_or_else(|| err("segmentation dict has no \"out\" entry"))
                    .and_then(|v| tensor_of(v, "out"))?,
                other => tensor_of(other, "class logits")?,
            };
            let size = expect_dims(&logits, 4, batch, "class logits [N, C, H, W]")?;
            if size[1] > 256 {
                return Err(err(format!("{} classes do not fit an 8-bit mask", size[1])));
            }
            let labels = logits.argmax(1, false).to_kind(Kind::Uint8).to_device(tch::Device::Cpu);
            let confidence = options
                .want_confidence
                .then(|| logits.softmax(1, Kind::Float).amax(&[1i64][..], false).to_device(tch::Device::Cpu));
            label_maps(&labels, confidence.as_ref(), batch, size[2], size[3])
        }
        OutputConvention::ProbabilityMap => {
            let probabilities = tensor_of(value, "probability map")?;
            let size = expect_dims(&probabilities, 4, batch, "probability map [N, 1, H, W]")?;
            if size[1] != 1 {
                return Err(err(format!("probability map must have one channel, got {size:?}")));
            }
            let foreground = probabilities.ge(f64::from(spec.threshold));
            let labels = foreground.to_kind(Kind::Uint8).to_device(tch::Device::Cpu);
            // The probability of the chosen class: p for foreground, 1 - p for background.
            let confidence = options.want_confidence.then(|| {
                let p = probabilities.to_kind(Kind::Float);
                p.where_self(&foreground, &(1.0 - &p)).to_device(tch::Device::Cpu)
            });
            label_maps(&labels, confidence.as_ref(), batch, size[2], size[3])
        }
        OutputConvention::Yolov8 | OutputConvention::YoloEnd2end => {
            let end_to_end = spec.convention == OutputConvention::YoloEnd2end;
            // A -seg export answers (head, prototypes [N, M, H/4, W/4]); the others the head
            // alone. Served as a detector, a -seg export's boxes are read and its masks left.
            let (raw, prototypes) = match value {
                IValue::Tuple(mut items) | IValue::GenericList(mut items)
                    if items.len() == 2 && !matches!(extras, DetectionExtras::Keypoints(_) | DetectionExtras::Angle) =>
                {
                    let prototypes = tensor_of(items.pop().unwrap(), "prototypes")?.to_device(tch::Device::Cpu).to_kind(Kind::Float);
                    expect_dims(&prototypes, 4, batch, "YOLO -seg prototypes [N, M, H, W]")?;
                    (tensor_of(items.pop().unwrap(), "YOLO head")?, Some(prototypes))
                }
                other if matches!(extras, DetectionExtras::Masks { .. }) => {
                    return Err(err(format!("a YOLO -seg model answers (detections, prototypes), got {}", describe(&other))));
                }
                other => (tensor_of(other, "YOLO head")?, None),
            };
            let raw = raw.to_device(tch::Device::Cpu).to_kind(Kind::Float);
            // A -pose head appends each anchor's points, (x, y, visibility) in input pixels; a
            // -seg head each anchor's coefficients over the prototypes.
            let (extra_rows, what) = match (extras, &prototypes) {
                (DetectionExtras::Keypoints(schema), _) => (3 * schema.names.len() as i64, "keypoint"),
                (DetectionExtras::Angle, _) => (1, "angle"),
                (_, Some(p)) => (p.size()[1], "mask coefficient"),
                _ => (0, "extra"),
            };
            let size = if end_to_end {
                let size = expect_dims(&raw, 3, batch, "YOLO end-to-end output [N, K, 6 (+ 3 x keypoints or mask coefficients)]")?;
                if size[2] != 6 + extra_rows {
                    return Err(err(format!("YOLO end-to-end rows need 6 numbers and {extra_rows} {what} numbers, got {size:?}")));
                }
                size
            } else {
                let size = expect_dims(&raw, 3, batch, "YOLOv8 output [N, 4 + C (+ 3 x keypoints or mask coefficients), A]")?;
                if size[1] - 4 - extra_rows < 1 {
                    return Err(err(format!(
                        "YOLOv8 output needs 4 box rows, at least one class row and {extra_rows} {what} rows, got {size:?}"
                    )));
                }
                size
            };
            (0..batch as i64)
                .map(|i| {
                    let (found, rows) = if end_to_end {
                        end_to_end_picks(&raw.get(i), extra_rows, score_threshold)?
                    } else {
                        let classes = size[1] - 4 - extra_rows;
                        let per_anchor = raw.get(i).transpose(0, 1); // [A, 4 + C (+ extra rows)]
                        let cxcywh = per_anchor.narrow(1, 0, 4);
                        let scores = per_anchor.narrow(1, 4, classes);
                        let (cx, cy, w, h) = (cxcywh.select(1, 0), cxcywh.select(1, 1), cxcywh.select(1, 2), cxcywh.select(1, 3));
                        let boxes = Tensor::stack(&[&cx - &w / 2.0, &cy - &h / 2.0, &cx + &w / 2.0, &cy + &h / 2.0], 1);
                        let (found, anchors) = candidates_at(&boxes, scores, spec.background_class, score_threshold, ClassRule::BestClass)?;
                        let rows = match extra_rows {
                            0 => Vec::new(),
                            _ => to_f32_vec(&per_anchor.narrow(1, 4 + classes, extra_rows).index_select(0, &anchors))?,
                        };
                        (found, rows)
                    };
                    let output = with_extras(found, &rows, extra_rows as usize, extras, prototypes.as_ref().map(|p| p.get(i)))?;
                    Ok(if end_to_end { ModelOutput::Chosen(Box::new(output)) } else { output })
                })
                .collect()
        }
        OutputConvention::BoxesScores => {
            let (boxes, scores) = match value {
                IValue::Tuple(mut items) | IValue::GenericList(mut items) if items.len() == 2 => {
                    let scores = tensor_of(items.pop().unwrap(), "scores")?;
                    (tensor_of(items.pop().unwrap(), "boxes")?, scores)
                }
                other => return Err(err(format!("expected (boxes, scores), got {}", describe(&other)))),
            };
            let boxes = boxes.to_device(tch::Device::Cpu).to_kind(Kind::Float);
            let scores = scores.to_device(tch::Device::Cpu).to_kind(Kind::Float);
            let bsize = expect_dims(&boxes, 3, batch, "boxes [N, A, 4]")?;
            let ssize = expect_dims(&scores, 3, batch, "scores [N, A, C]")?;
            if bsize[2] != 4 || bsize[1] != ssize[1] {
                return Err(err(format!("boxes {bsize:?} and scores {ssize:?} do not pair up")));
            }
            (0..batch as i64)
                .map(|i| {
                    let mut b = boxes.get(i);
                    if spec.box_layout == BoxLayout::Yxyx {
                        b = b.index_select(1, &Tensor::from_slice(&[1i64, 0, 3, 2]));
                    }
                    // Normalised boxes are scaled to input pixels by the caller-supplied size.
                    candidates(&b, scores.get(i), spec.background_class, score_threshold)
                        .map(ModelOutput::Candidates)
                })
                .collect()
        }
        OutputConvention::Features => {
            let features = tensor_of(value, "features")?.to_device(tch::Device::Cpu).to_kind(Kind::Float);
            let pooled = match features.dim() {
                2 => features,
                // A backbone's feature map: global average pooling, as classifiers' heads do.
                4 => features.mean_dim(&[2i64, 3][..], false, Kind::Float),
                _ => return Err(err(format!("expected features [N, D] or [N, D, H, W], got {:?}", features.size()))),
            };
            let size = expect_dims(&pooled, 2, batch, "features [N, D]")?;
            if size[1] == 0 {
                return Err(err("features have no components"));
            }
            to_f32_vec(&pooled)?
                .chunks(size[1] as usize)
                .map(|row| {
                    embedding::prepare(row.to_vec(), spec.normalize).map(ModelOutput::Embedding).map_err(|e| err(e.to_string()))
                })
                .collect()
        }
        OutputConvention::TorchvisionDetection => {
            Err(err("torchvision detection output is parsed per image list"))
        }
    }
}

/// An end-to-end head's picks for one image, `[K, 6 + extra]`, at or above the threshold: the
/// candidates and their extra numbers, flat.
fn end_to_end_picks(picks: &Tensor, extra: i64, threshold: f32) -> Result<(Vec<Candidate>, Vec<f32>), EngineError> {
    let kept = picks.select(1, 4).ge(f64::from(threshold)).nonzero().squeeze_dim(1);
    let rows = to_f32_vec(&picks.index_select(0, &kept))?;
    let width = 6 + extra as usize;
    let found = rows
        .chunks(width)
        .map(|r| Candidate { x1: r[0], y1: r[1], x2: r[2], y2: r[3], score: r[4], class: r[5].max(0.0) as usize })
        .collect();
    let extras = rows.chunks(width).flat_map(|r| r[6..].iter().copied()).collect();
    Ok((found, extras))
}

/// A YOLO head's candidates with what each carries beside its box: `rows` holds `per` numbers
/// a candidate (points, or mask coefficients over `prototypes [M, H, W]`).
fn with_extras(
    found: Vec<Candidate>,
    rows: &[f32],
    per: usize,
    extras: &DetectionExtras,
    prototypes: Option<Tensor>,
) -> Result<ModelOutput, EngineError> {
    if per == 0 || matches!(extras, DetectionExtras::None) {
        return Ok(ModelOutput::Candidates(found));
    }
    let per_candidate = found.into_iter().zip(rows.chunks(per));
    match (extras, prototypes) {
        (DetectionExtras::Keypoints(schema), _) => Ok(ModelOutput::Keypoints {
            candidates: per_candidate
                .map(|(candidate, row)| Ok(KeypointCandidate { candidate, points: keypoints(row)? }))
                .collect::<Result<_, EngineError>>()?,
            schema: Arc::clone(schema),
        }),
        // Back from corners to centre and size: a rounding's difference, far below a pixel. A
        // NaN or infinite box or angle is refused, as keypoints are.
        (DetectionExtras::Angle, _) => Ok(ModelOutput::Oriented(
            per_candidate
                .map(|(c, row)| {
                    let rotated = RotatedBox { cx: (c.x1 + c.x2) / 2.0, cy: (c.y1 + c.y2) / 2.0, w: c.x2 - c.x1, h: c.y2 - c.y1, angle: row[0] };
                    match [rotated.cx, rotated.cy, rotated.w, rotated.h, rotated.angle].iter().find(|v| !v.is_finite()) {
                        Some(v) => Err(err(format!("the model's rotated boxes hold {v}: its output is unusable"))),
                        None => Ok(OrientedCandidate { rotated, score: c.score, class: c.class }),
                    }
                })
                .collect::<Result<_, EngineError>>()?,
        )),
        (DetectionExtras::Masks { threshold }, Some(planes)) => {
            let shape = planes.size();
            Ok(ModelOutput::PrototypeInstances {
                candidates: per_candidate.map(|(candidate, row)| CoefficientCandidate { candidate, coefficients: row.to_vec() }).collect(),
                prototypes: Prototypes {
                    channels: shape[0] as usize,
                    height: shape[1] as usize,
                    width: shape[2] as usize,
                    values: to_f32_vec(&planes)?,
                    cut: logit(*threshold),
                },
            })
        }
        _ => Err(err("a YOLO head's extra numbers are neither keypoints nor mask coefficients")),
    }
}

/// Scales normalised box coordinates to input pixels (the `boxes_scores` convention).
pub fn scale_normalised(outputs: &mut [ModelOutput], spec: &OutputSpec, sizes: &[(u32, u32)]) {
    if spec.box_coordinates != BoxCoordinates::Normalized {
        return;
    }
    for (output, &(w, h)) in outputs.iter_mut().zip(sizes) {
        if let ModelOutput::Candidates(list) = output {
            for c in list.iter_mut() {
                c.x1 *= w as f32;
                c.x2 *= w as f32;
                c.y1 *= h as f32;
                c.y2 *= h as f32;
            }
        }
    }
}

fn label_maps(
    labels: &Tensor,
    confidence: Option<&Tensor>,
    batch: usize,
    height: i64,
    width: i64,
) -> Result<Vec<ModelOutput>, EngineError> {
    let flat = Vec::<u8>::try_from(&labels.contiguous().view(-1)).map_err(|e| err(e.to_string()))?;
    let confidence = confidence.map(to_f32_vec).transpose()?.unwrap_or_default();
    let plane = (height * width) as usize;
    Ok((0..batch)
        .map(|i| {
            ModelOutput::LabelMap(LabelMap {
                width: width as u32,
                height: height as u32,
                labels: flat[i * plane..(i + 1) * plane].to_vec(),
                confidence: if confidence.is_empty() { Vec::new() } else { confidence[i * plane..(i + 1) * plane].to_vec() },
            })
        })
        .collect())
}

/// `(x, y, score)` triples, flat. A point of NaN or infinity is the model's fault: refused, as
/// for embeddings, rather than passed on as JSON's `null`.
fn keypoints(flat: &[f32]) -> Result<Vec<Keypoint>, EngineError> {
    finite_points(flat)?;
    Ok(flat.chunks_exact(3).map(|p| Keypoint { x: p[0], y: p[1], score: p[2] }).collect())
}

fn finite_points(values: &[f32]) -> Result<(), EngineError> {
    match values.iter().find(|v| !v.is_finite()) {
        Some(v) => Err(err(format!("the model's keypoints hold {v}: its output is unusable"))),
        None => Ok(()),
    }
}

/// Every (anchor, class) pair at or above the threshold, as a candidate box: the multi-label
/// rule torchvision's SSD post-processing uses. `boxes` is `[A, 4]` xyxy, `scores` `[A, C]`.
fn candidates(
    boxes: &Tensor,
    scores: Tensor,
    background: Option<usize>,
    threshold: f32,
) -> Result<Vec<Candidate>, EngineError> {
    candidates_at(boxes, scores, background, threshold, ClassRule::EveryClass).map(|(found, _)| found)
}

/// Which (anchor, class) pairs may become candidates.
#[derive(Clone, Copy, PartialEq)]
enum ClassRule {
    /// Every class at or above the threshold (torchvision's SSD post-processing).
    EveryClass,
    /// Each anchor's best class only (ultralytics' predictor, `multi_label=False`).
    BestClass,
}

/// [`candidates`] under `rule`, with the anchor each came from (`Int64 [K]`, in the same order).
fn candidates_at(
    boxes: &Tensor,
    scores: Tensor,
    background: Option<usize>,
    threshold: f32,
    rule: ClassRule,
) -> Result<(Vec<Candidate>, Tensor), EngineError> {
    let mut scores = scores;
    if let Some(bg) = background {
        if (bg as i64) < scores.size()[1] {
            scores = scores.copy();
            let _ = scores.select(1, bg as i64).fill_(-1.0);
        }
    }
    let (mut anchors, mut classes, mut picked) = match rule {
        ClassRule::EveryClass => {
            let selected = scores.ge(f64::from(threshold)).nonzero(); // [K, 2]: anchor, class
            let (anchors, classes) = (selected.select(1, 0), selected.select(1, 1));
            let picked = scores.index(&[Some(&anchors), Some(&classes)]);
            (anchors, classes, picked)
        }
        ClassRule::BestClass => {
            let (best, class) = scores.max_dim(1, false);
            let anchors = best.ge(f64::from(threshold)).nonzero().squeeze_dim(1);
            (anchors.shallow_clone(), class.index_select(0, &anchors), best.index_select(0, &anchors))
        }
    };
    if picked.size()[0] > MAX_CANDIDATES {
        let (top, order) = picked.topk(MAX_CANDIDATES, 0, true, true);
        picked = top;
        anchors = anchors.index_select(0, &order);
        classes = classes.index_select(0, &order);
    }
    let chosen = boxes.index_select(0, &anchors);
    let coords = to_f32_vec(&chosen)?;
    let scores = to_f32_vec(&picked)?;
    let classes = to_i64_vec(&classes)?;
    let found = scores
        .iter()
        .zip(classes)
        .zip(coords.chunks(4))
        .map(|((&score, class), b)| Candidate { x1: b[0], y1: b[1], x2: b[2], y2: b[3], score, class: class as usize })
        .collect();
    Ok((found, anchors))
}

/// What a detector's output carries besides boxes, labels and scores.
pub enum DetectionExtras {
    None,
    /// Mask R-CNN's `masks`, each cut at the threshold to the region it covers; a YOLOv8 -seg
    /// head's mask coefficients and prototypes, cut at the threshold's logit.
    Masks { threshold: f32 },
    /// Keypoint R-CNN's `keypoints [K, J, 3]` (x, y, visibility) and `keypoints_scores [K, J]`;
    /// a YOLOv8 -pose head's `3 x J` rows per anchor.
    Keypoints(Arc<KeypointSchema>),
    /// A YOLOv8 -obb head's last row: each anchor's angle, in radians.
    Angle,
}

/// Parses torchvision's `(losses, [{boxes, labels, scores, ...}])` for `count` images.
pub fn parse_torchvision_detection(
    value: IValue,
    count: usize,
    score_threshold: f32,
    extras: &DetectionExtras,
) -> Result<Vec<ModelOutput>, EngineError> {
    let detections = match value {
        IValue::Tuple(mut items) if items.len() == 2 => items.pop().unwrap(),
        IValue::GenericList(items) => IValue::GenericList(items),
        other => return Err(err(format!("expected (losses, detections), got {}", describe(&other)))),
    };
    let per_image = match detections {
        IValue::GenericList(items) => items,
        other => return Err(err(format!("expected a list of detections, got {}", describe(&other)))),
    };
    if per_image.len() != count {
        return Err(err(format!("{} images in, {} detection dicts out", count, per_image.len())));
    }
    per_image
        .into_iter()
        .map(|entry| {
            let IValue::GenericDict(entries) = entry else {
                return Err(err("each detection entry must be a dict"));
            };
            let mut boxes = None;
            let mut labels = None;
            let mut scores = None;
            let mut masks = None;
            let mut points = None;
            let mut point_scores = None;
            for (k, v) in entries {
                if let IValue::String(key) = k {
                    match key.as_str() {
                        "boxes" => boxes = Some(tensor_of(v, "boxes")?),
                        "labels" => labels = Some(tensor_of(v, "labels")?),
                        "scores" => scores = Some(tensor_of(v, "scores")?),
                        "masks" => masks = Some(tensor_of(v, "masks")?),
                        "keypoints" => points = Some(tensor_of(v, "keypoints")?),
                        "keypoints_scores" => point_scores = Some(tensor_of(v, "keypoints_scores")?),
                        _ => {}
                    }
                }
            }
            let (Some(boxes), Some(labels), Some(scores)) = (boxes, labels, scores) else {
                return Err(err("detection dict needs boxes, labels and scores"));
            };
            let coords = to_f32_vec(&boxes.to_device(tch::Device::Cpu))?;
            let labels = to_i64_vec(&labels.to_device(tch::Device::Cpu))?;
            let scores = to_f32_vec(&scores.to_device(tch::Device::Cpu))?;
            if coords.len() != scores.len() * 4 || labels.len() != scores.len() {
                return Err(err(format!("{} boxes, {} labels and {} scores do not pair up", coords.len() / 4, labels.len(), scores.len())));
            }
            let candidates: Vec<(usize, Candidate)> = scores
                .iter()
                .zip(labels)
                .zip(coords.chunks(4))
                .enumerate()
                .filter(|(_, ((&s, _), _))| s >= score_threshold)
                .map(|(i, ((&score, class), b))| {
                    (i, Candidate { x1: b[0], y1: b[1], x2: b[2], y2: b[3], score, class: class.max(0) as usize })
                })
                .collect();
            let threshold = match extras {
                DetectionExtras::None => return Ok(ModelOutput::Candidates(candidates.into_iter().map(|(_, c)| c).collect())),
                DetectionExtras::Keypoints(schema) => {
                    return torchvision_keypoints(candidates, points, point_scores, scores.len(), schema);
                }
                DetectionExtras::Masks { threshold } => *threshold,
                DetectionExtras::Angle => return Err(err("torchvision detectors answer no rotated boxes")),
            };
            let masks = masks.ok_or_else(|| err("an instance segmentation model's detections need \"masks\""))?;
            let size = masks.size();
            if size.len() != 4 || size[1] != 1 || size[0] != scores.len() as i64 {
                return Err(err(format!("expected masks [{}, 1, H, W], got {size:?}", scores.len())));
            }
            let kept: Vec<i64> = candidates.iter().map(|(i, _)| *i as i64).collect();
            let regions = mask_regions(&masks.to_device(tch::Device::Cpu), &kept, threshold)?;
            Ok(ModelOutput::Instances(
                candidates.into_iter().zip(regions).map(|((_, candidate), mask)| InstanceCandidate { candidate, mask }).collect(),
            ))
        })
        .collect()
}

/// Keypoint R-CNN's points for the `candidates` kept (positions into its `total` detections):
/// (x, y) from `keypoints [K, J, 3]`, each point's score from `keypoints_scores [K, J]`.
fn torchvision_keypoints(
    candidates: Vec<(usize, Candidate)>,
    points: Option<Tensor>,
    scores: Option<Tensor>,
    total: usize,
    schema: &Arc<KeypointSchema>,
) -> Result<ModelOutput, EngineError> {
    let (Some(points), Some(scores)) = (points, scores) else {
        return Err(err("a keypoints model's detections need \"keypoints\" and \"keypoints_scores\""));
    };
    let j = schema.names.len() as i64;
    let (psize, ssize) = (points.size(), scores.size());
    if psize != [total as i64, j, 3] || ssize != [total as i64, j] {
        return Err(err(format!("expected keypoints [{total}, {j}, 3] and keypoints_scores [{total}, {j}], got {psize:?} and {ssize:?}")));
    }
    let xy = to_f32_vec(&points.to_device(tch::Device::Cpu).narrow(2, 0, 2))?;
    let s = to_f32_vec(&scores.to_device(tch::Device::Cpu))?;
    let j = j as usize;
    let kept: Vec<usize> = candidates.iter().map(|(i, _)| *i).collect();
    for &i in &kept {
        finite_points(&xy[i * j * 2..(i + 1) * j * 2])?;
        finite_points(&s[i * j..(i + 1) * j])?;
    }
    let candidates = candidates
        .into_iter()
        .map(|(i, candidate)| KeypointCandidate {
            candidate,
            points: (0..j).map(|p| Keypoint { x: xy[(i * j + p) * 2], y: xy[(i * j + p) * 2 + 1], score: s[i * j + p] }).collect(),
        })
        .collect();
    Ok(ModelOutput::Keypoints { candidates, schema: Arc::clone(schema) })
}

/// Masks `[K, 1, H, W]` of probabilities, the rows `kept` of them cut at `threshold`, each to
/// the rectangle of its set pixels (found on the tensor: the plane never leaves it whole).
fn mask_regions(masks: &Tensor, kept: &[i64], threshold: f32) -> Result<Vec<RegionMask>, EngineError> {
    let size = masks.size();
    let (height, width) = (size[2], size[3]);
    if kept.is_empty() {
        return Ok(Vec::new());
    }
    let binary = masks.index_select(0, &Tensor::from_slice(kept)).squeeze_dim(1).ge(f64::from(threshold)); // [K, H, W]
    let rows = Vec::<bool>::try_from(&binary.any_dim(2, false).contiguous().view(-1)).map_err(|e| err(e.to_string()))?;
    let cols = Vec::<bool>::try_from(&binary.any_dim(1, false).contiguous().view(-1)).map_err(|e| err(e.to_string()))?;
    (0..kept.len())
        .map(|k| {
            let rows = &rows[k * height as usize..(k + 1) * height as usize];
            let cols = &cols[k * width as usize..(k + 1) * width as usize];
            let (Some(y0), Some(y1), Some(x0), Some(x1)) =
                (rows.iter().position(|&r| r), rows.iter().rposition(|&r| r), cols.iter().position(|&c| c), cols.iter().rposition(|&c| c))
            else {
                return Ok(RegionMask::empty(width as u32, height as u32));
            };
            let region = binary
                .get(k as i64)
                .narrow(0, y0 as i64, (y1 - y0 + 1) as i64)
                .narrow(1, x0 as i64, (x1 - x0 + 1) as i64)
                .to_kind(Kind::Uint8)
                .contiguous();
            let bits = Vec::<u8>::try_from(&region.view(-1)).map_err(|e| err(e.to_string()))?;
            Ok(RegionMask {
                canvas_width: width as u32,
                canvas_height: height as u32,
                left: x0 as u32,
                top: y0 as u32,
                width: (x1 - x0 + 1) as u32,
                height: (y1 - y0 + 1) as u32,
                bits,
            })
        })
        .collect()
}

/// One raw output tensor of one image, as the model produced it (float outputs as FP32,
/// integer ones as INT64), for clients that want the model's own outputs (V2 `raw_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub name: String,
    /// Without the batch dimension.
    pub shape: Vec<i64>,
    pub data: RawData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RawData {
    Fp32(Vec<f32>),
    Int64(Vec<i64>),
}

/// Every tensor in a stacked-batch model's output (a tensor, a tuple or list of tensors, or a
/// dict of them), split along the batch dimension: `images` lists, one per image. Names are
/// `raw_output` for a lone tensor, `raw_output_<i>` for a tuple's items, `raw_<key>` for a
/// dict's.
pub fn raw_tensors(output: &IValue, images: usize) -> Result<Vec<Vec<RawTensor>>, EngineError> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    match output {
        IValue::Tensor(t) => named.push(("raw_output".into(), t.shallow_clone())),
        IValue::Tuple(items) | IValue::GenericList(items) => {
            for (i, item) in items.iter().enumerate() {
                if let IValue::Tensor(t) = item {
                    named.push((format!("raw_output_{i}"), t.shallow_clone()));
                }
            }
        }
        IValue::TensorList(items) => {
            named.extend(items.iter().enumerate().map(|(i, t)| (format!("raw_output_{i}"), t.shallow_clone())));
        }
        IValue::GenericDict(entries) => {
            for (key, value) in entries {
                if let (IValue::String(key), IValue::Tensor(t)) = (key, value) {
                    named.push((format!("raw_{key}"), t.shallow_clone()));
                }
            }
        }
        other => return Err(EngineError::Output(format!("raw outputs of {} are not supported", describe(other)))),
    }
    let mut per_image: Vec<Vec<RawTensor>> = vec![Vec::new(); images];
    for (name, tensor) in named {
        let size = tensor.size();
        if size.first().copied() != Some(images as i64) {
            return Err(EngineError::Output(format!("raw output '{name}' has shape {size:?}, not a batch of {images}")));
        }
        let shape = size[1..].to_vec();
        let is_float = tensor.is_floating_point();
        for (i, slot) in per_image.iter_mut().enumerate() {
            let item = tensor.get(i as i64).to_device(tch::Device::Cpu).flatten(0, -1);
            let data = if is_float {
                RawData::Fp32(Vec::<f32>::try_from(&item.to_kind(tch::Kind::Float)).map_err(|e| EngineError::Output(e.to_string()))?)
            } else {
                RawData::Int64(Vec::<i64>::try_from(&item.to_kind(tch::Kind::Int64)).map_err(|e| EngineError::Output(e.to_string()))?)
            };
            slot.push(RawTensor { name: name.clone(), shape: shape.clone(), data });
        }
    }
    Ok(per_image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_config::ModelConfig;

    /// A -pose head of two points and one class over three anchors: rows cx, cy, w, h, the
    /// class score, then (x, y, visibility) twice.
    fn pose_head(anchor_rows: [[f32; 11]; 3]) -> IValue {
        let flat: Vec<f32> = (0..11).flat_map(|r| anchor_rows.iter().map(move |a| a[r])).collect();
        IValue::Tensor(Tensor::from_slice(&flat).view([1, 11, 3]))
    }

    fn parse(head: IValue, points: usize) -> Result<Vec<ModelOutput>, EngineError> {
        let names: Vec<String> = (0..points).map(|i| format!("\"p{i}\"")).collect();
        let text = format!(
            "task = \"keypoints\"\n[input]\nwidth = 64\nheight = 64\nresize = \"letterbox\"\n[output]\nconvention = \"yolov8\"\nkeypoint_names = [{}]\n",
            names.join(", ")
        );
        let config = ModelConfig::parse(&text).unwrap();
        let extras = DetectionExtras::Keypoints(Arc::new(KeypointSchema::of(&config.output)));
        let options = super::super::JobOptions { score_threshold: 0.25, want_confidence: false, want_raw: false };
        parse_batched(head, &config.output, 1, options, &extras)
    }

    const CONFIDENT: [f32; 11] = [32.0, 32.0, 20.0, 10.0, 0.9, 30.0, 31.0, 0.8, 34.0, 35.0, 0.1];
    const FAINT: [f32; 11] = [10.0, 10.0, 4.0, 4.0, 0.1, 1.0, 2.0, 0.5, 3.0, 4.0, 0.5];

    #[test]
    fn a_pose_head_gives_each_kept_anchor_its_own_points() {
        let out = parse(pose_head([FAINT, CONFIDENT, FAINT]), 2).unwrap();
        let ModelOutput::Keypoints { candidates, schema } = &out[0] else { panic!("not keypoints") };
        assert_eq!(schema.names, ["p0", "p1"]);
        assert_eq!(candidates.len(), 1);
        let c = &candidates[0];
        assert_eq!((c.candidate.x1, c.candidate.y1, c.candidate.x2, c.candidate.y2), (22.0, 27.0, 42.0, 37.0));
        assert_eq!(c.points, [Keypoint { x: 30.0, y: 31.0, score: 0.8 }, Keypoint { x: 34.0, y: 35.0, score: 0.1 }]);
    }

    #[test]
    fn a_head_without_room_for_the_points_is_refused() {
        // 11 rows hold 4 + 1 + 3 x 2, not 3 x 3 points and a class.
        let message = parse(pose_head([CONFIDENT; 3]), 3).unwrap_err().to_string();
        assert!(message.contains("9 keypoint rows"), "{message}");
    }

    #[test]
    fn nan_points_are_refused_not_passed_on() {
        let mut broken = CONFIDENT;
        broken[6] = f32::NAN;
        let message = parse(pose_head([FAINT, broken, FAINT]), 2).unwrap_err().to_string();
        assert!(message.contains("NaN"), "{message}");
        // A NaN on an anchor below the threshold is never read.
        let mut faint = FAINT;
        faint[5] = f32::INFINITY;
        assert!(parse(pose_head([faint, CONFIDENT, FAINT]), 2).is_ok());
    }

    /// A -seg answer: one class and two mask coefficients over three anchors, and 2 prototype
    /// planes of 4 x 4.
    fn seg_answer(anchor_rows: [[f32; 7]; 3]) -> IValue {
        let flat: Vec<f32> = (0..7).flat_map(|r| anchor_rows.iter().map(move |a| a[r])).collect();
        let planes: Vec<f32> = (0..32).map(|v| v as f32).collect();
        IValue::Tuple(vec![
            IValue::Tensor(Tensor::from_slice(&flat).view([1, 7, 3])),
            IValue::Tensor(Tensor::from_slice(&planes).view([1, 2, 4, 4])),
        ])
    }

    fn parse_as(task: &str, answer: IValue, extras: &DetectionExtras) -> Result<Vec<ModelOutput>, EngineError> {
        let text = format!("task = \"{task}\"\n[input]\nwidth = 16\nheight = 16\nresize = \"letterbox\"\n[output]\nconvention = \"yolov8\"\n");
        let config = ModelConfig::parse(&text).unwrap();
        let options = super::super::JobOptions { score_threshold: 0.25, want_confidence: false, want_raw: false };
        parse_batched(answer, &config.output, 1, options, extras)
    }

    const SEG: [f32; 7] = [8.0, 8.0, 4.0, 4.0, 0.9, 0.5, -1.5];
    const SEG_FAINT: [f32; 7] = [2.0, 2.0, 2.0, 2.0, 0.1, 1.0, 1.0];

    #[test]
    fn a_seg_answer_gives_kept_anchors_their_coefficients_and_the_prototypes() {
        let out = parse_as("instance_segmentation", seg_answer([SEG_FAINT, SEG, SEG_FAINT]), &DetectionExtras::Masks { threshold: 0.5 }).unwrap();
        let ModelOutput::PrototypeInstances { candidates, prototypes } = &out[0] else { panic!("not prototype instances") };
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].coefficients, [0.5, -1.5]);
        assert_eq!((candidates[0].candidate.x1, candidates[0].candidate.class), (6.0, 0));
        assert_eq!((prototypes.channels, prototypes.height, prototypes.width, prototypes.cut), (2, 4, 4, 0.0));
        assert_eq!(prototypes.values[17], 17.0);
    }

    #[test]
    fn a_seg_export_served_as_a_detector_answers_its_boxes() {
        let out = parse_as("detection", seg_answer([SEG_FAINT, SEG, SEG_FAINT]), &DetectionExtras::None).unwrap();
        let ModelOutput::Candidates(found) = &out[0] else { panic!("not candidates") };
        // One class, not three: the coefficient rows are not read as classes.
        assert_eq!(found.iter().map(|c| c.class).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn an_instance_model_without_prototypes_is_refused() {
        let head = IValue::Tensor(Tensor::zeros([1, 7, 3], (Kind::Float, tch::Device::Cpu)));
        let message = parse_as("instance_segmentation", head, &DetectionExtras::Masks { threshold: 0.5 }).unwrap_err().to_string();
        assert!(message.contains("prototypes"), "{message}");
    }

    #[test]
    fn a_yolo_anchor_is_a_candidate_of_its_best_class_only() {
        // One anchor, two classes both above the threshold: ultralytics keeps the better one.
        let head = IValue::Tensor(Tensor::from_slice(&[8.0f32, 8.0, 4.0, 4.0, 0.6, 0.8]).view([1, 6, 1]));
        let out = parse_as("detection", head, &DetectionExtras::None).unwrap();
        let ModelOutput::Candidates(found) = &out[0] else { panic!("not candidates") };
        assert_eq!(found.iter().map(|c| (c.class, c.score)).collect::<Vec<_>>(), [(1, 0.8)]);
    }

    #[test]
    fn an_end_to_end_head_answers_its_picks_unsuppressed() {
        // Two overlapping picks and one below the threshold, (x1, y1, x2, y2, score, class).
        let rows = [0.0f32, 0.0, 10.0, 10.0, 0.9, 3.0, 1.0, 1.0, 10.0, 10.0, 0.8, 3.0, 5.0, 5.0, 6.0, 6.0, 0.1, 0.0];
        let head = IValue::Tensor(Tensor::from_slice(&rows).view([1, 3, 6]));
        let text = "task = \"detection\"\n[input]\nwidth = 16\nheight = 16\nresize = \"letterbox\"\n[output]\nconvention = \"yolo_end2end\"\n";
        let config = ModelConfig::parse(text).unwrap();
        let options = super::super::JobOptions { score_threshold: 0.25, want_confidence: false, want_raw: false };
        let out = parse_batched(head, &config.output, 1, options, &DetectionExtras::None).unwrap();
        let ModelOutput::Chosen(inner) = &out[0] else { panic!("not chosen") };
        let ModelOutput::Candidates(found) = inner.as_ref() else { panic!("not candidates") };
        assert_eq!(found.iter().map(|c| (c.class, c.score, c.x1)).collect::<Vec<_>>(), [(3, 0.9, 0.0), (3, 0.8, 1.0)]);
        // A row of the wrong width is refused.
        let narrow = IValue::Tensor(Tensor::zeros([1, 3, 5], (Kind::Float, tch::Device::Cpu)));
        assert!(parse_batched(narrow, &config.output, 1, options, &DetectionExtras::None).is_err());
    }

    #[test]
    fn an_obb_head_gives_each_kept_anchor_its_angle() {
        // Two anchors, rows cx, cy, w, h, one class, the angle.
        let head = IValue::Tensor(Tensor::from_slice(&[8.0f32, 2.0, 8.0, 2.0, 6.0, 2.0, 4.0, 2.0, 0.9, 0.1, 0.5, 0.2]).view([1, 6, 2]));
        let out = parse_as("oriented_detection", head, &DetectionExtras::Angle).unwrap();
        let ModelOutput::Oriented(found) = &out[0] else { panic!("not oriented") };
        assert_eq!(found.len(), 1);
        let r = found[0].rotated;
        assert_eq!((r.cx, r.cy, r.w, r.h, r.angle, found[0].score), (8.0, 8.0, 6.0, 4.0, 0.5, 0.9));
    }

    #[test]
    fn nan_angles_are_refused_not_passed_on() {
        let head = IValue::Tensor(Tensor::from_slice(&[8.0f32, 8.0, 6.0, 4.0, 0.9, f32::NAN]).view([1, 6, 1]));
        let message = parse_as("oriented_detection", head, &DetectionExtras::Angle).unwrap_err().to_string();
        assert!(message.contains("NaN"), "{message}");
    }
}
