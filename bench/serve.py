"""
bench/serve.py: what continuous batching buys, measured through serve.py with the openai client.

    python bench/serve.py --ckpt out/cpu_demo          # a config/cpu_demo.py run (python train.py config/cpu_demo.py)

For 1, 4, 8 and 16 concurrent clients, each streams one completion of --tokens tokens (min_tokens holds every
reply to that length, so each client asks for the same work) from a server started for the table with
--max_batch 16. Per row: total generated tokens/s over the wall time, the time to first token (p50, p95 over
clients: the wait for a row plus the prefill) and each client's own tokens/s after its first token. The last
row is one client against a server started with --max_batch 1: its decode runs one row instead of sixteen,
so the gap to the first row is what the batch-invariant decode costs a lone client (engine.py).
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def ", "class ", "import ", "# ", "    return ", "if __name__", "for i in ", "with open("]


def start_server(ckpt, max_batch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", ckpt, "--port", str(port),
                                "--max_batch", str(max_batch), "--model_name", "bench"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"serve.py exited with {process.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("serve.py did not come up in 60 s")


def client_run(client, index, tokens, out):
    """One streamed completion: (seconds to the first token, seconds to the last, tokens generated)."""
    start = time.perf_counter()
    first, n = None, 0
    stream = client.completions.create(model="bench", prompt=PROMPTS[index % len(PROMPTS)], max_tokens=tokens,
                                       temperature=0.8, seed=index, stream=True, stream_options={"include_usage": True},
                                       extra_body={"min_tokens": tokens})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            n = chunk.usage.completion_tokens
    out[index] = (first, time.perf_counter() - start, n)


def measure(url, n_clients, tokens):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    client_run(client, 0, 4, {})  # warm-up: the first forward allocates the cache rows
    results = {}
    threads = [threading.Thread(target=client_run, args=(client, i, tokens, results)) for i in range(n_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results.values())
    per_client = [(r[2] - 1) / (r[1] - r[0]) for r in results.values()]
    return dict(total=sum(r[2] for r in results.values()) / wall, p50=statistics.median(ttft),
                p95=ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], per_client=statistics.mean(per_client))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="out/cpu_demo", help="a training run's out_dir")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.ckpt, "ckpt.pt")):
        raise SystemExit(f"no checkpoint in {args.ckpt}: train one first (python train.py config/cpu_demo.py)")
    rows = []
    process, url = start_server(args.ckpt, 16)
    try:
        for n in (1, 4, 8, 16):
            rows.append((f"{n} client{'s' * (n > 1)}, --max_batch 16", n, measure(url, n, args.tokens)))
    finally:
        process.terminate()
        process.wait()
    process, url = start_server(args.ckpt, 1)
    try:
        rows.append(("1 client, --max_batch 1", 1, measure(url, 1, args.tokens)))
    finally:
        process.terminate()
        process.wait()
    alone = rows[0][2]["total"]
    print(f"\n{args.tokens} tokens per reply, {args.ckpt}\n")
    print("| clients | total tokens/s | x one client | TTFT p50 | TTFT p95 | tokens/s per client |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, r in rows:
        print(f"| {name} | {r['total']:.0f} | {r['total'] / alone:.2f} | {r['p50'] * 1000:.0f} ms | "
              f"{r['p95'] * 1000:.0f} ms | {r['per_client']:.0f} |")


if __name__ == "__main__":
    main()
