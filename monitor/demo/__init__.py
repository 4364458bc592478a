"""`collapse-monitor demo`: the whole monitor in one process on a live tiny model.

- `traffic`: generation requests cut from the held-out corpus (the probe's real path).
- `inject`: the collapse (final norm squeezed onto a few directions) and its exact undo.
- `alerting`: the demo's alert rules and their pending/firing/resolved states.
- `loop`: the scenario (warm-up, baseline, steady, inject, recover) and the report.
- `view`: rich live view on a terminal, a plain greppable log otherwise.
"""

from monitor.demo.loop import Demo, DemoOptions, DemoResult
from monitor.demo.state import MIN_DURATION, Phase, Plan

__all__ = ["MIN_DURATION", "Demo", "DemoOptions", "DemoResult", "Phase", "Plan"]
