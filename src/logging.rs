//! The one place logging is set up: an `RUST_LOG`-style filter (default `info`), human-readable
//! or JSON lines, always on stderr so stdout stays free for tools.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
