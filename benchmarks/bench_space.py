#!/usr/bin/env python
"""What the Space costs over calling the pipeline directly, and what concurrent users get.

    python benchmarks/bench_space.py --model checkpoints/mg2-small

The peer is `MG2Pipeline.__call__` in this process with the Space's arguments. Against it:
- one user: `/generate` through gradio_client, one request at a time. This adds the HTTP round trip, the queue,
  WAV encoding, two figures, the MIDI file and the retrieval table. Medians over --requests.
- many users: --requests sent at once to servers run with MG2_CONCURRENCY=1 and 2. Wall time per request
  against the direct call.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from gradio_client import Client

from mg2_pipeline.presets import load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "A lively Irish jig played on fiddle at 120 BPM in D major"


def start_space(model: str, concurrency: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MG2_MODEL": model,
        "MG2_CONCURRENCY": str(concurrency),
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "space", "app.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=5)
            return server, url
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"The Space exited with code {server.returncode}")
            time.sleep(0.5)
    server.kill()
    raise SystemExit("The Space did not start within 5 minutes")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="checkpoints/mg2-small")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--output", default="benchmarks/results/bench_space.json")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model, device="cpu")  # the benchmark builds its tensors on the CPU
    pipe.set_progress_bar_config(disable=True)
    seconds = pipe.default_audio_length_in_s
    guidance = pipe.default_guidance_scales  # what the Space's sliders start at; the same UNet passes both ways
    direct = []
    for seed in range(args.requests + 1):  # the first call warms up
        start = time.perf_counter()
        pipe(
            PROMPT,
            audio_length_in_s=seconds,
            num_inference_steps=args.steps,
            guidance_scale=guidance[0],
            melody_guidance_scale=guidance[1],
            generator=torch.Generator().manual_seed(seed),
        )
        direct.append(time.perf_counter() - start)
    direct_s = statistics.median(direct[1:])
    del pipe

    def request(client: Client, seed: int) -> float:
        start = time.perf_counter()
        client.predict(PROMPT, "", None, None, "", seconds, args.steps, *guidance, seed, 1, 5, api_name="/generate")
        return time.perf_counter() - start

    results = {
        "model": args.model,
        "audio_seconds": seconds,
        "steps": args.steps,
        "requests": args.requests,
        "direct_call_s": round(direct_s, 3),
        "concurrent": {},
    }
    for concurrency in (1, 2):
        server, url = start_space(args.model, concurrency)

        def connect():  # no time limit on the client's HTTP calls (httpx's default is 5 s): slow requests are measured
            return Client(url, verbose=False, httpx_kwargs={"timeout": None})

        try:
            client = connect()
            if concurrency == 1:
                latencies = [request(client, seed) for seed in range(args.requests + 1)][1:]
                results["space_request_s"] = round(statistics.median(latencies), 3)
                results["space_overhead"] = round(results["space_request_s"] / direct_s - 1, 4)
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.requests) as pool:
                list(pool.map(lambda seed: request(connect(), seed), range(args.requests)))
            per_request = (time.perf_counter() - start) / args.requests
            results["concurrent"][concurrency] = {
                "wall_s_per_request": round(per_request, 3),
                "vs_direct_call": round(per_request / direct_s, 3),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"{args.model}: {seconds:.2f} s of audio, {args.steps} steps, {torch.get_num_threads()} threads")
    print(
        f"| path | seconds per request | vs direct call |\n|---|---|---|\n| direct `pipe(...)` | {direct_s:.3f} | 1.00 |"
    )
    print(f"| Space `/generate`, one user | {results['space_request_s']:.3f} | {1 + results['space_overhead']:.2f} |")
    for concurrency, row in results["concurrent"].items():
        print(
            f"| Space, {args.requests} users at once, MG2_CONCURRENCY={concurrency} | {row['wall_s_per_request']:.3f} "
            f"| {row['vs_direct_call']:.2f} |"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
