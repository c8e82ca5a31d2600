"""One progress line format for every script under models/: `[stage] message`, flushed at
once so that `make` shows it while a long export or compile runs."""


def reporter(stage):
    """A `progress(message)` function that prints `[stage] message`."""

    def progress(message):
        print(f"[{stage}] {message}", flush=True)

    return progress
