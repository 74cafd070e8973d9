"""One sequence streamed to `rnndeploy serve` over gRPC with the stock ``tritonclient.grpc`` client.

A stream per sequence keeps every step on one server (and one replica behind a load balancer) with no HTTP
request per step. Each reply comes to the stream's callback as ``(result, error)``: exactly one of them is
None. An error (an unknown model, a token outside the vocabulary, a full server) carries the server's
message and leaves the stream open.

    rnndeploy serve model.onnx --grpc-port 8001 &
    python examples/grpc_stream.py --url 127.0.0.1:8001 --model model 3 1 4 1 5
"""

from __future__ import annotations

import argparse
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def stream_sequence(url: str, model: str, tokens: list[int], sequence_id: int = 42) -> list[int]:
    """Sends ``tokens`` one step at a time as one sequence; returns the most likely next token after each.

    Raises:
        InferenceServerException: the server refused a step (its message says why).
    """
    client = grpcclient.InferenceServerClient(url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        predicted = []
        for t, token in enumerate(tokens):
            x = grpcclient.InferInput("input", [1, 1], "INT64")
            x.set_data_from_numpy(np.array([[token]], np.int64))
            last = t == len(tokens) - 1
            client.async_stream_infer(
                model, [x], sequence_id=sequence_id, sequence_start=t == 0, sequence_end=last
            )
            result, error = replies.get()
            if error is not None:  # result is None: there is no output to read
                raise error
            predicted.append(int(result.as_numpy("output")[0, -1].argmax()))
        return predicted
    finally:
        client.stop_stream()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    parser.add_argument("--model", default="model", help="the model's name on the server")
    parser.add_argument("tokens", type=int, nargs="+", help="token ids of the sequence")
    args = parser.parse_args()
    try:
        predicted = stream_sequence(args.url, args.model, args.tokens)
    except InferenceServerException as error:
        sys.exit(f"error: the server refused a step: {error.message()}")
    for token, after in zip(args.tokens, predicted, strict=True):
        print(f"{token} -> {after}")


if __name__ == "__main__":
    main()
