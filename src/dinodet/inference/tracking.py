"""Persistent object ids across video frames: ByteTrack from Roboflow's ``trackers`` package.

ByteTrack associates boxes frame to frame in two stages: detections scoring at least the run's
threshold start tracks and match them first; weaker ones (down to ``TRACK_LOW_THRESHOLD``) can only
continue a track that already exists, which keeps an object's id through a frame where its score
dips.  So with tracking the detector runs at ``min(threshold, TRACK_LOW_THRESHOLD)``, and a frame's
output is every detection above the threshold plus the weaker ones that continue a track, each with
its track id.

A track gets its id in the frame that starts it.  ``trackers``' ByteTrack (pinned in the ``video``
extra) returns -1 for a new track until a second frame confirms it, so an object's first frame, and
the whole first frame of a video, would carry no ids; ``_ByteTrack`` allocates the id when the track
is spawned instead.  The cost: a one-frame false positive keeps its id as a lost track for
``LOST_TRACK_BUFFER`` frames instead of being dropped at once.
"""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from .extras import require

#: The lowest score ByteTrack's second stage sees (the paper's and Ultralytics' low threshold).
TRACK_LOW_THRESHOLD = 0.1
#: Frames (at 30 fps; scaled to the video's rate) a lost track is kept for re-association.
LOST_TRACK_BUFFER = 30


def detection_threshold(threshold: float) -> float:
    """The score the detector keeps when tracking at ``threshold``: low enough for ByteTrack's second stage."""
    return min(threshold, TRACK_LOW_THRESHOLD)


class Tracker:
    """ByteTrack over the Predictions of consecutive frames of one source.

    ``threshold`` is the run's score threshold: detections at or above it start tracks;
    ``fps`` is the rate of the frames given (the source's divided by the frame stride).  Give
    ``update`` every processed frame in order; a new source needs a new Tracker.

    Raises:
        ConfigError: the ``trackers`` package is missing (``pip install 'dinodet[video]'``).
    """

    def __init__(self, threshold: float, fps: float | Fraction = 30.0):
        trackers = require("trackers", "tracking (--track)")
        self.sv = require("supervision", "tracking (--track)")
        self.threshold = threshold
        self.bytetrack: Any = _bytetrack_class(trackers)(
            lost_track_buffer=LOST_TRACK_BUFFER, frame_rate=float(fps), track_activation_threshold=threshold,
            high_conf_det_threshold=threshold, minimum_consecutive_frames=1)

    def update(self, pred: Any) -> Any:
        """``pred`` (a ``Prediction`` at ``detection_threshold(threshold)``) with ``track_ids`` set: the
        detections above the threshold and the weaker ones that continue a track, sorted by score."""
        n = len(pred)
        detections = self.sv.Detections(
            xyxy=pred.boxes.numpy().reshape(-1, 4).astype(np.float32), confidence=pred.scores.numpy(),
            class_id=pred.labels.numpy(), data={"index": np.arange(n)})
        tracked = self.bytetrack.update(detections)
        ids = torch.full((n,), -1, dtype=torch.int64)
        if len(tracked):
            ids[torch.as_tensor(tracked.data["index"], dtype=torch.int64)] = torch.as_tensor(
                tracked.tracker_id, dtype=torch.int64)
        keep = (pred.scores > self.threshold) | (ids >= 0)
        # a Prediction is sorted by score, so the kept detections stay sorted
        return replace(pred, track_ids=ids).select(keep)


def _bytetrack_class(trackers: Any) -> type:
    """``trackers.ByteTrackTracker`` giving a track its id in the frame that spawns it (see the module doc)."""

    class _ByteTrack(trackers.ByteTrackTracker):
        def _spawn_new_tracks(self, detection_boxes: Any, confidences: Any, unmatched_high_local: list[int],
                              high_indices: Any, out_det_indices: list[int], out_tracker_ids: list[int]) -> None:
            first_output, first_track = len(out_det_indices), len(self.tracks)
            super()._spawn_new_tracks(detection_boxes, confidences, unmatched_high_local, high_indices,
                                      out_det_indices, out_tracker_ids)
            # the parent appends one output (id -1) per unmatched detection, and a track, in the same order,
            # for each of them that clears the activation threshold
            new_tracks = iter(self.tracks[first_track:])
            for pos in range(first_output, len(out_det_indices)):
                if float(confidences[out_det_indices[pos]]) >= self.track_activation_threshold:
                    track = next(new_tracks)
                    track.tracker_id = self._allocate_tracker_id()
                    out_tracker_ids[pos] = track.tracker_id

    return _ByteTrack
