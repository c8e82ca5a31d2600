//! Server configuration: one clap `Parser`, every flag with an environment fallback, checked once.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "visionserve", version, about = "Serve libtorch vision models over REST")]
pub struct ServerConfig {
    /// Address to listen on. Binds to loopback unless told otherwise.
    #[arg(long, env = "VISIONSERVE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Folder holding one sub-folder per model (config.toml, model file, optional labels).
    #[arg(long, env = "VISIONSERVE_MODEL_REPOSITORY", default_value = "models")]
    pub model_repository: PathBuf,

    /// Serve only these models (comma separated); all models in the repository when empty.
    #[arg(long, env = "VISIONSERVE_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,

    /// Shared libraries holding extra TorchScript operators, loaded before any model
    /// (colon separated, like a library path). torchvision's detectors need its `_C.so`.
    #[arg(long, env = "VISIONSERVE_OP_LIBRARIES", value_delimiter = ':')]
    pub op_libraries: Vec<PathBuf>,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "VISIONSERVE_MAX_BODY_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest decoded image accepted, in pixels (width × height), checked before decoding.
    /// The default admits 8K photos (7680 × 4320).
    #[arg(long, env = "VISIONSERVE_MAX_IMAGE_PIXELS", default_value_t = 7680 * 4320)]
    pub max_image_pixels: u64,

    /// Most images accepted in one request.
    #[arg(long, env = "VISIONSERVE_MAX_IMAGES_PER_REQUEST", default_value_t = 32)]
    pub max_images_per_request: usize,

    /// Default time a predict request may take, queue and inference included, before it is
    /// answered 504 and dropped from the queue. A request may ask for another with the
    /// `x-request-timeout-ms` header.
    #[arg(long, env = "VISIONSERVE_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// CPU threads for decoding and preprocessing; 0 means one per core.
    #[arg(long, env = "VISIONSERVE_PREPROCESS_THREADS", default_value_t = 0)]
    pub preprocess_threads: usize,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "VISIONSERVE_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    /// Do not serve: ask the server at --addr whether it is ready and exit 0 (ready) or 1.
    /// For container health checks in images without curl.
    #[arg(long)]
    pub check_ready: bool,
}

impl ServerConfig {
    /// Checks what clap cannot, once, right after parsing.
    pub fn validate(&self) -> Result<(), String> {
        if self.check_ready {
            return Ok(());
        }
        if self.max_body_bytes == 0 {
            return Err("--max-body-bytes must be positive".into());
        }
        if self.max_image_pixels == 0 {
            return Err("--max-image-pixels must be positive".into());
        }
        if self.request_timeout_ms == 0 {
            return Err("--request-timeout-ms must be positive".into());
        }
        if self.max_images_per_request == 0 {
            return Err("--max-images-per-request must be positive".into());
        }
        if !self.model_repository.is_dir() {
            return Err(format!(
                "model repository {} is not a folder",
                self.model_repository.display()
            ));
        }
        Ok(())
    }

    pub fn preprocess_thread_count(&self) -> usize {
        if self.preprocess_threads > 0 {
            self.preprocess_threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}
