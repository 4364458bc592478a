"""The worker wing: everything that runs inside Celery.

- `app`: the broker configuration and the app factory (`create_app`: senders such as the
  client and the API get an app without tasks; `worker_app()` is the workers' and beat's,
  with `tasks`), built on first use, never at import;
- `tasks`: every task (ingest, embed, compact, evaluate), thin wrappers over `pipeline` and
  `evaluate`, which know nothing of Celery;
- `broker`: the guarded transports and consumer (a poison message never ends a worker);
- `heartbeat`: the liveness files of `worker` and `beat`;
- `flower`: the app Flower runs on (broker settings, no task modules).

Task names and queues are Celery-free in `monitor.pipeline.queues`, the producers' contract.
"""
