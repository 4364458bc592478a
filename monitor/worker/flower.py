"""The Celery app Flower runs on: `celery -A monitor.worker.flower flower ...`.

The same broker configuration as the workers' app (`celery_config`: URL and password from
settings, TLS, Sentinel, the guarded transports, the event settings), but no task modules.
Flower imports an app's task modules at start; ours import torch (seconds and hundreds of MB
for a process that only reads events and sends control commands), and the slim core image has
no torch at all. Flower needs no task code: events carry the task names.
"""

from __future__ import annotations

from monitor.worker.app import create_app

# The senders' app (`create_app` without tasks), from the environment's settings: built at
# import because `celery -A` reads this module's `app`.
app = create_app()
