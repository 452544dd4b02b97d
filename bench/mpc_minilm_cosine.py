"""MiniLM (all-MiniLM-L6-v2) under mpc on the 32 test sentences: cosine with sentence-transformers.

    python bench/mpc_minilm_cosine.py [--seq-lens 16 128] [--batch 8]

Runs the five parties as threads (``veil.mpc.run``) on batches of sentences and prints, per
sequence length, the minimum and mean cosine with the plaintext reference (sentence-transformers),
the online and offline time and bytes, the rounds and program segments per batch, and the peak
resident memory of this process so far (all five parties share it). Each batch is one session; its
queries run in segments of at most ``--segment-mb`` of dealer material (``veil.mpc.run(...,
segment_bytes=)``; 0: the whole query at once, as before segments existed).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import veil.mpc  # noqa: E402
from minilm_sentences import SENTENCES  # noqa: E402
from veil.models import minilm  # noqa: E402
from veil.models.secure import cosine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--batch", type=int, default=8, help="sentences per mpc run")
    ap.add_argument("--count", type=int, default=len(SENTENCES), help="how many of the 32 sentences")
    ap.add_argument("--segment-mb", type=float, default=None,
                    help="dealer material per program segment in MiB (default veil's SEGMENT_BYTES; 0: one segment)")
    ap.add_argument("--progress", action="store_true", help="print a line after every batch")
    args = ap.parse_args()
    seg = None if args.segment_mb is None else int(args.segment_mb * 2**20)
    texts = SENTENCES[: args.count]
    print("| seq | sentences | batch | min cosine | mean cosine | online s | offline s | online MB | offline MB | rounds/batch "
          "| segments/batch | peak RSS GiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in args.seq_lens:
        ref = minilm.reference_embeddings(texts, s)
        got, on, off, on_b, off_b, rounds, segs = [], 0.0, 0.0, 0, 0, 0, 0
        t0 = time.time()
        for i in range(0, len(texts), args.batch):
            part = texts[i:i + args.batch]
            ids, mask = minilm.tokenize(part, s)
            emb, rep = veil.mpc.run(minilm.minilm_graph(mask), {"input_ids": ids}, timeout=3600, compare=False,
                                    segment_bytes=seg)
            segs = rep.per_query[0].get("segments", 1)
            if args.progress:  # one line per batch, so a long run that is stopped still says what it did
                cb = cosine(emb, ref[i:i + args.batch])
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                print(f"  seq {s}, sentences {i}..{i + len(part) - 1}: min cosine {cb.min():.6f}, online {rep.online_s:.1f} s, "
                      f"offline {rep.offline_s:.1f} s, {rep.rounds} rounds, {segs} segments, peak RSS so far {peak:.1f} GiB, "
                      f"{time.time() - t0:.0f} s since the start of this length", flush=True)
            got.append(emb)
            on, off, on_b, off_b, rounds = on + rep.online_s, off + rep.offline_s, on_b + rep.online_bytes, \
                off_b + rep.offline_bytes, rep.rounds
        c = cosine(np.concatenate(got), ref)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"| {s} | {len(texts)} | {args.batch} | {c.min():.6f} | {c.mean():.6f} | {on:.1f} | {off:.1f} | {on_b / 1e6:.0f} | "
              f"{off_b / 1e6:.0f} | {rounds} | {segs} | {peak:.1f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")
