"""A local RTSP camera for test_streams.py and `make bench-streams`: GStreamer's RTSP server
(Debian's gir1.2-gst-rtsp-server-1.0, run with the system python3 and python3-gi) serving an
H.264 MP4 at its own frame rate, as an IP camera serves its stream. Each client that connects
gets the clip from its start. Usage: rtsp_server.py PORT /path CLIP.mp4; prints `ready`."""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port, mount, clip = sys.argv[1], sys.argv[2], sys.argv[3]
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( filesrc location={clip} ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )")
server.get_mount_points().add_factory(mount, factory)
if server.attach(None) == 0:
    sys.exit(f"could not listen on 127.0.0.1:{port}")
print("ready", flush=True)
GLib.MainLoop().run()
