"""The decode roofline: how fast decode could go if it only waited on memory.

Decode reads every weight once per token, so its ceiling is the machine's memory-read
bandwidth divided by the bytes streamed per token. The bandwidth is measured here, by our C
streaming-read kernel on the engine's own thread pool, over a buffer far larger than the
last-level cache, in huge pages where the engine's weights are (bitnet_cli.kernels.huge_page_region).
"""

from __future__ import annotations

import numpy as np

from bitnet_cli import kernels
from bitnet_cli.bench import kernels_api
from bitnet_cli.bench.stats import scale, time_call

BUFFER_BYTES = 1 << 30  # 1 GiB: 32x a 32 MiB L3


def measure_bandwidth(threads: int, repeat: int, nbytes: int = BUFFER_BYTES) -> dict:
    """Memory-read bandwidth in GB/s (summary over `repeat` passes over an `nbytes` buffer)."""
    region = kernels.huge_page_region(nbytes)
    buf = np.frombuffer(region, dtype=np.uint8, count=nbytes)
    buf[:] = 1  # written once, so every page is really mapped
    reader = kernels_api.StreamRead(buf, threads)
    seconds = time_call(reader, repeat, min_time=0.0)
    del reader, buf
    region.close()
    return scale(seconds, nbytes / 1e9)


def run(bytes_per_token: dict, threads: list[int], repeat: int, nbytes: int = BUFFER_BYTES,
        progress=None) -> list[dict]:
    """Bandwidth and the decode ceiling (tokens/s) at each thread count."""
    rows = []
    for th in threads:
        if progress:
            progress(f"memory bandwidth {th}t")
        rows.append(ceiling_row(th, measure_bandwidth(th, repeat, nbytes), bytes_per_token))
    return rows


def ceiling_row(threads: int, bandwidth_gbps: dict, bytes_per_token: dict) -> dict:
    """One roofline row: a measured bandwidth and the decode ceiling it allows at these bytes per token."""
    return {
        "threads": threads,
        "bandwidth_gbps": bandwidth_gbps,
        "bytes_per_token": bytes_per_token["total"],
        "decode_ceiling_tps": {k: v * 1e9 / bytes_per_token["total"] for k, v in bandwidth_gbps.items() if k != "n"},
    }


def percent_of_ceiling(tokens_per_s: float, ceiling_tps: float) -> float:
    return 100.0 * tokens_per_s / ceiling_tps
