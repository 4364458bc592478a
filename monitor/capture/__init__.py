"""Capture (docs/architecture.md): hidden states and next-token labels from live causal LMs.

- `CollapseProbe`: hooks inside the serving process (sampled, bounded, never blocking).
- `embed_batches`: the mirror, a teacher-forced rerun of sampled traffic on a worker.
- `ensure_tiny_model`: a small GPT-2-style model trained offline, for the demo and tests.
"""

from monitor.capture.mirror import embed_batches, load_model
from monitor.capture.probe import CollapseProbe, Positions
from monitor.capture.sampling import SamplingPolicy
from monitor.capture.shipping import CaptureCounters
from monitor.capture.sinks import CaptureBatch, CollectingSink, InProcessSink, NC4Reference, Sink
from monitor.capture.tinymodel import TinyModelSpec, ensure_tiny_model

__all__ = [
    "CaptureBatch",
    "CaptureCounters",
    "CollapseProbe",
    "CollectingSink",
    "InProcessSink",
    "NC4Reference",
    "Positions",
    "SamplingPolicy",
    "Sink",
    "TinyModelSpec",
    "embed_batches",
    "ensure_tiny_model",
    "load_model",
]
