#!/usr/bin/env bash
# The local RTSP camera test_streams.py and `make bench-streams` read from
# (tests/python/rtsp_server.py): GStreamer's RTSP server through the system python3's
# GObject bindings. Installed from Debian when we may (root with apt), else one clear sentence.
set -u
PACKAGES="python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
present() {
  /usr/bin/python3 - <<'PY' >/dev/null 2>&1
import gi
gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
assert all(Gst.ElementFactory.find(e) for e in ("qtdemux", "h264parse", "rtph264pay"))
PY
}
if ! present && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "visionserve setup: installing GStreamer's RTSP server (Debian packages) for the stream tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  { apt-get install -y -q --no-install-recommends $PACKAGES || { apt-get update -q && apt-get install -y -q --no-install-recommends $PACKAGES; }; } >/dev/null 2>&1
fi
if ! present; then
  echo "visionserve setup: the stream tests need GStreamer's RTSP server (Debian: apt-get install $PACKAGES)." >&2
  exit 1
fi
