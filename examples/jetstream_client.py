"""Send prompts to a running `flowrl-jax serve` (JetStream gRPC) server, concurrently.

    flowrl-jax serve --model DIR --port 9000 &
    python examples/jetstream_client.py --server 127.0.0.1:9000 "What is 2+2?" "Name a prime."
"""

import argparse
import concurrent.futures as cf
import json

from flowrl_jax.sampling.jetstream_client import request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--server", default="127.0.0.1:9000")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    with cf.ThreadPoolExecutor(len(args.prompts)) as ex:
        futs = [ex.submit(request, args.server, text=p, max_tokens=args.max_tokens) for p in args.prompts]
        for p, f in zip(args.prompts, futs):
            c = f.result()
            print(json.dumps({"prompt": p, "text": c.text, "token_ids": c.token_ids}))


if __name__ == "__main__":
    main()
