use clap::Parser;

use visionserve::config::ServerConfig;

#[tokio::main]
async fn main() {
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
