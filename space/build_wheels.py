#!/usr/bin/env python
"""Build the wheels `requirements.txt` installs from `space/wheels/` (run by `make space`).

- `mg2_pipeline-<version>-py3-none-any.whl`: this package.
- `basic_pitch-0.4.0+nodeps-…whl`: basic-pitch 0.4.0 with its requirements removed. Its metadata asks for
  TensorFlow (or tflite-runtime on Python < 3.11) and `resampy<0.4.3`, and that resampy imports `pkg_resources`,
  which recent setuptools no longer has. MG2 runs basic-pitch's ONNX model, and `mg2-pipeline[audio]` lists what
  that needs (onnxruntime, mir_eval, pretty_midi, resampy 0.4.3). It is the `pip install --no-deps basic-pitch`
  of the Makefile, as a file a Space can install.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SPACE = os.path.dirname(os.path.abspath(__file__))
WHEELS = os.path.join(SPACE, "wheels")
BASIC_PITCH = ("basic_pitch", "0.4.0", "0.4.0+nodeps")


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def without_requirements(source: str, output_dir: str) -> str:
    """Copy a wheel under a `+nodeps` local version with no Requires-Dist (RECORD rewritten to match)."""
    name, version, new_version = BASIC_PITCH
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    target = os.path.join(output_dir, os.path.basename(source).replace(f"-{version}-", f"-{new_version}-"))
    records = []
    with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in wheel.infolist():
            path = item.filename.replace(old_info, new_info)
            if path == f"{new_info}RECORD":
                continue
            data = wheel.read(item)
            if path == f"{new_info}METADATA":
                lines = data.decode().split("\n")
                lines = [
                    f"Version: {new_version}" if line.startswith("Version: ") else line
                    for line in lines
                    if not line.startswith("Requires-Dist: ")
                ]
                data = "\n".join(lines).encode()
            out.writestr(path, data)
            records.append(record_line(path, data))
        out.writestr(f"{new_info}RECORD", "\n".join(records + [f"{new_info}RECORD,,"]) + "\n")
    return target


def main() -> None:
    shutil.rmtree(WHEELS, ignore_errors=True)
    os.makedirs(WHEELS)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", WHEELS, os.path.dirname(SPACE)], check=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                *pip,
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--dest",
                download,
                f"basic-pitch=={BASIC_PITCH[1]}",
            ],
            check=True,
        )
        (wheel,) = [os.path.join(download, f) for f in os.listdir(download) if f.endswith(".whl")]
        without_requirements(wheel, WHEELS)
    print("\n".join(sorted(os.listdir(WHEELS))))


if __name__ == "__main__":
    main()
