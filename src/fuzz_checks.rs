//! The properties the fuzz targets check, one function per target, so that libFuzzer
//! (`fuzz/`, `make fuzz`) and the regression test over saved inputs
//! (`tests/fuzz_regressions.rs`, stable Rust, in `make test`) run exactly the same code.
//! Each function must return normally for every input; a panic is a finding.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Query};
use axum::http::{Request, Uri};

use crate::api::input::{decode_base64, ImageUploads};
use crate::serve::oip::tensors::{encode_response, parse_request, split_length_prefixed, OutputData, OutputTensor};
use crate::api::{AppState, RequestLimits};
use crate::image::{decode_image, decode_scaled, decode_size_needed, preprocess, preprocess_decoded, DecodeLimits, Geometry};
use crate::model_config::{InputSpec, ModelConfig, Task};
use crate::repository::ModelRepository;
use crate::tasks::detection::{non_max_suppression, Candidate};
use crate::tasks::segmentation::{encode_result, LabelMap, MaskFormat};
use crate::tasks::instances::{self, RegionMask};
use crate::tasks::oriented::{self, OrientedCandidate, RotatedBox};
use crate::tasks::prototypes::{CoefficientCandidate, Prototypes};
use crate::tasks::{embedding, finish, Finished, ModelOutput, PredictParams};

fn input_specs() -> &'static [InputSpec] {
    static SPECS: OnceLock<Vec<InputSpec>> = OnceLock::new();
    SPECS.get_or_init(|| {
        [
            "resize = \"shorter_side_center_crop\"\nresize_shorter = 256\nwidth = 224\nheight = 224",
            "resize = \"stretch\"\nwidth = 32\nheight = 24",
            "resize = \"letterbox\"\nwidth = 64\nheight = 64\npad_value = 114",
            "resize = \"fit_multiple\"\nwidth = 64\nheight = 64\nmax_side = 128\nmultiple = 32",
            "resize = \"original\"\nwidth = 16\nheight = 16",
        ]
        .iter()
        .map(|input| {
            let text = format!("task = \"detection\"\n[input]\n{input}\n[output]\nconvention = \"boxes_scores\"\n");
            ModelConfig::parse(&text).expect("fuzz specs are valid").input
        })
        .collect()
    })
}

/// Untrusted bytes → decode (pixel limit first) → every resize policy, through the full decoder
/// and through the scaled JPEG path, which must agree on the image's size and give the same
/// geometry.
pub fn decode_preprocess(data: &[u8]) {
    // 1 Mpx keeps each run fast; the limit logic is the same at any size.
    let limits = DecodeLimits { max_pixels: 1 << 20 };
    let Ok(image) = decode_image(data, limits) else { return };
    for spec in input_specs() {
        let prepared = preprocess(&image, spec).expect("preprocessing a decoded image never fails");
        let g = prepared.geometry;
        assert_eq!(prepared.data.len(), 3 * g.input_width as usize * g.input_height as usize);
        assert!(prepared.data.iter().all(|v| v.is_finite()));
        let decoded = decode_scaled(data, limits, |w, h| decode_size_needed(spec, w, h)).expect("what decodes whole decodes scaled");
        assert_eq!(decoded.original, image.dimensions());
        let (w, h) = decoded.image.dimensions();
        assert!(w <= decoded.original.0 && h <= decoded.original.1);
        let scaled = preprocess_decoded(&decoded, spec).expect("preprocessing a scaled image never fails");
        assert_eq!(scaled.geometry, prepared.geometry);
        assert_eq!(scaled.data.len(), prepared.data.len());
        assert!(scaled.data.iter().all(|v| v.is_finite()));
    }
}

struct RequestFixture {
    runtime: tokio::runtime::Runtime,
    state: AppState,
}

fn request_fixture() -> &'static RequestFixture {
    static FIXTURE: OnceLock<RequestFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let empty = std::env::temp_dir().join(format!("visionserve-fuzz-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).expect("a temporary folder");
        let repository = ModelRepository::scan(&empty, &[]).expect("an empty repository");
        // Scanned once and never read again: the folder need not outlive the scan.
        let _ = std::fs::remove_dir(&empty);
        let limits = RequestLimits { max_body_bytes: 1 << 20, max_image_pixels: 1 << 20, max_images_per_request: 4, request_timeout_ms: 1000, refusal_delay_ms: 0 };
        let state = AppState::builder(Arc::new(repository), limits).build();
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
        RequestFixture { runtime, state }
    })
}

/// Request bodies as the predict routes read them — multipart (first byte 0 mod 3), JSON (1)
/// or a raw body under an arbitrary content type (2, the type up to the first newline) — and
/// the same bytes as a query string, read as each task's parameters.
pub fn request_parsing(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (content_type, body) = match selector % 3 {
        0 => ("multipart/form-data; boundary=XyZ".to_string(), rest.to_vec()),
        1 => ("application/json".to_string(), rest.to_vec()),
        _ => {
            let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            (String::from_utf8_lossy(&rest[..split]).into_owned(), rest.get(split + 1..).unwrap_or_default().to_vec())
        }
    };
    let fixture = request_fixture();
    if let Ok(request) = Request::post("/v1/models/m/predict").header("content-type", content_type).body(Body::from(body)) {
        if let Ok(uploads) = fixture.runtime.block_on(ImageUploads::from_request(request, &fixture.state)) {
            assert!(!uploads.images.is_empty() && uploads.images.len() <= 4);
        }
    }
    let query = String::from_utf8_lossy(rest).replace(['#', ' '], "");
    if let Ok(uri) = format!("/p?{query}").parse::<Uri>() {
        if let Ok(Query(raw)) = Query::<HashMap<String, String>>::try_from_uri(&uri) {
            for task in [Task::Classification, Task::Segmentation, Task::Detection, Task::Embedding] {
                if let Ok(params) = PredictParams::from_raw(&raw, task) {
                    assert!(params.top_k >= 1 && (0.0..=1.0).contains(&params.score_threshold));
                    assert!(params.neighbours <= 1000);
                }
            }
        }
    }
}

/// The Open Inference Protocol request parser with the binary tensor extension: the first two
/// bytes give the JSON header's length, the rest is the body.
pub fn v2_binary(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let header = u16::from_le_bytes([data[0], data[1]]) as usize;
    let body = Bytes::copy_from_slice(&data[2..]);
    let _ = split_length_prefixed(&body);
    for header_length in [Some(header), None] {
        let Ok(request) = parse_request(body.clone(), header_length) else { continue };
        for input in &request.inputs {
            let count = input.element_count();
            if let Ok(values) = input.u8_values() {
                assert_eq!(Ok(values.len()), count);
            }
            if let Ok(values) = input.f32_values() {
                assert_eq!(Ok(values.len()), count);
            }
            let _ = input.bytes_elements(|t| decode_base64(t).map_err(|e| e.to_string()));
        }
    }
    // Whatever the bytes, an answer built from them encodes and states its own length.
    let text: Vec<String> = data.chunks(7).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    let tensor = OutputTensor { name: "t".into(), shape: vec![text.len() as i64], data: OutputData::Bytes(text) };
    let (encoded, length) = encode_response(Default::default(), &[(tensor, true)]);
    assert!(length.expect("a binary output") <= encoded.len());
}

/// Mask encodings (PNG, COCO RLE, resampling to the original size) and non-maximum
/// suppression on arbitrary label maps and boxes; masks from prototypes and rotated boxes from
/// arbitrary floats (NaN, infinities, huge values), as a hostile head would answer them.
pub fn rle_nms(data: &[u8]) {
    if data.len() < 6 {
        return;
    }
    let width = u32::from(data[0] % 48) + 1;
    let height = u32::from(data[1] % 48) + 1;
    let original = (u32::from(data[2]) * 3 + 1, u32::from(data[3]) * 3 + 1);
    let body = &data[4..];
    let labels: Vec<u8> = (0..(width * height) as usize).map(|i| body[i % body.len()] % 8).collect();
    let map = LabelMap { width, height, labels, confidence: Vec::new() };
    let names: Vec<String> = (0..5).map(|i| format!("class{i}")).collect();
    let mut geometry = Geometry::identity(width, height);
    geometry.original_width = original.0;
    geometry.original_height = original.1;
    geometry.scale_x = width as f32 / original.0 as f32;
    geometry.scale_y = height as f32 / original.1 as f32;
    let finished = finish(Task::Segmentation, ModelOutput::LabelMap(map), &geometry, &names, &PredictParams::default());
    let Ok(Finished::Segmentation { mask }) = finished else { panic!("a label map finishes as a mask: {finished:?}") };
    assert_eq!((mask.width, mask.height), original);
    for format in [MaskFormat::Rle, MaskFormat::Png, MaskFormat::None] {
        let result = encode_result(&mask, &names, format).expect("encoding a valid map");
        let total: u64 = result.classes.iter().map(|c| c.pixels).sum();
        assert_eq!(total, u64::from(original.0) * u64::from(original.1));
    }
    let floats: Vec<f32> = body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let candidates: Vec<Candidate> = floats
        .chunks_exact(6)
        .map(|c| Candidate { x1: c[0], y1: c[1], x2: c[2], y2: c[3], score: c[4], class: (c[5].to_bits() % 4) as usize })
        .collect();
    let count = candidates.len();
    let kept = non_max_suppression(candidates, f32::from(data[4]) / 255.0, usize::from(data[5]));
    assert!(kept.len() <= count.min(usize::from(data[5])));
    // An instance mask of any region on any canvas: RLE covers the canvas exactly, polygons stay
    // within budget and on the canvas, and mapping to the original keeps it on its canvas.
    let (cw, ch) = (u32::from(data[2] % 64) + 1, u32::from(data[3] % 64) + 1);
    let (left, top) = (u32::from(data[4]) % cw, u32::from(data[5]) % ch);
    let (rw, rh) = ((width % (cw - left)) + 1, (height % (ch - top)) + 1);
    let bits: Vec<u8> = (0..(rw * rh) as usize).map(|i| body[i % body.len()] & 1).collect();
    let region = RegionMask { canvas_width: cw, canvas_height: ch, left, top, width: rw, height: rh, bits };
    let area = region.area();
    let runs = instances::run_lengths(&region);
    assert_eq!(runs.iter().map(|&r| u64::from(r)).sum::<u64>(), u64::from(cw) * u64::from(ch));
    assert_eq!(runs.iter().skip(1).step_by(2).map(|&r| u64::from(r)).sum::<u64>(), area);
    let outlines = instances::polygons(&region, 16);
    assert!(outlines.iter().map(Vec::len).sum::<usize>() <= 16);
    assert!(outlines.iter().flatten().all(|p| p[0] >= 0.0 && p[1] >= 0.0 && p[0] < cw as f32 && p[1] < ch as f32));
    let mut mapping = Geometry::identity(cw, ch);
    mapping.original_width = original.0;
    mapping.original_height = original.1;
    mapping.scale_x = cw as f32 / original.0 as f32;
    mapping.scale_y = ch as f32 / original.1 as f32;
    let mapped = region.tightened().into_original(&mapping);
    assert!(mapped.left + mapped.width <= original.0 && mapped.top + mapped.height <= original.1);
    assert_eq!(mapped.bits.len(), (mapped.width * mapped.height) as usize);
    prototype_masks_and_rotated_boxes(data, &floats, &mapping);
    // Embeddings from the same floats (NaN, infinities, huge and subnormal values): refused or
    // finite, and every cosine within -1..=1.
    let dimension = usize::from(data[0] % 8) + 1;
    let vectors: Vec<Vec<f32>> = floats.chunks_exact(dimension).filter_map(|c| embedding::prepare(c.to_vec(), true).ok()).collect();
    assert!(vectors.iter().flatten().all(|v| v.is_finite()));
    for found in embedding::nearest(&vectors, &vectors, usize::from(data[1]), true) {
        assert!(found.len() < vectors.len().max(1));
        assert!(found.iter().all(|n| (-1.0001..=1.0001).contains(&n.similarity)), "{found:?}");
    }
}

/// Masks from prototypes of any shape and values, for boxes anywhere (NaN and infinite edges
/// included): each on the input canvas, within its box's pixels, through NMS and the mapping;
/// rotated boxes through ProbIoU fast NMS: at most the cap, ProbIoU within 0..=1 for sane boxes.
fn prototype_masks_and_rotated_boxes(data: &[u8], floats: &[f32], geometry: &Geometry) {
    if floats.is_empty() {
        return;
    }
    let at = |i: usize| floats[i % floats.len()];
    let (channels, width, height) = (usize::from(data[0] % 4) + 1, usize::from(data[1] % 9) + 1, usize::from(data[2] % 9) + 1);
    let prototypes = Prototypes {
        channels,
        width,
        height,
        values: (0..channels * width * height).map(at).collect(),
        cut: if data[3] % 2 == 0 { 0.0 } else { at(7) },
    };
    let (canvas_width, canvas_height) = (geometry.input_width, geometry.input_height);
    let candidates: Vec<CoefficientCandidate> = floats
        .chunks_exact(5)
        .take(40)
        .enumerate()
        .map(|(i, c)| CoefficientCandidate {
            candidate: Candidate { x1: c[0], y1: c[1], x2: c[2], y2: c[3], score: c[4], class: i % 3 },
            // Now and then the wrong number of coefficients: no mask rather than a panic.
            coefficients: (0..channels + usize::from(i % 7 == 6)).map(|k| at(i * 5 + k)).collect(),
        })
        .collect();
    for c in &candidates {
        let mask = prototypes.mask(&c.coefficients, &c.candidate, canvas_width, canvas_height);
        assert_eq!((mask.canvas_width, mask.canvas_height), (canvas_width, canvas_height));
        assert!(mask.left + mask.width <= canvas_width && mask.top + mask.height <= canvas_height);
        assert_eq!(mask.bits.len(), (mask.width * mask.height) as usize);
        if mask.width > 0 {
            let b = &c.candidate;
            assert!(mask.left as f32 >= b.x1.floor() && (mask.left + mask.width) as f32 <= b.x2.ceil() + 1.0, "{mask:?} outside {b:?}");
        }
    }
    let names: Vec<String> = (0..3).map(|i| format!("class{i}")).collect();
    let cap = usize::from(data[4] % 16);
    let found = instances::finish_prototype_instances(candidates, &prototypes, geometry, &names, 0.0, 0.5, cap);
    assert!(found.len() <= cap);
    assert!(found.iter().all(|i| i.mask.width > 0 && i.mask.left + i.mask.width <= geometry.original_width));
    let rotated: Vec<OrientedCandidate> = floats
        .chunks_exact(6)
        .take(60)
        .enumerate()
        .map(|(i, c)| OrientedCandidate { rotated: RotatedBox { cx: c[0], cy: c[1], w: c[2], h: c[3], angle: c[4] }, score: c[5], class: i % 2 })
        .collect();
    let count = rotated.len();
    let sane = |r: &RotatedBox| [r.cx, r.cy, r.w, r.h, r.angle].iter().all(|v| v.is_finite() && v.abs() < 1e4) && r.w > 0.1 && r.h > 0.1;
    for pair in rotated.windows(2) {
        if sane(&pair[0].rotated) && sane(&pair[1].rotated) {
            let overlap = oriented::probiou(&pair[0].rotated, &pair[1].rotated);
            assert!((0.0..=1.0).contains(&overlap), "{overlap} for {pair:?}");
        }
    }
    let kept = oriented::finish_oriented(rotated, geometry, &names, f32::from(data[5]) / 255.0, 0.5, cap);
    assert!(kept.len() <= count.min(cap));
    for k in &kept {
        let b = k.detection.bbox;
        let inside = |v: f32, size: u32| v.is_nan() || (0.0..=size as f32).contains(&v);
        assert!(inside(b.x1, geometry.original_width) && inside(b.x2, geometry.original_width), "{b:?}");
    }
}

#[cfg(test)]
mod tests {
    /// The mask, NMS and embedding checks on a few thousand seeded inputs of every length up to
    /// 600 bytes, so `cargo test` exercises them without cargo-fuzz (`make fuzz` goes further).
    #[test]
    fn rle_nms_holds_on_seeded_inputs() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for length in (6..600).step_by(7) {
            for _ in 0..15 {
                let data: Vec<u8> = (0..length)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 24) as u8
                    })
                    .collect();
                super::rle_nms(&data);
            }
        }
    }
}
