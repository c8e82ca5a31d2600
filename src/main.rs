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
    visionserve::logging::init_logging(config.log_json);
    if let Err(message) = config.validate() {
        eprintln!("visionserve: {message}");
        std::process::exit(2);
    }
    if let Err(error) = visionserve::serve(config).await {
        tracing::error!(%error, "server stopped with an error");
        std::process::exit(1);
    }
}
