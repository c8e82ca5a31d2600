use clap::Parser;

use visionserve::config::ServerConfig;

fn main() {
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
        std::process::exit(visionserve::health_probe(config.addr));
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
