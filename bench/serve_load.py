"""What N concurrent clients get from a running `python -m minillm.serve`: each streams one completion
through the official openai client at the same moment; prints the wall time, the tokens per second
of all of them together, and per request the latency and the time to its first token.

    python -m minillm.serve --model weights/smollm2-135m.safetensors --port 8766 &
    python -m bench.serve_load --url http://127.0.0.1:8766 --clients 8 --max-tokens 16

The server queues requests (one worker thread decodes one at a time), so the first token of the
last client in the queue waits for every request before it: the table shows that spread.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import openai


def one_client(client, model: str, i: int, max_tokens: int, out: list) -> None:
    """One streamed completion (seed i) -> out[i] = (first-token s, total s, completion tokens)."""
    t0, first, tokens = time.perf_counter(), None, 0
    stream = client.completions.create(model=model, prompt="The capital of France is", max_tokens=max_tokens,
                                       temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    out[i] = (first, time.perf_counter() - t0, tokens)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens each asks for (default: 16)")
    args = ap.parse_args(argv)
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    out: list = [None] * args.clients
    threads = [threading.Thread(target=one_client, args=(client, model, i, args.max_tokens, out))
               for i in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    failed = sum(r is None for r in out)
    done = [r for r in out if r is not None]
    latency, first = sorted(r[1] for r in done), sorted(r[0] for r in done)
    tokens = sum(r[2] for r in done)
    print(f"| clients | tokens each | wall s | tok/s, all together | latency min / median / max s | "
          f"first token min / max s | failed |\n|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.max_tokens} | {wall:.2f} | {tokens / wall:.1f} | {latency[0]:.2f} / "
          f"{statistics.median(latency):.2f} / {latency[-1]:.2f} | {first[0]:.2f} / {first[-1]:.2f} | {failed} |")


if __name__ == "__main__":
    main()
