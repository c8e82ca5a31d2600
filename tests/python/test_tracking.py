"""ByteTrack in Rust (src/tasks/tracking.rs) against supervision's ByteTrack, its port of the
authors' code, on the same recorded detections: the detector's own boxes on a clip where the
cat passes in front of the cup (the cup's track is lost behind it and found again), with a low
score threshold so the weak boxes (the second association) take part. Runs in the ultralytics environment, which holds supervision."""
from collections import Counter

import numpy as np
import supervision as sv

from test_video import DETECTOR, clip, events, post_video


def agreement(ours, theirs):
    """The share of (frame, detection) pairs given an id by either tracker on which both agree,
    once our ids are mapped one-to-one onto theirs by the most common pairing."""
    pairs = Counter((o, t) for o, t in zip(ours, theirs) if o is not None and t is not None)
    mapping, taken = {}, set()
    for (o, t), _ in pairs.most_common():
        if o not in mapping and t not in taken:
            mapping[o] = t
            taken.add(t)
    either = [(o, t) for o, t in zip(ours, theirs) if o is not None or t is not None]
    agreed = sum(1 for o, t in either if o is not None and mapping.get(o) == t)
    return agreed / len(either), len(either)


def test_ids_agree_with_supervision_bytetrack(default_server, tmp_path):
    path = clip(tmp_path, 60, cross=True)
    _, answered, _ = events(post_video(default_server, path, track="bytetrack", score_threshold=0.12, max_detections=100))
    # The paper's defaults, as the server's.
    tracker = sv.ByteTrack(track_activation_threshold=0.5, lost_track_buffer=30, minimum_matching_threshold=0.8,
                           frame_rate=30, minimum_consecutive_frames=1)
    ours, theirs, weak = [], [], 0
    for frame in answered:
        found = frame["detections"]
        ours += [d["track_id"] for d in found]
        weak += sum(1 for d in found if d["score"] < 0.5)
        ids = [None] * len(found)
        if found:
            detections = sv.Detections(
                xyxy=np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found], dtype=np.float32),
                confidence=np.array([d["score"] for d in found], dtype=np.float32),
                class_id=np.zeros(len(found), dtype=int),
                data={"index": np.arange(len(found))},
            )
            tracked = tracker.update_with_detections(detections)
            for index, track_id in zip(tracked.data.get("index", []), tracked.tracker_id):
                ids[int(index)] = int(track_id)
        else:
            tracker.update_with_detections(sv.Detections.empty())
        theirs += ids
    share, counted = agreement(ours, theirs)
    print(f"tracking: {counted} tracked detections over {len(answered)} frames ({weak} weak), {share:.2%} of ids agree")
    assert weak > 0, "no weak detections: the second association went untested"
    assert counted >= 90, counted
    assert share >= 0.99, share
