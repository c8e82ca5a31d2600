//! The one place metrics are defined: names, units and buckets, recorded through the `metrics`
//! facade and served as Prometheus text at `GET /metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "visionserve_requests_total";
pub const REQUEST_SECONDS: &str = "visionserve_request_duration_seconds";
pub const PREPROCESS_SECONDS: &str = "visionserve_preprocess_duration_seconds";
pub const QUEUE_SECONDS: &str = "visionserve_queue_duration_seconds";
pub const INFERENCE_SECONDS: &str = "visionserve_inference_duration_seconds";
pub const POSTPROCESS_SECONDS: &str = "visionserve_postprocess_duration_seconds";
pub const BATCH_SIZE: &str = "visionserve_batch_size";
pub const QUEUE_DEPTH: &str = "visionserve_queue_depth";
pub const IN_FLIGHT: &str = "visionserve_in_flight_requests";
pub const MODEL_READY: &str = "visionserve_model_ready";
pub const EXECUTOR_PANICS: &str = "visionserve_worker_restarts_total";
pub const JOBS_SKIPPED: &str = "visionserve_jobs_skipped_total";
pub const CONNECTIONS_REFUSED: &str = "visionserve_connections_refused_total";
pub const SCALED_DECODES: &str = "visionserve_scaled_decodes_total";
pub const ADMISSION_REFUSED: &str = "visionserve_admission_refused_total";
pub const EXPECTED_QUEUE_WAIT: &str = "visionserve_expected_queue_wait_seconds";
pub const TRACE_EXPORT_ERRORS: &str = "visionserve_trace_export_errors_total";
pub const MODEL_LOAD_SECONDS: &str = "visionserve_model_load_seconds";
pub const MODEL_EVICTIONS: &str = "visionserve_model_unloads_for_room_total";
pub const CACHE_HITS: &str = "visionserve_response_cache_hits_total";
pub const CACHE_MISSES: &str = "visionserve_response_cache_misses_total";
pub const CACHE_EVICTIONS: &str = "visionserve_response_cache_evictions_total";
pub const CACHE_BYTES: &str = "visionserve_response_cache_bytes";
pub const REPOSITORY_POLL_LOADS: &str = "visionserve_repository_poll_loads_total";
pub const REPOSITORY_POLL_FAILING: &str = "visionserve_repository_poll_failing";
pub const VIDEO_FRAMES: &str = "visionserve_video_frames_total";
pub const STREAM_FRAMES: &str = "visionserve_stream_frames_total";
pub const STREAM_RECONNECTS: &str = "visionserve_stream_reconnects_total";
pub const STREAMS: &str = "visionserve_streams";
pub const TLS_HANDSHAKE_FAILURES: &str = "visionserve_tls_handshake_failures_total";
pub const TLS_RELOADS: &str = "visionserve_tls_reloads_total";
pub const TLS_CERTIFICATE_EXPIRY: &str = "visionserve_tls_certificate_expiry_timestamp_seconds";

const SECONDS_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 10.0];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0];

/// Installs the process-wide recorder on first use and returns the handle that renders it.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .expect("static buckets")
                .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_BUCKETS)
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist when embedded; then ours only renders what it sees.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REPOSITORY_POLL_LOADS, "Changes repository polling acted on, by model and outcome: loaded, failed (the previous load keeps serving), unloaded (folder removed)");
    describe_gauge!(REPOSITORY_POLL_FAILING, "1 while a model's last polled change failed to load (the previous load serving), else 0");
    describe_counter!(STREAM_FRAMES, "Frames of live streams by stream and outcome: processed, dropped (by the stream's queue policy, or refused by the model's admission), failed");
    describe_counter!(STREAM_RECONNECTS, "Times a live stream's source was lost and read again, by stream");
    describe_gauge!(STREAMS, "Live streams running");
    describe_counter!(VIDEO_FRAMES, "Frames of uploaded videos answered, by model (or pipeline) and outcome: answered, failed");
    describe_counter!(TLS_HANDSHAKE_FAILURES, "TLS handshakes that failed or timed out (no common protocol, a client certificate not from the client CA, a plain-HTTP client), by listener");
    describe_counter!(TLS_RELOADS, "Changed TLS files (or SIGHUP) by outcome: loaded, or refused with the previous certificate kept");
    describe_gauge!(TLS_CERTIFICATE_EXPIRY, Unit::Seconds, "When the served TLS certificate expires, in seconds since the Unix epoch; alert on it minus time()");
    describe_counter!(REQUESTS, "Inference requests (/v1, /v2, /predictions) by model and HTTP status");
    describe_counter!(ADMISSION_REFUSED, "Requests refused at once (503) because the model's queue was full or its expected wait over the request's budget");
    describe_gauge!(EXPECTED_QUEUE_WAIT, Unit::Seconds, "How long a request arriving now would wait for a worker (queued images x recent forward time per image / workers); the estimate admission uses, meant for autoscaling");
    describe_counter!(SCALED_DECODES, "JPEGs decoded at a reduced DCT scale (1/2, 1/4, 1/8), by scale");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Whole inference request, body read to answer");
    describe_histogram!(PREPROCESS_SECONDS, Unit::Seconds, "Decode, resize and normalise");
    describe_histogram!(QUEUE_SECONDS, Unit::Seconds, "Waiting in the model's queue and for a batch");
    describe_histogram!(INFERENCE_SECONDS, Unit::Seconds, "Forward pass of the batch the request ran in");
    describe_histogram!(POSTPROCESS_SECONDS, Unit::Seconds, "Top-k, NMS, mask encoding or overlay drawing");
    describe_histogram!(BATCH_SIZE, "Images per forward pass");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting in the model's queue");
    describe_gauge!(IN_FLIGHT, "Inference requests being handled");
    describe_gauge!(MODEL_READY, "1 when the model serves, 0 otherwise");
    describe_counter!(EXECUTOR_PANICS, "Inference executors that caught a panic in a batch and carried on");
    describe_counter!(JOBS_SKIPPED, "Queued requests not computed: client gone or deadline passed");
    describe_counter!(TRACE_EXPORT_ERRORS, "OTLP trace exports that failed (the spans are dropped; requests never wait on exports)");
    describe_histogram!(MODEL_LOAD_SECONDS, Unit::Seconds, "Loads of a model on its first request (models on demand): the cold start");
    describe_counter!(MODEL_EVICTIONS, "Models unloaded, least recently used first, to make room for one loaded on demand");
    describe_counter!(CACHE_HITS, "Images answered from the response cache (--response-cache-bytes)");
    describe_counter!(CACHE_MISSES, "Images looked up in the response cache and not found");
    describe_counter!(CACHE_EVICTIONS, "Response cache entries evicted to keep within its byte budget");
    describe_gauge!(CACHE_BYTES, "Bytes the response cache holds");
    describe_counter!(CONNECTIONS_REFUSED, "Connections refused because --max-connections were open");
}

pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}
