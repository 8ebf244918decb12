#!/usr/bin/env python3
"""Set up and run qo on a fresh machine that has only Python 3.11+, pip and venv.

    python3 dev.py demo     create .venv if missing, then run the demo on ./.qo
    python3 dev.py test     create .venv if missing, then run the whole test suite
    python3 dev.py bench    create .venv if missing, then run the benchmark

Each also installs Azurite (the Azure Storage emulator, for the az:// tests and the
benchmark) with npm into .azurite/ when it is missing; without npm the Azure tests are
skipped, saying why. And Chromium from the system's packages (apt-get, as root) for the
dashboard's real-browser tests, driven by playwright's Python package (never a browser
download); without it those tests are skipped, saying why (under CI=1 they fail).
And two real S3 servers the tests start on loopback: Ceph RGW from the system's
packages (apt-get, as root: radosgw, ceph-mon, ceph-osd, ceph-common) and LocalStack's
S3 in a virtualenv of its own, .localstack-venv/ (it needs Python >= 3.13: python3.13 on
PATH or pyenv's); where they cannot be installed their tests skip, saying why (under
CI=1 they fail). And s3rver (npm, into .s3rver/): a server without conditional writes,
which the tests prove qo refuses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("QO_VENV", ROOT / ".venv"))
BIN = VENV / "bin"
PLUGIN_DIRS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
AZURITE_VERSION = "3.37.0"  # the Azure Storage emulator: List Blobs startFrom, blob batch
AZURITE_DIR = ROOT / ".azurite"


def _fingerprint() -> str:
    h = hashlib.sha256()
    for f in [ROOT / "pyproject.toml", *(d / "pyproject.toml" for d in PLUGIN_DIRS)]:
        h.update(f.read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    """Create the virtualenv and install qo (editable, with test extras) and plugins/; Azurite; Chromium."""
    ensure_azurite()
    ensure_chromium()
    ensure_ceph()
    ensure_localstack()
    ensure_s3rver()
    stamp = VENV / ".qo-installed"
    if stamp.exists() and stamp.read_text() == _fingerprint():
        return
    if not (BIN / "python").exists():
        print(f"creating virtualenv {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    started = time.monotonic()
    names = ", ".join(d.name for d in PLUGIN_DIRS)
    print(f"installing qo (editable, with its s3 and test extras) and {len(PLUGIN_DIRS)} plugins ({names}) "
          "with pip ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _quietly([*pip, "--upgrade", "pip"])
    _quietly([*pip, "-e", f"{ROOT}[s3,test]", *(x for d in PLUGIN_DIRS for x in ("-e", f"{d}{_extra(d)}"))])
    stamp.write_text(_fingerprint())
    print(f"installed in {time.monotonic() - started:.0f} s into {VENV}", flush=True)


def _quietly(cmd: list[str]) -> None:
    """Run pip with its output kept: shown only if it fails (a machine's pip
    configuration can make every install print pages of warnings)."""
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        print(done.stdout, flush=True)
        raise SystemExit(f"pip failed (exit {done.returncode}): {' '.join(cmd[3:6])} ...")


def _extra(plugin_dir: Path) -> str:
    """``[test]`` for a plugin that declares a test extra (qo-dashboard: playwright)."""
    return "[test]" if "\ntest = [" in (plugin_dir / "pyproject.toml").read_text() else ""


CHROMIUM = Path(os.environ.get("QO_CHROMIUM", "/usr/bin/chromium"))


def ensure_chromium() -> None:
    """Install Debian's ``chromium`` with apt-get when it is missing and we may (root, apt).

    Otherwise say so and go on: the dashboard's browser tests skip with that reason.
    """
    if CHROMIUM.exists():
        return
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        print(f"{CHROMIUM} not found: the dashboard's browser tests will be skipped "
              "(install the chromium package to run them).", flush=True)
        return
    print("installing chromium (apt-get) for the dashboard's browser tests", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL, "env": env}
    done = subprocess.run([apt, "-qq", "update"], **quiet)
    if done.returncode == 0:
        done = subprocess.run([apt, "-qq", "install", "-y", "--no-install-recommends", "chromium"], **quiet)
    if done.returncode != 0 or not CHROMIUM.exists():
        print("apt-get could not install chromium: the dashboard's browser tests will be skipped.", flush=True)


CEPH_PACKAGES = ("radosgw", "ceph-mon", "ceph-osd", "ceph-common")
CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")


def _apt_install(packages: tuple[str, ...], *, recommends: bool = True) -> bool:
    """``apt-get update`` then install ``packages`` quietly; True if apt-get succeeded."""
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    done = subprocess.run([apt, "-qq", "update"], **quiet)
    if done.returncode == 0:
        extra = [] if recommends else ["--no-install-recommends"]
        done = subprocess.run([apt, "-qq", "install", "-y", *extra, *packages], **quiet)
    return done.returncode == 0


def ensure_ceph() -> None:
    """Install Debian's Ceph (monitor, OSD, RADOS Gateway) when missing and we may (root, apt).

    Otherwise say so and go on: the Ceph RGW tests skip with that reason.
    """
    if all(shutil.which(b) for b in CEPH_BINARIES):
        return
    print(f"installing Ceph ({', '.join(CEPH_PACKAGES)}; apt-get) for the Ceph RGW tests", flush=True)
    if not _apt_install(CEPH_PACKAGES) or not all(shutil.which(b) for b in CEPH_BINARIES):
        print("Ceph could not be installed (needs root and apt-get): the Ceph RGW tests will be skipped.",
              flush=True)


LOCALSTACK_DIR = ROOT / ".localstack-venv"
#: LocalStack 4.14 and the pins its dependencies need (qo/testing/localstack.py says the same)
LOCALSTACK_PACKAGES = ("localstack-core[runtime]==4.14.0", "cbor2<6", "pyopenssl<24.3", "cryptography<44")


def _python313() -> str | None:
    """A Python >= 3.13 for LocalStack that runs: python3.13 on PATH, else pyenv's newest
    3.13+ (a pyenv shim on PATH fails when that version is not selected: each is tried)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which("python3.13"), shutil.which("python3.14"),
                  *(str(v / "bin" / "python3") for v in sorted(pyenv.glob("3.1[3-9]*"), reverse=True))]
    for python in candidates:
        if python is None or not Path(python).exists():
            continue
        done = subprocess.run([python, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 13))"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if done.returncode == 0:
            return python
    return None


def ensure_localstack() -> None:
    """Make .localstack-venv with LocalStack (pinned; re-made when the pins change).

    Without a Python >= 3.13, say so and go on: the LocalStack tests skip with that reason.
    """
    stamp = LOCALSTACK_DIR / ".qo-installed"
    wanted = "\n".join(LOCALSTACK_PACKAGES)
    if stamp.exists() and stamp.read_text() == wanted:
        return
    python = _python313()
    if python is None:
        print("no Python >= 3.13 found: LocalStack is not installed, so the LocalStack S3 tests will be "
              "skipped. Install python3.13 to run them.", flush=True)
        return
    print(f"installing LocalStack ({LOCALSTACK_PACKAGES[0]}) into {LOCALSTACK_DIR} (pip, {python})", flush=True)
    if not (LOCALSTACK_DIR / "bin" / "python").exists():
        done = subprocess.run([python, "-m", "venv", str(LOCALSTACK_DIR)])
        if done.returncode != 0:
            print("could not create .localstack-venv: the LocalStack S3 tests will be skipped.", flush=True)
            return
    pip = [str(LOCALSTACK_DIR / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *LOCALSTACK_PACKAGES], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], flush=True)
        print("pip could not install LocalStack: the LocalStack S3 tests will be skipped.", flush=True)
        return
    stamp.write_text(wanted)


S3RVER_VERSION = "3.7.1"  # an S3 server with no conditional writes: qo must refuse it
S3RVER_DIR = ROOT / ".s3rver"


def ensure_s3rver() -> None:
    """Install s3rver with npm into .s3rver/ (pinned); without npm its test skips."""
    stamp = S3RVER_DIR / ".qo-installed"
    if stamp.exists() and stamp.read_text() == S3RVER_VERSION and (S3RVER_DIR / "node_modules/.bin/s3rver").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        print("npm not found: s3rver is not installed, so the test that qo refuses it will be skipped.", flush=True)
        return
    print(f"installing s3rver {S3RVER_VERSION} into {S3RVER_DIR} (npm)", flush=True)
    S3RVER_DIR.mkdir(exist_ok=True)
    done = subprocess.run([npm, "install", "--prefix", str(S3RVER_DIR), f"s3rver@{S3RVER_VERSION}",
                           "--no-audit", "--no-fund", "--loglevel=error"], stdout=subprocess.DEVNULL)
    if done.returncode != 0 or not (S3RVER_DIR / "node_modules/.bin/s3rver").exists():
        print("npm could not install s3rver: the test that qo refuses it will be skipped.", flush=True)
        return
    stamp.write_text(S3RVER_VERSION)


def ensure_azurite() -> None:
    """Install Azurite with npm into .azurite/ (pinned; re-installed when the pin changes).

    Without npm, say so and go on: the az:// tests skip with that reason.
    """
    stamp = AZURITE_DIR / ".qo-installed"
    binary = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if stamp.exists() and stamp.read_text() == AZURITE_VERSION and binary.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        print("npm not found: Azurite (the Azure Storage emulator) is not installed, so the az:// "
              "tests will be skipped. Install Node.js and npm to run them.", flush=True)
        return
    print(f"installing Azurite {AZURITE_VERSION} into {AZURITE_DIR} (npm)", flush=True)
    AZURITE_DIR.mkdir(exist_ok=True)
    done = subprocess.run([npm, "install", "--prefix", str(AZURITE_DIR), f"azurite@{AZURITE_VERSION}",
                           "--no-audit", "--no-fund", "--loglevel=error"])
    if done.returncode != 0 or not binary.exists():
        print("npm could not install Azurite: the az:// tests will be skipped.", flush=True)
        return
    stamp.write_text(AZURITE_VERSION)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    ensure_venv()
    cmd, rest = argv[0], argv[1:]
    if cmd == "test":
        # the tests start hundreds of worker processes: compile the sources once, or each
        # of them compiles them again where PYTHONDONTWRITEBYTECODE is set (as on CI)
        subprocess.run([str(BIN / "python"), "-m", "compileall", "-q", "qo", "qo_local", "plugins", "tests"],
                       cwd=ROOT, stdout=subprocess.DEVNULL)
        args = [str(BIN / "pytest"), *rest] if rest else [
            # loadgroup: the tests of each real S3 server (xdist_group) run in one process,
            # which starts that server once (qo/testing/s3_servers.py)
            str(BIN / "pytest"), "-q", "-n", "2", "--dist", "loadgroup", "--durations=25", "tests",
            *(str(d) for d in PLUGIN_DIRS)]
    elif cmd == "demo":
        args = [str(BIN / "python"), "-m", "qo.demo", *rest]
    else:
        args = [str(BIN / "python"), str(ROOT / "benchmarks" / "bench.py"), *rest]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
