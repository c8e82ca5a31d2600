//! The per-model `config.toml`: what the model is, how its input is prepared, how its output
//! is read, and how it runs. Every field is documented in `models/README.md`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classification,
    Segmentation,
    Detection,
    /// One vector per image (a backbone's pooled features), for retrieval and de-duplication.
    Embedding,
    /// Detections that each carry a binary mask (Mask R-CNN).
    InstanceSegmentation,
    /// Detections that each carry a fixed list of named points (Keypoint R-CNN, YOLO `-pose`).
    Keypoints,
    /// Rotated boxes (YOLO `-obb`): centre, size and angle, and the four corners.
    OrientedDetection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    /// A TorchScript file (`torch.jit.script` / `torch.jit.trace`), run by libtorch's JIT.
    Torchscript,
    /// An AOTInductor package (`.pt2`, `torch._inductor.aoti_compile_and_package`): kernels
    /// compiled ahead of time for one torch version and one kind of CPU (or GPU).
    Aoti,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Served name; the folder name when absent.
    pub name: Option<String>,
    pub task: Task,
    #[serde(default = "default_format")]
    pub format: ModelFormat,
    /// Model file, relative to the model's folder; `model.pt` (TorchScript) or `model.pt2`
    /// (AOTInductor) when absent.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Labels file (one label a line, line N is class N), relative to the model's folder.
    pub labels: Option<PathBuf>,
    #[serde(default)]
    pub provenance: Provenance,
    pub input: InputSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub runtime: RuntimeSpec,
    #[serde(default)]
    pub batching: BatchingSpec,
    /// How `models/aoti.py` compiles this folder's `program.pt2` (read there, not by the server).
    #[serde(default)]
    pub compile: CompileSpec,
}

/// `[compile]`: choices of the AOTInductor compile (`models/aoti.py`); the server only checks
/// that the table is well-formed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CompileSpec {
    /// Static batch-1 models beside the dynamic one, per thread count (models/README.md). On by
    /// default; off where `make bench-cpu` shows they do not pay (each carries its own weights).
    #[serde(default = "yes")]
    pub batch1_models: bool,
    /// The numbers the package computes in. `int8`: the `twin` version's program quantized;
    /// `bf16`: the twin's program in bfloat16 (models/quantize.py). Either is installed only past
    /// its accuracy and speed gates. Shown in the metadata and the forward-time metric; the
    /// package's own record must agree.
    #[serde(default)]
    pub precision: Precision,
    /// The FP32 version an INT8 or BF16 version is made from and judged against.
    #[serde(default)]
    pub twin: Option<String>,
    /// How many calibration crops the INT8 observers see (512 when absent).
    #[serde(default)]
    pub calibration_crops: Option<u32>,
    /// How many convolution or linear layers at the input end and at the output end an INT8
    /// version keeps FP32 (4 and 3 when absent; models/quantize.py).
    #[serde(default)]
    pub fp32_first_layers: Option<u32>,
    #[serde(default)]
    pub fp32_last_layers: Option<u32>,
}

impl Default for CompileSpec {
    fn default() -> Self {
        CompileSpec {
            batch1_models: true,
            precision: Precision::Fp32,
            twin: None,
            calibration_crops: None,
            fp32_first_layers: None,
            fp32_last_layers: None,
        }
    }
}

/// What a model computes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Int8,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Where the weights came from, shown by the metadata endpoints.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// For example `pretrained:IMAGENET1K_V1` or `random-init:seed=0`.
    #[serde(default = "unknown")]
    pub weights: String,
    /// Where the architecture and weights were taken from.
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub license: Option<String>,
    /// Parameters of the original model, for files whose weights were folded into constants
    /// (frozen TorchScript) and so cannot be counted from the module.
    #[serde(default)]
    pub parameter_count: Option<u64>,
}

fn unknown() -> String {
    "unknown".into()
}
fn default_format() -> ModelFormat {
    ModelFormat::Torchscript
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Resize the shorter side to `resize_shorter`, then centre-crop `width` × `height`
    /// (torchvision's classification transforms).
    ShorterSideCenterCrop,
    /// Resize to exactly `width` × `height`, ignoring the aspect ratio.
    Stretch,
    /// Fit inside `width` × `height` keeping the aspect ratio, pad the rest with `pad_value`
    /// (the YOLO convention).
    Letterbox,
    /// Keep the aspect ratio, shrink so the longer side is at most `max_side`, then round each
    /// side to a multiple of `multiple` (text detectors, fully convolutional models).
    FitMultiple,
    /// Feed the image at its own size (torchvision detectors resize internally).
    Original,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    Bgr,
}

/// The resampling of the resize step. Models are most accurate with the one they were
/// trained with: torchvision's reference transforms resize with Pillow, ultralytics' with OpenCV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    /// Bilinear with antialiasing: Pillow's `BILINEAR` (the filter widens as the image shrinks).
    #[default]
    Bilinear,
    /// Bilinear interpolation of the four nearest pixels whatever the scale: OpenCV's
    /// `INTER_LINEAR`, which ultralytics' `LetterBox` uses.
    OpencvLinear,
}

/// How the Open Inference Protocol's metadata and Triton's model configuration list a model's
/// pixel input (`image [-1, H, W, 3]`, NHWC): what Triton's image clients make and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PixelDatatype {
    /// Bytes: every value is a pixel, so perf_analyzer's random data is served. A client that
    /// scales pixels in uint8 arithmetic (image_client.py's `-s VGG`) wraps around unseen.
    #[default]
    #[serde(rename = "UINT8")]
    Uint8,
    /// Pixel values 0..=255 as floats; a value outside (a client's own scaling, or random
    /// bytes) is refused with a message naming the scaling to use.
    #[serde(rename = "FP32")]
    Fp32,
}

impl PixelDatatype {
    pub fn name(self) -> &'static str {
        match self {
            PixelDatatype::Uint8 => "UINT8",
            PixelDatatype::Fp32 => "FP32",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Model input width in pixels (for `original` and `fit_multiple`, the warm-up size).
    pub width: u32,
    pub height: u32,
    pub resize: ResizePolicy,
    /// Shorter-side length before the centre crop (`shorter_side_center_crop`).
    pub resize_shorter: Option<u32>,
    /// Longest side after resizing (`fit_multiple`).
    pub max_side: Option<u32>,
    /// Side lengths are rounded to a multiple of this (`fit_multiple`).
    pub multiple: Option<u32>,
    /// Padding value on the 0..255 scale (`letterbox`).
    #[serde(default = "default_pad")]
    pub pad_value: u8,
    /// Each 0..255 pixel value is multiplied by this before mean and std apply.
    #[serde(default = "default_scale")]
    pub scale: f32,
    #[serde(default = "zeros")]
    pub mean: [f32; 3],
    #[serde(default = "ones")]
    pub std: [f32; 3],
    #[serde(default)]
    pub channel_order: ChannelOrder,
    /// How pixels are resampled when the image is resized (see [`ResizeFilter`]).
    #[serde(default)]
    pub resize_filter: ResizeFilter,
    /// Decode a JPEG larger than the resize step needs at 1/2, 1/4 or 1/8 of its size, in the
    /// DCT domain (results still come back in the uploaded image's pixels). On by default;
    /// `original` models never scale.
    #[serde(default = "yes")]
    pub scaled_decode: bool,
    /// The datatype the protocols advertise for pixels (see [`PixelDatatype`]).
    #[serde(default)]
    pub pixel_datatype: PixelDatatype,
}

fn default_pad() -> u8 {
    114
}
fn default_scale() -> f32 {
    1.0 / 255.0
}
fn zeros() -> [f32; 3] {
    [0.0; 3]
}
fn ones() -> [f32; 3] {
    [1.0; 3]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputConvention {
    /// `Tensor [N, C]` of logits (or probabilities with `softmax = false`).
    Logits,
    /// `Tensor [N, C, H, W]`, or torchvision's `{"out": Tensor [N, C, H, W]}`.
    ClassLogits,
    /// `Tensor [N, 1, H, W]` of foreground probability, cut at `threshold`.
    ProbabilityMap,
    /// torchvision detectors: a list of CHW images in, `(losses, [{boxes, labels, scores}])` out
    /// (Mask R-CNN's dicts also hold `masks [K, 1, H, W]`, probabilities at the image's size).
    TorchvisionDetection,
    /// ultralytics YOLOv8 (and YOLO11): `Tensor [N, 4 + C, A]`, (cx, cy, w, h) in input pixels;
    /// `-pose` heads add `3 x J` rows of points, `-seg` heads `M` rows of mask coefficients and
    /// answer `(head, prototypes [N, M, H/4, W/4])`, `-obb` heads one row of angles (radians).
    Yolov8,
    /// ultralytics' NMS-free end-to-end heads (YOLOv10, YOLO26 exported with `nms=False`):
    /// `Tensor [N, K, 6]` of the head's picks, (x1, y1, x2, y2, score, class) in input pixels,
    /// best first; `-pose` rows add `3 x J` points, `-seg` rows `M` mask coefficients beside
    /// the prototypes. Answered without NMS.
    YoloEnd2end,
    /// `(boxes [N, A, 4], scores [N, A, C])`.
    BoxesScores,
    /// `Tensor [N, D]` of features, or a feature map `[N, D, H, W]` averaged over H and W.
    Features,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BoxLayout {
    #[default]
    Xyxy,
    Yxyx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BoxCoordinates {
    #[default]
    Pixels,
    Normalized,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub convention: OutputConvention,
    /// `logits`: apply softmax to get scores (false when the model already emits probabilities).
    #[serde(default = "yes")]
    pub softmax: bool,
    /// `probability_map`: pixels at or above this are the foreground class; an instance mask's
    /// pixels at or above it are the instance's.
    #[serde(default = "half")]
    pub threshold: f32,
    /// `boxes_scores`: the order of the four box numbers.
    #[serde(default)]
    pub box_layout: BoxLayout,
    /// `boxes_scores`: pixels of the model input, or 0..1 of its width and height.
    #[serde(default)]
    pub box_coordinates: BoxCoordinates,
    /// A class index that is never reported (the background of SSD-style heads).
    pub background_class: Option<usize>,
    /// `features`: scale each embedding to length 1, so a dot product is a cosine similarity.
    #[serde(default = "yes")]
    pub normalize: bool,
    /// `keypoints`: the names of the model's points, in its order; COCO's 17 when absent.
    #[serde(default)]
    pub keypoint_names: Option<Vec<String>>,
    /// `keypoints`: pairs of 0-based positions into the names that drawings join; COCO's
    /// skeleton when the names are COCO's, none otherwise.
    #[serde(default)]
    pub skeleton: Option<Vec<[usize; 2]>>,
    /// `keypoints`: points scoring below this are not drawn on overlays (results keep them).
    #[serde(default = "half")]
    pub keypoint_threshold: f32,
}

impl OutputSpec {
    /// `keypoints`: the names of the model's points, COCO's unless the config names its own.
    pub fn keypoint_names(&self) -> Vec<String> {
        match &self.keypoint_names {
            Some(names) => names.clone(),
            None => COCO_KEYPOINTS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `keypoints`: the edges drawings join, COCO's skeleton for COCO's points.
    pub fn skeleton(&self) -> Vec<[usize; 2]> {
        match (&self.skeleton, &self.keypoint_names) {
            (Some(edges), _) => edges.clone(),
            (None, None) => COCO_SKELETON.to_vec(),
            (None, Some(_)) => Vec::new(),
        }
    }
}

/// COCO's person keypoints, in the dataset's order (torchvision's Keypoint R-CNN and
/// ultralytics' `-pose` models both use it): the default `keypoint_names`.
pub const COCO_KEYPOINTS: [&str; 17] = [
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
];

/// COCO's person skeleton (`person_keypoints_*.json` lists it 1-based; here 0-based).
pub const COCO_SKELETON: [[usize; 2]; 19] = [
    [15, 13],
    [13, 11],
    [16, 14],
    [14, 12],
    [11, 12],
    [5, 11],
    [6, 12],
    [5, 6],
    [5, 7],
    [6, 8],
    [7, 9],
    [8, 10],
    [1, 2],
    [0, 1],
    [0, 2],
    [1, 3],
    [2, 4],
    [3, 5],
    [4, 6],
];

fn yes() -> bool {
    true
}
fn half() -> f32 {
    0.5
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// Most executors of the shared inference pool this model may use at once; all of them
    /// when absent.
    #[serde(default)]
    pub workers: Option<usize>,
    /// `cpu`, `cuda:N` or `auto` (the first GPU when there is one).
    #[serde(default = "cpu")]
    pub device: String,
    /// Intra-op threads for each forward pass; 0 (the default) divides the cores among the
    /// forwards running at that moment: all of them for a lone request.
    #[serde(default)]
    pub intra_op_threads: usize,
    /// Shared libraries with operators this model needs, loaded before it (relative to the
    /// model's folder or absolute).
    #[serde(default)]
    pub op_libraries: Vec<PathBuf>,
    /// Forward passes run before the model reports ready (TorchScript's profiling executor
    /// makes the first few slow).
    #[serde(default = "default_warmup")]
    pub warmup_runs: usize,
    /// With models loaded on demand (`--max-loaded-models`, `--memory-budget-mb`): load this
    /// one at start and never unload it to make room; the server's readiness waits for it.
    #[serde(default)]
    pub pinned: bool,
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        Self {
            workers: None,
            device: cpu(),
            intra_op_threads: 0,
            op_libraries: Vec::new(),
            warmup_runs: default_warmup(),
            pinned: false,
        }
    }
}

fn one() -> usize {
    1
}
fn cpu() -> String {
    "cpu".into()
}
fn default_warmup() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingSpec {
    /// Most images a worker runs in one forward pass.
    #[serde(default = "one")]
    pub max_batch_size: usize,
    /// How long an idle worker waits for more requests to fill a batch.
    #[serde(default)]
    pub max_delay_ms: u64,
    /// Requests waiting for a worker before new ones are refused with 503: a bound on memory.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// A request is refused at once (503) when its expected wait for a worker is over its own
    /// deadline, or over both this and the time its floor takes (16 images, or a full batch for
    /// each executor it may use if that is more): the queue is bounded by time, not only by
    /// count. 0 leaves only the deadline.
    #[serde(default = "default_max_queue_ms")]
    pub max_queue_ms: u64,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch_size: 1,
            max_delay_ms: 0,
            queue_capacity: default_queue(),
            max_queue_ms: default_max_queue_ms(),
        }
    }
}

fn default_queue() -> usize {
    64
}
fn default_max_queue_ms() -> u64 {
    DEFAULT_MAX_QUEUE_MS
}

/// The default wait a request may expect in a model's queue before it is refused.
pub const DEFAULT_MAX_QUEUE_MS: u64 = 100;

impl ModelConfig {
    /// The model file, relative to the model's folder.
    pub fn model_file(&self) -> PathBuf {
        match (&self.file, self.format) {
            (Some(file), _) => file.clone(),
            (None, ModelFormat::Torchscript) => PathBuf::from("model.pt"),
            (None, ModelFormat::Aoti) => PathBuf::from("model.pt2"),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let config: ModelConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the combinations serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        use OutputConvention::*;
        let task_fits = match self.task {
            Task::Classification => matches!(self.output.convention, Logits),
            Task::Segmentation => matches!(self.output.convention, ClassLogits | ProbabilityMap),
            Task::Detection => {
                matches!(self.output.convention, TorchvisionDetection | Yolov8 | YoloEnd2end | BoxesScores)
            }
            Task::Embedding => matches!(self.output.convention, Features),
            Task::InstanceSegmentation => matches!(self.output.convention, TorchvisionDetection | Yolov8 | YoloEnd2end),
            Task::Keypoints => matches!(self.output.convention, TorchvisionDetection | Yolov8 | YoloEnd2end),
            Task::OrientedDetection => matches!(self.output.convention, Yolov8),
        };
        if !task_fits {
            return Err(format!(
                "output convention {:?} does not fit task {:?}",
                self.output.convention, self.task
            ));
        }
        let input = &self.input;
        if input.width == 0 || input.height == 0 {
            return Err("input width and height must be positive".into());
        }
        match input.resize {
            ResizePolicy::ShorterSideCenterCrop => match input.resize_shorter {
                Some(s) if s >= input.width.min(input.height) => {}
                _ => {
                    return Err("shorter_side_center_crop needs resize_shorter ≥ the crop size".into())
                }
            },
            ResizePolicy::FitMultiple => {
                if input.max_side.unwrap_or(0) == 0 || input.multiple.unwrap_or(0) == 0 {
                    return Err("fit_multiple needs positive max_side and multiple".into());
                }
            }
            _ => {}
        }
        if matches!(self.task, Task::Classification | Task::Embedding)
            && !matches!(input.resize, ResizePolicy::ShorterSideCenterCrop | ResizePolicy::Stretch | ResizePolicy::Letterbox)
        {
            return Err(format!("{:?} needs a fixed input size (shorter_side_center_crop, stretch or letterbox)", self.task).to_lowercase());
        }
        if self.task == Task::Segmentation && input.resize == ResizePolicy::ShorterSideCenterCrop {
            return Err("segmentation masks must cover the whole image: use stretch, letterbox, fit_multiple or original".into());
        }
        if self.output.convention == TorchvisionDetection && input.resize != ResizePolicy::Original {
            return Err("torchvision_detection models resize internally: use resize = \"original\"".into());
        }
        if self.task == Task::Keypoints {
            let points = self.output.keypoint_names().len();
            if points == 0 {
                return Err("output.keypoint_names must name at least one point".into());
            }
            if let Some(edge) = self.output.skeleton().iter().find(|e| e.iter().any(|&i| i >= points)) {
                return Err(format!("output.skeleton edge {edge:?} names a point past the {points} keypoints"));
            }
        }
        if input.std.iter().any(|s| *s == 0.0) {
            return Err("input std must not be zero".into());
        }
        if self.runtime.workers == Some(0) {
            return Err("runtime.workers must be at least 1".into());
        }
        if self.batching.max_batch_size == 0 || self.batching.queue_capacity == 0 {
            return Err("batching.max_batch_size and batching.queue_capacity must be at least 1".into());
        }
        if self.format == ModelFormat::Aoti && self.output.convention == TorchvisionDetection {
            // Their input is a list of differently sized images; AOTInductor packages take
            // fixed-rank tensors (and torchvision's detectors do not export, see models/README.md).
            return Err("torchvision_detection models are served as TorchScript only (format = \"torchscript\")".into());
        }
        if !(0.0..=1.0).contains(&self.output.threshold) {
            return Err("output.threshold must be within 0..1".into());
        }
        if self.compile.precision != Precision::Fp32 && (self.format != ModelFormat::Aoti || self.compile.twin.is_none()) {
            // The INT8 or BF16 program is made from an FP32 version's at compile time (models/quantize.py).
            return Err(format!(
                "compile.precision = \"{}\" needs format = \"aoti\" and compile.twin naming the FP32 version",
                self.compile.precision.name()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIFIER: &str = r#"
        task = "classification"
        [input]
        width = 224
        height = 224
        resize = "shorter_side_center_crop"
        resize_shorter = 256
        mean = [0.485, 0.456, 0.406]
        std = [0.229, 0.224, 0.225]
        [output]
        convention = "logits"
    "#;

    #[test]
    fn parses_a_classifier_with_defaults() {
        let config = ModelConfig::parse(CLASSIFIER).unwrap();
        assert_eq!(config.task, Task::Classification);
        assert_eq!(config.model_file(), PathBuf::from("model.pt"));
        assert_eq!(config.runtime.workers, None);
        assert_eq!(config.batching.max_batch_size, 1);
        assert!((config.input.scale - 1.0 / 255.0).abs() < 1e-9);
    }

    #[test]
    fn rejects_a_convention_that_does_not_fit_the_task() {
        let text = CLASSIFIER.replace("\"logits\"", "\"yolov8\"");
        let err = ModelConfig::parse(&text).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn an_int8_or_bf16_version_is_an_aoti_package_made_from_a_twin() {
        for precision in ["int8", "bf16"] {
            let variant = format!("format = \"aoti\"\n{CLASSIFIER}\n[compile]\nprecision = \"{precision}\"\ntwin = \"2\"\n");
            let config = ModelConfig::parse(&variant).unwrap();
            assert_eq!(config.compile.precision.name(), precision);
            let no_twin = variant.replace("twin = \"2\"\n", "");
            let err = ModelConfig::parse(&no_twin).unwrap_err();
            assert!(err.contains(&format!("compile.precision = \"{precision}\" needs")) && err.contains("twin"), "{err}");
            let torchscript = variant.replace("format = \"aoti\"\n", "");
            assert!(ModelConfig::parse(&torchscript).unwrap_err().contains("needs format = \"aoti\""));
        }
        let unknown = format!("format = \"aoti\"\n{CLASSIFIER}\n[compile]\nprecision = \"fp16\"\ntwin = \"2\"\n");
        assert!(ModelConfig::parse(&unknown).is_err(), "a precision no build makes is refused");
    }

    #[test]
    fn an_aoti_model_defaults_to_model_pt2() {
        let text = format!("format = \"aoti\"\n{CLASSIFIER}");
        let config = ModelConfig::parse(&text).unwrap();
        assert_eq!(config.format, ModelFormat::Aoti);
        assert_eq!(config.model_file(), PathBuf::from("model.pt2"));
        let named = format!("format = \"aoti\"\nfile = \"m.pt2\"\n{CLASSIFIER}");
        assert_eq!(ModelConfig::parse(&named).unwrap().model_file(), PathBuf::from("m.pt2"));
    }

    #[test]
    fn rejects_unknown_fields() {
        let text = CLASSIFIER.replace("[output]", "colour = 1\n[output]");
        assert!(ModelConfig::parse(&text).is_err());
    }

    #[test]
    fn rejects_centre_crop_without_shorter_side() {
        let text = CLASSIFIER.replace("resize_shorter = 256", "");
        assert!(ModelConfig::parse(&text).unwrap_err().contains("resize_shorter"));
    }

    const POSE: &str = r#"
        task = "keypoints"
        [input]
        width = 320
        height = 320
        resize = "letterbox"
        pad_value = 114
        resize_filter = "opencv_linear"
        [output]
        convention = "yolov8"
    "#;

    #[test]
    fn keypoints_default_to_coco_points_and_skeleton() {
        let config = ModelConfig::parse(POSE).unwrap();
        assert_eq!(config.task, Task::Keypoints);
        assert_eq!(config.input.resize_filter, ResizeFilter::OpencvLinear);
        assert_eq!(config.output.keypoint_names().len(), 17);
        assert_eq!(config.output.skeleton().len(), 19);
    }

    #[test]
    fn own_keypoints_have_no_skeleton_unless_named_and_edges_stay_in_range() {
        let own = POSE.replace("convention = \"yolov8\"", "convention = \"yolov8\"\nkeypoint_names = [\"a\", \"b\", \"c\"]");
        assert!(ModelConfig::parse(&own).unwrap().output.skeleton().is_empty());
        let joined = own.replace("\"c\"]", "\"c\"]\nskeleton = [[0, 1], [1, 2]]");
        assert_eq!(ModelConfig::parse(&joined).unwrap().output.skeleton(), vec![[0, 1], [1, 2]]);
        let past = own.replace("\"c\"]", "\"c\"]\nskeleton = [[0, 3]]");
        assert!(ModelConfig::parse(&past).unwrap_err().contains("past the 3 keypoints"));
        let none = POSE.replace("convention = \"yolov8\"", "convention = \"yolov8\"\nkeypoint_names = []");
        assert!(ModelConfig::parse(&none).unwrap_err().contains("at least one point"));
    }

    #[test]
    fn keypoints_need_a_detector_convention() {
        let text = POSE.replace("\"yolov8\"", "\"logits\"");
        assert!(ModelConfig::parse(&text).unwrap_err().contains("does not fit"));
    }
}
