"""A hardware profile from a ``benchmarks/device_check.py`` output folder (one GPU run of every figure).

``python -m fxlowbit.profile --from-device-check DIR --out fxlowbit/profiles/`` writes
``<device>.json`` (``h200.json`` for an "NVIDIA H200"). The folder's ``profile.json`` (``python -m
fxlowbit.profile`` run by the device check) gives every figure, the GEMM-operand quantizers
included; two benchmarks of the same run then replace what they measure closer to training:

- pack / unpack per bit width and the 1-bit mask, from ``pack_kernels.json``'s fp32 rows of
  ``kernels`` (default: ``"triton"`` on CUDA, where the backend's ``kernels="auto"`` runs the
  hand-written Triton kernels, while the profile times the Inductor-compiled inline path; on a CPU
  the profile's own figures stay). Converted to the profile's units: fp32 bytes in (pack) or out
  (unpack) per second, and for the mask fp32 input bytes per second of pack + unpack;
- matmul TFLOP/s of ``bfloat16``, ``int8`` and ``float8_e4m3fn`` per GEMM bucket, from
  ``gemm.json`` (providers ``bf16``, ``int8``, ``fp8``: codes in, scale epilogue fused, as
  ``fxlowbit::lowbit_linear`` runs them): the median over the table's shapes in each bucket, bf16
  from the same shapes so the low-bit gains compare like with like.

The replaced figures stay in ``meta["profile_run"]``; ``meta["device_check"]`` names the run
(date, device, commit) and ``meta["sources"]`` says where each figure came from. Example::

    profile = from_device_check("/tmp/device_check")
    profile.save(profile_path("fxlowbit/profiles/", profile))
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
from pathlib import Path

from fxlowbit.costmodel import HardwareProfile, bucket

__all__ = ["from_device_check", "profile_path", "device_slug"]

GEMM_DTYPES = {"bf16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}  # gemm.py provider -> key


def _load(folder: Path, name: str) -> dict | None:
    """The script result of benchmark ``name`` (None when it is absent or produced nothing)."""
    path = folder / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("result")


def kernel_figures(rows: list[dict], provider: str) -> dict:
    """pack_gbps / unpack_gbps per bit width and mask_gbps, in the profile's units, from
    pack_kernels.py's fp32 rows of ``provider`` (bandwidth figures of fp32 bytes, see module doc)."""
    fp32 = {r["op"]: r for r in rows if r["dtype"] == "torch.float32" and r["provider"] == provider}
    out: dict = {"pack_gbps": {}, "unpack_gbps": {}}
    for op, r in fp32.items():
        m = re.fullmatch(r"(pack|unpack)(\d+)", op)
        if m:
            out[f"{m[1]}_gbps"][int(m[2])] = float(f"{4 * r['numel'] / r['ms'] / 1e6:.4g}")
    if "mask_pack" in fp32 and "mask_unpack" in fp32:
        ms = fp32["mask_pack"]["ms"] + fp32["mask_unpack"]["ms"]
        out["mask_gbps"] = float(f"{4 * fp32['mask_pack']['numel'] / ms / 1e6:.4g}")
    return {k: v for k, v in out.items() if v}


def gemm_figures(rows: list[dict]) -> dict[str, dict[str, float]]:
    """dtype -> bucket -> median TFLOP/s over gemm.py's shapes in that bucket."""
    found: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        key = GEMM_DTYPES.get(str(r.get("provider")))
        if key is None or "tflops" not in r:
            continue  # other providers, or one that failed on this device
        m, n, k = r["shape"]
        found.setdefault(key, {}).setdefault(bucket(2 * m * n * k), []).append(r["tflops"])
    return {dt: {b: float(f"{statistics.median(v):.4g}") for b, v in t.items()} for dt, t in found.items()}


def from_device_check(folder: str | os.PathLike, kernels: str | None = None) -> HardwareProfile:
    """The profile of a device-check folder (see the module docstring); ``kernels``: the
    pack_kernels provider whose figures replace the profile's pack/unpack/mask ("triton",
    "inductor"; None: "triton" on CUDA, none on a CPU)."""
    folder = Path(folder)
    base = _load(folder, "profile")
    if base is None:
        raise ValueError(
            f"fxlowbit profile: {folder} has no profile result (profile.json); rerun the device check "
            "with --only profile"
        )
    profile = HardwareProfile.from_dict(base)
    summary = json.loads((folder / "summary.json").read_text())["meta"]
    kernels = kernels or ("triton" if profile.kind == "cuda" else None)
    sources = {"*": "profile.json (python -m fxlowbit.profile)"}
    replaced: dict = {}
    changes: dict = {}
    packs = _load(folder, "pack_kernels")
    if kernels and packs:
        for key, value in kernel_figures(packs["rows"], kernels).items():
            if key == "mask_gbps":
                changes[key] = value
            else:
                changes[key] = {**getattr(profile, key), **value}
            replaced[key] = getattr(profile, key)
            sources[key] = f"pack_kernels.json, fp32 rows, provider {kernels}"
    gemms = _load(folder, "gemm")
    if gemms:
        matmul = {dt: dict(t) for dt, t in profile.matmul_tflops.items()}
        for dt, table in gemm_figures(gemms["rows"]).items():
            matmul.setdefault(dt, {}).update(table)
            sources[f"matmul_tflops.{dt}"] = f"gemm.json, buckets {sorted(table)} (median over shapes)"
        replaced["matmul_tflops"] = profile.matmul_tflops
        changes["matmul_tflops"] = matmul
    meta = dict(profile.meta)
    keys = ("date", "device", "commit", "dirty", "dry_run", "command")
    meta["device_check"] = {k: summary.get(k) for k in keys}
    meta["sources"] = sources
    meta["profile_run"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in replaced.items()}
    if summary.get("dry_run"):
        meta["note"] = "DRY RUN of benchmarks/device_check.py: CPU smoke figures, not a profile to ship"
    return dataclasses.replace(profile, measured=True, meta=meta, **changes)


def device_slug(name: str) -> str:
    """A file stem for a device name: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Za-z]?)\b", name)
    return m[1].lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def profile_path(out: str | os.PathLike, profile: HardwareProfile) -> Path:
    """``out`` itself, or ``out/<device_slug>.json`` when ``out`` is a folder (or ends with /)."""
    path = Path(out)
    if str(out).endswith(os.sep) or path.is_dir():
        return path / f"{device_slug(profile.device)}.json"
    return path
