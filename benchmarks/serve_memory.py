"""A server's memory over its life: waves of concurrent 64-megapixel requests, then what it keeps.

One ``anomatune serve`` process (the run of ``limits.py``, default ``--max-pixels``) answers
waves of 4, 8, then 14 clients, each posting one 64-megapixel PNG at once (overlay and mask
as base64). After each wave, with the server idle, its peak resident memory (VmHWM) so far
and its resident memory now (VmRSS). The bound to hold: 3 GB at the peak and at rest, over
the whole life, not only for one request.

    python benchmarks/serve_memory.py          # about 5 minutes on 2 cores

Writes ``results/serve_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import command_line, serving, write_results
from limits import fitted_run, image_of

NAME = "serve_memory"


def memory(pid: int) -> dict[str, float]:
    """VmHWM (peak) and VmRSS (now) of a running process, in GB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 2**20, 2) for key in ("VmHWM", "VmRSS")}


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, nargs="+", default=[4, 8, 14], help="Clients of each wave.")
    parser.add_argument("--megapixels", type=int, default=64)
    args = parser.parse_args()
    image = image_of(args.megapixels).read_bytes()

    def post(url: str) -> int:
        return httpx.post(url + "/predict", files=[("file", ("big.png", image, "image/png"))], timeout=1800).status_code

    rows = []
    with serving(fitted_run(), "--device", "cpu", "--max-request-mb", "1000") as (server, url):
        rows.append({"clients": 0, "ok": 0, "seconds": 0.0, **memory(server.pid)})
        for clients in args.waves:
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                statuses = list(pool.map(post, [url] * clients))
            time.sleep(2)
            rows.append(
                {
                    "clients": clients,
                    "ok": statuses.count(200),
                    "seconds": round(time.perf_counter() - start, 1),
                    **memory(server.pid),
                }
            )
            print(rows[-1], flush=True)
    command = command_line()
    lines = [
        "# A server's memory over its life",
        "",
        f"Command: `{command}` (2-core CPU). One server; each wave: that many clients post one {args.megapixels}-megapixel",
        "PNG at once. Peak (VmHWM) so far and resident (VmRSS) after the wave, the server idle.",
        "",
        "| wave (clients) | answered 200 | seconds | peak so far (GB) | resident after (GB) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['clients']} | {r['ok']} | {r['seconds']} | {r['VmHWM']} | {r['VmRSS']} |" for r in rows]
    write_results(NAME, {"command": command, "megapixels": args.megapixels, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
