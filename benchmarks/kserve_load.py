"""A light KServe v2 load generator: N concurrent sequences from one asyncio process with aiohttp.

Each sequence sends ``steps`` single-token steps (``sequence_id`` / ``sequence_start`` / ``sequence_end``,
input and output as binary tensor data, the requests ``tritonclient.http`` sends) and waits for each reply
before its next step. Every connection is opened and warmed up before the clock starts. Prints one JSON
object: ``steps_per_s`` and ``latencies_us`` (one per step).

    python benchmarks/kserve_load.py --port 8000 --model lm --sequences 64 --steps 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"


def request_body(sequence_id: int, token: int, start: bool, end: bool) -> tuple[bytes, dict[str, str]]:
    """One step's body (JSON header + 8 bytes of int64 ``input`` ``[1, 1]``) and its HTTP headers."""
    data = np.array([[token]], np.int64).tobytes()
    header = {
        "inputs": [
            {"name": "input", "shape": [1, 1], "datatype": "INT64", "parameters": {"binary_data_size": 8}}
        ],
        "parameters": {
            "sequence_id": sequence_id,
            "sequence_start": start,
            "sequence_end": end,
            "binary_data_output": True,
        },
    }
    text = json.dumps(header).encode()
    return text + data, {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"}


async def sequence(
    session: aiohttp.ClientSession, url: str, sequence_id: int, steps: int, vocab: int, latencies: list[float]
) -> None:
    for t in range(steps):
        body, headers = request_body(sequence_id, (sequence_id + t) % vocab, t == 0, t == steps - 1)
        start = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            reply = await response.read()
            if response.status != 200:
                raise RuntimeError(
                    f"step {t} of sequence {sequence_id}: HTTP {response.status} {reply[:200]!r}"
                )
            json.loads(reply[: int(response.headers[HEADER_LENGTH])])
        latencies.append(time.perf_counter() - start)


async def run(port: int, model: str, sequences: int, steps: int, vocab: int) -> dict:
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=sequences)) as session:
        warm: list[float] = []
        await asyncio.gather(*(sequence(session, url, 10**6 + s, 3, vocab, warm) for s in range(sequences)))
        latencies: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(
            *(sequence(session, url, s + 1, steps, vocab, latencies) for s in range(sequences))
        )
        elapsed = time.perf_counter() - start
    return {"steps_per_s": sequences * steps / elapsed, "latencies_us": [x * 1e6 for x in latencies]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="lm")
    parser.add_argument("--sequences", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--vocab", type=int, default=64, help="token ids cycle through 0..vocab-1")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.port, args.model, args.sequences, args.steps, args.vocab))))
