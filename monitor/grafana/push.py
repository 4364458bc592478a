"""Push dashboards to Grafana through grafana-client, idempotently.

Why overwrite by uid: the dashboards carry stable uids (`collapse-overview`, ...), so pushing
again replaces the previous version instead of creating copies, and links between dashboards and
from alerts keep working. The folder is looked up by title and created only when missing, so a
second push changes nothing but the dashboard versions.

Errors are one line (`InvalidInput`) with a stable reason: `grafana_unreachable` (no answer),
`grafana_auth` (401/403: bad or under-privileged token), `grafana_error` (any other refusal) and
`bad_dashboard` (a file that is not a dashboard). The token is never logged nor put in a message:
grafana-client's own texts are re-worded from the status code, and anything we echo is scrubbed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from monitor.errors import InvalidInput

__all__ = ["connect", "push_dashboards"]

log = logging.getLogger(__name__)


def connect(url: str, token: str, timeout: float = 10.0) -> Any:
    """A `GrafanaApi` for `url` with bearer-token auth (imported lazily: the CLI loads fast)."""
    from grafana_client.api import GrafanaApi

    return GrafanaApi.from_url(url, credential=token, timeout=timeout)


def push_dashboards(
    url: str,
    token: str,
    folder: str,
    paths: Sequence[Path],
    *,
    api_factory: Callable[[str, str], Any] = connect,
) -> list[str]:
    """Upload each dashboard file into `folder` (created if missing); return their URLs.

    `api_factory(url, token)` builds the client; tests pass a fake. Every file is read and
    checked before anything is sent, so a broken file never leaves a half-pushed set.
    """
    if not token:
        raise InvalidInput(
            "grafana_auth", "no Grafana token given (--token or COLLAPSE_GRAFANA_TOKEN)"
        )
    boards = [_load(Path(p)) for p in paths]
    if not boards:
        raise InvalidInput("bad_dashboard", "no dashboard files to push")
    base = url.rstrip("/")
    api = api_factory(url, token)
    folder_uid = _call(lambda: _ensure_folder(api, folder), base, token, "finding the folder")
    urls: list[str] = []
    for board in boards:
        payload = {
            "dashboard": board,
            "folderUid": folder_uid,
            "overwrite": True,
            "message": "collapse-monitor dashboards push",
        }
        answer = _call(
            partial(api.dashboard.update_dashboard, payload),
            base,
            token,
            f"uploading {board['uid']}",
        )
        path = answer.get("url") if isinstance(answer, dict) else None
        urls.append(base + str(path) if path else f"{base}/d/{board['uid']}")
        log.info("pushed dashboard %s to folder %r", board["uid"], folder)
    return urls


def _load(path: Path) -> dict[str, Any]:
    """A dashboard dict with a uid and title; `id` dropped so Grafana matches by uid."""
    try:
        board = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput("bad_dashboard", f"{path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput("bad_dashboard", f"{path}: not valid JSON: {exc}") from None
    if not isinstance(board, dict) or not board.get("uid") or not board.get("title"):
        raise InvalidInput("bad_dashboard", f"{path}: not a dashboard (needs uid and title)")
    board = dict(board)
    board["id"] = None  # an id from another Grafana would make it refuse or clobber a stranger
    return board


def _ensure_folder(api: Any, title: str) -> str:
    """The uid of the folder titled `title`, created when no such folder exists."""
    for found in api.folder.get_all_folders() or []:
        if isinstance(found, dict) and found.get("title") == title:
            return str(found["uid"])
    created = api.folder.create_folder(title)
    return str(created["uid"])


def _call(action: Callable[[], Any], base: str, token: str, doing: str) -> Any:
    """Run one API call; turn every failure into a one-line `InvalidInput` without the token."""
    from grafana_client.client import GrafanaException, GrafanaTimeoutError

    try:
        return action()
    except GrafanaTimeoutError:
        raise InvalidInput("grafana_unreachable", f"Grafana at {base} timed out {doing}") from None
    except GrafanaException as exc:
        status = int(getattr(exc, "status_code", 0) or 0)
        if status in (401, 403):
            raise InvalidInput(
                "grafana_auth",
                f"Grafana at {base} refused the token ({status}) {doing}: check that it is valid "
                "and may write dashboards and folders",
            ) from None
        if status == 0:
            raise InvalidInput("grafana_unreachable", f"cannot reach Grafana at {base}") from None
        detail = _scrub(str(getattr(exc, "message", "") or exc), token)
        raise InvalidInput("grafana_error", f"Grafana at {base} {doing}: {detail}") from None
    except OSError:  # connection refused, DNS, TLS (niquests errors are OSErrors)
        raise InvalidInput("grafana_unreachable", f"cannot reach Grafana at {base}") from None


def _scrub(text: str, token: str) -> str:
    """One line, without the token even if a server echoed it back."""
    line = " ".join(text.split())
    return line.replace(token, "***") if token else line
