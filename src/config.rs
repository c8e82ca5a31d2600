//! Server configuration: one clap `Parser`, every flag with an environment fallback, checked once.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "visionserve", version, about = "Serve libtorch vision models over REST and gRPC")]
pub struct ServerConfig {
    /// Address to listen on. Binds to loopback unless told otherwise.
    #[arg(long, env = "VISIONSERVE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Address of the gRPC server (the Open Inference Protocol's `inference.GRPCInferenceService`,
    /// Triton's extensions, health and reflection), or `off`.
    #[arg(long, env = "VISIONSERVE_GRPC_ADDR", default_value = "127.0.0.1:8081")]
    pub grpc_addr: OptionalAddr,

    /// Largest gRPC message accepted, in bytes; a larger one is refused RESOURCE_EXHAUSTED.
    /// Defaults to --max-body-bytes.
    #[arg(long, env = "VISIONSERVE_GRPC_MAX_MESSAGE_BYTES")]
    pub grpc_max_message_bytes: Option<usize>,

    /// Frames of one ModelStreamInfer stream in flight at once (queued, running, or answered
    /// but not yet read by the client); the stream reads no more until one is answered, so
    /// one client cannot fill a queue alone.
    #[arg(long, env = "VISIONSERVE_GRPC_STREAM_MAX_IN_FLIGHT", default_value_t = 8)]
    pub grpc_stream_max_in_flight: usize,

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

    /// How long a request refused for overload (503 with `Retry-After`, gRPC UNAVAILABLE) is
    /// held before its answer, never past its own deadline; 0 answers at once. Clients that
    /// retry without waiting then cost a refusal per this many milliseconds each instead of one
    /// per round trip, which keeps a retry storm from taking the cores the admitted requests
    /// need (see docs/scaling.md).
    #[arg(long, env = "VISIONSERVE_REFUSAL_DELAY_MS", default_value_t = 50)]
    pub refusal_delay_ms: u64,

    /// Inference threads shared by every loaded model: how many forward passes run at once,
    /// whatever the models. 0 means one per core.
    #[arg(long, env = "VISIONSERVE_INFERENCE_THREADS", default_value_t = 0)]
    pub inference_threads: usize,

    /// CPU threads for decoding and preprocessing; 0 means one per core.
    #[arg(long, env = "VISIONSERVE_PREPROCESS_THREADS", default_value_t = 0)]
    pub preprocess_threads: usize,

    /// Models on demand: at most this many model versions loaded at once. Versions not
    /// pinned (`runtime.pinned`) load on their first request; the least recently used
    /// unpinned one is unloaded to make room. Unset with --memory-budget-mb unset: every
    /// model loads at start, as always.
    #[arg(long, env = "VISIONSERVE_MAX_LOADED_MODELS")]
    pub max_loaded_models: Option<usize>,

    /// Models on demand: the loaded versions' estimated memory stays within this many MiB
    /// (an estimate per version from its load and warm-up; see docs). Same rules as
    /// --max-loaded-models; both may be set.
    #[arg(long, env = "VISIONSERVE_MEMORY_BUDGET_MB")]
    pub memory_budget_mb: Option<u64>,

    /// Bytes the response cache may hold: each image's finished result per model version and
    /// parameters, keyed by a SHA-256 of the image, least recently used evicted first. 0 (the
    /// default) turns it off: not every deployment sees repeated inputs.
    #[arg(long, env = "VISIONSERVE_RESPONSE_CACHE_BYTES", default_value_t = 0)]
    pub response_cache_bytes: usize,

    /// The FFmpeg program that decodes uploaded videos (a name on PATH or a path); `ffprobe`
    /// is looked for beside it. Without it the server runs, and answers video requests 501.
    #[arg(long, env = "VISIONSERVE_FFMPEG", default_value = "ffmpeg")]
    pub ffmpeg: PathBuf,

    /// Largest video upload, in bytes (written to a temporary file while it is answered).
    #[arg(long, env = "VISIONSERVE_MAX_VIDEO_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_video_bytes: usize,

    /// Most frames one video request is answered (a request's `max_frames` may ask for fewer).
    #[arg(long, env = "VISIONSERVE_MAX_VIDEO_FRAMES", default_value_t = 3600)]
    pub max_video_frames: usize,

    /// Frames of one video in the model's queue at once: enough for the model to batch them,
    /// few enough that one video does not fill the queue other requests share.
    #[arg(long, env = "VISIONSERVE_VIDEO_FRAMES_IN_FLIGHT", default_value_t = 4)]
    pub video_frames_in_flight: usize,

    /// Live streams: the sources `POST /v1/streams` may open, comma separated:
    /// `rtsp://host[:port]`, `http(s)://host[:port]`, `scheme://*` for any host of a scheme,
    /// `file:///folder` for files under a folder. Unset, streams are off: a server that opens
    /// URLs its clients name can be made to reach into its own network (see SECURITY.md).
    #[arg(long, env = "VISIONSERVE_STREAMS_ALLOW", value_delimiter = ',')]
    pub streams_allow: Vec<String>,

    /// Live streams running at once.
    #[arg(long, env = "VISIONSERVE_MAX_STREAMS", default_value_t = 16)]
    pub max_streams: usize,

    /// The longest wait, in milliseconds, between two tries at reopening a stream's lost
    /// source (the waits double from 100 ms up to this).
    #[arg(long, env = "VISIONSERVE_STREAM_RECONNECT_MAX_MS", default_value_t = 1000)]
    pub stream_reconnect_max_ms: u64,

    /// OTLP endpoint to export traces to (a collector: `http://host:4318` for HTTP/protobuf,
    /// `http://host:4317` with OTEL_EXPORTER_OTLP_PROTOCOL=grpc). Unset, the standard
    /// OTEL_EXPORTER_OTLP_ENDPOINT is used; with neither, tracing is off.
    #[arg(long, env = "VISIONSERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "VISIONSERVE_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    /// API keys that inference routes require as `Authorization: Bearer <key>` (comma
    /// separated). None configured: inference is open. Never logged.
    #[arg(long, env = "VISIONSERVE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,

    /// A file with one API key a line (blank lines and `#` comments skipped), added to
    /// --api-keys; keeps keys out of the process environment.
    #[arg(long, env = "VISIONSERVE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Token the management routes (`/v2/repository/*`, `/models*`) require as
    /// `Authorization: Bearer <token>`. The management API is off unless one is configured.
    /// Never logged.
    #[arg(long, env = "VISIONSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A file holding the admin token (first non-comment line), instead of --admin-token.
    #[arg(long, env = "VISIONSERVE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Origins allowed to call the API from a browser (comma separated, `*` for any). CORS is
    /// off when empty.
    #[arg(long, env = "VISIONSERVE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Seconds a client may take to send its request body; a slower upload is cut off and
    /// refused, so slow clients cannot hold a request open indefinitely.
    #[arg(long, env = "VISIONSERVE_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub body_timeout_secs: u64,

    /// Seconds a client may take to send a request's headers (slowloris protection); also
    /// how long an idle keep-alive connection stays open.
    #[arg(long, env = "VISIONSERVE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// Most client connections open at once; one more is answered 503 and closed.
    #[arg(long, env = "VISIONSERVE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// On SIGTERM or SIGINT: seconds to let accepted and queued requests finish before the
    /// process exits anyway (with status 1).
    #[arg(long, env = "VISIONSERVE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// On SIGTERM or SIGINT: seconds to go on serving with readiness already off (503 on
    /// /health/ready, NOT_SERVING on gRPC health) before the listeners close, so a load
    /// balancer that polls readiness (a proxy, a swarm stack's HAProxy) stops routing here
    /// first. 0 closes them at once; Kubernetes gets the same from a preStop pause.
    #[arg(long, env = "VISIONSERVE_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,

    /// Repository polling: read the repository again every this many seconds, and load new
    /// model folders, reload changed ones (each loaded beside the old and swapped in) and
    /// unload removed ones. Off (0) by default: the management API does it on request.
    #[arg(long, env = "VISIONSERVE_REPOSITORY_POLL_SECS", default_value_t = 0)]
    pub repository_poll_secs: u64,

    /// Repository polling: a changed folder is taken only once its files have not changed for
    /// this many seconds, so a model being copied in is never loaded half-way.
    #[arg(long, env = "VISIONSERVE_REPOSITORY_POLL_SETTLE_SECS", default_value_t = 10)]
    pub repository_poll_settle_secs: u64,

    /// TLS: the certificate chain (PEM, the server's certificate first) both listeners serve;
    /// with --tls-key. Re-read when the file changes or on SIGHUP, so a renewal needs no
    /// restart. Without it both listeners speak plain HTTP and plain gRPC.
    #[arg(long, env = "VISIONSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS: the certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "VISIONSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: CA certificates (PEM) that clients' certificates must chain to. A client
    /// with another certificate fails the handshake; one with none may call only the health
    /// probes (401 / UNAUTHENTICATED otherwise). Needs --tls-cert.
    #[arg(long, env = "VISIONSERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Do not serve: ask the server at --addr whether it is ready and exit 0 (ready) or 1.
    /// For container health checks in images without curl; over TLS when --tls-cert is set.
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
        if self.max_connections == 0 || self.header_read_timeout_secs == 0 || self.body_timeout_secs == 0 {
            return Err("--max-connections, --header-read-timeout-secs and --body-timeout-secs must be positive".into());
        }
        if self.grpc_max_message_bytes == Some(0) || self.grpc_stream_max_in_flight == 0 {
            return Err("--grpc-max-message-bytes and --grpc-stream-max-in-flight must be positive".into());
        }
        if self.max_loaded_models == Some(0) || self.memory_budget_mb == Some(0) {
            return Err("--max-loaded-models and --memory-budget-mb must be positive".into());
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

    /// Keys from the flag and the file, trimmed, empty ones dropped.
    pub fn load_api_keys(&self) -> Result<Vec<String>, String> {
        let mut keys: Vec<String> = self.api_keys.iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
        if let Some(path) = &self.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --api-keys-file {}: {e}", path.display()))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        }
        Ok(keys)
    }

    /// The admin token from the flag or the file; `None` keeps the management API off.
    pub fn load_admin_token(&self) -> Result<Option<String>, String> {
        let from_file = match &self.admin_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --admin-token-file {}: {e}", path.display()))?;
                text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).map(String::from)
            }
        };
        let token = self.admin_token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(String::from).or(from_file);
        if token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err("the admin token must be at least 16 characters".into());
        }
        Ok(token)
    }

    /// Repository polling's settings, when it is on.
    pub fn poll_settings(&self) -> Option<crate::repository::poll::PollSettings> {
        (self.repository_poll_secs > 0).then(|| crate::repository::poll::PollSettings {
            interval: std::time::Duration::from_secs(self.repository_poll_secs),
            settle: std::time::Duration::from_secs(self.repository_poll_settle_secs),
        })
    }

    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles { cert: self.tls_cert.clone()?, key: self.tls_key.clone()?, client_ca: self.tls_client_ca.clone() })
    }

    pub fn grpc_message_limit(&self) -> usize {
        self.grpc_max_message_bytes.unwrap_or(self.max_body_bytes)
    }

    pub fn video_settings(&self) -> crate::serve::video::VideoSettings {
        crate::serve::video::VideoSettings {
            tools: crate::video::VideoTools::beside(self.ffmpeg.clone()),
            max_bytes: self.max_video_bytes,
            max_frames: self.max_video_frames.max(1),
            in_flight: self.video_frames_in_flight.max(1),
        }
    }

    /// `--cors-origins` as both of its readers take it (the CORS layer, and the WebSocket's
    /// Origin check): each entry trimmed, empty ones left out.
    pub fn browser_origins(&self) -> Vec<String> {
        self.cors_origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()).map(str::to_string).collect()
    }

    pub fn stream_settings(&self) -> Result<crate::serve::streams::StreamSettings, String> {
        Ok(crate::serve::streams::StreamSettings {
            allow: crate::video::AllowList::parse(&self.streams_allow)?,
            max_streams: self.max_streams,
            reconnect_max: std::time::Duration::from_millis(self.stream_reconnect_max_ms.max(100)),
            browser_origins: self.browser_origins(),
            ..Default::default()
        })
    }

    pub fn preprocess_thread_count(&self) -> usize {
        if self.preprocess_threads > 0 {
            self.preprocess_threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// An address, or `off` (also `none`, empty) for a listener that should not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim() {
            "" | "off" | "none" => Ok(OptionalAddr(None)),
            addr => addr
                .parse()
                .map(|a| OptionalAddr(Some(a)))
                .map_err(|e| format!("'{addr}' is not an address like 127.0.0.1:8081, nor 'off': {e}")),
        }
    }
}
