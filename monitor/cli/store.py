"""The `store` commands: `collapse-monitor store migrate` (store format 1 -> 2)."""

from __future__ import annotations

from typing import Annotated

import typer

from monitor.errors import InvalidInput


def register(app: typer.Typer) -> None:
    """Add the `store` sub-app (with `migrate`) to the main typer app."""
    store_app = typer.Typer(
        name="store",
        help="Maintenance of the statistics store.",
        epilog="Example: collapse-monitor store migrate",
        no_args_is_help=True,
    )

    @store_app.command("migrate", epilog="Example: collapse-monitor store migrate --model gpt2")
    def migrate(
        model: Annotated[
            str | None, typer.Option(help="One model (default: every model in the store).")
        ] = None,
    ) -> None:
        """Convert statistics written by collapse-monitor 0.1 (one blob per bucket) to the split
        format: baselines, buckets and pending batches are kept; safe to run again."""
        from monitor.cli.pipeline import _runtime
        from monitor.pipeline.migrate import migrate_model
        from monitor.store.redis_store import RedisStore

        runtime = _runtime()
        store = runtime.store
        if not isinstance(store, RedisStore):
            raise InvalidInput("no_redis", "store migrate works on a Redis store")
        names = [model] if model else sorted(set(store.models()) | set(runtime.registry.names))
        for name in names:
            result = migrate_model(store, name)
            typer.echo(
                f"{name}: {result.baselines} baselines, {result.buckets} buckets, "
                f"{result.partials} pending batches converted"
            )

    app.add_typer(store_app, name="store")
