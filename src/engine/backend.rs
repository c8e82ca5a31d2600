//! The backend: a model file loaded in its format (TorchScript or AOTInductor package) on its
//! device, warmed up, and one forward pass over a group of prepared images turned into plain
//! Rust outputs. The batcher decides which images go together; this decides how they run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{CModule, Device, IValue, Kind, Tensor};

use super::admission::ServiceTime;
use super::policy::{batch_sizes, cheapest_batch, stop_measuring};
use super::aoti::AotiModel;
use super::first_line;
use super::outputs::{parse_batched, parse_torchvision_detection, DetectionExtras, raw_tensors, scale_normalised, RawData, RawTensor};
use super::statistics::{BatchStatistics, ForwardTimes};
use super::{EngineError, JobOptions};
use crate::image::{Geometry, PreparedImage};
use crate::model_config::{ModelConfig, ModelFormat, OutputConvention, ResizePolicy, Task};
use crate::tasks::keypoints::KeypointSchema;
use crate::tasks::ModelOutput;

/// A loaded, warmed-up model, ready to get workers.
pub struct LoadedModel {
    backend: Backend,
    device: Device,
    pub parameter_count: u64,
    /// The model's own outputs as the warm-up saw them.
    pub raw_outputs: Vec<RawOutputSpec>,
    /// Forward time per image, measured over the model's life (seeded by the warm-up) and
    /// shared by every pool of workers over it: what admission estimates waits from.
    pub service: Arc<ServiceTime>,
    /// The most images a forward takes: `batching.max_batch_size`, or on the CPU the smaller
    /// batch that measured as cheap per image at load (see `cheapest_batch`).
    pub batch_bound: usize,
    /// Forward passes run for requests since the load (Triton's `execution_count`).
    pub executions: std::sync::atomic::AtomicU64,
    /// Their stage times per batch size (Triton's `batch_stats`).
    pub batch_statistics: BatchStatistics,
}

/// The model format, hidden from everything above `run_images`: both take input tensors and
/// give back an `IValue` that the output conventions parse the same way. Public so that the
/// bench's in-process ceiling runs exactly what the workers run.
pub enum Backend {
    TorchScript(CModule),
    Aoti(AotiModel),
}

impl Backend {
    /// Loads the model file in the config's format; also returns its parameter count (0 for a
    /// package, whose weights are compiled in: the config's provenance has the count).
    pub fn load(config: &ModelConfig, model_file: &Path, device: Device) -> Result<(Backend, u64), String> {
        match config.format {
            ModelFormat::Torchscript => {
                let mut module = CModule::load_on_device(model_file, device)
                    .map_err(|e| format!("TorchScript load failed: {}", first_line(&e.to_string())))?;
                module.set_eval();
                let parameter_count = module
                    .named_parameters()
                    .map(|params| params.iter().map(|(_, t)| t.numel() as u64).sum())
                    .unwrap_or(0);
                Ok((Backend::TorchScript(module), parameter_count))
            }
            ModelFormat::Aoti => {
                // One runner per forward the machine could usefully run at once; more
                // executors than runners wait for a free one rather than fail.
                let runners = config.runtime.workers.unwrap_or(0).max(available_cores());
                let package = AotiModel::load(model_file, device, runners)?;
                if package.info.max_batch < config.batching.max_batch_size {
                    return Err(format!(
                        "the package accepts batches of up to {} images, the config asks for batching.max_batch_size = {}; \
                         lower it or export again with a larger batch bound",
                        package.info.max_batch, config.batching.max_batch_size
                    ));
                }
                // The metadata and metrics say the config's precision: the package must agree.
                let precision = config.compile.precision.name();
                if package.info.precision != precision {
                    return Err(format!(
                        "the package computes in {}, the config says compile.precision = \"{precision}\"; compile it from \
                         this folder's config (make models, or models/aoti.py compile-repo)",
                        package.info.precision
                    ));
                }
                Ok((Backend::Aoti(package), 0))
            }
        }
    }

    pub fn forward(&self, input: IValue) -> Result<IValue, EngineError> {
        match self {
            Backend::TorchScript(module) => {
                module.forward_is(&[input]).map_err(|e| EngineError::Forward(first_line(&e.to_string()).to_string()))
            }
            Backend::Aoti(package) => {
                let IValue::Tensor(batch) = input else {
                    return Err(EngineError::Forward("AOTInductor packages take one stacked tensor".into()));
                };
                // An exported program's outputs are a flat list: one tensor reads like a plain
                // tensor output, several like a tuple (dicts are flattened in key order).
                let mut outputs = package.run(&[&batch]).map_err(EngineError::Forward)?;
                Ok(match outputs.len() {
                    1 => IValue::Tensor(outputs.remove(0)),
                    _ => IValue::Tuple(outputs.into_iter().map(IValue::Tensor).collect()),
                })
            }
        }
    }
}

/// Name, datatype and shape (batch and variable dimensions -1) of one raw output.
#[derive(Debug, Clone, PartialEq)]
pub struct RawOutputSpec {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        s if s.starts_with("cuda") => {
            let index = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| format!("bad device '{s}'"))?,
                None if s == "cuda" => 0,
                None => return Err(format!("bad device '{s}'")),
            };
            if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
                return Err(format!("device '{s}' is not available on this machine"));
            }
            Ok(Device::Cuda(index))
        }
        other => Err(format!("unknown device '{other}' (use cpu, cuda:N or auto)")),
    }
}

/// Loads the model file (TorchScript or AOTInductor package) and checks it with `warmup_runs`
/// forward passes on a blank input of the configured size, so a model whose output does not
/// fit its config fails here, at start-up, rather than on the first request.
pub fn load_model(config: &ModelConfig, model_file: &Path) -> Result<LoadedModel, String> {
    let device = parse_device(&config.runtime.device)?;
    // One thread here, whatever the workers get: a thread that has run a multi-threaded
    // OpenMP region keeps its thread team, and a second team slows the next one down (probably
    // libgomp spinning less with more threads than cores; measured: BENCHMARKS.md, "Figures
    // behind the code's choices"). The loading thread never needs a team, reading the file
    // included (it ran before this was set, and left a team behind).
    tch::set_num_threads(1);
    let (backend, parameter_count) = Backend::load(config, model_file, device)?;
    let mut model =
        LoadedModel {
            backend,
            device,
            parameter_count,
            raw_outputs: Vec::new(),
            service: Arc::new(ServiceTime::new(Default::default())),
            batch_bound: config.batching.max_batch_size.max(1),
            executions: Default::default(),
            batch_statistics: BatchStatistics::new(config.batching.max_batch_size),
        };
    let mut last_run = Default::default();
    let _no_grad = tch::no_grad_guard();
    let (w, h) = warmup_size(config);
    let variable_size = matches!(config.input.resize, ResizePolicy::Original | ResizePolicy::FitMultiple);
    // One blank input of the configured size, for the warm-up and the batch costs below.
    let blank = PreparedImage { data: vec![0.0; (w * h * 3) as usize], geometry: Geometry::identity(w, h) };
    for run in 0..config.runtime.warmup_runs.max(1) {
        // The first run also reads the model's own outputs, to describe them in metadata.
        let want_raw = run == 0 && config.output.convention != OutputConvention::TorchvisionDetection;
        let clock = LoaderClock::start(device);
        let outputs = run_images(&model, config, &[&blank], JobOptions { score_threshold: 1.0, want_confidence: false, want_raw }, &mut ForwardTimes::default())
            .map_err(|e| format!("warm-up failed: {e}"))?;
        last_run = clock.elapsed();
        if let Some((_, raw)) = outputs.first().filter(|_| want_raw) {
            model.raw_outputs = raw
                .iter()
                .map(|t| RawOutputSpec {
                    name: t.name.clone(),
                    datatype: match t.data {
                        RawData::Fp32(_) => "FP32",
                        RawData::Int64(_) => "INT64",
                    },
                    // Spatial sizes follow the input's when the input size varies.
                    shape: std::iter::once(-1).chain(t.shape.iter().map(|&d| if variable_size && d > 1 { -1 } else { d })).collect(),
                })
                .collect();
        }
    }
    // On one thread, the last warm-up run overestimates a worker's forward: a cautious start
    // that the first batches correct.
    model.service = Arc::new(ServiceTime::new(last_run));
    if device == Device::Cpu && config.batching.max_batch_size > 1 {
        model.batch_bound = measure_batch_bound(&model, config, &blank)?;
    }
    Ok(model)
}

/// The batch bound on a CPU (`policy::cheapest_batch`): one-thread forwards of 1, 2, 4, ... up
/// to `max_batch_size` blank images, timed.
fn measure_batch_bound(model: &LoadedModel, config: &ModelConfig, blank: &PreparedImage) -> Result<usize, String> {
    let options = JobOptions { score_threshold: 1.0, want_confidence: false, want_raw: false };
    let per_image = |size: usize| {
        let images = vec![blank; size];
        // The better of two runs: the first at a new size also pays for its allocations.
        (0..2)
            .map(|_| {
                let clock = LoaderClock::start(model.device);
                run_images(model, config, &images, options, &mut ForwardTimes::default()).map(|_| clock.elapsed().as_secs_f64() / size as f64)
            })
            .try_fold(f64::INFINITY, |best, run| run.map(|t| best.min(t)))
    };
    let mut sizes = batch_sizes(config.batching.max_batch_size);
    let mut costs: Vec<f64> = Vec::with_capacity(sizes.len());
    for &size in &sizes {
        costs.push(per_image(size).map_err(|e| format!("warm-up failed: {e}"))?);
        if stop_measuring(&costs) {
            break;
        }
    }
    sizes.truncate(costs.len());
    let bound = cheapest_batch(&sizes, &costs);
    if bound < config.batching.max_batch_size {
        tracing::info!(
            batch_bound = bound,
            max_batch_size = config.batching.max_batch_size,
            per_image_ms = ?costs.iter().map(|c| (c * 1e4).round() / 10.0).collect::<Vec<_>>(),
            "larger batches measured no cheaper per image on this CPU; batching up to the bound"
        );
    }
    Ok(bound)
}

/// Times the loader's forwards. On the CPU they run on the loading thread alone (one
/// intra-op thread), so the thread's own CPU time is what a forward costs, whatever else the
/// cores are doing: a load beside serving traffic (a polled one runs at idle priority) is
/// preempted by every batch, and wall time would count their work as this model's, seeding
/// admission with a slow forward and the batch bound with noise. On a GPU the forward is
/// asynchronous work elsewhere, so there wall time.
enum LoaderClock {
    Cpu(Duration),
    Wall(Instant),
}

impl LoaderClock {
    fn start(device: Device) -> Self {
        match device {
            Device::Cpu => LoaderClock::Cpu(thread_cpu_time()),
            _ => LoaderClock::Wall(Instant::now()),
        }
    }

    fn elapsed(&self) -> Duration {
        match self {
            LoaderClock::Cpu(start) => thread_cpu_time().saturating_sub(*start),
            LoaderClock::Wall(start) => start.elapsed(),
        }
    }
}

fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives on this stack.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now);
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn warmup_size(config: &ModelConfig) -> (u32, u32) {
    let input = &config.input;
    match input.resize {
        ResizePolicy::FitMultiple => {
            let m = input.multiple.unwrap_or(32).max(1);
            (input.width.div_ceil(m) * m, input.height.div_ceil(m) * m)
        }
        _ => (input.width, input.height),
    }
}

/// Runs one forward pass over `images` (grouped by size where the model takes a stacked
/// batch) and parses the outputs. A panic inside libtorch or the parser becomes an error for
/// these images only. `times` gains the forward's stage times.
pub(super) fn run_images(
    model: &LoadedModel,
    config: &ModelConfig,
    images: &[&PreparedImage],
    options: JobOptions,
    times: &mut ForwardTimes,
) -> Result<Vec<(ModelOutput, Vec<RawTensor>)>, EngineError> {
    catch_unwind(AssertUnwindSafe(|| run_images_inner(model, config, images, options, times)))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(|s| s.as_str())
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            Err(EngineError::Forward(first_line(message).to_string()))
        })
}

/// A tensor over `data` without copying it (for CPU; other devices get their copy). The
/// tensor must not outlive `data`: every caller converts outputs to Rust data first.
fn borrowed_tensor(data: &[f32], size: &[i64], device: Device) -> Tensor {
    assert_eq!(data.len() as i64, size.iter().product::<i64>(), "tensor size matches its data");
    let mut strides = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * size[i + 1];
    }
    // SAFETY: `data` is a live, contiguous f32 slice of exactly `size` elements, and the
    // tensor (and anything viewing it) is dropped before `data` in every caller.
    let tensor = unsafe { Tensor::from_blob(data.as_ptr() as *const u8, size, &strides, Kind::Float, Device::Cpu) };
    if device == Device::Cpu {
        tensor
    } else {
        tensor.to_device(device)
    }
}

fn image_tensor(image: &PreparedImage, device: Device) -> Tensor {
    let g = &image.geometry;
    borrowed_tensor(&image.data, &[3, g.input_height as i64, g.input_width as i64], device)
}

fn run_images_inner(
    model: &LoadedModel,
    config: &ModelConfig,
    images: &[&PreparedImage],
    options: JobOptions,
    times: &mut ForwardTimes,
) -> Result<Vec<(ModelOutput, Vec<RawTensor>)>, EngineError> {
    let mut stage = Instant::now();
    let mut lap = |into: &mut std::time::Duration| {
        let now = Instant::now();
        *into += now - stage;
        stage = now;
    };
    let extras = match config.task {
        Task::InstanceSegmentation => DetectionExtras::Masks { threshold: config.output.threshold },
        Task::Keypoints => DetectionExtras::Keypoints(Arc::new(KeypointSchema::of(&config.output))),
        Task::OrientedDetection => DetectionExtras::Angle,
        _ => DetectionExtras::None,
    };
    if config.output.convention == OutputConvention::TorchvisionDetection {
        let list: Vec<Tensor> = images.iter().map(|img| image_tensor(img, model.device)).collect();
        lap(&mut times.input);
        let output = model.backend.forward(IValue::TensorList(list))?;
        lap(&mut times.infer);
        // Per-image dicts of boxes, labels and scores: no stacked raw outputs to offer.
        let parsed = parse_torchvision_detection(output, images.len(), options.score_threshold, &extras)?;
        lap(&mut times.output);
        return Ok(parsed.into_iter().map(|o| (o, Vec::new())).collect());
    }
    // Stacked batches need one size: group by input size, keeping each image's slot.
    let mut outputs: Vec<Option<(ModelOutput, Vec<RawTensor>)>> = vec![None; images.len()];
    let mut pending: Vec<usize> = (0..images.len()).collect();
    while let Some(&lead) = pending.first() {
        let size = (images[lead].geometry.input_width, images[lead].geometry.input_height);
        let (group, rest): (Vec<usize>, Vec<usize>) = pending
            .iter()
            .partition(|&&i| (images[i].geometry.input_width, images[i].geometry.input_height) == size);
        pending = rest;
        // One copy to lay the images side by side; a lone image is used where it lies.
        let joined: Vec<f32>;
        let data: &[f32] = if group.len() == 1 {
            &images[lead].data
        } else {
            joined = group.iter().flat_map(|&i| images[i].data.iter().copied()).collect();
            &joined
        };
        let batch = borrowed_tensor(data, &[group.len() as i64, 3, size.1 as i64, size.0 as i64], model.device);
        lap(&mut times.input);
        let output = model.backend.forward(IValue::Tensor(batch))?;
        lap(&mut times.infer);
        let mut raw = if options.want_raw { raw_tensors(&output, group.len())? } else { vec![Vec::new(); group.len()] };
        let mut parsed = parse_batched(output, &config.output, group.len(), options, &extras)?;
        scale_normalised(&mut parsed, &config.output, &vec![size; group.len()]);
        for ((slot, out), raw) in group.into_iter().zip(parsed).zip(raw.drain(..)) {
            outputs[slot] = Some((out, raw));
        }
        lap(&mut times.output);
    }
    Ok(outputs.into_iter().map(|o| o.expect("every image has an output")).collect())
}
