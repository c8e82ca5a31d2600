//! The ceiling: the same model file run in process by `engine::Backend` (exactly what the
//! workers run), no HTTP, for each worker/thread split and batch size, with decode and
//! preprocessing excluded and included.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, IValue, Tensor};
use visionserve::engine::Backend;
use visionserve::image::{decode_image, preprocess, DecodeLimits};
use visionserve::model_config::{ModelConfig, ModelFormat, OutputConvention};

use crate::{Split, SPLITS};

#[derive(Clone, Debug)]
pub struct Ceiling {
    pub split: Split,
    pub batch: usize,
    pub with_preprocessing: bool,
    pub images_per_second: f64,
}

/// A numbered version folder is named after its model.
pub fn model_name(dir: &Path) -> String {
    let leaf = dir.file_name().unwrap().to_string_lossy().to_string();
    if leaf.chars().all(|c| c.is_ascii_digit()) {
        if let Some(parent) = dir.canonicalize().ok().and_then(|d| d.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string())) {
            return parent;
        }
    }
    leaf
}

pub fn format_name(format: ModelFormat) -> &'static str {
    match format {
        ModelFormat::Torchscript => "torchscript",
        ModelFormat::Aoti => "aoti",
    }
}

pub fn measure_ceiling(dir: &Path, config: &ModelConfig, body: &[u8]) -> Vec<Ceiling> {
    let file = dir.join(config.model_file());
    let (backend, _) = Backend::load(config, &file, Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let module = Arc::new(backend);
    let mut out = Vec::new();
    for split in SPLITS {
        for batch in [1usize, 4, 8] {
            for with_preprocessing in [false, true] {
                let images_per_second = ceiling_run(&module, config, body, split, batch, with_preprocessing, Duration::from_secs(2));
                println!("        {} × {} threads, batch {batch}, preprocessing {}: {images_per_second:.1} img/s",
                    split.workers, split.threads, if with_preprocessing { "included" } else { "excluded" });
                out.push(Ceiling { split, batch, with_preprocessing, images_per_second });
            }
        }
    }
    out
}

pub fn ceiling_run(module: &Arc<Backend>, config: &ModelConfig, body: &[u8], split: Split, batch: usize, with_preprocessing: bool, duration: Duration) -> f64 {
    let images = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..split.workers)
        .map(|_| {
            let module = Arc::clone(module);
            let config = config.clone();
            let body = body.to_vec();
            let images = Arc::clone(&images);
            std::thread::spawn(move || {
                let _guard = tch::no_grad_guard();
                tch::set_num_threads(split.threads as i32);
                let prepare = || {
                    let rgb = decode_image(&body, DecodeLimits { max_pixels: u64::MAX }).unwrap();
                    preprocess(&rgb, &config.input).unwrap()
                };
                let fixed = prepare();
                let run = |data: &[f32], n: usize| {
                    let g = fixed.geometry;
                    let input = Tensor::from_slice(data).view([n as i64, 3, g.input_height as i64, g.input_width as i64]);
                    if config.output.convention == OutputConvention::TorchvisionDetection {
                        let list: Vec<Tensor> = (0..n as i64).map(|i| input.get(i)).collect();
                        module.forward(IValue::TensorList(list)).unwrap();
                    } else {
                        module.forward(IValue::Tensor(input)).unwrap();
                    }
                };
                let batch_data: Vec<f32> = (0..batch).flat_map(|_| fixed.data.iter().copied()).collect();
                for _ in 0..5 {
                    run(&batch_data, batch); // warm-up: the profiling executor's first runs
                }
                let started = Instant::now();
                while started.elapsed() < duration {
                    if with_preprocessing {
                        let data: Vec<f32> = (0..batch).flat_map(|_| prepare().data).collect();
                        run(&data, batch);
                    } else {
                        run(&batch_data, batch);
                    }
                    images.fetch_add(batch as u64, Ordering::Relaxed);
                }
                started.elapsed()
            })
        })
        .collect();
    let elapsed = handles.into_iter().map(|h| h.join().unwrap()).max().unwrap();
    images.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}
