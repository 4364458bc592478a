"""deploy/Dockerfile.slim built for real, without a daemon, and run: `collapse-monitor --help`.

No base image can be pulled here, so the base is a Debian root filesystem that mmdebstrap makes
(python3 and its venv module from Debian's packages), imported into buildah's local storage and
passed as the BASE_IMAGE build argument. buildah builds with chroot isolation: this machine's
cgroups are hybrid (v1 with v2), which crun refuses ("cgroups in hybrid mode not supported"),
and chroot isolation needs no OCI runtime. The build sees the machine's pip configuration (its
index, wheels and CA bundle) through read-only volumes, as the fresh-venv test does.

The worker images (deploy/Dockerfile, deploy/Dockerfile.cuda) are not built here: their bases
(python:3.11-slim, nvidia/cuda) and the PyTorch wheel index cannot be reached (README, status).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from servers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SUITE = "bookworm"  # Debian 12: python3 is 3.11, the oldest the package supports
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# The machine's pip setup, visible to the build's RUN steps (read-only; absent ones skipped).
PIP_SETUP = (
    "/etc/pip.conf",
    "/etc/xdg/pip",
    "/opt/wheels",
    "/opt/pypi",
    "/opt/pypi-more",
    "/etc/ssl/certs/ca-certificates.crt",
)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (apt-get install {name}; .ci/run does)"
    return path


def sh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stderr[-4000:]}"
    return done


def base_image(workdir: Path) -> str:
    """A Debian base image from an mmdebstrap rootfs; kept in buildah's storage under a tag
    that names its recipe, so a later run (or CI on the same machine) reuses it."""
    recipe = f"{SUITE} minbase {' '.join(PACKAGES)}"
    tag = f"localhost/collapse-test-base:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    buildah = tool("buildah")
    known = subprocess.run([buildah, "inspect", "--type", "image", tag], capture_output=True)
    if known.returncode == 0:
        return tag
    rootfs = workdir / "rootfs.tar"
    sh(tool("mmdebstrap"), "--variant=minbase", f"--include={','.join(PACKAGES)}",
       SUITE, str(rootfs))  # fmt: skip
    container = sh(buildah, "from", "scratch").stdout.strip()
    try:
        sh(buildah, "add", container, str(rootfs), "/")
        sh(buildah, "commit", "--quiet", container, tag)
    finally:
        subprocess.run([buildah, "rm", container], capture_output=True, timeout=60)
    return tag


def test_slim_image_builds_and_runs_help(tmp_path: Path) -> None:
    buildah = tool("buildah")
    base = base_image(tmp_path)
    image = f"localhost/collapse-monitor-test:slim-{uuid.uuid4().hex[:8]}"
    volumes = [f"--volume={p}:{p}:ro" for p in PIP_SETUP if Path(p).exists()]
    try:
        sh(buildah, "bud", "--isolation=chroot", "--network=host", *volumes,
           f"--build-arg=BASE_IMAGE={base}", "--file=deploy/Dockerfile.slim",
           f"--tag={image}", str(ROOT))  # fmt: skip
        config = sh(buildah, "inspect", "--type", "image", "--format",
                    "{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}", image)  # fmt: skip
        assert config.stdout.split() == ["10001:10001", "[collapse-monitor]"]
        container = sh(buildah, "from", image).stdout.strip()
        try:
            helped = sh(buildah, "run", "--isolation=chroot", "--user=10001:10001", container,
                        "--", "collapse-monitor", "--help")  # fmt: skip
            assert "Usage: collapse-monitor" in helped.stdout
            assert "exporter" in helped.stdout
            probe = subprocess.run(
                [buildah, "run", "--isolation=chroot", container, "--", "python", "-c",
                 "import importlib.util as u; print(u.find_spec('torch') is None)"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert probe.stdout.strip() == "True", probe.stderr
        finally:
            subprocess.run([buildah, "rm", container], capture_output=True, timeout=60)
    finally:
        subprocess.run([buildah, "rmi", image], capture_output=True, timeout=120)
