"""How long from an interruption notice until every kernel's flush is durable, through the server.

    python benchmarks/server_flush.py                 # 1, 2 and 4 kernels, 50 MB each
    python benchmarks/server_flush.py --kernels 1 8 --mb 200

A real `jupyter server` with jupyter-spot on 127.0.0.1, the AWS metadata
simulator, N notebooks each holding ``--mb`` MB of numpy data and busy in a loop
cell that keeps changing a small variable. Printed per N: the server's own
measure (notice seen → the kernel's snapshot in the store, from the flush
events) and, as the baseline measured in the same run on the same kernels, an
explicit durable ``jupyter_spot.snapshot()`` after the same small change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelClient
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_spot.notice.simulator import Simulator

FLUSH = "https://events.jupyter.org/jupyter_spot/flush/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_code(client: AsyncKernelClient, code: str) -> str:
    out: list[str] = []
    reply = await client.execute_interactive(
        code, timeout=600, output_hook=lambda m: out.append(m["content"].get("text", ""))
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


async def trial(kernels: int, mb: int, work: Path) -> dict[str, Any]:
    root, runtime = work / "root", work / "runtime"
    root.mkdir(parents=True)
    port, token = free_port(), os.urandom(8).hex()
    with Simulator("aws") as simulator:
        env = {
            **os.environ,
            "JUPYTER_SPOT_STORE": str(work / "store"),
            "JUPYTER_SPOT_SIGNING_KEY": os.environ.get("JUPYTER_SPOT_SIGNING_KEY", "benchmark-key"),
            "JUPYTER_RUNTIME_DIR": str(runtime),
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": simulator.url,
        }
        log = open(work / "server.log", "w")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             "--SpotApp.notice_sources=aws", "--SpotApp.notice_poll_interval=0.2"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        http = AsyncHTTPClient()
        base = f"http://127.0.0.1:{port}/"
        headers = {"Authorization": f"token {token}"}
        try:
            for _ in range(300):
                try:
                    await http.fetch(base + "jupyter-spot/api/status", headers=headers)
                    break
                except OSError:
                    await asyncio.sleep(0.2)
            clients = []
            for index in range(kernels):
                body = json.dumps({"path": f"nb{index}.ipynb", "type": "notebook", "kernel": {"name": "python3"}})
                response = await http.fetch(HTTPRequest(base + "api/sessions", "POST", headers, body))
                kernel_id = json.loads(response.body)["kernel"]["id"]
                client = AsyncKernelClient(connection_file=str(runtime / f"kernel-{kernel_id}.json"))
                client.load_connection_file()
                client.start_channels(hb=False)
                await client.wait_for_ready(timeout=120)
                await run_code(client, f"import numpy as np\ndata = np.random.default_rng(0).random({mb} * 131072)\ny = 0")
                clients.append(client)
            baseline = []
            for client in clients:  # same kernels, same small change, an explicit durable snapshot
                await run_code(client, "import jupyter_spot\njupyter_spot.snapshot()")  # the 50 MB are durable
                out = await run_code(
                    client,
                    "import time, jupyter_spot\ny += 1\nt = time.perf_counter()\njupyter_spot.snapshot()\n"
                    "print(time.perf_counter() - t)",
                )
                baseline.append(float(out.split()[-1]))
            events = await websocket_connect(f"ws://127.0.0.1:{port}/api/events/subscribe?token={token}")
            for client in clients:
                client.execute("import time\nwhile True:\n    y += 1\n    time.sleep(0.001)")
            await asyncio.sleep(1.0)
            fired = time.perf_counter()
            simulator.fire("terminate", lead_time=120)
            done: list[float] = []
            while len(done) < kernels:
                event = json.loads(await asyncio.wait_for(events.read_message(), 120))
                if event.get("schema_id") == FLUSH and event["status"] in ("done", "failed"):
                    assert event["status"] == "done", event
                    done.append(event["seconds"])
            wall = time.perf_counter() - fired
            for client in clients:
                client.stop_channels()
        finally:
            server.terminate()
            server.wait(60)
            log.close()
    return {"kernels": kernels, "baseline": max(baseline), "flush": max(done), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--mb", type=int, default=50, help="MB of numpy data per kernel")
    args = parser.parse_args()
    print(f"{args.mb} MB per kernel; seconds (slowest kernel)")
    print(f"{'kernels':>8} {'explicit snapshot':>18} {'notice flush':>13} {'ratio':>6} {'notice→all done (wall)':>23}")
    for count in args.kernels:
        with tempfile.TemporaryDirectory() as tmp:
            r = asyncio.run(trial(count, args.mb, Path(tmp)))
        ratio = r["flush"] / r["baseline"] if r["baseline"] else float("nan")
        print(f"{r['kernels']:>8} {r['baseline']:>18.3f} {r['flush']:>13.3f} {ratio:>6.1f} {r['wall']:>23.3f}")


if __name__ == "__main__":
    main()
