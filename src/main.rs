use clap::Parser;

use visionserve::config::ServerConfig;

fn main() {
    openmp_spin_defaults();
    // Before the runtime starts any thread: setenv is not thread-safe.
    visionserve::engine::aoti::enable_input_checks();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime")
        .block_on(run());
}

async fn run() {
    let config = ServerConfig::parse();
    if config.check_ready {
        std::process::exit(visionserve::health_probe(config.addr, config.tls_cert.is_some()));
    }
    let target = visionserve::telemetry::ExportTarget::from_config(config.otlp_endpoint.as_deref(), |k| std::env::var(k).ok());
    let telemetry = match target {
        Err(message) => {
            eprintln!("visionserve: {message}");
            std::process::exit(2);
        }
        Ok(None) => None,
        Ok(Some(target)) => match visionserve::telemetry::Telemetry::start(&target) {
            Ok(started) => Some((started, target)),
            Err(message) => {
                eprintln!("visionserve: {message}");
                std::process::exit(2);
            }
        },
    };
    let (telemetry, tracer) = match telemetry {
        Some(((telemetry, tracer), target)) => {
            eprintln!("visionserve: exporting traces over OTLP ({:?}) to {}", target.protocol, target.endpoint);
            (Some(telemetry), Some(tracer))
        }
        None => (None, None),
    };
    visionserve::logging::init_logging(config.log_json, tracer);
    if let Err(message) = config.validate() {
        eprintln!("visionserve: {message}");
        std::process::exit(2);
    }
    let outcome = visionserve::serve(config).await;
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    if let Err(error) = outcome {
        tracing::error!(%error, "server stopped with an error");
        std::process::exit(1);
    }
}

/// libtorch's OpenMP (libgomp) lets a forward's worker threads wait between parallel regions by
/// spinning for a while, then sleeping. With more OpenMP threads than cores — which the shared
/// pool has as soon as two executors have each run a multi-threaded forward — libgomp cuts the
/// spin to almost nothing unless `OMP_WAIT_POLICY=ACTIVE`, so every region of a lone request's
/// forward wakes a sleeping thread, which nearly doubled a lone request's latency (BENCHMARKS.md,
/// "Figures behind the code's choices"). A
/// bounded `GOMP_SPINCOUNT` keeps ACTIVE from spinning an idle server's cores for seconds (idle
/// CPU measured at 0). libgomp reads both when it is loaded, before `main`, so they are set by
/// starting the binary again with them — once, same pid — unless the operator set either.
fn openmp_spin_defaults() {
    use std::os::unix::process::CommandExt;
    const MARK: &str = "VISIONSERVE_OPENMP_DEFAULTS";
    let operator_set = ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT", MARK].iter().any(|v| std::env::var_os(v).is_some());
    if operator_set || std::env::args_os().any(|a| a == "--check-ready") {
        return;
    }
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env("OMP_WAIT_POLICY", "ACTIVE")
        .env("GOMP_SPINCOUNT", "3000000")
        .env(MARK, "1")
        .exec();
    // exec returns only when it failed: serve with libgomp's own defaults.
    eprintln!("visionserve: could not restart with OpenMP spin settings ({error}); continuing without them");
}
