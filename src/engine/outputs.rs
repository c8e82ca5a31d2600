//! Reading a model's `IValue` output according to the configured convention, into plain Rust
//! data. Runs on the worker thread, the only place tensors live.

use tch::{IValue, Kind, Tensor};

use super::EngineError;
use crate::tasks::ModelOutput;
use crate::model_config::{BoxCoordinates, BoxLayout, OutputConvention, OutputSpec};
use crate::tasks::detection::Candidate;
use crate::tasks::embedding;
use crate::tasks::instances::{InstanceCandidate, RegionMask};
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

/// Parses the output of a forward pass over `batch` stacked images.
pub fn parse_batched(
    value: IValue,
    spec: &OutputSpec,
    batch: usize,
    options: super::JobOptions,
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
        OutputConvention::Yolov8 => {
            let raw = tensor_of(value, "YOLOv8 head")?.to_device(tch::Device::Cpu).to_kind(Kind::Float);
            let size = expect_dims(&raw, 3, batch, "YOLOv8 output [N, 4 + C, A]")?;
            if size[1] <= 4 {
                return Err(err(format!("YOLOv8 output needs 4 + C rows, got {size:?}")));
            }
            (0..batch as i64)
                .map(|i| {
                    let per_anchor = raw.get(i).transpose(0, 1); // [A, 4 + C]
                    let cxcywh = per_anchor.narrow(1, 0, 4);
                    let scores = per_anchor.narrow(1, 4, size[1] - 4);
                    let (cx, cy, w, h) = (cxcywh.select(1, 0), cxcywh.select(1, 1), cxcywh.select(1, 2), cxcywh.select(1, 3));
                    let boxes = Tensor::stack(&[&cx - &w / 2.0, &cy - &h / 2.0, &cx + &w / 2.0, &cy + &h / 2.0], 1);
                    candidates(&boxes, scores, spec.background_class, score_threshold).map(ModelOutput::Candidates)
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

/// Every (anchor, class) pair at or above the threshold, as a candidate box: the multi-label
/// rule torchvision's SSD post-processing uses. `boxes` is `[A, 4]` xyxy, `scores` `[A, C]`.
fn candidates(
    boxes: &Tensor,
    scores: Tensor,
    background: Option<usize>,
    threshold: f32,
) -> Result<Vec<Candidate>, EngineError> {
    let mut scores = scores;
    if let Some(bg) = background {
        if (bg as i64) < scores.size()[1] {
            scores = scores.copy();
            let _ = scores.select(1, bg as i64).fill_(-1.0);
        }
    }
    let selected = scores.ge(f64::from(threshold)).nonzero(); // [K, 2]: anchor, class
    let mut anchors = selected.select(1, 0);
    let mut classes = selected.select(1, 1);
    let mut picked = scores.index(&[Some(&anchors), Some(&classes)]);
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
    Ok(scores
        .iter()
        .zip(classes)
        .zip(coords.chunks(4))
        .map(|((&score, class), b)| Candidate { x1: b[0], y1: b[1], x2: b[2], y2: b[3], score, class: class as usize })
        .collect())
}

/// Parses torchvision's `(losses, [{boxes, labels, scores}])` for `count` images; with
/// `mask_threshold`, Mask R-CNN's `masks` too, each cut at the threshold to the region it covers.
pub fn parse_torchvision_detection(
    value: IValue,
    count: usize,
    score_threshold: f32,
    mask_threshold: Option<f32>,
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
            for (k, v) in entries {
                if let IValue::String(key) = k {
                    match key.as_str() {
                        "boxes" => boxes = Some(tensor_of(v, "boxes")?),
                        "labels" => labels = Some(tensor_of(v, "labels")?),
                        "scores" => scores = Some(tensor_of(v, "scores")?),
                        "masks" => masks = Some(tensor_of(v, "masks")?),
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
            let Some(threshold) = mask_threshold else {
                return Ok(ModelOutput::Candidates(candidates.into_iter().map(|(_, c)| c).collect()));
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
